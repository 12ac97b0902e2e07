"""Probe (seventh session; not used by the runtime): a warp-specialised FlashAttention forward for
Hopper (sm_90), written in Gluon. Runner: attn_probe4_gluon_ws_h100_runs53_61.py; results and the
reasons it did not ship: docs/kernels.md, "Seventh session".

Why a second attention kernel was tried: at head dim 40 the softmax's exponentials (MUFU) cost about as much
as the matrix products, and the Triton kernel in `attention_triton` runs the two one after the
other (docs/kernels.md, "what bounds the d40 self-attention"). cuDNN and FlashAttention-3 overlap
them. This kernel does the same with Gluon, Triton's lower-level language, which exposes Hopper's
warpgroup MMA, TMA, mbarriers and warp specialisation directly (present in Triton 3.6 and 3.9):

- one CTA owns CONSUMERS (1-4) query tiles of one (batch, head): one consumer warp group (4 warps)
  per tile, and a producer warp that streams K and V tiles through a ring of shared-memory stages
  with TMA;
- the consumers take turns on the tensor cores (a ring of turn barriers; "ping-pong" for two): a
  consumer waits for its turn, issues Q K_j^T for this key block and P_{j-1} V_{j-1} for the
  previous one as asynchronous wgmma, hands the turn on, and runs its softmax while the others'
  products run (PINGPONG=False: no turns);
- the head dim is split into power-of-two slabs (`HEAD_A` + `HEAD_B`, B may be 0) like the Triton
  kernel; slab columns past the head belong to the next head (the `[B*N, H*D]` view of packed
  projections) or lie past the tensor (TMA zero fill). Q's extra columns are zeroed in shared
  memory once, so K's add nothing to S; V's reach only output columns that are never stored.

Gluon has no CPU interpreter: the runner checks every launch against an fp32 reference on the GPU
(max abs error 6.7e-5 to 5.2e-4 on every candidate). It compiles offline for sm_90 with Triton 3.6 and
3.9 (GluonASTSource + GPUTarget("cuda", 90, 32)), as tests/test_kernels_compile_sm90.py does for the
shipped kernels.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

CONSUMER_WARPS = gl.constexpr(4)  # one warp group per query tile (wgmma is issued per warp group)
PRODUCER_WARPS = gl.constexpr(1)
_LOG2E = 1.4426950408889634
# a barrier among the warps of one partition: `thread_barrier` in Triton 3.6, renamed `barrier` later
_warps_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# a TMA tile load: `async_copy_global_to_shared` in Triton 3.6, `async_load` later
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


@gluon.jit
def _zero_bleed_columns(q_smem, VALID: gl.constexpr, BLOCK_M: gl.constexpr, WIDTH: gl.constexpr):
    """Zero the columns >= VALID of a Q slab in shared memory (they belong to the next head)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    q = q_smem.load(layout)
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    q = gl.where(gl.expand_dims(cols < VALID, 0), q, gl.zeros_like(q))
    q_smem.store(q)


