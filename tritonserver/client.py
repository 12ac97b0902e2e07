"""Python client for a CapHuman-RT server (Triton gRPC, streaming).

    from caphuman.tritonserver.client import CapHumanClient
    client = CapHumanClient("localhost:8001")
    images = client.generate(open("me.jpg", "rb").read(), ["a photo of a man at the beach"], steps=20,
                             head_pose=[(20, 0, 0)], on_progress=lambda p: print(p.step, "/", p.total))
    images[0].image       # uint8 [H, W, 3]
    images[0].metadata    # parameters, per-stage timings, warnings, random_weights

Request fields are the lower-case names of tritonserver/params.py INPUTS. One gRPC stream per call, so
a client object may be shared by threads. Errors the server reports raise `ServerError` (with the
server's message); connection problems raise `ConnectionError`.
"""
from __future__ import annotations

import json
import queue
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from caphuman.export.extras import require

from .params import BAD_REQUEST_PREFIX, INPUT_BY_NAME, INTERNAL_PREFIX, MODEL_NAME, NUMPY_DTYPES, request_arrays


class ServerError(RuntimeError):
    """The server rejected or failed the request (message from the server; `status` is a gRPC code name:
    'StatusCode.INVALID_ARGUMENT' for a bad request, 'StatusCode.INTERNAL' for a failure of our models,
    'StatusCode.UNKNOWN' for other errors on the stream, such as Triton's own input checks)."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        # A streamed reply's error carries only its message (Triton's ModelStreamInferResponse has no code
        # field), so the code comes from our models' message prefixes (tritonserver/backend.py triton_error).
        self.status = status or ("StatusCode.INVALID_ARGUMENT" if self.bad_request
                                 else "StatusCode.INTERNAL" if message.startswith(INTERNAL_PREFIX)
                                 else "StatusCode.UNKNOWN")

    @property
    def bad_request(self) -> bool:
        return str(self).startswith(BAD_REQUEST_PREFIX)


@dataclass
class Progress:
    index: int                       # item in the request
    step: int                        # steps done
    total: int                       # steps of this item
    preview: np.ndarray | None = None  # uint8 [s, s, 3] when preview_size > 0


@dataclass
class GeneratedImage:
    index: int
    image: np.ndarray                # uint8 [H, W, 3]
    metadata: dict = field(default_factory=dict)


_TRITON_TYPES = {"STRING": "BYTES", "FP32": "FP32", "INT32": "INT32", "INT64": "INT64", "BOOL": "BOOL"}


def _photo_bytes(photo: bytes | str | Path) -> bytes:
    if isinstance(photo, bytes):
        return photo
    p = Path(photo)
    if not p.is_file():
        raise FileNotFoundError(f"photo not found: {p}")
    return p.read_bytes()


class CapHumanClient:
    def __init__(self, url: str = "localhost:8001", model: str = MODEL_NAME, timeout: float = 600.0):
        self.url, self.model, self.timeout = url, model, timeout

    def _client(self):
        grpcclient = require("tritonclient.grpc", "the gRPC client")
        return grpcclient.InferenceServerClient(self.url)

    def is_ready(self) -> bool:
        try:
            with self._client() as c:
                return bool(c.is_server_ready(client_timeout=5)) and bool(c.is_model_ready(self.model, client_timeout=5))
        except Exception:  # noqa: BLE001 (unreachable counts as not ready)
            return False

    def inputs(self, reference: bytes | str | Path | list, prompts: str | list[str], **fields):
        """The request's input tensors. `reference`: one photo, or a list of one per person (several people
        in one image; their controls in `people=[{...}, ...]`)."""
        grpcclient = require("tritonclient.grpc", "the gRPC client")
        if "pose_image" in fields and fields["pose_image"] is not None:
            pi = fields["pose_image"]
            fields["pose_image"] = [_photo_bytes(p) for p in ([pi] if isinstance(pi, (bytes, str, Path)) else pi)]
        refs = _photo_bytes(reference) if isinstance(reference, (bytes, str, Path)) else \
            [_photo_bytes(r) for r in reference]
        arrays = request_arrays(refs, prompts, **fields)
        out = []
        for name, arr in arrays.items():
            t = grpcclient.InferInput(name, list(arr.shape), _TRITON_TYPES[INPUT_BY_NAME[name].dtype])
            t.set_data_from_numpy(arr)
            out.append(t)
        return out

    def stream(self, reference: bytes | str | Path, prompts: str | list[str], *, raw_inputs=None,
               **fields) -> Iterator[Progress | GeneratedImage]:
        """Yield Progress and GeneratedImage objects as they arrive. Closing the generator early (break,
        exception) cancels the request on the server."""
        from tritonclient.utils import InferenceServerException

        inputs = raw_inputs if raw_inputs is not None else self.inputs(reference, prompts, **fields)
        q: queue.Queue = queue.Queue()
        client = self._client()
        finished = False
        try:
            client.start_stream(callback=lambda result, error: q.put((result, error)))
            client.async_stream_infer(self.model, inputs, request_id=uuid.uuid4().hex,
                                      enable_empty_final_response=True)
            while True:
                try:
                    result, error = q.get(timeout=self.timeout)
                except queue.Empty:
                    raise TimeoutError(f"no response from {self.url} in {self.timeout:.0f} s") from None
                if error is not None:
                    finished = True
                    if isinstance(error, InferenceServerException):
                        if error.status() == "StatusCode.RESOURCE_EXHAUSTED":  # the gateway's size limit, or busy
                            raise ServerError(f"the server refused the request: {error.message()} (the request's "
                                              "photos must stay within its max_request_bytes; or the server is "
                                              "at its connection limit)", error.status())
                        raise ServerError(error.message(), error.status())
                    raise ServerError(str(error))
                response = result.get_response()
                final = response.parameters.get("triton_final_response")
                if response.outputs:
                    yield self._parse(result)
                if final is not None and final.bool_param:
                    finished = True
                    return
        except InferenceServerException as e:
            finished = True
            detail = e.message()
            try:  # the stream reports the real cause through the callback
                _, error = q.get(timeout=1.0)
                detail = error.message() if isinstance(error, InferenceServerException) else str(error or detail)
            except queue.Empty:
                pass
            raise ConnectionError(f"cannot stream from {self.url}: {detail}") from None
        finally:
            try:
                client.stop_stream(cancel_requests=not finished)
            finally:
                client.close()

    @staticmethod
    def _parse(result) -> Progress | GeneratedImage:
        kind = result.as_numpy("KIND").reshape(-1)[0].decode()
        index = int(result.as_numpy("INDEX").reshape(-1)[0])
        image = result.as_numpy("IMAGE")
        if kind == "progress":
            return Progress(index, int(result.as_numpy("STEP").reshape(-1)[0]),
                            int(result.as_numpy("TOTAL_STEPS").reshape(-1)[0]), image)
        return GeneratedImage(index, image, json.loads(result.as_numpy("METADATA").reshape(-1)[0].decode()))

    def generate(self, reference: bytes | str | Path, prompts: str | list[str], *,
                 on_progress: Callable[[Progress], None] | None = None, **fields) -> list[GeneratedImage]:
        """All images of one request, in item order."""
        images = []
        for msg in self.stream(reference, prompts, **fields):
            if isinstance(msg, Progress):
                if on_progress is not None:
                    on_progress(msg)
            else:
                images.append(msg)
        return sorted(images, key=lambda g: g.index)


__all__ = ["CapHumanClient", "GeneratedImage", "Progress", "ServerError", "NUMPY_DTYPES"]
