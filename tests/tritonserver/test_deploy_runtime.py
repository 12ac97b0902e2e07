"""The container's start-up, run here without Docker: entrypoint.sh with stand-ins for `tritonserver` and
`nvidia-smi` on PATH (what it generates, how `caphuman serve` starts tritonserver), and the engine-cache
step's plan and commands. The stand-in records its arguments and exits, so serve then reports that
tritonserver exited before becoming ready (tests/tritonserver/test_serve_*.py run the real one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from caphuman.tritonserver import deploy_configs as dc
from caphuman.tritonserver.deploy import engine_cache as ec
from caphuman.tritonserver.launcher import free_port
from tests.paths import ROOT

DEPLOY = ROOT / "tritonserver" / "deploy"
REPO = ROOT / "tritonserver" / "model_repository"
needs_repo = pytest.mark.skipif(not any(REPO.glob("*/config.pbtxt")),
                                reason="tritonserver/model_repository has no model configs yet")

FAKE_TRITON = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_OUT/args"
echo "${CAPHUMAN_WEIGHTS-<unset>}" > "$FAKE_OUT/weights"
echo "${CAPHUMAN_ENGINE_DIR-<unset>}" > "$FAKE_OUT/engine_dir"
"""
FAKE_SMI = """#!/usr/bin/env bash
for i in $(seq 0 $((FAKE_GPUS - 1))); do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done
"""


@pytest.fixture
def box(tmp_path):
    """A PATH with fake tritonserver/nvidia-smi and our python3, and the entrypoint's folders."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("tritonserver", FAKE_TRITON), ("nvidia-smi", FAKE_SMI)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # a wrapper, not a symlink: a venv's python found through a symlink elsewhere loses the venv
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_OUT": str(out),
           "FAKE_GPUS": "2", "CAPHUMAN_MODEL_REPOSITORY": str(REPO),
           "CAPHUMAN_RUN_DIR": str(tmp_path / "run"), "CAPHUMAN_ENGINE_CACHE": str(tmp_path / "engines"),
           "CAPHUMAN_WEIGHTS": str(tmp_path / "weights"),
           # serve's gateway really listens on these (the stand-in only records its own ports)
           "TRITON_GRPC_PORT": str(free_port()), "TRITON_HTTP_PORT": str(free_port())}

    def run(*args, **extra):
        r = subprocess.run(["bash", str(DEPLOY / "entrypoint.sh"), *args], env={**env, **extra},
                           capture_output=True, text=True, timeout=120)
        return r
    run.tmp, run.out, run.env = tmp_path, out, env
    return run


def started_by_serve(result) -> None:
    """`caphuman serve` ran the stand-in, which exited at once (as a crashing tritonserver would)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "tritonserver exited with status 0 before becoming ready" in result.stderr, result.stderr


def server_args_of(result, box) -> dict[str, str]:
    started_by_serve(result)
    return server_args(box)


def server_args(box) -> dict[str, str]:
    lines = (box.out / "args").read_text().split("\n")
    return dict(a.split("=", 1) if "=" in a else (a, "") for a in lines if a)


