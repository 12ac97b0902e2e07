"""One-off: the torch engine's step time through the public sampling API, on the code before and after the
engine-interface change (run once per tree, in one device call; the results are compared by the caller).

    PYTHONPATH=<package root> python bench/compare_engine_before_after.py --label new --batches 1,8 --compile
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--latents", default="/tmp", help="where the final latents go (compared across trees)")
    args = ap.parse_args()
    import caphuman.engines.torch_engine as te
    from caphuman.export.config import load_config, packaged_config
    from caphuman.export.models import CapHumanDenoiser

    new_api = not hasattr(te.TorchDenoiserEngine, "sample")
    cfg = load_config(packaged_config("cldm_v15"))
    dev, fp16 = torch.device("cuda"), torch.float16
    torch.manual_seed(0)
    den = CapHumanDenoiser(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in den.capface.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.01)
    schedule = den.alphas_cumprod.clone()
    den = den.to(dev, fp16)
    den.alphas_cumprod = schedule.to(dev)
    t0 = time.perf_counter()
    eng = te.TorchDenoiserEngine(den, device=dev, dtype=fp16, compile=args.compile)
    out = {"label": args.label, "new_api": new_api, "compile": args.compile, "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__}

    def run(inp, steps=20):
        if new_api:
            from caphuman.engines.denoiser import Conditioning
            from caphuman.engines.loop import sample
            cond = Conditioning(inp["tc"], inp["tu"], inp["hint"], inp["ctx"], guidance=7.0)
            return sample(eng, inp["x"], cond, steps=steps)
        return eng.sample(inp["x"], inp["tc"], inp["tu"], inp["hint"], inp["ctx"], steps=steps, guidance=7.0)

    for b in [int(v) for v in args.batches.split(",")]:
        g = torch.Generator().manual_seed(1)
        inp = dict(x=torch.randn(b, 4, 64, 64, generator=g).to(dev),
                   tc=torch.randn(1, 77, cfg.context_dim, generator=g).to(dev, fp16),
                   tu=torch.randn(1, 77, cfg.context_dim, generator=g).to(dev, fp16),
                   hint=torch.rand(1, 9, 512, 512, generator=g).to(dev, fp16),
                   ctx=torch.randn(1, 258, cfg.context_dim, generator=g).to(dev, fp16))
        t1 = time.perf_counter()
        with torch.no_grad():
            lat = run(inp, steps=20)  # prepares (captures) this batch size
        torch.cuda.synchronize()
        out[f"b{b}_setup_s"] = round(time.perf_counter() - t1, 1)
        times = []
        with torch.no_grad():
            for _ in range(args.repeat):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                run(inp, steps=20)
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e) / 20)
        out[f"b{b}_api_loop20_ms_per_step"] = float(np.median(times))
        state = next(s for s in eng._states.values() if s.x.shape[0] == b)
        replays = []
        for _ in range(args.repeat):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(20):
                state.graph.replay()
            e.record()
            torch.cuda.synchronize()
            replays.append(s.elapsed_time(e) / 20)
        out[f"b{b}_graph_replay_loop20_ms"] = float(np.median(replays))
        torch.save(lat.float().cpu(), Path(args.latents) / f"{args.label}_{'c' if args.compile else 'g'}_b{b}.pt")
        print(json.dumps({k: v for k, v in out.items() if k.startswith(f"b{b}_")}), flush=True)
        out["total_s"] = round(time.perf_counter() - t0, 1)
        path = Path(args.out) / f"engine_{args.label}_{'compiled' if args.compile else 'graph'}.json"
        path.write_text(json.dumps(out, indent=2))  # after every batch size: a cut run keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
