"""Fused Triton attention (kernels/attention_triton.py) and its diffusers processors.

The kernel checks run in ONE subprocess with ``TRITON_INTERPRET=1``: the variable must be set
before triton is first imported, and another test module of this session may already have
imported it, so setting it here at import time would be unreliable. The subprocess runs every
case of ``_KERNEL_CASES`` against the float64 reference and reports the max error per case.
Processor tests run in-process on the CPU (SDPA fallback), plus one subprocess run of a tiny UNet
through the Triton backend under the interpreter.
"""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from caphuman.kernels import attention_triton as at

from tests.conftest import run_interpreted, tiny_unet

pytestmark = pytest.mark.skipif(not at.HAS_TRITON, reason="triton is not installed")

# name: (B, H, Nq, Nk, D, dtype, layout, config[, split_mode[, loads]])
#   layout "bhnd": contiguous [B,H,N,D]; "bnhd": [B,N,H,D] views via attention_bnhd;
#   "sliced": q/k/v are column slices of one fused [B,N,3*H*D] projection (non-contiguous);
#   "packed": [B,N,H*D] projections viewed as [B,H,N,D] (what diffusers' processors pass).
_KERNEL_CASES = {
    "fp16_d40_irregular": (1, 2, 37, 29, 40, "float16", "bhnd", None),
    "fp16_d80_cross77": (2, 1, 50, 77, 80, "float16", "bnhd", None),
    "fp16_d160_short": (1, 2, 9, 40, 160, "float16", "bhnd", None),
    "fp16_d64_pow2": (1, 1, 33, 31, 64, "float16", "bhnd", None),
    "fp16_d40_fused_qkv_slices": (2, 2, 21, 21, 40, "float16", "sliced", None),
    "fp16_d40_multiblock_partial": (1, 1, 45, 70, 40, "float16", "bhnd", {"BLOCK_M": 16, "BLOCK_N": 16}),
    "fp16_d80_multiblock_even": (1, 1, 40, 64, 80, "float16", "bhnd", {"BLOCK_M": 16, "BLOCK_N": 16}),
    # CapFace's 258 keys with 64-key blocks: 4 full blocks, then a 16-wide tail block holding 2 keys
    "fp16_d40_cross258_tail2": (1, 2, 20, 258, 40, "float16", "bnhd", {"BLOCK_M": 16, "BLOCK_N": 64}),
    "bf16_d40_irregular": (1, 2, 20, 33, 40, "bfloat16", "bhnd", None),
    "bf16_d80_bnhd": (1, 2, 19, 45, 80, "bfloat16", "bnhd", {"BLOCK_M": 16, "BLOCK_N": 16}),
    "fp16_d40_padded": (1, 2, 37, 29, 40, "float16", "bhnd", None, "padded"),
    "fp16_d40_split16": (1, 2, 37, 29, 40, "float16", "bhnd", None, "split16"),
    "fp16_d80_split16": (1, 1, 33, 50, 80, "float16", "bnhd", None, "split16"),
    "fp16_d80_split32": (1, 1, 33, 50, 80, "float16", "bhnd", {"BLOCK_M": 16, "BLOCK_N": 16}, "split32"),
    "bf16_d160_split16": (1, 1, 20, 21, 160, "bfloat16", "bhnd", None, "split16"),
    # head dim not contiguous (a [B, H, D, N] buffer viewed as [B, H, N, D]): the launcher copies it
    "fp16_d40_strided_head_dim": (1, 2, 19, 23, 40, "float16", "dstrided", None),
    # TMA descriptor kernel (the interpreter models TMA's zero fill): 2-D row descriptors read the
    # neighbouring head's columns and the next batch's rows, which the kernel must neutralise
    "tma2d_fp16_d40_partial_blocks": (2, 3, 37, 29, 40, "float16", "packed", {"BLOCK_M": 16, "BLOCK_N": 16},
                                      "split32", "tma2d"),
    "tma2d_fp16_d40_split16": (2, 2, 37, 50, 40, "float16", "packed", None, "split16", "tma2d"),
    "tma2d_fp16_d80_fused_qkv_slices": (2, 2, 21, 21, 80, "float16", "sliced", None, "split32", "tma2d"),
    "tma2d_bf16_d160": (2, 2, 20, 33, 160, "bfloat16", "packed", None, "split32", "tma2d"),
    "tma4d_fp16_d80_split16_bhnd": (1, 2, 33, 50, 80, "float16", "bhnd", None, "split16", "tma4d"),
    "tma4d_fp16_d40_partial_blocks": (2, 2, 45, 70, 40, "float16", "packed", {"BLOCK_M": 16, "BLOCK_N": 16},
                                      "padded", "tma4d"),
}
_TOL = {"float16": 4e-3, "bfloat16": 3e-2}  # outputs are O(1): a few ulps of the output dtype

