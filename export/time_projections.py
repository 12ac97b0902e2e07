"""All ResNet blocks' time-embedding projections of a UNet-shaped network as ONE matrix product.

Every diffusers ``ResnetBlock2D`` projects the same time embedding with its own
``time_emb_proj(silu(emb))``: a UNet has 22 of these tiny GEMMs (2 x 1280 inputs) per call and
CapFace 10, each too small to fill the GPU, so together they cost far more than the one GEMM over
their concatenated weights (bench/results, docs/performance.md). ``fuse_time_projections(net)``
computes that one product when the network's ``time_embedding`` runs (a forward hook) and turns
each block's ``time_emb_proj`` into a slice of it. Same values: the rows of the fused weight are
the blocks' own rows, and each output element is the same dot product.

The fused weight is a copy: call it on a network whose weights are final (the torch engine fuses
its networks once they are loaded); it follows the network's device and dtype lazily. Only blocks
whose input is ``silu(emb)`` of the network's own time embedding are fused; a network that adds
class or augmented embeddings to ``emb`` is left as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TimeProjections", "fuse_time_projections"]


class TimeProjections:
    """The fused projection of one network: weight/bias copies and the last computed product. It
    is also the forward hook on the network's ``time_embedding`` that computes that product.

    Not an nn.Module, and the blocks' own ``time_emb_proj`` Linear modules stay registered (only
    their forward is redirected): the network's state dict, parameters and checkpoints are
    unchanged. A deep copy of the network copies this object once (hook and slices together).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight = weight
        self.bias = bias
        self.value: torch.Tensor | None = None  # [B, sum of block channels], set by the hook

    def __call__(self, module: nn.Module, args, emb: torch.Tensor) -> None:
        """Forward hook on ``time_embedding``: returns None, so the embedding itself is unchanged."""
        w, b = self.weight, self.bias
        if w.device != emb.device or w.dtype != emb.dtype:  # the network was moved after fusing
            w, b = w.to(emb), b.to(emb)
        self.value = F.linear(F.silu(emb), w, b)

    def repeat_batch(self, k: int) -> None:
        """The network goes on with k copies of the batch it embedded (`unet_encode` with CFG
        branches: its time-embedding prefix runs on one copy): tile the product to match."""
        if self.value is None:
            raise RuntimeError("fused time projections tiled before the network's time_embedding ran")
        self.value = self.value.repeat(k, 1)


class _ProjectionSlice:
    """Replaces one block's ``time_emb_proj.forward``: its columns of the fused product. The block's
    own ``silu(temb)`` input is not needed (compiled, it is dropped as dead code)."""

    def __init__(self, fused: TimeProjections, start: int, stop: int):
        self.fused, self.start, self.stop = fused, start, stop

    def __call__(self, temb: torch.Tensor) -> torch.Tensor:
        value = self.fused.value
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

    if not _fusable(net):
        return None
    for hook in net.time_embedding._forward_hooks.values():
        if isinstance(hook, TimeProjections):  # already fused
            net._fused_time_projections = hook
            return hook
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
        b.time_emb_proj.forward = _ProjectionSlice(fused, start, start + n)
        start += n
    net.time_embedding.register_forward_hook(fused)
    net._fused_time_projections = fused  # a plain attribute: not in the state dict
    return fused
