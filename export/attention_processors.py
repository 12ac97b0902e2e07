"""diffusers attention processors that run CapHuman's attention through the fused Triton kernel.

``enable_fast_attention(unet_or_controlnet)`` installs a ``FastAttnProcessor`` on every
``Attention`` module; ``disable_fast_attention`` restores diffusers' ``AttnProcessor2_0``. The torch
engine turns them on; the reference path never does.

What the processor does per call:
1. Picks a backend explicitly (``select_backend``): by default (AUTO) the Triton kernel where it
   measured faster on the H100 (CUDA fp16/bf16, no mask, inside CUDA-graph capture, small
   attention problems; see ``triton_preferred``), torch SDPA otherwise; "triton" forces the kernel
   (also on CPU tensors under ``TRITON_INTERPRET=1``), "sdpa" forces SDPA. The choice is recorded
   in ``processor.last_backend`` so tests can see it.
2. Feeds q/k/v as [B, N, H, D] stride views of the projections: no transpose or copy. Where
   the self-attention projections are fused (``FastAttnProcessor.fuse_qkv``, which the torch
   engine calls, or diffusers' ``Attention.fuse_projections``), q/k/v come from one GEMM.
3. For cross-attention, reuses K/V projected from the same context tensor (see ``CrossKVCache``):
   the text (77 tokens) and identity (258 tokens) contexts are constant for a whole request, so
   ``to_k``/``to_v`` run once per request instead of once per denoising step.
"""
from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from caphuman.kernels import attention_triton

__all__ = [
    "AttnBackend",
    "CrossKVCache",
    "FastAttnProcessor",
    "clear_kv_cache",
    "disable_fast_attention",
    "enable_fast_attention",
    "graph_warmup",
    "in_graph_capture",
    "kv_cache_request",
    "select_backend",
    "triton_preferred",
]


class AttnBackend(str, enum.Enum):
    """Which implementation computes softmax(q k^T) v."""

    AUTO = "auto"  # Triton where it can run, SDPA elsewhere
    TRITON = "triton"  # always Triton; a ValueError where it cannot run
    SDPA = "sdpa"  # always torch.nn.functional.scaled_dot_product_attention


# AUTO's rule inside CUDA-graph capture. On a GPU architecture with measured entries
# (attention_triton.TUNED_LAUNCHES: H100, torch 2.11, Triton 3.6, fp16, 8 heads, GPU time in a CUDA
# graph; bench/results/kernels_h100_run48_tuned_quick.json) a listed problem takes whichever measured
# faster: Triton on every problem there: every cross-attention (1.31-1.92x), self-attention over 256
# and 64 tokens (1.5x, 2.1-2.2x), over 1024 tokens (1.12x at batch 2, 1.38x at batch 1, TMA with a
# 64+16 split of the head dim) and over 4096 tokens (1.02x at batch 2, 1.04x at batch 1, TMA). Any other problem takes
# Triton only for at most TRITON_MAX_KV_TOKENS keys, where the kernel was faster on every measured
# shape. Outside graph capture Triton's Python launch cost (tens of microseconds) outweighs the
# kernel time on every CapHuman shape, so AUTO leaves eager calls to SDPA.
TRITON_MAX_KV_TOKENS = 512


