"""Torch engine on the GPU: image parity of the backends with the reference mode, and the fp16
engine's eps error at full size. (Step timings: `bench/bench_e2e.py --parts step`.)

    python bench/bench_torch_engine.py --out bench/results        # needs a CUDA GPU

Part 1 runs `caphuman generate` (tiny random-weight model, same seed) with the reference mode
(`--backend eager --cfg serial`, fp32), `--backend torch` fp32 and fp16, and `--backend onnxruntime`
(CPU), and reports each image's PSNR against the reference. Part 2 builds the full-size denoiser
from `cldm_v15.yaml` with random weights and reports the fp16 torch engine's eps error against fp32.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def image_parity(work: Path, steps: int) -> dict:
    from PIL import Image

    runs = {"reference_eager_serial_fp32": ["--backend", "eager", "--cfg", "serial"],
            "torch_fp32": ["--backend", "torch"],
            "torch_fp16": ["--backend", "torch", "--fp16"],
            "onnxruntime_cpu_fp32": ["--backend", "onnxruntime", "--engine-dir", str(work / "onnx")]}
    images, seconds = {}, {}
    work.mkdir(parents=True, exist_ok=True)
    ident = work / "identity.npy"  # one identity for every run (and no device mix-up in the demo's own)
    np.save(ident, np.random.default_rng(7).standard_normal((1, 258, 32)).astype(np.float32))
    for name, extra in runs.items():
        out = work / name
        cmd = [sys.executable, "-m", "caphuman.runtime.cli", "generate", "--seed", "7", "--steps", str(steps),
               "--device", "cuda", "--identity-context", str(ident), "--out", str(out), *extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        seconds[name] = round(time.perf_counter() - t0, 2)
        images[name] = np.asarray(Image.open(next(out.glob("*.png"))).convert("RGB"))
    ref = images["reference_eager_serial_fp32"]
    return {"model": "cldm_tiny (random weights)", "resolution": 512, "steps": steps, "seed": 7,
            "psnr_db_vs_reference": {k: psnr(v, ref) for k, v in images.items() if k != "reference_eager_serial_fp32"},
            "max_abs_pixel_diff": {k: int(np.abs(v.astype(int) - ref).max()) for k, v in images.items()},
            "wall_seconds_incl_load": seconds}


def fp16_eps_error() -> dict:
    from caphuman.export.config import load_config, packaged_config
    from caphuman.export.models import CapHumanDenoiser
    from caphuman.export.onnx_export import distinct_random_
    from caphuman.export.onnx_specs import graph_specs
    from caphuman.engines.factory import create_engine

    cfg = load_config(packaged_config("cldm_v15"))
    torch.manual_seed(1)
    # distinct values on the CPU (its generator), then to the GPU
    den = distinct_random_(CapHumanDenoiser(cfg).eval().requires_grad_(False)).cuda()
    feed = graph_specs(cfg)["denoiser"].sample_inputs(2, 512, 512, device="cuda")
    with torch.no_grad():
        ref = den(feed["sample"], feed["timestep"], feed["text_embeddings"], feed["hint"], feed["identity_context"],
                  feed["strength"].tolist())
        eng = create_engine("torch", den, device="cuda", dtype=torch.float16)
        got = eng.run(feed)["eps"].float()
    return {"eps_rel_err_fp16_engine_vs_fp32": float((got - ref).norm() / ref.norm())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip-parity", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    if not args.skip_parity:
        result["image_parity"] = image_parity(out / "work", args.steps)
        print(json.dumps(result["image_parity"], indent=1), flush=True)
    path = out / f"torch_engine_{result['gpu'].replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=1))  # saved before the full-size part, which may fail alone
    result["full_size_fp16"] = fp16_eps_error()
    path.write_text(json.dumps(result, indent=1))
    print("\n| measure | value |\n| --- | --- |")
    for k, v in result["full_size_fp16"].items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
