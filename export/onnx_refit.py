"""Which ONNX initializer holds which torch parameter: the map a TensorRT refit needs.

TensorRT refits an engine by ONNX initializer name (`trt.Refitter.set_named_weights`). The
TorchScript exporter keeps a parameter's state-dict name when the graph uses it as is (conv
weights, biases, norms), and gives an `onnx::MatMul_<n>` name to the transposed copy it folds for
a `Linear` without bias. We recover both by content: an initializer equal to a parameter (or to its
transpose) is that parameter. Duplicate values are kept apart at export time
(`keep_initializers_as_inputs=True` turns off the exporter's value deduplication), so one initializer
is one parameter and a swap of the base model refits every weight.

Nothing here needs TensorRT: the map is written next to the graph (`<graph>.refit.json`) and
tested by rewriting a graph's initializers and running it under ONNX Runtime.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .extras import require

onnx = require("onnx", "ONNX export and graph checks")
numpy_helper = onnx.numpy_helper


class RefitError(ValueError):
    """The refit map does not cover the weights, or new weights do not fit it."""


@dataclass(frozen=True)
class RefitEntry:
    param: str                  # torch state-dict name inside the exported wrapper module
    transpose: bool             # the initializer is param.T (a folded Linear weight)
    shape: tuple[int, ...]      # the initializer's shape (GroupNorm's weight is folded to [C, 1, 1])


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def build_refit_map(model: onnx.ModelProto, state: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("",)
                    ) -> tuple[dict[str, RefitEntry], list[str]]:
    """Map every initializer that holds a parameter (whose name starts with one of `prefixes`).

    Returns (map initializer -> entry, parameters found in no initializer). A parameter's content
    that several initializers share is matched by name first; ambiguity is an error.
    """
    params = {k: v.detach().cpu() for k, v in state.items() if k.startswith(prefixes) and v.is_floating_point()}
    by_digest: dict[str, list[tuple[str, bool]]] = {}
    for name, p in params.items():
        a = p.numpy() if p.dtype != torch.bfloat16 else p.float().numpy()
        by_digest.setdefault(_digest(a), []).append((name, False))
        if a.ndim == 2:
            by_digest.setdefault(_digest(a.T), []).append((name, True))
    out: dict[str, RefitEntry] = {}
    for init in model.graph.initializer:
        if init.name in state:  # the exporter kept the parameter's own name
            if init.name in params:
                out[init.name] = RefitEntry(init.name, False, tuple(init.dims))
            continue
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        cands = by_digest.get(_digest(numpy_helper.to_array(init)), [])
        if len({c[0] for c in cands}) > 1:
            raise RefitError(f"initializer {init.name} matches several parameters {[c[0] for c in cands][:4]}: "
                             "export weights with distinct values (keep_initializers_as_inputs=True)")
        if cands:
            out[init.name] = RefitEntry(cands[0][0], cands[0][1], tuple(init.dims))
    mapped = {e.param for e in out.values()}
    return out, sorted(set(params) - mapped)


def save_refit_map(path: Path, entries: dict[str, RefitEntry], unmapped: list[str]) -> None:
    path.write_text(json.dumps({"initializers": {k: {"param": e.param, "transpose": e.transpose,
                                                     "shape": list(e.shape)}
                                                 for k, e in sorted(entries.items())},
                                "unmapped_parameters": unmapped}, indent=1))


def load_refit_map(path: Path) -> dict[str, RefitEntry]:
    raw = json.loads(Path(path).read_text())
    return {k: RefitEntry(v["param"], bool(v["transpose"]), tuple(v["shape"])) for k, v in raw["initializers"].items()}


def refit_weights(entries: dict[str, RefitEntry], state: dict[str, torch.Tensor], dtype: np.dtype,
                  prefix_filter: str | None = None) -> dict[str, np.ndarray]:
    """New initializer arrays from a state dict in the wrapper's parameter names.

    `prefix_filter` (e.g. "unet." or "den.unet.") refits only those parameters (a base-model swap
    changes the UNet, not CapFace). Every selected entry must be in `state` with the right shape.
    """
    out, missing = {}, []
    for init, e in entries.items():
        if prefix_filter and not e.param.startswith(prefix_filter):
            continue
        if e.param not in state:
            missing.append(e.param)
            continue
        a = state[e.param].detach().cpu().float().numpy()
        a = a.T if e.transpose else a
        if a.size != int(np.prod(e.shape)):
            raise RefitError(f"{e.param}: new weights have shape {a.shape}, the graph's {init} has {e.shape}")
        out[init] = np.ascontiguousarray(a).reshape(e.shape).astype(dtype)
    if missing:
        raise RefitError(f"{len(missing)} parameters of the graph are missing from the new weights: {missing[:6]}")
    if not out:
        raise RefitError(f"no initializer of the graph maps to parameters under {prefix_filter!r}")
    return out


def apply_to_model(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> None:
    """Write refit weights into an ONNX model's initializers (the CPU stand-in for a TensorRT refit)."""
    inits = {i.name: i for i in model.graph.initializer}
    for name, arr in weights.items():
        old = inits[name]
        if tuple(old.dims) != arr.shape:
            raise RefitError(f"{name}: new shape {arr.shape} != graph shape {tuple(old.dims)}")
        old.CopyFrom(numpy_helper.from_array(arr, name))
