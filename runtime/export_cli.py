"""`caphuman export` (PyTorch -> ONNX graphs) and `caphuman build` (ONNX -> TensorRT / TensorRT for RTX engines)."""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from .cli import HelpFormatter



class UserError(ValueError):
    """A bad command line: printed as one line by `caphuman` (exit status 2)."""

GRAPH_HELP = ("text_encoder, image_encoder, capface, unet, denoiser, vae_decoder, vae_encoder (default: all of these), "
              "facenet, bisenet, deca_encoder (need their weight files, or --random-weights)")


def register(sub) -> None:
    e = sub.add_parser("export", help="export the networks as ONNX graphs (validated against PyTorch)",
                       formatter_class=HelpFormatter,
                       description="One ONNX graph per network, stable I/O names (docs/engines.md), dynamic batch "
                                   "and resolution, checked with the ONNX checker, TensorRT's operator matrix "
                                   "and ONNX Runtime against PyTorch.")
    e.add_argument("--config", help="official-format config (default: the packaged cldm_v15.yaml, the official "
                                    "sizes: with --random-weights ~20 min and ~15 GiB on a CPU; the tiny one: "
                                    "export/configs/cldm_tiny.yaml)")
    e.add_argument("--checkpoint", help="caphuman.ckpt")
    e.add_argument("--sd-checkpoint", help="SD1.x checkpoint overriding UNet/VAE/text encoder")
    e.add_argument("--vae-checkpoint", help="VAE checkpoint overriding the VAE")
    e.add_argument("--clip-dir", help="CLIP folder (tokenizer; vision weights when the checkpoint lacks them)")
    e.add_argument("--facenet", help="FaceNet VGGFace2 weights (20180402-114759-vggface2.pt)")
    e.add_argument("--bisenet", help="BiSeNet weights (79999_iter.pth)")
    e.add_argument("--deca", help="DECA weights (deca_model.tar)")
    e.add_argument("--random-weights", action="store_true",
                   help="no checkpoint: export random weights (size and speed checks, tests)")
    e.add_argument("--out", required=True, help="output folder (graphs of other names already there are kept)")
    e.add_argument("--overwrite", action="store_true", help="replace graphs of the same names already in --out")
    e.add_argument("--fp16", action="store_true", help="float16 graphs (validated on a GPU, not on ORT's CPU provider)")
    e.add_argument("--only", help=f"comma-separated graphs: {GRAPH_HELP}")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset (TensorRT 10 parses 9..20)")
    e.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime comparison")
    e.add_argument("--size", type=int, help="trace image size in pixels (multiple of 64; default from the config)")
    e.set_defaults(func=run_export)

    b = sub.add_parser("build", help="build engines: TensorRT (for RTX) plans from exported graphs, or the compiled "
                                     "torch engine's artifacts and merged weights",
                       formatter_class=HelpFormatter,
                       description="TensorRT engines with optimization profiles and an engine cache keyed by graph "
                                   "hash + library version + target. --backend tensorrt: datacenter TensorRT, built "
                                   "on the GPU that runs them (timing cache). --backend tensorrt-rtx: TensorRT for "
                                   "RTX, portable engines for RTX GPUs (Ampere, Ada, Blackwell) built on any machine, "
                                   "GPU or not; their precision is the graphs' (export with --fp16 for fp16). "
                                   "--backend torch: the compiled torch engine's artifacts for --batch-sizes x "
                                   "--resolutions (keyed by config, options, GPU and versions; `generate` and `serve` "
                                   "load them from --engine-dir), and/or with --weights-out the merged weights file "
                                   "(caphuman.ckpt + SD + VAE as one safetensors file).")
    b.add_argument("--onnx-dir", help="folder written by `caphuman export` (tensorrt, tensorrt-rtx)")
    b.add_argument("--out", help="engine cache folder")
    b.add_argument("--backend", choices=("tensorrt", "tensorrt-rtx", "torch"), default="tensorrt",
                   help="TensorRT library (datacenter TensorRT or TensorRT for RTX), or the compiled torch engine")
    b.add_argument("--graphs", "--only", dest="graphs",
                   help="comma-separated graphs (default: every graph the pipeline runs that the export folder has: "
                        "text_encoder, image_encoder, capface, unet, vae_decoder, facenet, bisenet, deca_encoder)")
    b.add_argument("--batch", default="1:1:4", help="MIN:OPT:MAX batch of each graph (UNet: twice this, CFG pairs)")
    b.add_argument("--resolution", default="256:512:1024", help="MIN:OPT:MAX image side in pixels, multiples of 64")
    b.add_argument("--fp32", action="store_true",
                   help="fp32 engines (tensorrt: no fp16 kernels; tensorrt-rtx: the default follows the graphs' dtype)")
    b.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="weight-refittable engines (default: on for tensorrt; off for tensorrt-rtx, whose 1.7.1 builder "
                        "cannot make refittable engines on a machine without a CUDA driver)")
    b.add_argument("--workspace-gib", type=float, default=8.0, help="builder workspace limit")
    t = b.add_argument_group("torch backend")
    t.add_argument("--weights", help="official weights folder (the layout of `caphuman generate --weights`)")
    t.add_argument("--checkpoint", help="caphuman.ckpt (or a merged weights file)")
    t.add_argument("--sd-checkpoint", help="SD1.x checkpoint overriding UNet/VAE/text encoder")
    t.add_argument("--vae-checkpoint", help="VAE checkpoint overriding the VAE")
    t.add_argument("--config", help="official-format config (default: the packaged cldm_v15.yaml)")
    t.add_argument("--weights-out", help="write the merged weights (caphuman.ckpt, then SD, then VAE, key by key) to "
                                         "this .safetensors file; put it in the weights folder as "
                                         "caphuman-merged.safetensors and generate/serve load it instead")
    t.add_argument("--batch-sizes", default="1,2,4,8", help="batch sizes to compile (default: the server's buckets)")
    t.add_argument("--resolutions", default="512", help="image sides in pixels to compile (square)")
    t.add_argument("--samplers", default="ddim", help="samplers to compile (each has its own fused update)")
    t.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto: cuda when a GPU is visible")
    b.set_defaults(func=run_build)


