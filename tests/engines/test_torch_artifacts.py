"""The compiled torch engine as a build artifact (`caphuman build --backend torch --out DIR`): its content key,
the refusal of stale, foreign, truncated and corrupt artifacts, and (slow) a fresh process that loads them
compiling nothing and giving the in-process engine's latents."""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from caphuman.engines.artifacts import content_key, read_sidecar, write_sidecar
from caphuman.engines.factory import create_engine
from caphuman.engines.torch_artifacts import (ArtifactError, StaleArtifactError, artifact_name, engine_fields,
                                              load_artifacts)
from caphuman.engines.torch_engine import TorchDenoiserEngine
from caphuman.export.config import packaged_config
from caphuman.export.models import load_denoiser

from tests.conftest import rel_err

TINY = packaged_config("cldm_tiny")


@pytest.fixture(scope="module")
def den(tiny_config_path, official_checkpoint):
    return load_denoiser(tiny_config_path, official_checkpoint)


def _engine(den, **kw):
    return TorchDenoiserEngine(copy.deepcopy(den), device="cpu", dtype=torch.float32, compile=True, **kw)


def _fake_artifact(folder, fields, data: bytes, shapes=((1, 256, 256),)):
    """An artifact file with a sidecar as `save_artifacts` writes it (without compiling anything)."""
    import hashlib
    fields = {**fields, "shapes": [list(s) for s in shapes]}
    key = content_key(fields)
    path = folder / artifact_name(fields, key)
    path.write_bytes(data)
    write_sidecar(path, {"key": key, "fields": fields, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return path


def test_key_follows_what_compiled_code_depends_on(den, tiny_config_path, official_checkpoint):
    base = engine_fields(_engine(den))
    assert base["weights_sha256"] is None  # weights are graph inputs: one artifact serves any weights
    assert base["device"]["type"] == "cpu" and base["versions"]["torch"] == torch.__version__
    # the same config loaded from another path is the same content
    other_path = load_denoiser(str(tiny_config_path.resolve()), official_checkpoint)
    assert engine_fields(_engine(other_path)) == base
    changed = {
        "fp16": engine_fields(TorchDenoiserEngine(copy.deepcopy(den), device="cpu", dtype=torch.float16, compile=True)),
        "options": engine_fields(_engine(den, compile_options={"conv_1x1_as_mm": True, "max_autotune": True})),
        "kernels": engine_fields(_engine(den, fast_attention=False)),
    }
    keys = {content_key(base)} | {content_key(f) for f in changed.values()}
    assert len(keys) == 4
    frozen = engine_fields(_engine(den, compile_options={"freezing": True}))
    assert frozen["weights_sha256"] and len(frozen["weights_sha256"]) == 64  # baked in: the weights join the key
    with pytest.raises(ValueError, match="inductor"):
        engine_fields(_engine(den, compile_backend="eager"))


def test_stale_or_foreign_artifacts_are_refused_with_the_reason(den, tmp_path):
    engine = _engine(den)
    fields = engine_fields(engine)
    _fake_artifact(tmp_path, {**fields, "versions": {**fields["versions"], "torch": "2.11.0+cu130"},
                              "device": {"type": "cuda", "name": "NVIDIA H200", "capability": "sm90"}}, b"x" * 10)
    with pytest.raises(StaleArtifactError) as e:
        load_artifacts(engine, tmp_path)
    said = str(e.value)
    assert "versions.torch: artifact '2.11.0+cu130'" in said and "device.name: artifact 'NVIDIA H200'" in said
    assert "caphuman build --backend torch --out" in said
    # an edited sidecar (its fields no longer give its key) is not trusted either
    (tmp_path / "edited").mkdir()
    path = _fake_artifact(tmp_path / "edited", fields, b"y" * 10)
    sidecar = read_sidecar(path)
    write_sidecar(path, {**sidecar, "key": "0" * 64})
    with pytest.raises(StaleArtifactError, match="edited sidecar"):
        load_artifacts(engine, path.parent)


def test_truncated_corrupt_or_unreadable_artifacts_give_a_clear_error(den, tmp_path):
    engine = _engine(den)
    fields = engine_fields(engine)
    path = _fake_artifact(tmp_path, fields, b"\x01" * 4096)
    whole = path.read_bytes()
    path.write_bytes(whole[:1000])  # truncated: a copy cut short
    with pytest.raises(ArtifactError, match="truncated or damaged: 1000 bytes, its sidecar says 4096"):
        load_artifacts(engine, tmp_path)
    path.write_bytes(b"\x02" + whole[1:])  # same size, other bytes
    with pytest.raises(ArtifactError, match="is corrupt: its sha256 differs"):
        load_artifacts(engine, tmp_path)
    path.unlink()
    _fake_artifact(tmp_path, fields, b"not inductor's format" * 50)  # consistent with its sidecar, but not a cache
    with pytest.raises(ArtifactError, match="could not load it"):
        load_artifacts(engine, tmp_path)


def test_no_artifacts_compiles_at_first_use_and_says_so(den, tmp_path, caplog):
    (tmp_path / "engines.json").write_text("{}")  # a TensorRT folder's index is not a torch artifact
    with caplog.at_level(logging.INFO, logger="caphuman.engines.torch_artifacts"):
        engine = create_engine("torch", copy.deepcopy(den), device="cpu", dtype=torch.float32, engine_dir=tmp_path)
    assert engine.backend == "torch-compiled" and engine.artifacts == {"torch_artifacts": None}
    assert "no torch artifacts in" in caplog.text and "compiles each batch size" in caplog.text
    with pytest.raises(ValueError, match="drop compile=False"):
        create_engine("torch", copy.deepcopy(den), device="cpu", engine_dir=tmp_path, compile=False)


def test_server_loads_torch_artifacts_from_its_engine_folder(den, tmp_path):
    """The caphuman model's pipeline (`load_generation_pipeline`, CAPHUMAN_ENGINE_DIR): a folder with torch
    artifacts gives a compiled engine that loads them (here: refuses foreign ones); a folder of TensorRT plans
    only leaves the torch engine as configured (no compile turned on)."""
    from caphuman.tritonserver.weights import load_generation_pipeline

    trt_only = tmp_path / "trt"
    trt_only.mkdir()
    (trt_only / "engines.json").write_text("{}")
    assert load_generation_pipeline(None, "cpu", "torch", str(trt_only)).backend == "torch"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    fields = engine_fields(_engine(den))
    _fake_artifact(foreign, {**fields, "device": {"type": "cuda", "name": "NVIDIA H200", "capability": "sm90"}}, b"z")
    with pytest.raises(StaleArtifactError, match="device.type: artifact 'cuda', this process 'cpu'"):
        load_generation_pipeline(None, "cpu", "torch", str(foreign))


_FRESH_PROCESS = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    import torch
    from torch._dynamo.utils import counters
    from caphuman.runtime.pipeline import GenerationRequest, build_pipeline, load_networks, sphere_hint
    engine_dir, out = sys.argv[1] if sys.argv[1] != "-" else None, sys.argv[2]
    nets = load_networks(sys.argv[3], sys.argv[4])
    pipe = build_pipeline(nets, "torch", device="cpu", dtype=torch.float32, engine_dir=engine_dir,
                          **({} if engine_dir else {"compile": True}))
    g = torch.Generator().manual_seed(0)
    req = GenerationRequest(prompt="a photo", hint=sphere_hint(256), seed=7, steps=4,
                            identity_context=torch.randn(1, 258, nets.config.context_dim, generator=g))
    torch.save(pipe.denoise([req], batch_size=1), out)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "engine": getattr(pipe.engine, "artifacts", None),
                      "hits": counters["inductor"]["fxgraph_cache_hit"],
                      "misses": counters["inductor"]["fxgraph_cache_miss"],
                      "aot_hits": counters["aot_autograd"]["autograd_cache_hit"]}))
