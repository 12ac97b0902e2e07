"""Fused attention forward (FlashAttention-2 style) in OpenAI Triton, for CapHuman's shapes.

Inference only: softmax(q k^T * scale) v with an online softmax, fp16/bf16 in, fp32 accumulation,
no mask, no dropout, no backward. Credits: Dao et al., FlashAttention-2 (2023); the structure
follows the Triton fused-attention tutorial (06-fused-attention.py), written anew here.

CapHuman at 512x512 runs self-attention over 4096/1024/256/64 tokens at head dims 40/80/160/160 and
cross-attention from those queries to 77 text tokens (UNet) or 258 identity tokens (CapFace).
Head dims 40, 80 and 160 are not powers of two. The kernel covers the head dim with one or two
power-of-two slabs ``HEAD_A (+ HEAD_B)`` addressed with masks (no tensor copies): either one padded
slab (64/128/256, as FlashAttention does), or two slabs with one ``tl.dot`` each (80 = 64 + 16,
160 = 128 + 32 exactly; 40 = 32 + 16), which skips the 37.5% of padded work. Which one runs is
``DEFAULT_SPLIT_MODE``, chosen from measurements on the H100 (docs/kernels.md).

Two kernels, both written only to API present in Triton 3.6 and 3.9: ``_attn_fwd`` (masked
tl.load/tl.store; full key blocks unmasked, the leftover keys in one narrow tail block) and
``_attn_fwd_tma`` (Q/K/V tiles through host tensor descriptors, Hopper's TMA). ``TUNED_LAUNCHES``
holds the measured (kernel, split, config) of each CapHuman problem on the H100.

Layouts: every tensor is addressed through explicit batch/head/token strides (the head dim must be
contiguous), so the [B, N, H, D] views of
diffusers' [B, N, H*D] projections go in without a transpose or copy (see ``attention_bnhd``).

Set ``TRITON_INTERPRET=1`` before importing triton to run the kernel on CPU tensors (CI).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

try:  # Triton is optional: the module imports (and the reference works) without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False
try:  # host tensor descriptors (TMA) arrived in Triton 3.4; without them only the pointer kernel runs
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAS_TMA = True
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None
    HAS_TMA = False

__all__ = [
    "HAS_TMA",
    "HAS_TRITON",
    "LOAD_MODES",
    "SUPPORTED_DTYPES",
    "TUNED_LAUNCHES",
    "TunedLaunch",
    "attention",
    "attention_bnhd",
    "attention_reference",
    "device_capability",
    "interpreter_enabled",
    "split_head_dim",
    "tail_block",
    "tma_layout_reason",
    "triton_supports",
    "tuned_launch",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634  # 1/ln(2): softmax runs in base 2 so that tl.exp2 maps to one MUFU op


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # read once: triton reads it at import


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRET


@functools.lru_cache(maxsize=256)
def split_head_dim(head_dim: int, min_slab: int = 16) -> tuple[int, int]:
    """Split ``head_dim`` into power-of-two slabs (HEAD_A, HEAD_B) with HEAD_A + HEAD_B >= head_dim.

    HEAD_B is 0 (single slab) or >= ``min_slab`` (>= 16, the smallest K of tl.dot). Falls back to
    one padded slab when two slabs would not save anything. With min_slab 16: 40 -> (32, 16),
    80 -> (64, 16), 160 -> (128, 32), 64 -> (64, 0), 100 -> (128, 0). ``min_slab=0`` means
    "never split": one padded power-of-two slab (40 -> (64, 0)).
    """
    if head_dim < 1 or head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} must be in [1, {_MAX_HEAD_DIM}]")
    pow2 = max(16, 1 << (head_dim - 1).bit_length())
    if min_slab == 0 or pow2 == head_dim or pow2 == 16:
        return pow2, 0
    if min_slab < 16 or min_slab & (min_slab - 1):
        raise ValueError(f"min_slab={min_slab} must be 0 or a power of two >= 16")
    head_a = pow2 // 2
    head_b = max(min_slab, 1 << (head_dim - head_a - 1).bit_length())
    if head_b >= head_a:  # two equal slabs cost as much as one padded slab
        return pow2, 0
    return head_a, head_b


# How a non-power-of-two head dim is laid out: "padded" (one power-of-two slab, as FlashAttention
# does), "split16"/"split32" (two slabs, the second at least 16/32 wide). Measured on the H100 with
# Triton 3.6 (bench/bench_kernels.py, docs/kernels.md): split32 gives the fastest step (d40 -> 64
# padded, d80 -> 64+32, d160 -> 128+32); split16 (a 16-wide second slab, i.e. wgmma with N=16/K=16
# operands) hits illegal memory accesses in Triton 3.6 on sm_90 for 10 of 12 configs, so it is
# never the default.
SPLIT_MODES = {"padded": 0, "split16": 16, "split32": 32}
DEFAULT_SPLIT_MODE = "split32"

# How Q/K/V tiles reach shared memory: "pointer" (masked tl.load, cp.async pipelining) or the Hopper
# TMA engine through host tensor descriptors, either "tma4d" ([B, H, N, D] descriptors: exact
# zero-fill) or "tma2d" ([B*N, H*D] row descriptors, as the Triton tutorial does; needs packed heads
# and batches). Where TMA cannot describe the tensors (16-byte alignment, packing, pre-Hopper GPU,
# Triton < 3.4) a default or tuned choice falls back to "pointer"; an explicit ``loads=`` raises.
LOAD_MODES = ("pointer", "tma2d", "tma4d")
DEFAULT_LOADS = "pointer"


@dataclass(frozen=True)
class TunedLaunch:
    """The measured-fastest launch of one attention problem on one GPU architecture."""

    loads: str  # one of LOAD_MODES
    split_mode: str  # one of SPLIT_MODES
    config: tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    triton_us: float  # GPU time inside a CUDA graph ...
    sdpa_us: float  # ... and torch SDPA's on the same inputs, in the same run

    @property
    def beats_sdpa(self) -> bool:
        return self.triton_us < self.sdpa_us


# Per compute capability, keyed (N_Q, N_KV, HEAD_DIM, B*H): CapHuman's 512x512 problems (UNet at
# batch 2, CapFace at batch 1, 8 heads). H100, Triton 3.6, torch 2.11 (cuDNN SDPA), fp16, [B, N, H, D]
# views; the best of 4 layouts x 10 configs (bench/results/kernels_h100_run26_tma.json; each ran clean
# and correct, with 30 repeated launches, on every shape whose shared memory it fits: all 17, or 9 for
# the 128-wide ones; run27 repeated them within ~3%), and of 16 configs on the four largest problems
# (kernels_h100_run30_sweep.json, screened on those four: only self 1024 d80 at batch 2 changed). The
# nine cross-attention entries (# run47) are the pointer kernel with its narrow tail key block, the best of
# 8 configs screened clean wherever their shared memory fits (kernels_h100_run47_tail_loop.json, sixth
# session; cross 4096x258 at batch 1 keeps run 46's (128,64,8,3), 0.8% from run 47's best). Every
# entry passed the full-size GPU test at its own shape (tests/kernels/test_kernels_attention.py, -m gpu).
# Used for fp16 only (bf16 was not screened). A fixed choice per shape instead of autotune:
# deterministic, no tuning on a fresh server, and autotune's own timing (launch overhead included)
# picked configs up to 1.45x slower on the small problems.
TUNED_LAUNCHES: dict[tuple[int, int], dict[tuple[int, int, int, int], TunedLaunch]] = {
    (9, 0): {
        (4096, 4096, 40, 16): TunedLaunch("tma2d", "split32", (128, 128, 8, 3), 158.4, 161.7),
        (4096, 4096, 40, 8): TunedLaunch("tma2d", "split32", (128, 128, 8, 3), 78.2, 82.6),
        (4096, 77, 40, 16): TunedLaunch("pointer", "split32", (64, 64, 4, 2), 10.5, 13.8),  # run47
        (4096, 258, 40, 16): TunedLaunch("pointer", "split32", (128, 64, 8, 3), 18.2, 23.8),  # run47
        (4096, 258, 40, 8): TunedLaunch("pointer", "split32", (128, 64, 8, 3), 10.6, 14.8),  # run47
        (1024, 1024, 80, 16): TunedLaunch("tma2d", "split16", (64, 128, 4, 2), 16.4, 18.3),  # run30
        (1024, 1024, 80, 8): TunedLaunch("tma4d", "split16", (64, 128, 4, 3), 12.7, 17.1),
        (1024, 77, 80, 16): TunedLaunch("pointer", "split32", (64, 64, 4, 2), 5.2, 8.3),  # run47
        (1024, 258, 80, 8): TunedLaunch("pointer", "split32", (64, 64, 4, 3), 6.3, 10.6),  # run47
        (256, 256, 160, 16): TunedLaunch("pointer", "split32", (64, 64, 4, 3), 6.9, 10.6),
        (256, 256, 160, 8): TunedLaunch("pointer", "split32", (64, 64, 4, 3), 6.8, 10.0),
        (256, 77, 160, 16): TunedLaunch("pointer", "split32", (64, 64, 4, 2), 4.6, 8.6),  # run47
        (256, 258, 160, 8): TunedLaunch("pointer", "split32", (64, 64, 4, 3), 7.6, 12.9),  # run47
        (64, 64, 160, 16): TunedLaunch("pointer", "split32", (64, 64, 4, 3), 3.9, 8.4),
        (64, 64, 160, 8): TunedLaunch("pointer", "split32", (64, 64, 4, 3), 3.8, 8.1),
        (64, 77, 160, 16): TunedLaunch("pointer", "split32", (64, 64, 4, 2), 4.5, 8.3),  # run47
        (64, 258, 160, 8): TunedLaunch("pointer", "split32", (64, 64, 4, 3), 7.5, 12.7),  # run47
    },
}

_CAPABILITY: dict[int, tuple[int, int]] = {}


@torch.compiler.assume_constant_result  # torch.compile folds it at trace time instead of tracing the query
def device_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device (cached: looked up once per device), None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _CAPABILITY:
        _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return _CAPABILITY[index]


def tuned_launch(n_q: int, n_kv: int, head_dim: int, batch_heads: int,
                 capability: tuple[int, int] | None) -> TunedLaunch | None:
    """The measured launch for this problem on this architecture, or None (then: autotune)."""
    if capability is None:
        return None
    return TUNED_LAUNCHES.get(tuple(capability), {}).get((n_q, n_kv, head_dim, batch_heads))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) autotuned for the TMA kernel: the per-shape winners of
# bench/results/kernels_h100_run26_tma.json, each screened clean there (the 128-wide ones on the 9
# shapes whose shared memory they fit; autotune skips a config that runs out of resources).
TMA_CONFIG_TUPLES = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 128, 4, 3), (64, 64, 4, 3),
                     (64, 32, 4, 2)]


def tail_block(n_kv: int, block_n: int) -> int:
    """Width of the pointer kernel's last, masked key block: the keys past the last full block of
    ``block_n``, rounded up to a power of two of at least 16 (tl.dot's minimum); 0 when none are left."""
    rest = n_kv % block_n
    return 0 if rest == 0 else max(16, 1 << (rest - 1).bit_length())


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """float64 reference: softmax(q k^T * scale) v on [B, H, N, D]; returns float64 [B, H, Nq, D]."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    q64, k64, v64 = q.double(), k.double(), v.double()
    s = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v64)


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when the Triton kernel can run these inputs here, else the reason it cannot."""
    if not HAS_TRITON:
        return "triton is not installed"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not one of {SUPPORTED_DTYPES}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if q.shape[-1] > _MAX_HEAD_DIM or q.shape[-1] < 1:
        return f"head dim {q.shape[-1]} is outside [1, {_MAX_HEAD_DIM}]"
    if not (q.is_cuda or interpreter_enabled()):
        return f"tensors are on {q.device} and TRITON_INTERPRET is not set"
    return None


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _online_softmax_block(s, m_i, l_i, qk_scale):
        """One key block of the base-2 online softmax: returns (p, alpha, m_new, l_new).

        Every block holds >= 1 valid key, so m_new is finite."""
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_new = l_i * alpha + tl.sum(p, 1)
        return p, alpha, m_new, l_new

    @triton.jit
    def _load_rows(ptrs, row_mask, head_mask, MASKED: tl.constexpr):
        """A K^T or V tile: head-dim columns past HEAD_DIM read as 0, and keys past N_KV too if MASKED."""
        if MASKED:
            tile = tl.load(ptrs, mask=row_mask & head_mask, other=0.0)
        else:
            tile = tl.load(ptrs, mask=head_mask, other=0.0)
        return tile

    @triton.jit
    def _ptr_key_block(q_a, q_b, acc_a, acc_b, m_i, l_i, k_base, v_base, start_n, stride_kn, stride_vn, N_KV,
                       qk_scale, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, HEAD_A: tl.constexpr,
                       HEAD_B: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr, dot_ty: tl.constexpr,
                       io_ty: tl.constexpr):
        """One block of BLOCK keys from start_n (pointer loads): S = Q K^T, online softmax, acc += P V.

        MASKED: the block reaches past N_KV (keys past it load as 0 and score -inf)."""
        kv_n = start_n + tl.arange(0, BLOCK)
        rows_k = tl.multiple_of(kv_n * stride_kn, ALIGN)
        rows_v = tl.multiple_of(kv_n * stride_vn, ALIGN)
        n_mask = kv_n < N_KV
        offs_a = tl.arange(0, HEAD_A)
        a_mask = offs_a < HEAD_DIM
        # K is read as K^T tiles [HEAD, BLOCK] (as the Triton tutorial does): measured faster than
        # loading [BLOCK, HEAD] and transposing in the dot
        k_a = _load_rows(k_base + rows_k[None, :] + offs_a[:, None], n_mask[None, :], a_mask[:, None], MASKED)
        s = tl.dot(q_a, k_a.to(dot_ty))
        if HEAD_B > 0:
            offs_b = HEAD_A + tl.arange(0, HEAD_B)
            b_mask = offs_b < HEAD_DIM
            k_b = _load_rows(k_base + rows_k[None, :] + offs_b[:, None], n_mask[None, :], b_mask[:, None], MASKED)
            s = tl.dot(q_b, k_b.to(dot_ty), s)
        if MASKED:
            s = tl.where(n_mask[None, :], s, float("-inf"))
        p, alpha, m_new, l_new = _online_softmax_block(s, m_i, l_i, qk_scale)
        # P is rounded to the input dtype (as FlashAttention does) before the second product
        p = p.to(io_ty).to(dot_ty)
        v_a = _load_rows(v_base + rows_v[:, None] + offs_a[None, :], n_mask[:, None], a_mask[None, :], MASKED)
        acc_a = tl.dot(p, v_a.to(dot_ty), acc_a * alpha[:, None])
        if HEAD_B > 0:
            v_b = _load_rows(v_base + rows_v[:, None] + offs_b[None, :], n_mask[:, None], b_mask[None, :], MASKED)
            acc_b = tl.dot(p, v_b.to(dot_ty), acc_b * alpha[:, None])
        return acc_a, acc_b, m_new, l_new

    @triton.jit
    def _attn_fwd(
        Q, K, V, Out,  #
        # The head dim is contiguous (stride 1) in every tensor, by contract of the launcher: with a
        # runtime stride there Triton 3.6 emits 2-byte scalar loads and no cp.async pipelining
        # (measured: 300 us vs 187 us on self 4096 d40, bench/results/attn_probe_h100.json).
        stride_qb, stride_qh, stride_qn,  #
        stride_kb, stride_kh, stride_kn,  #
        stride_vb, stride_vh, stride_vn,  #
        stride_ob, stride_oh, stride_on,  #
        N_HEADS, N_Q, N_KV,  #
        qk_scale,  # scale * log2(e)
        HEAD_DIM: tl.constexpr,  # constexpr so the head-dim masks are known at compile time: 40/80/160
        # are multiples of 8, so K/V/Q rows load as 16-byte vectors (a runtime 40 is not specialised
        # by Triton, which would make every masked load a 2-byte scalar load)
        ALIGN: tl.constexpr,  # every batch/head/token offset is a multiple of this many elements
        HEAD_A: tl.constexpr,  # first power-of-two slab of the head dim
        HEAD_B: tl.constexpr,  # second slab (0: none)
        TAIL_N: tl.constexpr,  # keys past the last full BLOCK_N block, rounded up to a power of two >= 16; 0: none
        BLOCK_M: tl.constexpr,  #
        BLOCK_N: tl.constexpr,  #
        DOT_F32: tl.constexpr,  # interpreter only: its tl.dot mishandles bf16, so dot in fp32 there
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // N_HEADS
        h = pid_bh % N_HEADS
        # ALIGN (host-computed) tells the compiler what the offsets are multiples of: a head stride
        # of 40 is not specialised by Triton, and unknown alignment means 2-byte scalar loads.
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        q_base = Q + tl.multiple_of(b64 * stride_qb + h64 * stride_qh, ALIGN)
        k_base = K + tl.multiple_of(b64 * stride_kb + h64 * stride_kh, ALIGN)
        v_base = V + tl.multiple_of(b64 * stride_vb + h64 * stride_vh, ALIGN)
        o_base = Out + tl.multiple_of(b64 * stride_ob + h64 * stride_oh, ALIGN)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_q = tl.multiple_of(offs_m * stride_qn, ALIGN)
        rows_o = tl.multiple_of(offs_m * stride_on, ALIGN)
        offs_a = tl.arange(0, HEAD_A)
        m_mask = offs_m < N_Q
        a_mask = offs_a < HEAD_DIM

        # q stays in registers/SRAM for the whole key loop: read BLOCK_M x D once.
        q_a = tl.load(q_base + rows_q[:, None] + offs_a[None, :],
                      mask=m_mask[:, None] & a_mask[None, :], other=0.0)
        dot_ty = tl.float32 if DOT_F32 else Q.dtype.element_ty
        q_a = q_a.to(dot_ty)
        if HEAD_B > 0:
            offs_b = HEAD_A + tl.arange(0, HEAD_B)
            b_mask = offs_b < HEAD_DIM
            q_b = tl.load(q_base + rows_q[:, None] + offs_b[None, :],
                          mask=m_mask[:, None] & b_mask[None, :], other=0.0).to(dot_ty)
            acc_b = tl.zeros([BLOCK_M, HEAD_B], dtype=tl.float32)
        else:  # placeholders: the block helper takes both slabs and ignores B when HEAD_B == 0
            q_b = q_a
            acc_b = tl.zeros([BLOCK_M, 16], dtype=tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_a = tl.zeros([BLOCK_M, HEAD_A], dtype=tl.float32)

        # Full blocks without key masks, then the keys left over (77 = 2 x 32 + 13, 258 = 4 x 64 + 2) in
        # one narrower masked block of TAIL_N, instead of a whole masked BLOCK_N block.
        n_full = (N_KV // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc_a, acc_b, m_i, l_i = _ptr_key_block(q_a, q_b, acc_a, acc_b, m_i, l_i, k_base, v_base, start_n,
                                                    stride_kn, stride_vn, N_KV, qk_scale, HEAD_DIM, ALIGN, HEAD_A,
                                                    HEAD_B, BLOCK_N, False, dot_ty, Q.dtype.element_ty)
        if TAIL_N > 0:
            # One iteration, written as a loop: as straight-line code, the tail crashed Triton 3.6 on the
            # H100 (illegal memory access at d80 with BLOCK_N 128, bench/results/kernels_h100_run46_tail.json).
            for start_n in range(n_full, N_KV, TAIL_N):
                acc_a, acc_b, m_i, l_i = _ptr_key_block(q_a, q_b, acc_a, acc_b, m_i, l_i, k_base, v_base, start_n,
                                                        stride_kn, stride_vn, N_KV, qk_scale, HEAD_DIM, ALIGN,
                                                        HEAD_A, HEAD_B, TAIL_N, True, dot_ty, Q.dtype.element_ty)

        inv_l = 1.0 / l_i
        out_a = (acc_a * inv_l[:, None]).to(Out.dtype.element_ty)
        tl.store(o_base + rows_o[:, None] + offs_a[None, :], out_a,
                 mask=m_mask[:, None] & a_mask[None, :])
        if HEAD_B > 0:
            out_b = (acc_b * inv_l[:, None]).to(Out.dtype.element_ty)
            tl.store(o_base + rows_o[:, None] + offs_b[None, :], out_b,
                     mask=m_mask[:, None] & b_mask[None, :])

    @triton.jit
    def _tma_tile(desc, b, h, row, col, BLOCK: tl.constexpr, WIDTH: tl.constexpr, DESC_4D: tl.constexpr):
        """One [BLOCK, WIDTH] tile through a TMA descriptor.

        4-D descriptors index [B, H, N, D] (row = token, col = offset in the head dim); 2-D ones index
        [B*N, H*D] rows (row and col already include the batch and head offsets)."""
        if DESC_4D:
            tile = tl.reshape(desc.load([b, h, row, col]), [BLOCK, WIDTH])
        else:
            tile = desc.load([row, col])
        return tile

    @triton.jit
    def _scores(q_a, q_b, k_a_desc, k_b_desc, b, h, row, col_a, col_b, BLOCK_N: tl.constexpr,
                HEAD_A: tl.constexpr, HEAD_B: tl.constexpr, DESC_4D: tl.constexpr, dot_ty: tl.constexpr):
        """S = Q K^T for one key block (both head-dim slabs)."""
        k_a = _tma_tile(k_a_desc, b, h, row, col_a, BLOCK_N, HEAD_A, DESC_4D).to(dot_ty)
        s = tl.dot(q_a, tl.trans(k_a))
        if HEAD_B > 0:
            k_b = _tma_tile(k_b_desc, b, h, row, col_b, BLOCK_N, HEAD_B, DESC_4D).to(dot_ty)
            s = tl.dot(q_b, tl.trans(k_b), s)
        return s

    @triton.jit
    def _attend(s, m_i, l_i, acc_a, acc_b, qk_scale, v_a_desc, v_b_desc, b, h, row, col_a, col_b,
                BLOCK_N: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr, DESC_4D: tl.constexpr,
                dot_ty: tl.constexpr, io_ty: tl.constexpr):
        """Online softmax of one (already masked) score block, then acc = acc * alpha + P V."""
        p, alpha, m_new, l_new = _online_softmax_block(s, m_i, l_i, qk_scale)
        p = p.to(io_ty).to(dot_ty)  # P rounded to the input dtype, as FlashAttention does
        v_a = _tma_tile(v_a_desc, b, h, row, col_a, BLOCK_N, HEAD_A, DESC_4D).to(dot_ty)
        acc_a = tl.dot(p, v_a, acc_a * alpha[:, None])
        if HEAD_B > 0:
            v_b = _tma_tile(v_b_desc, b, h, row, col_b, BLOCK_N, HEAD_B, DESC_4D).to(dot_ty)
            acc_b = tl.dot(p, v_b, acc_b * alpha[:, None])
        return acc_a, acc_b, m_new, l_new

    @triton.jit
    def _attn_fwd_tma(
        q_a_desc, q_b_desc, k_a_desc, k_b_desc, v_a_desc, v_b_desc,  # slab A/B of Q, K, V
        Out, stride_ob, stride_oh, stride_on,  #
        N_HEADS, N_Q, N_KV,  #
        qk_scale,  # scale * log2(e)
        HEAD_DIM: tl.constexpr,  #
        ALIGN: tl.constexpr,  # of the output offsets (the output is written with masked stores)
        HEAD_A: tl.constexpr,  #
        HEAD_B: tl.constexpr,  #
        EVEN_N: tl.constexpr,  #
        BLOCK_M: tl.constexpr,  #
        BLOCK_N: tl.constexpr,  #
        DESC_4D: tl.constexpr,  # True: [B, H, N, D] descriptors; False: [B*N, H*D] row descriptors
        DOT_F32: tl.constexpr,  #
    ):
        """Same math as ``_attn_fwd``, with Q/K/V tiles fetched by the Hopper TMA engine.

        TMA zero-fills whatever lies outside the described tensor. With 4-D descriptors that covers
        the padded head-dim columns and the rows past N. With 2-D row descriptors a slab wider than
        the head reads the next head's (finite) columns and a partial block reads the next batch's
        rows: Q's extra columns are zeroed here, so K's extra columns add nothing to S, V's extra
        columns only reach accumulator columns that are never stored, extra keys get -inf scores,
        and extra query rows are never stored."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // N_HEADS
        h = pid_bh % N_HEADS
        m0 = pid_m * BLOCK_M
        if DESC_4D:
            q_row = m0
            kv_row = 0
            col_a = 0
        else:
            q_row = b * N_Q + m0
            kv_row = b * N_KV
            col_a = h * HEAD_DIM
        col_b = col_a + HEAD_A
        dot_ty = tl.float32 if DOT_F32 else Out.dtype.element_ty

        q_a = _tma_tile(q_a_desc, b, h, q_row, col_a, BLOCK_M, HEAD_A, DESC_4D)
        if HEAD_A > HEAD_DIM and not DESC_4D:
            q_a = tl.where((tl.arange(0, HEAD_A) < HEAD_DIM)[None, :], q_a, 0.0)
        q_a = q_a.to(dot_ty)
        if HEAD_B > 0:
            q_b = _tma_tile(q_b_desc, b, h, q_row, col_b, BLOCK_M, HEAD_B, DESC_4D)
            if HEAD_A + HEAD_B > HEAD_DIM and not DESC_4D:
                q_b = tl.where((HEAD_A + tl.arange(0, HEAD_B) < HEAD_DIM)[None, :], q_b, 0.0)
            q_b = q_b.to(dot_ty)
            acc_b = tl.zeros([BLOCK_M, HEAD_B], dtype=tl.float32)
        else:  # placeholders: the helpers take both slabs and ignore B when HEAD_B == 0
            q_b = q_a
            acc_b = tl.zeros([BLOCK_M, 16], dtype=tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_a = tl.zeros([BLOCK_M, HEAD_A], dtype=tl.float32)
        offs_n = tl.arange(0, BLOCK_N)

        for start_n in range(0, N_KV, BLOCK_N):
            s = _scores(q_a, q_b, k_a_desc, k_b_desc, b, h, kv_row + start_n, col_a, col_b, BLOCK_N, HEAD_A,
                        HEAD_B, DESC_4D, dot_ty)
            if not EVEN_N:
                s = tl.where((start_n + offs_n < N_KV)[None, :], s, float("-inf"))
            acc_a, acc_b, m_i, l_i = _attend(s, m_i, l_i, acc_a, acc_b, qk_scale, v_a_desc, v_b_desc, b, h,
                                             kv_row + start_n, col_a, col_b, BLOCK_N, HEAD_A, HEAD_B, DESC_4D,
                                             dot_ty, Out.dtype.element_ty)

        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < N_Q
        o_base = Out + tl.multiple_of(b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, ALIGN)
        rows_o = tl.multiple_of(offs_m * stride_on, ALIGN)
        inv_l = 1.0 / l_i
        offs_a = tl.arange(0, HEAD_A)
        tl.store(o_base + rows_o[:, None] + offs_a[None, :], (acc_a * inv_l[:, None]).to(Out.dtype.element_ty),
                 mask=m_mask[:, None] & (offs_a < HEAD_DIM)[None, :])
        if HEAD_B > 0:
            offs_b = HEAD_A + tl.arange(0, HEAD_B)
            tl.store(o_base + rows_o[:, None] + offs_b[None, :], (acc_b * inv_l[:, None]).to(Out.dtype.element_ty),
                     mask=m_mask[:, None] & (offs_b < HEAD_DIM)[None, :])

    # Autotune list kept small on purpose: every config is compiled and timed on the first call of
    # each (N_Q, N_KV, HEAD_DIM) key (CapHuman has ~12), so a handful keeps a fresh server's warm-up
    # to seconds. These are the per-shape winners on the H100 (Triton 3.6) with the contiguous-head-dim
    # kernel (bench/results/attn_probe2_h100.json) and of the earlier 12-candidate screening, each of
    # which ran clean (no illegal memory access, correct, 30 repeated launches) on all 17 CapHuman
    # shapes in the split32 layout (kernels_h100_run3.json). num_stages=1 is absent on purpose: with
    # split32 it hit illegal memory accesses at d80 on Triton 3.6 (see docs/kernels.md).
    _ATTN_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for (bm, bn, w, s) in [
            (128, 64, 8, 3),  # self 4096 d40 (175 us vs 184 us at 4 warps), cross 4096x258
            (128, 32, 4, 3),  # cross 4096x77 (before the tail block)
            (128, 128, 8, 3),  # self 1024 d80
            (64, 64, 4, 3),  # 256/64-token queries at d160
            (64, 32, 4, 2),  # 64 x 258
        ]
    ]

    def _attn_keep(configs, named_args, **kwargs):
        """Drop configs whose BLOCK_M is far beyond the query count (pure masked waste)."""
        n_q = named_args["N_Q"]
        keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(n_q))]
        return keep or configs

    # TAIL_N (pointer kernel) and EVEN_N (TMA kernel) follow from the BLOCK_N that autotune (or the caller) picks.
    _attn_fwd_fixed = triton.heuristics({"TAIL_N": lambda a: tail_block(a["N_KV"], a["BLOCK_N"])})(_attn_fwd)
    _attn_fwd_tuned = triton.autotune(
        _ATTN_CONFIGS,
        key=["N_Q", "N_KV", "HEAD_DIM", "HEAD_A", "HEAD_B"],
        prune_configs_by={"early_config_prune": _attn_keep},
    )(_attn_fwd_fixed)

    def _tma_block_shapes(nargs):
        """Pre-hook: give the host descriptors the tile shapes of the config about to run."""
        bm, bn, ha, hb = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_A"], nargs["HEAD_B"]
        lead = [1, 1] if nargs["DESC_4D"] else []
        for name, rows in (("q", bm), ("k", bn), ("v", bn)):
            nargs[f"{name}_a_desc"].block_shape = lead + [rows, ha]
            nargs[f"{name}_b_desc"].block_shape = lead + [rows, hb or ha]  # unused when HEAD_B == 0

    _TMA_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st, pre_hook=_tma_block_shapes)
        for (bm, bn, w, st) in TMA_CONFIG_TUPLES
    ]
    _attn_fwd_tma_fixed = triton.heuristics({"EVEN_N": lambda a: a["N_KV"] % a["BLOCK_N"] == 0})(_attn_fwd_tma)
    _attn_fwd_tma_tuned = triton.autotune(
        _TMA_CONFIGS,
        key=["N_Q", "N_KV", "HEAD_DIM", "HEAD_A", "HEAD_B", "DESC_4D"],
        prune_configs_by={"early_config_prune": _attn_keep},
    )(_attn_fwd_tma_fixed)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: str) -> None:
    for name, t in zip(("q", "k", "v"), (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D {names}, got shape {tuple(t.shape)}")
    reason = triton_supports(q, k, v)
    if reason is not None:
        raise ValueError(f"Triton attention cannot run these inputs: {reason}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"devices differ: q {q.device}, k {k.device}, v {v.device}")


def _alignment(*tensors: torch.Tensor) -> int:
    """Largest power of two <= 8 elements (16 bytes at fp16) dividing every batch/head/token stride
    and every base address of ``tensors`` (in elements)."""
    align = 8
    for t in tensors:
        values = [t.stride(0), t.stride(1), t.stride(2), t.data_ptr() // t.element_size()]
        while align > 1 and any(x % align for x in values):
            align //= 2
    return align


def tma_layout_reason(tensors, head_dim: int, loads: str) -> str | None:
    """None when TMA descriptors of kind ``loads`` can describe every [B, H, N, D]-indexed tensor,
    else why not (TMA needs 16-byte aligned bases and strides; row descriptors need packed heads
    and batches)."""
    if not HAS_TMA:
        return "this Triton has no tensor descriptors (Triton >= 3.4)"
    if tensors[0].is_cuda and (device_capability(tensors[0].device) or (0, 0)) < (9, 0):
        return "TMA needs compute capability 9.0 or newer (Hopper)"
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16:
            return "a base address is not 16-byte aligned"
        if any(t.stride(i) * size % 16 for i in range(3)):
            return f"strides {t.stride()} are not all multiples of 16 bytes"
        if loads == "tma2d":
            if t.shape[1] > 1 and t.stride(1) != head_dim:
                return "heads are not packed side by side in each token row"
            if t.shape[0] > 1 and t.stride(0) != t.shape[2] * t.stride(2):
                return "batches are not packed one after another"
    return None


def _tma_descriptors(t, four_d: bool):
    """Two host descriptors of ``t`` (one per head-dim slab; tile shapes are set per config)."""
    if four_d:
        shape, strides = list(t.shape), list(t.stride())
    else:
        shape, strides = [t.shape[0] * t.shape[2], t.shape[1] * t.shape[3]], [t.stride(2), 1]
    placeholder = [1] * (len(shape) - 2) + [16, 16]
    return (TensorDescriptor(t, shape, strides, list(placeholder)),
            TensorDescriptor(t, shape, strides, list(placeholder)))


def _resolve_loads(requested: str, explicit: bool, q, k, v, d) -> str:
    """``requested`` if TMA can serve it here; a default (not ``explicit``) falls back to "pointer"."""
    if requested not in LOAD_MODES:
        raise ValueError(f"loads={requested!r} must be one of {LOAD_MODES}")
    if requested == "pointer":
        return requested
    reason = tma_layout_reason((q, k, v), d, requested)
    if reason is None:
        return requested
    if explicit:
        raise ValueError(f"loads={requested!r} cannot describe these tensors: {reason}")
    return "pointer"  # the pointer kernel takes any layout


def _launch(q, k, v, out, b, h, n_q, n_kv, d, scale, config, split_mode, loads):
    """Launch on [B, H, N, D]-indexed tensors (their strides go to the kernel)."""
    tuned = None
    if config is None and split_mode is None and loads is None and q.dtype == torch.float16:
        # All defaults: the measured (fp16) choice for this shape on this GPU, where there is one.
        tuned = tuned_launch(n_q, n_kv, d, b * h, device_capability(q.device))
    if tuned is not None and _resolve_loads(tuned.loads, False, q, k, v, d) == tuned.loads:
        loads, split_mode = tuned.loads, tuned.split_mode
        config = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), tuned.config))
    else:  # (a tuned TMA choice that TMA cannot describe here falls back to the plain defaults)
        loads = _resolve_loads(DEFAULT_LOADS if loads is None else loads, loads is not None, q, k, v, d)
    mode = DEFAULT_SPLIT_MODE if split_mode is None else split_mode
    if mode not in SPLIT_MODES:
        raise ValueError(f"split_mode={mode!r} must be one of {sorted(SPLIT_MODES)}")
    head_a, head_b = split_head_dim(d, SPLIT_MODES[mode])
    qk_scale = float(scale) * _LOG2E
    dot_f32 = interpreter_enabled() and q.dtype == torch.bfloat16
    if config is None and interpreter_enabled():
        config = {"BLOCK_M": 32, "BLOCK_N": 32}  # the interpreter is slow; autotuning there is pointless
    extra = {k_: config[k_] for k_ in ("num_warps", "num_stages") if k_ in config} if config else {}
    if loads == "pointer":
        args = (
            q, k, v, out,  #
            q.stride(0), q.stride(1), q.stride(2),  #
            k.stride(0), k.stride(1), k.stride(2),  #
            v.stride(0), v.stride(1), v.stride(2),  #
            out.stride(0), out.stride(1), out.stride(2),  #
            h, n_q, n_kv, qk_scale,
        )
        meta = dict(HEAD_DIM=d, ALIGN=_alignment(q, k, v, out), HEAD_A=head_a, HEAD_B=head_b, DOT_F32=dot_f32)
        fixed, tuned = _attn_fwd_fixed, _attn_fwd_tuned
    else:
        four_d = loads == "tma4d"
        descs = (*_tma_descriptors(q, four_d), *_tma_descriptors(k, four_d), *_tma_descriptors(v, four_d))
        args = (*descs, out, out.stride(0), out.stride(1), out.stride(2), h, n_q, n_kv, qk_scale)
        meta = dict(HEAD_DIM=d, ALIGN=_alignment(out), HEAD_A=head_a, HEAD_B=head_b, DESC_4D=four_d,
                    DOT_F32=dot_f32)
        fixed, tuned = _attn_fwd_tma_fixed, _attn_fwd_tma_tuned
    if config is not None:
        bm, bn = int(config["BLOCK_M"]), int(config["BLOCK_N"])
        if loads != "pointer":
            names = ("q_a_desc", "q_b_desc", "k_a_desc", "k_b_desc", "v_a_desc", "v_b_desc")
            _tma_block_shapes({**dict(zip(names, descs)), **meta, "BLOCK_M": bm, "BLOCK_N": bn})
        fixed[(triton.cdiv(n_q, bm), b * h)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, **extra)
    else:
        grid = lambda cfg: (triton.cdiv(n_q, cfg["BLOCK_M"]), b * h)  # noqa: E731
        tuned[grid](*args, **meta)
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    split_mode: str | None = None,
    loads: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v with the fused Triton kernel.

    Args:
        q: [B, H, Nq, D] fp16/bf16, any strides (CUDA, or CPU under TRITON_INTERPRET=1); a head dim
            that is not contiguous costs a copy.
        k, v: [B, H, Nk, D], same dtype and device as q, any strides (same note).
        scale: softmax scale; default 1/sqrt(D).
        out: optional [B, H, Nq, D] output with a contiguous head dim (e.g. a permuted [B, Nq, H, D]
            buffer).
        config: optional fixed {"BLOCK_M", "BLOCK_N"[, "num_warps", "num_stages"]} instead of autotune.
        split_mode: layout of a non-power-of-two head dim, one of SPLIT_MODES; None: DEFAULT_SPLIT_MODE.
        loads: how tiles are fetched, one of LOAD_MODES; None: DEFAULT_LOADS, or "pointer" where TMA
            cannot describe the tensors (an explicit TMA request raises ValueError there).
        With config, split_mode and loads all None, a shape measured on this GPU architecture runs
        its entry of TUNED_LAUNCHES; any other shape autotunes.
    Returns:
        [B, H, Nq, D] in q's dtype; by default a [B, H, Nq, D] view of a contiguous [B, Nq, H, D]
        buffer, so ``.transpose(1, 2).reshape(B, Nq, H * D)`` is free.
    """
    _check_qkv(q, k, v, "[B, H, N, D]")
    b, h, n_q, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(
            f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
            "expected k and v [B, H, Nk, D] with q's B, H, D"
        )
    n_kv = k.shape[2]
    if n_kv == 0:
        raise ValueError("k and v must hold at least one token")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if out is None:
        out = torch.empty((b, n_q, h, d), device=q.device, dtype=q.dtype).transpose(1, 2)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    elif out.stride(-1) != 1:
        raise ValueError(f"out must have a contiguous head dim (stride 1), got strides {out.stride()}")
    # The kernel addresses the head dim with stride 1 (vectorised loads); copy the rare input that
    # is not (the [B, N, H, D] views of projections always are).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if n_q == 0 or b * h == 0:
        return out
    return _launch(q, k, v, out, b, h, n_q, n_kv, d, scale, config, split_mode, loads)


def attention_bnhd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    config: dict | None = None,
    split_mode: str | None = None,
    loads: str | None = None,
) -> torch.Tensor:
    """Same as ``attention`` on [B, N, H, D] tensors (e.g. ``to_q(x).view(B, N, H, D)``).

    Returns a contiguous [B, Nq, H, D] tensor, so ``.view(B, Nq, H * D)`` feeds ``to_out`` directly.
    """
    for name, t in zip(("q", "k", "v"), (q, k, v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D [B, N, H, D] tensor")
    o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, config=config,
                  split_mode=split_mode, loads=loads)
    return o.transpose(1, 2)
