"""`caphuman generate`: prompt + head hint + identity -> PNG images with JSON sidecars."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from caphuman.engines.factory import BACKENDS
from caphuman.engines.samplers import DEFAULT_SAMPLER, SAMPLERS, check_sampler_args, make_plan

from .condition_cli import add_head_arguments, build_condition
from .outputs import save_png_with_sidecar
from . import limits
from .pipeline import GenerationRequest, build_pipeline, load_networks, random_networks

log = logging.getLogger(__name__)

MAX_NPY_BYTES = 256 << 20  # inputs are small tensors; refuse anything absurd before reading it

RANDOM_WEIGHTS_NOTICE = """\
NOTE: no --checkpoint given, so this runs the BUILT-IN TINY MODEL WITH RANDOM WEIGHTS.
      The output is a pattern, not a photo: it shows the runtime works end to end.
      For real images, get the official weights (see README, "Official weights") and run e.g.
        caphuman generate --checkpoint ckpts/caphuman.ckpt --sd-checkpoint ckpts/Realistic_Vision_V3.0.ckpt \\
            --vae-checkpoint ckpts/vae-ft-mse-840000-ema-pruned.ckpt --clip-dir ckpts/clip-vit-large-patch14 \\
            --facenet-weights ckpts/vggface2.pt --bisenet-weights ckpts/face-parsing/79999_iter.pth \\
            --reference me.jpg --pose pose.jpg --prompt "a photo of a man in a garden"
