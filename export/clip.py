"""CLIP ViT-L/14 text and image encoders as CapHuman uses them.

Text: tokenizer with truncation to 77 tokens, padding with <|endoftext|>, `last_hidden_state`
after the final layer norm (ldm FrozenCLIPTextEmbedder, layer="last").
Image: `last_hidden_state` of CLIPVisionModel (CLS + patches, after pre-LN, *without* post-LN),
257x1024 for ViT-L/14 at 224.

The tokenizer needs the CLIP BPE vocabulary. A CLIP folder (`openai/clip-vit-large-patch14`
downloaded by the user) has it; without one we build the identical vocabulary from the BPE merges
file shipped in `export/assets` (the same list OpenAI's CLIP tokenizer is derived from).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import CLIPTokenizer

from .config import CLIPSpec
from .networks import build_text_encoder, build_vision_encoder

log = logging.getLogger(__name__)

BPE_VOCAB = Path(__file__).parent / "assets" / "clip_bpe_simple_vocab_16e6.txt.gz"
MAX_TOKENS = 77
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to chars above 255.
    The dict ORDER matters (it is the vocabulary order): printable bytes first, then the others."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer_files(out_dir: Path) -> Path:
    """Write vocab.json/merges.txt of CLIP's 49408-token BPE vocabulary into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "vocab.json").is_file() and (out_dir / "merges.txt").is_file():
        return out_dir
    lines = gzip.open(BPE_VOCAB, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    words = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    tmp = out_dir / f".tmp{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}, ensure_ascii=False))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": MAX_TOKENS, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True}))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        os.replace(tmp / name, out_dir / name)  # atomic: concurrent builders never see half a file
    tmp.rmdir()
    return out_dir


def _cache_dir() -> Path:
    base = os.environ.get("CAPHUMAN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "caphuman-rt")
    return Path(base) / "clip-tokenizer-v2"  # bump when the generated files change


def load_tokenizer(clip_dir: str | Path | None = None) -> CLIPTokenizer:
    """CLIP tokenizer from a CLIP folder, or from the shipped BPE vocabulary."""
    if clip_dir is not None and (Path(clip_dir) / "vocab.json").is_file():
        folder = Path(clip_dir)
    else:
        folder = build_tokenizer_files(_cache_dir())
    tok = CLIPTokenizer.from_pretrained(str(folder))
    tok.pad_token = "<|endoftext|>"
    return tok


@dataclass
class TokenizedPrompts:
    input_ids: torch.Tensor           # [B, 77] int64
    truncated: list[bool]             # prompt longer than 77 tokens (CLIP truncates it, as the official code)


class TextEncoder(nn.Module):
    """Prompt strings -> [B, 77, width] context for the UNet's cross-attention."""

    def __init__(self, spec: CLIPSpec, tokenizer: CLIPTokenizer | None = None):
        super().__init__()
        self.model = build_text_encoder(spec)
        self.tokenizer = tokenizer or load_tokenizer()

    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        full = self.tokenizer(prompts, truncation=False, padding=False)["input_ids"]
        enc = self.tokenizer(prompts, truncation=True, max_length=MAX_TOKENS, padding="max_length", return_tensors="pt")
        return TokenizedPrompts(enc["input_ids"], [len(ids) > MAX_TOKENS for ids in full])

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state

    def forward(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(prompts)
        for p, cut in zip(prompts, tokens.truncated):
            if cut:
                log.warning("prompt longer than %d CLIP tokens is truncated (as CLIP and the official code do): %.60s...",
                            MAX_TOKENS, p)
        return self.encode_ids(tokens.input_ids.to(self.model.device))


def clip_preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """transformers 4.24 CLIPFeatureExtractor: shortest side to 224 (PIL bicubic), centre crop,
    /255, CLIP mean/std. Returns [1, 3, 224, 224] float32."""
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())[None]


class ImageEncoder(nn.Module):
    """Preprocessed [B, 3, 224, 224] pixels -> CLIP vision tokens [B, 257, width] (no post-LN)."""

    def __init__(self, spec: CLIPSpec):
        super().__init__()
        self.model = build_vision_encoder(spec)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state
