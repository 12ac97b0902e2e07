"""Loading the official files: formats, precedence, and clear errors."""
from __future__ import annotations

import json
import logging
import sys
import types

import pytest
import torch

from caphuman.export.checkpoints import CheckpointError, read_state_dict
from caphuman.export.clip import ImageEncoder, TextEncoder
from caphuman.export.config import load_config, packaged_config
from caphuman.export.models import VAE, CapHumanDenoiser, load_denoiser, load_vae, official_state_dict
from caphuman.runtime.pipeline import load_pipeline

from tests.conftest import rel_err
from tests.paths import DATA
from tests.ldm_reference import randomize_

MANIFEST = DATA / "caphuman_ckpt_keys.json"


def _manifest():
    if not MANIFEST.is_file():
        pytest.skip(f"key manifest not found at {MANIFEST} (shared/ is cloned beside the repo in CI)")
    data = json.loads(MANIFEST.read_text())
    return data["header"], {k: tuple(s) for k, s in data["keys"]}


def test_full_size_key_mapping_covers_every_official_key():
    """Every network key of the official checkpoint maps onto one of our parameters with its shape."""
    header, keys = _manifest()
    cfg = load_config(packaged_config("cldm_v15"))
    with torch.device("meta"):
        ours = official_state_dict(CapHumanDenoiser(cfg), VAE(cfg), TextEncoder(cfg.text_clip), ImageEncoder(cfg.vision_clip))
    ours = {k: tuple(v.shape) for k, v in ours.items()}
    not_network = set(header["schedule_buffers"]) | set(header["optional"])
    assert set(keys) - not_network == set(ours) - {"alphas_cumprod"}
    assert all(keys[k] == ours[k] for k in ours if k in keys)


def _tiny_state(tiny_config, seed=0):
    den = randomize_(CapHumanDenoiser(tiny_config), seed)
    vae = randomize_(VAE(tiny_config), seed + 1, std=0.03)
    text = randomize_(TextEncoder(tiny_config.text_clip), seed + 2)
    img = randomize_(ImageEncoder(tiny_config.vision_clip), seed + 3)
    return official_state_dict(den, vae, text, img)


@pytest.fixture(scope="module")
def tiny_state(tiny_config):
    return _tiny_state(tiny_config)


def test_bare_state_dict_and_lightning_and_safetensors_load_the_same(tmp_path, tiny_config_path, tiny_state):
    import safetensors.torch
    bare, lightning, st = tmp_path / "bare.ckpt", tmp_path / "lightning.ckpt", tmp_path / "model.safetensors"
    torch.save(tiny_state, bare)
    torch.save({"state_dict": tiny_state, "optimizer_states": [{"lr": 1e-5}], "epoch": 1}, lightning)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tiny_state.items()}, st)
    x = torch.randn(1, 4, 8, 8)
    outs = []
    for path in (bare, lightning, st):
        den = load_denoiser(tiny_config_path, path)
        with torch.no_grad():
            outs.append(den(x, 501, torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0)),
                            torch.ones(1, 9, 64, 64), torch.ones(1, 258, 32)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_sd_checkpoint_overrides_unet_and_ema_is_ignored(tmp_path, tiny_config, tiny_config_path, tiny_state):
    cap = tmp_path / "caphuman.ckpt"
    torch.save(tiny_state, cap)
    other = _tiny_state(tiny_config, seed=40)
    sd = {k: v for k, v in other.items() if k.startswith(("model.diffusion_model.", "first_stage_model.",
                                                          "cond_stage_model."))}
    sd.update({"model_ema." + k.replace(".", ""): torch.zeros(1) for k in list(sd)[:5]})
    sd_path = tmp_path / "sd15.ckpt"
    torch.save({"state_dict": sd}, sd_path)
    base = load_denoiser(tiny_config_path, cap)
    swapped = load_denoiser(tiny_config_path, cap, sd_checkpoint=sd_path)
    # UNet comes from the SD file, CapFace and projections from caphuman.ckpt
    w_sd = sd["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    assert torch.equal(swapped.unet.down_blocks[0].resnets[0].conv1.weight, w_sd)
    assert not torch.equal(base.unet.down_blocks[0].resnets[0].conv1.weight, w_sd)
    assert torch.equal(swapped.capface.mask_predict.weight, base.capface.mask_predict.weight)
    # the VAE precedence: caphuman.ckpt < SD checkpoint < VAE checkpoint
    vae_only = {k.removeprefix("first_stage_model."): v for k, v in _tiny_state(tiny_config, seed=80).items()
                if k.startswith("first_stage_model.")}
    vae_path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": vae_only}, vae_path)
    v1 = load_vae(tiny_config_path, cap, sd_checkpoint=sd_path)
    v2 = load_vae(tiny_config_path, cap, sd_checkpoint=sd_path, vae_checkpoint=vae_path)
    assert torch.equal(v1.model.post_quant_conv.weight, sd["first_stage_model.post_quant_conv.weight"])
    assert torch.equal(v2.model.post_quant_conv.weight, vae_only["post_quant_conv.weight"])


def test_missing_keys_are_named(tmp_path, tiny_config_path, tiny_state):
    broken = dict(tiny_state)
    del broken["control_model.mask_predict.0.weight"]
    del broken["model.diffusion_model.out.2.bias"]
    path = tmp_path / "broken.ckpt"
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as e:
        load_denoiser(tiny_config_path, path)
    assert "model.diffusion_model.out.2.bias" in str(e.value) or "control_model.mask_predict.0.weight" in str(e.value)


def test_unexpected_keys_are_reported(tmp_path, tiny_config_path, tiny_state, caplog):
    extra = dict(tiny_state)
    extra["control_model.some_new_layer.weight"] = torch.zeros(3)
    path = tmp_path / "extra.ckpt"
    torch.save(extra, path)
    with caplog.at_level(logging.WARNING):
        load_denoiser(tiny_config_path, path)
    assert "control_model.some_new_layer.weight" in caplog.text


def test_mismatched_config_is_a_clear_error(tmp_path, tiny_state):
    path = tmp_path / "tiny.ckpt"
    torch.save(tiny_state, path)
    with pytest.raises(CheckpointError, match="does not match the config"):
        load_denoiser(packaged_config("cldm_v15"), path)


def test_truncated_renamed_and_foreign_files(tmp_path, tiny_config_path, tiny_state):
    good = tmp_path / "good.ckpt"
    torch.save(tiny_state, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_denoiser(tiny_config_path, truncated)
    renamed = tmp_path / "good.safetensors"
    renamed.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_denoiser(tiny_config_path, renamed)
    with pytest.raises(CheckpointError, match="not found"):
        load_denoiser(tiny_config_path, tmp_path / "nope.ckpt")
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError):
        read_state_dict(text)
    vae_as_sd = tmp_path / "vae_as_sd.ckpt"
    torch.save({"decoder.conv_in.weight": torch.zeros(1)}, vae_as_sd)
    with pytest.raises(CheckpointError, match="not an SD1.x checkpoint"):
        load_denoiser(tiny_config_path, good, sd_checkpoint=vae_as_sd)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /tmp/caphuman_pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, tiny_state):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_state, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refuse"):
        read_state_dict(path)


