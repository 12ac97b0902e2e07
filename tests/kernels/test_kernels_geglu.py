"""Fused GEGLU GEMM (kernels/geglu_triton.py) and its drop-in module (export/fused_ff.py).

Kernel checks run in one subprocess with ``TRITON_INTERPRET=1`` (set before triton is imported)
against the float64 reference; module checks run in-process on the CPU (torch path) plus one
interpreted run of a tiny UNet through the kernel.
"""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from caphuman.kernels import geglu_triton as gg

from tests.conftest import run_interpreted, tiny_unet

pytestmark = pytest.mark.skipif(not gg.HAS_TRITON, reason="triton is not installed")

# name: (x shape, N, dtype, bias, config)
_CASES = {
    "fp16_3d_bias": ([2, 37, 64], 48, "float16", True, None),
    "bf16_no_bias": ([70, 96], 40, "bfloat16", False, None),
    "fp16_small_tiles": ([3, 5, 32], 16, "float16", True, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}),
    # N and K not multiples of the tiles: value tiles past N read gate rows (never stored), K is zero-filled
    "fp16_partial_n_and_k": ([50, 80], 70, "float16", True, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}),
    "fp16_strided_rows": ([4, 9, 64], 32, "float16", True, None),  # x is a column slice: copied to rows
    "fp16_misaligned": ([5, 32], 16, "float16", True, None),  # contiguous, 2 bytes past an aligned address
    # 19 row tiles x 3 column tiles: more than GROUP_M (8) row tiles, so the grouped order wraps
    "fp16_many_row_groups": ([300, 32], 40, "float16", True, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}),
}
_TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}  # relative to the output's magnitude: ~2 ulps at the max

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from caphuman.kernels.geglu_triton import geglu_linear, geglu_reference
    res = {}
    for name, (shape, n, dt, bias, cfg) in json.loads(sys.argv[1]).items():
        g = torch.Generator().manual_seed(len(name))
        dt = getattr(torch, dt)
        k = shape[-1]
        if name == "fp16_strided_rows":
            x = torch.randn(*shape[:-1], 2 * k, generator=g).to(dt)[..., :k]
        elif name == "fp16_misaligned":
            x = torch.randn(shape[0] * k + 1, generator=g).to(dt)[1:].view(*shape)
            assert x.is_contiguous() and x.data_ptr() % 16
        else:
            x = torch.randn(*shape, generator=g).to(dt)
        w = (torch.randn(2 * n, k, generator=g) / k ** 0.5).to(dt)
        b = torch.randn(2 * n, generator=g).to(dt) if bias else None
        o = geglu_linear(x, w, b, config=cfg)
        ref = geglu_reference(x, w, b)
        res[name] = {"shape": list(o.shape), "dtype": str(o.dtype), "err": (o.double() - ref).abs().max().item(),
                     "ref_absmax": ref.abs().max().item()}
    print("RESULT" + json.dumps(res))
    """
)


@pytest.fixture(scope="module")
def kernel_results() -> dict:
    out = run_interpreted(_SCRIPT, json.dumps(_CASES))
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])


@pytest.mark.parametrize("case", sorted(_CASES))
def test_kernel_matches_float64_reference(kernel_results: dict, case: str) -> None:
    shape, n, dt, _, _ = _CASES[case]
    r = kernel_results[case]
    assert r["shape"] == shape[:-1] + [n] and r["dtype"] == f"torch.{dt}"
    assert r["ref_absmax"] > 1.0
    assert r["err"] <= _TOL[dt] * r["ref_absmax"], f"{case}: max error {r['err']:.3g} (|ref| {r['ref_absmax']:.3g})"


def test_reference_is_diffusers_geglu() -> None:
    pytest.importorskip("diffusers")
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    geglu = GEGLU(16, 8).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(gg.geglu_reference(x, geglu.proj.weight, geglu.proj.bias), geglu(x))


def test_supports_reasons() -> None:
    x, w, b = torch.zeros(4, 32, dtype=torch.float16), torch.zeros(64, 32, dtype=torch.float16), None
    assert "fp16 or bf16" in gg.geglu_supports(x.float(), w.float(), b)
    assert "[2N, K]" in gg.geglu_supports(x, torch.zeros(63, 32, dtype=torch.float16), b)
    assert "bias" in gg.geglu_supports(x, w, torch.zeros(3, dtype=torch.float16))
    odd = torch.zeros(4, 36 + 3, dtype=torch.float16)
    reason = gg.geglu_supports(odd, torch.zeros(64, 39, dtype=torch.float16), None)
    assert reason is not None and ("16 bytes" in reason or "TRITON_INTERPRET" in reason)


def test_tuned_table_is_valid() -> None:
    table = gg.TUNED_GEGLU[(9, 0)]
    assert table
    for (m, k, n), t in table.items():
        bm, bn, bk, warps, stages = t.config
        assert all(v & (v - 1) == 0 for v in (bm, bn, bk)) and warps in (4, 8) and stages >= 2
        assert t.beats_unfused is (t.fused_us < t.unfused_us)
    assert gg.tuned_geglu(8192, 320, 1280, (9, 0)).beats_unfused
    assert not gg.tuned_geglu(256, 1280, 5120, (9, 0)).beats_unfused  # measured slower: unfused there
    assert gg.tuned_geglu(8192, 320, 1280, (8, 0)) is None and gg.tuned_geglu(8192, 320, 1280, None) is None


# ------------------------------------------------------------------------------------------
# FusedGEGLU (export/fused_ff.py)
# ------------------------------------------------------------------------------------------
def _fused_ff():
    pytest.importorskip("diffusers", reason="diffusers is not installed")
    from caphuman.export import fused_ff

    return fused_ff


def test_swap_keeps_state_dict_and_output_and_restores() -> None:
    fused_ff = _fused_ff()
    from diffusers.models.activations import GEGLU

    unet = tiny_unet()
    keys = list(unet.state_dict())
    originals = [m for m in unet.modules() if isinstance(m, GEGLU)]
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 7, 24)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        assert fused_ff.enable_fused_geglu(unet) == len(originals) > 0
        assert list(unet.state_dict()) == keys  # checkpoints load unchanged
        out = unet(x, t, ctx).sample  # CPU: AUTO takes diffusers' math, bit for bit
        fused = [m for m in unet.modules() if isinstance(m, fused_ff.FusedGEGLU)]
        assert all(m.last_path == "torch" for m in fused)
        assert fused_ff.disable_fused_geglu(unet) == len(originals)
    assert torch.equal(out, ref)
    assert [m for m in unet.modules() if isinstance(m, GEGLU)] == originals


def test_backend_choice_is_explicit() -> None:
    fused_ff = _fused_ff()
    from diffusers.models.activations import GEGLU

    m = fused_ff.FusedGEGLU(GEGLU(32, 16).half())
    x = torch.zeros(2, 32, dtype=torch.float16)
    assert m.use_kernel(x, capturing=True) is False  # CPU tensors never take the kernel under AUTO
    assert fused_ff.FusedGEGLU(GEGLU(32, 16).half(), "torch").use_kernel(x, capturing=True) is False
    forced = fused_ff.FusedGEGLU(GEGLU(32, 16).float(), "kernel")
    with pytest.raises(ValueError, match="fp16 or bf16"):
        forced.use_kernel(x.float())
    with pytest.raises(ValueError, match="backend"):
        fused_ff.FusedGEGLU(GEGLU(32, 16), "fast")


def test_unet_through_fused_kernel_interpreted() -> None:
    """A tiny fp16 UNet with every GEGLU through the kernel (interpreter) matches diffusers' math."""
    pytest.importorskip("diffusers")
    script = textwrap.dedent(
        """
        import torch
        from tests.conftest import tiny_unet
        from caphuman.export import fused_ff
        unet = tiny_unet()
        x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 7, 24)
        with torch.no_grad():
            ref = unet(x, t, ctx).sample
            unet = unet.half()
            fused_ff.enable_fused_geglu(unet, backend="kernel")
            out = unet(x.half(), t, ctx.half()).sample.float()
            paths = {m.last_path for m in unet.modules() if isinstance(m, fused_ff.FusedGEGLU)}
            fused_ff.enable_fused_geglu(unet, backend="torch")
            half_ref = unet(x.half(), t, ctx.half()).sample.float()
        print("PATHS", sorted(paths))
        print("ERR", (out - ref).abs().max().item(), (half_ref - ref).abs().max().item())
        """
    )
    out = run_interpreted(script)
    assert "PATHS ['kernel']" in out
    err_kernel, err_half = (float(v) for v in next(ln for ln in out.splitlines() if ln.startswith("ERR")).split()[1:])
    assert err_kernel <= max(2 * err_half, 2e-3), (err_kernel, err_half)


