"""The ONNX Runtime backend: DDIM over the exported `capface`/`unet` (and `denoiser`) graphs equals
`ddim_sample` on the modules, and `caphuman generate --backend {onnxruntime,torch}` writes the image the reference
mode (`--backend eager --cfg serial`) writes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from caphuman.engines.factory import create_engine
from caphuman.export.models import load_denoiser
from caphuman.export.onnx_export import export_graphs, load_sources
from caphuman.export.onnx_specs import ShapeError
from caphuman.runtime.cli import main
from caphuman.runtime.sampling import ddim_sample

from tests.conftest import rel_err


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny_config_path, official_checkpoint):
    out = tmp_path_factory.mktemp("ort")
    src = load_sources(tiny_config_path, official_checkpoint, names=["capface", "unet", "denoiser"])
    export_graphs(src, ["capface", "unet", "denoiser"], out, validate=False, progress=False)
    return out


@pytest.fixture(scope="module")
def sampler(graphs, tiny_config_path, official_checkpoint):
    den = load_denoiser(tiny_config_path, official_checkpoint)
    return den, create_engine("onnxruntime", den, engine_dir=graphs)


@pytest.mark.parametrize("kw", [dict(), dict(cfg="serial"), dict(guidance=1.0), dict(tau=500, strength=0.7),
                                dict(eta=0.4)], ids=["batched", "serial", "guidance1", "tau", "eta"])
def test_engine_sampler_equals_ddim_sample(sampler, tiny_config, kw):
    den, samp = sampler
    g = torch.Generator().manual_seed(9)
    inp = dict(noise=torch.randn(2, 4, 8, 16, generator=g), text_cond=torch.randn(1, 77, 32, generator=g),
               text_uncond=torch.randn(1, 77, 32, generator=g), hint=torch.rand(1, 9, 64, 128, generator=g),
               identity_context=torch.randn(1, 258, 32, generator=g))

    def gens():
        return [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)] if kw.get("eta") else None

    with torch.no_grad():
        want = ddim_sample(den, **inp, steps=4, generators=gens(), **kw)
    got = ddim_sample(samp, **inp, steps=4, generators=gens(), **kw)
    assert rel_err(got, want) <= 1e-4


def test_engine_checks_feeds(sampler):
    _, samp = sampler
    with pytest.raises(ShapeError, match="missing inputs"):
        samp.unet.run({"sample": torch.zeros(2, 4, 8, 8)})
    with pytest.raises(ShapeError, match="dim 1"):
        samp.capface.run({"sample": torch.zeros(1, 3, 8, 8), "timestep": torch.zeros(1, dtype=torch.long),
                          "hint": torch.zeros(1, 9, 64, 64), "identity_context": torch.zeros(1, 258, 32)})


def _png(folder):
    return np.asarray(Image.open(next(folder.glob("*.png"))).convert("RGB")).astype(np.float64)


def _psnr(a, b):
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def test_generate_backends_match_reference_mode(tmp_path):
    common = ["generate", "--seed", "3", "--steps", "4", "--resolution", "256", "--device", "cpu"]
    runs = {"reference": ["--backend", "eager", "--cfg", "serial"], "torch": ["--backend", "torch"],
            "onnxruntime": ["--backend", "onnxruntime", "--engine-dir", str(tmp_path / "onnx")]}
    for name, extra in runs.items():
        assert main(common + ["--out", str(tmp_path / name)] + extra) == 0
    ref = _png(tmp_path / "reference")
    for name in ("torch", "onnxruntime"):
        assert _psnr(_png(tmp_path / name), ref) >= 40, name
    import json
    side = json.loads(next((tmp_path / "onnxruntime").glob("*.json")).read_text())
    assert side["backend"].startswith("onnxruntime")


def test_generate_dpmpp_2m_on_onnxruntime_equals_eager(tmp_path):
    """`caphuman generate --sampler dpmpp_2m --steps 10 --backend onnxruntime` writes the eager backend's image,
    and the sidecar names the sampler and the backend that ran."""
    import json
    common = ["generate", "--seed", "5", "--sampler", "dpmpp_2m", "--steps", "10", "--resolution", "256",
              "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "eager")]) == 0
    assert main(common + ["--out", str(tmp_path / "ort"), "--backend", "onnxruntime",
                          "--engine-dir", str(tmp_path / "onnx")]) == 0
    assert _psnr(_png(tmp_path / "ort"), _png(tmp_path / "eager")) >= 40
    eager = json.loads(next((tmp_path / "eager").glob("*.json")).read_text())
    ort = json.loads(next((tmp_path / "ort").glob("*.json")).read_text())
    assert eager["sampler"] == ort["sampler"] == "dpmpp_2m" and eager["steps"] == 10
    assert eager["backend"] == "eager" and ort["backend"].startswith("onnxruntime")


def test_graphs_exported_to_a_temporary_folder_are_removed(tiny_config_path, official_checkpoint, tmp_path,
                                                           monkeypatch):
    """Without an engine folder the graphs go to a temporary folder, which is gone once the sessions hold
    them; the engine still runs."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    den = load_denoiser(tiny_config_path, official_checkpoint)
    engine = create_engine("onnxruntime", den)
    assert list(tmp_path.iterdir()) == []
    g = torch.Generator().manual_seed(1)
    latents = ddim_sample(engine, torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g),
                          torch.randn(1, 77, 32, generator=g), torch.rand(1, 9, 64, 64, generator=g),
                          torch.randn(1, 258, 32, generator=g), steps=2)
    assert torch.isfinite(latents).all()


_START_ENGINE = """
import sys, torch
from caphuman.engines.factory import create_engine
from caphuman.export.models import load_denoiser
from caphuman.runtime.sampling import ddim_sample
den = load_denoiser(sys.argv[1], sys.argv[2])
engine = create_engine("onnxruntime", den, engine_dir=sys.argv[3])
g = torch.Generator().manual_seed(1)
x = ddim_sample(engine, torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g),
                torch.randn(1, 77, 32, generator=g), torch.rand(1, 9, 64, 64, generator=g),
                torch.randn(1, 258, 32, generator=g), steps=2)
torch.save(x, sys.argv[4])
"""


def test_processes_starting_on_one_empty_engine_folder_share_one_export(tiny_config_path, official_checkpoint,
                                                                        tmp_path):
    """The server's model instances start together on one CAPHUMAN_ENGINE_DIR: one exports, the other waits
    and loads the finished graphs (never a half-written file); both compute the same latents."""
    import subprocess
    import sys
    folder = tmp_path / "graphs"
    procs = [subprocess.Popen([sys.executable, "-c", _START_ENGINE, str(tiny_config_path), str(official_checkpoint),
                               str(folder), str(tmp_path / f"x{i}.pt")], stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sorted(f.name for f in folder.glob("*.onnx")) == ["capface.onnx", "denoiser.onnx", "unet.onnx"]
    assert not list(folder.glob(".export-*")), "the staging folder is left behind"
    a, b = (torch.load(tmp_path / f"x{i}.pt", weights_only=True) for i in range(2))
    assert torch.equal(a, b)
