"""The generation pipeline: prompt + head hint + identity context -> images.

    pipe = load_pipeline(config, "caphuman.ckpt", sd_checkpoint=..., vae_checkpoint=...)
    result = pipe.generate(GenerationRequest(prompt="a photo of a woman", hint=hint, identity_context=ctx))

Building the hint and the identity context from photos lives in `caphuman.runtime.condition`; this module
takes them as tensors.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from caphuman.export.checkpoints import VISION_PREFIX, read_official
from caphuman.export.clip import ImageEncoder, TextEncoder
from caphuman.export.config import CapHumanConfig, load_config, packaged_config
from caphuman.export.models import (VAE, CapHumanDenoiser, clip_folder_state, denoiser_from_state, image_encoder_from_state,
                           text_encoder_from_state, vae_from_state)

from .sampling import ddim_sample, validate_sampling_args

if TYPE_CHECKING:
    from .condition.text import PromptEncoder

log = logging.getLogger(__name__)

MAX_SEED = 2 ** 32 - 1


@dataclass
class GenerationRequest:
    prompt: str
    hint: torch.Tensor                    # [1, 9, H, W] raw hint (normal | albedo | shading)
    identity_context: torch.Tensor        # [1, 258, C]
    negative_prompt: str = ""
    added_prompt: str = ""                # official --a_prompt: appended as "prompt, a_prompt"
    seed: int = 12345
    num_samples: int = 1
    seeds: list[int] | None = None        # per-sample seeds; default seed, seed+1, ...
    steps: int = 20
    guidance: float = 7.0
    eta: float = 0.0
    strength: float = 1.0
    tau: float = 0.0
    noise: torch.Tensor | None = None     # explicit initial noise [N, 4, h, w] (bit-exact comparisons)

    def full_prompt(self) -> str:
        return f"{self.prompt}, {self.added_prompt}" if self.added_prompt else self.prompt

    def sample_seeds(self) -> list[int]:
        seeds = self.seeds if self.seeds is not None else [self.seed + i for i in range(self.num_samples)]
        if len(seeds) != self.num_samples:
            raise ValueError(f"{len(seeds)} seeds for num_samples={self.num_samples}")
        for s in seeds:
            if not 0 <= int(s) <= MAX_SEED:
                raise ValueError(f"seed must be in [0, {MAX_SEED}], got {s}")
        return [int(s) for s in seeds]

    def validate(self, latent_channels: int) -> None:
        validate_sampling_args(self.steps, self.guidance, self.eta, self.strength, self.tau)
        if not isinstance(self.num_samples, int) or not 1 <= self.num_samples <= 64:
            raise ValueError(f"num_samples must be an integer in [1, 64], got {self.num_samples!r}")
        if self.hint.ndim != 4 or self.hint.shape[1] != 9 or self.hint.shape[0] not in (1, self.num_samples):
            raise ValueError(f"hint must be [1, 9, H, W], got {tuple(self.hint.shape)}")
        if self.identity_context.ndim != 3 or self.identity_context.shape[0] not in (1, self.num_samples):
            raise ValueError(f"identity context must be [1, tokens, C], got {tuple(self.identity_context.shape)}")
        h, w = self.hint.shape[-2:]
        if h % 64 or w % 64 or not 256 <= min(h, w) or max(h, w) > 1024:
            raise ValueError(f"resolution {w}x{h} must be multiples of 64 between 256 and 1024 (the official range)")
        if not torch.isfinite(self.hint).all():
            raise ValueError("hint contains NaN or infinite values")
        if not torch.isfinite(self.identity_context).all():
            raise ValueError("identity context contains NaN or infinite values")
        if self.noise is not None and tuple(self.noise.shape) != (self.num_samples, latent_channels, h // 8, w // 8):
            raise ValueError(f"noise must be {(self.num_samples, latent_channels, h // 8, w // 8)}, "
                             f"got {tuple(self.noise.shape)}")


@dataclass
class GenerationResult:
    images: list[np.ndarray]              # uint8 HxWx3 per sample
    latents: torch.Tensor
    seeds: list[int]
    parameters: dict = field(default_factory=dict)


def latents_to_uint8(decoded: torch.Tensor) -> list[np.ndarray]:
    """Official conversion: x*127.5+127.5, clip to [0, 255], then truncate (not round) to uint8."""
    arr = (decoded.float().permute(0, 2, 3, 1) * 127.5 + 127.5).cpu().numpy().clip(0, 255).astype(np.uint8)
    return list(arr)


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """One CPU generator per sample: sample i's noise depends on its seed only (reproducible per image,
    whatever the batch). The official code draws from the global CUDA generator instead; for bit-exact
    comparisons pass explicit noise."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


