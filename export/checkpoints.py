"""Safe reading of the official checkpoint files and loading them into our modules.

Files are untrusted input: `.safetensors` through safetensors, everything else through
`torch.load(weights_only=True)` (never plain pickle). Lightning checkpoints keep the weights
under `state_dict`; bare state dicts are accepted as they are.

Loading follows the official order and precedence, key by key (later files override earlier):
`caphuman.ckpt`, then the SD1.x checkpoint (`model_ema.*` ignored), then the VAE checkpoint
(keys without prefix). Unlike the official `strict=False` loads, a key our module needs and no
file has is an error that names it, and keys a file has that nothing uses are reported.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
CAPFACE_PREFIX = "control_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
VISION_PREFIX = "control_cond_stage_model.transformer."
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "logvar")
# Buffers that transformers 4.24 saved and newer releases no longer have: accepted and ignored.
IGNORED_SUFFIXES = ("embeddings.position_ids",)


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, of the wrong kind, or lacks keys the model needs."""


class _LightningCallbackStub:
    """Stands in for `pytorch_lightning...ModelCheckpoint`, which SD1.x `.ckpt` files reference
    in their `callbacks` entry; the weights-only unpickler builds this harmless placeholder."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


_SAFE_GLOBALS = [
    (_LightningCallbackStub, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_LightningCallbackStub, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
]


def _numpy_safe_globals() -> list:
    import numpy as np
    out = [np.dtype]
    try:
        out.append((np._core.multiarray.scalar, "numpy.core.multiarray.scalar"))
        out.append(np._core.multiarray.scalar)
    except AttributeError:
        out.append(np.core.multiarray.scalar)
    out += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32")]
    return out


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


def file_format(path: str | Path) -> str | None:
    """'torch-zip', 'torch-legacy', 'tar' (old torch.save) or 'safetensors' from a file's first bytes;
    None for anything else (a text file, random bytes), so that such files are refused before torch.load."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2-5 marker
        return "torch-legacy"
    if head[257:262] == b"ustar":
        return "tar"
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 << 20:
        return "safetensors"
    return None


def _unpickler_reason(error: Exception) -> str:
    """The reason of a weights-only refusal, without PyTorch's advice to load with weights_only=False
    (which would run code from an untrusted file: we never repeat it)."""
    for line in str(error).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return "it is not a plain tensor checkpoint"


def read_torch_object(path: str | Path, label: str = "checkpoint"):
    """Whatever a torch file holds (dicts, tensors, numbers), through the weights-only unpickler:
    untrusted files can build no other object and run no code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFound(f"{label} not found: {path}")
    if file_format(path) not in ("torch-zip", "torch-legacy", "tar"):
        raise CheckpointError(f"{label} {path} is not a PyTorch checkpoint or safetensors file")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS + _numpy_safe_globals()):
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Legacy (non-zip) torch files cannot be memory-mapped.
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{label} {path} holds Python objects beyond tensors, which we refuse to unpickle (untrusted input): "
            f"{_unpickler_reason(e)}. Re-save it as a bare state dict or .safetensors.") from None
    except Exception as e:  # weights-only loading runs no code: anything else is a damaged file
        raise CheckpointError(f"{label} {path} is not a readable checkpoint (truncated or not a torch file?): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def read_state_dict(path: str | Path, label: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: safetensors, or a torch file (bare or Lightning `state_dict`)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise CheckpointNotFound(f"{label} not found: {path}")
        kind = file_format(path)
        if kind != "safetensors":
            why = "it is a PyTorch checkpoint: name it .ckpt" if kind else "not a PyTorch checkpoint or safetensors file"
            raise CheckpointError(f"{label} {path} is not a readable safetensors file ({why})")
        import safetensors.torch
        try:
            return dict(safetensors.torch.load_file(str(path), device="cpu"))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{label} {path} is not a readable safetensors file ({e})") from e
    obj = read_torch_object(path, label)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{label} {path} does not hold a state dict (got {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{label} {path} holds no tensors")
    return tensors


def normalize_sd_keys(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Drop `model_ema.*`; rename old SD1.x CLIP keys that lack `text_model.` (which the official
    strict=False load silently skipped) to the transformers 4.24 layout."""
    out = {}
    renamed = 0
    for k, v in state.items():
        if k.startswith("model_ema."):
            continue
        if k.startswith(TEXT_PREFIX) and not k.startswith(TEXT_PREFIX + "text_model."):
            k = TEXT_PREFIX + "text_model." + k[len(TEXT_PREFIX):]
            renamed += 1
        out[k] = v
    if renamed:
        log.warning("%s: %d CLIP text keys in the pre-'text_model.' layout were renamed and loaded "
                    "(the official loader ignores them and keeps the hub text encoder)", source, renamed)
    return out