def _parse_triple(text: str, what: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--{what} must be MIN:OPT:MAX integers, got {text!r}") from None
    if not 0 < lo <= opt <= hi:
        raise UserError(f"--{what} needs 0 < MIN <= OPT <= MAX, got {text!r}")
    return lo, opt, hi


def run_export(args) -> int:
    from caphuman.export.config import packaged_config
    from caphuman.export.onnx_export import export_graphs, face_modules_available, load_sources
    from caphuman.export.onnx_specs import FACE_GRAPHS, NETWORK_GRAPHS

    names = [n.strip() for n in args.only.split(",")] if args.only else list(NETWORK_GRAPHS)
    unknown = [n for n in names if n not in NETWORK_GRAPHS + FACE_GRAPHS]
    if unknown:
        raise UserError(f"unknown graph(s) {unknown}; known: {GRAPH_HELP}")
    if not args.random_weights and not args.checkpoint:
        raise UserError("--checkpoint is required (or --random-weights for a weightless size/speed check)")
    absent = [n for n, ok in face_modules_available().items() if n in names and not ok]
    if absent:
        raise UserError(f"the face network modules for {absent} are not in this installation (export/face/)")
    if args.size is not None and (args.size % 64 or args.size < 64):
        raise UserError(f"--size must be a positive multiple of 64, got {args.size}")
    from .outputs import check_new_outputs
    check_new_outputs([Path(args.out) / f"{n}.onnx" for n in names], args.overwrite, rename="--out")
    t0 = time.perf_counter()
    src = load_sources(args.config or packaged_config("cldm_v15"), args.checkpoint, args.sd_checkpoint,
                       args.vae_checkpoint, args.clip_dir, names=names, random_weights=args.random_weights,
                       facenet=args.facenet, bisenet=args.bisenet, deca=args.deca)
    print(f"loaded networks in {time.perf_counter() - t0:.1f} s")
    reports = export_graphs(src, names, args.out, fp16=args.fp16, opset=args.opset, validate=not args.no_validate,
                            size=(args.size, args.size) if args.size else None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    bad = [r.name for r in reports if r.trt_problems]
    print(f"exported {len(reports)} graph(s) to {args.out} in {time.perf_counter() - t0:.1f} s, "
          f"peak memory {peak:.1f} GiB; manifest: {Path(args.out) / 'manifest.json'}")
    if bad:
        print(f"graphs TensorRT's parser would reject: {bad} (see manifest.json 'trt_problems')")
        return 1
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"--{what} needs positive integers, got {text!r}")
    return values


def run_build(args) -> int:
    if args.backend == "torch":
        return run_build_torch(args)
    if not args.onnx_dir or not args.out:
        raise UserError(f"--backend {args.backend} needs --onnx-dir and --out")
    from caphuman.engines.tensorrt_engine import PIPELINE_GRAPHS, BuildSettings, TensorRTUnavailable, build_engines
    from caphuman.engines.tensorrt_library import library

    onnx_dir = Path(args.onnx_dir)
    manifest = onnx_dir / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"{manifest} not found: run `caphuman export --out {onnx_dir}` first")
    graphs = json.loads(manifest.read_text())["graphs"]
    names = [n.strip() for n in args.graphs.split(",")] if args.graphs else [n for n in PIPELINE_GRAPHS if n in graphs]
    missing = [n for n in names if n not in graphs]
    if missing:
        raise UserError(f"graphs {missing} are not in {manifest}; exported: {sorted(graphs)}")
    if not names:
        raise UserError(f"{manifest} has none of the pipeline's graphs {list(PIPELINE_GRAPHS)}; pass --graphs")
    trt_library = library(args.backend)
    fp16 = not args.fp32
    if trt_library.strongly_typed:  # the graphs' dtype is the engines' precision
        dtypes = {graphs[n]["dtype"] for n in names}
        if len(dtypes) != 1:
            raise UserError(f"graphs {names} mix dtypes {sorted(dtypes)}; TensorRT for RTX engines take the graph's")
        fp16 = dtypes == {"float16"}
        if args.fp32 and fp16:
            raise UserError(f"--fp32: the graphs in {onnx_dir} are fp16 and TensorRT for RTX networks are strongly "
                            "typed; export fp32 graphs (`caphuman export` without --fp16)")
    refit = args.refit if args.refit is not None else not trt_library.strongly_typed
    settings = BuildSettings(batch=_parse_triple(args.batch, "batch"),
                             resolution=_parse_triple(args.resolution, "resolution"), fp16=fp16,
                             refit=refit, workspace_bytes=int(args.workspace_gib * 2**30))
    t0 = time.perf_counter()
    try:
        built = build_engines(onnx_dir, names, Path(args.out), settings, library=trt_library)
    except TensorRTUnavailable as e:
        print(f"caphuman build: error: {e}", file=sys.stderr)
        return 3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for name, path in built.items():
        print(f"{name}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(f"built {len(built)} {trt_library.name} engine(s) in {time.perf_counter() - t0:.1f} s, "
          f"peak memory {peak:.1f} GiB")
    return 0