_KERNEL_SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import torch
    from caphuman.kernels.attention_triton import attention, attention_bnhd, attention_reference
    cases = json.loads(sys.argv[1])
    res = {}
    for name, (b, h, nq, nk, d, dt, layout, cfg, *rest) in cases.items():
        mode, loads = (rest + [None, None])[:2]
        g = torch.Generator().manual_seed(len(name))
        dt = getattr(torch, dt)
        scale = 0.7 / math.sqrt(d)  # not the default: the scale argument must be honoured
        if layout == "sliced":
            qkv = torch.randn(b, nq, 3 * h * d, generator=g).to(dt)
            q, k, v = (qkv[..., i * h * d:(i + 1) * h * d].view(b, nq, h, d).transpose(1, 2) for i in range(3))
        elif layout == "packed":  # [B, N, H*D] projections viewed as [B, H, N, D], as diffusers makes them
            q, k, v = (torch.randn(b, n, h * d, generator=g).to(dt).view(b, n, h, d).transpose(1, 2)
                       for n in (nq, nk, nk))
        elif layout == "dstrided":
            q = torch.randn(b, h, d, nq, generator=g).to(dt).transpose(2, 3)
            k = torch.randn(b, h, d, nk, generator=g).to(dt).transpose(2, 3)
            v = torch.randn(b, h, d, nk, generator=g).to(dt).transpose(2, 3)
            assert q.stride(-1) != 1
        else:
            q = torch.randn(b, h, nq, d, generator=g).to(dt)
            k = torch.randn(b, h, nk, d, generator=g).to(dt)
            v = torch.randn(b, h, nk, d, generator=g).to(dt)
        if layout == "bnhd":
            o = attention_bnhd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, config=cfg,
                               split_mode=mode, loads=loads)
            o = o.transpose(1, 2)
        else:
            o = attention(q, k, v, scale, config=cfg, split_mode=mode, loads=loads)
        if layout == "dstrided":
            try:
                attention(q, k, v, scale, out=torch.empty(b, h, d, nq, dtype=dt).transpose(2, 3))
                raise AssertionError("an out with a strided head dim was accepted")
            except ValueError as e:
                assert "contiguous head dim" in str(e)
        ref = attention_reference(q, k, v, scale)
        res[name] = {"err": (o.double() - ref).abs().max().item(), "dtype": str(o.dtype),
                     "shape": list(o.shape), "ref_absmax": ref.abs().max().item()}
    print("RESULT" + json.dumps(res))
    """
)


@pytest.fixture(scope="module")
def kernel_results() -> dict:
    out = run_interpreted(_KERNEL_SCRIPT, json.dumps(_KERNEL_CASES))
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("case", sorted(_KERNEL_CASES))
def test_kernel_matches_float64_reference(kernel_results: dict, case: str) -> None:
    b, h, nq, nk, d, dt = _KERNEL_CASES[case][:6]
    r = kernel_results[case]
    assert r["shape"] == [b, h, nq, d]
    assert r["dtype"] == f"torch.{dt}"
    assert r["ref_absmax"] > 0.1  # the reference is not trivially zero
    assert r["err"] <= _TOL[dt], f"{case}: max abs error {r['err']:.3g} > {_TOL[dt]}"


@pytest.mark.parametrize("d, expected", [(40, (32, 16)), (80, (64, 16)), (160, (128, 32)), (64, (64, 0)),
                                         (100, (128, 0)), (8, (16, 0)), (24, (32, 0))])
def test_split_head_dim(d: int, expected: tuple[int, int]) -> None:
    a, b = at.split_head_dim(d)
    assert (a, b) == expected and a + b >= d


@pytest.mark.parametrize("n_kv, block_n, expected", [(77, 32, 16), (258, 64, 16), (77, 128, 128), (50, 32, 32),
                                                      (64, 32, 0), (29, 32, 32), (258, 32, 16), (1024, 128, 0)])
def test_tail_block(n_kv: int, block_n: int, expected: int) -> None:
    """The pointer kernel's last key block covers the leftover keys with the narrowest legal dot."""
    assert at.tail_block(n_kv, block_n) == expected


