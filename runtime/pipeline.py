"""The generation pipeline: prompt + head hint + identity context -> images, on any denoiser engine.

    pipe = load_pipeline(config, "caphuman.ckpt", sd_checkpoint=..., backend="torch", device="cuda")
    result = pipe.generate(GenerationRequest(prompt="a photo of a woman", hint=hint, identity_context=ctx))
    results = pipe.generate_batch([request_a, request_b])   # compatible requests, one denoising batch

`Networks` holds the loaded PyTorch modules; `build_pipeline` puts them on a device and dtype and builds
the denoiser engine of a backend through the one factory (`caphuman.engines.factory.create_engine`). The
pipeline keeps that engine for its lifetime. Building the hint and the identity context from photos
lives in `caphuman.runtime.condition`; this module takes them as tensors.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from caphuman.engines.denoiser import Conditioning, DenoiserEngine
from caphuman.engines.factory import create_engine
from caphuman.engines.loop import StepCallback, sample
from caphuman.engines.samplers import DEFAULT_SAMPLER, check_sampler_args
from caphuman.export.checkpoints import VISION_PREFIX, read_official
from caphuman.export.clip import ImageEncoder, TextEncoder
from caphuman.export.config import CapHumanConfig, load_config, packaged_config
from caphuman.export.models import (VAE, CapHumanDenoiser, clip_folder_state, denoiser_from_state,
                                    image_encoder_from_state, text_encoder_from_state, vae_from_state)
from caphuman.export.people import PeopleFields, as_people, check_person_strength

from . import limits

if TYPE_CHECKING:
    from .condition.text import PromptEncoder

log = logging.getLogger(__name__)

MAX_SEED = limits.MAX_SEED


@dataclass
class GenerationRequest(PeopleFields):
    """One prompt's generation. Several people in one image: `hint` and `identity_context` are lists, one
    entry per person (each person's head hint rendered in the full frame)."""
    prompt: str
    hint: torch.Tensor | list[torch.Tensor]              # [1, 9, H, W] raw hint (normal | albedo | shading)
    identity_context: torch.Tensor | list[torch.Tensor]  # [1, 258, C]
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
    sampler: str = DEFAULT_SAMPLER        # a name in caphuman.engines.samplers.SAMPLERS
    noise: torch.Tensor | None = None     # explicit initial noise [N, 4, h, w] (bit-exact comparisons)
    person_strength: list[float] | None = None   # several people: one CapFace scale per person (default 1 each)

    def full_prompt(self) -> str:
        return f"{self.prompt}, {self.added_prompt}" if self.added_prompt else self.prompt

    def sample_seeds(self) -> list[int]:
        seeds = self.seeds if self.seeds is not None else [self.seed + i for i in range(self.num_samples)]
        if len(seeds) != self.num_samples:
            raise ValueError(f"{len(seeds)} seeds for num_samples={self.num_samples}")
        return [limits.check_seed("seed", s) for s in seeds]

    @property
    def resolution(self) -> tuple[int, int]:
        h, w = self.hints[0].shape[-2:]
        return int(h), int(w)

    def batch_key(self) -> tuple:
        """Requests with equal keys can be denoised as one batch (everything else is per sample)."""
        return (int(self.steps), self.resolution, float(self.guidance), float(self.eta), float(self.strength),
                float(self.tau), self.sampler, self.people, tuple(check_person_strength(self.person_strength,
                                                                                        self.people)))

    def validate(self, latent_channels: int) -> None:
        limits.check_sampling(self.steps, self.guidance, self.eta, self.strength, self.tau, self.sampler)
        check_sampler_args(self.sampler, self.steps, self.eta)
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) \
                or not 1 <= self.num_samples <= limits.MAX_NUM_SAMPLES:
            raise ValueError(f"num_samples must be an integer in [1, {limits.MAX_NUM_SAMPLES}], got {self.num_samples!r}")
        self.sample_seeds()
        hints, contexts = as_people(self.hint, self.identity_context)
        check_person_strength(self.person_strength, len(hints))
        for hint in hints:
            if hint.ndim != 4 or hint.shape[1] != 9 or hint.shape[0] not in (1, self.num_samples):
                raise ValueError(f"hint must be [1, 9, H, W], got {tuple(hint.shape)}")
            if hint.shape[-2:] != hints[0].shape[-2:]:
                raise ValueError(f"every person's hint has the image's size: {tuple(hint.shape[-2:])} "
                                 f"against {tuple(hints[0].shape[-2:])}")
        for ctx in contexts:
            if ctx.ndim != 3 or ctx.shape[0] not in (1, self.num_samples):
                raise ValueError(f"identity context must be [1, tokens, C], got {tuple(ctx.shape)}")
        h, w = self.resolution
        limits.check_resolution("height", h)
        limits.check_resolution("width", w)
        if not all(torch.isfinite(hint).all() for hint in hints):
            raise ValueError("hint contains NaN or infinite values")
        if not all(torch.isfinite(ctx).all() for ctx in contexts):
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


