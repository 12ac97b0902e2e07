"""Probe (seventh session, H100 run 60): the TMA attention kernel's output written with TMA stores
(attention_triton.TMA_STORE_OUTPUT) vs masked pointer stores.

For the goal shapes that run the TMA kernel, each (layout, config) is timed with the option off and
on, same process and inputs, in CUDA graphs, next to SDPA (cuDNN), and checked against an fp32
reference. One JSON line per measurement goes to --out as it is taken.

    python3 bench/results/tma_store_probe_h100_run60.py --out $OUT/tma_store.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kernels import attention_triton as at  # noqa: E402

HEADS = 8
# (batch, n_q, n_kv, head_dim, loads, split, (BLOCK_M, BLOCK_N, warps, stages))
VARIANTS = [  # the four TUNED_LAUNCHES entries that run the TMA kernel, then neighbours
    (2, 1024, 1024, 80, "tma2d", "split16", (64, 128, 4, 2)),
    (1, 1024, 1024, 80, "tma4d", "split16", (64, 128, 4, 3)),
    (2, 4096, 4096, 40, "tma2d", "split32", (128, 128, 8, 3)),
    (1, 4096, 4096, 40, "tma2d", "split32", (128, 128, 8, 3)),
    (2, 1024, 1024, 80, "tma2d", "split16", (64, 128, 4, 3)),
    (2, 1024, 1024, 80, "tma2d", "split16", (128, 128, 8, 3)),
    (2, 1024, 1024, 80, "tma4d", "split16", (64, 128, 4, 2)),
    (2, 1024, 1024, 80, "tma2d", "split16", (64, 64, 4, 3)),
]


def main() -> None:
    import triton
    import triton.testing as tt

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with open(out_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    emit(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for b, nq, nk, d, loads, split, cfg in VARIANTS:
        q, k, v = (torch.randn(b, n, HEADS * d, device="cuda", generator=gen, dtype=torch.float16)
                   .view(b, n, HEADS, d) for n in (nq, nk, nk))
        ref = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
        config = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), cfg))
        row = dict(batch=b, n_q=nq, n_kv=nk, head_dim=d, loads=loads, split=split, config=cfg)
        row["sdpa_us"] = tt.do_bench_cudagraph(
            lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))), rep=100) * 1e3
        for flag in (False, True):
            at.TMA_STORE_OUTPUT = flag
            fn = lambda: at.attention_bnhd(q, k, v, config=config, split_mode=split, loads=loads)  # noqa: E731
            o = fn()
            torch.cuda.synchronize()
            key = "tma" if flag else "ptr"
            row[f"err_{key}"] = float((o.float() - ref).abs().max())
            row[f"{key}_us"] = tt.do_bench_cudagraph(fn, rep=100) * 1e3
        at.TMA_STORE_OUTPUT = False
        row["gain"] = row["ptr_us"] / row["tma_us"]
        row["tma_vs_sdpa"] = row["sdpa_us"] / row["tma_us"]
        row["ptr_vs_sdpa"] = row["sdpa_us"] / row["ptr_us"]
        emit(row)


if __name__ == "__main__":
    main()
