"""Triton Python backend: reference photo bytes -> identity context (see ../config.pbtxt)."""
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from caphuman.tritonserver.backend import log, model_setup, triton_error
from caphuman.tritonserver.services import IdentityService
from caphuman.tritonserver.weights import RANDOM_WEIGHTS_NOTICE, load_face_networks, serving_networks, weight_files


class TritonPythonModel:
    def initialize(self, args):
        _, device, settings = model_setup(args, pb_utils)
        files = weight_files()
        if files is None:
            log(pb_utils, "warn", f"identity: {RANDOM_WEIGHTS_NOTICE}")
        from caphuman.runtime.condition import FaceAnalyzer
        pipe = serving_networks(files, device, with_image_encoder=True)
        facenet, bisenet = load_face_networks(files, device)
        self.service = IdentityService(pipe, facenet, bisenet, FaceAnalyzer(), settings)
        self._warm_up(pipe, facenet, bisenet)

    @torch.no_grad()
    def _warm_up(self, pipe, facenet, bisenet):
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        self.service.analyzer.mtcnn.detect(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))
        p = next(pipe.denoiser.parameters())
        fid = facenet(torch.zeros(1, 3, 160, 160, device=p.device))
        bisenet(torch.zeros(1, 3, 256, 256, device=p.device))
        tokens = pipe.image_encoder(torch.zeros(1, 3, 224, 224, device=p.device, dtype=p.dtype))
        pipe.denoiser.project_identity(tokens.to(p.dtype), fid.to(p.dtype))
        log(pb_utils, "info", f"identity: warm in {time.perf_counter() - t0:.1f} s")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
                contexts, hits, times = [], [], []
                for data in images:  # [batch] per request (max_batch_size > 0)
                    ctx, hit, ms = self.service.context(data if isinstance(data, bytes) else bytes(data))
                    contexts.append(ctx)
                    hits.append([hit])
                    times.append([ms])
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("CONTEXT", np.stack(contexts).astype(np.float32)),
                    pb_utils.Tensor("CACHE_HIT", np.array(hits, dtype=np.bool_)),
                    pb_utils.Tensor("ELAPSED_MS", np.array(times, dtype=np.float32))]))
            except Exception as e:  # noqa: BLE001 - every request gets its own response or error
                responses.append(pb_utils.InferenceResponse(error=triton_error(pb_utils, e)))
        return responses

    def finalize(self):
        self.service = None
