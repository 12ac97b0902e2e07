"""`caphuman generate`: prompt + head hint + identity -> PNG images with JSON sidecars."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from caphuman.engines.catalog import BACKENDS

from . import limits
from .cli import HelpFormatter, StoreOnce, UserError, add_sampling_arguments
from .condition_cli import add_head_arguments
from .outputs import check_new_outputs
from .people_cli import add_person_argument, people_from_args
from .weights_layout import use_weights_folder

log = logging.getLogger(__name__)

# Options naming input files or folders: checked to exist before any model loads, and recorded with their
# content hashes in every sidecar.
FILE_OPTIONS = ("config", "checkpoint", "sd_checkpoint", "vae_checkpoint", "clip_dir", "hint", "identity_context",
                "id_features", "clip_tokens", "controlnet_checkpoint", "controlnet_config", "controlnet_hint",
                "reference", "pose", "deca_model", "flame_model", "flame_texture", "facenet_weights",
                "bisenet_weights", "noise")
FOLDER_OPTIONS = ("clip_dir", "weights")
TINY_CONFIG = "cldm_tiny"

RANDOM_WEIGHTS_NOTICE = f"""\
NOTE: no --checkpoint or --weights given, so this runs the BUILT-IN TINY MODEL (the packaged {TINY_CONFIG}.yaml)
      WITH RANDOM WEIGHTS. The output is a pattern, not a photo: it shows the runtime works end to end.
      For real images, put the official weights in one folder (see README, "Official weights") and run e.g.
        caphuman generate --weights ckpts/ --reference me.jpg --pose pose.jpg --prompt "a photo of a man in a garden"