def tensor_hash(t: torch.Tensor) -> str:
    """Short content hash of a tensor (the metadata's hint and identity hashes)."""
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def file_hash(path: str | Path | None) -> str | None:
    """Short content hash of a weights file (`caphuman.runtime.provenance.file_record`'s: whole files up to
    64 MiB, first/last 16 MiB + size above, fast on multi-GB files)."""
    if not path:
        return None
    from .provenance import file_record
    record = file_record(path)
    return (record.get("sha256") or record["sha256_head_tail"])[:16]


# ------------------------------------------------------------------------------------ networks
@dataclass
class Networks:
    """The loaded PyTorch modules of a pipeline, and where their weights came from."""
    config: CapHumanConfig
    text_encoder: TextEncoder
    denoiser: CapHumanDenoiser
    vae: VAE
    image_encoder: ImageEncoder | None = None
    model_hashes: dict = field(default_factory=dict)
    random_weights: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def to(self, device, dtype: torch.dtype | None = None) -> "Networks":
        """Move every module (the denoiser's schedule stays float32)."""
        for m in (self.text_encoder, self.vae, self.image_encoder):
            if m is not None:
                m.to(device, dtype) if dtype is not None else m.to(device)
        schedule = self.denoiser.alphas_cumprod.detach().float().cpu().clone()
        self.denoiser.to(device, dtype) if dtype is not None else self.denoiser.to(device)
        self.denoiser.alphas_cumprod = schedule.to(device)
        return self


def load_networks(config_path, checkpoint, sd_checkpoint=None, vae_checkpoint=None, clip_dir=None, device="cpu",
                  dtype=torch.float32, with_image_encoder: bool = False) -> Networks:
    """All networks from the official files, in the official order and precedence; or from one merged
    weights file (`checkpoint`, `caphuman.export.merged_weights`), read and built on `device` directly."""
    from caphuman.export.merged_weights import merged_metadata, read_merged_weights

    config = load_config(config_path)
    merged = merged_metadata(checkpoint)
    if merged is not None and (sd_checkpoint or vae_checkpoint):
        raise ValueError(f"{checkpoint} already merges an SD and a VAE checkpoint ({sorted(merged['sources'])}); "
                         "give the merged file alone, or the separate files")
    if merged is not None:
        state, _ = read_merged_weights(checkpoint, config_path, device)
        place = torch.device(device)  # the modules are made where their weights are: no host copy
        hashes = {k: v.get("short") for k, v in merged["sources"].items()} | {"merged": file_hash(checkpoint)}
    else:
        state = read_official(checkpoint, sd_checkpoint, vae_checkpoint)
        place = contextlib.nullcontext()
        hashes = {"checkpoint": file_hash(checkpoint), "sd_checkpoint": file_hash(sd_checkpoint),
                  "vae_checkpoint": file_hash(vae_checkpoint)}
    if with_image_encoder and not any(k.startswith(VISION_PREFIX) for k in state) and clip_dir:
        state.update(clip_folder_state(clip_dir, "vision_model"))
    with place:
        den = denoiser_from_state(config, state, dtype)
        text = text_encoder_from_state(config, state, clip_dir, dtype)
        vae = vae_from_state(config, state, dtype)
        image = image_encoder_from_state(config, state, dtype) if with_image_encoder else None
    return Networks(config, text, den, vae, image, {k: v for k, v in hashes.items() if v}).to(device)


def random_networks(config_name: str = "cldm_tiny", seed: int = 0, device="cpu",
                    with_image_encoder: bool = True) -> Networks:
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
    image = None
    if with_image_encoder:
        torch.manual_seed(seed + 1)  # its own stream: the same encoder whichever networks are built with it
        image = ImageEncoder(config.vision_clip).eval().requires_grad_(False)
    label = "tiny" if config_name == "cldm_tiny" else config_name
    return Networks(config, text, den.requires_grad_(False), vae.requires_grad_(False), image,
                    {"weights": f"{label}-random-seed{seed}"}, random_weights=True).to(device)


