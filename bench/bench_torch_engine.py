"""Torch engine on the GPU: image parity of the backends with the reference mode, and the time of
one full-size denoising step (512x512, batch-2 CFG) as one CUDA graph vs eager PyTorch.

    python bench/bench_torch_engine.py --out bench/results        # needs a CUDA GPU

Part 1 runs `caphuman generate` (tiny random-weight model, same seed) with the reference mode
(`--backend eager --cfg serial`, fp32), `--backend torch` fp32 and fp16, and `--backend onnxruntime`
(CPU), and reports each image's PSNR against the reference. Part 2 builds the full-size networks
from `cldm_v15.yaml` with random weights and times: the reference step (fp32, serial CFG, CapFace
twice), the eager batched step in fp16 (CapFace once, UNet at batch 2), and the torch engine's
CUDA-graph step in fp16 (CUDA events, median of repeated steps after warm-up). It also reports the
fp16 engine's eps error against fp32. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout without installing


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
        cmd = [sys.executable, "-m", "runtime.cli", "generate", "--seed", "7", "--steps", str(steps),
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


def _time_cuda(fn, repeat: int) -> float:
    """Median milliseconds of fn() over `repeat` runs (CUDA events)."""
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def full_size_step(repeat: int) -> dict:
    from export.config import load_config, packaged_config
    from export.models import CapHumanDenoiser
    from export.onnx_export import distinct_random_
    from engines.torch_engine import TorchDenoiserEngine
    from runtime.sampling import ddim_schedule, ddim_update, guided_eps

    cfg = load_config(packaged_config("cldm_v15"))
    torch.manual_seed(0)
    with torch.device("cuda"):
        den32 = distinct_random_(CapHumanDenoiser(cfg).eval().requires_grad_(False))
    den16 = copy.deepcopy(den32).half()
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 4, 64, 64, device="cuda", generator=g)
    tc, tu = (torch.randn(1, 77, 768, device="cuda", generator=g) for _ in range(2))
    hint = torch.rand(1, 9, 512, 512, device="cuda", generator=g)
    ctx = torch.randn(1, 258, 768, device="cuda", generator=g)
    sched = ddim_schedule(den32.alphas_cumprod, 20)
    a = [v[10].cuda() for v in (sched.alphas, sched.alphas_prev, sched.sigmas, sched.sqrt_one_minus_alphas)]
    t = sched.timesteps[10]

    def eager_step(den, cfg_mode, dt):
        def step():
            eps = guided_eps(den, x.to(dt), t, tc.to(dt), tu.to(dt), hint.to(dt), ctx.to(dt), 7.0, 1.0, 0, cfg_mode)
            return ddim_update(x, eps.float(), *a, None)
        return step

    out = {"model": "cldm_v15 full size (random weights)", "resolution": 512, "cfg_batch": 2}
    with torch.no_grad():
        for _ in range(3):
            eager_step(den32, "serial", torch.float32)()
        out["reference_fp32_serial_ms"] = _time_cuda(eager_step(den32, "serial", torch.float32), repeat)
        for _ in range(3):
            eager_step(den16, "batched", torch.float16)()
        out["eager_fp16_batched_ms"] = _time_cuda(eager_step(den16, "batched", torch.float16), repeat)
        del den32
        torch.cuda.empty_cache()

        results = {}
        for label, kw in {"engine_fp16_cudagraph": dict(cuda_graph=True),
                          "engine_fp16_eager_same_kernels": dict(cuda_graph=False)}.items():
            eng = TorchDenoiserEngine(copy.deepcopy(den16), device="cuda", dtype=torch.float16, **kw)
            t0 = time.perf_counter()
            eng.sample(x, tc, tu, hint, ctx, steps=2)  # capture (graph) or warm-up
            results[label + "_first_request_s"] = round(time.perf_counter() - t0, 2)
            s = next(iter(eng._states.values()))
            s.t.fill_(t)
            for buf, v in zip((s.a_t, s.a_prev, s.sigma, s.sqrt_1m), a):
                buf.copy_(v)
            step = s.graph.replay if s.graph is not None else (lambda: eng._step(s, 2))
            results[label + "_ms"] = _time_cuda(step, repeat)
            if label == "engine_fp16_cudagraph":
                # end-to-end 20-step request time (after capture), K/V refill included
                results["engine_fp16_20_steps_ms"] = _time_cuda(lambda: eng.sample(x, tc, tu, hint, ctx, steps=20), 3)
            eng.close()
            del eng
        out.update(results)
    out["speedup_graph_vs_eager_fp16"] = out["eager_fp16_batched_ms"] / out["engine_fp16_cudagraph_ms"]
    out["speedup_graph_vs_reference"] = out["reference_fp32_serial_ms"] / out["engine_fp16_cudagraph_ms"]
    return out


def fp16_eps_error() -> dict:
    from export.config import load_config, packaged_config
    from export.models import CapHumanDenoiser
    from export.onnx_export import distinct_random_
    from export.onnx_specs import graph_specs
    from engines.torch_engine import TorchDenoiserEngine

    cfg = load_config(packaged_config("cldm_v15"))
    torch.manual_seed(1)
    with torch.device("cuda"):
        den = distinct_random_(CapHumanDenoiser(cfg).eval().requires_grad_(False))
    feed = graph_specs(cfg)["denoiser"].sample_inputs(2, 512, 512, device="cuda")
    with torch.no_grad():
        ref = den(feed["sample"], feed["timestep"], feed["text_embeddings"], feed["hint"], feed["identity_context"],
                  feed["strength"].tolist())
        eng = TorchDenoiserEngine(den, device="cuda", dtype=torch.float16)
        got = eng.run(feed)["eps"].float()
    return {"eps_rel_err_fp16_engine_vs_fp32": float((got - ref).norm() / ref.norm())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=20)
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
    result["full_size_step"] = full_size_step(args.repeat)
    result["full_size_fp16"] = fp16_eps_error()
    path = out / f"torch_engine_{result['gpu'].replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=1))
    print("\n| measure | value |\n| --- | --- |")
    for k, v in {**result["full_size_step"], **result["full_size_fp16"]}.items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