@gluon.jit
def _consumer(C: gl.constexpr, q_a_all, q_b_all, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, turns,
              Out, out_base, seq_row0, N_Q, N_KV, stride_on, qk_scale,
              HEAD_DIM: gl.constexpr, HEAD_A: gl.constexpr, HEAD_B: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, EVEN_N: gl.constexpr, CONSUMERS: gl.constexpr,
              PINGPONG: gl.constexpr):
    """Consumer warp group C: softmax(Q K^T * scale) V for query rows [seq_row0 + C*BLOCK_M, +BLOCK_M),
    taking its turn on the tensor cores after consumer C-1 and handing it to C+1 (mod CONSUMERS)."""
    q_a = q_a_all.index(C)
    q_b = q_b_all.index(C)
    my_turn = turns.index(C)
    other_turn = turns.index((C + 1) % CONSUMERS)
    q_row0 = seq_row0 + C * BLOCK_M
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    oa_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_A, 16])
    pa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=oa_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    dtype: gl.constexpr = q_a.dtype

    mbarrier.wait(q_bar, 0)
    if HEAD_A > HEAD_DIM:
        _zero_bleed_columns(q_a, HEAD_DIM, BLOCK_M, HEAD_A)
    if HEAD_B > 0:
        if HEAD_A + HEAD_B > HEAD_DIM:
            _zero_bleed_columns(q_b, HEAD_DIM - HEAD_A, BLOCK_M, HEAD_B)
    if HEAD_A + HEAD_B > HEAD_DIM:
        fence_async_shared()  # the zeroed Q is read by wgmma through the async proxy
        _warps_barrier()

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_layout)
    acc_a = gl.zeros([BLOCK_M, HEAD_A], gl.float32, layout=oa_layout)
    if HEAD_B > 0:
        ob_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, HEAD_B, 16])
        pb_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ob_layout, k_width=2)
        acc_b = gl.zeros([BLOCK_M, HEAD_B], gl.float32, layout=ob_layout)
    else:
        acc_b = acc_a  # unused placeholder, keeps the loop-carried values the same
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    key_cols = gl.arange(0, BLOCK_N, layout=col_layout)
    n_blocks = gl.cdiv(N_KV, BLOCK_N)
    turn_phase = 0

    # Block 0: S_0 alone (no previous P V to issue with it).
    mbarrier.wait(k_ready.index(0), 0)
    mbarrier.wait(my_turn, turn_phase, pred=PINGPONG)
    turn_phase ^= 1
    s_tok = warpgroup_mma(q_a, k_a.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if HEAD_B > 0:
        s_tok = warpgroup_mma(q_b, k_b.index(0).permute((1, 0)), s_tok, is_async=True)
    mbarrier.arrive(other_turn, count=1, pred=PINGPONG)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
    mbarrier.arrive(k_empty.index(0), count=1)
    if not EVEN_N:
        s = gl.where(gl.expand_dims(key_cols < N_KV, 0), s, gl.full_like(s, float("-inf")))
    m_i = gl.max(s, axis=1) * qk_scale
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
    l_i = gl.sum(p, axis=1)

    for j in range(1, n_blocks):
        slot = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        mbarrier.wait(my_turn, turn_phase, pred=PINGPONG)
        turn_phase ^= 1
        s_tok = warpgroup_mma(q_a, k_a.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if HEAD_B > 0:
            s_tok = warpgroup_mma(q_b, k_b.index(slot).permute((1, 0)), s_tok, is_async=True)
        p16 = p.to(dtype)
        acc_a = warpgroup_mma(gl.convert_layout(p16, pa_layout), v_a.index(prev), acc_a, is_async=True)
        if HEAD_B > 0:
            acc_b = warpgroup_mma(gl.convert_layout(p16, pb_layout), v_b.index(prev), acc_b, is_async=True)
        mbarrier.arrive(other_turn, count=1, pred=PINGPONG)

        # S_j is the oldest wgmma in flight: wait for it alone, leave P V running during the softmax.
        if HEAD_B > 0:
            s = warpgroup_mma_wait(num_outstanding=2, deps=(s_tok, ))
        else:
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(slot), count=1)
        if not EVEN_N:
            s = gl.where(gl.expand_dims(key_cols < N_KV - j * BLOCK_N, 0), s, gl.full_like(s, float("-inf")))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new

        if HEAD_B > 0:
            acc_a, acc_b = warpgroup_mma_wait(num_outstanding=0, deps=(acc_a, acc_b))
        else:
            acc_a = warpgroup_mma_wait(num_outstanding=0, deps=(acc_a, ))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc_a = acc_a * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, oa_layout)), 1)
        if HEAD_B > 0:
            acc_b = acc_b * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, ob_layout)), 1)

    # The last block's P V.
    last = (n_blocks - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_blocks - 1) // STAGES) & 1)
    mbarrier.wait(my_turn, turn_phase, pred=PINGPONG)
    p16 = p.to(dtype)
    acc_a = warpgroup_mma(gl.convert_layout(p16, pa_layout), v_a.index(last), acc_a, is_async=True)
    if HEAD_B > 0:
        acc_b = warpgroup_mma(gl.convert_layout(p16, pb_layout), v_b.index(last), acc_b, is_async=True)
    mbarrier.arrive(other_turn, count=1, pred=PINGPONG)
    if HEAD_B > 0:
        acc_a, acc_b = warpgroup_mma_wait(num_outstanding=0, deps=(acc_a, acc_b))
    else:
        acc_a = warpgroup_mma_wait(num_outstanding=0, deps=(acc_a, ))
    mbarrier.arrive(v_empty.index(last), count=1)

    _store_slab(acc_a, l_i, Out, out_base, q_row0, N_Q, stride_on, 0, HEAD_DIM, BLOCK_M, HEAD_A, oa_layout)
    if HEAD_B > 0:
        _store_slab(acc_b, l_i, Out, out_base, q_row0, N_Q, stride_on, HEAD_A, HEAD_DIM - HEAD_A, BLOCK_M, HEAD_B,
                    ob_layout)


