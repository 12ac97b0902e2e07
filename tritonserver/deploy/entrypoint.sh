#!/usr/bin/env bash
# CapHuman-RT container entrypoint.
#   serve (default): engines for this GPU (built once, cached on the volume), per-GPU model configs, then
#                    `caphuman serve` in the foreground: tritonserver behind its gateway, healed when a model
#                    process dies (exec: it gets SIGTERM and shuts down gracefully).
#   build:           only the engine step (a Kubernetes Job or init container can run this).
#   anything else:   run as a command (a shell for debugging: `docker run ... bash`).
set -euo pipefail

: "${CAPHUMAN_MODEL_REPOSITORY:=/opt/caphuman/model_repository}"  # the tested repository, unchanged
: "${CAPHUMAN_ENGINE_CACHE:=/engines}"                            # volume: ONNX graphs + keyed TensorRT engines / torch artifacts
: "${CAPHUMAN_WEIGHTS:=/weights}"                                  # read-only volume of official weights
: "${CAPHUMAN_RUN_DIR:=/tmp/caphuman}"                             # writable scratch (emptyDir / tmpfs)
: "${CAPHUMAN_GPUS:=auto}"                 # auto: every GPU the container sees; or a count (2) or ids (0,1)
: "${CAPHUMAN_INSTANCES_PER_GPU:=}"        # e.g. "caphuman=1 identity=2" (deploy_configs --count)
: "${TRITON_HTTP_PORT:=8000}"
: "${TRITON_GRPC_PORT:=8001}"
: "${TRITON_METRICS_PORT:=8002}"
: "${TRITON_EXIT_TIMEOUT_SECS:=90}"        # graceful shutdown: finish in-flight requests first
: "${CAPHUMAN_READY_TIMEOUT:=1800}"        # seconds for the models to load (TensorRT engines, torch compile)
: "${TRITON_LOG_VERBOSE:=0}"
: "${TRITON_EXTRA_ARGS:=}"
# Admin APIs (model loading, logging, trace, shared memory, statistics) answer only requests with the header
# caphuman-admin-key: $CAPHUMAN_ADMIN_KEY; unset, `caphuman serve` draws a random key nobody knows (they are off).
export CAPHUMAN_ENGINE_CACHE CAPHUMAN_WEIGHTS

log() { echo "[caphuman-entrypoint] $*" >&2; }

weights_present() { [ -f "${CAPHUMAN_WEIGHTS}/caphuman.ckpt" ] || [ -f "${CAPHUMAN_WEIGHTS}/caphuman-merged.safetensors" ]; }

count_gpus() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

build_engines() {
    if ! weights_present; then
        log "no ${CAPHUMAN_WEIGHTS}/caphuman.ckpt: serving the built-in tiny random-weight model"
        unset CAPHUMAN_WEIGHTS
        return 0
    fi
    local record="${CAPHUMAN_RUN_DIR}/engine_dir"
    rm -f "${record}"
    mkdir -p "${CAPHUMAN_RUN_DIR}"
    python3 -m caphuman.tritonserver.deploy.engine_cache --weights "${CAPHUMAN_WEIGHTS}" \
        --cache "${CAPHUMAN_ENGINE_CACHE}" --record "${record}"
    if [ -s "${record}" ]; then
        # The models' contract: TensorRT engines (and engines.json) for this GPU and weight set are here.
        CAPHUMAN_ENGINE_DIR="$(cat "${record}")"
        export CAPHUMAN_ENGINE_DIR
        log "engines (TensorRT plans, or torch artifacts without TensorRT) in ${CAPHUMAN_ENGINE_DIR}"
    fi
}

model_repository() {
    local gpus="${CAPHUMAN_GPUS}"
    if [ "${gpus}" = "auto" ]; then
        gpus="$(count_gpus)"
    fi
    if [ "${gpus}" = "0" ] || [ -z "${gpus}" ]; then
        log "no GPU visible: serving the CPU instance groups of ${CAPHUMAN_MODEL_REPOSITORY}"
        echo "${CAPHUMAN_MODEL_REPOSITORY}"
        return 0
    fi
    local out="${CAPHUMAN_RUN_DIR}/model_repository"
    local counts=()
    local spec
    for spec in ${CAPHUMAN_INSTANCES_PER_GPU}; do
        counts+=(--count "${spec}")
    done
    python3 -m caphuman.tritonserver.deploy_configs --model-repository "${CAPHUMAN_MODEL_REPOSITORY}" \
        --gpus "${gpus}" --out "${out}" "${counts[@]}" >&2
    log "per-GPU model configs for GPUs '${gpus}' in ${out}"
    echo "${out}"
}

serve() {
    mkdir -p "${CAPHUMAN_RUN_DIR}"
    build_engines
    local repo
    repo="$(model_repository)"
    local weights=()
    if [ -n "${CAPHUMAN_WEIGHTS:-}" ]; then
        weights=(--weights "${CAPHUMAN_WEIGHTS}")
    fi
    # `caphuman serve` (exec: it gets SIGTERM and stops tritonserver gracefully): tritonserver on loopback
    # behind the gateway on the public ports (an oversized request is refused before it is read), and a
    # model process that dies is healed by restarting tritonserver (/v2/health/ready is 503 meanwhile).
    exec python3 -m caphuman.runtime.cli serve \
        --tritonserver "$(command -v tritonserver)" \
        --model-repository "${repo}" "${weights[@]}" \
        --host 0.0.0.0 \
        --http-port "${TRITON_HTTP_PORT}" --grpc-port "${TRITON_GRPC_PORT}" --metrics-port "${TRITON_METRICS_PORT}" \
        --exit-timeout "${TRITON_EXIT_TIMEOUT_SECS}" --ready-timeout "${CAPHUMAN_READY_TIMEOUT}" \
        --log-file - \
        --tritonserver-args "--allow-gpu-metrics=true --log-verbose=${TRITON_LOG_VERBOSE} ${TRITON_EXTRA_ARGS}"
}

case "${1:-serve}" in
    serve) serve ;;
    build) build_engines ;;
    *) exec "$@" ;;
esac