def test_split_head_dim_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="head_dim"):
        at.split_head_dim(300)
    with pytest.raises(ValueError, match="min_slab"):
        at.split_head_dim(40, 8)


@pytest.mark.parametrize("d, mode, expected", [(40, "padded", (64, 0)), (80, "split32", (64, 32)),
                                               (160, "split32", (128, 32)), (40, "split32", (64, 0))])
def test_split_modes(d: int, mode: str, expected: tuple[int, int]) -> None:
    assert at.split_head_dim(d, at.SPLIT_MODES[mode]) == expected


def test_reference_matches_naive_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    w = torch.exp((q.double() @ k.double().transpose(-1, -2)) * 0.5)
    naive = (w / w.sum(-1, keepdim=True)) @ v.double()
    torch.testing.assert_close(at.attention_reference(q, k, v, 0.5), naive)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), "4-D"),
        (lambda: (torch.zeros(1, 1, 4, 40), torch.zeros(1, 1, 4, 40), torch.zeros(1, 1, 4, 40)), "cannot run"),
    ],
)
def test_attention_validates_inputs(make, match: str) -> None:
    if at.interpreter_enabled():
        pytest.skip("this process runs the interpreter, where CPU tensors are accepted")
    with pytest.raises(ValueError, match=match):
        at.attention(*make())


def test_triton_supports_reasons() -> None:
    half = torch.zeros(1, 1, 4, 40, dtype=torch.float16)
    assert "dtype" in at.triton_supports(half.float(), half.float(), half.float())
    assert "differ" in at.triton_supports(half, half.bfloat16(), half)
    assert "head dim" in at.triton_supports(*(torch.zeros(1, 1, 2, 300, dtype=torch.float16),) * 3)
    if not at.interpreter_enabled():
        assert "TRITON_INTERPRET" in at.triton_supports(half, half, half)


# ------------------------------------------------------------------------------------------
# Processors (CPU: SDPA fallback)
# ------------------------------------------------------------------------------------------
def _diffusers():
    pytest.importorskip("diffusers", reason="diffusers is not installed")
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from caphuman.export import attention_processors

    return UNet2DConditionModel, Attention, AttnProcessor2_0, attention_processors


def _tiny_unet(seed: int = 0):
    _diffusers()
    return tiny_unet(seed)


def _count_kv_projections(unet) -> dict:
    Attention = _diffusers()[1]
    counts = {"k": 0, "v": 0}
    for name, m in unet.named_modules():
        if isinstance(m, Attention) and name.endswith("attn2"):  # cross-attention
            m.to_k.register_forward_hook(lambda *_: counts.__setitem__("k", counts["k"] + 1))
            m.to_v.register_forward_hook(lambda *_: counts.__setitem__("v", counts["v"] + 1))
    return counts


def _n_cross(unet) -> int:
    Attention = _diffusers()[1]
    return sum(1 for n, m in unet.named_modules() if isinstance(m, Attention) and n.endswith("attn2"))


def test_enable_fast_attention_same_output_cpu_fallback() -> None:
    _, Attention, AttnProcessor2_0, ap = _diffusers()
    unet = _tiny_unet()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 7, 24)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        ap.enable_fast_attention(unet)
        procs = [m.processor for m in unet.modules() if isinstance(m, Attention)]
        assert procs and all(isinstance(p, ap.FastAttnProcessor) for p in procs)
        out = unet(x, t, ctx).sample
        assert all(p.last_backend is ap.AttnBackend.SDPA for p in procs)  # CPU tensors: explicit fallback
        ap.disable_fast_attention(unet)
        assert all(isinstance(m.processor, AttnProcessor2_0) for m in unet.modules() if isinstance(m, Attention))
        back = unet(x, t, ctx).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back, ref, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["processor", "diffusers"])
