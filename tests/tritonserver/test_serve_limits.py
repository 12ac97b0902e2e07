"""An oversized request is refused before the server reads it, and costs the server no memory.

`caphuman serve` (tiny random-weight models) is sent a 100 MiB gRPC request and a 100 MiB HTTP request. The
gateway in front of tritonserver refuses both from their declared length: the peak memory of the serve
process (the gateway) and of tritonserver grows by far less than the request, the memory of the whole server
(gateway, tritonserver, model processes) returns to within 10% of its level before, and the next request
is served."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton (bundled tritonserver) not installed (pip install -e '.[serve]')")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed (pip install -e '.[serve]')")

from caphuman.tritonserver.client import CapHumanClient, ServerError  # noqa: E402
from caphuman.tritonserver.launcher import free_port  # noqa: E402
from tests.paths import ROOT, face_photo  # noqa: E402
from tests.tritonserver.serve_process import CAPHUMAN, read_rest, read_until  # noqa: E402

HUGE = 100 << 20
FAST = dict(steps=2, resolution=256)


def _status_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (the serve process, tritonserver, the model processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _tree_rss_kib(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        try:
            total += _status_kib(p).get("VmRSS", 0)
        except OSError:
            pass
    return total


def _tritonserver(pid: int) -> int:
    for p in _tree(pid):
        try:
            if Path(f"/proc/{p}/comm").read_text().strip() == "tritonserver":
                return p
        except OSError:
            pass
    raise AssertionError("no tritonserver process under caphuman serve")


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    ports = [free_port() for _ in range(3)]
    proc = subprocess.Popen([*CAPHUMAN, "serve", "--grpc-port", str(ports[0]), "--http-port", str(ports[1]),
                             "--metrics-port", str(ports[2])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "TMPDIR": str(tmp_path_factory.mktemp("tmp"))})
    lines: list[str] = []
    try:
        read_until(proc, "Ctrl-C stops", lines, 300)
        yield proc, ports
        proc.send_signal(signal.SIGINT)
        read_rest(proc, lines, 90)
        assert proc.returncode == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_100_mib_request_is_refused_unread_and_memory_returns(serve):
    proc, (grpc_port, http_port, _) = serve
    client = CapHumanClient(f"127.0.0.1:{grpc_port}", timeout=300)
    photo = face_photo("reference_196251.png").read_bytes()
    client.generate(photo, "a photo of a person", seed=1, **FAST)  # warm: every model has run once
    triton = _tritonserver(proc.pid)
    before_tree = _tree_rss_kib(proc.pid)
    before_gateway, before_triton = _status_kib(proc.pid)["VmHWM"], _status_kib(triton)["VmHWM"]

    with pytest.raises(ServerError) as refused:
        client.generate(os.urandom(HUGE), "a photo of a person", seed=1, **FAST)
    assert refused.value.status == "StatusCode.RESOURCE_EXHAUSTED"
    assert "larger than max" in str(refused.value) and "max_request_bytes" in str(refused.value)

    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
    conn.putrequest("POST", "/v2/models/caphuman/infer")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(HUGE))
    conn.endheaders()  # the body is never sent: the answer must come from the length alone
    answer = conn.getresponse()
    assert answer.status == 413
    assert "over this server's limit" in json.loads(answer.read())["error"]
    conn.close()

    # A request read in full would raise a peak by at least its 100 MiB (tritonserver: more, it copies it).
    grew_gateway = _status_kib(proc.pid)["VmHWM"] - before_gateway
    grew_triton = _status_kib(triton)["VmHWM"] - before_triton
    assert grew_gateway < 32 * 1024, f"the gateway's peak memory grew by {grew_gateway} KiB"
    assert grew_triton < 8 * 1024, f"tritonserver's peak memory grew by {grew_triton} KiB: it read the request"
    after_tree = _tree_rss_kib(proc.pid)
    assert abs(after_tree - before_tree) <= 0.10 * before_tree, (before_tree, after_tree)

    again = client.generate(photo, "a photo of a person", seed=1, **FAST)
    assert again[0].image.shape == (256, 256, 3)