""")


def _run(args, cache_dir, timeout=900):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}  # each process its own, empty, inductor cache
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory, tiny_config):
    """A tiny caphuman.ckpt with every network the pipeline loads (text encoder and VAE too)."""
    from caphuman.export.clip import ImageEncoder, TextEncoder
    from caphuman.export.models import VAE, CapHumanDenoiser, official_state_dict
    from tests.ldm_reference import randomize_

    path = tmp_path_factory.mktemp("full") / "caphuman.ckpt"
    torch.save(official_state_dict(randomize_(CapHumanDenoiser(tiny_config), 0), randomize_(VAE(tiny_config), 1, std=0.03),
                                   randomize_(TextEncoder(tiny_config.text_clip), 2),
                                   randomize_(ImageEncoder(tiny_config.vision_clip), 3)), path)
    return path


@pytest.mark.slow
def test_fresh_process_loads_the_artifacts_and_compiles_nothing(tmp_path, full_checkpoint):
    """Build in one process (its own inductor cache), then start another with an empty inductor cache and the
    artifacts: every compiled graph comes from them (hits, no misses) and the latents equal the eager engine's.
    A third process without artifacts gives the compile-at-start figure (printed, not asserted: 2 CPU cores)."""
    out = tmp_path / "artifacts"
    t = __import__("time").perf_counter()
    official_checkpoint = full_checkpoint
    _run(["-m", "caphuman.runtime.cli", "build", "--backend", "torch", "--config", str(TINY), "--checkpoint",
          str(official_checkpoint), "--out", str(out), "--batch-sizes", "1", "--resolutions", "256", "--device", "cpu"],
         tmp_path / "cache-build")
    build_s = __import__("time").perf_counter() - t
    script = tmp_path / "fresh.py"
    script.write_text(_FRESH_PROCESS)
    with_art = json.loads(_run([str(script), str(out), str(tmp_path / "a.pt"), str(TINY), str(official_checkpoint)],
                               tmp_path / "cache-a").stdout.strip().splitlines()[-1])
    assert with_art["hits"] == 3 and with_art["misses"] == 0, with_art  # CapFace, UNet first half, decode+update
    # AOTAutograd's cache hits too (its key names every graph input: a process-specific input name, e.g. an
    # id() in a dict key, makes it miss and re-trace the UNet at every start, 13 s on the H200)
    assert with_art["aot_hits"] == 3, with_art
    assert with_art["engine"]["shapes"] == [[1, 256, 256]]
    without = json.loads(_run([str(script), "-", str(tmp_path / "b.pt"), str(TINY), str(official_checkpoint)],
                              tmp_path / "cache-b").stdout.strip().splitlines()[-1])
    assert without["hits"] == 0 and without["misses"] == 3
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    assert torch.equal(a, b)  # the same compiled code
    from caphuman.runtime.pipeline import GenerationRequest, build_pipeline, load_networks, sphere_hint
    nets = load_networks(TINY, official_checkpoint)
    g = torch.Generator().manual_seed(0)
    req = GenerationRequest(prompt="a photo", hint=sphere_hint(256), seed=7, steps=4,
                            identity_context=torch.randn(1, 258, nets.config.context_dim, generator=g))
    eager = build_pipeline(nets, "eager", device="cpu").denoise([req], batch_size=1)
    assert rel_err(a, eager) <= 1e-5
    print(f"\nCPU figures: build {build_s:.0f} s; fresh process to latents with artifacts {with_art['seconds']} s, "
          f"without {without['seconds']} s")