def test_fused_self_attention_projections(how: str) -> None:
    """With FastAttnProcessor.fuse_qkv (what the torch engine does) or diffusers' fuse_projections,
    self-attention q/k/v come from one GEMM as strided views, and the network computes the same;
    the processor's way leaves the module's state dict as it was."""
    _, Attention, _, ap = _diffusers()
    unet = _tiny_unet()
    keys = list(unet.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 7, 24)
    calls = {"q": 0}
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        ap.enable_fast_attention(unet)
        selfs = [m for m in unet.modules() if isinstance(m, Attention) and not m.is_cross_attention]
        assert selfs
        for m in selfs:
            if how == "processor":
                assert m.processor.fuse_qkv(m)
            else:
                m.fuse_projections()
            m.to_q.register_forward_hook(lambda *_: calls.__setitem__("q", calls["q"] + 1))
        out = unet(x, t, ctx).sample
    assert calls == {"q": 0}
    if how == "processor":
        assert list(unet.state_dict()) == keys
        cross = next(m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention)
        assert not cross.processor.fuse_qkv(cross)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_select_backend_is_explicit() -> None:
    _, Attention, AttnProcessor2_0, ap = _diffusers()
    cpu16 = torch.zeros(1, 4, 2, 40, dtype=torch.float16)
    assert ap.select_backend(cpu16, cpu16, cpu16, None, "sdpa") is ap.AttnBackend.SDPA
    # CPU tensors never take Triton under AUTO, not even while "capturing"
    assert ap.select_backend(cpu16, cpu16, cpu16, None, "auto", capturing=True) is ap.AttnBackend.SDPA
    if not at.interpreter_enabled():
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            ap.select_backend(cpu16, cpu16, cpu16, None, "triton")
    with pytest.raises(ValueError, match="dtype"):
        ap.select_backend(cpu16.float(), cpu16.float(), cpu16.float(), None, "triton")
    with pytest.raises(ValueError):
        ap.select_backend(cpu16, cpu16, cpu16, None, "flash")


@pytest.mark.parametrize("n_q, n_kv, capturing, expected", [
    (4096, 4096, True, False), (4096, 77, True, True), (1024, 1024, True, False), (4096, 258, True, True),
    (1024, 77, True, True), (1024, 258, True, True), (256, 256, True, True), (64, 258, True, True),
    (256, 256, False, False), (64, 64, False, False),
])
def test_auto_rule_without_measurements(n_q: int, n_kv: int, capturing: bool, expected: bool) -> None:
    """Shapes or GPUs with no entry in TUNED_LAUNCHES: Triton for at most 512 keys, in graphs only."""
    ap = _diffusers()[3]
    assert ap.triton_preferred(n_q, n_kv, capturing) is expected
    assert ap.triton_preferred(n_q, n_kv, capturing, head_dim=40, batch_heads=16, capability=(8, 0)) is expected


@pytest.mark.parametrize("n_q, n_kv, d, bh, expected", [
    (4096, 4096, 40, 16, True), (4096, 4096, 40, 8, True),    # TMA kernel: 1.02x, 1.06x over cuDNN
    (1024, 1024, 80, 8, True), (1024, 1024, 80, 16, True),    # 1.35x at batch 1, 1.12x at batch 2
    (4096, 77, 40, 16, True), (256, 256, 160, 16, True),
    (1024, 1024, 64, 16, False),                               # not measured: the key-count rule
])
def test_auto_rule_follows_h100_measurements(n_q: int, n_kv: int, d: int, bh: int, expected: bool) -> None:
    ap = _diffusers()[3]
    assert ap.triton_preferred(n_q, n_kv, True, head_dim=d, batch_heads=bh, capability=(9, 0)) is expected
    assert ap.triton_preferred(n_q, n_kv, False, head_dim=d, batch_heads=bh, capability=(9, 0)) is False


