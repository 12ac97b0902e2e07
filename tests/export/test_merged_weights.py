"""The merged weights file (`caphuman build --backend torch --weights-out`): caphuman.ckpt + SD + VAE in the
official precedence as one safetensors file, loaded into networks bit-identical to the separate files'."""
from __future__ import annotations

import json

import pytest
import torch

from caphuman.export.checkpoints import CheckpointError
from caphuman.export.clip import ImageEncoder, TextEncoder
from caphuman.export.config import packaged_config
from caphuman.export.merged_weights import merged_metadata
from caphuman.export.models import VAE, CapHumanDenoiser, official_state_dict
from caphuman.runtime.cli import main
from caphuman.runtime.pipeline import load_networks
from caphuman.runtime.weights_layout import MERGED_FILE_NAME, WeightFiles

from tests.ldm_reference import randomize_

TINY = packaged_config("cldm_tiny")


def _state(cfg, seed):
    den = randomize_(CapHumanDenoiser(cfg), seed)
    return official_state_dict(den, randomize_(VAE(cfg), seed + 1, std=0.03), randomize_(TextEncoder(cfg.text_clip), seed + 2),
                               randomize_(ImageEncoder(cfg.vision_clip), seed + 3))


@pytest.fixture(scope="module")
def official_files(tmp_path_factory, tiny_config):
    """A weights folder in the official formats: Lightning caphuman.ckpt, an SD1.x .ckpt (with model_ema.*
    keys) overriding UNet/VAE/text, and a bare VAE checkpoint overriding the VAE: each layer from another seed."""
    root = tmp_path_factory.mktemp("weights")
    torch.save({"state_dict": _state(tiny_config, 0), "epoch": 1}, root / "caphuman.ckpt")
    sd = {k: v for k, v in _state(tiny_config, 40).items()
          if k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))}
    sd["model_ema.decay"] = torch.tensor(0.999)
    torch.save({"state_dict": sd}, root / "Realistic_Vision_V3.0.ckpt")
    vae = {k.removeprefix("first_stage_model."): v for k, v in _state(tiny_config, 80).items()
           if k.startswith("first_stage_model.")}
    torch.save({"state_dict": vae}, root / "vae-ft-mse-840000-ema-pruned.ckpt")
    return root


def _networks_state(nets) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("denoiser", "text_encoder", "vae", "image_encoder"):
        for k, v in getattr(nets, name).state_dict().items():
            out[f"{name}.{k}"] = v
    out["denoiser.alphas_cumprod"] = nets.denoiser.alphas_cumprod
    return out


