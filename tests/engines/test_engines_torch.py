"""The torch engine computes what `ddim_sample` computes. On the CPU (CI) its step runs eagerly over
the same static buffers and K/V cache the CUDA graph replays, so fp32 results agree to 1e-6 (the
shared CFG prefix runs some kernels at batch 1, which may round differently from batch 2);
on a GPU (marker `gpu`) the CUDA-graph path is compared with eager PyTorch."""
from __future__ import annotations

import copy

import pytest
import torch

from caphuman.engines.base import EngineError
from caphuman.engines.torch_engine import TorchDenoiserEngine
from caphuman.export.models import load_denoiser
from caphuman.runtime.sampling import ddim_sample

from tests.conftest import rel_err


@pytest.fixture(scope="module")
def dens(tiny_config_path, official_checkpoint):
    ref = load_denoiser(tiny_config_path, official_checkpoint)
    return ref, TorchDenoiserEngine(copy.deepcopy(ref), device="cpu", dtype=torch.float32)


def _inputs(cfg, n=2, lat=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(noise=torch.randn(n, 4, lat, lat, generator=g), text_cond=torch.randn(1, 77, cfg.context_dim, generator=g),
                text_uncond=torch.randn(1, 77, cfg.context_dim, generator=g),
                hint=torch.rand(1, 9, lat * 8, lat * 8, generator=g),
                identity_context=torch.randn(1, 258, cfg.context_dim, generator=g))


@pytest.mark.parametrize("kw", [dict(), dict(guidance=1.0), dict(tau=500, strength=0.8), dict(eta=0.5, steps=5),
                                dict(strength=[0.5 + 0.1 * i for i in range(10)], cfg="serial")],
                         ids=["cfg7", "guidance1", "tau", "eta", "per-residual"])
def test_engine_equals_ddim_sample(dens, tiny_config, kw):
    ref_den, engine = dens
    inp = _inputs(tiny_config)
    kw = {"steps": 4, **kw}

    def gens():
        return [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)] if kw.get("eta") else None

    with torch.no_grad():
        want = ddim_sample(ref_den, **inp, generators=gens(), **kw)
    for _ in range(2):  # the second request reuses the key's buffers and refills K/V
        got = ddim_sample(engine, **inp, generators=gens(), **kw)
        assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("lat", [8, 6], ids=["latent8", "latent6-odd-residuals"])
def test_new_request_refreshes_per_request_state(dens, tiny_config, lat):
    """Cross-attention K/V, CapFace's guided hint and the hard head masks are computed once per
    request: a second request on the same buffers must not see the first one's. Latent 6 gives
    residual resolutions 6, 3, 2, 1 (the downsamples round up)."""
    ref_den, engine = dens
    a, b = _inputs(tiny_config, lat=lat, seed=1), _inputs(tiny_config, lat=lat, seed=2)
    ddim_sample(engine, **a, steps=2)
    only_hint = {**a, "hint": b["hint"]}
    for inp in (b, only_hint):
        got = ddim_sample(engine, **inp, steps=2)
        with torch.no_grad():
            assert rel_err(got, ddim_sample(ref_den, **inp, steps=2)) <= 1e-6


def test_run_is_the_denoiser_graph(dens, tiny_config):
    ref_den, engine = dens
    feed = engine.spec.sample_inputs(2, 64, 128, seed=3)
    with torch.no_grad():
        want = ref_den(feed["sample"], feed["timestep"], feed["text_embeddings"], feed["hint"],
                       feed["identity_context"], feed["strength"].tolist())
    assert rel_err(engine.run(feed)["eps"], want) <= 1e-6
    with pytest.raises(ValueError, match="missing inputs"):
        engine.run({"sample": feed["sample"]})


def test_split_unet_equals_run_unet(dens, tiny_config):
    """unet_encode + unet_decode (the two-stream step's halves) compute exactly run_unet."""
    from caphuman.export.networks import run_unet, unet_decode, unet_encode

    ref_den, _ = dens
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([601, 601])
    text = torch.randn(2, 77, tiny_config.context_dim, generator=g)
    hint = torch.rand(1, tiny_config.capface.hint_channels, 128, 128, generator=g)
    ctx = torch.randn(1, 258, tiny_config.context_dim, generator=g)
    with torch.no_grad():
        res1, _ = ref_den.capface(x[:1], t[:1], hint, ctx)
        res = [torch.cat([r, r]) for r in res1]
        assert any(r.abs().max() > 0 for r in res)
        for residuals in (res, None):
            want = run_unet(ref_den.unet, x, t, text, residuals)
            got = unet_decode(ref_den.unet, unet_encode(ref_den.unet, x, t, text), residuals)
            assert torch.equal(got, want)
        # batch-1 residuals for a batch-2 (two CFG branches) UNet are tiled, as torch.cat([r, r])
        want = run_unet(ref_den.unet, x, t, text, res)
        assert torch.equal(unet_decode(ref_den.unet, unet_encode(ref_den.unet, x, t, text), res1), want)