@pytest.mark.gpu
def test_tuned_configs_match_reference_at_full_size() -> None:
    """Every measured config of this GPU at its CapHuman shape, through the default path."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from caphuman.kernels.attention_triton import device_capability

    table = gg.TUNED_GEGLU.get(device_capability(torch.device("cuda")))
    if not table:
        pytest.skip("no measured configs for this GPU architecture")
    g = torch.Generator(device="cuda").manual_seed(0)
    for (m, k, n) in table:
        x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.float16)
        w = (torch.randn(2 * n, k, device="cuda", generator=g) / k ** 0.5).half()
        b = (torch.randn(2 * n, device="cuda", generator=g) * 0.1).half()
        ref = gg.geglu_reference(x, w, b)
        err = (gg.geglu_linear(x, w, b).double() - ref).abs().max().item()
        assert err <= 2e-3 * ref.abs().max().item(), ((m, k, n), err)


@pytest.mark.gpu
def test_bf16_at_full_size() -> None:
    """bf16 on the GPU at every CapHuman GEGLU problem (autotuned: the table is fp16-only)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    for (m, k, n) in gg.TUNED_GEGLU.get((9, 0), {}):
        x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
        w = (torch.randn(2 * n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
        b = (torch.randn(2 * n, device="cuda", generator=g) * 0.1).bfloat16()
        ref = gg.geglu_reference(x, w, b)
        err = (gg.geglu_linear(x, w, b).double() - ref).abs().max().item()
        assert err <= 1.6e-2 * ref.abs().max().item(), ((m, k, n), err)  # bf16: 8 mantissa bits, 2^-7 ulp
