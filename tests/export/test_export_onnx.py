"""`caphuman export` on the tiny config: every graph passes the ONNX checker and TensorRT's operator
matrix, and matches PyTorch under ONNX Runtime (fp32, relative error <= 1e-4) at a batch and a
resolution other than the traced ones. The fused `denoiser` graph is checked against the public
`load_denoiser(...)(...)` API, the CapFace -> UNet chain against `capface_residuals` +
`scaled_residuals` + `controlled_eps`."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from caphuman.export.clip import ImageEncoder, TextEncoder
from caphuman.export.models import VAE, load_denoiser, load_vae, official_state_dict
from caphuman.export.onnx_specs import NETWORK_GRAPHS, graph_specs
from caphuman.export.trt_ops import check_graph
from caphuman.runtime.cli import main

from tests.conftest import rel_err
from tests.ldm_reference import official_alphas_cumprod, randomize_

TOL = 1e-4


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory, reference_model, tiny_config):
    """caphuman.ckpt with every network (denoiser, VAE, CLIP text and vision), all weights random."""
    state = dict(reference_model.state_dict())
    state["alphas_cumprod"] = official_alphas_cumprod()
    state.update(official_state_dict(vae=randomize_(VAE(tiny_config), 21, std=0.03),
                                     text=randomize_(TextEncoder(tiny_config.text_clip), 22),
                                     image=randomize_(ImageEncoder(tiny_config.vision_clip), 23)))
    path = tmp_path_factory.mktemp("full") / "caphuman.ckpt"
    torch.save({"state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_config_path, full_checkpoint):
    out = tmp_path_factory.mktemp("onnx")
    rc = main(["export", "--config", str(tiny_config_path), "--checkpoint", str(full_checkpoint), "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "manifest.json").read_text())


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_manifest_lists_every_graph(exported):
    _, manifest = exported
    assert sorted(manifest["graphs"]) == sorted(NETWORK_GRAPHS)
    for name, g in manifest["graphs"].items():
        assert g["opset"] == 17 and g["dtype"] == "float32" and not g["external_data"]


@pytest.mark.parametrize("name", NETWORK_GRAPHS)
def test_graph_checks(exported, tiny_config, name):
    out, manifest = exported
    path = out / f"{name}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    assert check_graph(path) == [], "an operator TensorRT's ONNX parser does not support"
    g = manifest["graphs"][name]
    assert g["trt_problems"] == []
    assert g["validation"] and max(g["validation"].values()) <= TOL, g["validation"]
    # stable I/O names and a symbolic batch dimension
    spec = graph_specs(tiny_config)[name]
    model = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in model.graph.input] == spec.input_names
    assert [o.name for o in model.graph.output] == spec.output_names
    for i in model.graph.input:
        if i.name != "strength":
            assert i.type.tensor_type.shape.dim[0].dim_param == "B"


def _denoiser_inputs(cfg, batch=2, h=64, w=128, seed=3):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, h // 8, w // 8, generator=g),
                timestep=torch.tensor([951, 301][:batch]),
                text_embeddings=torch.randn(batch, 77, cfg.context_dim, generator=g),
                hint=torch.rand(batch, 9, h, w, generator=g) * 2 - 0.5,
                identity_context=torch.randn(batch, 258, cfg.context_dim, generator=g),
                strength=torch.linspace(0.6, 1.3, cfg.unet.num_residuals))


def test_denoiser_graph_is_load_denoiser(exported, tiny_config, tiny_config_path, full_checkpoint):
    out, _ = exported
    den = load_denoiser(tiny_config_path, full_checkpoint)
    inp = _denoiser_inputs(tiny_config)
    got = _session(out / "denoiser.onnx").run(["eps"], {k: v.numpy() for k, v in inp.items()})[0]
    with torch.no_grad():
        want = den(inp["sample"], inp["timestep"], inp["text_embeddings"], inp["hint"], inp["identity_context"],
                   inp["strength"].tolist())
    assert rel_err(torch.from_numpy(got), want) <= TOL
    # tau (ID dropout) is the identity context zeroed on the host for t > tau
    zeroed = {**inp, "identity_context": inp["identity_context"] * torch.tensor([0.0, 1.0])[:, None, None]}
    got_tau = _session(out / "denoiser.onnx").run(["eps"], {k: v.numpy() for k, v in zeroed.items()})[0]
    with torch.no_grad():
        want_tau = den(inp["sample"], inp["timestep"], inp["text_embeddings"], inp["hint"], inp["identity_context"],
                       inp["strength"].tolist(), tau=500)
    assert rel_err(torch.from_numpy(got_tau), want_tau) <= TOL


def test_capface_then_unet_graphs_are_the_batched_cfg_step(exported, tiny_config, tiny_config_path, full_checkpoint):
    out, _ = exported
    den = load_denoiser(tiny_config_path, full_checkpoint)
    inp = _denoiser_inputs(tiny_config, batch=1, h=128, w=64)
    n = tiny_config.unet.num_residuals
    cap_out = _session(out / "capface.onnx").run(None, {k: inp[k].numpy() for k in
                                                        ("sample", "timestep", "hint", "identity_context")})
    assert 0 < (cap_out[-1] > 0.5).mean() < 1, "the test mask should be partly on"
    feed = {"sample": inp["sample"].numpy(), "timestep": inp["timestep"].numpy(),
            "text_embeddings": inp["text_embeddings"].numpy(), "mask": cap_out[n], "strength": inp["strength"].numpy()}
    feed.update({f"residual_{i}": cap_out[i] for i in range(n)})
    got = _session(out / "unet.onnx").run(["eps"], feed)[0]
    with torch.no_grad():
        res, mask = den.capface_residuals(inp["sample"], inp["timestep"], inp["hint"], inp["identity_context"])
        for a, b in zip(res + [mask], cap_out):
            assert rel_err(torch.from_numpy(b), a) <= TOL
        want = den.controlled_eps(inp["sample"], inp["timestep"], inp["text_embeddings"],
                                  den.scaled_residuals(res, mask, inp["strength"].tolist()))
    assert rel_err(torch.from_numpy(got), want) <= TOL


def test_text_encoder_graph_on_real_prompts(exported, tiny_config, full_checkpoint):
    from caphuman.export.models import text_encoder_from_state
    from caphuman.export.checkpoints import read_official

    out, _ = exported
    enc = text_encoder_from_state(tiny_config, read_official(full_checkpoint))
    ids = enc.tokenize(["a photo of a woman, best quality", ""]).input_ids
    got = _session(out / "text_encoder.onnx").run(None, {"input_ids": ids.numpy()})[0]
    assert rel_err(torch.from_numpy(got), enc.encode_ids(ids)) <= TOL


def test_vae_graphs(exported, tiny_config, tiny_config_path, full_checkpoint):
    out, _ = exported
    vae = load_vae(tiny_config_path, full_checkpoint)
    z = torch.randn(3, 4, 8, 16, generator=torch.Generator().manual_seed(4))
    got = _session(out / "vae_decoder.onnx").run(None, {"latents": z.numpy()})[0]
    with torch.no_grad():
        img = vae.decode(z)
    assert rel_err(torch.from_numpy(got), img) <= TOL
    enc = _session(out / "vae_encoder.onnx").run(None, {"images": img.numpy()})[0]
    with torch.no_grad():
        assert rel_err(torch.from_numpy(enc), vae.encode(img)) <= TOL


def test_fp16_export_types_and_checks(tmp_path, tiny_config_path):
    rc = main(["export", "--config", str(tiny_config_path), "--random-weights", "--fp16", "--only", "unet,capface",
               "--no-validate", "--out", str(tmp_path)])
    assert rc == 0
    for name in ("unet", "capface"):
        model = onnx.load(str(tmp_path / f"{name}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert check_graph(tmp_path / f"{name}.onnx") == []
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        big = [i for i in model.graph.initializer if np.prod(i.dims) > 64]
        assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in big)


def test_export_cli_errors(tmp_path, tiny_config_path):
    assert main(["export", "--config", str(tiny_config_path), "--out", str(tmp_path)]) == 2          # no weights
    assert main(["export", "--config", str(tiny_config_path), "--random-weights", "--only", "nope",
                 "--out", str(tmp_path)]) == 2
    assert main(["export", "--config", str(tiny_config_path), "--random-weights", "--only", "facenet",
                 "--out", str(tmp_path), "--size", "100"]) == 2


def test_face_graphs_random_weights(tmp_path, tiny_config_path):
    """FaceNet (+ id_linear), BiSeNet and the DECA encoder: fixed architectures, exported with random
    weights here (their weight files cannot be had in CI)."""
    rc = main(["export", "--config", str(tiny_config_path), "--random-weights", "--only",
               "facenet,bisenet,deca_encoder", "--out", str(tmp_path)])
    assert rc == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for name in ("facenet", "bisenet", "deca_encoder"):
        g = manifest["graphs"][name]
        assert g["trt_problems"] == [] and max(g["validation"].values()) <= TOL, (name, g["validation"])
        onnx.checker.check_model(str(tmp_path / f"{name}.onnx"), full_check=True)
