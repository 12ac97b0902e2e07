"""The feed-forward's GEGLU through the fused Triton kernel (kernels/geglu_triton.py).

``enable_fused_geglu(net)`` swaps every diffusers ``GEGLU`` in ``net`` for a ``FusedGEGLU`` that holds
the same ``proj`` Linear (the state dict keeps its keys: ``...ff.net.0.proj.weight``);
``disable_fused_geglu`` puts the originals back. The torch engine turns it on together with its
attention kernels; the reference path never does.

``FusedGEGLU`` picks its path per call, explicitly (``use_kernel``): with the default "auto", the
kernel for CUDA fp16/bf16 inputs whose work ends up in a CUDA graph (the kernel's Python launch cost
exceeds its time outside one, as for attention) and where it measured faster on this GPU
(``geglu_triton.TUNED_GEGLU``; unlisted problems take the kernel, which was faster on 7 of the 8
measured ones); diffusers' own math otherwise. "kernel" forces it (ValueError where it cannot run),
"torch" never uses it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from torch import nn

from caphuman.export.attention_processors import in_graph_capture
from caphuman.kernels import geglu_triton
from caphuman.kernels.attention_triton import device_capability

__all__ = ["FusedGEGLU", "disable_fused_geglu", "enable_fused_geglu", "geglu_op"]

_BACKENDS = ("auto", "kernel", "torch")


@torch.library.custom_op("caphuman::geglu", mutates_args=())
def geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The fused kernel as an opaque torch op: torch.compile keeps it as one node."""
    return geglu_triton.geglu_linear(x, weight, bias)


@geglu_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


class FusedGEGLU(nn.Module):
    """Drop-in for diffusers' ``GEGLU``: same ``proj``, same output, one kernel where it pays."""

    def __init__(self, geglu: GEGLU, backend: str = "auto"):
        super().__init__()
        if backend not in _BACKENDS:
            raise ValueError(f"backend={backend!r} must be one of {_BACKENDS}")
        self.proj = geglu.proj
        self.backend = backend
        self.last_path: str | None = None  # "kernel" or "torch": what the last call ran (tests read it)
        object.__setattr__(self, "_original", geglu)  # not a submodule: no duplicate state-dict keys

    def use_kernel(self, x: torch.Tensor, capturing: bool | None = None) -> bool:
        """Whether this call runs the fused kernel (see the module docstring); side-effect free."""
        if self.backend == "torch":
            return False
        reason = geglu_triton.geglu_supports(x, self.proj.weight, self.proj.bias)
        if self.backend == "kernel":
            if reason is not None:
                raise ValueError(f"backend 'kernel' requested but {reason}")
            return True
        if reason is not None or not x.is_cuda:
            return False
        if not (in_graph_capture() if capturing is None else capturing):
            return False
        tuned = geglu_triton.tuned_geglu(x.numel() // x.shape[-1], x.shape[-1], self.proj.weight.shape[0] // 2,
                                         device_capability(x.device))
        return tuned is None or tuned.beats_unfused

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.use_kernel(hidden_states):
            self.last_path = "kernel"
            return geglu_op(hidden_states, self.proj.weight, self.proj.bias)
        self.last_path = "torch"
        value, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return value * F.gelu(gate)


def enable_fused_geglu(module: nn.Module, backend: str = "auto") -> int:
    """Swap every ``GEGLU`` inside ``module`` for a ``FusedGEGLU``; returns how many were swapped."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GEGLU):
                setattr(parent, name, FusedGEGLU(child, backend))
                swapped += 1
            elif isinstance(child, FusedGEGLU):
                child.backend = backend
    return swapped


def disable_fused_geglu(module: nn.Module) -> int:
    """Put the original ``GEGLU`` modules back; returns how many were restored."""
    restored = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FusedGEGLU):
                setattr(parent, name, child._original)
                restored += 1
    return restored
