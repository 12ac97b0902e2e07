"""GEGLU feed-forward input projection fused into one OpenAI-Triton GEMM.

diffusers' ``GEGLU`` (the first half of every transformer block's feed-forward in SD1.5's UNet and in
CapFace) computes ``h = x @ W^T + b`` with ``W`` of shape [2 * N, K], splits ``h`` into ``value`` and
``gate`` halves and returns ``value * gelu(gate)``. Unfused, the [M, 2N] product is written to memory
and read back by the elementwise kernel: at 512x512 that is ~63 MB of traffic per call at the
64x64 level (memory-bound, ~20 us on an H100). Here each program computes the same [BLOCK_M, BLOCK_N]
tile of both halves (two accumulators sharing every tile of x) and writes only ``value * gelu(gate)``.

Numerics: fp16/bf16 in, fp32 accumulation, bias and exact (erf) GELU in fp32, one rounding at the
end (the unfused path rounds the product to fp16 before the GELU). Tiles come through TMA tensor
descriptors (Hopper and newer, or the CPU interpreter with ``TRITON_INTERPRET=1``); only API present
in both Triton 3.6 and 3.9 is used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

from caphuman.kernels.attention_triton import HAS_TMA, TensorDescriptor, device_capability, interpreter_enabled

__all__ = ["HAS_TRITON", "TUNED_GEGLU", "GegluLaunch", "geglu_linear", "geglu_reference", "geglu_supports",
           "tuned_geglu"]


@dataclass(frozen=True)
class GegluLaunch:
    """The measured-fastest config of one GEGLU problem on one GPU architecture."""

    config: tuple[int, int, int, int, int]  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    fused_us: float  # GPU time in a CUDA graph ...
    unfused_us: float  # ... and torch.compile's (cuBLAS GEMM + inductor's gelu*mul), same run

    @property
    def beats_unfused(self) -> bool:
        return self.fused_us < self.unfused_us


# Per compute capability, keyed (M, K, N): CapHuman's feed-forwards at 512x512 (UNet batch 2, CapFace
# batch 1). H100, Triton 3.6, torch 2.11, fp16 (bench/results/kernels_h100_run32_geglu.json).
TUNED_GEGLU: dict[tuple[int, int], dict[tuple[int, int, int], GegluLaunch]] = {
    (9, 0): {
        (8192, 320, 1280): GegluLaunch((128, 64, 64, 8, 3), 41.3, 55.5),
        (2048, 640, 2560): GegluLaunch((128, 64, 64, 8, 3), 31.3, 36.3),
        (512, 1280, 5120): GegluLaunch((128, 64, 64, 8, 3), 31.4, 32.2),
        (128, 1280, 5120): GegluLaunch((64, 64, 64, 4, 4), 10.6, 13.2),
        (4096, 320, 1280): GegluLaunch((128, 64, 64, 8, 3), 21.9, 26.5),
        (1024, 640, 2560): GegluLaunch((128, 64, 64, 8, 3), 19.0, 19.9),
        (256, 1280, 5120): GegluLaunch((128, 128, 64, 8, 3), 17.6, 16.9),
        (64, 1280, 5120): GegluLaunch((64, 64, 64, 4, 4), 7.7, 10.1),
    },
}


def tuned_geglu(m: int, k: int, n: int, capability: tuple[int, int] | None) -> GegluLaunch | None:
    """The measured launch for this problem on this architecture, or None."""
    if capability is None:
        return None
    return TUNED_GEGLU.get(tuple(capability), {}).get((m, k, n))

def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 reference: value * gelu(gate) with [value, gate] = (x @ weight^T + bias).chunk(2, -1)."""
    h = x.double() @ weight.double().t()
    if bias is not None:
        h = h + bias.double()
    value, gate = h.chunk(2, dim=-1)
    return value * torch.nn.functional.gelu(gate)


def geglu_supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """None when the fused kernel can run these inputs here, else the reason it cannot."""
    if not HAS_TRITON:
        return "triton is not installed"
    if not HAS_TMA:
        return "this Triton has no tensor descriptors (Triton >= 3.4)"
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        return f"dtypes {x.dtype}/{weight.dtype}: the kernel takes fp16 or bf16, the same for x and weight"
    if bias is not None and bias.dtype != x.dtype:
        return f"bias dtype {bias.dtype} differs from x's {x.dtype}"
    if weight.ndim != 2 or weight.shape[0] % 2 or x.shape[-1] != weight.shape[1]:
        return f"weight {tuple(weight.shape)} is not [2N, K] for x {tuple(x.shape)}"
    if bias is not None and bias.shape != (weight.shape[0],):
        return f"bias {tuple(bias.shape)} is not [{weight.shape[0]}]"
    if not (x.device == weight.device and (bias is None or bias.device == x.device)):
        return "tensors are on different devices"
    if x.is_cuda:
        if (device_capability(x.device) or (0, 0)) < (9, 0):
            return "TMA descriptors need compute capability 9.0 or newer (Hopper)"
    elif not interpreter_enabled():
        return f"tensors are on {x.device} and TRITON_INTERPRET is not set"
    if (x.shape[-1] * x.element_size()) % 16:
        return f"K={x.shape[-1]}: rows must be a multiple of 16 bytes for TMA"
    return None


