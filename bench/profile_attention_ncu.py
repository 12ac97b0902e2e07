"""Launch the issue's goal-shape attentions that miss 1.3x (self 256 d160 meets it) once through our kernel
(its measured table launch) and once through torch SDPA, for a profiler (Nsight Compute) to attach to:

    ncu -k regex:'attn|fmha|flash|sdpa' --set full python3 bench/profile_attention_ncu.py

With --ws (run 56), only self 4096 d40, plus the seventh session's probes from bench/results: the
warp-specialised Gluon kernel (2 consumers, 32+16 slabs, 128-key blocks) and the softmax-only floor.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "results"))
from caphuman.kernels import attention_triton as at  # noqa: E402

SHAPES = [(2, 4096, 4096, 40), (2, 4096, 77, 40), (2, 4096, 258, 40), (2, 1024, 1024, 80)]


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = "--ws" in sys.argv
    for b, nq, nk, d in SHAPES[:1] if ws else SHAPES:
        q, k, v = (torch.randn(b, n, 8 * d, device="cuda", dtype=torch.float16, generator=gen).view(b, n, 8, d)
                   for n in (nq, nk, nk))
        at.attention_bnhd(q, k, v)  # ncu profiles this one launch (kernel time only, compile excluded)
        F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        if ws:
            import attn_probe4_gluon_ws_kernel as ag
            import softmax_floor_probe_h100_run56 as floor
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            out = torch.empty_like(q).transpose(1, 2)
            ag.launch_ws(qt, kt, vt, out, d ** -0.5, 32, 16, 64, 128, 2, 2, True, producer_regs=24)
            buf = torch.empty(b * 8 * nq, device="cuda")
            floor._softmax_only[(b * 8 * nq // 64, )](buf, nk // 128, 0.2, MODE=1, BLOCK_M=64, BLOCK_N=128)
        torch.cuda.synchronize()
        print(f"shape B{b} {nq}x{nk} d{d}: table {at.tuned_launch(nq, nk, d, b * 8, at.device_capability(q.device))}",
              flush=True)


if __name__ == "__main__":
    main()
