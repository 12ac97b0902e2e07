"""Triton Python backend: the CapHuman orchestrator (decoupled; see ../config.pbtxt and tritonserver/params.py).

Per request: 1. parse and validate the inputs; 2. identity context (local cache by photo hash, else BLS
to `identity`); then per item: 3. head hint (BLS to `head_condition`); 4. DDIM loop with a progress
response per step; 5. VAE decode and the image response. Then Triton's empty final response.
"""
import json
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from tritonserver.backend import error_from_bls, log, model_setup, triton_error
from tritonserver.params import HEAD_MODEL, IDENTITY_MODEL, RequestError, parse_request
from tritonserver.services import LRU, sha256
from tritonserver.weights import RANDOM_WEIGHTS_NOTICE, load_generation_pipeline, weight_files

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Cancelled(Exception):
    """The client cancelled the request or went away."""


def _tensor(name, value, dtype):
    return pb_utils.Tensor(name, np.asarray(value, dtype=dtype))


def _preview(x: torch.Tensor, size: int) -> np.ndarray:
    """A cheap look at the current latents: channels 0-2 min-max normalised, resized to size x size."""
    lat = x[:1, :3].float()
    lo, hi = lat.amin(dim=(2, 3), keepdim=True), lat.amax(dim=(2, 3), keepdim=True)
    img = ((lat - lo) / (hi - lo).clamp_min(1e-6) * 255).clamp(0, 255)
    img = torch.nn.functional.interpolate(img, size=(size, size), mode="nearest")
    return img[0].permute(1, 2, 0).to(torch.uint8).cpu().numpy()


