"""Probe (seventh session, H100 runs 53-58 and 61): the warp-specialised Gluon attention kernel of
attn_probe4_gluon_ws_kernel.py, next to torch SDPA (cuDNN) and the shipped Triton kernel.

Nothing of it shipped; docs/kernels.md ("Seventh session") has the results. Runs 53 (ping-pong,
commit 5e0ec6d) and 54 (a software-pipelined consumer, commit 423c8d8) used earlier versions of the
kernel; the candidate sets "consumers" (run 55), "d80" (run 58) and "c1" (run 61) and --scan (run 57)
run as is.

For each candidate (head-dim split, BLOCK_N, stages, ping-pong on/off) a child process checks the
kernel against an fp32 reference on the issue's goal shapes and times it, in CUDA graphs, next to
torch SDPA (cuDNN) and the shipped Triton kernel, same process and inputs. Children run under a
timeout: a wrong mbarrier protocol hangs instead of crashing. One JSON line per (candidate, shape)
goes to --out as soon as it is measured.

    python3 bench/results/attn_probe4_gluon_ws_h100_runs53_61.py --out $OUT/ws.jsonl [--set consumers] [--only self]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HEADS = 8
ONLY = os.environ.get("WS_PROBE_ONLY", "")
# (name, batch, n_q, n_kv, head_dim): the five goal shapes
SHAPES = [("self 4096 d40", 2, 4096, 4096, 40), ("cross 4096x77 d40", 2, 4096, 77, 40),
          ("cross 4096x258 d40", 2, 4096, 258, 40), ("self 1024 d80", 2, 1024, 1024, 80),
          ("self 256 d160", 2, 256, 256, 160)]


def _cand(d, head_a, head_b, block_n, stages, consumers, pingpong=True, block_m=64, producer_regs=24, maxnreg=None):
    return dict(head_dim=d, head_a=head_a, head_b=head_b, block_m=block_m, block_n=block_n, stages=stages,
                consumers=consumers, pingpong=pingpong, producer_regs=producer_regs, maxnreg=maxnreg)


CANDIDATE_SETS = {
    # run 55: more consumer warp groups per CTA (more warps issuing exponentials), turn ring on/off
    "consumers": [_cand(40, 32, 16, 128, 2, 2), _cand(40, 32, 16, 64, 3, 3), _cand(40, 32, 16, 64, 3, 3, False),
                  _cand(40, 32, 16, 64, 3, 4), _cand(40, 32, 16, 64, 3, 4, False), _cand(40, 64, 0, 64, 3, 3),
                  _cand(40, 64, 0, 64, 3, 4), _cand(80, 64, 16, 64, 3, 2), _cand(80, 64, 16, 64, 3, 3),
                  _cand(80, 64, 16, 128, 2, 2), _cand(160, 128, 32, 64, 2, 2)],
    # run 58: self 1024 d80, the latency-bound goal shape
    "d80": [_cand(80, 64, 16, 128, 2, 2), _cand(80, 64, 16, 128, 3, 2), _cand(80, 64, 16, 128, 2, 2, False),
            _cand(80, 64, 16, 128, 3, 2, False), _cand(80, 64, 16, 64, 4, 2), _cand(80, 64, 16, 64, 4, 2, False),
            _cand(80, 64, 32, 128, 2, 2), _cand(80, 128, 0, 64, 3, 2)],
    # run 61: one consumer per CTA (no turns), two CTAs per SM where maxnreg=128 fits
    "c1": [_cand(80, 64, 16, 64, 3, 1, producer_regs=56, maxnreg=128),
           _cand(80, 64, 16, 64, 4, 1, producer_regs=56, maxnreg=128),
           _cand(80, 64, 16, 128, 2, 1, producer_regs=56, maxnreg=128),
           _cand(80, 64, 16, 64, 3, 1, producer_regs=56), _cand(80, 64, 16, 128, 2, 1, producer_regs=56),
           _cand(40, 32, 16, 64, 3, 1, producer_regs=56, maxnreg=128),
           _cand(40, 32, 16, 128, 2, 1, producer_regs=56)],
}


def child(cand: dict, out_path: str) -> None:
    import torch
    import triton.testing as tt
    import torch.nn.functional as F

    import attn_probe4_gluon_ws_kernel as ag
    from kernels import attention_triton as at

    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, b, nq, nk, d in SHAPES:
        if d != cand["head_dim"] or ONLY not in name:
            continue
        q = torch.randn(b, nq, HEADS * d, device="cuda", generator=gen, dtype=torch.float16).view(b, nq, HEADS, d)
        k = torch.randn(b, nk, HEADS * d, device="cuda", generator=gen, dtype=torch.float16).view(b, nk, HEADS, d)
        v = torch.randn(b, nk, HEADS * d, device="cuda", generator=gen, dtype=torch.float16).view(b, nk, HEADS, d)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]-indexed views
        out = torch.empty(b, nq, HEADS, d, device="cuda", dtype=torch.float16).transpose(1, 2)
        scale = d ** -0.5
        row = dict(name=name, batch=b, **cand)
        t0 = time.time()
        try:
            ws = lambda: ag.launch_ws(qt, kt, vt, out, scale, cand["head_a"], cand["head_b"],  # noqa: E731
                                      cand["block_m"], cand["block_n"], cand["stages"], cand["consumers"],
                                      cand["pingpong"], producer_regs=cand["producer_regs"],
                                      maxnreg=cand.get("maxnreg"))
            ws()
            torch.cuda.synchronize()
            ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float())
            row["max_abs_err"] = float((out.float() - ref).abs().max())
            row["ok"] = row["max_abs_err"] < 2e-2
            if row["ok"]:
                row["ws_us"] = tt.do_bench_cudagraph(ws, rep=100) * 1e3
                row["sdpa_us"] = tt.do_bench_cudagraph(lambda: F.scaled_dot_product_attention(qt, kt, vt),
                                                       rep=100) * 1e3
                shipped = lambda: at.attention_bnhd(q, k, v)  # noqa: E731
                shipped()
                row["shipped_us"] = tt.do_bench_cudagraph(shipped, rep=100) * 1e3
                row["speedup_vs_sdpa"] = row["sdpa_us"] / row["ws_us"]
        except Exception as e:  # noqa: BLE001 - a compile error is a result here
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
        row["seconds"] = round(time.time() - t0, 1)
        with open(out_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        if "error" in row and "CUDA" in row["error"]:
            return


def scan(out_path: str) -> None:
    """Time vs number of keys (fixed query count): the slope is the cost per key block, the intercept
    the fixed cost of a launch (CTA start, first loads, epilogue)."""
    import torch
    import torch.nn.functional as F
    import triton.testing as tt

    import attn_probe4_gluon_ws_kernel as ag
    from kernels import attention_triton as at

    gen = torch.Generator(device="cuda").manual_seed(0)
    for b, nq, d, split, cfg in ((2, 1024, 80, (64, 16), dict(block_n=128, stages=2, consumers=2)),
                                 (2, 4096, 40, (32, 16), dict(block_n=128, stages=2, consumers=2))):
        for nk in (128, 256, 512, 1024, 2048, 4096):
            q = torch.randn(b, nq, HEADS * d, device="cuda", generator=gen, dtype=torch.float16).view(b, nq, HEADS, d)
            k = torch.randn(b, nk, HEADS * d, device="cuda", generator=gen, dtype=torch.float16).view(b, nk, HEADS, d)
            v = torch.randn(b, nk, HEADS * d, device="cuda", generator=gen, dtype=torch.float16).view(b, nk, HEADS, d)
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            out = torch.empty(b, nq, HEADS, d, device="cuda", dtype=torch.float16).transpose(1, 2)
            ws = lambda: ag.launch_ws(qt, kt, vt, out, d ** -0.5, *split, block_m=64, **cfg)  # noqa: E731
            ws()
            torch.cuda.synchronize()
            tri = lambda: at.attention_bnhd(q, k, v, loads="tma2d", split_mode="split16",  # noqa: E731
                                            config=dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2))
            tri()
            row = dict(scan=True, batch=b, n_q=nq, n_kv=nk, head_dim=d,
                       ws_us=tt.do_bench_cudagraph(ws, rep=50) * 1e3,
                       triton_us=tt.do_bench_cudagraph(tri, rep=50) * 1e3,
                       sdpa_us=tt.do_bench_cudagraph(lambda: F.scaled_dot_product_attention(qt, kt, vt), rep=50) * 1e3)
            print(json.dumps(row), flush=True)
            with open(out_path, "a") as f:
                f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", default="consumers", choices=sorted(CANDIDATE_SETS))
    ap.add_argument("--only", default="", help="run only the shapes whose name contains this")
    ap.add_argument("--timeout", type=float, default=90)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--scan", action="store_true", help="time vs number of keys instead of the candidate set")
    args = ap.parse_args()
    if args.scan:
        scan(args.out)
        return
    os.environ["WS_PROBE_ONLY"] = args.only
    if args.child:
        child(json.loads(args.child), args.out)
        return
    import torch
    import triton
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                triton=triton.__version__)) + "\n")
    for cand in CANDIDATE_SETS[args.set]:
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, __file__, "--out", args.out, "--child", json.dumps(cand)],
                                  timeout=args.timeout, capture_output=True, text=True, env=os.environ)
            status = f"rc {proc.returncode}"
            if proc.returncode:
                status += " " + proc.stderr[-1500:]
        except subprocess.TimeoutExpired:
            status = "TIMEOUT (hang)"
        with open(args.out, "a") as f:
            f.write(json.dumps(dict(candidate=cand, status=status, seconds=round(time.time() - t0, 1))) + "\n")
        print(cand, status, flush=True)


if __name__ == "__main__":
    main()
