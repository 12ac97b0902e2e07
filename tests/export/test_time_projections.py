"""fuse_time_projections: the ResNet blocks' time projections of a network as one GEMM, same values,
in eager and under torch.compile (the product is made in one compiled half of the UNet and read in
the other)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from caphuman.export.models import load_denoiser
from caphuman.export.networks import run_unet, unet_decode, unet_encode
from caphuman.export.time_projections import fuse_time_projections


@pytest.fixture(scope="module")
def den(tiny_config_path, official_checkpoint):
    return load_denoiser(tiny_config_path, official_checkpoint).eval()


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([601, 601]),
            torch.randn(2, 77, cfg.context_dim, generator=g), torch.rand(1, 9, 64, 64, generator=g),
            torch.randn(1, 258, cfg.context_dim, generator=g))


class _CountMatmuls(TorchDispatchMode):
    """Counts the matrix products (addmm/mm) dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.addmm, torch.ops.aten.mm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_fused_unet_and_capface_compute_the_same(den, tiny_config):
    x, t, text, hint, ctx = _inputs(tiny_config)
    fused = copy.deepcopy(den)
    n_blocks = sum(1 for m in den.unet.modules() if type(m).__name__ == "ResnetBlock2D")
    keys = list(den.state_dict())
    with torch.no_grad(), _CountMatmuls() as before:
        want = run_unet(den.unet, x, t, text, None)
    with torch.no_grad():
        res_want, mask_want = den.capface(x[:1], t[:1], hint, ctx)
    fp = fuse_time_projections(fused.unet)
    assert fp is not None and fuse_time_projections(fused.unet) is fp  # idempotent
    assert fuse_time_projections(fused.capface.net) is not None
    assert list(fused.state_dict()) == keys  # checkpoints of a fused network are unchanged
    with torch.no_grad(), _CountMatmuls() as after:
        got = run_unet(fused.unet, x, t, text, None)
    with torch.no_grad():
        res_got, mask_got = fused.capface(x[:1], t[:1], hint, ctx)
    assert before.count - after.count == n_blocks - 1  # n_blocks products became one
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(res_got, res_want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mask_got, mask_want, rtol=0, atol=0)


def test_deep_copy_and_dtype_change_of_a_fused_network(den, tiny_config):
    """A deep copy owns its own hook and slices (a copy run at another timestep must not read the
    original's product), and the fused weight follows the network's dtype."""
    x, t, text, *_ = _inputs(tiny_config, seed=2)
    fused = copy.deepcopy(den.unet)
    fuse_time_projections(fused)
    with torch.no_grad():
        run_unet(fused, x, t, text, None)
        twin = copy.deepcopy(fused)
        torch.testing.assert_close(run_unet(twin, x, t - 500, text, None), run_unet(den.unet, x, t - 500, text, None),
                                   rtol=1e-6, atol=1e-6)
        want64 = run_unet(copy.deepcopy(den.unet).double(), x.double(), t, text.double(), None)
        got64 = run_unet(twin.double(), x.double(), t, text.double(), None)
    torch.testing.assert_close(got64, want64, rtol=1e-12, atol=1e-12)


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
