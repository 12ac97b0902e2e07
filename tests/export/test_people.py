"""Several people in one image: eps and DDIM latents equal the official `apply_model` for a list of conds
(tests/ldm_reference.py implements the list semantics independently: CapFace per person, each person's
residuals scaled and hard-masked by its own mask, added one person after the other), fp32 on the CPU."""
from __future__ import annotations

import pytest
import torch

from caphuman.export.models import load_denoiser
from caphuman.export.people import MAX_PEOPLE
from caphuman.runtime.sampling import ddim_sample, sample_with

from tests.conftest import rel_err
from tests.ldm_reference import official_alphas_cumprod, official_ddim

TOL = 1e-5
LATENT = 8


@pytest.fixture(scope="module")
def den(tiny_config_path, official_checkpoint):
    return load_denoiser(tiny_config_path, official_checkpoint)


def people_inputs(cfg, people: int, seed: int = 0, latent: int = LATENT):
    """Shared latents and text; per person a hint, CLIP tokens and a FaceNet feature."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(1, 4, latent, latent, generator=g),
        text=torch.randn(1, 77, cfg.context_dim, generator=g),
        uncond=torch.randn(1, 77, cfg.context_dim, generator=g),
        hints=[torch.rand(1, 9, latent * 8, latent * 8, generator=g) * 2 - 0.5 for _ in range(people)],
        clips=[torch.randn(1, 257, cfg.img_linear_dim, generator=g) for _ in range(people)],
        fids=[torch.nn.functional.normalize(torch.randn(1, 1, 512, generator=g), dim=-1) for _ in range(people)],
    )


def contexts(den, inp):
    return [den.project_identity(c, f) for c, f in zip(inp["clips"], inp["fids"])]


@pytest.mark.parametrize("people", [2, 3])
@pytest.mark.parametrize("t,strength,tau", [(951, 1.0, 0), (401, 0.6, 0), (601, 1.0, 500)])
def test_eps_of_several_people_matches_official_list_semantics(den, reference_model, tiny_config, people, t,
                                                               strength, tau):
    inp = people_inputs(tiny_config, people, seed=people)
    reference_model.control_scales = [strength] * tiny_config.unet.num_residuals
    reference_model.drop_control_cond_t = tau
    try:
        with torch.no_grad():
            ref = reference_model.apply_model(inp["x"], torch.tensor([t]), inp["text"], inp["hints"], inp["clips"],
                                              inp["fids"])
            ours = den(inp["x"], t, inp["text"], inp["hints"], contexts(den, inp), strength=strength, tau=tau)
            alone = den(inp["x"], t, inp["text"], inp["hints"][0], contexts(den, inp)[0], strength=strength, tau=tau)
    finally:
        reference_model.control_scales = [1.0] * tiny_config.unet.num_residuals
        reference_model.drop_control_cond_t = 0
    assert rel_err(ours, ref) <= TOL
    assert rel_err(alone, ref) > 1e-3, "the other people changed nothing: the test would not see them missing"


@pytest.mark.parametrize("cfg", ["batched", "serial"])
def test_ddim_latents_of_two_people_match_official_sampler(den, reference_model, tiny_config, cfg):
    inp = people_inputs(tiny_config, 2, seed=7)

    def apply(x, t, text):
        return reference_model.apply_model(x, t, text, inp["hints"], inp["clips"], inp["fids"])

    with torch.no_grad():
        ref = official_ddim(apply, official_alphas_cumprod(), inp["x"], inp["text"], inp["uncond"], 4, 7.0)
        ours = ddim_sample(den, inp["x"], inp["text"], inp["uncond"], inp["hints"], contexts(den, inp), steps=4,
                           guidance=7.0, cfg=cfg)
    assert rel_err(ours, ref) <= TOL


def test_one_person_as_a_list_is_the_single_person_path(den, tiny_config):
    inp = people_inputs(tiny_config, 1, seed=3)
    ctx = contexts(den, inp)
    with torch.no_grad():
        single = den(inp["x"], 501, inp["text"], inp["hints"][0], ctx[0])
        listed = den(inp["x"], 501, inp["text"], inp["hints"], ctx)
    assert torch.equal(single, listed)


def test_person_strength_scales_each_person(den, tiny_config):
    """person_strength [1, 0] leaves the first person alone; [a, b] equals the people's residuals scaled."""
    inp = people_inputs(tiny_config, 2, seed=4)
    ctx = contexts(den, inp)
    with torch.no_grad():
        first_only = den(inp["x"], 501, inp["text"], inp["hints"], ctx, person_strength=[1.0, 0.0])
        first = den(inp["x"], 501, inp["text"], inp["hints"][0], ctx[0])
        both = den(inp["x"], 501, inp["text"], inp["hints"], ctx, person_strength=[0.5, 1.5])
        res = [den.side_residuals(inp["x"], 501, h, c, strength=s) for h, c, s in zip(inp["hints"], ctx, (0.5, 1.5))]
        expected = den.controlled_eps(inp["x"], 501, inp["text"], [a + b for a, b in zip(*res)])
    assert torch.equal(first_only, first)
    assert rel_err(both, expected) <= 1e-6


def test_people_errors(den, tiny_config):
    inp = people_inputs(tiny_config, MAX_PEOPLE + 1, seed=5)
    ctx = contexts(den, inp)
    with torch.no_grad():
        with pytest.raises(ValueError, match="1 to 4 people"):
            den(inp["x"], 501, inp["text"], [], [])
        with pytest.raises(ValueError, match="1 to 4 people"):
            den(inp["x"], 501, inp["text"], inp["hints"], ctx)
        with pytest.raises(ValueError, match="one hint and one identity context per person"):
            den(inp["x"], 501, inp["text"], inp["hints"][:2], ctx[:3])
        with pytest.raises(ValueError, match="one finite scale per person"):
            den(inp["x"], 501, inp["text"], inp["hints"][:2], ctx[:2], person_strength=[1.0])
        with pytest.raises(ValueError, match="1 to 4 people"):
            sample_with("ddim", den, inp["x"], inp["text"], inp["uncond"], [], [], steps=2)
