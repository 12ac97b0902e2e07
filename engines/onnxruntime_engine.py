"""ONNX Runtime engine: the CPU execution provider, or CUDA where onnxruntime-gpu is installed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from caphuman.export.extras import require
from caphuman.export.onnx_specs import GraphSpec

from .base import Engine, EngineError

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32}


def default_providers() -> list[str]:
    ort = require("onnxruntime", "the onnxruntime backend")
    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class OnnxRuntimeEngine(Engine):
    """One graph under an `onnxruntime.InferenceSession`.

    Inputs may be CPU or CUDA torch tensors; outputs come back on the device of the first input.
    With the CUDA provider, CUDA inputs are bound in place through IOBinding (no host copy).
    """

    backend = "onnxruntime"

    def __init__(self, path: str | Path, spec: GraphSpec, providers: list[str] | None = None,
                 intra_op_threads: int = 0):
        ort = require("onnxruntime", "the onnxruntime backend")
        path = Path(path)
        if not path.is_file():
            raise EngineError(f"ONNX graph not found: {path} (run `caphuman export` first)")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = intra_op_threads
        self.providers = providers or default_providers()
        self.session = ort.InferenceSession(str(path), opts, providers=self.providers)
        self.spec = spec
        got = [i.name for i in self.session.get_inputs()]
        if got != spec.input_names:
            raise EngineError(f"{path}: graph inputs {got} do not match the spec {spec.input_names}; re-export it")
        self._types = {i.name: _NP[i.type] for i in self.session.get_inputs()}
        self._cuda = "CUDAExecutionProvider" in self.session.get_providers()

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_feed(feed)
        device = next(iter(feed.values())).device
        if self._cuda and device.type == "cuda":
            return self._run_bound(feed, device)
        arrays = {k: v.detach().cpu().numpy().astype(self._types[k], copy=False) for k, v in feed.items()}
        outs = self.session.run(self.spec.output_names, arrays)
        return {n: torch.from_numpy(o).to(device) for n, o in zip(self.spec.output_names, outs)}

    def _run_bound(self, feed: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        keep = []
        for name, x in feed.items():
            x = x.contiguous()
            keep.append(x)
            binding.bind_input(name, "cuda", device.index or 0, self._types[name], list(x.shape), x.data_ptr())
        for name in self.spec.output_names:
            binding.bind_output(name, "cuda", device.index or 0)
        self.session.run_with_iobinding(binding)
        outs = binding.copy_outputs_to_cpu()
        return {n: torch.from_numpy(o).to(device) for n, o in zip(self.spec.output_names, outs)}

    def close(self) -> None:
        self.session = None
