"""Cold start of the compiled torch engine, with and without the artifacts of `caphuman build --backend torch`.

Fresh processes, each with its own empty inductor and Triton caches (as a new pod has) unless said (`--phases`
picks which run):
1. build: random weights of the config written in the official layout and merged into one safetensors file
   (`caphuman build --weights-out`), then the engine compiled for the asked batch sizes at the asked
   resolution and its artifacts saved;
2. first image WITH the artifacts; 2b. the same again in a new process that keeps 2's local caches (a pod's
   next process: what remains once nothing is compiled or loaded into the caches); 3. first image WITHOUT
   them (compiles at first use).
Processes 2, 2b and 3 read the merged weights from disk (`load_networks`, straight to the GPU) and report, from
process start: imports done, networks on the GPU, engine ready (artifacts loaded), first denoise (20-step
DDIM at batch 1: trace, cache or compile, CUDA-graph capture), first image (text, warm denoise, VAE decode);
then the step afterwards (20-step loop, per step), inductor's cache hits and misses and dynamo's
compile-time table (where the first denoise's time went). The parent adds the PSNR between 2 and 3.

    python bench/bench_cold_start.py --config cldm_v15 --out bench/results/
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(args) -> dict:
    t_start = float(os.environ["COLD_START_T0"])  # the parent's clock just before it started this process
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import numpy as np
    import torch

    from caphuman.export.config import packaged_config
    from caphuman.runtime.pipeline import (GenerationRequest, build_pipeline, load_networks, random_networks,
                                           sphere_hint)

    def since_start() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return round(time.time() - t_start, 2)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out: dict = {"phase": args.phase, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "imports_s": since_start()}
    config_path = packaged_config(args.config)
    merged = Path(args.artifacts) / "weights.safetensors"
    if args.phase == "build":
        nets = random_networks(args.config, device=device)
        out["networks_ready_s"] = since_start()
        t0 = time.perf_counter()
        _write_official_weights(nets, config_path, merged)
        out["write_merged_weights_s"] = round(time.perf_counter() - t0, 1)
        out["merged_weights_gib"] = round(merged.stat().st_size / 2**30, 2)
        from caphuman.runtime.torch_build import build_torch_artifacts
        t0 = time.perf_counter()
        build_torch_artifacts(nets, args.artifacts, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                              resolutions=(args.size,), device=device, dtype=dtype)
        out["build_s"] = round(time.perf_counter() - t0, 1)
        return out
    nets = load_networks(config_path, merged, device=device, dtype=dtype, with_image_encoder=True)
    out["networks_ready_s"] = since_start()
    use = args.phase != "without_artifacts"
    pipe = build_pipeline(nets, "torch", device=device, dtype=dtype, engine_dir=args.artifacts if use else None,
                          compile=True)
    out["engine_ready_s"] = since_start()
    req = GenerationRequest(prompt="a photo of a person", hint=sphere_hint(args.size),
                            identity_context=torch.zeros(1, 258, nets.config.context_dim), seed=3, steps=20)
    pipe.denoise([req])
    out["first_denoise_s"] = since_start()
    first = pipe.generate(req)
    out["start_to_first_image_s"] = since_start()
    from torch._dynamo.utils import compile_times, counters
    out["inductor_cache"] = {"fxgraph_hits": counters["inductor"]["fxgraph_cache_hit"],
                             "fxgraph_misses": counters["inductor"]["fxgraph_cache_miss"],
                             "aot_autograd_hits": counters["aot_autograd"]["autograd_cache_hit"],
                             "aot_autograd_misses": counters["aot_autograd"]["autograd_cache_miss"]}
    out["dynamo_compile_times"] = compile_times(repr="str", aggregate=True)
    t0 = time.perf_counter()
    runs = 3
    for _ in range(runs):
        pipe.denoise([req])
    if device.type == "cuda":
        torch.cuda.synchronize()
    out["denoise20_per_step_ms"] = round((time.perf_counter() - t0) / runs / 20 * 1e3, 3)
    np.save(Path(args.artifacts).parent / f"{args.phase}.npy", np.asarray(first.images[0]))
    return out


def _write_official_weights(nets, config_path: Path, merged: Path) -> None:
    """`nets`' weights as the official files hold them (a Lightning caphuman.ckpt with every network), merged
    into `merged` as `caphuman build --weights-out` does; the .ckpt is removed afterwards."""
    import torch

    from caphuman.export.merged_weights import write_merged_weights
    from caphuman.export.models import official_state_dict

    ckpt = merged.with_name("caphuman.ckpt")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    state = official_state_dict(nets.denoiser, nets.vae, nets.text_encoder, nets.image_encoder)
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in state.items()}}, ckpt)
    write_merged_weights(merged, config_path, ckpt)
    ckpt.unlink()


PHASES = ("build", "with_artifacts", "with_artifacts_again", "without_artifacts")


def _psnr(a, b) -> float | None:
    import numpy as np
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return None if mse == 0 else float(10 * np.log10(255 ** 2 / mse))  # None: identical images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cldm_v15")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-sizes", default="1", help="batch sizes the build compiles (the server's: 1,2,4,8)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--phases", default=",".join(PHASES), help="the phases to run, in order (build first)")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--artifacts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return 0
    import numpy as np
    Path(args.out).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    results: dict = {"config": args.config, "size": args.size, "batch_sizes": args.batch_sizes}
    for phase in args.phases.split(","):
        # a new pod: empty inductor and Triton caches; "_again": the same pod's next process
        cache = work / f"cache-{phase.removesuffix('_again')}"
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
               "COLD_START_T0": repr(time.time())}
        proc = subprocess.run([sys.executable, __file__, "--phase", phase, "--artifacts", str(work / "artifacts"),
                               "--config", args.config, "--size", str(args.size), "--batch-sizes", args.batch_sizes,
                               "--out", args.out], env=env, capture_output=True, text=True)
        (Path(args.out) / f"cold_{phase}.log").write_text(proc.stderr[-200_000:])
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        results[phase] = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr[-3000:]}
        print(phase, {k: v for k, v in results[phase].items() if k != "dynamo_compile_times"}, flush=True)
        (Path(args.out) / "cold_start.json").write_text(json.dumps(results, indent=2))
        if "error" in results[phase] and phase == "build":
            break
    images = [work / f"{p}.npy" for p in ("with_artifacts", "without_artifacts")]
    if all(p.is_file() for p in images):
        psnr = _psnr(*(np.load(p) for p in images))
        results["psnr_with_vs_without_db"] = "identical" if psnr is None else round(psnr, 2)
    (Path(args.out) / "cold_start.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