def test_auto_rule_takes_sdpa_where_it_measured_faster(monkeypatch) -> None:
    """A measured entry where SDPA won overrides the key-count rule (which would pick Triton)."""
    ap = _diffusers()[3]
    slower = at.TunedLaunch("pointer", "split32", (64, 64, 4, 3), triton_us=9.0, sdpa_us=8.0)
    monkeypatch.setitem(at.TUNED_LAUNCHES, (9, 0), {(256, 256, 160, 16): slower})
    assert ap.triton_preferred(256, 256, True, head_dim=160, batch_heads=16, capability=(9, 0)) is False
    assert ap.triton_preferred(256, 256, True) is True  # no measurement given: at most 512 keys -> Triton


def test_tuned_launches_are_valid_choices() -> None:
    """Every measured entry names a real layout, a config the kernel accepts, and both timings."""
    assert at.TUNED_LAUNCHES[(9, 0)]
    for (n_q, n_kv, d, bh), t in at.TUNED_LAUNCHES[(9, 0)].items():
        assert t.loads in at.LOAD_MODES and t.split_mode in at.SPLIT_MODES
        bm, bn, warps, stages = t.config
        assert bm & (bm - 1) == 0 and bn & (bn - 1) == 0 and warps in (4, 8) and stages >= 2
        assert t.triton_us > 0 and t.sdpa_us > 0
        assert t.beats_sdpa is (t.triton_us < t.sdpa_us)
        # pointer loads with a 16-wide slab crashed Triton 3.6 on sm_90 (docs/kernels.md): never tuned in
        assert not (t.loads == "pointer" and t.split_mode == "split16")
    assert at.tuned_launch(4096, 4096, 40, 16, (9, 0)).loads == "tma2d"
    assert at.tuned_launch(4096, 4096, 40, 16, (8, 0)) is None
    assert at.tuned_launch(4096, 4096, 40, 16, None) is None
    assert at.tuned_launch(4096, 4096, 40, 32, (9, 0)) is None


def test_tma_layout_reasons() -> None:
    """TMA needs 16-byte aligned bases and strides; row descriptors need packed heads and batches."""
    bnhd = torch.zeros(2, 64, 8 * 40, dtype=torch.float16).view(2, 64, 8, 40).transpose(1, 2)
    assert at.tma_layout_reason((bnhd,), 40, "tma2d") is None
    assert at.tma_layout_reason((bnhd,), 40, "tma4d") is None
    bhnd = torch.zeros(2, 8, 64, 40, dtype=torch.float16)
    assert "heads are not packed" in at.tma_layout_reason((bhnd,), 40, "tma2d")
    assert at.tma_layout_reason((bhnd,), 40, "tma4d") is None
    odd = torch.zeros(2, 64, 8 * 36, dtype=torch.float16).view(2, 64, 8, 36).transpose(1, 2)  # 72-byte heads
    assert "16 bytes" in at.tma_layout_reason((odd,), 36, "tma4d")
    shifted = torch.zeros(2 * 64 * 320 + 4, dtype=torch.float16)[4:].view(2, 64, 8, 40).transpose(1, 2)
    assert "16-byte aligned" in at.tma_layout_reason((shifted,), 40, "tma4d")
    every_other_batch = torch.zeros(4, 64, 320, dtype=torch.float16)[::2].view(2, 64, 8, 40).transpose(1, 2)
    assert "batches are not packed" in at.tma_layout_reason((every_other_batch,), 40, "tma2d")


def test_explicit_tma_request_that_cannot_run_raises() -> None:
    script = textwrap.dedent(
        """
        import torch
        from caphuman.kernels.attention_triton import attention
        bhnd = torch.zeros(1, 2, 16, 40, dtype=torch.float16)
        for loads, match in (("tma2d", "heads are not packed"), ("cp.async", "must be one of")):
            try:
                attention(bhnd, bhnd, bhnd, loads=loads)
            except ValueError as e:
                assert match in str(e), e
            else:
                raise AssertionError(f"loads={loads} was accepted")
        print("OK")
        """
    )
    assert run_interpreted(script).strip().endswith("OK")


