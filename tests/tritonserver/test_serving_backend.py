"""Which denoiser backend the `caphuman` model serves: its config.pbtxt, overridden by the launch options
(`caphuman serve --backend/--engine-dir`, the container entrypoint's TensorRT build). Static: TensorRT cannot
run here, so its choice is checked without loading it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from caphuman.engines.factory import BACKENDS
from caphuman.tritonserver.weights import BACKEND_ENV, ENGINE_DIR_ENV, serving_backend

from tests.paths import ROOT

CONFIG = ROOT / "tritonserver" / "model_repository" / "caphuman" / "config.pbtxt"


@pytest.fixture
def plans(tmp_path) -> Path:
    (tmp_path / "engines.json").write_text("{}")
    return tmp_path


@pytest.fixture
def tensorrt_importable(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorrt" else real(name, *a))


def test_auto_serves_tensorrt_engines_where_they_can_run(plans, tensorrt_importable):
    assert serving_backend("auto", str(plans), cuda=True, environ={}) == ("tensorrt", str(plans))
    assert serving_backend("auto", "", cuda=True, environ={ENGINE_DIR_ENV: str(plans)}) == ("tensorrt", str(plans))
    # no GPU, or no engines.json in the folder: the torch engine on CUDA, eager on the CPU
    assert serving_backend("auto", str(plans), cuda=False, environ={})[0] == "eager"
    assert serving_backend("auto", str(plans.parent), cuda=True, environ={})[0] == "torch"


def test_auto_without_tensorrt_falls_back_to_the_torch_engine(plans, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real(name, *a))
    assert serving_backend("auto", str(plans), cuda=True, environ={}) == ("torch", str(plans))


def test_launch_options_override_the_config(plans):
    env = {BACKEND_ENV: "onnxruntime", ENGINE_DIR_ENV: "/srv/onnx"}
    assert serving_backend("torch", str(plans), cuda=True, environ=env) == ("onnxruntime", "/srv/onnx")
    assert serving_backend("eager", "", cuda=False, environ={}) == ("eager", None)


def test_bad_choices_are_clear_errors():
    with pytest.raises(ValueError, match="engine must be one of"):
        serving_backend("tensorrt-lite", "", cuda=True, environ={})
    for backend in ("tensorrt", "tensorrt-rtx"):
        with pytest.raises(ValueError, match="needs an engine folder"):
            serving_backend(backend, "", cuda=True, environ={})


def test_config_pbtxt_names_every_backend_parameter():
    text = CONFIG.read_text()
    assert 'key: "engine" value: { string_value: "auto" }' in text
    assert 'key: "engine_dir" value: { string_value: "" }' in text
    for backend in BACKENDS:
        assert backend in text, f"config.pbtxt's comment does not name the {backend} backend"


def test_the_container_entrypoint_hands_its_tensorrt_engines_to_the_server():
    entry = (ROOT / "tritonserver" / "deploy" / "entrypoint.sh").read_text()
    assert f"export {ENGINE_DIR_ENV}" in entry
