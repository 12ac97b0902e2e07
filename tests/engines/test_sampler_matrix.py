"""Every sampler on every backend that runs on the CPU gives the same latents (fp32 tolerance), through the
one loop and the one engine contract; a sampler defined here, in the test, runs on all of them unchanged."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from caphuman.engines.factory import create_engine
from caphuman.engines.samplers import SAMPLERS, Plan, Sampler, k_diffusion_timesteps, register_sampler
from caphuman.export.models import load_denoiser
from caphuman.runtime.sampling import sample_with

from tests.conftest import rel_err

TOLERANCE = {"eager": 0.0, "torch": 1e-5, "onnxruntime": 1e-4}  # against eager fp32
STEPS = {"ddim": 4, "dpmpp_2m": 4, "euler_a": 4, "test_euler": 5}


def _test_euler_plan(alphas_cumprod: torch.Tensor, steps: int, eta: float = 0.0) -> Plan:
    """Plain (deterministic) Euler in k-diffusion's variables: x += eps * (sigma_next - sigma)."""
    ts = k_diffusion_timesteps(steps)
    ac = alphas_cumprod.double()
    sig = [math.sqrt((1 - ac[t]) / ac[t]) for t in ts] + [math.sqrt((1 - ac[0]) / ac[0])]
    return Plan(ts, torch.tensor([1 / math.sqrt(1 + s * s) for s in sig[:-1]], dtype=torch.float32),
                torch.tensor([[b - a] for a, b in zip(sig[:-1], sig[1:])], dtype=torch.float32),
                float(1 / ac[ts[0]].sqrt()), float(ac[0].sqrt()), noisy=False)


def _test_euler_update(x, eps, c, state, noise=None):
    return x + c[0] * eps, state


@pytest.fixture(autouse=True)
def test_sampler():
    """Registered for this module's tests only."""
    register_sampler(Sampler("test_euler", _test_euler_plan, _test_euler_update))
    yield
    del SAMPLERS["test_euler"]


@pytest.fixture(scope="module")
def engines(tiny_config_path, official_checkpoint, tmp_path_factory):
    den = load_denoiser(tiny_config_path, official_checkpoint)
    return {"eager": create_engine("eager", den),
            "torch": create_engine("torch", copy.deepcopy(den), device="cpu", dtype=torch.float32),
            "onnxruntime": create_engine("onnxruntime", den, engine_dir=tmp_path_factory.mktemp("onnx"))}


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(noise=torch.randn(2, 4, 8, 8, generator=g), text_cond=torch.randn(2, 77, cfg.context_dim, generator=g),
                text_uncond=torch.randn(1, 77, cfg.context_dim, generator=g),
                hint=torch.rand(1, 9, 64, 64, generator=g),
                identity_context=torch.randn(2, 258, cfg.context_dim, generator=g))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_a", "test_euler"])
def test_every_sampler_on_every_backend(engines, tiny_config, sampler):
    inp = _inputs(tiny_config)
    results = {}
    for name, engine in engines.items():
        generators = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
        results[name] = sample_with(sampler, engine, **inp, steps=STEPS[sampler], guidance=5.0, tau=600,
                                    generators=generators)
    assert torch.isfinite(results["eager"]).all()
    for name, got in results.items():
        assert rel_err(got, results["eager"]) <= TOLERANCE[name], (sampler, name, rel_err(got, results["eager"]))
    # the samplers differ from one another: each result is its own sampler's
    if sampler != "ddim":
        ddim = sample_with("ddim", engines["eager"], **inp, steps=20, guidance=5.0, tau=600)
        assert 1e-4 < rel_err(results["eager"], ddim) < 0.5


def test_samplers_converge_to_one_solution(engines, tiny_config):
    """Deterministic samplers with many steps solve the same ODE from the same start."""
    inp = _inputs(tiny_config, seed=3)
    eager = engines["eager"]
    dpm = sample_with("dpmpp_2m", eager, **inp, steps=60, guidance=3.0)
    euler = sample_with("test_euler", eager, **inp, steps=200, guidance=3.0)
    assert rel_err(euler, dpm) < 0.02


