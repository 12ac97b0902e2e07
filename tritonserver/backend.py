"""Helpers shared by the three Python-backend models (model_repository/*/1/model.py).

`pb_utils` (triton_python_backend_utils) exists only inside the Triton stub, so it is passed in.
"""
from __future__ import annotations

import json
import os

import torch

from .params import BAD_REQUEST_PREFIX, INTERNAL_PREFIX, RequestError, ServerSettings

KNOWN_PARAMETERS = {"torch_threads"}


def model_setup(args: dict, pb_utils, extra_parameters=()) -> tuple[dict, str, ServerSettings]:
    """(model config, torch device, settings) from initialize()'s args; fails the load on bad config.
    `extra_parameters`: names of config.pbtxt parameters this model reads itself."""
    config = json.loads(args["model_config"])
    name = config.get("name", "?")
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    known = KNOWN_PARAMETERS | set(extra_parameters)
    unknown = set(params) - known
    if unknown:
        raise pb_utils.TritonModelException(f"{name}: unknown config.pbtxt parameters {sorted(unknown)}; "
                                            f"known: {sorted(known)}")
    raw = params.get("torch_threads", "0") or "0"
    if not raw.isdigit():
        raise pb_utils.TritonModelException(f"{name}: parameter torch_threads must be an integer >= 0, got {raw!r}")
    threads = int(raw) or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    if args.get("model_instance_kind") == "GPU":
        if not torch.cuda.is_available():
            raise pb_utils.TritonModelException(f"{name}: KIND_GPU instance but torch sees no CUDA device")
        device = f"cuda:{args.get('model_instance_device_id', '0')}"
    else:
        device = "cpu"
    try:
        settings = ServerSettings.from_env()
    except ValueError as e:
        raise pb_utils.TritonModelException(f"{name}: {e}") from None
    return config, device, settings


def triton_error(pb_utils, exc: BaseException):
    """A TritonError for a failed request: INVALID_ARG for bad requests, INTERNAL otherwise."""
    if isinstance(exc, RequestError):
        code, msg = pb_utils.TritonError.INVALID_ARG, f"{BAD_REQUEST_PREFIX}{exc}"
    else:
        code, msg = pb_utils.TritonError.INTERNAL, f"{INTERNAL_PREFIX}({type(exc).__name__}): {exc}"
    return pb_utils.TritonError(msg, code)


FAILURES_METRIC = "caphuman_requests_failed_total"


def failure_counter(pb_utils, model: str):
    """count(exc): adds one to FAILURES_METRIC{model, reason} at the metrics port (/metrics). Triton's own
    nv_inference_request_failure cannot see these failures: a decoupled model answers an error through its
    response sender, which Triton counts as a success (only an exception out of execute() counts as a
    failure, and that fails every request of the call and turns the bad-request error into an INTERNAL one
    with a stack trace). reason: "invalid_request" (the client's fault, INVALID_ARG) or "internal"."""
    family = pb_utils.MetricFamily(name=FAILURES_METRIC, kind=pb_utils.MetricFamily.COUNTER,
                                   description="Requests answered with an error (reason: invalid_request, internal)")
    metrics = {reason: family.Metric(labels={"model": model, "reason": reason}) for reason in ("invalid_request", "internal")}

    def count(exc: BaseException) -> None:
        metrics["invalid_request" if isinstance(exc, RequestError) else "internal"].increment(1)
    count.family = family  # keeps the family alive as long as its metrics
    return count


def error_from_bls(pb_utils, model: str, error) -> Exception:
    """Re-raise a BLS response error: a bad-request error stays a RequestError."""
    msg = error.message()
    if msg.startswith(BAD_REQUEST_PREFIX):
        return RequestError(msg[len(BAD_REQUEST_PREFIX):])
    return RuntimeError(f"{model}: {msg}")


def log(pb_utils, level: str, message: str) -> None:
    logger = pb_utils.Logger
    {"info": logger.log_info, "warn": logger.log_warn, "error": logger.log_error}[level](message)