def test_tuned_launch_is_used_and_falls_back() -> None:
    """The launcher's table lookup (interpreter, a small injected entry for a patched capability):
    the entry's layout runs where TMA can describe the tensors; elsewhere the plain defaults run
    (pointer loads and the default split, never the entry's split16 with pointer loads)."""
    script = textwrap.dedent(
        """
        import torch
        from caphuman.kernels import attention_triton as at
        at.device_capability = lambda device: (9, 0)
        at.TUNED_LAUNCHES[(9, 0)] = {(37, 29, 40, 4): at.TunedLaunch("tma2d", "split16", (16, 16, 4, 2), 1.0, 2.0)}
        ran = []
        for name in ("_attn_fwd_fixed", "_attn_fwd_tma_fixed"):
            kernel = getattr(at, name)
            class Spy:
                def __init__(self, kernel, name):
                    self.kernel, self.name = kernel, name
                def __getitem__(self, grid):
                    def launch(*args, **kw):
                        ran.append((self.name, kw["HEAD_A"], kw["HEAD_B"], kw["BLOCK_M"]))
                        return self.kernel[grid](*args, **kw)
                    return launch
            setattr(at, name, Spy(kernel, name))
        g = torch.Generator().manual_seed(0)
        packed = [torch.randn(2, n, 2 * 40, generator=g).half().view(2, n, 2, 40) for n in (37, 29, 29)]
        o = at.attention_bnhd(*packed)
        err = (o.transpose(1, 2).double() - at.attention_reference(*(t.transpose(1, 2) for t in packed))).abs().max()
        print("TMA", ran[-1], float(err))
        bhnd = [t.transpose(1, 2).contiguous() for t in packed]  # heads not packed: no 2-D descriptors
        o = at.attention(*bhnd)
        err = (o.double() - at.attention_reference(*bhnd)).abs().max()
        print("FALLBACK", ran[-1], float(err))
        """
    )
    out = run_interpreted(script)
    lines = {ln.split(" ", 1)[0]: ln for ln in out.splitlines()}
    assert "('_attn_fwd_tma_fixed', 32, 16, 16)" in lines["TMA"]   # tma2d, split16, the entry's BLOCK_M
    assert "('_attn_fwd_fixed', 64, 0, 32)" in lines["FALLBACK"]    # pointer, split32 (40 -> 64), defaults
    assert all(float(lines[key].rsplit(" ", 1)[1]) < 4e-3 for key in ("TMA", "FALLBACK"))


def _measured_table_or_skip() -> dict:
    """This GPU's TUNED_LAUNCHES (skips without a GPU or without measurements for its architecture)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    table = at.TUNED_LAUNCHES.get(at.device_capability(torch.device("cuda")))
    if not table:
        pytest.skip("no measured launches for this GPU architecture")
    return table


def _bnhd_problem(problem, dtype, g):
    """Full-size CUDA q, k, v as [B, N, H, D] views of [B, N, H*D] projections for one table key."""
    n_q, n_kv, d, bh = problem
    b, h = bh // 8, 8
    return tuple(torch.randn(b, n, h * d, device="cuda", dtype=dtype, generator=g).view(b, n, h, d)
                 for n in (n_q, n_kv, n_kv))


@pytest.mark.gpu
def test_tuned_launches_match_sdpa_at_full_size() -> None:
    """Every measured (layout, config) of this GPU, at its CapHuman shape, through the default path."""
    table = _measured_table_or_skip()
    g = torch.Generator(device="cuda").manual_seed(0)
    for (n_q, n_kv, d, bh), tuned in table.items():
        q, k, v = _bnhd_problem((n_q, n_kv, d, bh), torch.float16, g)
        if tuned.loads != "pointer":  # the measured layout must really run, not fall back
            assert at.tma_layout_reason(tuple(t.transpose(1, 2) for t in (q, k, v)), d, tuned.loads) is None
        o = at.attention_bnhd(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        err = (o.transpose(1, 2).float() - ref.float()).abs().max().item()
        assert err < 5e-3, f"{(n_q, n_kv, d, bh)} {tuned}: max error {err}"


@pytest.mark.gpu
def test_bf16_at_full_size_every_layout() -> None:
    """bf16 on the GPU, at every CapHuman problem: the default path (the table is fp16-only, so bf16
    autotunes the pointer kernel) and the problem's measured layout forced in bf16. Compared with the
    float64 reference; the bound follows SDPA's own bf16 error on the same inputs."""
    table = _measured_table_or_skip()
    g = torch.Generator(device="cuda").manual_seed(0)
    for problem, tuned in table.items():
        q, k, v = _bnhd_problem(problem, torch.bfloat16, g)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        ref = at.attention_reference(qt, kt, vt)
        sdpa_err = (torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).double() - ref).abs().max().item()
        config = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), tuned.config))
        runs = {"default": lambda: at.attention_bnhd(q, k, v),
                "measured layout": lambda: at.attention_bnhd(q, k, v, config=config, split_mode=tuned.split_mode,
                                                             loads=tuned.loads)}
        for name, run in runs.items():
            err = (run().transpose(1, 2).double() - ref).abs().max().item()
            assert err <= 2 * sdpa_err + 2e-3, f"{problem} {name} {tuned}: {err} (sdpa {sdpa_err})"


