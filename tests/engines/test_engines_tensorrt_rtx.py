"""TensorRT for RTX: real engines built on this CPU-only machine with NVIDIA's wheel (no GPU needed to build).

Every graph `caphuman export` writes (tiny config, random weights; the face networks at their real sizes) is
built in fp32 and fp16 with its optimization profile through `caphuman build --backend tensorrt-rtx`. Running
the engines, and refitting them, needs an RTX GPU (Ampere, Ada, Blackwell): those tests are skipped here.
"""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from caphuman.engines.base import EngineError
from caphuman.engines.tensorrt_engine import BuildSettings, TensorRTEngine, build_engine, profile_shapes
from caphuman.engines.tensorrt_library import RTX, runs_rtx_engine
from caphuman.export.onnx_specs import FACE_GRAPHS, NETWORK_GRAPHS, graph_specs
from caphuman.runtime.cli import main

try:
    import tensorrt_rtx_bindings as trt
except ImportError:
    trt = None
NEEDS_RTX_WHEEL = pytest.mark.skipif(trt is None, reason="the TensorRT for RTX wheel does not import here "
                                     "(pip install -e '.[tensorrt-rtx]'; Linux x86-64 only)")


def _rtx_gpu() -> bool:
    if trt is None or not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability(0)
    return runs_rtx_engine(f"sm{major}{minor}", RTX.compute_capabilities)


NEEDS_RTX_GPU = pytest.mark.skipif(not _rtx_gpu(), reason="running and refitting TensorRT for RTX engines needs an "
                                   "RTX GPU (Ampere sm80/86, Ada sm89, Blackwell sm12x); none here")
ALL_GRAPHS = NETWORK_GRAPHS + FACE_GRAPHS
PROFILE = ["--batch", "1:1:2", "--resolution", "256:256:512"]
SETTINGS = dict(batch=(1, 1, 2), resolution=(256, 256, 512), refit=False)


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory, tiny_config_path):
    """fp32 and fp16 ONNX graphs of every network `caphuman export` writes, exported once for the module."""
    out = {}
    for precision in ("fp32", "fp16"):
        folder = tmp_path_factory.mktemp(f"onnx_{precision}")
        args = ["export", "--config", str(tiny_config_path), "--random-weights", "--no-validate",
                "--only", ",".join(ALL_GRAPHS), "--out", str(folder)] + (["--fp16"] if precision == "fp16" else [])
        assert main(args) == 0
        out[precision] = folder
    return out


@pytest.fixture(scope="module")
def rtx_builds(tiny_exports, tmp_path_factory):
    """`caphuman build --backend tensorrt-rtx` of every exported graph, per precision: (engine folder, rc)."""
    if trt is None:
        pytest.skip("the TensorRT for RTX wheel does not import here")
    out = {}
    for precision, onnx_dir in tiny_exports.items():
        engines = tmp_path_factory.mktemp(f"rtx_{precision}")
        rc = main(["build", "--backend", "tensorrt-rtx", "--onnx-dir", str(onnx_dir), "--out", str(engines),
                   "--graphs", ",".join(ALL_GRAPHS)] + PROFILE)
        out[precision] = (engines, rc)
    return out


@NEEDS_RTX_WHEEL
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_rtx_builds_every_exported_graph_with_its_profile(rtx_builds, tiny_config, precision):
    engines, rc = rtx_builds[precision]
    assert rc == 0
    index = json.loads((engines / "engines.json").read_text())
    assert sorted(index) == sorted(ALL_GRAPHS)
    specs = graph_specs(tiny_config)
    settings = BuildSettings(fp16=precision == "fp16", **SETTINGS)
    for name in ALL_GRAPHS:
        plan = engines / index[name]["plan"]
        assert index[name]["library"] == "tensorrt-rtx"
        assert plan.name.startswith(f"{name}-{precision}-rtx-sm80.86.89.120-")
        assert plan.stat().st_size > 100_000, name                        # a real engine, not a header
        side = json.loads(plan.with_suffix(".json").read_text())
        assert (side["library"], side["version"], side["device"]) == ("tensorrt-rtx", trt.__version__, "portable")
        assert side["arch"] == "sm80+sm86+sm89+sm120"
        assert side["settings"]["fp16"] is (precision == "fp16")
        want = {k: [list(s) for s in v] for k, v in profile_shapes(specs[name], settings).items()}
        assert side["shapes"] == want, name                                # the profile asked for, every input


