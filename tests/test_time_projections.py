"""fuse_time_projections: the ResNet blocks' time projections of a network as one GEMM, same values,
in eager and under torch.compile (the product is made in one compiled half of the UNet and read in
the other)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from export.models import load_denoiser
from export.networks import run_unet, unet_decode, unet_encode
from export.time_projections import fuse_time_projections


@pytest.fixture(scope="module")
def den(tiny_config_path, official_checkpoint):
    return load_denoiser(tiny_config_path, official_checkpoint).eval()


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([601, 601]),
            torch.randn(2, 77, cfg.context_dim, generator=g), torch.rand(1, 9, 64, 64, generator=g),
            torch.randn(1, 258, cfg.context_dim, generator=g))


def _linear_calls(net):
    calls = []
    for m in net.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, a, o: calls.append(mod))
    return calls


def test_fused_unet_and_capface_compute_the_same(den, tiny_config):
    x, t, text, hint, ctx = _inputs(tiny_config)
    fused = copy.deepcopy(den)
    n_blocks = sum(1 for m in den.unet.modules() if type(m).__name__ == "ResnetBlock2D")
    before = _linear_calls(den.unet)
    with torch.no_grad():
        want = run_unet(den.unet, x, t, text, None)
        res_want, mask_want = den.capface(x[:1], t[:1], hint, ctx)
    fp = fuse_time_projections(fused.unet)
    assert fp is not None and fuse_time_projections(fused.unet) is fp  # idempotent
    assert fuse_time_projections(fused.capface.net) is not None
    after = _linear_calls(fused.unet)
    with torch.no_grad():
        got = run_unet(fused.unet, x, t, text, None)
        res_got, mask_got = fused.capface(x[:1], t[:1], hint, ctx)
    # n_blocks projections fewer (the fused one is a functional call, not a module)
    assert len(before) - len(after) == n_blocks
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(res_got, res_want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mask_got, mask_want, rtol=0, atol=0)


def test_fused_halves_under_torch_compile(den, tiny_config):
    """The product is computed in the compiled encode half and read in the compiled decode half."""
    x, t, text, *_ = _inputs(tiny_config, seed=1)
    fused = copy.deepcopy(den)
    fuse_time_projections(fused.unet)
    unet = fused.unet
    enc_fn = torch.compile(lambda x, t, text: unet_encode(unet, x, t, text), backend="aot_eager", dynamic=False)
    dec_fn = torch.compile(lambda enc: unet_decode(unet, enc, None), backend="aot_eager", dynamic=False)
    with torch.no_grad():
        want = run_unet(den.unet, x, t, text, None)
        for step_t in (t, t - 200):  # a new timestep must not reuse the old product
            want = run_unet(den.unet, x, step_t, text, None)
            got = dec_fn(enc_fn(x, step_t, text))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_slice_before_time_embedding_is_an_error(den):
    fused = copy.deepcopy(den)
    fuse_time_projections(fused.unet)
    block = next(m for m in fused.unet.modules() if type(m).__name__ == "ResnetBlock2D")
    with pytest.raises(RuntimeError, match="before the network's time_embedding"):
        block.time_emb_proj(torch.zeros(2, 8))