def test_cross_kv_cache_projects_once_and_invalidates() -> None:
    _, Attention, AttnProcessor2_0, ap = _diffusers()
    unet = _tiny_unet()
    counts = _count_kv_projections(unet)
    n = _n_cross(unet)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    ctx = torch.randn(2, 7, 24)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        counts.update(k=0, v=0)
        cache = ap.enable_fast_attention(unet, cache_cross_kv=True)
        outs = [unet(x, t, ctx).sample for _ in range(3)]  # three "steps", one context
        assert counts == {"k": n, "v": n}, "to_k/to_v must run once per layer for a constant context"
        assert cache.hits == 2 * n
        for o in outs:
            torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-6)
        ctx2 = torch.randn(2, 7, 24)  # a new request's context: recomputed
        ref2_fast = unet(x, t, ctx2).sample
        assert counts == {"k": 2 * n, "v": 2 * n}
        ctx2.mul_(2.0)  # edited in place: the version counter invalidates the entry
        out3 = unet(x, t, ctx2).sample
        assert counts == {"k": 3 * n, "v": 3 * n}
        assert not torch.allclose(out3, ref2_fast)
        ap.clear_kv_cache(unet)  # explicit clear
        unet(x, t, ctx2)
        assert counts == {"k": 4 * n, "v": 4 * n}
        for m in unet.modules():  # weights changed in place (e.g. a LoRA merge): recomputed
            if isinstance(m, Attention):
                m.to_k.weight.mul_(1.0)
        unet(x, t, ctx2)
        assert counts == {"k": 5 * n, "v": 5 * n}
        ap.disable_fast_attention(unet)
        torch.testing.assert_close(unet(x, t, ctx2).sample, out3, rtol=1e-5, atol=1e-6)


def test_cross_kv_cache_inference_mode_needs_request_scope() -> None:
    _, Attention, AttnProcessor2_0, ap = _diffusers()
    unet = _tiny_unet()
    counts = _count_kv_projections(unet)
    n = _n_cross(unet)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    ap.enable_fast_attention(unet)
    with torch.inference_mode():
        ctx = torch.randn(2, 7, 24)  # inference tensor: no version counter
        unet(x, t, ctx)
        unet(x, t, ctx)
        assert counts == {"k": 2 * n, "v": 2 * n}, "outside a request scope nothing may be cached"
        with ap.kv_cache_request(unet):
            unet(x, t, ctx)
            unet(x, t, ctx)
            unet(x, t, ctx)
        assert counts == {"k": 3 * n, "v": 3 * n}
        with ap.kv_cache_request(unet):  # a new request starts empty
            unet(x, t, ctx)
        assert counts == {"k": 4 * n, "v": 4 * n}


def test_enable_fast_attention_rejects_module_without_attention() -> None:
    _, Attention, AttnProcessor2_0, ap = _diffusers()
    with pytest.raises(ValueError, match="no diffusers Attention"):
        ap.enable_fast_attention(torch.nn.Linear(2, 2))