@gluon.jit
def _issue_qk(q_a, q_b, k_a, k_b, slot, s_zero, HEAD_B: gl.constexpr):
    """S = Q K_slot^T as asynchronous wgmma (one per head-dim slab); returns the in-flight token."""
    tok = warpgroup_mma(q_a, k_a.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if HEAD_B > 0:
        tok = warpgroup_mma(q_b, k_b.index(slot).permute((1, 0)), tok, is_async=True)
    return tok


@gluon.jit
def _issue_pv(p16, v_a, v_b, slot, acc_a, acc_b, pa_layout: gl.constexpr, pb_layout: gl.constexpr,
              HEAD_B: gl.constexpr):
    """O += P V_slot as asynchronous wgmma, P from registers."""
    acc_a = warpgroup_mma(gl.convert_layout(p16, pa_layout), v_a.index(slot), acc_a, is_async=True)
    if HEAD_B > 0:
        acc_b = warpgroup_mma(gl.convert_layout(p16, pb_layout), v_b.index(slot), acc_b, is_async=True)
    return acc_a, acc_b


@gluon.jit
def _softmax_block(s, m_i, l_i, n_valid, qk_scale, key_cols, EVEN_N: gl.constexpr):
    """Online-softmax update for one key block: P (unnormalised), new max, new sum, rescale factor."""
    if not EVEN_N:
        s = gl.where(gl.expand_dims(key_cols < n_valid, 0), s, gl.full_like(s, float("-inf")))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _store_slab(acc, l_i, Out, out_base, q_row0, N_Q, stride_on, COL0: gl.constexpr, VALID: gl.constexpr,
                BLOCK_M: gl.constexpr, WIDTH: gl.constexpr, layout: gl.constexpr):
    """Normalise one output slab by the softmax sum and store its rows < N_Q and columns < VALID."""
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, layout))
    out = acc / gl.expand_dims(l_o, 1)
    rows = q_row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    offsets = out_base + gl.expand_dims(rows, 1) * stride_on + COL0 + gl.expand_dims(cols, 0)
    mask = gl.expand_dims(rows < N_Q, 1) & gl.expand_dims(cols < VALID, 0)
    gl.store(Out + offsets, out.to(Out.dtype.element_ty), mask=mask)