@NEEDS_RTX_WHEEL
def test_rtx_build_defaults_to_the_pipelines_graphs_and_reuses_engines(rtx_builds, tiny_exports, capsys):
    """Without --graphs, every graph the pipeline runs that the export has; all of them are already in the
    folder with the same key, so nothing is rebuilt."""
    from caphuman.engines.tensorrt_engine import PIPELINE_GRAPHS

    engines, _ = rtx_builds["fp32"]
    stamps = {p.name: p.stat().st_mtime_ns for p in engines.glob("*.plan")}
    capsys.readouterr()
    assert main(["build", "--backend", "tensorrt-rtx", "--onnx-dir", str(tiny_exports["fp32"]), "--out", str(engines)]
                + PROFILE) == 0
    printed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if ".plan" in line]
    assert printed == list(PIPELINE_GRAPHS)
    assert {p.name: p.stat().st_mtime_ns for p in engines.glob("*.plan")} == stamps


@NEEDS_RTX_WHEEL
def test_rtx_fp16_engines_hold_fp16_weights(rtx_builds):
    """Strongly typed networks: an fp16 graph gives fp16 kernels and weights. The face networks are weight-bound
    (tens of MB), so their fp16 engines are about half the size of the fp32 ones."""
    sizes = {}
    for precision, (engines, _) in rtx_builds.items():
        index = json.loads((engines / "engines.json").read_text())
        sizes[precision] = {g: (engines / index[g]["plan"]).stat().st_size for g in FACE_GRAPHS}
    for g in FACE_GRAPHS:
        assert sizes["fp16"][g] < 0.65 * sizes["fp32"][g], (g, sizes["fp16"][g], sizes["fp32"][g])


@NEEDS_RTX_WHEEL
def test_rtx_engine_cache_is_keyed_by_content(tiny_exports, tiny_config, tmp_path):
    spec = graph_specs(tiny_config)["vae_decoder"]
    onnx_path = tiny_exports["fp32"] / "vae_decoder.onnx"
    settings = BuildSettings(fp16=False, **SETTINGS)
    plan = build_engine(onnx_path, spec, tmp_path, settings, library=RTX)
    stamp = plan.stat().st_mtime_ns
    assert build_engine(onnx_path, spec, tmp_path, settings, library=RTX) == plan      # cache hit, not rebuilt
    assert plan.stat().st_mtime_ns == stamp
    wider = build_engine(onnx_path, spec, tmp_path, BuildSettings(fp16=False, batch=(1, 1, 4), resolution=(256, 256, 512),
                                                                    refit=False), library=RTX)
    assert wider != plan and wider.stat().st_size > 0                                     # another profile, another key


@NEEDS_RTX_WHEEL
def test_rtx_precision_follows_the_graph(tiny_exports, tiny_config, tmp_path, capsys):
    spec = graph_specs(tiny_config)["vae_decoder"]
    with pytest.raises(EngineError, match="strongly typed: a fp16 engine needs a fp16 graph"):
        build_engine(tiny_exports["fp32"] / "vae_decoder.onnx", spec, tmp_path, BuildSettings(fp16=True, **SETTINGS),
                     library=RTX)
    rc = main(["build", "--backend", "tensorrt-rtx", "--onnx-dir", str(tiny_exports["fp16"]), "--out", str(tmp_path),
               "--graphs", "vae_decoder", "--fp32"] + PROFILE)
    assert rc == 2 and "strongly typed" in capsys.readouterr().err


