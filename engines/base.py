"""Graph engines: one exported graph (`caphuman.export.onnx_specs.GraphSpec`) under a runtime.

An engine runs named inputs and outputs with static specs, `run(feed) -> outputs` on torch tensors, and
owns its device buffers. ONNX Runtime and TensorRT implement it; `caphuman.engines.graph_engine` builds
the denoiser contract (`caphuman.engines.denoiser`) on a CapFace and a UNet graph engine.

Output aliasing: TensorRT engines with CUDA graphs return views of their static output buffers,
valid until the next `run`; ONNX Runtime and torch engines return fresh tensors. Callers that keep
an output across runs clone it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from caphuman.export.onnx_specs import GraphSpec, ShapeError, TensorSpec


class EngineError(RuntimeError):
    """An engine could not be built, loaded or run."""


def check_feed(spec: GraphSpec, feed: dict[str, torch.Tensor]) -> None:
    """Every input present by name, no unknown names, ranks as specified."""
    names = set(spec.input_names)
    missing, unknown = sorted(names - set(feed)), sorted(set(feed) - names)
    if missing or unknown:
        raise ShapeError(f"engine {spec.name!r}: missing inputs {missing}, unknown inputs {unknown}; "
                         f"expected {spec.input_names}")
    for t in spec.inputs:
        x = feed[t.name]
        if x.ndim != len(t.shape):
            raise ShapeError(f"engine {spec.name!r}: input {t.name} has shape {tuple(x.shape)}, expected rank "
                             f"{len(t.shape)} {t.shape}")
        for d, (want, got) in enumerate(zip(t.shape, x.shape)):
            if isinstance(want, int) and want != got:
                raise ShapeError(f"engine {spec.name!r}: input {t.name} dim {d} is {got}, expected {want}")


class Engine(ABC):
    """Runs one graph. Subclasses set `spec` and implement `run`."""

    spec: GraphSpec
    backend: str = "?"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.spec.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.spec.outputs

    def check_feed(self, feed: dict[str, torch.Tensor]) -> None:
        check_feed(self.spec, feed)

    @abstractmethod
    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs by name for a complete feed (torch tensors, any device the backend accepts)."""

    def close(self) -> None:
        """Release device buffers and backend objects (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