def test_stochastic_samplers_follow_their_generators(engines, tiny_config):
    inp = _inputs(tiny_config, seed=4)
    torch_engine = engines["torch"]
    a = sample_with("euler_a", torch_engine, **inp, steps=4, generators=[torch.Generator().manual_seed(1)] * 2)
    b = sample_with("euler_a", torch_engine, **inp, steps=4, generators=[torch.Generator().manual_seed(1)] * 2)
    c = sample_with("euler_a", torch_engine, **inp, steps=4, generators=[torch.Generator().manual_seed(2)] * 2)
    assert torch.equal(a, b) and rel_err(a, c) > 1e-3


def test_unknown_sampler_and_bad_steps_are_clear_errors(engines, tiny_config):
    inp = _inputs(tiny_config)
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample_with("nope", engines["eager"], **inp, steps=4)
    with pytest.raises(ValueError, match=r"\[2, 951\]"):
        sample_with("dpmpp_2m", engines["eager"], **inp, steps=1)
    with pytest.raises(ValueError, match="eta applies to DDIM only"):
        sample_with("dpmpp_2m", engines["eager"], **inp, steps=4, eta=0.5)


def _people_inputs(cfg, people: int, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(noise=torch.randn(2, 4, 8, 8, generator=g), text_cond=torch.randn(2, 77, cfg.context_dim, generator=g),
                text_uncond=torch.randn(1, 77, cfg.context_dim, generator=g),
                hint=[torch.rand(1, 9, 64, 64, generator=g) for _ in range(people)],
                identity_context=[torch.randn(2, 258, cfg.context_dim, generator=g) for _ in range(people)])


@pytest.mark.parametrize("people", [2, 3])
@pytest.mark.parametrize("sampler,kw", [("ddim", dict(tau=600)), ("dpmpp_2m", dict(strength=0.8)),
                                        ("ddim", dict(cfg="serial")), ("ddim", dict(guidance=1.0))],
                         ids=["ddim-tau", "dpmpp-strength", "serial", "guidance1"])
def test_several_people_on_every_backend(engines, tiny_config, people, sampler, kw):
    """Two and three people: every backend's latents equal the eager module's (which the parity tests hold to
    the official list semantics), then the same engines serve one person again."""
    inp = _people_inputs(tiny_config, people, seed=people)
    kw = {"guidance": 5.0, **kw}
    results = {name: sample_with(sampler, engine, **inp, steps=4, **kw) for name, engine in engines.items()}
    alone = sample_with(sampler, engines["eager"], **{**inp, "hint": inp["hint"][0],
                                                      "identity_context": inp["identity_context"][0]}, steps=4, **kw)
    assert rel_err(results["eager"], alone) > 1e-3
    for name, got in results.items():
        assert rel_err(got, results["eager"]) <= TOLERANCE[name], (name, rel_err(got, results["eager"]))
    single = _inputs(tiny_config)
    want = sample_with("ddim", engines["eager"], **single, steps=4)
    for name, engine in engines.items():
        assert rel_err(sample_with("ddim", engine, **single, steps=4), want) <= TOLERANCE[name], name


def test_person_strength_on_every_backend(engines, tiny_config):
    inp = _people_inputs(tiny_config, 2, seed=9)
    results = {name: sample_with("ddim", engine, **inp, steps=4, guidance=5.0, person_strength=[1.3, 0.4])
               for name, engine in engines.items()}
    for name, got in results.items():
        assert rel_err(got, results["eager"]) <= TOLERANCE[name], name
    plain = sample_with("ddim", engines["eager"], **inp, steps=4, guidance=5.0)
    assert rel_err(results["eager"], plain) > 1e-3
