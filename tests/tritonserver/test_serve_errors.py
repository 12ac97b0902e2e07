"""`caphuman serve` when the server cannot load a model: the first real error in one line (not the model
table or stack frames), and no temporary folder left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from caphuman.tritonserver.launcher import first_error_in_log, free_port
from tests.paths import ROOT

CAPHUMAN = [sys.executable, "-c", "import sys; from caphuman.runtime.cli import main; sys.exit(main())"]

# Lines of a real tritonserver 2.x log (nvidia-pytriton wheel) whose models raised in initialize().
FAILED_LOG = r'''I1205 03:16:05.401 31105 model_lifecycle.cc:473] "loading: identity:1"
E1205 03:16:05.470219 31105 backend_model.cc:692] "ERROR: Failed to create instance: TritonModelException: head_condition: boom\n\nAt:\n  /x/backend.py(44): model_setup\n"
E1205 03:16:05.470378 31105 model_lifecycle.cc:642] "failed to load 'head_condition' version 1: Internal: TritonModelException: head_condition: boom\n\nAt:\n  /x/backend.py(44): model_setup\n  /x/model.py(19): initialize\n"
+----------------+---------+--------------------------------------------------+
| Model          | Version | Status                                           |
+----------------+---------+--------------------------------------------------+
| head_condition | 1       | UNAVAILABLE: Internal: TritonModelException: head_condition: boom |
+----------------+---------+--------------------------------------------------+
error: creating server: Internal - failed to load all models
'''


def test_first_error_is_the_models_exception_without_stack_frames():
    assert first_error_in_log(FAILED_LOG) == "model 'head_condition' failed to load: TritonModelException: head_condition: boom"
    table_only = "\n".join(line for line in FAILED_LOG.splitlines() if "failed to load '" not in line)
    assert first_error_in_log(table_only) == "model 'head_condition' failed to load: TritonModelException: head_condition: boom"
    assert first_error_in_log("I starting\nerror: creating server: x\n") == "error: creating server: x"


def test_caphuman_serve_prints_the_first_real_error_and_leaves_no_temp_folder(tmp_path):
    pytest.importorskip("pytriton", reason="nvidia-pytriton (bundled tritonserver) not installed")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "CAPHUMAN_BACKEND": "bogus_backend"}  # the caphuman model's init fails
    ports = [str(free_port()) for _ in range(3)]
    out = subprocess.run([*CAPHUMAN, "serve", "--host", "127.0.0.1", "--grpc-port", ports[0], "--http-port", ports[1],
                          "--metrics-port", ports[2], "--log-file", str(tmp_path / "serve.log"), "--ready-timeout", "240"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, out.stderr
    assert "failed to load: TritonModelException" in err[0] and "bogus_backend" in err[0], err[0]
    assert "At:" not in err[0] and "+----" not in out.stderr and str(tmp_path / "serve.log") in err[0]
    ours = [p.name for p in temp.iterdir() if p.name.startswith("caphuman")]  # (torch's own caches may appear)
    assert ours == [], f"left behind: {ours}"


def test_caphuman_serve_refuses_bad_settings_before_starting_the_server(tmp_path):
    """The gateway reads the same limits as the models: bad settings stop serve before tritonserver starts."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton (bundled tritonserver) not installed")
    env = {**os.environ, "CAPHUMAN_SERVE_SETTINGS": json.dumps({"bogus_key": 1})}
    ports = [str(free_port()) for _ in range(3)]
    out = subprocess.run([*CAPHUMAN, "serve", "--grpc-port", ports[0], "--http-port", ports[1], "--metrics-port",
                          ports[2]], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        "caphuman serve: error: CAPHUMAN_SERVE_SETTINGS: unknown keys ['bogus_key']; known: " + str(sorted(
            ["hint_cache_entries", "identity_cache_entries", "max_image_bytes", "max_image_pixels", "max_items",
             "max_prompt_bytes", "max_request_bytes", "max_request_cost"]))]