"""


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate images (runs a tiny random-weight demo when no weights are given)",
        formatter_class=HelpFormatter,
        description="Generate photos of one person: a text prompt, a head condition (the 9-channel FLAME hint) "
                    f"and an identity context. Without --checkpoint or --weights it runs the built-in tiny model "
                    f"(the packaged {TINY_CONFIG}.yaml) with random weights, to check the installation. Writes "
                    "OUT/NAME_SEED.png and NAME_SEED.json (every input, with content hashes); existing files are "
                    "refused unless --overwrite.")
    w = p.add_argument_group("weights (official files; all optional for the demo)")
    w.add_argument("--weights", metavar="DIR",
                   help="folder of the official files under their official names, the layout of `caphuman serve "
                        "--weights` (caphuman.ckpt, SD/VAE checkpoints, clip-vit-large-patch14/, FaceNet, BiSeNet, "
                        "DECA, FLAME); a file flag given as well overrides its file")
    w.add_argument("--config", help="official-format config (default: the packaged cldm_v15.yaml with weights, "
                                    f"{TINY_CONFIG}.yaml for the random-weight demo)")
    w.add_argument("--checkpoint", help="caphuman.ckpt (Lightning or bare state dict)")
    w.add_argument("--sd-checkpoint", help="SD1.x .ckpt/.safetensors whose UNet, VAE and text encoder override")
    w.add_argument("--vae-checkpoint", help="VAE .ckpt (e.g. vae-ft-mse-840000-ema-pruned.ckpt), overrides the VAE")
    w.add_argument("--clip-dir", help="local openai/clip-vit-large-patch14 folder (tokenizer files)")
    c = p.add_argument_group("conditions")
    c.add_argument("--prompt", default="a photo of a person, best quality", help="text prompt")
    c.add_argument("--added-prompt", default="", help="appended as 'PROMPT, ADDED' (official --a_prompt)")
    c.add_argument("--negative-prompt", default="", help="negative prompt (the unconditional branch)")
    c.add_argument("--hint", action=StoreOnce, help="raw head hint as .npy [9,H,W] or [1,9,H,W] (from `caphuman condition`); "
                                   "default: rendered from --reference/--pose, else the template head, frontal")
    c.add_argument("--identity-context", action=StoreOnce, help=".npy [258,C] identity context (projected)")
    c.add_argument("--id-features", action=StoreOnce, help=".npy [512] FaceNet embedding (with --clip-tokens)")
    c.add_argument("--clip-tokens", action=StoreOnce, help=".npy [257,1024] CLIP image tokens of the parsed face (with --id-features)")
    c.add_argument("--controlnet-checkpoint", help="an extra standard ControlNet (e.g. control_v11p_sd15_openpose.pth), "
                                                   "added unmasked next to CapFace (official openpose option)")
    c.add_argument("--controlnet-config", help="its ldm config (default: packaged controlnet_sd15_openpose.yaml)")
    c.add_argument("--controlnet-hint", help="its condition image (e.g. an openpose map), RGB, resized to the output size")
    c.add_argument("--controlnet-strength", type=float, default=1.0, help="its residual scale")
    h = p.add_argument_group("photos and head controls (as `caphuman condition`; the hint and identity come from them)")
    add_head_arguments(h, reference_required=False)
    add_person_argument(h)
    h.add_argument("--facenet-weights", help="FaceNet VGGFace2 weights (20180402-114759-vggface2.pt) for the identity")
    h.add_argument("--bisenet-weights", help="BiSeNet face parsing weights (79999_iter.pth) for the identity")
    s = p.add_argument_group("sampling")
    add_sampling_arguments(s)
    s.add_argument("--seed", type=int, default=12345, help="seed of the first sample (next ones: seed+1, ...)")
    s.add_argument("--num-samples", type=int, default=1,
                   help=f"images per prompt, 1..{limits.MAX_NUM_SAMPLES} (sample i: seed + i)")
    s.add_argument("--resolution", type=int,
                   help=f"image side without --hint (with --hint the image takes the hint's size): "
                        f"{limits.RESOLUTION_RULE}; default and only size with photos: 512")
    s.add_argument("--noise", help=".npy initial noise [N,4,h,w] for bit-exact comparisons")
    s.add_argument("--cfg", choices=["batched", "serial"], default="batched",
                   help="batched: CapFace once + UNet at batch 2 per step; serial: the official way (reference mode)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto: cuda when a GPU is visible, else cpu")
    r.add_argument("--fp16", action="store_true", help="run the networks in float16 (GPU)")
    r.add_argument("--backend", choices=BACKENDS, default="eager",
                   help="denoiser backend: eager PyTorch modules (with --cfg serial: the reference mode), the torch "
                        "engine (CUDA graphs, Triton attention), ONNX Runtime, or TensorRT engines (docs/engines.md)")
    r.add_argument("--engine-dir", help="ONNX graphs (onnxruntime) or `caphuman build` engines (tensorrt, "
                                         "tensorrt-rtx; torch: its compiled artifacts, compiling with them)")
    r.add_argument("--out", default="outputs", help="output folder")
    r.add_argument("--name", default="caphuman", help="file name prefix")
    r.add_argument("--overwrite", action="store_true", help="replace existing output files of the same names")
    p.set_defaults(func=run)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def output_paths(args) -> list[Path]:
    out = Path(args.out)
    return [out / f"{args.name}_{args.seed + i}{suffix}" for i in range(args.num_samples) for suffix in (".png", ".json")]


def _check_files(args) -> None:
    for dest in FILE_OPTIONS + ("weights",):
        value = getattr(args, dest, None)
        if not value:
            continue
        path = Path(value)
        if dest in FOLDER_OPTIONS:
            if not path.is_dir():
                raise FileNotFoundError(f"{_flag(dest)} folder not found: {path}")
        elif not path.is_file():
            raise FileNotFoundError(f"{_flag(dest)} file not found: {path}")
    if args.config:
        from caphuman.export.config import load_config
        load_config(args.config)  # a wrong config file is named before any weights are read
    for dest in ("reference", "pose"):
        if getattr(args, dest):
            check_photo_header(args.__dict__[dest], _flag(dest))
    from caphuman.export.checkpoints import file_format
    for dest in ("checkpoint", "sd_checkpoint", "vae_checkpoint", "controlnet_checkpoint", "facenet_weights",
                 "bisenet_weights", "deca_model"):
        value = getattr(args, dest)
        if value and file_format(value) is None:
            raise UserError(f"{_flag(dest)} {value} is not a PyTorch checkpoint or safetensors file")


def check_photo_header(path, what: str) -> None:
    """A photo's format and size from its header, before any model loads (one line when it is no photo)."""
    from caphuman.runtime.condition.images import PhotoError, open_photo
    try:
        open_photo(path, f"{what} {path}").close()
    except PhotoError as e:
        raise UserError(str(e)) from None