def test_unet_encode_shared_prefix(dens, tiny_config):
    """unet_encode(branches=2) on ONE copy of the latents computes run_unet on both CFG branches
    (text differs between them), running the text-free prefix once: with and without the fused
    time projections, with batch-1 residuals and none."""
    from caphuman.export.networks import run_unet, unet_decode, unet_encode
    from caphuman.export.time_projections import fuse_time_projections

    ref_den, _ = dens
    g = torch.Generator().manual_seed(6)
    x1 = torch.randn(1, 4, 16, 16, generator=g)
    t1 = torch.tensor([601])
    text = torch.randn(2, 77, tiny_config.context_dim, generator=g)
    hint = torch.rand(1, tiny_config.capface.hint_channels, 128, 128, generator=g)
    ctx = torch.randn(1, 258, tiny_config.context_dim, generator=g)
    fused = copy.deepcopy(ref_den.unet)
    assert fuse_time_projections(fused) is not None
    with torch.no_grad():
        res1, _ = ref_den.capface(x1, t1, hint, ctx)
        wants = [run_unet(ref_den.unet, torch.cat([x1, x1]), torch.cat([t1, t1]), text,
                          None if r is None else [torch.cat([r_, r_]) for r_ in r]) for r in (res1, None)]
        for unet in (ref_den.unet, fused):
            seen = []
            handle = unet.down_blocks[0].resnets[0].register_forward_hook(
                lambda m, args, out: seen.append(out.shape[0]))
            try:
                for residuals, want in zip((res1, None), wants):
                    got = unet_decode(unet, unet_encode(unet, x1, t1, text, branches=2), residuals)
                    assert got.shape == want.shape
                    assert rel_err(got, want) <= 1e-6
            finally:
                handle.remove()
            assert seen == [1, 1]  # the first ResNet block ran on one branch
        with pytest.raises(ValueError, match="text_context"):
            unet_encode(ref_den.unet, x1, t1, text[:1], branches=2)


