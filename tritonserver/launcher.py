"""Start, watch and stop a Triton Inference Server on our model repository.

Two server builds serve the same repository unchanged:

* the `tritonserver` binary bundled in the `nvidia-pytriton` wheel (default here; CPU machines, CI): its
  Python backend needs a stub built for the running Python version, which we place in a private backend
  directory, and the wheel's bundled libraries on LD_LIBRARY_PATH;
* the NGC container's `/opt/tritonserver/bin/tritonserver` (production): pass it as `binary`; it finds its
  own backends.

The Python backend stub runs our model.py files with the interpreter environment of the `python3` first
on PATH, so we put this interpreter's bin directory first: the models then import `runtime` and
`tritonserver` from the same installation as the launcher. That environment needs numpy<2 (the stub
was built against numpy 1.x; with numpy 2 outputs come back empty).
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from caphuman.export.extras import install_hint

log = logging.getLogger(__name__)

DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parent / "model_repository"
WEIGHTS_ENV = "CAPHUMAN_WEIGHTS"          # folder of official weights, read by every model's initialize()
SETTINGS_ENV = "CAPHUMAN_SERVE_SETTINGS"  # JSON overrides of tritonserver/params.py server settings (tests)
ADMIN_KEY_ENV = "CAPHUMAN_ADMIN_KEY"      # the admin header's value; unset: a random one per start (admin APIs off)
# Triton APIs no client of ours needs: loading/unloading models, log and trace settings, shared-memory
# registration, statistics. They answer only requests carrying ADMIN_HEADER: ADMIN_KEY_ENV's value (HTTP
# 403 / gRPC UNAVAILABLE otherwise). Health, metadata, model config and inference stay open. The container's
# entrypoint.sh passes the same list (tests/tritonserver/test_deploy_runtime.py checks it).
ADMIN_APIS = "model-repository,logging,trace,shared-memory,statistics"
ADMIN_HEADER = "caphuman-admin-key"
LOOPBACK = "127.0.0.1"
WILDCARDS = ("0.0.0.0", "::")


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it resolves beyond this machine
        return False


class LaunchError(RuntimeError):
    """The server could not be found, started, or did not become ready."""


@dataclass(frozen=True)
class WheelServer:
    binary: Path
    backends: Path      # the wheel's backends/ (python backend without a stub)
    stubs: Path         # python_backend_stubs/<major.minor>/triton_python_backend_stub
    libs: Path          # nvidia_pytriton.libs
    caches: Path


def wheel_server() -> WheelServer:
    """Locate the tritonserver bundled in the nvidia-pytriton wheel (`pip install nvidia-pytriton`)."""
    try:
        import pytriton  # noqa: F401  (only to find the wheel's files; its launcher is not used)
    except ImportError as e:
        raise LaunchError("no tritonserver given and the nvidia-pytriton wheel is not installed: "
                          f"{install_hint('serve')}, or pass --tritonserver /opt/tritonserver/bin/tritonserver") from e
    root = Path(pytriton.__file__).resolve().parent
    ts = root / "tritonserver"
    server = WheelServer(ts / "bin" / "tritonserver", ts / "backends", ts / "python_backend_stubs",
                         root.parent / "nvidia_pytriton.libs", ts / "caches")
    if not server.binary.is_file():
        raise LaunchError(f"the nvidia-pytriton wheel has no tritonserver binary at {server.binary}")
    return server


def _libpython_dir() -> str | None:
    """This interpreter's libpython folder: the stub must link the same libpython as our environment
    (else it may pick the system's and miss our site-packages)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlib = sysconfig.get_config_var("LDLIBRARY")
    return libdir if libdir and ldlib and (Path(libdir) / ldlib).exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (.*)")
_UNAVAILABLE = re.compile(r"^\|\s*(\S+)\s*\|\s*\d+\s*\|\s*UNAVAILABLE: (.*?)\s*\|\s*$")


def first_error_in_log(text: str) -> str:
    """The first real error of a tritonserver log, in one line: the first model that failed to load and
    why (its Python exception, without the stack frames), else the first UNAVAILABLE row of the model
    table, else the server's own last 'error:' line, else the log's last line."""
    lines = text.splitlines()
    for line in lines:
        m = _LOAD_FAILURE.search(line)
        if m:
            reason = m.group(2).split("\\n\\nAt:")[0].split("\\n")[0].rstrip('"').removeprefix("Internal: ")
            return f"model '{m.group(1)}' failed to load: {reason}"
    for line in lines:
        m = _UNAVAILABLE.match(line)
        if m:
            return f"model '{m.group(1)}' failed to load: {m.group(2).removeprefix('Internal: ')}"
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1]
    return lines[-1].strip() if lines else "the server wrote no log"


