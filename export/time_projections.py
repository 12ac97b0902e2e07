"""All ResNet blocks' time-embedding projections of a UNet-shaped network as ONE matrix product.

Every diffusers ``ResnetBlock2D`` projects the same time embedding with its own
``time_emb_proj(silu(emb))``: a UNet has 22 of these tiny GEMMs (2 x 1280 inputs) per call and
CapFace 10, each too small to fill the GPU, so together they cost far more than the one GEMM over
their concatenated weights (bench/results, docs/performance.md). ``fuse_time_projections(net)``
computes that one product when the network's ``time_embedding`` runs (a forward hook) and turns
each block's ``time_emb_proj`` into a slice of it. Same values: the rows of the fused weight are
the blocks' own rows, and each output element is the same dot product.

The fused weight is a copy: call it on a network whose weights are final (the torch engine owns
its networks). Only blocks whose input is ``silu(emb)`` of the network's own time embedding are
fused; a network that adds class or augmented embeddings to ``emb`` is left as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TimeProjections", "fuse_time_projections"]


class TimeProjections:
    """The fused projection of one network: weight/bias copies and the last computed product.

    Not an nn.Module on purpose: it is referenced from several blocks, and registering it there
    would put the fused copy into their state dicts.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight = weight
        self.bias = bias
        self.value: torch.Tensor | None = None  # [B, sum of block channels], set by the hook

    def compute(self, emb: torch.Tensor) -> None:
        w, b = self.weight, self.bias
        if w.device != emb.device or w.dtype != emb.dtype:  # the network was moved after fusing
            w, b = w.to(emb), b.to(emb)
        self.value = F.linear(F.silu(emb), w, b)


class _ProjectionSlice(nn.Module):
    """Stands in for one block's ``time_emb_proj``: its columns of the fused product. The block's
    own ``silu(temb)`` input is not needed (compiled, it is dropped as dead code)."""

    def __init__(self, fused: TimeProjections, start: int, stop: int, out_features: int):
        super().__init__()
        object.__setattr__(self, "_fused", fused)  # unregistered, see TimeProjections
        self.start, self.stop, self.out_features = start, stop, out_features

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        value = self._fused.value
        if value is None or value.shape[0] != temb.shape[0]:
            raise RuntimeError("fused time projections used before the network's time_embedding ran "
                               "for this batch")
        return value[:, self.start:self.stop]


def _fusable(net: nn.Module) -> bool:
    if getattr(net, "class_embedding", None) is not None or getattr(net, "add_embedding", None) is not None:
        return False
    if getattr(net, "time_embed_act", None) is not None:
        return False
    return isinstance(getattr(net, "time_embedding", None), nn.Module)


def fuse_time_projections(net: nn.Module) -> TimeProjections | None:
    """Fuse the time projections of a diffusers UNet2DConditionModel / ControlNetModel in place.

    Returns the TimeProjections (None where nothing could be fused). Idempotent: a network already
    fused is returned unchanged.
    """
    from diffusers.models.resnet import ResnetBlock2D

    existing = getattr(net, "_caphuman_time_projections", None)
    if existing is not None:
        return existing
    if not _fusable(net):
        return None
    blocks = [m for m in net.modules() if isinstance(m, ResnetBlock2D) and isinstance(m.time_emb_proj, nn.Linear)
              and not m.skip_time_act and isinstance(m.nonlinearity, nn.SiLU)]
    if not blocks or any(b.time_emb_proj.bias is None for b in blocks):
        return None
    with torch.no_grad():
        weight = torch.cat([b.time_emb_proj.weight for b in blocks]).detach().clone()
        bias = torch.cat([b.time_emb_proj.bias for b in blocks]).detach().clone()
    fused = TimeProjections(weight, bias)
    start = 0
    for b in blocks:
        n = b.time_emb_proj.out_features
        b.time_emb_proj = _ProjectionSlice(fused, start, start + n, n)
        start += n

    def hook(module, args, emb):  # returns None: the time embedding itself is unchanged
        fused.compute(emb)

    net.time_embedding.register_forward_hook(hook)
    object.__setattr__(net, "_caphuman_time_projections", fused)
    return fused
