"""Where the time of one denoising step goes: a kernel-level profile of the torch engine's captured
step (CapFace + UNet with guidance 7, 512x512, batch 1), by kernel category.

    python bench/profile_step.py --variants optimized,optimized_compiled --out bench/results

Each variant builds the engine, captures its CUDA graph, times 50 replays (CUDA events), then
records 10 replays with torch.profiler (CUPTI sees the kernels inside graph replays) and sums GPU
time per category: convolution, GEMM, attention (ours / SDPA), Triton-generated fused kernels,
normalisation, other elementwise. Writes profile_step.json (and prints a table) after each variant.

Variants: optimized (eager kernels + Triton attention + static K/V, one CUDA graph),
graph_eager_kernels (the same without our attention), optimized_compiled (+ torch.compile,
inductor defaults), optimized_compiled_tuned (+ the inductor settings diffusers recommends for
UNets: conv_1x1_as_mm, coordinate_descent_tuning, no epilogue fusion).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from bench.bench_e2e import INDUCTOR_UNET_OPTIONS, environment, inputs, make_denoiser, timed  # noqa: E402
from caphuman.export.config import load_config, packaged_config  # noqa: E402

VARIANTS = {
    "graph_eager_kernels": dict(fast_attention=False, rewrite_networks=False, conv_autotune=False),
    "optimized": dict(fast_attention=True),
    "optimized_compiled": dict(fast_attention=True, compile=True),
    "optimized_compiled_tuned": dict(fast_attention=True, compile=True, tuned=True),
}

# First match wins; names of cuDNN/cuBLAS/CUTLASS/Triton kernels on sm_90.
CATEGORIES = [
    ("attention (ours, Triton)", re.compile(r"_attn_fwd")),
    ("Triton fused (inductor)", re.compile(r"^triton_")),  # before "conv": names like triton_poi_fused_convolution_0
    ("attention (SDPA)", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("convolution", re.compile(r"conv|fprop|dgrad|implicit|winograd|xmma_fprop", re.I)),
    ("GEMM", re.compile(r"gemm|nvjet|cutlass|matmul|sm90_xmma|ampere_|wgmma", re.I)),
    ("normalisation", re.compile(r"norm|welford", re.I)),
    ("copies / casts", re.compile(r"copy|cast|cat|fill", re.I)),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other elementwise"


def profile(fn, replays: int = 10) -> tuple[dict, dict, dict, list]:
    """GPU microseconds per category and per kernel name, per replay; kernel launches per replay by
    name; and the timeline of the last replay (stream, start and duration in microseconds, name),
    which shows how the two streams overlap and where the GPU idles."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            fn()
        torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as one:  # the timeline: one replay alone
        fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    calls: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name] += evt.device_time / replays
            calls[evt.name] += 1 / replays
    per_cat: dict[str, float] = defaultdict(float)
    for name, us in per_kernel.items():
        per_cat[category(name)] += us
    top = dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])[:80])
    return (dict(sorted(per_cat.items(), key=lambda kv: -kv[1])), top,
            {k: round(calls[k], 1) for k in top}, timeline(one))


def timeline(prof) -> list:
    """[stream, start_us, duration_us, name] of the profiled GPU work; [] where kineto gives no
    streams."""
    try:
        evs = sorted((e.start_ns(), e.duration_ns(), e.device_resource_id(), e.name())
                     for e in prof.profiler.kineto_results.events() if e.device_type() == torch.autograd.DeviceType.CUDA)
    except Exception:  # noqa: BLE001 - an optional view; profiler internals differ between versions
        return []
    if not evs:
        return []
    t0 = evs[0][0]
    return [[stream, round((s - t0) / 1e3, 2), round(d / 1e3, 2), name[:120]] for s, d, stream, name in evs]


def run_variant(name: str, cfg, device, size: int, repeat: int) -> dict:
    from caphuman.engines.denoiser import Conditioning
    from caphuman.engines.loop import sample
    from caphuman.engines.factory import create_engine

    kw = dict(VARIANTS[name])
    if kw.pop("tuned", False):
        kw["compile_options"] = INDUCTOR_UNET_OPTIONS
    if kw.get("compile"):
        torch._dynamo.reset()
    den = make_denoiser(cfg, device, torch.float16)
    eng = create_engine("torch", den, device=device, dtype=torch.float16, channels_last=True, cuda_graph=True, **kw)
    inp = inputs(cfg, device, torch.float16, size)
    t0 = time.perf_counter()
    with torch.no_grad():
        sample(eng, inp["x"], Conditioning(inp["text_c"], inp["text_u"], inp["hint"], inp["ctx"]), steps=2)
    torch.cuda.synchronize()
    out = dict(setup_s=round(time.perf_counter() - t0, 1))
    state = next(iter(eng._states.values()))
    out["step_ms"] = timed(state.graph.replay, device, repeat=repeat)
    cats, top, calls, timeline = profile(state.graph.replay)
    out["gpu_us_by_category"] = cats
    out["gpu_us_total"] = sum(cats.values())
    out["top_kernels_us"] = top
    out["top_kernels_launches_per_step"] = calls
    out["kernels_per_step"] = len(timeline)
    out["timeline_one_step"] = timeline
    eng.close()
    del eng, den
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="optimized,optimized_compiled")
    ap.add_argument("--config", default="cldm_v15")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step needs a CUDA GPU (it profiles the captured CUDA graph)")
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    device = torch.device("cuda")
    cfg = load_config(packaged_config(args.config))
    result = dict(environment=environment(device), size=args.size, batch=1, guidance=7.0, variants={})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"{name}:", flush=True)
        try:
            r = run_variant(name, cfg, device, args.size, args.repeat)
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
            r = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
        result["variants"][name] = r
        (out / "profile_step.json").write_text(json.dumps(result, indent=1))
        if "error" in r:
            print(f"  FAILED {r['error']}", flush=True)
            continue
        print(f"  step {r['step_ms']:.2f} ms (setup {r['setup_s']} s); GPU kernels {r['gpu_us_total'] / 1e3:.2f} ms",
              flush=True)
        for cat, us in r["gpu_us_by_category"].items():
            print(f"    {cat:28s} {us / 1e3:6.2f} ms", flush=True)
        for k, us in list(r["top_kernels_us"].items())[:8]:
            print(f"      {us:7.1f} us  {k[:110]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
