"""The inputs of `caphuman generate` as tensors: .npy files, the identity context (from a photo, features or
random for the demo), the head hint (from photos and controls, or the template head) and an extra ControlNet.
Heavy (torch); `generate_cli` imports it only once the arguments have been checked."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .condition_cli import build_condition

log = logging.getLogger(__name__)

MAX_NPY_BYTES = 256 << 20  # inputs are small tensors; refuse anything absurd before reading it


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


def identity_from_photo(args, nets, photo) -> torch.Tensor:
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
    from caphuman.runtime.cli import UserError
    from caphuman.runtime.condition import NoFaceError
    try:
        with torch.no_grad():
            return identity_context(nets.denoiser, facenet, bisenet, nets.image_encoder, photo,
                                    fallback=args.allow_no_face).float().cpu()
    except NoFaceError as e:
        raise UserError(f"{e}: --allow-no-face") from None


def identity(args, nets, rng_seed: int, photo=None) -> torch.Tensor:
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
        return identity_from_photo(args, nets, photo)
    if not nets.random_weights:
        raise ValueError("real weights need an identity: --reference, --identity-context, "
                         "or --id-features with --clip-tokens")
    g = torch.Generator().manual_seed(rng_seed)
    p = next(den.parameters())
    with torch.no_grad():
        tokens = torch.randn(1, 257, nets.config.img_linear_dim, generator=g)
        fid = torch.nn.functional.normalize(torch.randn(1, nets.config.id_dim, generator=g), dim=-1)
        return den.project_identity(tokens.to(p), fid.to(p)).float().cpu()


def add_controlnet(args, nets, size) -> None:
    from caphuman.export.config import packaged_config
    from caphuman.export.models import load_controlnet
    from PIL import Image
    path = Path(args.controlnet_hint)  # given, a file, strength finite: generate_cli.check_arguments
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


def hint_from_photos(args):
    """(hint [1, 9, H, W], reference photo or None, pose photo or None): from --reference/--pose and head
    controls, or the template head (frontal) without photos. Rendered at 512x512 as the official code does
    (other sizes: `caphuman condition` + --hint). The arguments were checked by `generate_cli.check_arguments`."""
    from caphuman.runtime.condition import HeadControls
    if args.reference:
        cond, ref, pose, _builder, _controls = build_condition(args)
        for note in cond.notes:
            log.info("%s", note)
        return torch.from_numpy(np.asarray(cond.hint, dtype=np.float32))[None], ref, pose
    from caphuman.runtime.condition.codes import HeadCode
    from caphuman.runtime.condition.controls import DEFAULT_LIGHT, light_sh
    from caphuman.runtime.condition.head import load_head_model
    from caphuman.runtime.condition.hint import build_head_condition
    controls = HeadControls(yaw=args.yaw, pitch=args.pitch, roll=args.roll, jaw=args.jaw, expression=args.expression,
                            center=tuple(args.center) if args.center else None, scale=args.scale, light=args.light)
    head = load_head_model(args.flame_model, args.flame_texture)
    cond = build_head_condition(head, HeadCode.neutral(light_sh(DEFAULT_LIGHT)), controls=controls,
                                size=args.resolution)
    return torch.from_numpy(np.asarray(cond.hint, dtype=np.float32))[None], None, None
