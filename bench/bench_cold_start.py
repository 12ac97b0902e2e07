"""Cold start of the compiled torch engine, with and without the artifacts of `caphuman build --backend torch`.

Three fresh processes, each with its own empty inductor and Triton caches (as a new pod has):
1. build: compile the engine for the asked batch sizes at the asked resolution and save the artifacts;
2. first image WITH the artifacts; 3. first image WITHOUT them (compiles at first use).
Each reports process start to first image (20-step DDIM at batch 1, random weights of the config), the
step afterwards (20-step loop, per step) and the image; the parent adds the PSNR between 2 and 3.

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
    import numpy as np
    import torch

    from caphuman.runtime.pipeline import GenerationRequest, build_pipeline, random_networks, sphere_hint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out: dict = {"phase": args.phase, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__}
    nets = random_networks(args.config, device=device)
    out["networks_ready_s"] = round(time.time() - t_start, 2)
    if args.phase == "build":
        from caphuman.runtime.torch_build import build_torch_artifacts
        t0 = time.perf_counter()
        build_torch_artifacts(nets, args.artifacts, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                              resolutions=(args.size,), device=device, dtype=dtype)
        out["build_s"] = round(time.perf_counter() - t0, 1)
        return out
    use = args.phase == "with_artifacts"
    pipe = build_pipeline(nets, "torch", device=device, dtype=dtype, engine_dir=args.artifacts if use else None,
                          compile=True)
    req = GenerationRequest(prompt="a photo of a person", hint=sphere_hint(args.size),
                            identity_context=torch.zeros(1, 258, nets.config.context_dim), seed=3, steps=20)
    first = pipe.generate(req)
    out["start_to_first_image_s"] = round(time.time() - t_start, 2)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    runs = 3
    for _ in range(runs):
        pipe.denoise([req])
    if device.type == "cuda":
        torch.cuda.synchronize()
    out["denoise20_per_step_ms"] = round((time.perf_counter() - t0) / runs / 20 * 1e3, 3)
    np.save(Path(args.out) / f"{args.phase}.npy", np.asarray(first.images[0]))
    return out


def _psnr(a, b) -> float:
    import numpy as np
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cldm_v15")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-sizes", default="1", help="batch sizes the build compiles (the server's: 1,2,4,8)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--phase", choices=["build", "with_artifacts", "without_artifacts"], help=argparse.SUPPRESS)
    ap.add_argument("--artifacts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return 0
    import numpy as np
    Path(args.out).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    results: dict = {"config": args.config, "size": args.size, "batch_sizes": args.batch_sizes}
    for phase in ("build", "with_artifacts", "without_artifacts"):
        cache = work / f"cache-{phase}"  # a new pod: empty inductor and Triton caches
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
               "COLD_START_T0": repr(time.time())}
        proc = subprocess.run([sys.executable, __file__, "--phase", phase, "--artifacts", str(work / "artifacts"),
                               "--config", args.config, "--size", str(args.size), "--batch-sizes", args.batch_sizes,
                               "--out", args.out], env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        results[phase] = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr[-3000:]}
        print(phase, results[phase], flush=True)
        (Path(args.out) / "cold_start.json").write_text(json.dumps(results, indent=2))
    images = [Path(args.out) / f"{p}.npy" for p in ("with_artifacts", "without_artifacts")]
    if all(p.is_file() for p in images):
        results["psnr_with_vs_without_db"] = round(_psnr(*(np.load(p) for p in images)), 2)
    (Path(args.out) / "cold_start.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