@dataclass
class ServerConfig:
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    binary: Path | None = None          # None: the wheel's tritonserver
    weights: Path | None = None         # None: tiny random-weight models
    host: str = LOOPBACK                # HTTP, gRPC and metrics; "0.0.0.0" opens them to the network
    admin_key: str | None = None        # None: ADMIN_KEY_ENV, else a random key nobody knows
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    log_file: Path | None = None        # None: a file in the work directory
    log_to_stdout: bool = False         # also copy the server's log to this process's stdout (containers)
    exit_timeout: int = 30              # seconds tritonserver gets at stop to finish in-flight requests
    verbose: int = 0
    extra_env: dict = field(default_factory=dict)
    extra_args: list = field(default_factory=list)


class TritonServer:
    """One tritonserver process. Use as a context manager, or start()/wait_ready()/stop()."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.proc: subprocess.Popen | None = None
        # tritonserver's own gRPC and HTTP ports: loopback only, behind the gateway on the public ones
        self.upstream_grpc_port = free_port()
        self.upstream_http_port = free_port()
        self.gateway = None
        self.workdir = Path(tempfile.mkdtemp(prefix="caphuman-triton-"))
        self.log_path = Path(config.log_file) if config.log_file else self.workdir / "tritonserver.log"
        self._log_handle = None
        self._log_copier: threading.Thread | None = None
        self.failed = False

    # -- endpoints ---------------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        host = self.config.host
        local = LOOPBACK if host in WILDCARDS or host == "localhost" else f"[{host}]" if ":" in host else host
        return f"{local}:{self.config.grpc_port}"

    @property
    def public(self) -> bool:
        """Whether the ports listen beyond this machine."""
        return not is_loopback(self.config.host)

    def endpoints(self) -> dict[str, str]:
        """What a client on this machine calls (the banner says separately who else can reach it)."""
        host = "localhost" if self.config.host in WILDCARDS or is_loopback(self.config.host) else self.config.host
        return {"grpc": f"{host}:{self.config.grpc_port}", "http": f"http://{host}:{self.config.http_port}",
                "metrics": f"http://{host}:{self.config.metrics_port}/metrics"}

    # -- command line ------------------------------------------------------------------------------
    def _wheel_backend_dir(self, server: WheelServer) -> Path:
        """backends/python from the wheel plus the stub for this Python version (as the wheel expects)."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = server.stubs / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise LaunchError(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
        dst = self.workdir / "backends" / "python"
        dst.mkdir(parents=True, exist_ok=True)
        for f in server.backends.joinpath("python").iterdir():
            if f.is_file():
                shutil.copy2(f, dst / f.name)
        shutil.copy2(stub, dst / "triton_python_backend_stub")
        return dst.parent

    def command(self) -> tuple[list[str], dict[str, str]]:
        cfg = self.config
        repo = Path(cfg.model_repository).resolve()
        if not repo.is_dir():
            raise LaunchError(f"model repository not found: {repo}")
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        args: list[str] = []
        if cfg.binary is None:
            server = wheel_server()
            binary = server.binary
            args += [f"--backend-directory={self._wheel_backend_dir(server)}",
                     f"--cache-directory={server.caches}"]
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (_libpython_dir(), env.get("LD_LIBRARY_PATH"), str(server.libs)) if p)
        else:
            binary = Path(cfg.binary)
            if not binary.is_file():
                raise LaunchError(f"tritonserver binary not found: {binary}")
        if cfg.weights is not None:
            weights = Path(cfg.weights).resolve()
            if not weights.is_dir():
                raise LaunchError(f"--weights must be a folder of official weight files, got {weights}")
            env[WEIGHTS_ENV] = str(weights)
        else:
            env.pop(WEIGHTS_ENV, None)
        env.update({k: str(v) for k, v in cfg.extra_env.items()})
        admin_key = cfg.admin_key or os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(24)
        args = [str(binary), f"--model-repository={repo}", *args,
                f"--grpc-address={LOOPBACK}", f"--grpc-port={self.upstream_grpc_port}",
                f"--http-address={LOOPBACK}", f"--http-port={self.upstream_http_port}",
                "--allow-metrics=true", f"--metrics-address={cfg.host}", f"--metrics-port={cfg.metrics_port}",
                f"--http-restricted-api={ADMIN_APIS}:{ADMIN_HEADER}={admin_key}",
                f"--grpc-restricted-protocol={ADMIN_APIS}:{ADMIN_HEADER}={admin_key}",
                f"--log-verbose={cfg.verbose}", "--exit-on-error=true", f"--exit-timeout-secs={cfg.exit_timeout}",
                "--strict-readiness=true", *cfg.extra_args]
        return args, env

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "TritonServer":
        """Start tritonserver, and the gateway on the public ports unless it already listens (a restart)."""
        args, env = self.command()
        if self.gateway is None:
            self.gateway = self._gateway(env)
        log.debug("starting %s", " ".join(args))
        self._log_handle = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE if self.config.log_to_stdout
                                     else self._log_handle, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        if self.config.log_to_stdout:
            self._log_copier = threading.Thread(target=self._copy_log, args=(self.proc.stdout, self._log_handle),
                                                name="tritonserver-log", daemon=True)
            self._log_copier.start()
        return self

    @staticmethod
    def _copy_log(source, log_file) -> None:
        """The server's output, line by line, to the log file (first_error reads it) and to stdout."""
        for line in source:
            log_file.write(line)
            log_file.flush()
            sys.stdout.buffer.write(line)
            sys.stdout.flush()

    def _gateway(self, env: dict[str, str]):
        from caphuman.tritonserver.gateway import Gateway
        from caphuman.tritonserver.params import ServerSettings
        try:
            settings = ServerSettings.from_env(env)  # the models read the same limits from the same variable
            return Gateway(self.config.host, self.config.grpc_port, self.config.http_port, self.upstream_grpc_port,
                           self.upstream_http_port, settings.max_request_bytes).start()
        except (OSError, ValueError) as e:
            raise LaunchError(str(e)) from None

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def first_error(self) -> str:
        """The server log's first real error, in one line (see `first_error_in_log`)."""
        try:
            return first_error_in_log(self.log_path.read_text(errors="replace"))
        except OSError:
            return f"no server log at {self.log_path}"

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- self-healing ------------------------------------------------------------------------------
    def stubs(self) -> dict[int, tuple[str, str]]:
        """The Python-backend stub processes of this server: pid -> (model instance, shared-memory region).
        Triton does not replace a stub that died (kill -9, OOM killer): its instance then fails every
        request while the server still reports ready, so `caphuman serve` watches them."""
        found = {}
        if self.proc is None:
            return found
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) != self.proc.pid or fields[0] == "Z":  # fields: state, ppid, ...
                    continue
                argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            if argv and argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 8:
                found[int(stat.parent.name)] = (argv[8].decode(), argv[2].decode())  # argv: stub, model.py, shm region, ..., instance
        return found

    def watch_stubs(self) -> None:
        """Remember the stubs of a ready server (call after wait_ready)."""
        self._stubs = self.stubs()

    def dead_stubs(self) -> list[str]:
        """The model instances whose stub process has died since `watch_stubs`."""
        alive = self.stubs()
        return sorted(name for pid, (name, _) in getattr(self, "_stubs", {}).items() if pid not in alive)

    def restart(self, ready_timeout: float) -> None:
        """Stop the server (SIGKILL soon: with a dead stub Triton's own shutdown hangs), remove the shared
        memory regions of ITS stubs (other servers' regions on this machine are left alone), start it
        again and wait until it is ready and warm."""
        regions = {shm for _, shm in getattr(self, "_stubs", {}).values()} | {shm for _, shm in self.stubs().values()}
        self._stop(timeout=10)
        self._remove_shm(regions)
        self.start()
        self.wait_ready(ready_timeout)
        self.watch_stubs()

    @staticmethod
    def _remove_shm(regions) -> None:
        for region in regions:
            if region.startswith("triton_python_backend_shm_region_") and "/" not in region:
                Path("/dev/shm", region).unlink(missing_ok=True)

    def is_ready(self) -> bool:
        import tritonclient.grpc as grpcclient
        try:
            with grpcclient.InferenceServerClient(f"{LOOPBACK}:{self.upstream_grpc_port}") as c:
                return bool(c.is_server_ready(client_timeout=2))
        except Exception:  # noqa: BLE001 (not up yet: connection refused, timeout, ...)
            return False

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_alive():
                self.failed = True
                raise LaunchError(f"tritonserver exited with status {self.proc.returncode if self.proc else '?'} "
                                  f"before becoming ready: {self.first_error()} (full log: {self.log_path})")
            if self.is_ready():
                return
            time.sleep(0.5)
        self.failed = True
        raise LaunchError(f"tritonserver not ready after {timeout:.0f} s: {self.first_error()} "
                          f"(full log: {self.log_path})")

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (Triton's graceful shutdown: finish in-flight requests, unload models), then SIGKILL.
        The work folder goes too, except a log in it after a failed start (the error message names it)."""
        regions = {shm for _, shm in self.stubs().values()}
        try:
            return self._stop(self.config.exit_timeout + 10 if timeout is None else timeout)
        finally:
            if self.gateway is not None:
                self.gateway.stop()
                self.gateway = None
            self._remove_shm(regions)  # Triton removes them itself, except after a SIGKILL
            keep_log = self.failed and self.log_path.parent == self.workdir
            shutil.rmtree(self.workdir / "backends" if keep_log else self.workdir, ignore_errors=True)

    def _stop(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0f s; killing it", timeout)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._log_copier is not None:
            self._log_copier.join(10)  # it ends at the end of the server's output
            self._log_copier = None
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None
        return self.proc.returncode

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