def run_build_torch(args) -> int:
    """The compiled torch engine's artifacts (--out) and/or the merged weights file (--weights-out)."""
    from caphuman.engines.samplers import SAMPLERS

    from . import limits
    from .weights_layout import use_weights_folder

    if not args.out and not args.weights_out:
        raise UserError("--backend torch writes the compiled engine's artifacts (--out DIR) and/or the merged "
                        "weights (--weights-out FILE): give at least one")
    if args.onnx_dir:
        raise UserError("--onnx-dir is for the TensorRT backends; the torch engine compiles the PyTorch networks")
    use_weights_folder(args, use_merged=not args.weights_out)  # a new merge reads the separate files
    if not args.checkpoint:
        raise UserError("--backend torch needs the weights: --weights DIR or --checkpoint caphuman.ckpt")
    batch_sizes = _int_list(args.batch_sizes, "batch-sizes")
    resolutions = [limits.check_resolution("--resolutions", r) for r in _int_list(args.resolutions, "resolutions")]
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise UserError(f"--samplers: unknown {unknown}; known: {sorted(SAMPLERS)}")
    if args.weights_out and Path(args.weights_out).suffix != ".safetensors":
        raise UserError(f"--weights-out must name a .safetensors file, got {args.weights_out}")
    import torch

    from caphuman.export.config import packaged_config

    from .pipeline import load_networks
    from .torch_build import build_torch_artifacts, write_merged

    config = args.config or packaged_config("cldm_v15")
    t0 = time.perf_counter()
    if args.weights_out:
        header = write_merged(args.weights_out, config, args.checkpoint, args.sd_checkpoint, args.vae_checkpoint)
        print(f"merged {', '.join(s['name'] for s in header['sources'].values())} into {args.weights_out} "
              f"({Path(args.weights_out).stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    if not args.out:
        return 0
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.fp32 or not device.startswith("cuda") else torch.float16
    t1 = time.perf_counter()
    nets = load_networks(config, args.checkpoint, args.sd_checkpoint, args.vae_checkpoint, device=device, dtype=dtype)
    path = build_torch_artifacts(nets, args.out, batch_sizes, resolutions, samplers, device=device, dtype=dtype)
    print(f"torch artifacts: {path} ({path.stat().st_size / 2**20:.1f} MiB) for batch sizes {batch_sizes} at "
          f"{resolutions} px ({', '.join(samplers)}), {device} {str(dtype).removeprefix('torch.')}, built in "
          f"{time.perf_counter() - t1:.1f} s")
    return 0