class TritonPythonModel:
    def initialize(self, args):
        _, self.device, self.settings = model_setup(args, pb_utils)
        files = weight_files()
        self.random_weights = files is None
        if self.random_weights:
            log(pb_utils, "warn", f"caphuman: {RANDOM_WEIGHTS_NOTICE}")
        self.pipe = load_generation_pipeline(files, self.device)
        self.identity_cache = LRU(self.settings.identity_cache_entries)
        self._warm_up()

    def _warm_up(self):
        from runtime.pipeline import GenerationRequest, sphere_hint
        t0 = time.perf_counter()
        ctx = torch.zeros(1, 258, self.pipe.config.context_dim)
        self.pipe.generate(GenerationRequest(prompt="warm-up", hint=sphere_hint(256), identity_context=ctx, steps=2))
        log(pb_utils, "info", f"caphuman: warm in {time.perf_counter() - t0:.1f} s (device {self.device})")

    # ------------------------------------------------------------------------------------ serving
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._serve(request, sender)
                sender.send(flags=FINAL)
            except Cancelled:
                log(pb_utils, "info", f"caphuman: request {request.request_id()!r} cancelled by the client")
                self._safe_send(sender, None)
            except Exception as e:  # noqa: BLE001 - each request gets its own error; the model keeps serving
                if not isinstance(e, RequestError):
                    log(pb_utils, "error", f"caphuman: request failed: {type(e).__name__}: {e}")
                self._safe_send(sender, pb_utils.InferenceResponse(error=triton_error(pb_utils, e)))
        return None

    @staticmethod
    def _safe_send(sender, response):
        try:
            if response is None:
                sender.send(flags=FINAL)
            else:
                sender.send(response, flags=FINAL)
        except Exception:  # noqa: BLE001 - the client is gone; nothing left to tell it
            pass

    def _check_cancelled(self, request):
        is_cancelled = getattr(request, "is_cancelled", None)
        if is_cancelled is not None and is_cancelled():
            raise Cancelled()

    def _serve(self, request, sender):
        t_start = time.perf_counter()
        # 1. parse and validate
        arrays = {t.name(): t.as_numpy() for t in request.inputs()}
        req = parse_request(arrays, self.settings)
        t_parsed = time.perf_counter()
        # 2. identity context, once per request
        ctx, id_cache, id_ms = self._identity(req.reference)
        for i in range(req.num_items):
            self._check_cancelled(request)
            self._serve_item(request, sender, req, i, ctx, {"parse_ms": (t_parsed - t_start) * 1e3,
                                                            "identity_ms": id_ms, "identity_cache": id_cache})

    def _bls(self, model, inputs, outputs):
        response = pb_utils.InferenceRequest(model_name=model, inputs=inputs,
                                             requested_output_names=outputs).exec()
        if response.has_error():
            raise error_from_bls(pb_utils, model, response.error())
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}

    def _identity(self, reference: bytes):
        t0 = time.perf_counter()
        key = sha256(reference)
        ctx = self.identity_cache.get(key)
        if ctx is not None:
            return ctx, "orchestrator", (time.perf_counter() - t0) * 1e3
        out = self._bls(IDENTITY_MODEL, [_tensor("IMAGE", [[reference]], np.object_)],
                        ["CONTEXT", "CACHE_HIT", "ELAPSED_MS"])
        ctx = torch.from_numpy(out["CONTEXT"][0].copy())
        self.identity_cache.put(key, ctx)
        return ctx, "identity-model" if bool(out["CACHE_HIT"].reshape(-1)[0]) else "miss", \
            (time.perf_counter() - t0) * 1e3

    def _hint(self, req, i):
        inputs = [_tensor("REFERENCE_IMAGE", [req.reference], np.object_),
                  _tensor("RESOLUTION", [req.resolution], np.int32),
                  _tensor("MODES", [req.modes.encode()], np.object_),
                  _tensor("LIGHT", [req.light.encode()], np.object_)]
        pose, head = req.item(req.pose_images, i), req.item(req.head_poses, i)
        if pose is not None:
            inputs.append(_tensor("POSE_IMAGE", [pose], np.object_))
        if head is not None:
            inputs.append(_tensor("HEAD_POSE", head, np.float32))
        out = self._bls(HEAD_MODEL, inputs, ["HINT", "CACHE_HIT", "ELAPSED_MS", "NOTES"])
        notes = [n.decode() for n in out["NOTES"].reshape(-1) if n]
        return torch.from_numpy(out["HINT"].copy())[None], bool(out["CACHE_HIT"].reshape(-1)[0]), notes

    def _serve_item(self, request, sender, req, i, ctx, timings):
        from runtime.pipeline import GenerationRequest

        # 3. head hint
        t0 = time.perf_counter()
        hint, hint_hit, notes = self._hint(req, i)
        timings = {**timings, "head_condition_ms": (time.perf_counter() - t0) * 1e3,
                   "head_condition_cache": "hit" if hint_hit else "miss"}
        gen = GenerationRequest(prompt=req.prompts[0] if len(req.prompts) == 1 else req.prompts[i],
                                negative_prompt=req.negative_prompt, added_prompt=req.added_prompt, hint=hint,
                                identity_context=ctx[None], seed=req.seed + i, steps=req.steps,
                                guidance=req.guidance, eta=req.eta, strength=req.strength, tau=req.tau)
        try:
            gen.validate(self.pipe.config.unet.in_channels)
        except ValueError as e:
            raise RequestError(str(e)) from None
        warnings = []
        if self.pipe.text_encoder.tokenize([gen.full_prompt()]).truncated[0]:
            warnings.append("prompt is longer than CLIP's 77 tokens and was truncated (as CLIP and the official code do)")
        if len(req.negative_prompt) and self.pipe.text_encoder.tokenize([req.negative_prompt]).truncated[0]:
            warnings.append("negative prompt is longer than 77 tokens and was truncated")

        # 4. DDIM loop; a progress response per step
        marks = {"last_step": None, "total": req.steps}

        def on_step(k, total, x):
            marks["last_step"], marks["total"] = time.perf_counter(), total
            self._check_cancelled(request)
            if not req.progress:
                return
            outs = [_tensor("KIND", [b"progress"], np.object_), _tensor("INDEX", [i], np.int32),
                    _tensor("STEP", [k + 1], np.int32), _tensor("TOTAL_STEPS", [total], np.int32),
                    _tensor("METADATA", [b"{}"], np.object_)]
            if req.preview_size:
                outs.append(pb_utils.Tensor("IMAGE", _preview(x, req.preview_size)))
            try:
                sender.send(pb_utils.InferenceResponse(output_tensors=outs))
            except Exception as e:  # noqa: BLE001 - the stream is gone
                raise Cancelled() from e

        t1 = time.perf_counter()
        result = self.pipe.generate(gen, callback=on_step)
        t2 = time.perf_counter()
        # 5. the image response
        timings.update(sampling_ms=((marks["last_step"] or t2) - t1) * 1e3,
                       vae_decode_ms=(t2 - (marks["last_step"] or t2)) * 1e3,
                       item_ms=(t2 - t0) * 1e3)
        timings = {k: round(v, 2) if isinstance(v, float) else v for k, v in timings.items()}
        meta = {**result.parameters, "index": i, "seed": result.seeds[0], "timings": timings, "warnings": warnings,
                "condition_notes": notes, "random_weights": self.random_weights,
                "pose_image": req.item(req.pose_images, i) is not None,
                "head_pose": req.item(req.head_poses, i), "modes": req.modes, "light": req.light or None,
                "resolution": req.resolution}
        if self.random_weights:
            meta["notice"] = RANDOM_WEIGHTS_NOTICE
        total = marks["total"]
        sender.send(pb_utils.InferenceResponse(output_tensors=[
            _tensor("KIND", [b"image"], np.object_), _tensor("INDEX", [i], np.int32),
            _tensor("STEP", [total], np.int32), _tensor("TOTAL_STEPS", [total], np.int32),
            pb_utils.Tensor("IMAGE", np.ascontiguousarray(result.images[0])),
            _tensor("METADATA", [json.dumps(meta, default=str).encode()], np.object_)]))

    def finalize(self):
        self.pipe = None
