"""TensorRT: the pieces that need no TensorRT (optimization profiles, cache keys, the refit weight
map, the CLI's refusal) run everywhere; building and running engines runs where `tensorrt` imports
(and a CUDA GPU is visible), and is skipped elsewhere with the reason."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from caphuman.engines.tensorrt_engine import (BuildSettings, BuildTarget, engine_cache_key, engine_file_name,
                                              profile_shapes, unet_refit_weights)
from caphuman.export.checkpoints import UNET_PREFIX
from caphuman.export.models import load_denoiser
from caphuman.export.onnx_export import export_graphs, load_sources
from caphuman.export.onnx_refit import RefitError, apply_to_model, load_refit_map, refit_weights
from caphuman.export.onnx_specs import ShapeError, graph_specs
from caphuman.export.onnx_wrappers import UNetGraph
from caphuman.export.keymap import unet_key
from caphuman.runtime.cli import main

from tests.conftest import rel_err
from tests.ldm_reference import randomize_

try:
    import tensorrt  # noqa: F401
    HAVE_TRT = torch.cuda.is_available()
except ImportError:
    HAVE_TRT = False
NEEDS_TRT = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installable here (NVIDIA's package index is "
                               "unreachable) or no CUDA GPU: the build/run path is tested where `tensorrt` imports")


def test_unet_profile_covers_cfg_batch_and_resolutions(tiny_config):
    spec = graph_specs(tiny_config)["unet"]
    shapes = profile_shapes(spec, BuildSettings(batch=(1, 1, 4), resolution=(256, 512, 1024)))
    assert shapes["sample"] == ((2, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))     # CFG pairs: 2x batch
    assert shapes["mask"] == ((2, 1, 32, 32), (2, 1, 64, 64), (8, 1, 128, 128))
    assert shapes["residual_0"][2] == (8, 32, 128, 128)
    last = f"residual_{tiny_config.unet.num_residuals - 1}"
    assert shapes[last][1] == (2, 64, 16, 16)                                           # deepest level: H/32
    assert shapes["strength"] == ((10,),) * 3
    assert shapes["timestep"] == ((2,), (2,), (8,))
    cap = profile_shapes(graph_specs(tiny_config)["capface"], BuildSettings(batch=(1, 2, 3)))
    assert cap["hint"] == ((1, 9, 256, 256), (2, 9, 512, 512), (3, 9, 1024, 1024))
    img = profile_shapes(graph_specs(tiny_config)["image_encoder"], BuildSettings())
    assert img["pixel_values"][2] == (4, 3, 224, 224)                                   # fixed size: batch only


@pytest.mark.parametrize("res", [(250, 512, 1024), (256, 512, 1088), (256, 128, 512), (512, 256, 1024)])
def test_profile_resolution_rules(tiny_config, res):
    with pytest.raises(ShapeError):
        profile_shapes(graph_specs(tiny_config)["unet"], BuildSettings(resolution=res))


def test_cache_key_changes_with_every_field(tiny_config):
    spec = graph_specs(tiny_config)["unet"]
    s = BuildSettings()
    shapes = profile_shapes(spec, s)
    h100 = BuildTarget("tensorrt", "10.7.0", "NVIDIA H100 80GB HBM3", "sm90")
    base = engine_cache_key("g" * 64, h100, s, shapes)
    assert base == engine_cache_key("g" * 64, h100, s, shapes)
    others = [engine_cache_key("h" * 64, h100, s, shapes),
              engine_cache_key("g" * 64, replace(h100, device="NVIDIA H200"), s, shapes),
              engine_cache_key("g" * 64, replace(h100, arch="sm89"), s, shapes),
              engine_cache_key("g" * 64, replace(h100, version="10.8.0"), s, shapes),
              engine_cache_key("g" * 64, replace(h100, library="tensorrt-rtx"), s, shapes),
              engine_cache_key("g" * 64, h100, BuildSettings(fp16=False), shapes),
              engine_cache_key("g" * 64, h100, s, profile_shapes(spec, BuildSettings(batch=(1, 2, 4))))]
    assert len({base, *others}) == 8
    assert engine_file_name("unet", s, h100, base) == f"unet-fp16-sm90-{base[:12]}.plan"
    rtx = BuildTarget("tensorrt-rtx", "1.7.1.116", "portable", "sm80+sm86+sm89+sm120")
    assert engine_cache_key("g" * 64, rtx, s, shapes) != engine_cache_key("g" * 64, replace(rtx, arch="sm89"), s, shapes)
    assert engine_file_name("unet", s, rtx, base) == f"unet-fp16-rtx-sm80.86.89.120-{base[:12]}.plan"


@pytest.fixture(scope="module")
def unet_export(tmp_path_factory, tiny_config_path, official_checkpoint):
    out = tmp_path_factory.mktemp("refit")
    src = load_sources(tiny_config_path, official_checkpoint, names=["unet"])
    export_graphs(src, ["unet"], out, validate=False, progress=False)
    return out


@pytest.fixture(scope="module")
def other_sd_checkpoint(tmp_path_factory, tiny_config):
    """Another 'SD1.5' checkpoint: a differently randomized UNet under model.diffusion_model.*."""
    from caphuman.export.networks import build_unet
    unet = randomize_(build_unet(tiny_config.unet), seed=77)
    path = tmp_path_factory.mktemp("sd") / "other_sd.ckpt"
    torch.save({"state_dict": {UNET_PREFIX + unet_key(k, tiny_config.unet): v for k, v in unet.state_dict().items()}},
               path)
    return path, unet


def test_refit_map_covers_every_unet_weight(unet_export, tiny_config):
    raw = json.loads((unet_export / "unet.refit.json").read_text())
    assert raw["unmapped_parameters"] == []
    entries = load_refit_map(unet_export / "unet.refit.json")
    from caphuman.export.networks import build_unet
    n_params = sum(1 for k, v in build_unet(tiny_config.unet).state_dict().items() if v.is_floating_point())
    assert len(entries) == n_params
    assert any(e.transpose for e in entries.values())                  # folded Linear weights (onnx::MatMul_*)
    assert any(len(e.shape) == 3 for e in entries.values())            # GroupNorm weights folded to [C, 1, 1]
    model = onnx.load(str(unet_export / "unet.onnx"))
    inits = {i.name for i in model.graph.initializer}
    assert set(entries) <= inits


def test_refit_from_another_checkpoint_gives_its_unet(unet_export, tiny_config, tiny_config_path, official_checkpoint,
                                                      other_sd_checkpoint):
    """The CPU stand-in for a TensorRT refit: write the new initializers into the graph, run it under
    ONNX Runtime, compare with PyTorch running the denoiser with the swapped UNet."""
    path, _ = other_sd_checkpoint
    weights = unet_refit_weights(unet_export, "unet", tiny_config, path)
    model = onnx.load(str(unet_export / "unet.onnx"))
    apply_to_model(model, weights)
    den = load_denoiser(tiny_config_path, official_checkpoint, sd_checkpoint=path)  # official loading order
    spec = graph_specs(tiny_config)["unet"]
    feed = spec.sample_inputs(1, 64, 128, seed=5)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["eps"], {k: v.numpy() for k, v in feed.items()})[0]
    with torch.no_grad():
        want = UNetGraph(den)(*feed.values())[0]
        before = UNetGraph(load_denoiser(tiny_config_path, official_checkpoint))(*feed.values())[0]
    assert rel_err(torch.from_numpy(got), want) <= 1e-4
    assert rel_err(want, before) > 1e-2, "the swap must change the UNet"


def test_refit_rejects_wrong_weights(unet_export):
    entries = load_refit_map(unet_export / "unet.refit.json")
    with pytest.raises(RefitError, match="missing"):
        refit_weights(entries, {}, np.float32, "unet.")
    one = next(iter(entries.values()))
    with pytest.raises(RefitError, match="shape"):
        refit_weights({"x": one}, {one.param: torch.zeros(3, 5, 7)}, np.float32)


def test_build_cli_without_tensorrt(tmp_path, unet_export, capsys):
    if HAVE_TRT:
        pytest.skip("TensorRT is installed here")
    rc = main(["build", "--onnx-dir", str(unet_export), "--out", str(tmp_path), "--only", "unet"])
    assert rc != 0
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert main(["build", "--onnx-dir", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2


def test_generate_tensorrt_backend_without_tensorrt(tmp_path, capsys):
    if HAVE_TRT:
        pytest.skip("TensorRT is installed here")
    rc = main(["generate", "--backend", "tensorrt", "--engine-dir", str(tmp_path), "--steps", "2", "--resolution",
               "256", "--device", "cpu", "--out", str(tmp_path)])
    assert rc != 0
    assert "TensorRT is not installed" in capsys.readouterr().err


@NEEDS_TRT
def test_tensorrt_engine_matches_onnxruntime(tmp_path, unet_export, tiny_config, other_sd_checkpoint):
    from caphuman.engines.onnxruntime_engine import OnnxRuntimeEngine
    from caphuman.engines.tensorrt_engine import TensorRTEngine, build_engine

    spec = graph_specs(tiny_config)["unet"]
    settings = BuildSettings(batch=(1, 1, 2), resolution=(256, 256, 512), fp16=False)
    plan = build_engine(unet_export / "unet.onnx", spec, tmp_path, settings)
    assert build_engine(unet_export / "unet.onnx", spec, tmp_path, settings) == plan       # cache hit
    trt_eng = TensorRTEngine(plan, spec)
    ort_eng = OnnxRuntimeEngine(unet_export / "unet.onnx", spec, providers=["CPUExecutionProvider"])
    feed = spec.sample_inputs(2, 256, 320, seed=2)
    for _ in range(3):  # eager, capture, replay
        got = trt_eng.run({k: v.cuda() for k, v in feed.items()})["eps"].float().cpu()
    assert rel_err(got, ort_eng.run(feed)["eps"]) <= 1e-3
    trt_eng.refit(unet_refit_weights(unet_export, "unet", tiny_config, other_sd_checkpoint[0]))
    refit = trt_eng.run({k: v.cuda() for k, v in feed.items()})["eps"].float().cpu()
    assert rel_err(refit, got) > 1e-2


@NEEDS_TRT
def test_tensorrt_denoiser_through_the_factory_equals_eager(tmp_path, tiny_config_path, official_checkpoint,
                                                            tiny_config):
    """`caphuman build` plans for capface and unet, loaded by the one factory as a DenoiserEngine: every
    sampler runs on it through the one loop and gives the eager modules' latents (fp32 engines)."""
    from caphuman.engines.factory import create_engine
    from caphuman.runtime.sampling import sample_with

    onnx_dir = tmp_path / "onnx"
    src = load_sources(tiny_config_path, official_checkpoint, names=["capface", "unet"])
    export_graphs(src, ["capface", "unet"], onnx_dir, validate=False, progress=False)
    assert main(["build", "--onnx-dir", str(onnx_dir), "--out", str(tmp_path / "plans"), "--only", "capface,unet",
                 "--resolution", "256:256:512", "--batch", "1:1:2"]) == 0
    den = load_denoiser(tiny_config_path, official_checkpoint)
    engine = create_engine("tensorrt", den, engine_dir=tmp_path / "plans", device="cuda")
    g = torch.Generator().manual_seed(3)
    inp = dict(noise=torch.randn(1, 4, 32, 32, generator=g), text_cond=torch.randn(1, 77, 32, generator=g),
               text_uncond=torch.randn(1, 77, 32, generator=g), hint=torch.rand(1, 9, 256, 256, generator=g),
               identity_context=torch.randn(1, 258, 32, generator=g))
    for sampler in ("ddim", "dpmpp_2m"):
        with torch.no_grad():
            want = sample_with(sampler, den, **inp, steps=4)
        got = sample_with(sampler, engine, **{k: v.cuda() for k, v in inp.items()}, steps=4).cpu()
        assert rel_err(got, want) <= 1e-3, sampler