@torch.library.custom_op("caphuman::triton_attention", mutates_args=())
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The Triton kernel as an opaque torch op: torch.compile keeps it as one node instead of
    tracing the launcher (and fuses the work around it)."""
    return attention_triton.attention_bnhd(q, k, v, scale)


@triton_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


_GRAPH_WARMUP = threading.local()


@contextmanager
def graph_warmup() -> Iterator[None]:
    """Run the warm-up calls before a CUDA-graph capture as if capturing, so AUTO picks the same
    backends: the Triton kernel must compile and autotune (which launches and synchronizes) before
    capture, never inside it."""
    prev = getattr(_GRAPH_WARMUP, "on", False)
    _GRAPH_WARMUP.on = True
    try:
        yield
    finally:
        _GRAPH_WARMUP.on = prev


def in_graph_capture() -> bool:
    """Whether the work being issued ends up in a CUDA graph: during capture, during the warm-up
    before it (``graph_warmup``), and under torch.compile (the torch engine replays the traced graph
    in its CUDA graph; is_compiling short-circuits, so dynamo never traces the stream query)."""
    return (torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()
            or getattr(_GRAPH_WARMUP, "on", False))


def triton_preferred(n_q: int, n_kv: int, capturing: bool, head_dim: int | None = None,
                     batch_heads: int | None = None, capability: tuple[int, int] | None = None) -> bool:
    """AUTO's measured rule (see TRITON_MAX_KV_TOKENS): never outside CUDA-graph capture; the measured
    winner for a problem in ``attention_triton.TUNED_LAUNCHES`` of this ``capability``; otherwise
    Triton for at most TRITON_MAX_KV_TOKENS keys."""
    if not capturing:
        return False
    if head_dim is not None and batch_heads is not None:
        tuned = attention_triton.tuned_launch(n_q, n_kv, head_dim, batch_heads, capability)
        if tuned is not None:
            return tuned.beats_sdpa
    return n_kv <= TRITON_MAX_KV_TOKENS


def select_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None,
                   requested: AttnBackend = AttnBackend.AUTO, capturing: bool | None = None) -> AttnBackend:
    """The backend that runs these inputs: explicit and side-effect free, so it is testable.

    q/k/v are [B, N, H, D]. AUTO takes Triton only where it can run (CUDA fp16/bf16, no mask) AND
    ``triton_preferred`` holds; ``capturing`` defaults to whether the current CUDA stream is being
    captured into a graph. TRITON raises ValueError, naming the reason, where the kernel cannot
    run (on CPU tensors it needs TRITON_INTERPRET=1). SDPA always takes SDPA.
    """
    requested = AttnBackend(requested)
    if requested is AttnBackend.SDPA:
        return AttnBackend.SDPA
    reason = attention_triton.triton_supports(q, k, v)
    if reason is None and attention_mask is not None:
        reason = "an attention mask was given (the kernel has no mask input)"
    if requested is AttnBackend.TRITON:
        if reason is not None:
            raise ValueError(f"backend 'triton' requested but {reason}")
        return AttnBackend.TRITON
    if reason is not None or not q.is_cuda:
        return AttnBackend.SDPA
    if capturing is None:
        capturing = in_graph_capture()
    # The measured table is fp16's; other dtypes take the key-count rule. (It is trusted for layouts
    # that TMA cannot describe too, where the launcher falls back to pointer loads: speed only.)
    capability = attention_triton.device_capability(q.device) if q.dtype == torch.float16 else None
    preferred = triton_preferred(q.shape[1], k.shape[1], capturing, head_dim=q.shape[3],
                                 batch_heads=q.shape[0] * q.shape[2], capability=capability)
    return AttnBackend.TRITON if preferred else AttnBackend.SDPA


@dataclass
class _KVEntry:
    context: torch.Tensor  # strong reference: its storage cannot be freed and reused while cached
    context_version: int | None
    weights: tuple  # (tensor, version) of every parameter of to_k / to_v
    generation: int
    key: torch.Tensor
    value: torch.Tensor


def _version(t: torch.Tensor) -> int | None:
    """In-place version counter, or None for inference-mode tensors (they have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


class CrossKVCache:
    """Per-request cache of cross-attention K/V, shared by all processors of one network.

    An entry is used only if ALL of these hold, so a stale entry is never used silently:
    - the context is the very same tensor object (identity, not address: the entry keeps a strong
      reference, so the address cannot be recycled by a new tensor while the entry lives);
    - its in-place version counter is unchanged (``ctx.add_(...)`` invalidates);
    - the to_k/to_v parameters are the same tensors at the same versions (weights swapped or
      loaded in place invalidate);
    - no ``clear()`` / new request happened since it was stored.
    Contexts created under ``torch.inference_mode()`` have no version counter, so an in-place edit
    cannot be seen: they are cached only inside ``request()`` (the caller's promise that contexts
    are not edited in place during the request); outside one they are recomputed every call.
    """

    MAX_CONTEXTS_PER_LAYER = 4  # e.g. serial CFG alternates two contexts per layer

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, list[_KVEntry]] = {}  # id(Attention module) -> most recent first
        self._generation = 0
        self._in_request = 0
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        """Drop every entry (e.g. between requests, or after changing weights)."""
        with self._lock:
            self._entries.clear()
            self._generation += 1

    @contextmanager
    def request(self) -> Iterator[CrossKVCache]:
        """Scope of one request: starts and ends with an empty cache."""
        self.clear()
        with self._lock:
            self._in_request += 1
        try:
            yield self
        finally:
            with self._lock:
                self._in_request -= 1
            self.clear()

    @staticmethod
    def _weights(attn: Attention) -> tuple:
        params = list(attn.to_k.parameters()) + list(attn.to_v.parameters())
        return tuple((p, _version(p)) for p in params)

    def _valid(self, e: _KVEntry, attn: Attention, context: torch.Tensor) -> bool:
        if e.generation != self._generation or e.context is not context:
            return False
        if e.context_version != _version(context):
            return False
        if e.context_version is None and not self._in_request:
            return False
        now = self._weights(attn)
        return len(now) == len(e.weights) and all(
            p is q and v == w for (p, v), (q, w) in zip(now, e.weights))

    def get_or_compute(self, attn: Attention, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(to_k(context), to_v(context)), computed at most once per valid entry."""
        with self._lock:
            for e in self._entries.get(id(attn), ()):
                if self._valid(e, attn, context):
                    self.hits += 1
                    return e.key, e.value
        key = attn.to_k(context)
        value = attn.to_v(context)
        ver = _version(context)
        with self._lock:
            self.misses += 1
            if ver is not None or self._in_request:
                entry = _KVEntry(context, ver, self._weights(attn), self._generation, key, value)
                kept = [e for e in self._entries.get(id(attn), ()) if e.context is not context]
                self._entries[id(attn)] = [entry] + kept[: self.MAX_CONTEXTS_PER_LAYER - 1]
        return key, value


class FastAttnProcessor:
    """Drop-in for ``AttnProcessor2_0`` with Triton attention and an optional cross K/V cache."""

    def __init__(self, backend: AttnBackend | str = AttnBackend.AUTO, kv_cache: CrossKVCache | None = None):
        self.backend = AttnBackend(backend)
        self.kv_cache = kv_cache
        self.last_backend: AttnBackend | None = None
        # Set by a caller that guarantees the two halves of the batch are equal (the two CFG
        # branches of the UNet's first self-attention, before any text has entered): self-attention
        # then runs on the first half only and its output is tiled.
        self.identical_batch_halves = False
        self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see fuse_qkv

    def fuse_qkv(self, attn: Attention) -> bool:
        """Compute this self-attention's q/k/v with one GEMM over a copy of the concatenated
        to_q/to_k/to_v weights, held here (the module, its state dict and checkpoints stay as they
        are). Call once the weights are final; the copy follows the input's device and dtype.
        Returns False (nothing fused) for cross-attention."""
        if attn.is_cross_attention:
            return False
        with torch.no_grad():
            weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach().clone()
            biases = [m.bias for m in (attn.to_q, attn.to_k, attn.to_v)]
            bias = None if all(b is None for b in biases) else torch.cat(
                [b if b is not None else torch.zeros_like(m.weight[:, 0])
                 for b, m in zip(biases, (attn.to_q, attn.to_k, attn.to_v))]).detach().clone()
        self._qkv = (weight, bias)
        return True

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if (self.identical_batch_halves and encoder_hidden_states is None and attention_mask is None
                and temb is None and hidden_states.shape[0] % 2 == 0):
            half = self._attend(attn, hidden_states[: hidden_states.shape[0] // 2], None, None, temb)
            return half.repeat(2, *([1] * (half.ndim - 1)))
        return self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _attend(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                attention_mask: torch.Tensor | None, temb: torch.Tensor | None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        is_cross = encoder_hidden_states is not None
        kv_len = (encoder_hidden_states if is_cross else hidden_states).shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if not is_cross and self._qkv is not None:
            # one GEMM instead of three (``fuse_qkv``); the chunks are strided views, which both
            # the kernel and SDPA take as they are
            weight, bias = self._qkv
            if weight.device != hidden_states.device or weight.dtype != hidden_states.dtype:
                weight, bias = weight.to(hidden_states), (bias.to(hidden_states) if bias is not None else None)
            query, key, value = F.linear(hidden_states, weight, bias).chunk(3, dim=-1)
        elif not is_cross and getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            # the same with diffusers' own ``Attention.fuse_projections``
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        elif not is_cross:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        else:
            query = attn.to_q(hidden_states)
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            if self.kv_cache is not None:
                key, value = self.kv_cache.get_or_compute(attn, encoder_hidden_states)
            else:
                key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # [B, N, H, D] views of the projections: the kernel takes their strides, nothing is copied
        q = query.view(batch, -1, heads, head_dim)
        k = key.view(key.shape[0], -1, heads, head_dim)
        v = value.view(value.shape[0], -1, heads, head_dim)
        if attn.norm_q is not None or attn.norm_k is not None:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)

        self.last_backend = select_backend(q, k, v, attention_mask, self.backend)
        if self.last_backend is AttnBackend.TRITON:
            out = triton_attention(q, k, v, float(attn.scale))  # [B, Nq, H, D] contiguous
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attention_mask,
                dropout_p=0.0, is_causal=False, scale=attn.scale).transpose(1, 2)
        hidden_states = out.reshape(batch, -1, heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attention_modules(module: torch.nn.Module) -> list[Attention]:
    found = [m for m in module.modules() if isinstance(m, Attention)]
    if not found:
        raise ValueError(f"{type(module).__name__} holds no diffusers Attention module")
    return found


def enable_fast_attention(module: torch.nn.Module, cache_cross_kv: bool = True,
                          backend: AttnBackend | str = AttnBackend.AUTO) -> CrossKVCache | None:
    """Install ``FastAttnProcessor`` on every Attention of a UNet2DConditionModel/ControlNetModel.

    Returns the network's shared ``CrossKVCache`` (None when ``cache_cross_kv`` is False); wrap each
    request in ``kv_cache_request(module)`` (or call ``clear_kv_cache``) so that entries never
    outlive it.
    """
    cache = CrossKVCache() if cache_cross_kv else None
    for attn in _attention_modules(module):
        attn.set_processor(FastAttnProcessor(backend, cache))
    return cache


def disable_fast_attention(module: torch.nn.Module) -> None:
    """Restore diffusers' ``AttnProcessor2_0`` on every Attention (dropping any cached K/V)."""
    for attn in _attention_modules(module):
        attn.set_processor(AttnProcessor2_0())


def _caches(module: torch.nn.Module) -> list[CrossKVCache]:
    seen: dict[int, CrossKVCache] = {}
    for attn in _attention_modules(module):
        proc = attn.processor
        if isinstance(proc, FastAttnProcessor) and proc.kv_cache is not None:
            seen[id(proc.kv_cache)] = proc.kv_cache
    return list(seen.values())


def clear_kv_cache(module: torch.nn.Module) -> None:
    """Drop the cached cross-attention K/V of every fast processor in ``module``."""
    for cache in _caches(module):
        cache.clear()


@contextmanager
def kv_cache_request(module: torch.nn.Module) -> Iterator[None]:
    """One request's scope: the K/V caches of ``module`` start and end empty."""
    caches = _caches(module)
    with _nested([c.request() for c in caches]):
        yield


@contextmanager
def _nested(managers: list) -> Iterator[None]:
    if not managers:
        yield
        return
    with managers[0], _nested(managers[1:]):
        yield