"""


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate images (runs a tiny random-weight demo when no weights are given)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Generate photos of one person: a text prompt, a head condition (the 9-channel FLAME hint) "
                    "and an identity context. Without --checkpoint it runs a tiny built-in model with random "
                    "weights, to check the installation.")
    w = p.add_argument_group("weights (official files; all optional for the demo)")
    w.add_argument("--config", help="official-format config (default: the packaged cldm_v15.yaml)")
    w.add_argument("--checkpoint", help="caphuman.ckpt (Lightning or bare state dict)")
    w.add_argument("--sd-checkpoint", help="SD1.x .ckpt/.safetensors whose UNet, VAE and text encoder override")
    w.add_argument("--vae-checkpoint", help="VAE .ckpt (e.g. vae-ft-mse-840000-ema-pruned.ckpt), overrides the VAE")
    w.add_argument("--clip-dir", help="local openai/clip-vit-large-patch14 folder (tokenizer files)")
    c = p.add_argument_group("conditions")
    c.add_argument("--prompt", default="a photo of a person, best quality", help="text prompt")
    c.add_argument("--added-prompt", default="", help="appended as 'PROMPT, ADDED' (official --a_prompt)")
    c.add_argument("--negative-prompt", default="", help="negative prompt (the unconditional branch)")
    c.add_argument("--hint", help="raw head hint as .npy [9,H,W] or [1,9,H,W] (from `caphuman condition`); "
                                   "default: rendered from --reference/--pose, else the template head, frontal")
    c.add_argument("--identity-context", help=".npy [258,C] identity context (projected)")
    c.add_argument("--id-features", help=".npy [512] FaceNet embedding (with --clip-tokens)")
    c.add_argument("--clip-tokens", help=".npy [257,1024] CLIP image tokens of the parsed face (with --id-features)")
    c.add_argument("--controlnet-checkpoint", help="an extra standard ControlNet (e.g. control_v11p_sd15_openpose.pth), "
                                                   "added unmasked next to CapFace (official openpose option)")
    c.add_argument("--controlnet-config", help="its ldm config (default: packaged controlnet_sd15_openpose.yaml)")
    c.add_argument("--controlnet-hint", help="its condition image (e.g. an openpose map), RGB, resized to the output size")
    c.add_argument("--controlnet-strength", type=float, default=1.0, help="its residual scale")
    h = p.add_argument_group("photos and head controls (as `caphuman condition`; the hint and identity come from them)")
    add_head_arguments(h, reference_required=False)
    h.add_argument("--facenet-weights", help="FaceNet VGGFace2 weights (20180402-114759-vggface2.pt) for the identity")
    h.add_argument("--bisenet-weights", help="BiSeNet face parsing weights (79999_iter.pth) for the identity")
    s = p.add_argument_group("sampling")
    s.add_argument("--sampler", choices=sorted(SAMPLERS), default=DEFAULT_SAMPLER,
                   help="; ".join(f"{name}: {SAMPLERS[name].doc}" for name in sorted(SAMPLERS)))
    s.add_argument("--steps", type=int, default=20, help="denoising steps (official DDIM: 20)")
    s.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    s.add_argument("--strength", type=float, default=1.0, help="CapFace residual scale")
    s.add_argument("--tau", type=float, default=0.0, help="ID dropout: identity context off for timesteps > tau (0 = off)")
    s.add_argument("--seed", type=int, default=12345, help="seed of the first sample (next ones: seed+1, ...)")
    s.add_argument("--num-samples", type=int, default=1, help="images per prompt")
    s.add_argument("--resolution", type=int, default=512, help="size of the built-in hint when --hint is not given")
    s.add_argument("--noise", help=".npy initial noise [N,4,h,w] for bit-exact comparisons")
    s.add_argument("--cfg", choices=["batched", "serial"], default="batched",
                   help="batched: CapFace once + UNet at batch 2 per step; serial: the official way (reference mode)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--fp16", action="store_true", help="run the networks in float16 (GPU)")
    r.add_argument("--backend", choices=BACKENDS, default="eager",
                   help="denoiser backend: eager PyTorch modules (with --cfg serial: the reference mode), the torch "
                        "engine (CUDA graphs, Triton attention), ONNX Runtime, or TensorRT engines (docs/engines.md)")
    r.add_argument("--engine-dir", help="ONNX graphs (onnxruntime) or `caphuman build` engines (tensorrt, "
                                         "tensorrt-rtx)")
    r.add_argument("--out", default="outputs", help="output folder")
    r.add_argument("--name", default="caphuman", help="file name prefix")
    p.set_defaults(func=run)


def load_npy(path: str, what: str, ndim: tuple[int, ...]) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    if p.stat().st_size > MAX_NPY_BYTES:
        raise ValueError(f"{what} file {p} is larger than {MAX_NPY_BYTES >> 20} MiB")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{what} file {p} is not a readable .npy array ({e})") from e
    if arr.ndim not in ndim:
        raise ValueError(f"{what} in {p} has shape {arr.shape}; expected {' or '.join(f'{d}-D' for d in ndim)}")
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} in {p} contains NaN or infinite values")
    return t


def _identity_from_photo(args, nets, photo) -> torch.Tensor:
    """FaceNet + BiSeNet-parsed CLIP tokens of the reference photo, projected (caphuman.runtime.condition.identity)."""
    from caphuman.export.face.bisenet import load_bisenet
    from caphuman.export.face.facenet import load_facenet
    from caphuman.runtime.condition.identity import identity_context
    from caphuman.runtime.pipeline import random_face_networks
    if nets.image_encoder is None:
        raise ValueError("the identity from a photo needs the CLIP image encoder (in caphuman.ckpt)")
    if not nets.random_weights and not (args.facenet_weights and args.bisenet_weights):
        raise ValueError("--reference with real weights needs --facenet-weights and --bisenet-weights "
                         "(or pass --identity-context)")
    facenet, bisenet = random_face_networks()  # the demo's random stand-ins, the server's too
    if args.facenet_weights:
        facenet = load_facenet(args.facenet_weights).eval()
    if args.bisenet_weights:
        bisenet = load_bisenet(args.bisenet_weights).eval()
    facenet, bisenet = facenet.to(nets.device), bisenet.to(nets.device)
    with torch.no_grad():
        return identity_context(nets.denoiser, facenet, bisenet, nets.image_encoder, photo).float().cpu()


def _identity(args, nets, rng_seed: int, photo=None) -> torch.Tensor:
    den = nets.denoiser
    if args.identity_context:
        ctx = load_npy(args.identity_context, "identity context", (2, 3))
        ctx = ctx[None] if ctx.ndim == 2 else ctx
        if ctx.shape[-1] != nets.config.context_dim:
            raise ValueError(f"identity context width {ctx.shape[-1]} != the model's {nets.config.context_dim}")
        return ctx
    if args.id_features or args.clip_tokens:
        if not (args.id_features and args.clip_tokens):
            raise ValueError("--id-features and --clip-tokens go together")
        fid = load_npy(args.id_features, "FaceNet features", (1, 2)).reshape(1, -1)
        tokens = load_npy(args.clip_tokens, "CLIP tokens", (2, 3))
        tokens = tokens[None] if tokens.ndim == 2 else tokens
        if fid.shape[-1] != nets.config.id_dim or tokens.shape[-1] != nets.config.img_linear_dim:
            raise ValueError(f"need FaceNet [{nets.config.id_dim}] and CLIP tokens [257,{nets.config.img_linear_dim}], "
                             f"got {tuple(fid.shape)} and {tuple(tokens.shape)}")
        with torch.no_grad():
            p = next(den.parameters())
            return den.project_identity(tokens.to(p), fid.to(p)).float().cpu()
    if photo is not None:
        return _identity_from_photo(args, nets, photo)
    if not nets.random_weights:
        raise ValueError("real weights need an identity: --reference, --identity-context, "
                         "or --id-features with --clip-tokens")
    g = torch.Generator().manual_seed(rng_seed)
    p = next(den.parameters())
    with torch.no_grad():
        tokens = torch.randn(1, 257, nets.config.img_linear_dim, generator=g)
        fid = torch.nn.functional.normalize(torch.randn(1, nets.config.id_dim, generator=g), dim=-1)
        return den.project_identity(tokens.to(p), fid.to(p)).float().cpu()


def _add_controlnet(args, nets, size) -> None:
    from PIL import Image

    from caphuman.export.config import packaged_config
    from caphuman.export.models import load_controlnet
    if not args.controlnet_hint:
        raise ValueError("--controlnet-checkpoint needs --controlnet-hint (its condition image)")
    if not np.isfinite(args.controlnet_strength):
        raise ValueError("--controlnet-strength must be finite")
    path = Path(args.controlnet_hint)
    if not path.is_file():
        raise FileNotFoundError(f"ControlNet hint image not found: {path}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > 4096 * 4096:
                raise ValueError(f"{path} is {im.width}x{im.height}, over the 4096x4096 limit")
            im = im.convert("RGB").resize((int(size[1]), int(size[0])), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path} is not a readable image ({e})") from e
    net = load_controlnet(args.controlnet_config or packaged_config("controlnet_sd15_openpose"),
                          args.controlnet_checkpoint, dtype=nets.dtype).to(nets.device)
    hint = torch.from_numpy(arr.transpose(2, 0, 1).copy())[None].to(nets.device, nets.dtype)
    nets.denoiser.add_controlnet(net, hint, args.controlnet_strength)


def _hint_from_photos(args):
    """The head hint from --reference/--pose and head controls, or the template head (frontal) without
    photos. Rendered at 512x512 as the official code does (other sizes: `caphuman condition` + --hint)."""
    from caphuman.runtime.condition import HeadControls
    if args.reference and args.resolution != 512:
        raise ValueError(f"--resolution must be 512 with --reference (the official hint size); got {args.resolution}")
    limits.check_resolution("--resolution", args.resolution)
    if args.reference:
        cond, ref, _pose, builder, _controls = build_condition(args)
        for note in cond.notes:
            log.info("%s", note)
        return torch.from_numpy(np.asarray(cond.hint, dtype=np.float32))[None], ref
    if args.pose:
        raise ValueError("--pose needs --reference")
    from caphuman.runtime.condition.codes import HeadCode
    from caphuman.runtime.condition.controls import DEFAULT_LIGHT, light_sh
    from caphuman.runtime.condition.head import load_head_model
    from caphuman.runtime.condition.hint import build_head_condition
    controls = HeadControls(yaw=args.yaw, pitch=args.pitch, roll=args.roll, jaw=args.jaw, expression=args.expression,
                            center=tuple(args.center) if args.center else None, scale=args.scale, light=args.light)
    head = load_head_model(args.flame_model, args.flame_texture)
    cond = build_head_condition(head, HeadCode.neutral(light_sh(DEFAULT_LIGHT)), controls=controls,
                                size=args.resolution)
    return torch.from_numpy(np.asarray(cond.hint, dtype=np.float32))[None], None


def _check_arguments(args) -> None:
    """Everything that needs no model, before any is loaded."""
    if args.checkpoint is None and (args.sd_checkpoint or args.vae_checkpoint):
        raise ValueError("--sd-checkpoint/--vae-checkpoint need --checkpoint (caphuman.ckpt) too")
    if args.fp16 and args.device == "cpu":
        raise ValueError("--fp16 needs a GPU (--device cuda)")
    limits.check_sampling(args.steps, args.guidance, args.eta, args.strength, args.tau, args.sampler,
                          names={k: f"--{k}" for k in ("steps", "guidance", "eta", "strength", "tau", "sampler")})
    check_sampler_args(args.sampler, args.steps, args.eta)
    limits.check_seed("--seed", args.seed)
    if not 1 <= args.num_samples <= limits.MAX_NUM_SAMPLES:
        raise ValueError(f"--num-samples must be in [1, {limits.MAX_NUM_SAMPLES}], got {args.num_samples}")


def run(args) -> int:
    _check_arguments(args)
    dtype = torch.float16 if args.fp16 else torch.float32
    t0 = time.perf_counter()
    if args.checkpoint is None:
        print(RANDOM_WEIGHTS_NOTICE)
        nets = random_networks("cldm_tiny", device=args.device)
    else:
        from caphuman.export.config import packaged_config
        nets = load_networks(args.config or packaged_config("cldm_v15"), args.checkpoint, args.sd_checkpoint,
                             args.vae_checkpoint, args.clip_dir, device=args.device, dtype=dtype,
                             with_image_encoder=bool(args.reference) and not args.identity_context)
    log.info("models ready in %.1f s", time.perf_counter() - t0)

    photo = None
    if args.hint:
        hint = load_npy(args.hint, "hint", (3, 4))
        hint = hint[None] if hint.ndim == 3 else hint
    else:
        hint, photo = _hint_from_photos(args)
    noise = load_npy(args.noise, "noise", (4,)) if args.noise else None
    if args.controlnet_checkpoint:
        _add_controlnet(args, nets, hint.shape[-2:])
    req = GenerationRequest(prompt=args.prompt, added_prompt=args.added_prompt, negative_prompt=args.negative_prompt,
                            hint=hint, identity_context=_identity(args, nets, args.seed, photo), seed=args.seed,
                            num_samples=args.num_samples, steps=args.steps, guidance=args.guidance, eta=args.eta,
                            strength=args.strength, tau=args.tau, sampler=args.sampler, noise=noise)
    req.validate(nets.config.unet.in_channels)
    pipe = build_pipeline(nets, args.backend, device=args.device, dtype=dtype, engine_dir=args.engine_dir)

    total = make_plan(args.sampler, nets.denoiser.alphas_cumprod, args.steps, args.eta).num_steps
    bar = tqdm(total=total, desc=f"denoising ({pipe.backend}, {args.sampler})", unit="step")

    def progress(_i, _total, _x):
        bar.update(1)

    t1 = time.perf_counter()
    result = pipe.generate(req, cfg=args.cfg, callback=progress)
    bar.close()
    result.parameters["seconds"] = round(time.perf_counter() - t1, 3)
    for image, seed in zip(result.images, result.seeds):
        png, sidecar = save_png_with_sidecar(image, Path(args.out) / f"{args.name}_{seed}.png",
                                             {**result.parameters, "seed": seed})
        print(f"wrote {png} and {sidecar.name}")
    return 0