def check_arguments(args) -> None:
    """Everything that needs no model, before any is loaded: one line per problem, nothing written."""
    use_weights_folder(args)
    _check_files(args)
    if args.checkpoint is None and (args.sd_checkpoint or args.vae_checkpoint or args.config):
        raise UserError("--sd-checkpoint, --vae-checkpoint and --config need --checkpoint (caphuman.ckpt) too")
    if args.fp16 and args.device == "cpu":
        raise UserError("--fp16 needs a GPU (--device cuda)")
    limits.check_sampling(args.steps, args.guidance, args.eta, args.strength, args.tau, args.sampler,
                          names={k: f"--{k}" for k in ("steps", "guidance", "eta", "strength", "tau", "sampler")})
    if not 1 <= args.num_samples <= limits.MAX_NUM_SAMPLES:
        raise UserError(f"--num-samples must be in [1, {limits.MAX_NUM_SAMPLES}], got {args.num_samples}")
    limits.check_seed("--seed", args.seed)
    limits.check_seed("--seed + --num-samples - 1", args.seed + args.num_samples - 1)
    if args.hint and args.resolution is not None:
        raise UserError("--resolution does not apply with --hint: the image takes the hint's size")
    if not args.hint:
        args.resolution = 512 if args.resolution is None else args.resolution
        limits.check_resolution("--resolution", args.resolution)
        if (args.reference or args.person) and args.resolution != 512:
            raise UserError(f"--resolution must be 512 with photos (the official hint size); got {args.resolution} "
                            "(other sizes: the template head without photos, or a --hint .npy of that size)")
    if args.pose and not args.reference:
        raise UserError("--pose needs --reference")
    if bool(args.id_features) != bool(args.clip_tokens):
        raise UserError("--id-features and --clip-tokens go together")
    if args.controlnet_checkpoint and not args.controlnet_hint:
        raise UserError("--controlnet-checkpoint needs --controlnet-hint (its condition image)")
    if not math.isfinite(args.controlnet_strength):
        raise UserError("--controlnet-strength must be finite")
    if args.person:
        _check_people_arguments(args)
    identity_given = args.identity_context or args.id_features
    if args.checkpoint and not args.person and not (identity_given or args.reference):
        raise UserError("real weights need an identity: --reference, --identity-context, "
                        "or --id-features with --clip-tokens")
    if args.checkpoint and (args.reference or args.person) and not identity_given \
            and not (args.facenet_weights and args.bisenet_weights):
        raise UserError("--reference with real weights needs --facenet-weights and --bisenet-weights "
                        "(or pass --identity-context)")
    check_new_outputs(output_paths(args), args.overwrite)
    from caphuman.engines.samplers import (
        check_sampler_args,  # needs torch; still no model
    )
    check_sampler_args(args.sampler, args.steps, args.eta)


def _check_people_arguments(args) -> None:
    """--person: no one-person input beside it, every person's photos exist, and real weights have a
    reference photo per person (their identity)."""
    single = [_flag(dest) for dest in ("hint", "identity_context", "id_features", "clip_tokens",
                                        "controlnet_checkpoint") if getattr(args, dest)]
    if single:
        raise UserError(f"{', '.join(single)} {'is' if len(single) == 1 else 'are'} for one person; "
                        "--person takes each person's photos")
    try:
        args.people = people_from_args(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    for i, person in enumerate(args.people, 1):
        for what in ("reference", "pose"):
            path = getattr(person, what)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"--person {i}: {what} file not found: {path}")
            if path is not None:
                check_photo_header(path, f"--person {i}: {what}")
        if person.pose is not None and person.reference is None:
            raise UserError(f"--person {i}: pose= needs reference=")
        if args.checkpoint and person.reference is None:
            raise UserError(f"--person {i}: real weights need each person's reference= photo (their identity)")