if HAS_TRITON:

    @triton.jit
    def _geglu_gemm(
        x_desc, w_desc, Bias, Out,  #
        M, N_OUT, K, stride_om,  #
        HAS_BIAS: tl.constexpr,  #
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  #
        GROUP_M: tl.constexpr,  # programs that share a column of W tiles run together (L2 reuse)
        DOT_F32: tl.constexpr,  # interpreter only: its tl.dot mishandles bf16
    ):
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BLOCK_M)
        n_n = tl.cdiv(N_OUT, BLOCK_N)
        group = pid // (GROUP_M * n_n)
        first_m = group * GROUP_M
        rows_in_group = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * n_n)) % rows_in_group
        pid_n = (pid % (GROUP_M * n_n)) // rows_in_group
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N

        acc_v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            # TMA zero-fills past M and K. Past N_OUT a value tile reads gate rows of W: those columns
            # are computed and never stored; gate tiles past 2 * N_OUT are zero-filled.
            a = x_desc.load([m0, k])
            w_v = w_desc.load([n0, k])
            w_g = w_desc.load([N_OUT + n0, k])
            if DOT_F32:
                a, w_v, w_g = a.to(tl.float32), w_v.to(tl.float32), w_g.to(tl.float32)
            acc_v = tl.dot(a, tl.trans(w_v), acc_v)
            acc_g = tl.dot(a, tl.trans(w_g), acc_g)

        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N_OUT
        if HAS_BIAS:
            acc_v += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(Bias + N_OUT + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        gelu = 0.5 * acc_g * (1.0 + tl.erf(acc_g * 0.7071067811865476))  # exact (erf) GELU: 1/sqrt(2)
        out = (acc_v * gelu).to(Out.dtype.element_ty)
        ptrs = Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, out, mask=(offs_m < M)[:, None] & n_mask[None, :])

    def _block_shapes(nargs):
        """Pre-hook: the descriptors' tile shapes follow the config about to run."""
        nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]

    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): two fp32 accumulators per program, so the
    # tiles are half of what a plain GEMM would use at the same register budget.
    GEGLU_CONFIG_TUPLES = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4),
                           (128, 64, 64, 8, 3)]
    _GEGLU_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s, pre_hook=_block_shapes)
        for (bm, bn, bk, w, s) in GEGLU_CONFIG_TUPLES
    ]
    _geglu_tuned = triton.autotune(_GEGLU_CONFIGS, key=["M", "N_OUT", "K"])(_geglu_gemm)


def geglu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 config: dict | None = None) -> torch.Tensor:
    """``value * gelu(gate)`` where ``[value, gate] = (x @ weight^T + bias).chunk(2, -1)``.

    Args:
        x: [..., K] fp16/bf16 (CUDA sm_90+, or CPU under TRITON_INTERPRET=1).
        weight: [2N, K] (an ``nn.Linear(K, 2N)`` weight, as diffusers' ``GEGLU.proj`` holds it).
        bias: optional [2N].
        config: optional fixed {"BLOCK_M", "BLOCK_N", "BLOCK_K"[, "num_warps", "num_stages"]}; by default
            the measured config of TUNED_GEGLU for this problem and GPU, else autotuning.
    Returns:
        [..., N] in x's dtype.
    Raises:
        ValueError: where ``geglu_supports`` gives a reason.
    """
    reason = geglu_supports(x, weight, bias)
    if reason is not None:
        raise ValueError(f"fused GEGLU cannot run these inputs: {reason}")
    k = x.shape[-1]
    n_out = weight.shape[0] // 2
    # TMA needs packed rows at a 16-byte aligned address; a fresh copy has both (.contiguous() would
    # return an already contiguous but misaligned view as it is)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) != k or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    w = weight
    if not weight.is_contiguous() or weight.data_ptr() % 16:
        w = weight.clone(memory_format=torch.contiguous_format)
    m = x2.shape[0]
    out = torch.empty((m, n_out), device=x.device, dtype=x.dtype)
    if m == 0:
        return out.reshape(*x.shape[:-1], n_out)
    x_desc = TensorDescriptor(x2, [m, k], [k, 1], [16, 16])
    w_desc = TensorDescriptor(w, [2 * n_out, k], [k, 1], [16, 16])
    bias_arg = bias if bias is not None else out  # never read without HAS_BIAS
    args = (x_desc, w_desc, bias_arg, out, m, n_out, k, out.stride(0))
    meta = dict(HAS_BIAS=bias is not None, GROUP_M=8, DOT_F32=interpreter_enabled() and x.dtype == torch.bfloat16)
    if config is None and interpreter_enabled():
        config = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}  # the interpreter is slow; no autotuning
    elif config is None and x.dtype == torch.float16:  # measured in fp16
        tuned = tuned_geglu(m, k, n_out, device_capability(x.device))
        if tuned is not None:
            config = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), tuned.config))
    if config is not None:
        bm, bn, bk = (int(config[key]) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        _block_shapes({"x_desc": x_desc, "w_desc": w_desc, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk})
        extra = {key: config[key] for key in ("num_warps", "num_stages") if key in config}
        grid = (triton.cdiv(m, bm) * triton.cdiv(n_out, bn),)
        _geglu_gemm[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **extra)
    else:
        grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n_out, c["BLOCK_N"]),)  # noqa: E731
        _geglu_tuned[grid](*args, **meta)
    return out.reshape(*x.shape[:-1], n_out)
