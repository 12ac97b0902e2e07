"""What operators see of a real server (the bundled tritonserver, tiny random-weight models, on the CPU):

* refused requests count as failures at /metrics (caphuman_requests_failed_total): Triton's own
  nv_inference_request_success counts them as successes (a decoupled model answers errors through its
  response sender);
* the container's health check (tritonserver/deploy/liveness.py, the Kubernetes liveness probe) fails once
  a model's Python process has died, while Triton's /v2/health/live and /ready still answer 200.

One server for the module; the stub-killing test runs last (the server is broken after it)."""
from __future__ import annotations

import os
import re
import signal
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")
pytest.importorskip("pytriton", reason="nvidia-pytriton (bundled tritonserver) not installed")

from caphuman.tritonserver.backend import FAILURES_METRIC  # noqa: E402
from caphuman.tritonserver.client import CapHumanClient, ServerError  # noqa: E402
from caphuman.tritonserver.deploy import liveness  # noqa: E402
from caphuman.tritonserver.launcher import ServerConfig, TritonServer, free_port  # noqa: E402
from tests.paths import face_photo  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = ServerConfig(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                       log_file=tmp_path_factory.mktemp("triton") / "tritonserver.log")
    srv = TritonServer(cfg)
    srv.start()
    try:
        srv.wait_ready(timeout=300)
        yield srv
    finally:
        srv.stop(timeout=10)  # with a dead stub Triton's graceful shutdown hangs: SIGKILL soon


def metric(server, name: str, **labels) -> float | None:
    for _ in range(50):  # Triton opens the metrics port just after the gRPC port that said ready
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.config.metrics_port}/metrics", timeout=10) as r:
                text = r.read().decode()
            break
        except urllib.error.URLError:
            time.sleep(0.2)
    for line in text.splitlines():
        m = re.match(rf"{name}{{(.*)}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None


def test_refused_requests_are_counted_as_failures(server):
    client = CapHumanClient(server.grpc_url, timeout=120)
    ref = face_photo("reference_196251.png")
    before = metric(server, FAILURES_METRIC, model="caphuman", reason="invalid_request")
    assert before == 0, f"{FAILURES_METRIC} missing or not 0 at start: {before}"
    for fields in ({"steps": 0}, {"resolution": 100}):
        with pytest.raises(ServerError) as e:
            client.generate(ref, "a photo", **fields)
        assert e.value.bad_request
    assert client.generate(ref, "a photo", steps=2, resolution=256)  # a good one is not counted
    assert metric(server, FAILURES_METRIC, model="caphuman", reason="invalid_request") == 2
    assert metric(server, FAILURES_METRIC, model="caphuman", reason="internal") == 0


def test_the_health_check_fails_once_a_model_process_died(server, capsys):
    url = f"http://127.0.0.1:{server.config.http_port}"
    args = ["--url", url, "--pid", str(server.proc.pid)]
    assert liveness.main(args) == 0 and liveness.main([*args, "--ready"]) == 0
    victim = next(pid for pid, (name, _) in server.stubs().items() if name.startswith("caphuman_"))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while victim not in liveness.dead_stubs(server.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    # what the old httpGet probes saw: all well
    for endpoint in ("live", "ready"):
        with urllib.request.urlopen(f"{url}/v2/health/{endpoint}", timeout=5) as r:
            assert r.status == 200
    capsys.readouterr()
    assert liveness.main(args) == 1 and liveness.main([*args, "--ready"]) == 1
    assert f"model instance process(es) {victim} died" in capsys.readouterr().err
    # another server's stubs are not this one's business
    assert liveness.dead_stubs(server.proc.pid + 10**7) == []


def test_the_health_check_fails_when_the_server_does_not_answer(capsys):
    assert liveness.main(["--url", f"http://127.0.0.1:{free_port()}", "--pid", "0"]) == 1
    assert "/v2/health/live" in capsys.readouterr().err