def test_merged_file_loads_bit_identical_networks(official_files, tmp_path):
    files = WeightFiles.discover(official_files)
    merged = tmp_path / "merged.safetensors"
    assert main(["build", "--backend", "torch", "--config", str(TINY), "--weights", str(official_files),
                 "--weights-out", str(merged)]) == 0
    header = merged_metadata(merged)
    assert header["config"] == "cldm_tiny.yaml" and sorted(header["sources"]) == ["checkpoint", "sd_checkpoint",
                                                                                 "vae_checkpoint"]
    assert header["sources"]["sd_checkpoint"]["name"] == "Realistic_Vision_V3.0.ckpt"
    separate = load_networks(TINY, files.checkpoint, files.sd_checkpoint, files.vae_checkpoint, with_image_encoder=True)
    one = load_networks(TINY, merged, with_image_encoder=True)
    a, b = _networks_state(separate), _networks_state(one)
    assert list(a) == list(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
    # the precedence really was applied: the UNet is the SD file's, the VAE the VAE file's, CapFace caphuman.ckpt's
    sd = torch.load(files.sd_checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(one.denoiser.unet.conv_in.weight, sd["model.diffusion_model.input_blocks.0.0.weight"])
    vae = torch.load(files.vae_checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(one.vae.model.post_quant_conv.weight, vae["post_quant_conv.weight"])
    # the outputs' metadata names the same source files, plus the merged file
    assert {k: v for k, v in one.model_hashes.items() if k != "merged"} == separate.model_hashes
    assert one.model_hashes["merged"]


def test_weights_folder_uses_its_merged_file_and_refuses_a_stale_one(official_files, tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    for f in official_files.iterdir():
        (folder / f.name).symlink_to(f)
    assert main(["build", "--backend", "torch", "--config", str(TINY), "--weights", str(folder),
                 "--weights-out", str(folder / MERGED_FILE_NAME)]) == 0
    files = WeightFiles.discover(folder)
    assert files.checkpoint.name == MERGED_FILE_NAME and files.sd_checkpoint is None and files.vae_checkpoint is None
    # another SD checkpoint in the folder than the one merged: stale, refused with the reason
    (folder / "Realistic_Vision_V3.0.ckpt").unlink()
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(3)}}, folder / "other_sd15.ckpt")
    with pytest.raises(ValueError, match="stale.*other_sd15.ckpt.*Realistic_Vision_V3.0.ckpt"):
        WeightFiles.discover(folder)
    # a new merge reads the separate files now in the folder, not the stale merged one
    assert main(["build", "--backend", "torch", "--config", str(TINY), "--weights", str(folder),
                 "--weights-out", str(folder / MERGED_FILE_NAME)]) == 0
    assert merged_metadata(folder / MERGED_FILE_NAME)["sources"]["sd_checkpoint"]["name"] == "other_sd15.ckpt"
    assert WeightFiles.discover(folder).checkpoint.name == MERGED_FILE_NAME


def test_merged_file_refusals(official_files, tmp_path, capsys):
    files = WeightFiles.discover(official_files)
    merged = tmp_path / "merged.safetensors"
    assert main(["build", "--backend", "torch", "--config", str(TINY), "--checkpoint", str(files.checkpoint),
                 "--weights-out", str(merged)]) == 0
    with pytest.raises(ValueError, match="already merges"):
        load_networks(TINY, merged, sd_checkpoint=files.sd_checkpoint)
    with pytest.raises(CheckpointError, match="merged for the config cldm_tiny.yaml"):
        load_networks(packaged_config("cldm_v15"), merged)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(merged.read_bytes()[: merged.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_networks(TINY, truncated)
    capsys.readouterr()
    assert main(["build", "--backend", "torch", "--config", str(TINY), "--checkpoint", str(files.checkpoint)]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_generate_accepts_the_merged_file(official_files, tmp_path):
    """`caphuman generate --checkpoint merged.safetensors` gives the image the separate files give."""
    import numpy as np
    from PIL import Image

    files = WeightFiles.discover(official_files)
    merged = tmp_path / "merged.safetensors"
    assert main(["build", "--backend", "torch", "--config", str(TINY), "--weights", str(official_files),
                 "--weights-out", str(merged)]) == 0
    g = torch.Generator().manual_seed(0)
    np.save(tmp_path / "hint.npy", torch.rand(1, 9, 256, 256, generator=g).numpy())
    np.save(tmp_path / "ctx.npy", torch.randn(1, 258, 32, generator=g).numpy())
    common = ["generate", "--config", str(TINY), "--hint", str(tmp_path / "hint.npy"), "--identity-context",
              str(tmp_path / "ctx.npy"), "--steps", "2", "--device", "cpu", "--prompt", "a photo", "--out", str(tmp_path)]
    assert main(common + ["--checkpoint", str(files.checkpoint), "--sd-checkpoint", str(files.sd_checkpoint),
                          "--vae-checkpoint", str(files.vae_checkpoint), "--name", "separate"]) == 0
    assert main(common + ["--checkpoint", str(merged), "--name", "merged"]) == 0
    a = np.asarray(Image.open(tmp_path / "separate_12345.png"))
    b = np.asarray(Image.open(tmp_path / "merged_12345.png"))
    assert np.array_equal(a, b)
    meta = json.loads((tmp_path / "merged_12345.json").read_text())
    assert "merged" in json.dumps(meta)


def test_networks_built_without_random_init_equal_those_built_with_it(monkeypatch, official_files, tiny_config):
    """The loaders skip the random initialisation that the checkpoint overwrites (the full-size denoiser's
    construction: 17 s -> 0.03 s on 2 CPU cores). Every parameter AND buffer, the non-persistent ones that
    no checkpoint holds included, must equal those of networks built with the initialisation."""
    import contextlib

    import caphuman.export.models as models

    args = (packaged_config("cldm_tiny"), official_files / "caphuman.ckpt")
    kwargs = {"with_image_encoder": True}
    fast = load_networks(*args, **kwargs)
    monkeypatch.setattr(models, "_without_random_init", contextlib.nullcontext)
    slow = load_networks(*args, **kwargs)
    for name in ("denoiser", "text_encoder", "vae", "image_encoder"):
        a, b = getattr(fast, name), getattr(slow, name)
        tensors_a = dict(a.named_parameters()) | dict(a.named_buffers())
        tensors_b = dict(b.named_parameters()) | dict(b.named_buffers())
        assert tensors_a.keys() == tensors_b.keys() and tensors_a, name
        for key, value in tensors_a.items():
            assert torch.equal(value, tensors_b[key]), f"{name}.{key} differs: left uninitialised?"