_UNET_TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.conftest import tiny_unet
    from caphuman.export import attention_processors as ap
    unet = tiny_unet()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 7, 24)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample.double()
        unet = unet.to(torch.bfloat16)
        ap.enable_fast_attention(unet, backend="sdpa")
        sdpa = unet(x.bfloat16(), t, ctx.bfloat16()).sample.double()
        ap.enable_fast_attention(unet, backend="triton")
        tri = unet(x.bfloat16(), t, ctx.bfloat16()).sample.double()
        used = {m.processor.last_backend.value for m in unet.modules() if hasattr(m, "processor")}
        for m in unet.modules():  # fused q/k/v: the kernel takes the strided chunks of one GEMM
            if hasattr(m, "processor"):
                m.processor.fuse_qkv(m)
        fused = unet(x.bfloat16(), t, ctx.bfloat16()).sample.double()
    print("RESULT", (tri - sdpa).abs().max().item(), (sdpa - ref).abs().max().item(), sorted(used),
          (fused - tri).abs().max().item())
    """
)


def test_unet_through_triton_kernel_interpreted() -> None:
    _, Attention, AttnProcessor2_0, ap = _diffusers()
    out = run_interpreted(_UNET_TRITON_SCRIPT)
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT"))
    _, tri_vs_sdpa, sdpa_vs_fp32, used, fused_vs_tri = line.replace("['triton']", "triton").split(" ")
    assert used == "triton"
    # same weights, one GEMM instead of three: at most a bf16 rounding apart
    assert float(fused_vs_tri) <= max(float(sdpa_vs_fp32), 2e-2), fused_vs_tri
    # bf16 network: Triton must be as close to the bf16 SDPA run as bf16 rounding allows
    assert float(tri_vs_sdpa) <= max(2 * float(sdpa_vs_fp32), 2e-2), (tri_vs_sdpa, sdpa_vs_fp32)


@pytest.mark.gpu
def test_processors_on_cuda_use_triton_and_match_sdpa() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _, Attention, _, ap = _diffusers()
    unet = _tiny_unet().to("cuda", torch.float16)
    x = torch.randn(2, 4, 8, 8, device="cuda", dtype=torch.float16)
    t = torch.tensor([10, 10], device="cuda")
    ctx = torch.randn(2, 7, 24, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample.float()
        ap.enable_fast_attention(unet)  # AUTO, eager: SDPA (Triton launch cost loses outside graphs)
        auto = unet(x, t, ctx).sample.float()
        procs = [m.processor for m in unet.modules() if isinstance(m, Attention)]
        assert all(p.last_backend is ap.AttnBackend.SDPA for p in procs)
        cache = ap.enable_fast_attention(unet, backend="triton")
        with ap.kv_cache_request(unet):
            outs = [unet(x, t, ctx).sample.float() for _ in range(2)]
        procs = [m.processor for m in unet.modules() if isinstance(m, Attention)]
    assert all(p.last_backend is ap.AttnBackend.TRITON for p in procs)
    assert cache.hits == _n_cross(unet)
    torch.testing.assert_close(auto, ref, atol=1e-3, rtol=1e-3)
    for o in outs:
        torch.testing.assert_close(o, ref, atol=1e-2, rtol=1e-2)


def test_alignment_hint_is_a_true_divisor() -> None:
    """ALIGN (the kernel's tl.multiple_of hint) must divide every batch/head/token stride and base
    address in elements: a wrong hint would make the GPU kernel read misaligned vectors."""
    base = torch.zeros(2, 64, 8 * 40, dtype=torch.float16)
    bnhd = base.view(2, 64, 8, 40).transpose(1, 2)           # strides (20480, 40, 320): all multiples of 8
    assert at._alignment(bnhd) == 8
    odd = torch.zeros(2, 64, 8 * 41, dtype=torch.float16).view(2, 64, 8, 41).transpose(1, 2)
    assert at._alignment(odd) == 1                            # head stride 41
    offset = torch.zeros(2 * 64 * 320 + 4, dtype=torch.float16)[4:].view(2, 64, 8, 40).transpose(1, 2)
    assert at._alignment(offset) == 4                         # base address 4 elements past an aligned one
    assert at._alignment(bnhd, odd) == 1                      # the weakest tensor decides
    for t in (bnhd, odd, offset):
        a = at._alignment(t)
        assert all(x % a == 0 for x in (*t.stride()[:3], t.data_ptr() // t.element_size()))
