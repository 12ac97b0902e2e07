"""Triton Python backend: photos / explicit head controls -> 9-channel head hint (see ../config.pbtxt)."""
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from caphuman.tritonserver.backend import log, model_setup, triton_error
from caphuman.tritonserver.services import HeadConditionService
from caphuman.tritonserver.weights import RANDOM_WEIGHTS_NOTICE, load_condition_builder, weight_files


def _optional(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy().reshape(-1)


class TritonPythonModel:
    def initialize(self, args):
        _, _, settings = model_setup(args, pb_utils)
        files = weight_files()
        if files is None:
            log(pb_utils, "warn", f"head_condition: {RANDOM_WEIGHTS_NOTICE}")
        self.service = HeadConditionService(load_condition_builder(files), settings)
        self._warm_up()

    def _warm_up(self):
        from caphuman.runtime.condition import HeadControls, Photo
        from PIL import Image
        t0 = time.perf_counter()
        frame = np.full((512, 512, 3), 128, np.uint8)
        photo = Photo(None, Image.fromarray(frame), frame, None, None)
        self.service.builder.build(photo, None, "position,pose", HeadControls(yaw=10.0), allow_no_face=True)
        log(pb_utils, "info", f"head_condition: warm in {time.perf_counter() - t0:.1f} s")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ref = _optional(request, "REFERENCE_IMAGE")[0]
                pose = _optional(request, "POSE_IMAGE")
                head = _optional(request, "HEAD_POSE")
                modes = _optional(request, "MODES")
                light = _optional(request, "LIGHT")
                more = _optional(request, "HEAD_CONTROLS")
                res = int(_optional(request, "RESOLUTION")[0])
                hint, hit, ms, notes, in_frame = self.service.hint(
                    ref, None if pose is None else pose[0],
                    None if head is None else tuple(float(v) for v in head),
                    "position,pose" if modes is None else modes[0].decode("utf-8", "replace"),
                    "" if light is None else light[0].decode("utf-8", "replace"), res,
                    "" if more is None else more[0].decode("utf-8", "replace"))
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("HINT", hint),
                    pb_utils.Tensor("CACHE_HIT", np.array([hit], dtype=np.bool_)),
                    pb_utils.Tensor("ELAPSED_MS", np.array([ms], dtype=np.float32)),
                    pb_utils.Tensor("NOTES", np.array([n.encode() for n in notes] or [b""], dtype=np.object_)),
                    pb_utils.Tensor("IN_FRAME", np.array([in_frame], dtype=np.float32))]))
            except Exception as e:  # noqa: BLE001 - every request gets its own response or error
                responses.append(pb_utils.InferenceResponse(error=triton_error(pb_utils, e)))
        return responses

    def finalize(self):
        self.service = None
