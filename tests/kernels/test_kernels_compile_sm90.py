"""Every measured GPU launch compiles for sm_90 (H100) on this CPU-only machine.

Triton compiles ahead of time for a named target with the ptxas it ships, so CI can build the exact
kernels the engine launches on the H100 (each TUNED_LAUNCHES and TUNED_GEGLU entry: layout, head-dim
split, tile config, warps, stages) without a GPU. This checks what the CPU interpreter cannot:
lowering to TMA and wgmma, register allocation (no spills) and the shared memory each config needs
(at most the 227 KiB an H100 block may use). The signature mirrors what the launchers pass: fp16,
16-byte aligned pointers and strides (Triton specialises those at launch), descriptor tile shapes
from the config.
"""
from __future__ import annotations

import re
import subprocess

import pytest

triton = pytest.importorskip("triton")

from caphuman.kernels import attention_triton as at  # noqa: E402
from caphuman.kernels import geglu_triton as gg  # noqa: E402

H100 = (9, 0)
H100_MAX_SHARED = 227 * 1024  # bytes of shared memory one block may use on sm_90


def _compile_sm90(kernel, signature: dict, constexprs: dict, aligned: tuple[str, ...], warps: int, stages: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    signature = {name: ("constexpr" if name in constexprs else signature[name]) for name in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    except (FileNotFoundError, PermissionError) as e:  # this Triton install has no runnable ptxas
        pytest.skip(f"cannot run ptxas: {e}")


def _spills(compiled) -> int:
    """Spilled bytes, from ptxas' report on the cubin's PTX (ptxas prints it with -v)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    proc = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", "-", "-o", "/dev/null"], input=compiled.asm["ptx"],
                          capture_output=True, text=True, check=True)
    found = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    assert found, proc.stderr
    return sum(int(x) for x in found)


def _attention_launch(key, launch):
    n_q, n_kv, head_dim, _ = key
    bm, bn, warps, stages = launch.config
    head_a, head_b = at.split_head_dim(head_dim, at.SPLIT_MODES[launch.split_mode])
    meta = dict(HEAD_DIM=head_dim, ALIGN=8, HEAD_A=head_a, HEAD_B=head_b, BLOCK_M=bm, BLOCK_N=bn, DOT_F32=False)
    ints = ("N_HEADS", "N_Q", "N_KV")
    if launch.loads == "pointer":
        kernel = at._attn_fwd
        strides = [f"stride_{t}{d}" for t in "qkvo" for d in "bhn"]
        sig = {**{p: "*fp16" for p in ("Q", "K", "V", "Out")}, **{s: "i32" for s in (*strides, *ints)},
               "qk_scale": "fp32"}
        aligned = ("Q", "K", "V", "Out")
        meta["TAIL_N"] = at.tail_block(n_kv, bn)
    else:
        kernel = at._attn_fwd_tma
        four_d = launch.loads == "tma4d"
        lead = "1,1," if four_d else ""
        sig = {f"{t}_{s}_desc": f"tensordesc<fp16[{lead}{rows},{width}]>"
               for t, rows in (("q", bm), ("k", bn), ("v", bn)) for s, width in (("a", head_a), ("b", head_b or head_a))}
        sig.update({"Out": "*fp16", **{s: "i32" for s in ("stride_ob", "stride_oh", "stride_on", *ints)},
                    "qk_scale": "fp32"})
        meta.update(DESC_4D=four_d, EVEN_N=n_kv % bn == 0)
        aligned = ("Out",)
    # strides, token counts: multiples of 16 elements for every CapHuman layout except 77/258 keys
    aligned += tuple(n for n in sig if n.startswith("stride_") and n.endswith(("b", "h", "n")))
    aligned += tuple(n for n, v in (("N_Q", n_q), ("N_KV", n_kv)) if v % 16 == 0)
    return kernel, sig, meta, aligned, warps, stages


ATTENTION = sorted(at.TUNED_LAUNCHES.get(H100, {}).items())
GEGLU = sorted(gg.TUNED_GEGLU.get(H100, {}).items())


@pytest.mark.parametrize("key,launch", ATTENTION, ids=[f"{k[0]}x{k[1]}d{k[2]}bh{k[3]}" for k, _ in ATTENTION])
def test_tuned_attention_launch_compiles_for_h100(key, launch):
    kernel, sig, meta, aligned, warps, stages = _attention_launch(key, launch)
    compiled = _compile_sm90(kernel, sig, meta, aligned, warps, stages)
    assert "wgmma" in compiled.asm["ptx"], "Hopper tensor-core instructions expected"
    if launch.loads != "pointer":
        assert "cp.async.bulk.tensor" in compiled.asm["ptx"], "TMA loads expected"
    assert compiled.metadata.shared <= H100_MAX_SHARED
    assert _spills(compiled) == 0


@pytest.mark.parametrize("key,launch", GEGLU, ids=[f"m{k[0]}k{k[1]}n{k[2]}" for k, _ in GEGLU])
def test_tuned_geglu_launch_compiles_for_h100(key, launch):
    m, k, n = key
    bm, bn, bk, warps, stages = launch.config
    sig = {"x_desc": f"tensordesc<fp16[{bm},{bk}]>", "w_desc": f"tensordesc<fp16[{bn},{bk}]>", "Bias": "*fp16",
           "Out": "*fp16", "M": "i32", "N_OUT": "i32", "K": "i32", "stride_om": "i32"}
    meta = dict(HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, DOT_F32=False)
    aligned = ("Bias", "Out", "stride_om") + tuple(name for name, v in (("M", m), ("N_OUT", n), ("K", k))
                                                     if v % 16 == 0)
    compiled = _compile_sm90(gg._geglu_gemm, sig, meta, aligned, warps, stages)
    assert "wgmma" in compiled.asm["ptx"] and "cp.async.bulk.tensor" in compiled.asm["ptx"]
    assert compiled.metadata.shared <= H100_MAX_SHARED
    assert _spills(compiled) == 0


def test_the_tables_are_not_empty():
    """The parametrized tests above would pass vacuously on empty tables."""
    assert len(ATTENTION) == 17 and len(GEGLU) >= 7