@NEEDS_RTX_WHEEL
def test_rtx_parser_rejection_carries_the_parsers_message(tiny_exports, tiny_config, tmp_path):
    model = onnx.load(str(tiny_exports["fp32"] / "vae_decoder.onnx"))
    model.graph.node[3].op_type = "NotAnOnnxOp"
    broken = tmp_path / "vae_decoder.onnx"
    onnx.save(model, str(broken))
    logger = trt.Logger(trt.Logger.ERROR)          # the parser on its own, for the message to expect
    builder = trt.Builder(logger)                  # the network lives only as long as its builder
    network = builder.create_network(RTX.network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    assert not parser.parse_from_file(str(broken))
    expected = parser.get_error(0).desc()
    with pytest.raises(EngineError) as err:
        build_engine(broken, graph_specs(tiny_config)["vae_decoder"], tmp_path / "out",
                     BuildSettings(fp16=False, **SETTINGS), library=RTX)
    message = str(err.value)
    assert "TensorRT for RTX's ONNX parser rejected" in message
    assert "NotAnOnnxOp" in message and expected in message
    assert not list((tmp_path / "out").glob("*.plan"))


@NEEDS_RTX_WHEEL
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only limitation of refittable builds")
def test_rtx_refittable_build_without_a_gpu_says_why(tiny_exports, tiny_config, tmp_path):
    """TensorRT for RTX 1.7.1 compiles refittable weights with CUDA (its Myelin backend): without a driver a
    refittable build fails. The error passes the library's words on and says what to do instead."""
    with pytest.raises(EngineError) as err:
        build_engine(tiny_exports["fp32"] / "vae_decoder.onnx", graph_specs(tiny_config)["vae_decoder"], tmp_path,
                     BuildSettings(fp16=False, batch=(1, 1, 2), resolution=(256, 256, 512), refit=True), library=RTX)
    message = str(err.value)
    assert "Myelin" in message and "without --refit" in message


def test_rtx_backend_refuses_a_machine_without_an_rtx_gpu(tmp_path, capsys):
    if _rtx_gpu():
        pytest.skip("an RTX GPU is here")
    rc = main(["generate", "--backend", "tensorrt-rtx", "--engine-dir", str(tmp_path), "--steps", "2", "--resolution",
               "256", "--device", "cpu", "--out", str(tmp_path)])
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    if trt is None:
        assert "TensorRT for RTX is not installed" in err
    else:
        assert "Ampere" in err and "Ada" in err and "Blackwell" in err


def test_rtx_compute_capabilities():
    targets = RTX.compute_capabilities
    assert [runs_rtx_engine(sm, targets) for sm in ("sm80", "sm86", "sm89", "sm120", "sm121")] == [True] * 5
    assert [runs_rtx_engine(sm, targets) for sm in ("sm75", "sm90", "sm100", "sm87")] == [False] * 4  # Hopper: no


def test_a_plan_of_the_other_library_is_refused(tmp_path, tiny_config):
    plan = tmp_path / "unet-fp16-sm90-0123456789ab.plan"
    plan.write_bytes(b"\0" * 64)
    plan.with_suffix(".json").write_text(json.dumps({"library": "tensorrt"}))
    with pytest.raises(EngineError, match="built with tensorrt, not tensorrt-rtx"):
        TensorRTEngine(plan, graph_specs(tiny_config)["unet"], library=RTX)


@NEEDS_RTX_GPU
def test_rtx_engine_runs_refits_and_keeps_its_runtime_cache(tmp_path, tiny_config, tiny_config_path,
                                                            official_checkpoint):
    """Where an RTX GPU exists: a refittable UNet engine equals ONNX Runtime, a refit from another SD1.5-layout
    checkpoint changes its output, and the JIT runtime cache is written next to the plan."""
    from caphuman.engines.onnxruntime_engine import OnnxRuntimeEngine
    from caphuman.engines.tensorrt_engine import unet_refit_weights
    from caphuman.export.checkpoints import UNET_PREFIX
    from caphuman.export.keymap import unet_key
    from caphuman.export.networks import build_unet
    from caphuman.export.onnx_export import export_graphs, load_sources

    from tests.conftest import rel_err
    from tests.ldm_reference import randomize_

    onnx_dir = tmp_path / "onnx"
    export_graphs(load_sources(tiny_config_path, official_checkpoint, names=["unet"]), ["unet"], onnx_dir,
                  validate=False, progress=False)
    other = tmp_path / "other_sd.ckpt"
    unet = randomize_(build_unet(tiny_config.unet), seed=77)
    torch.save({"state_dict": {UNET_PREFIX + unet_key(k, tiny_config.unet): v for k, v in unet.state_dict().items()}},
               other)
    spec = graph_specs(tiny_config)["unet"]
    plan = build_engine(onnx_dir / "unet.onnx", spec, tmp_path / "plans",
                        BuildSettings(fp16=False, batch=(1, 1, 2), resolution=(256, 256, 512), refit=True), library=RTX)
    engine = TensorRTEngine(plan, spec, library=RTX)
    feed = spec.sample_inputs(2, 256, 320, seed=2)
    got = engine.run({k: v.cuda() for k, v in feed.items()})["eps"].float().cpu()
    want = OnnxRuntimeEngine(onnx_dir / "unet.onnx", spec, providers=["CPUExecutionProvider"]).run(feed)["eps"]
    assert rel_err(got, want) <= 1e-3
    engine.refit(unet_refit_weights(onnx_dir, "unet", tiny_config, other))
    refit = engine.run({k: v.cuda() for k, v in feed.items()})["eps"].float().cpu()
    assert rel_err(refit, got) > 1e-2
    assert bytes(engine.engine.serialize()) != plan.read_bytes()
    engine.close()
    assert engine.runtime_cache_path.is_file()