class CapHumanPipeline:
    """Text encoder + CapHuman denoiser + VAE (+ CLIP image encoder for identity from photos)."""

    def __init__(self, config: CapHumanConfig, text_encoder: TextEncoder, denoiser: CapHumanDenoiser, vae: VAE,
                 image_encoder: ImageEncoder | None = None, *, device="cpu", model_hashes: dict | None = None,
                 random_weights: bool = False):
        self.config = config
        self.text_encoder = text_encoder.to(device)
        self.denoiser = denoiser.to(device)
        self.vae = vae.to(device)
        self.image_encoder = image_encoder.to(device) if image_encoder is not None else None
        self.device = torch.device(device)
        self.model_hashes = model_hashes or {}
        self.random_weights = random_weights
        # Engine-backed DDIM (`caphuman.engines.sampler.EngineSampler`, `TorchDenoiserEngine.sample`): same
        # signature as `ddim_sample` without the model. None: `ddim_sample` on `self.denoiser`.
        self.sampler: Callable | None = None
        self.backend = "eager"
        # Prompts through `caphuman.runtime.condition.text.PromptEncoder` (the empty negative prompt encoded once;
        # on CUDA the text tower replayed from a graph where that is bit-identical), rebuilt when the
        # text encoder moves to another device or dtype (`attach_backend`, `engine_pipeline`).
        self._prompts: tuple[tuple, PromptEncoder] | None = None
        self._prompts_lock = threading.Lock()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def prompt_encoder(self) -> PromptEncoder:
        """The `PromptEncoder` of the text encoder's current device and dtype."""
        p = next(self.text_encoder.parameters())
        key = (p.device, p.dtype, p.data_ptr())
        with self._prompts_lock:
            if self._prompts is None or self._prompts[0] != key:
                from .condition.text import PromptEncoder
                graph = p.device.type == "cuda"
                self._prompts = (key, PromptEncoder(self.text_encoder, graph=graph, exact=True))
            return self._prompts[1]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), 77, C] in the pipeline's dtype. One prompt (what `generate` and the serving
        batches encode) goes through `prompt_encoder()`: the same numbers as the text encoder's."""
        if len(prompts) == 1:
            return self.prompt_encoder()(prompts[0]).to(self.dtype)
        return self.text_encoder(prompts).to(self.dtype)

    @torch.no_grad()
    def generate(self, req: GenerationRequest, cfg: str = "batched",
                 callback: Callable[[int, int, torch.Tensor], None] | None = None) -> GenerationResult:
        latent_ch = self.config.unet.in_channels
        req.validate(latent_ch)
        seeds = req.sample_seeds()
        h, w = req.hint.shape[-2:]
        noise = req.noise if req.noise is not None else initial_noise(seeds, (latent_ch, h // 8, w // 8))
        text_cond = self.encode_prompts([req.full_prompt()])
        text_uncond = self.encode_prompts([req.negative_prompt])
        hint = req.hint.to(self.device, self.dtype)
        ctx = req.identity_context.to(self.device, self.dtype)
        sample = self.sampler or functools.partial(ddim_sample, self.denoiser)
        latents = sample(noise.to(self.device), text_cond, text_uncond, hint, ctx,
                         steps=req.steps, guidance=req.guidance, eta=req.eta, strength=req.strength,
                         tau=req.tau, cfg=cfg, callback=callback,
                         generators=[torch.Generator("cpu").manual_seed(s + 1) for s in seeds]
                         if req.eta > 0 else None)
        decoded = self.vae.decode(latents.to(self.dtype))
        params = {k: v for k, v in asdict(req).items() if k not in ("hint", "identity_context", "noise")}
        params.update(seeds=seeds, cfg=cfg, backend=self.backend, width=int(w), height=int(h), sampler="ddim",
                      dtype=str(self.dtype).removeprefix("torch."), config=Path(self.config.path).name,
                      hint_sha256=_tensor_hash(req.hint), identity_sha256=_tensor_hash(req.identity_context),
                      noise="explicit" if req.noise is not None else "cpu-generator-per-seed",
                      models=self.model_hashes, random_weights=self.random_weights,
                      controlnets=[{"scale": c.scale, "hint_sha256": _tensor_hash(c.hint)}
                                   for c in self.denoiser.extra_controls])
        return GenerationResult(latents_to_uint8(decoded), latents, seeds, params)


def _tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def file_hash(path: str | Path | None) -> str | None:
    """Short content hash of a weights file (first/last 16 MiB + size: fast on multi-GB files)."""
    if not path:
        return None
    p = Path(path)
    h = hashlib.sha256(str(p.stat().st_size).encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 24))
        if p.stat().st_size > 1 << 25:
            f.seek(-(1 << 24), 2)
            h.update(f.read())
    return h.hexdigest()[:16]


def load_pipeline(config_path, checkpoint, sd_checkpoint=None, vae_checkpoint=None, clip_dir=None,
                  device="cpu", dtype=torch.float32, with_image_encoder: bool = False) -> CapHumanPipeline:
    """All networks from the official files, in the official order and precedence."""
    config = load_config(config_path)
    state = read_official(checkpoint, sd_checkpoint, vae_checkpoint)
    if with_image_encoder and not any(k.startswith(VISION_PREFIX) for k in state) and clip_dir:
        state.update(clip_folder_state(clip_dir, "vision_model"))
    den = denoiser_from_state(config, state, dtype)
    text = text_encoder_from_state(config, state, clip_dir, dtype)
    vae = vae_from_state(config, state, dtype)
    image = image_encoder_from_state(config, state, dtype) if with_image_encoder else None
    hashes = {"checkpoint": file_hash(checkpoint), "sd_checkpoint": file_hash(sd_checkpoint),
              "vae_checkpoint": file_hash(vae_checkpoint)}
    return CapHumanPipeline(config, text, den, vae, image, device=device,
                            model_hashes={k: v for k, v in hashes.items() if v})


def random_pipeline(config_name: str = "cldm_tiny", seed: int = 0, device="cpu") -> CapHumanPipeline:
    """A packaged config with seeded RANDOM weights (the demo, tests, benchmarks at the official
    sizes). Its images are noise-like patterns, not photos: it exercises the whole runtime, and
    costs the same compute, without the real weights."""
    config = load_config(packaged_config(config_name))
    torch.manual_seed(seed)
    den = CapHumanDenoiser(config).eval()
    # Zero-initialised layers in the real model are trained; make them non-zero so CapFace matters.
    with torch.no_grad():
        for p in den.capface.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    text = TextEncoder(config.text_clip).eval()
    vae = VAE(config).eval()
    image = ImageEncoder(config.vision_clip).eval().requires_grad_(False)
    label = "tiny" if config_name == "cldm_tiny" else config_name
    return CapHumanPipeline(config, text, den.requires_grad_(False), vae.requires_grad_(False), image, device=device,
                            model_hashes={"weights": f"{label}-random-seed{seed}"}, random_weights=True)


def tiny_random_pipeline(seed: int = 0, device="cpu") -> CapHumanPipeline:
    """The built-in demo: the tiny config with seeded RANDOM weights."""
    return random_pipeline("cldm_tiny", seed=seed, device=device)


def sphere_hint(size: int = 512, light: Sequence[float] | None = None) -> torch.Tensor:
    """A cheap stand-in head condition (warm-ups, tests): a centred ellipsoid's normals, a flat skin
    albedo and SH-shaded Lambertian, in the hint's raw layout [1, 9, size, size]. Real hints come from
    `caphuman.runtime.condition` (the FLAME template head or model)."""
    from caphuman.kernels.raster_reference import sh_shading
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    u, v = xs / 0.36, (ys + 0.05) / 0.48
    inside = (u ** 2 + v ** 2) < 1
    nz = torch.sqrt(torch.clamp(1 - u ** 2 - v ** 2, min=0))
    normal = torch.stack([u, -v, nz]) * inside          # FLAME world: x right, y up, z toward camera
    albedo = torch.tensor([0.75, 0.57, 0.47])[:, None, None] * inside
    sh = np.asarray(light if light is not None else [0.9, 0.0, 0.25, 0.45, 0, 0, 0, 0, 0], dtype=np.float64)
    shading = torch.from_numpy(sh_shading(normal.numpy(), np.repeat(sh[:, None], 3, axis=1))).float() * inside
    return torch.cat([normal, albedo, albedo * shading]).unsqueeze(0).float()