@gluon.jit
def _producer(q_a_desc, q_b_desc, k_a_desc, k_b_desc, v_a_desc, v_b_desc, q_a, q_b, k_a, k_b, v_a, v_b,
              q_bar, k_ready, k_empty, v_ready, v_empty, q_row, kv_row, col, N_KV,
              HEAD_A: gl.constexpr, HEAD_B: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
    """One warp: every consumer's Q tile once, then K_j and V_j into the stage ring, waiting for free stages."""
    q_bytes: gl.constexpr = CONSUMERS * (q_a_desc.block_type.nbytes + (q_b_desc.block_type.nbytes if HEAD_B > 0 else 0))
    k_bytes: gl.constexpr = k_a_desc.block_type.nbytes + (k_b_desc.block_type.nbytes if HEAD_B > 0 else 0)
    v_bytes: gl.constexpr = v_a_desc.block_type.nbytes + (v_b_desc.block_type.nbytes if HEAD_B > 0 else 0)
    mbarrier.expect(q_bar, q_bytes)
    for t in gl.static_range(CONSUMERS):
        _tma_load(q_a_desc, [q_row + t * BLOCK_M, col], q_bar, q_a.index(t))
        if HEAD_B > 0:
            _tma_load(q_b_desc, [q_row + t * BLOCK_M, col + HEAD_A], q_bar, q_b.index(t))

    n_blocks = gl.cdiv(N_KV, BLOCK_N)
    for j in range(n_blocks):
        slot = j % STAGES
        use = j // STAGES
        row = kv_row + j * BLOCK_N
        # a stage is free once every consumer has arrived on its empty barrier for the previous use
        mbarrier.wait(k_empty.index(slot), (use - 1) & 1, pred=use > 0)
        mbarrier.expect(k_ready.index(slot), k_bytes)
        _tma_load(k_a_desc, [row, col], k_ready.index(slot), k_a.index(slot))
        if HEAD_B > 0:
            _tma_load(k_b_desc, [row, col + HEAD_A], k_ready.index(slot), k_b.index(slot))
        mbarrier.wait(v_empty.index(slot), (use - 1) & 1, pred=use > 0)
        mbarrier.expect(v_ready.index(slot), v_bytes)
        _tma_load(v_a_desc, [row, col], v_ready.index(slot), v_a.index(slot))
        if HEAD_B > 0:
            _tma_load(v_b_desc, [row, col + HEAD_A], v_ready.index(slot), v_b.index(slot))


@gluon.jit
def _attn_fwd_ws(q_a_desc, q_b_desc, k_a_desc, k_b_desc, v_a_desc, v_b_desc, Out,
                 stride_ob, stride_oh, stride_on, N_HEADS, N_Q, N_KV, qk_scale,
                 HEAD_DIM: gl.constexpr, HEAD_A: gl.constexpr, HEAD_B: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, EVEN_N: gl.constexpr,
                 CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                 PRODUCER_REGS: gl.constexpr):
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // N_HEADS
    h = pid_bh % N_HEADS
    seq_row0 = pid_m * (CONSUMERS * BLOCK_M)  # first query row of this CTA within its sequence
    col = h * HEAD_DIM  # first column of this head in the [B*N, H*D] views
    dtype: gl.constexpr = q_a_desc.dtype

    q_a = gl.allocate_shared_memory(dtype, [CONSUMERS, BLOCK_M, HEAD_A], q_a_desc.layout)
    k_a = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_A], k_a_desc.layout)
    v_a = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_A], v_a_desc.layout)
    if HEAD_B > 0:
        q_b = gl.allocate_shared_memory(dtype, [CONSUMERS, BLOCK_M, HEAD_B], q_b_desc.layout)
        k_b = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_B], k_b_desc.layout)
        v_b = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_B], v_b_desc.layout)
    else:
        q_b = q_a
        k_b = k_a
        v_b = v_a

    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    q_bar = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    turns = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], bar_layout)
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=CONSUMERS)  # one arrival per consumer warp group
        mbarrier.init(v_empty.index(s), count=CONSUMERS)
    for c in gl.static_range(CONSUMERS):
        mbarrier.init(turns.index(c), count=1)
    fence_async_shared()
    mbarrier.arrive(turns.index(0), count=1)  # consumer 0 takes the first turn on the tensor cores

    out_base = b * stride_ob + h * stride_oh
    q_row = b * N_Q + seq_row0
    kv_row = b * N_KV
    # Consumer c takes query rows [seq_row0 + c*BLOCK_M, +BLOCK_M) and passes the turn to c+1.
    # (Gluon builds the partition list at compile time, one branch per supported count.)
    if CONSUMERS == 1:  # one query tile per CTA; two CTAs share an SM when registers allow
        gl.warp_specialize([
            (_consumer, (0, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, turns, Out,
                         out_base, seq_row0, N_Q, N_KV, stride_on, qk_scale, HEAD_DIM, HEAD_A, HEAD_B, BLOCK_M,
                         BLOCK_N, STAGES, EVEN_N, CONSUMERS, PINGPONG)),
            (_producer, (q_a_desc, q_b_desc, k_a_desc, k_b_desc, v_a_desc, v_b_desc, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, q_row, kv_row, col, N_KV, HEAD_A, HEAD_B, BLOCK_M, BLOCK_N, STAGES, CONSUMERS)),
        ], [PRODUCER_WARPS], [PRODUCER_REGS])
    elif CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (0, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, turns, Out,
                         out_base, seq_row0, N_Q, N_KV, stride_on, qk_scale, HEAD_DIM, HEAD_A, HEAD_B, BLOCK_M,
                         BLOCK_N, STAGES, EVEN_N, CONSUMERS, PINGPONG)),
            (_consumer, (1, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, turns, Out,
                         out_base, seq_row0, N_Q, N_KV, stride_on, qk_scale, HEAD_DIM, HEAD_A, HEAD_B, BLOCK_M,
                         BLOCK_N, STAGES, EVEN_N, CONSUMERS, PINGPONG)),
            (_producer, (q_a_desc, q_b_desc, k_a_desc, k_b_desc, v_a_desc, v_b_desc, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, q_row, kv_row, col, N_KV, HEAD_A, HEAD_B, BLOCK_M, BLOCK_N, STAGES, CONSUMERS)),
        ], [CONSUMER_WARPS, PRODUCER_WARPS], [CONSUMER_REGS, PRODUCER_REGS])
    elif CONSUMERS == 3:
        gl.warp_specialize([
            (_consumer, (0, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, turns, Out,
                         out_base, seq_row0, N_Q, N_KV, stride_on, qk_scale, HEAD_DIM, HEAD_A, HEAD_B, BLOCK_M,
                         BLOCK_N, STAGES, EVEN_N, CONSUMERS, PINGPONG)),
            (_consumer, (1, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, turns, Out,
                         out_base, seq_row0, N_Q, N_KV, stride_on, qk_scale, HEAD_DIM, HEAD_A, HEAD_B, BLOCK_M,
                         BLOCK_N, STAGES, EVEN_N, CONSUMERS, PINGPONG)),
            (_consumer, (2, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, turns, Out,
                         out_base, seq_row0, N_Q, N_KV, stride_on, qk_scale, HEAD_DIM, HEAD_A, HEAD_B, BLOCK_M,
                         BLOCK_N, STAGES, EVEN_N, CONSUMERS, PINGPONG)),
            (_producer, (q_a_desc, q_b_desc, k_a_desc, k_b_desc, v_a_desc, v_b_desc, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, q_row, kv_row, col, N_KV, HEAD_A, HEAD_B, BLOCK_M, BLOCK_N, STAGES, CONSUMERS)),
        ], [CONSUMER_WARPS, CONSUMER_WARPS, PRODUCER_WARPS], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.static_assert(CONSUMERS == 4, "CONSUMERS must be 1, 2, 3 or 4")
        gl.warp_specialize([
            (_consumer, (0, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, turns, Out,
                         out_base, seq_row0, N_Q, N_KV, stride_on, qk_scale, HEAD_DIM, HEAD_A, HEAD_B, BLOCK_M,
                         BLOCK_N, STAGES, EVEN_N, CONSUMERS, PINGPONG)),
            (_consumer, (1, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, turns, Out,
                         out_base, seq_row0, N_Q, N_KV, stride_on, qk_scale, HEAD_DIM, HEAD_A, HEAD_B, BLOCK_M,
                         BLOCK_N, STAGES, EVEN_N, CONSUMERS, PINGPONG)),
            (_consumer, (2, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, turns, Out,
                         out_base, seq_row0, N_Q, N_KV, stride_on, qk_scale, HEAD_DIM, HEAD_A, HEAD_B, BLOCK_M,
                         BLOCK_N, STAGES, EVEN_N, CONSUMERS, PINGPONG)),
            (_consumer, (3, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, turns, Out,
                         out_base, seq_row0, N_Q, N_KV, stride_on, qk_scale, HEAD_DIM, HEAD_A, HEAD_B, BLOCK_M,
                         BLOCK_N, STAGES, EVEN_N, CONSUMERS, PINGPONG)),
            (_producer, (q_a_desc, q_b_desc, k_a_desc, k_b_desc, v_a_desc, v_b_desc, q_a, q_b, k_a, k_b, v_a, v_b, q_bar, k_ready, k_empty, v_ready, v_empty, q_row, kv_row, col, N_KV, HEAD_A, HEAD_B, BLOCK_M, BLOCK_N, STAGES, CONSUMERS)),
        ], [CONSUMER_WARPS, CONSUMER_WARPS, CONSUMER_WARPS, PRODUCER_WARPS],
            [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])


# ---------------------------------------------------------------------------------------------
# Host side


def _shared_layout(block_shape, torch_dtype):
    return gl.NVMMASharedLayout.get_default_for(block_shape, _GL_DTYPES[torch_dtype])


def _row_descriptor(t, block_shape):
    """A TMA descriptor of a [B, H, N, D]-indexed view of packed [B, N, H*D] rows, as [B*N, H*D]."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    shape = [t.shape[0] * t.shape[2], t.shape[1] * t.shape[3]]
    return TensorDescriptor(t, shape, [t.stride(2), 1], list(block_shape), _shared_layout(block_shape, t.dtype))


def launch_ws(q, k, v, out, scale: float, head_a: int, head_b: int, block_m: int = 64, block_n: int = 128,
              stages: int = 2, consumers: int = 2, pingpong: bool = True, consumer_regs: int | None = None,
              producer_regs: int = 40, maxnreg: int | None = None):
    """softmax(q k^T * scale) v into ``out`` with the warp-specialised kernel.

    q, k, v: [B, H, N, D]-indexed views of packed [B, N, H*D] projections (what
    ``attention_triton.tma_layout_reason(..., "tma2d")`` accepts), fp16 or bf16, on an sm_90 GPU.
    out: [B, H, Nq, D]-indexed with a contiguous head dim. head_a/head_b: the head-dim slabs
    (``attention_triton.split_head_dim``). consumers: query tiles (warp groups) per CTA, 1 to 4."""
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    hb = head_b or head_a
    if consumer_regs is None:  # what is left of the 64K registers after the producer's warp group
        consumer_regs = min(232, (65536 // 128 - producer_regs) // consumers // 8 * 8)
    descs = (_row_descriptor(q, [block_m, head_a]), _row_descriptor(q, [block_m, hb]),
             _row_descriptor(k, [block_n, head_a]), _row_descriptor(k, [block_n, hb]),
             _row_descriptor(v, [block_n, head_a]), _row_descriptor(v, [block_n, hb]))
    grid = (triton.cdiv(n_q, consumers * block_m), b * h)
    _attn_fwd_ws[grid](*descs, out, out.stride(0), out.stride(1), out.stride(2), h, n_q, n_kv,
                       float(scale) * _LOG2E, HEAD_DIM=d, HEAD_A=head_a, HEAD_B=head_b, BLOCK_M=block_m,
                       BLOCK_N=block_n, STAGES=stages, EVEN_N=n_kv % block_n == 0, CONSUMERS=consumers,
                       PINGPONG=pingpong, CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs,
                       num_warps=CONSUMER_WARPS.value, **({} if maxnreg is None else {"maxnreg": maxnreg}))
    return out