def test_add_tiled_every_batch_combination():
    """_add_tiled(feature, residual, batch) equals tiling both to `batch` (torch.cat of k copies) and adding."""
    from caphuman.export.networks import _add_tiled

    g = torch.Generator().manual_seed(7)
    n, k = 2, 2
    for fb in (n, k * n):
        for rb in (n, k * n, None):
            f = torch.randn(fb, 3, 4, 4, generator=g)
            r = None if rb is None else torch.randn(rb, 3, 4, 4, generator=g)
            want = torch.cat([f] * (k * n // fb))
            if r is not None:
                want = want + torch.cat([r] * (k * n // rb))
            assert torch.equal(_add_tiled(f, r, k * n), want), (fb, rb)


def test_parallel_side_network_needs_cuda(dens):
    ref_den, _ = dens
    with pytest.raises(EngineError, match="CUDA"):
        TorchDenoiserEngine(copy.deepcopy(ref_den), device="cpu", dtype=torch.float32, parallel_side_network=True)


def test_bad_requests(dens, tiny_config):
    _, engine = dens
    inp = _inputs(tiny_config)
    with pytest.raises(ValueError, match="8x"):
        ddim_sample(engine, **{**inp, "hint": inp["hint"][..., :32, :32]}, steps=2)
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(engine, **inp, steps=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("parallel", [True, False], ids=["two-streams", "one-stream"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_cuda_graph_engine_matches_eager(tiny_config_path, official_checkpoint, tiny_config, dtype, tol, parallel):
    ref = load_denoiser(tiny_config_path, official_checkpoint).cuda()
    engine = TorchDenoiserEngine(copy.deepcopy(ref), device="cuda", dtype=dtype, parallel_side_network=parallel)
    assert (engine._side_stream is not None) == parallel
    inp = {k: v.cuda() for k, v in _inputs(tiny_config).items()}
    with torch.no_grad():
        want = ddim_sample(ref, **inp, steps=10)
    for _ in range(2):
        got = ddim_sample(engine, **inp, steps=10)
        assert next(iter(engine._states.values())).graph is not None
        assert rel_err(got, want) <= tol


def test_first_self_attention_runs_one_cfg_branch(dens, tiny_config):
    """With guidance the UNet's first self-attention sees both CFG branches equal (no text yet): the
    engine runs it on one branch (its output projection sees batch n, not 2n); results stay those of
    ddim_sample (test_engine_equals_ddim_sample), and a guidance-1 request runs it on the full batch."""
    ref_den, engine = dens
    attn = engine.den.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    seen = []
    hook = attn.to_out[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        inp = _inputs(tiny_config, n=1)
        ddim_sample(engine, **inp, steps=2)
        assert seen and set(seen) == {1}
        seen.clear()
        ddim_sample(engine, **_inputs(tiny_config, n=2), steps=2, guidance=1.0)  # two different samples
        assert seen and set(seen) == {2}
        seen.clear()
        ddim_sample(engine, **_inputs(tiny_config, n=2), steps=2)  # UNet batch 4 = 2 branches x 2 samples
        assert seen and set(seen) == {2}
    finally:
        hook.remove()
    assert attn.processor.identical_batch_halves is False  # only ever set inside a step


def test_channels_last_engine_keeps_transformer_outputs_channels_last(tiny_config_path, official_checkpoint, tiny_config):
    """channels_last=True (the GPU default): the transformers hand their output on in channels-last
    (no NCHW round trip), and the engine still computes what ddim_sample computes."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    ref_den = load_denoiser(tiny_config_path, official_checkpoint)
    engine = TorchDenoiserEngine(copy.deepcopy(ref_den), device="cpu", dtype=torch.float32, channels_last=True)
    blocks = [m for m in engine.den.unet.modules() if isinstance(m, Transformer2DModel)]
    assert blocks
    layouts = []
    # what the 1x1 output conv reads: the tokens in channels-last, not an NCHW copy of them
    hooks = [b.proj_out.register_forward_pre_hook(lambda m, args: layouts.append(
        args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous())) for b in blocks]
    try:
        inp = _inputs(tiny_config)
        got = ddim_sample(engine, **inp, steps=4)
    finally:
        for h in hooks:
            h.remove()
    assert layouts and all(layouts)
    with torch.no_grad():
        assert rel_err(got, ddim_sample(ref_den, **inp, steps=4)) <= 1e-6


def test_failed_first_request_leaves_no_half_built_state(tiny_config_path, official_checkpoint, tiny_config,
                                                         monkeypatch):
    """A request that fails while a new key is set up must not leave that key's state behind: the
    next request on the key builds it again (here: with tau, whose gate a half-built state lost)."""
    ref_den = load_denoiser(tiny_config_path, official_checkpoint)
    engine = TorchDenoiserEngine(copy.deepcopy(ref_den), device="cpu", dtype=torch.float32)
    inp = _inputs(tiny_config)
    with pytest.raises(ValueError, match="hint must be"):
        ddim_sample(engine, **{**inp, "hint": inp["hint"][:, :3]}, steps=2, tau=500)
    calls = {"n": 0}
    real_setup = engine._setup_kv

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure during warm-up")
        return real_setup(*args, **kwargs)

    monkeypatch.setattr(engine, "_setup_kv", failing_once)
    with pytest.raises(RuntimeError, match="injected"):
        ddim_sample(engine, **inp, steps=2, tau=500)
    assert not engine._states
    got = ddim_sample(engine, **inp, steps=2, tau=500)
    with torch.no_grad():
        assert rel_err(got, ddim_sample(ref_den, **inp, steps=2, tau=500)) <= 1e-6


def test_engine_keeps_the_networks_checkpoint_layout(dens):
    """The same-value rewrites (fused q/k/v, fused time projections) hold their fused copies outside
    the modules: the denoiser's state dict has the same keys, so it still saves and loads."""
    ref_den, engine = dens
    assert list(engine.den.state_dict()) == list(ref_den.state_dict())


def test_compiled_engine_equals_ddim_sample(tiny_config_path, official_checkpoint, tiny_config):
    """compile=True traces the step's three functions with dynamo (a counting eager backend here, so
    CI needs no C++ toolchain; the GPU uses inductor): same results as ddim_sample; the K/V fill
    step runs eagerly, so a key is compiled once, and a repeated request compiles nothing."""
    ref_den = load_denoiser(tiny_config_path, official_checkpoint)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    engine = TorchDenoiserEngine(copy.deepcopy(ref_den), device="cpu", dtype=torch.float32, compile=True,
                                 compile_backend=counting_backend)
    per_key = []
    for kw in (dict(tau=500), dict(tau=500), dict(guidance=1.0)):
        before = len(graphs)
        inp = _inputs(tiny_config, n=1)
        got = ddim_sample(engine, **inp, steps=4, **kw)
        per_key.append(len(graphs) - before)
        with torch.no_grad():
            assert rel_err(got, ddim_sample(ref_den, **inp, steps=4, **kw)) <= 1e-5
    assert per_key[0] == 3 and per_key[1] == 0 and per_key[2] == 3, per_key  # three functions, no graph breaks


def test_extra_controlnet_runs_on_the_torch_engine(tiny_config_path, official_checkpoint, tiny_config):
    """An extra ControlNet (the official openpose option) on the torch engine: the same latents as the eager
    modules with it, unlike without it; the graph backends refuse it with a clear error."""
    from caphuman.engines.factory import create_engine
    from caphuman.export.networks import SideNetwork
    from tests.ldm_reference import randomize_

    den = load_denoiser(tiny_config_path, official_checkpoint)
    inp = _inputs(tiny_config)
    with torch.no_grad():
        plain = ddim_sample(den, **inp, steps=4)
    spec = tiny_config.capface.__class__(**{**tiny_config.capface.__dict__, "hint_channels": 3})
    pose_net = randomize_(SideNetwork(spec, with_mask_head=False), seed=5).eval()
    den.add_controlnet(pose_net, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)), 0.6)
    engine = create_engine("torch", copy.deepcopy(den), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        want = ddim_sample(den, **inp, steps=4)
    got = ddim_sample(engine, **inp, steps=4)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(want, plain) > 1e-3
    with pytest.raises(ValueError, match="extra ControlNets run on the eager and torch backends"):
        create_engine("onnxruntime", den)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("people", [2, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_cuda_graph_engine_runs_several_people_in_one_capface_pass(tiny_config_path, official_checkpoint, tiny_config,
                                                                   people, dtype, tol):
    """Several people inside the captured step (CapFace at batch people x N) equal the eager module."""
    ref = load_denoiser(tiny_config_path, official_checkpoint).cuda()
    engine = TorchDenoiserEngine(copy.deepcopy(ref), device="cuda", dtype=dtype)
    inp = {k: v.cuda() for k, v in _inputs(tiny_config).items()}
    g = torch.Generator().manual_seed(people)
    inp["hint"] = [inp["hint"]] + [torch.rand(inp["hint"].shape, generator=g).cuda() for _ in range(people - 1)]
    inp["identity_context"] = [inp["identity_context"]] + [
        torch.randn(inp["identity_context"].shape, generator=g).cuda() for _ in range(people - 1)]
    with torch.no_grad():
        want = ddim_sample(ref, **inp, steps=10)
    got = ddim_sample(engine, **inp, steps=10)
    state = next(iter(engine._states.values()))
    assert state.graph is not None and state.guided.shape[0] == people * inp["noise"].shape[0]
    assert rel_err(got, want) <= tol


@pytest.mark.parametrize("people", [1, 2])
def test_half_precision_engine_keeps_its_dtype_with_several_people(tiny_config_path, official_checkpoint,
                                                                   tiny_config, people):
    """bfloat16 on the CPU (the GPU's fp16 path, without a GPU): several people's per-row CapFace strengths
    must not promote the residuals to fp32 (the UNet would then mix dtypes)."""
    ref = load_denoiser(tiny_config_path, official_checkpoint)
    engine = TorchDenoiserEngine(copy.deepcopy(ref), device="cpu", dtype=torch.bfloat16)
    inp = _inputs(tiny_config, n=1)
    g = torch.Generator().manual_seed(7)
    if people > 1:
        inp["hint"] = [inp["hint"], torch.rand(inp["hint"].shape, generator=g)]
        inp["identity_context"] = [inp["identity_context"], torch.randn(inp["identity_context"].shape, generator=g)]
    with torch.no_grad():
        want = ddim_sample(ref, **inp, steps=4)
    got = ddim_sample(engine, **inp, steps=4)
    assert torch.isfinite(got).all() and rel_err(got, want) <= 5e-2
