"""`caphuman serve` heals: when a model's Python-backend process dies (kill -9, the OOM killer), Triton keeps
reporting ready while that instance fails every request; serve sees the stub gone, restarts tritonserver
(removing that server's shared-memory regions), and serves again."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from caphuman.tritonserver.launcher import free_port
from tests.paths import ROOT, face_photo
from tests.tritonserver.serve_process import CAPHUMAN, read_until

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")
pytest.importorskip("pytriton", reason="nvidia-pytriton (bundled tritonserver) not installed")

from caphuman.tritonserver.client import CapHumanClient  # noqa: E402



def children(pid: int) -> dict[int, list[str]]:
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError, IndexError):
            pass
    return out


def test_a_killed_model_process_is_replaced_and_the_service_comes_back(tmp_path):
    ports = [free_port() for _ in range(3)]
    proc = subprocess.Popen([*CAPHUMAN, "serve", "--grpc-port", str(ports[0]), "--http-port", str(ports[1]),
                             "--metrics-port", str(ports[2]), "--log-file", str(tmp_path / "serve.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[str] = []
    client = CapHumanClient(f"127.0.0.1:{ports[0]}", timeout=120)
    ref = face_photo("reference_196251.png")
    try:
        read_until(proc, "Ctrl-C stops", lines, 300)
        assert client.generate(ref, "a photo", steps=2, resolution=256)
        (triton,) = [pid for pid, argv in children(proc.pid).items() if argv[0].endswith("tritonserver")]
        stubs = {pid: argv for pid, argv in children(triton).items() if argv[0].endswith("triton_python_backend_stub")}
        victim = next(pid for pid, argv in stubs.items() if "/caphuman/1/model.py" in argv[1])
        region = Path("/dev/shm") / stubs[victim][2]
        assert region.exists()
        import os
        os.kill(victim, signal.SIGKILL)
        read_until(proc, "model instance(s) caphuman_", lines, 30)
        read_until(proc, "ready again", lines, 300)
        assert not region.exists(), "the dead stub's shared memory is removed"
        for _ in range(3):  # every instance answers again (two caphuman instances on the CPU)
            images = client.generate(ref, "a photo", steps=2, resolution=256)
            assert images and images[0].image.shape == (256, 256, 3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