def test_lightning_callback_reference_in_sd_checkpoints_loads(tmp_path, tiny_state):
    """SD1.x .ckpt files reference pytorch_lightning's ModelCheckpoint in `callbacks`; that alone must
    not stop the weights-only loader."""
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for n in names:
        sys.modules[n] = sys.modules.get(n) or types.ModuleType(n)
    sys.modules[names[-1]] = mod
    path = tmp_path / "sd_with_callbacks.ckpt"
    try:
        torch.save({"state_dict": tiny_state, "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}}}, path)
    finally:
        for n in names:
            sys.modules.pop(n, None)
    assert set(read_state_dict(path)) == set(tiny_state)


def test_old_clip_key_layout_is_renamed(tmp_path, tiny_config_path, tiny_state):
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in tiny_state.items()}
    path = tmp_path / "old_clip.ckpt"
    torch.save(old, path)
    pipe = load_pipeline(tiny_config_path, path)
    w = tiny_state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    assert torch.equal(pipe.text_encoder.model.get_input_embeddings().weight, w)


def test_fp16_checkpoint_loads_into_fp32(tmp_path, tiny_config_path, tiny_state):
    half = {k: v.half() if v.is_floating_point() else v for k, v in tiny_state.items()}
    path = tmp_path / "half.ckpt"
    torch.save(half, path)
    den = load_denoiser(tiny_config_path, path)
    assert next(den.parameters()).dtype == torch.float32
    assert rel_err(den.id_linear.weight, tiny_state["id_linear.weight"]) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_full_size_official_checkpoint_loads(tmp_path, dtype):
    """Every key of the official manifest, random values (fp16 and fp32), as a Lightning checkpoint:
    the whole pipeline (UNet, CapFace, projections, VAE, both CLIP towers) loads with no missing key."""
    header, keys = _manifest()
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in keys.items():
        if k.endswith("position_ids"):
            state[k] = torch.arange(shape[-1])[None]
        elif k in header["schedule_buffers"]:
            state[k] = torch.rand(shape, generator=g)
        else:
            state[k] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    path = tmp_path / "caphuman_full.ckpt"
    torch.save({"state_dict": state}, path)
    del state
    try:
        pipe = load_pipeline(packaged_config("cldm_v15"), path, with_image_encoder=True)
    finally:
        path.unlink()  # 3.3-5 GB: pytest keeps the temp dirs of its last runs
    n = sum(p.numel() for m in (pipe.denoiser, pipe.vae, pipe.text_encoder, pipe.image_encoder) for p in m.parameters())
    assert n == sum(v for k, v in header["numel_per_prefix"].items() if not k.startswith("(")) - 77 - 257
    # the random 'alphas_cumprod' is not a schedule: the config's is kept
    assert abs(pipe.denoiser.alphas_cumprod[0].item() - 0.99915) < 1e-6


def test_fp16_denoiser_keeps_the_fp32_schedule(tmp_path, tiny_config_path, tiny_state):
    path = tmp_path / "model.ckpt"
    torch.save(tiny_state, path)
    den16 = load_denoiser(tiny_config_path, path, dtype=torch.float16)
    den32 = load_denoiser(tiny_config_path, path)
    assert den16.alphas_cumprod.dtype == torch.float32
    assert torch.equal(den16.alphas_cumprod, den32.alphas_cumprod)
