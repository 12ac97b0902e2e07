"""One I/O spec per exported graph; everything else derives from it.

A `GraphSpec` names each input and output once, with its dtype and dimensions. Dimensions are ints
or symbols: "B" (the graph's batch), "H"/"W" (the image height/width in pixels) optionally divided
by a power of two ("H/8" is the latent height, "H/64" the deepest UNet level). From the spec we
derive the ONNX `input_names`/`output_names`/`dynamic_axes`, sample inputs for export and
validation, the TensorRT optimization profiles (`caphuman.engines.tensorrt_engine`) and buffer shapes.

Names are permanent on day one (diffusers' `attention_head_dim` lesson): see docs/engines.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .config import CapHumanConfig

Dim = int | str
_DIM_RE = re.compile(r"^(B|H|W)(?:/(\d+))?$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


class ShapeError(ValueError):
    """A shape that a graph or an engine profile cannot take."""


def resolve_dim(dim: Dim, batch: int, height: int, width: int) -> int:
    """Concrete size of one dimension for batch B and an image of height x width pixels."""
    if isinstance(dim, int):
        return dim
    m = _DIM_RE.match(dim)
    if not m:
        raise ShapeError(f"bad symbolic dimension {dim!r}: expected B, H, W, H/<n> or W/<n>")
    value = {"B": batch, "H": height, "W": width}[m.group(1)]
    div = int(m.group(2) or 1)
    if value % div:
        raise ShapeError(f"{m.group(1)}={value} is not divisible by {div} (dimension {dim!r})")
    return value // div


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                      # a key of DTYPES; "float" = the graph's float dtype (fp32 or fp16)
    shape: tuple[Dim, ...]

    def torch_dtype(self, float_dtype: torch.dtype = torch.float32) -> torch.dtype:
        return float_dtype if self.dtype == "float" else DTYPES[self.dtype]

    def resolve(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return tuple(resolve_dim(d, batch, height, width) for d in self.shape)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    @property
    def spatial(self) -> bool:
        return any(isinstance(d, str) and d[0] in "HW" for d in self.shape)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str = ""
    fixed_size: tuple[int, int] | None = None   # image size for graphs without spatial dims (CLIP 224, ...)
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes. Symbols keep their names, so 'H/8' in two tensors is one
        symbolic dimension in the ONNX graph."""
        out = {}
        for t in self.inputs + self.outputs:
            axes = t.dynamic_axes()
            if axes:
                out[t.name] = axes
        return out

    @property
    def has_spatial_dims(self) -> bool:
        return any(t.spatial for t in self.inputs)

    def shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        return {t.name: t.resolve(batch, height, width) for t in self.inputs + self.outputs}

    def sample_inputs(self, batch: int, height: int, width: int, float_dtype=torch.float32, seed: int = 0,
                      device="cpu") -> dict[str, torch.Tensor]:
        """Random inputs of the spec's shapes (timesteps in [1, 999], token ids in the CLIP vocabulary,
        hard-mask probabilities spread around 0.5 so the mask is partly on)."""
        g = torch.Generator().manual_seed(seed)
        feed = {}
        for t in self.inputs:
            shape, dtype = t.resolve(batch, height, width), t.torch_dtype(float_dtype)
            if t.name == "timestep":
                x = torch.randint(1, 1000, shape, generator=g)
            elif t.name == "input_ids":
                x = torch.randint(0, 49406, shape, generator=g)
            elif t.name == "strength":
                x = torch.rand(shape, generator=g) * 0.5 + 0.75
            elif t.name == "mask":
                x = torch.rand(shape, generator=g)
            else:
                x = torch.randn(shape, generator=g)
            feed[t.name] = x.to(dtype).to(device)
        return feed


def _t(name: str, *shape: Dim, dtype: str = "float") -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


def residual_specs(config: CapHumanConfig) -> tuple[TensorSpec, ...]:
    """CapFace residual_i: [B, C_i, H/(8*2^level), W/(8*2^level)] in the UNet's skip order, middle last."""
    spec = config.unet
    levels = len(spec.channel_mult)
    down = 8
    dims = [(spec.model_channels, down)]
    for level, mult in enumerate(spec.channel_mult):
        ch = spec.model_channels * mult
        dims += [(ch, down)] * spec.num_res_blocks
        if level != levels - 1:
            down *= 2
            dims.append((ch, down))
    dims.append((spec.model_channels * spec.channel_mult[-1], down))
    return tuple(_t(f"residual_{i}", "B", c, f"H/{d}", f"W/{d}") for i, (c, d) in enumerate(dims))