def test_entrypoint_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(DEPLOY / "entrypoint.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.access(DEPLOY / "entrypoint.sh", os.X_OK)


@needs_repo
def test_serve_on_two_gpus_generates_per_gpu_configs_and_execs_tritonserver(box):
    r = box("serve", CAPHUMAN_INSTANCES_PER_GPU="caphuman=2 identity=1", TRITON_EXTRA_ARGS="--log-info=true --x=1")
    args = server_args_of(r, box)
    repo = Path(args["--model-repository"])
    assert repo == box.tmp / "run" / "model_repository"
    for cfg in sorted(REPO.glob("*/config.pbtxt")):
        groups = dc.parse((repo / cfg.parent.name / "config.pbtxt").read_text())[dc.FIELD]
        want = "2" if cfg.parent.name == "caphuman" else "1"
        assert [(g["kind"][0], g["gpus"], g["count"][0]) for g in groups] == \
            [("KIND_GPU", ["0"], want), ("KIND_GPU", ["1"], want)]
    # gRPC and HTTP: tritonserver on loopback, behind serve's gateway on 8000/8001; metrics direct
    assert args["--grpc-address"] == "127.0.0.1" and args["--http-address"] == "127.0.0.1"
    public = {box.env["TRITON_GRPC_PORT"], box.env["TRITON_HTTP_PORT"]}
    assert args["--grpc-port"] not in public and args["--http-port"] not in public
    assert args["--metrics-address"] == "0.0.0.0" and args["--metrics-port"] == "8002"
    assert args["--allow-gpu-metrics"] == "true"
    assert args["--strict-readiness"] == "true" and args["--allow-metrics"] == "true"
    assert args["--exit-on-error"] == "true" and args["--exit-timeout-secs"] == "90"
    assert "--log-info" in args and args["--x"] == "1"          # TRITON_EXTRA_ARGS split into flags
    # admin APIs behind a header, as `caphuman serve` does (one list: launcher.ADMIN_APIS)
    from caphuman.tritonserver.launcher import ADMIN_APIS, ADMIN_HEADER
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        apis, key = args[flag].split(":", 1)
        assert apis == ADMIN_APIS and key.startswith(f"{ADMIN_HEADER}=") and len(key) > len(ADMIN_HEADER) + 16
    pinned = server_args_of(box("serve", CAPHUMAN_ADMIN_KEY="k3y"), box)
    assert pinned["--http-restricted-api"] == f"{ADMIN_APIS}:{ADMIN_HEADER}=k3y"
    # no weights mounted: the tiny model serves, and the server is not pointed at an empty folder
    assert (box.out / "weights").read_text().strip() == "<unset>"
    assert "tiny random-weight model" in r.stderr


@needs_repo
def test_serve_without_gpus_uses_the_tested_repository_unchanged(box):
    r = box("serve", CAPHUMAN_GPUS="0")
    assert Path(server_args_of(r, box)["--model-repository"]) == REPO
    r = box("serve", FAKE_GPUS="0")                   # nvidia-smi lists no GPU
    assert Path(server_args_of(r, box)["--model-repository"]) == REPO


@needs_repo
def test_serve_with_weights_runs_the_engine_step_and_passes_weights(box):
    weights = box.tmp / "weights"
    weights.mkdir()
    (weights / "caphuman.ckpt").write_bytes(b"not really a checkpoint")
    r = box("serve", CAPHUMAN_GPUS="0,1", CAPHUMAN_BUILD_ENGINES="0")
    started_by_serve(r)
    assert "engine cache: skipped: CAPHUMAN_BUILD_ENGINES=0" in r.stdout
    assert (box.out / "weights").read_text().strip() == str(weights)
    assert (box.out / "engine_dir").read_text().strip() == "<unset>"      # no engines: the torch backend


def test_build_and_other_commands(box):
    r = box("build")
    assert r.returncode == 0 and "tiny random-weight model" in r.stderr
    r = box("echo", "hello")
    assert r.returncode == 0 and r.stdout.strip() == "hello"


# -- the engine-cache step --------------------------------------------------------------------------------

@pytest.fixture
def weights(tmp_path):
    w = tmp_path / "weights"
    w.mkdir()
    (w / "caphuman.ckpt").write_bytes(b"c" * 3000)
    (w / "Realistic_Vision_V3.0.safetensors").write_bytes(b"s" * 10)
    (w / "vae-ft-mse-840000-ema-pruned.ckpt").write_bytes(b"v" * 10)
    (w / "clip-vit-large-patch14").mkdir()
    (w / "clip-vit-large-patch14" / "vocab.json").write_text("{}")
    return w


def files_of(w):
    from caphuman.tritonserver.weights import WeightFiles
    return WeightFiles.discover(w)


def test_fingerprint_follows_the_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(ec, "SAMPLE_BYTES", 16)
    a = tmp_path / "a.ckpt"
    a.write_bytes(b"x" * 100)
    first = ec.fingerprint([a])
    assert ec.fingerprint([a]) == first and len(first) == 16
    a.write_bytes(b"y" + b"x" * 99)                     # head changed
    assert ec.fingerprint([a]) != first
    a.write_bytes(b"x" * 99 + b"y")                     # tail changed
    assert ec.fingerprint([a]) != first
    a.write_bytes(b"x" * 101)                           # size changed
    assert ec.fingerprint([a]) != first


def test_plan_exports_once_then_only_builds(tmp_path, weights):
    cache = tmp_path / "engines"
    steps = ec.plan(cache, files_of(weights), "nvidia-h100-sm90", environ={"CAPHUMAN_BUILD_ARGS": "--batch 1:1:2"})
    assert [s[0] for s in steps] == ["export", "build"]
    export, build = steps[0][1], steps[1][1]
    onnx = steps[0][2]
    assert onnx.parent == cache / "onnx"
    assert export[:4] == ["caphuman", "export", "--out", str(onnx) + ".partial"]
    assert export[export.index("--checkpoint") + 1] == str(weights / "caphuman.ckpt")
    assert export[export.index("--sd-checkpoint") + 1].endswith("Realistic_Vision_V3.0.safetensors")
    assert export[export.index("--vae-checkpoint") + 1].endswith("vae-ft-mse-840000-ema-pruned.ckpt")
    assert export[export.index("--clip-dir") + 1].endswith("clip-vit-large-patch14")
    # engines per GPU type and weight set (the builder's engines.json and timing cache are per folder)
    engines = cache / "trt" / "nvidia-h100-sm90" / onnx.name
    assert build == ["caphuman", "build", "--onnx-dir", str(onnx), "--out", str(engines), "--batch", "1:1:8",
                     "--batch", "1:1:2"]  # the serving default, then the operator's override (argparse: last wins)
    onnx.mkdir(parents=True)
    (onnx / "manifest.json").write_text("{}")
    assert [s[0] for s in ec.plan(cache, files_of(weights), "nvidia-h100-sm90", environ={})] == ["build"]
    other = ec.plan(cache, files_of(weights), "nvidia-l4-sm89", environ={})[0][1]
    assert other[other.index("--out") + 1] == str(cache / "trt" / "nvidia-l4-sm89" / onnx.name)


def test_commands_match_the_caphuman_cli(tmp_path, weights):
    """The contract with the engine builder: our command lines parse with `caphuman`'s own parser."""
    from caphuman.runtime.cli import build_parser
    parser = build_parser()
    for what, cmd, _ in ec.plan(tmp_path / "engines", files_of(weights), "gpu-sm90", environ={}):
        args = parser.parse_args(cmd[1:])
        assert args.command == what and args.out


def test_prepare_runs_the_steps_under_a_lock(tmp_path, weights, monkeypatch):
    monkeypatch.setattr(ec.importlib.util, "find_spec", lambda name: object())   # "tensorrt imports"
    ran = []

    def fake_run(cmd):
        ran.append(cmd)
        if cmd[1] == "export":
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "manifest.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, 0)

    cache, record = tmp_path / "engines", tmp_path / "engine_dir"
    gpu = lambda: "nvidia-h100-sm90"  # noqa: E731
    assert ec.prepare(cache, weights, run=fake_run, environ={}, gpu_fn=gpu, record=record) == 0
    assert [c[1] for c in ran] == ["export", "build"]
    onnx = next((cache / "onnx").iterdir())
    assert (onnx / "manifest.json").is_file() and not onnx.name.endswith(".partial")
    assert (cache / ".lock").is_file()
    assert record.read_text().strip() == str(cache / "trt" / "nvidia-h100-sm90" / onnx.name)
    ran.clear()
    assert ec.prepare(cache, weights, run=fake_run, environ={}, gpu_fn=gpu) == 0
    assert [c[1] for c in ran] == ["build"]                  # exported graphs reused


def test_prepare_stops_on_a_failed_export(tmp_path, weights, monkeypatch):
    monkeypatch.setattr(ec.importlib.util, "find_spec", lambda name: object())
    cache = tmp_path / "engines"
    record = tmp_path / "engine_dir"
    rc = ec.prepare(cache, weights, run=lambda cmd: subprocess.CompletedProcess(cmd, 3), environ={},
                    gpu_fn=lambda: "g-sm90", record=record)
    assert rc == 3 and not record.exists()
    assert not [p for p in (cache / "onnx").glob("*") if not p.name.endswith(".partial")]


def test_prepare_skips_with_a_reason(tmp_path, weights, monkeypatch, capsys):
    never = lambda cmd: pytest.fail("nothing should run")  # noqa: E731
    assert ec.prepare(tmp_path / "e", None, run=never, environ={}) == 0
    assert "no caphuman.ckpt" in capsys.readouterr().out
    assert ec.prepare(tmp_path / "e", weights, run=never, environ={"CAPHUMAN_BUILD_ENGINES": "false"}) == 0
    assert "CAPHUMAN_BUILD_ENGINES=0" in capsys.readouterr().out
    monkeypatch.setattr(ec.importlib.util, "find_spec", lambda name: object())
    assert ec.prepare(tmp_path / "e", weights, run=never, environ={}, gpu_fn=lambda: None) == 0
    assert "no CUDA GPU visible" in capsys.readouterr().out
    monkeypatch.setattr(ec.importlib.util, "find_spec", lambda name: None)
    assert ec.prepare(tmp_path / "e", weights, run=never, environ={}, gpu_fn=lambda: None) == 0
    assert "no CUDA GPU visible" in capsys.readouterr().out


def test_without_tensorrt_the_torch_artifacts_are_built(tmp_path, weights, monkeypatch, capsys):
    """No TensorRT, a GPU: the torch engine serves, so the engine step builds its compiled artifacts (a command
    `caphuman`'s own parser takes) into a folder per GPU type and records it for the models."""
    from caphuman.runtime.cli import build_parser
    monkeypatch.setattr(ec.importlib.util, "find_spec", lambda name: None)
    ran, record = [], tmp_path / "engine_dir"
    assert ec.prepare(tmp_path / "e", weights, run=lambda cmd: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0),
                      environ={"CAPHUMAN_TORCH_BUILD_ARGS": "--resolutions 512,768"}, gpu_fn=lambda: "nvidia-h200-sm90",
                      record=record) == 0
    assert "TensorRT does not import" in capsys.readouterr().out
    (cmd,) = ran
    args = build_parser().parse_args(cmd[1:])
    assert (args.command, args.backend, args.batch_sizes, args.resolutions) == ("build", "torch", "1,2,4,8", "512,768")
    assert args.weights == str(weights) and args.out == str(tmp_path / "e" / "torch" / "nvidia-h200-sm90")
    assert record.read_text().strip() == args.out


def test_gpu_tag_names_the_device(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    assert ec.gpu_tag() == "nvidia-h100-80gb-hbm3-sm90"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ec.gpu_tag() is None


def test_engine_cache_cli_without_weights(tmp_path):
    r = subprocess.run([sys.executable, "-m", "caphuman.tritonserver.deploy.engine_cache", "--cache", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "CAPHUMAN_WEIGHTS": ""})
    assert r.returncode == 0 and "skipped" in r.stdout, r.stderr
