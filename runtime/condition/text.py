"""Prompt embeddings for the UNet's cross-attention, without repeated work.

`PromptEncoder` wraps `caphuman.export.clip.TextEncoder`:

* the prompts named `constant` (by default the empty negative prompt, the official default
  ``n_prompt = ""``) are encoded once per process and served from memory afterwards: CLIP's text
  tower is a deterministic function of the token ids, so the cached [1, 77, C] tensor is what a
  fresh encoding returns;
* on a GPU, `graph=True` replays the text tower from a CUDA graph (static [1, 77] token ids);
  with `exact=True` only when its result equals the transformers forward's bit for bit (checked on
  a probe prompt at construction), else the plain forward runs.

    prompts = PromptEncoder(text_encoder, graph=True)
    text_c, text_u = prompts("a photo of a person"), prompts("")
"""
from __future__ import annotations

import logging
import threading

import torch
from torch import nn

from caphuman.export.clip import MAX_TOKENS, TextEncoder

from .graphs import CudaGraphed

log = logging.getLogger(__name__)


class _LastHiddenState(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


class _TextTower(nn.Module):
    """CLIP's text tower on the HF modules' own weights, with the causal mask built once: the
    operations of transformers' eager CLIP text forward (scores = (q k^T) * scale + mask, softmax in
    float32), without its per-call mask construction, which cannot run inside a CUDA-graph capture.
    `PromptEncoder` checks it against the HF forward before using it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.tm = getattr(model, "text_model", model)  # some transformers releases nest it
        self._masks: dict = {}

    def _mask(self, n: int, dtype: torch.dtype, device) -> torch.Tensor:
        key = (n, dtype, device)
        if key not in self._masks:
            self._masks[key] = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
        return self._masks[key]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tm.embeddings(input_ids=input_ids)
        b, n, _ = x.shape
        mask = self._mask(n, x.dtype, x.device)
        for layer in self.tm.encoder.layers:
            att = layer.self_attn
            h = layer.layer_norm1(x)
            q, k, v = (proj(h).view(b, n, -1, att.head_dim).transpose(1, 2)
                       for proj in (att.q_proj, att.k_proj, att.v_proj))
            w = torch.matmul(q, k.transpose(-1, -2)) * att.scale + mask
            w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            o = torch.matmul(w, v).transpose(1, 2).reshape(b, n, -1)
            x = x + att.out_proj(o)
            x = x + layer.mlp(layer.layer_norm2(x))
        return self.tm.final_layer_norm(x)


def _probe_ids(model: nn.Module) -> torch.Tensor:
    p = next(model.parameters())
    g = torch.Generator().manual_seed(0)  # not the global generator: a check must not change the caller's draws
    return torch.randint(0, model.config.vocab_size, (1, MAX_TOKENS), generator=g).to(p.device)


def _graphable_tower(model: nn.Module, exact: bool = False) -> nn.Module:
    """`_TextTower` when it reproduces the HF forward on this device and dtype (bit for bit with
    `exact`), else the HF forward."""
    hf = _LastHiddenState(model)
    try:
        tower = _TextTower(model)
        p = next(model.parameters())
        ids = _probe_ids(model)
        with torch.no_grad():
            want, got = hf(ids).float(), tower(ids).float()
        if exact and not torch.equal(got, want):
            raise ValueError(f"differs from the transformers forward by up to {(got - want).abs().max().item():.2e}")
        err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
        if err > (1e-5 if p.dtype == torch.float32 else 2e-3):
            raise ValueError(f"relative difference {err:.2e} from the transformers forward")
        return tower
    except Exception as e:  # another transformers layout: keep its own forward (eager)
        log.warning("CLIP text tower: using the transformers forward (%s: %s)", type(e).__name__, e)
        return hf


class PromptEncoder:
    """`encoder(prompt) -> [1, 77, C]`; constant prompts come from a per-process cache."""

    def __init__(self, text_encoder: TextEncoder, constant: tuple[str, ...] = ("",), graph: bool = False,
                 exact: bool = False):
        self.text = text_encoder
        model = text_encoder.model
        self._tower = CudaGraphed(_graphable_tower(model, exact)) if graph else _LastHiddenState(model)
        if graph and exact and not self._replays_exactly():
            self._tower = _LastHiddenState(model)
        self.constant = frozenset(constant)
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    @torch.no_grad()
    def _replays_exactly(self) -> bool:
        """`exact`: the graphed tower (captured and replayed here on a GPU) returns the transformers
        forward's numbers bit for bit; else the plain forward is used, with a warning."""
        ids = _probe_ids(self.text.model)
        want, got = _LastHiddenState(self.text.model)(ids), self._tower(ids)
        if torch.equal(got, want):
            return True
        log.warning("CLIP text tower: the graphed tower differs from the transformers forward by up to %.2e; "
                    "using the transformers forward", (got.float() - want.float()).abs().max().item())
        return False

    @torch.no_grad()
    def __call__(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        cached = self._cache.get(prompt)
        if cached is not None:
            return cached.clone()
        tokens = self.text.tokenize([prompt])
        if tokens.truncated[0]:
            log.warning("prompt longer than %d CLIP tokens is truncated (as CLIP and the official code do): %.60s...",
                        MAX_TOKENS, prompt)
        out = self._tower(tokens.input_ids.to(self.text.model.device))
        if prompt in self.constant:
            with self._lock:
                self._cache.setdefault(prompt, out.clone())
        return out
