"""The container's health check: tritonserver answers AND none of its model processes has died.

Triton's Python backend runs each model instance in a stub process and does not replace one that dies
(kill -9, the OOM killer): /v2/health/live and /v2/health/ready stay 200 while that instance fails every
request it gets ("Stub process ... is not healthy"). Triton reaps a stub only when it unloads the model, so
a dead one stays a zombie child of tritonserver; this check fails on such a zombie, and the orchestrator
restarts the container (Kubernetes: the liveness probe). `caphuman serve` heals the same failure itself
(launcher.TritonServer.dead_stubs).

    python3 -m caphuman.tritonserver.deploy.liveness            # live: exit 0, else 1 and the reason
    python3 -m caphuman.tritonserver.deploy.liveness --ready    # ready (Docker HEALTHCHECK)

Standard library only: it runs every few seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path

STUB_COMM = "triton_python_b"   # the kernel's 15-character name of triton_python_backend_stub (kept by zombies)
SERVER_COMM = "tritonserver"


def _stat(pid_dir: Path) -> tuple[str, str, int] | None:
    """(name, state, parent pid) of a /proc/PID folder, None if it is gone."""
    try:
        text = (pid_dir / "stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return name, fields[0], int(fields[1])


def dead_stubs(server: int | None = None, proc: Path = Path("/proc")) -> list[int]:
    """Pids of dead (zombie) Python-backend stubs of the tritonserver `server` (None: of any tritonserver
    this process sees; in a container, its own)."""
    stats = {int(d.name): s for d in proc.glob("[0-9]*") if (s := _stat(d)) is not None}
    return sorted(pid for pid, (name, state, ppid) in stats.items()
                  if name == STUB_COMM and state == "Z" and (ppid == server if server is not None
                                                             else stats.get(ppid, ("",))[0] == SERVER_COMM))


def check(url: str, endpoint: str, timeout: float, server: int | None = None) -> str | None:
    """None when healthy, else why not."""
    dead = dead_stubs(server)
    if dead:
        return (f"model instance process(es) {', '.join(map(str, dead))} died; Triton does not replace them "
                "(their instances fail every request): restart the server")
    try:
        with urllib.request.urlopen(f"{url}/v2/health/{endpoint}", timeout=timeout) as r:
            if r.status != 200:
                return f"/v2/health/{endpoint} answered {r.status}"
    except OSError as e:  # refused, timed out, HTTP 4xx/5xx (HTTPError)
        return f"/v2/health/{endpoint}: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m caphuman.tritonserver.deploy.liveness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('TRITON_HTTP_PORT', '8000')}",
                   help="tritonserver's HTTP endpoint (default: this container's, TRITON_HTTP_PORT)")
    p.add_argument("--ready", action="store_true", help="check readiness instead of liveness")
    p.add_argument("--timeout", type=float, default=4.0, help="seconds for the HTTP check")
    p.add_argument("--pid", type=int, default=None,
                   help="the tritonserver's process id (default: every tritonserver visible; in a container, its own)")
    args = p.parse_args(argv)
    why = check(args.url.rstrip("/"), "ready" if args.ready else "live", args.timeout, args.pid)
    if why:
        print(f"unhealthy: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
