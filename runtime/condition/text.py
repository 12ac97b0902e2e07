"""Prompt embeddings for the UNet's cross-attention, without repeated work.

`PromptEncoder` wraps `export.clip.TextEncoder`:

* the prompts named `constant` (by default the empty negative prompt, the official default
  ``n_prompt = ""``) are encoded once per process and served from memory afterwards: CLIP's text
  tower is a deterministic function of the token ids, so the cached [1, 77, C] tensor is what a
  fresh encoding returns;
* on a GPU, `graph=True` replays the text tower from a CUDA graph (static [1, 77] token ids).

    prompts = PromptEncoder(text_encoder, graph=True)
    text_c, text_u = prompts("a photo of a person"), prompts("")
"""
from __future__ import annotations

import logging
import threading

import torch
from torch import nn

from export.clip import MAX_TOKENS, TextEncoder

from .graphs import CudaGraphed

log = logging.getLogger(__name__)


class _LastHiddenState(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


class PromptEncoder:
    """`encoder(prompt) -> [1, 77, C]`; constant prompts come from a per-process cache."""

    def __init__(self, text_encoder: TextEncoder, constant: tuple[str, ...] = ("",), graph: bool = False):
        self.text = text_encoder
        tower = _LastHiddenState(text_encoder.model)
        self._tower = CudaGraphed(tower) if graph else tower
        self.constant = frozenset(constant)
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

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
