"""`caphuman serve` is private by default: every port listens on loopback only, the banner says so, and
Triton's admin APIs (here: POST /v2/logging) refuse requests without the admin header.

The server runs on an empty model repository: what is checked is the server's sockets and flags, not the
models (tests/tritonserver/test_serving_server.py loads those)."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from caphuman.tritonserver.launcher import free_port
from tests.tritonserver.serve_process import CAPHUMAN, read_rest, read_until
from tests.paths import ROOT

pytest.importorskip("pytriton", reason="nvidia-pytriton (bundled tritonserver) not installed")



def listening(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses with a listening TCP socket on `port` (what `ss -ltn` shows), from /proc/net/tcp{,6}."""
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                continue
            # the kernel prints each 32-bit word of the address in host (little-endian) byte order
            raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, width, 8))
            ip = ipaddress.ip_address(raw)
            found.append(ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip)
    return found


def listening_sockets_of(pids: list[int]) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of every listening TCP socket the processes `pids` hold (what `ss -ltnp` shows them)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in open(table).read().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:
                continue
            addr, hexport = cols[1].split(":")
            raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, width, 8))
            ip = ipaddress.ip_address(raw)
            found.append((ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip, int(hexport, 16)))
    return found


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def test_listening_parser_reads_this_process_socket():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert listening(s.getsockname()[1]) == [ipaddress.ip_address("127.0.0.1")]


def test_caphuman_serve_listens_on_loopback_only_and_restricts_admin_apis(tmp_path):
    repo = tmp_path / "empty_repository"
    repo.mkdir()
    temp = tmp_path / "tmp"
    temp.mkdir()
    ports = [free_port() for _ in range(3)]
    env = {k: v for k, v in os.environ.items() if k != "CAPHUMAN_ADMIN_KEY"}
    proc = subprocess.Popen([*CAPHUMAN, "serve", "--model-repository", str(repo),  # no --host: the default
                             "--grpc-port", str(ports[0]), "--http-port", str(ports[1]),
                             "--metrics-port", str(ports[2])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**env, "TMPDIR": str(temp)})
    lines: list[str] = []
    try:
        read_until(proc, "Ctrl-C stops", lines, 120)
        text = "".join(lines)
        assert "Ctrl-C stops" in text, text
        assert "listening on 127.0.0.1 only" in text, text
        for port in ports:
            addrs = listening(port)
            assert addrs, f"nothing listens on {port}"
            assert all(a.is_loopback for a in addrs), f"port {port} listens on {addrs}"
        # every listener of serve and its tritonserver (the gateway's and tritonserver's own, behind it)
        sockets = listening_sockets_of(process_tree(proc.pid))
        assert {port for _, port in sockets} >= set(ports) and len(sockets) >= 5, sockets
        assert all(a.is_loopback for a, _ in sockets), sockets
        ready = urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v2/health/ready", timeout=10)
        assert ready.status == 200
        logging_api = urllib.request.Request(f"http://127.0.0.1:{ports[1]}/v2/logging",
                                             data=b'{"log_verbose_level": 1}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(logging_api, timeout=10)
        assert refused.value.code == 403
        proc.send_signal(signal.SIGINT)
        out = read_rest(proc, lines, 60)
        assert proc.returncode == 0, text + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = [p.name for p in temp.iterdir() if p.name.startswith("caphuman")]
    assert left == [], f"serve left {left} in its temporary folder"