def _people_inputs(args, conds, nets, inputs):
    """(hints, identity contexts, CapFace strengths, sidecar record) of the --person options: each
    person's hint in the shared frame (`conds`, built and checked before any model loads), identity from
    their photo (the demo: from seed + 1000 * i)."""
    import numpy as np
    import torch

    from .provenance import file_record

    hints = [torch.from_numpy(np.asarray(pc.condition.hint, dtype=np.float32))[None] for pc in conds]
    contexts = [inputs.identity(args, nets, args.seed + 1000 * i, pc.reference) for i, pc in enumerate(conds)]
    record = [{"reference": file_record(pc.person.reference) if pc.person.reference else None,
               "pose": file_record(pc.person.pose) if pc.person.pose else None, "modes": pc.person.modes,
               "controls": {k: v for k, v in vars(pc.person.controls).items() if v is not None},
               "yaw_pitch_roll": [round(float(a), 2) for a in pc.condition.euler],
               "strength": pc.person.strength} for pc in conds]
    return hints, contexts, [pc.person.strength for pc in conds], {"people": record}


def run(args) -> int:
    check_arguments(args)
    import torch
    from tqdm import tqdm

    from . import generate_inputs as inputs
    from .outputs import save_png_with_sidecar
    from .pipeline import (
        GenerationRequest,
        build_pipeline,
        load_networks,
        random_networks,
    )
    from .provenance import command_record

    record = command_record("generate", args, FILE_OPTIONS + ("weights",))  # the options as given, hashed files
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if args.fp16 else torch.float32
    t0 = time.perf_counter()
    if args.person:  # the heads' layout is checked before any network loads
        from .people_cli import build_people_conditions
        people_conditions = build_people_conditions(args, args.people)
    if args.checkpoint is None:
        print(RANDOM_WEIGHTS_NOTICE)
        nets = random_networks(TINY_CONFIG, device=args.device)
    else:
        from caphuman.export.config import packaged_config
        nets = load_networks(args.config or packaged_config("cldm_v15"), args.checkpoint, args.sd_checkpoint,
                             args.vae_checkpoint, args.clip_dir, device=args.device, dtype=dtype,
                             with_image_encoder=bool(args.reference) and not args.identity_context)
    log.info("models ready in %.1f s", time.perf_counter() - t0)

    photo, person_strength, extra, strength = None, None, {}, args.strength
    if args.person:
        hint, identity, person_strength, extra = _people_inputs(args, people_conditions, nets, inputs)
        if len(hint) == 1:  # one --person is the one-person path, its strength folded in
            hint, identity, strength, person_strength = hint[0], identity[0], strength * person_strength[0], None
    elif args.hint:
        hint = inputs.load_npy(args.hint, "hint", (3, 4))
        hint = hint[None] if hint.ndim == 3 else hint
    else:
        hint, photo, _pose = inputs.hint_from_photos(args)
    noise = inputs.load_npy(args.noise, "noise", (4,)) if args.noise else None
    if args.controlnet_checkpoint:
        inputs.add_controlnet(args, nets, hint.shape[-2:])
    if not args.person:
        identity = inputs.identity(args, nets, args.seed, photo)
    req = GenerationRequest(prompt=args.prompt, added_prompt=args.added_prompt, negative_prompt=args.negative_prompt,
                            hint=hint, identity_context=identity, seed=args.seed, num_samples=args.num_samples,
                            steps=args.steps, guidance=args.guidance, eta=args.eta, strength=strength,
                            tau=args.tau, sampler=args.sampler, noise=noise, person_strength=person_strength)
    req.validate(nets.config.unet.in_channels)
    pipe = build_pipeline(nets, args.backend, device=args.device, dtype=dtype, engine_dir=args.engine_dir)

    from caphuman.engines.samplers import make_plan
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
                                             {**result.parameters, "seed": seed, "inputs": {**record, **extra}},
                                             overwrite=args.overwrite)
        print(f"wrote {png} and {sidecar.name}")
    return 0
