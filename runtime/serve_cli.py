"""`caphuman serve`: run NVIDIA Triton Inference Server on the CapHuman-RT model repository."""
from __future__ import annotations

import logging
import os
import shlex
import signal
import time
from pathlib import Path

from .cli import HelpFormatter

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve CapHuman over gRPC with NVIDIA Triton Inference Server",
        formatter_class=HelpFormatter,
        description="Start tritonserver on the CapHuman-RT model repository (models: caphuman, identity, "
                    "head_condition), wait until every model is loaded and warm, print the endpoints, and run "
                    "until Ctrl-C. Without --weights the models are tiny and have random weights (a demo). "
                    "Needs the serve extra: pip install -e '.[serve]'.")
    p.add_argument("--model-repository", type=Path, default=None,
                   help="model repository (default: the packaged tritonserver/model_repository)")
    p.add_argument("--weights", type=Path, default=None,
                   help="folder of official weight files (caphuman.ckpt, FaceNet, BiSeNet, ...; see docs/serving.md)")
    p.add_argument("--random-config", choices=["cldm_tiny", "cldm_v15"], default="cldm_tiny",
                   help="without --weights: the size of the random-weight networks (cldm_v15: the official sizes, "
                        "for benchmarks on a GPU)")
    p.add_argument("--backend", choices=("auto", "eager", "torch", "onnxruntime", "tensorrt", "tensorrt-rtx"), default=None,
                   help="the caphuman model's denoiser backend (default: its config.pbtxt, 'auto': TensorRT engines "
                        "of --engine-dir where TensorRT runs, the torch engine on CUDA, eager on the CPU)")
    p.add_argument("--engine-dir", type=Path, default=None,
                   help="ONNX graphs (onnxruntime; exported there when absent) or `caphuman build` engines (tensorrt, tensorrt-rtx)")
    p.add_argument("--tritonserver", type=Path, default=None,
                   help="tritonserver binary (default: the one in the nvidia-pytriton wheel; in the NGC container "
                        "/opt/tritonserver/bin/tritonserver)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the HTTP, gRPC and metrics ports listen on (default: this machine only; 0.0.0.0: "
                        "every interface, then put TLS and authentication in front: docs/serving.md)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (what `caphuman client --url` talks to)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (health: /v2/health/ready)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics (/metrics)")
    p.add_argument("--log-file", type=Path, default=None,
                   help="server log (default: a temporary folder, printed at start and removed at exit; '-': "
                        "this command's output, as a container's log wants)")
    p.add_argument("--exit-timeout", type=int, default=30,
                   help="seconds the server gets at Ctrl-C/SIGTERM to finish the requests in flight")
    p.add_argument("--tritonserver-args", default="", metavar="FLAGS",
                   help="more tritonserver flags, one string (e.g. '--allow-gpu-metrics=true --log-info=true')")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the models to load")
    p.set_defaults(func=run)


def launch_env(args) -> dict[str, str]:
    """The models' launch options, passed to tritonserver's environment."""
    from caphuman.tritonserver.weights import BACKEND_ENV, ENGINE_DIR_ENV, RANDOM_CONFIG_ENV
    env = {RANDOM_CONFIG_ENV: args.random_config} if args.weights is None else {}
    if args.backend:
        env[BACKEND_ENV] = args.backend
    if args.engine_dir:
        env[ENGINE_DIR_ENV] = str(args.engine_dir.resolve())
    return env


def reach(host: str) -> str:
    """The banner's line on who can connect (the ports all listen on --host)."""
    from caphuman.tritonserver.launcher import ADMIN_HEADER, ADMIN_KEY_ENV, is_loopback
    admin = (f"admin APIs (model loading, logging, trace, shared memory, statistics) need the "
             f"'{ADMIN_HEADER}' header (value: ${ADMIN_KEY_ENV}" + (")" if os.environ.get(ADMIN_KEY_ENV)
                                                                      else "; unset, so they are off)"))
    if is_loopback(host):
        return f"listening on {host} only: reachable from this machine, not the network; {admin}"
    return (f"listening on {host}: reachable from the NETWORK, without TLS or authentication (put a proxy with "
            f"both in front, docs/serving.md); {admin}")


def run(args) -> int:
    from caphuman.runtime.cli import UserError
    from caphuman.tritonserver.launcher import DEFAULT_MODEL_REPOSITORY, LaunchError, ServerConfig, TritonServer

    for name in ("grpc_port", "http_port", "metrics_port"):
        if not 1 <= getattr(args, name) <= 65535:
            raise UserError(f"--{name.replace('_', '-')} must be a TCP port number, got {getattr(args, name)}")
    if args.exit_timeout < 1:
        raise UserError(f"--exit-timeout must be at least 1 second, got {args.exit_timeout}")
    try:
        shlex.split(args.tritonserver_args)
    except ValueError as e:
        raise UserError(f"--tritonserver-args: {e} in {args.tritonserver_args!r}") from None
    cfg = ServerConfig(model_repository=args.model_repository or DEFAULT_MODEL_REPOSITORY, binary=args.tritonserver,
                       weights=args.weights, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                       metrics_port=args.metrics_port, exit_timeout=args.exit_timeout,
                       log_file=None if str(args.log_file) == "-" else args.log_file,
                       log_to_stdout=str(args.log_file) == "-",
                       extra_args=shlex.split(args.tritonserver_args), extra_env=launch_env(args))
    server = TritonServer(cfg)
    if args.weights is None:
        size = "TINY" if args.random_config == "cldm_tiny" else f"official-size ({args.random_config})"
        print(f"NOTE: no --weights: the models are the built-in {size} ones with RANDOM weights (images are patterns, "
              "not photos); responses say \"random_weights\": true.")
    stop = {"signal": None}

    def on_term(signum, _frame):
        stop["signal"] = signum
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        server.start()
        print(f"starting tritonserver (log: {server.log_path}) ...", flush=True)
        t0 = time.monotonic()
        server.wait_ready(args.ready_timeout)
        ep = server.endpoints()
        print(f"ready in {time.monotonic() - t0:.0f} s: models caphuman, identity, head_condition\n"
              f"  gRPC     {ep['grpc']}   (caphuman client --url {ep['grpc']} ...)\n"
              f"  HTTP     {ep['http']}\n"
              f"  metrics  {ep['metrics']}\n"
              f"{reach(args.host)}\n"
              f"Ctrl-C stops the server.", flush=True)
        server.watch_stubs()
        while server.is_alive():
            time.sleep(1.0)
            dead = server.dead_stubs()
            if dead:  # Triton would keep reporting ready while that instance fails every request
                print(f"model instance(s) {', '.join(dead)} died (their Python process is gone): restarting "
                      "tritonserver ...", flush=True)
                t0 = time.monotonic()
                server.restart(args.ready_timeout)
                print(f"ready again in {time.monotonic() - t0:.0f} s", flush=True)
        server.failed = True
        raise UserError(f"tritonserver exited with status {server.proc.returncode}: {server.first_error()} "
                        f"(full log: {server.log_path})")
    except LaunchError as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        print("stopping tritonserver ...", flush=True)
        code = server.stop()
        print(f"stopped (status {code})")
        return 0
    finally:
        signal.signal(signal.SIGTERM, old_term)
        server.stop()  # also removes its temporary folder (a failed start's log stays, and is named)
