"""The official CapHuman config format (`models/cldm_v15.yaml`), read as is.

The file is the ldm/OmegaConf layout: `model.params` holds the diffusion constants and four
sub-configs (`unet_config`, `control_stage_config`, `first_stage_config`, `cond_stage_config`,
`control_cond_stage_config`). We read it with a plain YAML parser (it uses no interpolation) and
turn it into frozen dataclasses, so a wrong file fails here, naming the missing or bad field.

Tiny variants for tests use the same format. One extension: a CLIP sub-config's `params` may carry
a `config:` mapping of transformers CLIP hyper-parameters; without it, `version` names the
architecture (`openai/clip-vit-large-patch14` or a local folder with a `config.json`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PACKAGED_CONFIGS = Path(__file__).parent / "configs"

# Hyper-parameters of openai/clip-vit-large-patch14, so the official config needs no download.
_VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                     projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
_VIT_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu",
                       projection_dim=768)
KNOWN_CLIP = {"openai/clip-vit-large-patch14": (_VIT_L14_TEXT, _VIT_L14_VISION)}


class ConfigError(ValueError):
    """The config file is not a CapHuman config we can build."""


@dataclass(frozen=True)
class UNetSpec:
    """An ldm `UNetModel`-shaped network: the SD UNet, CapFace, or a ControlNet."""
    in_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_heads: int
    num_head_channels: int
    transformer_depth: int
    context_dim: int
    out_channels: int = 4
    hint_channels: int = 0

    def heads_per_level(self) -> tuple[int, ...]:
        """Attention heads at each level (ldm: fixed num_heads, or ch // num_head_channels)."""
        chans = [self.model_channels * m for m in self.channel_mult]
        if self.num_head_channels > 0:
            return tuple(c // self.num_head_channels for c in chans)
        return tuple(self.num_heads for _ in chans)

    def level_has_attention(self, level: int) -> bool:
        return 2 ** level in self.attention_resolutions

    @property
    def num_residuals(self) -> int:
        """Skip features (conv_in + res blocks + downsamplers) plus the middle block: 13 for SD1.5."""
        levels = len(self.channel_mult)
        return 1 + levels * self.num_res_blocks + (levels - 1) + 1

    def residual_channels(self) -> list[int]:
        chans = [self.model_channels]
        for level, mult in enumerate(self.channel_mult):
            chans += [self.model_channels * mult] * self.num_res_blocks
            if level != len(self.channel_mult) - 1:
                chans.append(self.model_channels * mult)
        return chans + [self.model_channels * self.channel_mult[-1]]


@dataclass(frozen=True)
class VAESpec:
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    in_channels: int = 3
    out_ch: int = 3


@dataclass(frozen=True)
class CLIPSpec:
    version: str
    text: dict[str, Any] = field(default_factory=dict)
    vision: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CapHumanConfig:
    path: str
    linear_start: float
    linear_end: float
    timesteps: int
    scale_factor: float
    context_dim: int
    img_linear_dim: int
    cond_mode: str
    unet: UNetSpec
    capface: UNetSpec
    vae: VAESpec
    text_clip: CLIPSpec
    vision_clip: CLIPSpec
    id_dim: int = 512  # FaceNet embedding size; hard-coded in the official CapHuman.__init__

    @property
    def latent_downscale(self) -> int:
        return 2 ** (len(self.vae.ch_mult) - 1)


def _need(d: dict, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        raise ConfigError(f"config field '{where}.{key}' is missing")
    return d[key]


def _int_tuple(v, where: str) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,)
    try:
        return tuple(int(x) for x in v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config field '{where}' must be a list of integers, got {v!r}") from e


_UNSUPPORTED_UNET_OPTIONS = ("disable_self_attentions", "num_attention_blocks", "use_scale_shift_norm",
                             "resblock_updown", "use_new_attention_order")


def parse_unet_params(p: dict, where: str, default_hint: int = 0) -> UNetSpec:
    for opt in _UNSUPPORTED_UNET_OPTIONS:
        if p.get(opt):
            raise ConfigError(f"'{where}.{opt}' is set; SD1.x-shaped networks do not use it and it is not supported")
    if p.get("use_linear_in_transformer"):
        raise ConfigError(f"'{where}.use_linear_in_transformer' is true (SD2 layout); CapHuman is SD1.x (1x1 conv projections)")
    if not p.get("use_spatial_transformer", False):
        raise ConfigError(f"'{where}.use_spatial_transformer' must be true (text cross-attention)")
    num_heads = int(p.get("num_heads", -1))
    head_ch = int(p.get("num_head_channels", -1))
    if num_heads <= 0 and head_ch <= 0:
        raise ConfigError(f"'{where}' needs num_heads or num_head_channels")
    spec = UNetSpec(
        in_channels=int(_need(p, "in_channels", where)),
        model_channels=int(_need(p, "model_channels", where)),
        channel_mult=_int_tuple(_need(p, "channel_mult", where), f"{where}.channel_mult"),
        num_res_blocks=int(_need(p, "num_res_blocks", where)),
        attention_resolutions=_int_tuple(_need(p, "attention_resolutions", where), f"{where}.attention_resolutions"),
        num_heads=num_heads,
        num_head_channels=head_ch,
        transformer_depth=int(p.get("transformer_depth", 1)),
        context_dim=int(_need(p, "context_dim", where)),
        out_channels=int(p.get("out_channels", 4)),
        hint_channels=int(p.get("hint_channels", default_hint)),
    )
    for level, m in enumerate(spec.channel_mult):
        ch = spec.model_channels * m
        if ch % 32:
            raise ConfigError(f"'{where}': channels {ch} at level {level} are not a multiple of GroupNorm's 32 groups")
    return spec


def _clip_spec(p: dict, where: str, kind: str) -> CLIPSpec:
    version = str(p.get("version", "openai/clip-vit-large-patch14"))
    explicit = p.get("config")
    if explicit is not None:
        if not isinstance(explicit, dict):
            raise ConfigError(f"'{where}.config' must be a mapping of CLIP hyper-parameters")
        hp = dict(explicit)
    elif version in KNOWN_CLIP:
        hp = dict(KNOWN_CLIP[version][0 if kind == "text" else 1])
    elif (Path(version) / "config.json").is_file():
        cfg = json.loads((Path(version) / "config.json").read_text())
        hp = cfg.get(f"{kind}_config", cfg)
    else:
        raise ConfigError(f"'{where}.version' = {version!r}: unknown CLIP and no {version}/config.json; "
                          f"use 'openai/clip-vit-large-patch14' or a local CLIP folder")
    return CLIPSpec(version=version, **{kind: hp})


def load_config(path: str | Path) -> CapHumanConfig:
    """Read an official-format CapHuman config (e.g. `cldm_v15.yaml`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    model = _need(raw, "model", str(path))
    target = str(model.get("target", ""))
    if not target.endswith("CapHuman"):
        raise ConfigError(f"{path}: model.target is {target!r}, expected a CapHuman config (src.cldm.cldm.CapHuman)")
    p = _need(model, "params", "model")
    unet_p = _need(_need(p, "unet_config", "model.params"), "params", "model.params.unet_config")
    cap_p = _need(_need(p, "control_stage_config", "model.params"), "params", "model.params.control_stage_config")
    vae_p = _need(_need(_need(p, "first_stage_config", "model.params"), "params", "first_stage_config"),
                  "ddconfig", "first_stage_config.params")
    vae_embed = int(_need(p["first_stage_config"]["params"], "embed_dim", "first_stage_config.params"))
    text_p = _need(p, "cond_stage_config", "model.params").get("params", {}) or {}
    vis_p = _need(p, "control_cond_stage_config", "model.params").get("params", {}) or {}

    cond_mode = str(p.get("cond_mode", "img+id"))
    if cond_mode != "img+id":
        raise ConfigError(f"cond_mode {cond_mode!r} is not supported; the released CapHuman uses 'img+id'")
    unet = parse_unet_params(unet_p, "unet_config.params")
    capface = parse_unet_params(cap_p, "control_stage_config.params", default_hint=9)
    if capface.hint_channels <= 0:
        raise ConfigError("control_stage_config.params.hint_channels must be positive")
    for f in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions"):
        if getattr(unet, f) != getattr(capface, f):
            raise ConfigError(f"CapFace and the UNet disagree on {f}: {getattr(capface, f)} vs {getattr(unet, f)}; "
                              "CapFace residuals must match the UNet's skip connections")
    vae = VAESpec(
        ch=int(_need(vae_p, "ch", "ddconfig")),
        ch_mult=_int_tuple(_need(vae_p, "ch_mult", "ddconfig"), "ddconfig.ch_mult"),
        num_res_blocks=int(_need(vae_p, "num_res_blocks", "ddconfig")),
        z_channels=int(_need(vae_p, "z_channels", "ddconfig")),
        embed_dim=vae_embed,
        in_channels=int(vae_p.get("in_channels", 3)),
        out_ch=int(vae_p.get("out_ch", 3)),
    )
    if vae_p.get("attn_resolutions"):
        raise ConfigError("first_stage_config ddconfig.attn_resolutions must be empty (SD VAE)")
    text = _clip_spec(text_p, "cond_stage_config.params", "text")
    vision = _clip_spec(vis_p, "control_cond_stage_config.params", "vision")
    context_dim = int(p.get("context_dim", unet.context_dim))
    if text.text.get("hidden_size") != unet.context_dim:
        raise ConfigError(f"text encoder width {text.text.get('hidden_size')} != UNet context_dim {unet.context_dim}")
    if capface.context_dim != context_dim:
        raise ConfigError(f"CapFace context_dim {capface.context_dim} != model context_dim {context_dim}")
    img_dim = int(p.get("img_linear_dim", vision.vision.get("hidden_size", 1024)))
    if vision.vision.get("hidden_size") != img_dim:
        raise ConfigError(f"img_linear_dim {img_dim} != CLIP vision width {vision.vision.get('hidden_size')}")
    return CapHumanConfig(
        path=str(path),
        linear_start=float(p.get("linear_start", 0.00085)),
        linear_end=float(p.get("linear_end", 0.012)),
        timesteps=int(p.get("timesteps", 1000)),
        scale_factor=float(p.get("scale_factor", 0.18215)),
        context_dim=context_dim,
        img_linear_dim=img_dim,
        cond_mode=cond_mode,
        unet=unet, capface=capface, vae=vae, text_clip=text, vision_clip=vision,
    )


def load_controlnet_config(path: str | Path) -> UNetSpec:
    """Read an ldm ControlNet config (e.g. `control_v11p_sd15_openpose.yaml`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ControlNet config not found: {path}")
    raw = yaml.safe_load(path.read_text())
    p = _need(_need(raw, "model", str(path)), "params", "model")
    return parse_unet_params(p, "model.params", default_hint=3)


def packaged_config(name: str) -> Path:
    """Path of a config shipped with the package: 'cldm_v15' (official) or 'cldm_tiny'."""
    path = PACKAGED_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no packaged config named {name!r}; have {[p.stem for p in PACKAGED_CONFIGS.glob('*.yaml')]}")
    return path