def graph_specs(config: CapHumanConfig) -> dict[str, GraphSpec]:
    """Every graph `caphuman export` writes, by name."""
    C = config.context_dim
    n_res = config.unet.num_residuals
    lat = config.vae.z_channels
    down = config.latent_downscale
    text_w = config.text_clip.text.get("hidden_size", C)
    vis = config.vision_clip.vision
    img_size = int(vis.get("image_size", 224))
    n_tok = (img_size // int(vis.get("patch_size", 14))) ** 2 + 1
    residuals = residual_specs(config)
    latent = ("B", lat, f"H/{down}", f"W/{down}")
    specs = [
        GraphSpec("text_encoder", (_t("input_ids", "B", 77, dtype="int64"),), (_t("text_embeddings", "B", 77, text_w),),
                  "CLIP text: token ids (77, padded with <|endoftext|>) -> last_hidden_state"),
        GraphSpec("image_encoder", (_t("pixel_values", "B", 3, img_size, img_size),),
                  (_t("clip_tokens", "B", n_tok, config.img_linear_dim), _t("image_context", "B", n_tok, C)),
                  "CLIP vision last_hidden_state (no post-LN) and its img_linear projection", (img_size, img_size)),
        GraphSpec("capface", (_t("sample", *latent), _t("timestep", "B", dtype="int64"), _t("hint", "B", 9, "H", "W"),
                              _t("identity_context", "B", 258, C)),
                  residuals + (_t("mask", "B", 1, "H/8", "W/8"),),
                  "CapFace: raw residuals (unscaled, unmasked) and the sigmoid head mask"),
        GraphSpec("unet", (_t("sample", *latent), _t("timestep", "B", dtype="int64"), _t("text_embeddings", "B", 77, C))
                  + residuals + (_t("mask", "B", 1, "H/8", "W/8"), _t("strength", n_res, dtype="float32")),
                  (_t("eps", *latent),),
                  "SD UNet with CapFace residuals: residual_i * strength[i] * (resize(mask) > 0.5) added in-graph"),
        GraphSpec("denoiser", (_t("sample", *latent), _t("timestep", "B", dtype="int64"),
                               _t("text_embeddings", "B", 77, C), _t("hint", "B", 9, "H", "W"),
                               _t("identity_context", "B", 258, C), _t("strength", n_res, dtype="float32")),
                  (_t("eps", *latent),),
                  "CapFace + UNet fused: load_denoiser(...)(sample, timestep, text, hint, identity_context, strength)"),
        GraphSpec("vae_decoder", (_t("latents", *latent),), (_t("images", "B", 3, "H", "W"),),
                  "latents (scaled by scale_factor) -> images in [-1, 1]"),
        GraphSpec("vae_encoder", (_t("images", "B", 3, "H", "W"),), (_t("latents", *latent),),
                  "images in [-1, 1] -> posterior mean * scale_factor"),
        GraphSpec("facenet", (_t("face", "B", 3, 160, 160),),
                  (_t("id_features", "B", 512), _t("id_context", "B", 1, C)),
                  "FaceNet (standardised 160x160 crop) -> unit embedding and its id_linear projection", (160, 160)),
        GraphSpec("bisenet", (_t("image", "B", 3, 512, 512),), (_t("parsing_logits", "B", 19, 512, 512),),
                  "BiSeNet face parsing logits (19 CelebAMask-HQ classes)", (512, 512)),
        GraphSpec("deca_encoder", (_t("image", "B", 3, 224, 224),), (_t("flame_code", "B", 236),),
                  "DECA E_flame: [0,1] crop -> 236 FLAME codes (shape, tex, exp, pose, cam, light)", (224, 224)),
    ]
    return {s.name: s for s in specs}


NETWORK_GRAPHS = ("text_encoder", "image_encoder", "capface", "unet", "denoiser", "vae_decoder", "vae_encoder")
FACE_GRAPHS = ("facenet", "bisenet", "deca_encoder")