def random_face_networks(seed: int = 0, device="cpu"):
    """(FaceNet, BiSeNet) with seeded RANDOM weights: the identity networks of the random-weight demo, the same
    in the CLI and the server."""
    from caphuman.export.face.bisenet import BiSeNet
    from caphuman.export.face.facenet import InceptionResnetV1
    torch.manual_seed(seed + 2)
    return InceptionResnetV1().eval().to(device), BiSeNet().eval().to(device)


# ------------------------------------------------------------------------------------ pipeline
class CapHumanPipeline:
    """Text encoder + a denoiser engine + VAE (+ the denoiser module's identity projections and the CLIP
    image encoder, for identity from photos). The engine is fixed at construction."""

    def __init__(self, networks: Networks, engine: DenoiserEngine, text_cache_entries: int = 64):
        self.networks = networks
        self.engine = engine
        self.config = networks.config
        self.text_encoder, self.vae, self.image_encoder = networks.text_encoder, networks.vae, networks.image_encoder
        self.denoiser = networks.denoiser
        self.model_hashes, self.random_weights = networks.model_hashes, networks.random_weights
        p = next(self.text_encoder.parameters())
        self.device, self.dtype = p.device, p.dtype
        # Prompts through `caphuman.runtime.condition.text.PromptEncoder` (the empty negative prompt encoded once;
        # on CUDA the text tower replayed from a graph where that is bit-identical), and the last prompts' embeddings
        self._prompts: PromptEncoder | None = None
        self._text: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_entries = text_cache_entries
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        return self.engine.backend

    def prompt_encoder(self) -> PromptEncoder:
        with self._lock:
            if self._prompts is None:
                from .condition.text import PromptEncoder
                self._prompts = PromptEncoder(self.text_encoder, graph=self.device.type == "cuda", exact=True)
            return self._prompts

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """[1, 77, C] in the pipeline's dtype: one prompt, encoded alone, cached by text."""
        with self._lock:
            emb = self._text.get(prompt)
            if emb is not None:
                self._text.move_to_end(prompt)
                return emb
        emb = self.prompt_encoder()(prompt).to(self.dtype)
        with self._lock:
            self._text[prompt] = emb
            while len(self._text) > self._text_entries:
                self._text.popitem(last=False)
        return emb

    @torch.no_grad()
    def denoise(self, requests: Sequence[GenerationRequest], *, cfg: str = "batched", batch_size: int | None = None,
                callback: StepCallback | None = None) -> torch.Tensor:
        """Final latents of every sample of compatible requests (equal `batch_key`), as one batch, in order.
        `batch_size` pads the batch (repeating its last sample) to a size the engine has prepared."""
        latent_ch = self.config.unet.in_channels
        if not requests:
            raise ValueError("no requests to denoise")
        for r in requests:
            r.validate(latent_ch)
        key = requests[0].batch_key()
        if any(r.batch_key() != key for r in requests):
            raise ValueError("requests denoised together need equal steps, resolution, guidance, eta, strength, "
                             "tau, sampler and people")
        g0 = requests[0]
        h, w = g0.resolution
        people = g0.people
        seeds, noise, text = [], [], []
        hints, ctxs = [[] for _ in range(people)], [[] for _ in range(people)]   # per person, per request
        for r in requests:
            s = r.sample_seeds()
            seeds += s
            noise.append(r.noise if r.noise is not None else initial_noise(s, (latent_ch, h // 8, w // 8)))
            text += [self.encode_prompt(r.full_prompt())] * r.num_samples
            for p, (hint, ctx) in enumerate(zip(r.hints, r.contexts)):
                hints[p].append(hint.expand(r.num_samples, -1, -1, -1))
                ctxs[p].append(ctx.expand(r.num_samples, -1, -1))
        n = len(seeds)
        pad = (batch_size or n) - n
        if pad < 0:
            raise ValueError(f"{n} samples do not fit a batch of {batch_size}")
        seeds += [seeds[-1]] * pad
        noise = torch.cat(noise + [noise[-1][-1:]] * pad)
        text += [text[-1]] * pad
        hint = [torch.cat(hs + [hs[-1][-1:]] * pad).to(self.device, self.dtype) for hs in hints]
        ctx = [torch.cat(cs + [cs[-1][-1:]] * pad).to(self.device, self.dtype) for cs in ctxs]
        uncond = torch.cat([self.encode_prompt(r.negative_prompt) for r in requests for _ in range(r.num_samples)]
                           + [self.encode_prompt(requests[-1].negative_prompt)] * pad)
        cond = Conditioning(torch.cat(text), uncond, hint[0] if people == 1 else hint, ctx[0] if people == 1 else ctx,
                            guidance=float(g0.guidance), strength=g0.strength, tau=float(g0.tau), cfg=cfg,
                            person_strength=g0.person_strength)
        generators = [torch.Generator("cpu").manual_seed(s + 1) for s in seeds]
        latents = sample(self.engine, noise.to(self.device), cond, steps=g0.steps, sampler=g0.sampler, eta=g0.eta,
                         generators=generators, callback=callback)
        return latents[:n]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """uint8 [H, W, 3] images of latents [N, 4, h, w] (the official conversion)."""
        return latents_to_uint8(self.vae.decode(latents.to(self.device, self.dtype)))

    def parameters(self, req: GenerationRequest, cfg: str = "batched", hint_sha256: str | None = None,
                   identity_sha256: str | None = None) -> dict:
        """The generation parameters of one request, as its images' metadata reports them (the one place
        they are assembled; hashes may be passed in when the caller already knows them)."""
        params = {k: getattr(req, k) for k in req.__dataclass_fields__ if k not in ("hint", "identity_context", "noise")}
        h, w = req.resolution
        one = req.people == 1
        params.update(seeds=req.sample_seeds(), cfg=cfg, backend=self.backend, width=w, height=h,
                      dtype=str(self.dtype).removeprefix("torch."), config=Path(self.config.path).name,
                      people=req.people,
                      hint_sha256=hint_sha256 or (tensor_hash(req.hints[0]) if one else [tensor_hash(x) for x in req.hints]),
                      identity_sha256=identity_sha256 or (tensor_hash(req.contexts[0]) if one
                                                          else [tensor_hash(x) for x in req.contexts]),
                      noise="explicit" if req.noise is not None else "cpu-generator-per-seed",
                      models=self.model_hashes, random_weights=self.random_weights,
                      engine={"backend": self.backend, **getattr(self.engine, "artifacts", {})},
                      controlnets=[{"scale": c.scale, "hint_sha256": tensor_hash(c.hint)}
                                   for c in self.denoiser.extra_controls])
        return params

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[GenerationRequest], cfg: str = "batched",
                       callback: StepCallback | None = None) -> list[GenerationResult]:
        """One result per request, its samples denoised together with every other request's."""
        latents = self.denoise(requests, cfg=cfg, callback=callback)
        images = self.decode(latents)
        out, k = [], 0
        for r in requests:
            out.append(GenerationResult(images[k:k + r.num_samples], latents[k:k + r.num_samples], r.sample_seeds(),
                                        self.parameters(r, cfg)))
            k += r.num_samples
        return out

    def generate(self, req: GenerationRequest, cfg: str = "batched",
                 callback: StepCallback | None = None) -> GenerationResult:
        return self.generate_batch([req], cfg=cfg, callback=callback)[0]


def build_pipeline(networks: Networks, backend: str = "eager", *, device=None, dtype: torch.dtype | None = None,
                   engine_dir: str | Path | None = None, **torch_options) -> CapHumanPipeline:
    """Put the networks on `device` in `dtype` (default: where they are) and build `backend`'s engine
    through the factory. The graph backends run fp32 graphs; the text encoder and VAE stay in PyTorch."""
    p = next(networks.denoiser.parameters())
    device = torch.device(device) if device is not None else p.device
    dtype = dtype or p.dtype
    networks.to(device, dtype)
    engine = create_engine(backend, networks.denoiser, device=device, dtype=dtype, engine_dir=engine_dir,
                           **torch_options)
    return CapHumanPipeline(networks, engine)


def load_pipeline(config_path, checkpoint, sd_checkpoint=None, vae_checkpoint=None, clip_dir=None, device="cpu",
                  dtype=torch.float32, with_image_encoder: bool = False, backend: str = "eager",
                  **engine_options) -> CapHumanPipeline:
    """`load_networks` + `build_pipeline`."""
    nets = load_networks(config_path, checkpoint, sd_checkpoint, vae_checkpoint, clip_dir, device, dtype,
                         with_image_encoder)
    return build_pipeline(nets, backend, device=device, dtype=dtype, **engine_options)


def random_pipeline(config_name: str = "cldm_tiny", seed: int = 0, device="cpu", backend: str = "eager",
                    **engine_options) -> CapHumanPipeline:
    """`random_networks` + `build_pipeline`: seeded RANDOM weights."""
    return build_pipeline(random_networks(config_name, seed, device), backend, device=device, **engine_options)


def tiny_random_pipeline(seed: int = 0, device="cpu", backend: str = "eager", **engine_options) -> CapHumanPipeline:
    """The built-in demo: the tiny config with seeded RANDOM weights."""
    return random_pipeline("cldm_tiny", seed=seed, device=device, backend=backend, **engine_options)


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
