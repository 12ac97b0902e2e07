"""Run 38 probe (sixth session): does ptxas' wgmma serialization (C7515) slow the d40 self-attention?

A stripped copy of the TMA kernel's loop (tma2d, one 64-wide slab for head dim 40) in variants:
  0: as shipped (Q's bleed columns zeroed with tl.where: ptxas serializes every wgmma, C7515)
  2: no zeroing (wrong results; timing only: no serialization)
  3: each 128-key block as two 64-key halves
  5: Q through a 3-D [B*N, H, D] descriptor that TMA zero-fills past D (correct, no serialization)
Result (bench/results/attn_probe3_h100_run38_wgmma.jsonl, H100, B2 4096x4096 d40): variants 0, 2 and
5 within 6% of each other at every config (197 / 196 / 193 us at (128, 128, 8, 3)); removing the
serialization does not speed the kernel up. Variant 5 was wrong at (128, 64, 8, 3) (err 0.35; not
investigated) and correct at the other four configs.
Run: python3 bench/results/attn_probe3_h100_run38_wgmma.py (writes $OUT/probe_pp.jsonl).
"""
import sys, json, os, math, time
from pathlib import Path
import triton
import triton.language as tl


@triton.jit
def _k(q_desc, k_desc, v_desc, Out, stride_ob, stride_oh, stride_on, N_HEADS, N_Q, N_KV, qk_scale,
       HEAD_DIM: tl.constexpr, HEAD_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
       VARIANT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // N_HEADS
    h = pid_bh % N_HEADS
    m0 = pid_m * BLOCK_M
    q_row = b * N_Q + m0
    kv_row = b * N_KV
    col = h * HEAD_DIM
    if VARIANT == 5:
        q = tl.reshape(q_desc.load([q_row, h, 0]), [BLOCK_M, HEAD_A])
    else:
        q = q_desc.load([q_row, col])
    if VARIANT != 2 and VARIANT != 4 and VARIANT != 5:
        q = tl.where((tl.arange(0, HEAD_A) < HEAD_DIM)[None, :], q, 0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_A], dtype=tl.float32)
    for start_n in range(0, N_KV, BLOCK_N):
        if VARIANT == 3 or VARIANT == 4:
            HALF: tl.constexpr = BLOCK_N // 2
            k1 = k_desc.load([kv_row + start_n, col])
            k2 = k_desc.load([kv_row + start_n + HALF, col])
            s1 = tl.dot(q, tl.trans(k1))
            s2 = tl.dot(q, tl.trans(k2))
            m_new = tl.maximum(m_i, tl.maximum(tl.max(s1, 1), tl.max(s2, 1)) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            p1 = tl.exp2(s1 * qk_scale - m_new[:, None])
            p2 = tl.exp2(s2 * qk_scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p1, 1) + tl.sum(p2, 1)
            v1 = v_desc.load([kv_row + start_n, col])
            v2 = v_desc.load([kv_row + start_n + HALF, col])
            acc = tl.dot(p1.to(tl.float16), v1, acc * alpha[:, None])
            acc = tl.dot(p2.to(tl.float16), v2, acc)
            m_i = m_new
        else:
            k = k_desc.load([kv_row + start_n, col])
            s = tl.dot(q, tl.trans(k))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s * qk_scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = v_desc.load([kv_row + start_n, col])
            if VARIANT == 1:
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
            else:
                acc = tl.dot(p.to(tl.float16), v, acc * alpha[:, None])
            m_i = m_new
    offs_m = m0 + tl.arange(0, BLOCK_M)
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    offs_a = tl.arange(0, HEAD_A)
    tl.store(o_base + offs_m[:, None] * stride_on + offs_a[None, :], (acc / l_i[:, None]).to(tl.float16),
             mask=(offs_m < N_Q)[:, None] & (offs_a < HEAD_DIM)[None, :])


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch, torch.nn.functional as F, triton
from triton.tools.tensor_descriptor import TensorDescriptor
import triton.testing as tt
from kernels import attention_triton as at
out = Path(os.environ.get("OUT", "/tmp")) / "probe_pp.jsonl"
B, N, H, D = 2, 4096, 8, 40
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, N, H * D, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
q4, k4, v4 = (t.view(B, N, H, D) for t in (q, k, v))
ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q4, k4, v4))).transpose(1, 2)
def rec(**kw):
    print(json.dumps(kw), flush=True); out.open("a").write(json.dumps(kw) + "\n")
rec(name="sdpa", us=tt.do_bench_cudagraph(lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q4, k4, v4))), rep=200) * 1e3)
rec(name="table", us=tt.do_bench_cudagraph(lambda: at.attention_bnhd(q4, k4, v4), rep=200) * 1e3)
rec(name="tma4d_s32_128_128_8_3", us=tt.do_bench_cudagraph(lambda: at.attention_bnhd(q4, k4, v4, loads="tma4d", split_mode="split32", config=dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)), rep=200) * 1e3)
o = torch.empty(B, N, H, D, device="cuda", dtype=torch.float16)
for variant in (0, 2, 3, 5):
    for (bm, bn, w, st) in [(128, 128, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (64, 128, 4, 2), (128, 64, 8, 3)]:
        try:
            if variant == 5:
                qd = TensorDescriptor(q, [B * N, H, D], [H * D, D, 1], [bm, 1, 64])
            else:
                qd = TensorDescriptor(q, [B * N, H * D], [H * D, 1], [bm, 64])
            kd = TensorDescriptor(k, [B * N, H * D], [H * D, 1], [bn, 64])
            vd = TensorDescriptor(v, [B * N, H * D], [H * D, 1], [bn, 64])
            fn = lambda: _k[(N // bm, B * H)](qd, kd, vd, o, o.stride(0), o.stride(2), o.stride(1), H, N, N,
                                                       (1 / math.sqrt(D)) * 1.4426950408889634, HEAD_DIM=D, HEAD_A=64,
                                                       BLOCK_M=bm, BLOCK_N=bn, VARIANT=variant, num_warps=w, num_stages=st)
            fn(); torch.cuda.synchronize()
            err = (o.float() - ref.float()).abs().max().item()
            rec(name=f"v{variant}", config=[bm, bn, w, st], err=err, us=tt.do_bench_cudagraph(fn, rep=200) * 1e3)
        except Exception as e:
            rec(name=f"v{variant}", config=[bm, bn, w, st], error=repr(e)[:300])