@dataclass
class LoadReport:
    label: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _summary(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_module(module: nn.Module, state: dict[str, torch.Tensor], prefix: str,
                official_name: Callable[[str], str], label: str,
                reshape: Callable[[str, torch.Tensor, torch.Size], torch.Tensor] | None = None) -> LoadReport:
    """Copy `state[prefix + official_name(name)]` into each parameter and persistent buffer of module.

    Raises CheckpointError naming missing keys or mismatched shapes; returns the report with the
    keys under `prefix` that nothing used.
    """
    report = LoadReport(label)
    used: set[str] = set()
    targets = module.state_dict()
    with torch.no_grad():
        for name, dst in targets.items():
            key = prefix + official_name(name)
            src = state.get(key)
            if src is None:
                report.missing.append(key)
                continue
            if reshape is not None:
                src = reshape(key, src, dst.shape)
            if src.shape != dst.shape:
                raise CheckpointError(f"{label}: '{key}' has shape {tuple(src.shape)}, the config needs "
                                      f"{tuple(dst.shape)}; the checkpoint does not match the config")
            dst.copy_(src.to(dst.dtype))
            used.add(key)
            report.loaded += 1
    if report.missing:
        raise CheckpointError(f"{label}: {len(report.missing)} key(s) missing from the checkpoint(s): "
                              f"{_summary(report.missing)}")
    report.unexpected = sorted(k for k in state if k.startswith(prefix) and k not in used
                               and not k.endswith(IGNORED_SUFFIXES))
    if report.unexpected:
        log.warning("%s: %d unexpected key(s) ignored: %s", label, len(report.unexpected), _summary(report.unexpected))
    return report


def load_exact(module: nn.Module, state: dict[str, torch.Tensor], label: str) -> nn.Module:
    """Load a state dict whose keys are the module's own (FaceNet, BiSeNet, DECA files): every key
    required (BatchNorm's num_batches_tracked excepted), none unexpected, shapes equal."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{label} does not match the expected layout: missing {_summary(missing)}; "
                              f"unexpected {_summary(unexpected)}")
    bad = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{label}: wrong shapes (key, file, expected): {bad[:5]}")
    module.load_state_dict(state, strict=False)
    return module.eval()


def merge_in_official_order(caphuman: dict[str, torch.Tensor] | None,
                            sd: dict[str, torch.Tensor] | None = None,
                            vae: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """caphuman.ckpt, overridden key by key by the SD checkpoint, then by the VAE checkpoint."""
    merged: dict[str, torch.Tensor] = dict(caphuman or {})
    if sd:
        merged.update(sd)
    if vae:
        for k, v in vae.items():
            if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
                merged[VAE_PREFIX + k] = v
    return merged


def read_official(caphuman_ckpt: str | Path | None, sd_ckpt: str | Path | None = None,
                  vae_ckpt: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read and merge the official files (any may be None)."""
    cap = normalize_sd_keys(read_state_dict(caphuman_ckpt), str(caphuman_ckpt)) if caphuman_ckpt else None
    sd = normalize_sd_keys(read_state_dict(sd_ckpt), str(sd_ckpt)) if sd_ckpt else None
    if sd is not None and not any(k.startswith(UNET_PREFIX) for k in sd):
        raise CheckpointError(f"{sd_ckpt} has no '{UNET_PREFIX}*' keys: not an SD1.x checkpoint")
    vae = read_state_dict(vae_ckpt) if vae_ckpt else None
    if vae is not None and not any(k.startswith("decoder.") for k in vae):
        raise CheckpointError(f"{vae_ckpt} has no 'decoder.*' keys: not an SD VAE checkpoint")
    return merge_in_official_order(cap, sd, vae)
