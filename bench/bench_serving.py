"""CapHuman-RT serving benchmark: images per second and p50/p99 latency through the Triton server.

    python bench/bench_serving.py --out bench/results/serving_h200.json          # CUDA: 512x512, 20 steps
    python bench/bench_serving.py --device cpu --duration 5 --warmup 2           # CPU smoke: tiny, 256, 2 steps

1. Baseline: the single-stream rate of the same pipeline and engine in this process, on the same device
   (`caphuman.tritonserver.weights.load_generation_pipeline`, the `caphuman` model's own builder, then
   `CapHumanPipeline.generate` one request after the other; identity context and hint given, as the
   server's caches give them after a person's first request).
2. A server (tritonserver/launcher.py) on a copy of the model repository: `caphuman` on the GPU, the
   identity and head models on the CPU unless --aux-gpu (after the first request both are cache hits),
   random weights at the official sizes (CAPHUMAN_RANDOM_CONFIG).
3. For each concurrency C: C closed-loop gRPC clients (caphuman.tritonserver.client, streaming) send requests with
   the same reference photo and a prompt and seed that change per request, for --warmup seconds (not
   counted), then --duration seconds. Images/s = requests completed in the measured window / its length;
   latency = request sent -> its image received, of the requests completed in the window.

Goals (issue 7): concurrency 1 at >= 90% of the single-stream rate; concurrency 16 at >= 1.3x the
throughput of concurrency 1. Prints a table and writes JSON (GPU, versions, configuration, figures, goals).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ("a photo of a person, best quality", "a person at the beach, best quality",
           "a person in a garden, best quality", "a portrait of a person at night, best quality")
GOAL_C1_FRACTION = 0.9
GOAL_C16_SPEEDUP = 1.3


def log(msg: str) -> None:
    print(f"[bench_serving {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def set_parameters(config: Path, values: dict[str, str]) -> None:
    """Set `parameters { key: K value: { string_value: V } }` entries of a config.pbtxt (added if absent)."""
    text = config.read_text()
    for key, value in values.items():
        pattern = re.compile(r'parameters \{ key: "%s" value: \{ string_value: "[^"]*" \} \}' % re.escape(key))
        line = f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        text, n = pattern.subn(line, text)
        if n == 0:
            text += line + "\n"
    config.write_text(text)


def environment(cuda: bool) -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "platform": platform.platform(), "cpus": os.cpu_count()}
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("triton", "diffusers", "transformers", "tritonclient", "grpcio", "nvidia-pytriton"):
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = None
    if cuda:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


# ------------------------------------------------------------------------------------ baseline
def baseline(args, cuda: bool) -> dict:
    """Single-stream rate of the same pipeline and engine in this process."""
    import torch

    from caphuman.runtime.pipeline import GenerationRequest, sphere_hint
    from caphuman.tritonserver.weights import RANDOM_CONFIG_ENV, load_generation_pipeline, serving_backend

    device = "cuda:0" if cuda else "cpu"
    t0 = time.perf_counter()
    os.environ[RANDOM_CONFIG_ENV] = args.config
    backend, engine_dir = serving_backend(args.engine or "auto", "", cuda)
    pipe = load_generation_pipeline(None, device, backend, engine_dir)
    ctx = torch.randn(1, 258, pipe.config.context_dim, generator=torch.Generator().manual_seed(0))
    hint = sphere_hint(args.resolution)

    def once(k: int) -> float:
        t = time.perf_counter()
        pipe.generate(GenerationRequest(prompt=PROMPTS[k % len(PROMPTS)], hint=hint, identity_context=ctx,
                                        seed=1000 + k, steps=args.steps, guidance=args.guidance))
        return time.perf_counter() - t

    for k in range(2):
        once(k)
    setup_s = time.perf_counter() - t0
    times = [once(k) for k in range(args.baseline_runs)]
    out = {"what": "CapHumanPipeline.generate with the serving engine, one request after the other (text "
                   "encoder, DDIM loop, VAE decode, uint8 image; identity context and hint given)",
           "backend": pipe.backend, "runs": len(times), "images_per_s": len(times) / sum(times),
           "p50_ms": percentile(times, 50) * 1e3, "min_ms": min(times) * 1e3, "setup_s": round(setup_s, 1)}
    if cuda:
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        out["run_ahead"] = run_ahead_probe(pipe, GenerationRequest(
            prompt=PROMPTS[0], hint=hint, identity_context=ctx, seed=7, steps=args.steps, guidance=args.guidance))
    pipe.engine.close()
    pipe = None  # free the GPU for the server
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def run_ahead_probe(pipe, request, repeats: int = 5) -> dict:
    """What the serving loop's bounded run-ahead costs and buys, in this process with the serving engine:
    the sampling loop's time (issue to GPU idle) and the GPU work left after a cancel a quarter of the
    way in (raise to GPU idle), with `run_ahead_steps` 2 and without a bound (the earlier behaviour)."""
    from caphuman.tritonserver.generation import BatchRunner, Job

    class Stop(Exception):
        pass

    if request.steps < 2:
        raise ValueError("the run-ahead probe needs at least 2 steps")
    cancel_at = max(1, request.steps // 4)

    def loop_ms(bg) -> float:
        t = time.perf_counter()
        bg.sample([Job(request)], callback=lambda i, total, x: None, sync_steps=False)
        bg.synchronize()
        return (time.perf_counter() - t) * 1e3

    def leftover_ms(bg) -> float:
        def stop(i, total, x):
            if i == cancel_at:
                raise Stop
        try:
            bg.sample([Job(request)], callback=stop, sync_steps=False)
            raise AssertionError(f"the cancel at step {cancel_at} never happened ({request.steps} steps)")
        except Stop:
            t = time.perf_counter()
        bg.synchronize()
        return (time.perf_counter() - t) * 1e3

    out = {"cancel_at_step": cancel_at, "steps": request.steps}
    for name, limit in (("run_ahead_2", 2), ("unbounded", 10 ** 6)):
        bg = BatchRunner(pipe, run_ahead=limit)
        loop_ms(bg)  # warm
        loops = [loop_ms(bg) for _ in range(repeats)]
        left = [leftover_ms(bg) for _ in range(repeats)]
        out[name] = {"loop_ms_p50": percentile(loops, 50), "loop_ms": [round(x, 2) for x in loops],
                     "gpu_ms_after_cancel_p50": percentile(left, 50),
                     "gpu_ms_after_cancel": [round(x, 2) for x in left]}
        log(f"  {name}: sampling loop {out[name]['loop_ms_p50']:.1f} ms; GPU busy {out[name]['gpu_ms_after_cancel_p50']:.1f} "
            f"ms after a cancel at step {cancel_at}")
    return out


# ------------------------------------------------------------------------------------- serving
def make_repository(args, cuda: bool, dst: Path) -> Path:
    from caphuman.tritonserver.deploy_configs import generate
    from caphuman.tritonserver.launcher import DEFAULT_MODEL_REPOSITORY
    if cuda:
        keep = () if args.aux_gpu else ("identity", "head_condition")
        generate(DEFAULT_MODEL_REPOSITORY, dst, [0], {"*": 1}, keep)
    else:
        shutil.copytree(DEFAULT_MODEL_REPOSITORY, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        cfg = dst / "caphuman" / "config.pbtxt"
        # one orchestrator instance, so that concurrent requests meet in one scheduler
        cfg.write_text(re.sub(r"instance_group \[ \{ count: \d+ kind: KIND_CPU \} \]",
                              "instance_group [ { count: 1 kind: KIND_CPU } ]", cfg.read_text()))
    params = {"warm_resolutions": str(args.resolution)}
    for key, value in (("max_batch", args.max_batch), ("batch_sizes", args.batch_sizes),
                       ("batch_gather_ms", args.gather_ms), ("engine", args.engine),
                       ("run_ahead_steps", args.run_ahead)):
        if value is not None:
            params[key] = str(value)
    set_parameters(dst / "caphuman" / "config.pbtxt", params)
    return dst


def run_level(url: str, reference: bytes, concurrency: int, args, seed0: int) -> dict:
    from caphuman.tritonserver.client import CapHumanClient

    records: list[tuple[float, float, dict]] = []
    errors: list[str] = []
    lock = threading.Lock()
    t_start = time.perf_counter()
    t_measure = t_start + args.warmup
    t_end = t_measure + args.duration
    counter = iter(range(seed0, seed0 + 10 ** 6))

    def worker(k: int) -> None:
        client = CapHumanClient(url, timeout=600)
        while time.perf_counter() < t_end:
            with lock:
                n = next(counter)
            t0 = time.perf_counter()
            try:
                out = client.generate(reference, PROMPTS[n % len(PROMPTS)], seed=n, steps=args.steps,
                                      resolution=args.resolution, guidance=args.guidance, progress=args.progress)
                t1 = time.perf_counter()
                if len(out) != 1 or out[0].image.shape != (args.resolution, args.resolution, 3):
                    raise RuntimeError(f"unexpected response {[o.image.shape for o in out]}")
                with lock:
                    records.append((t0, t1, out[0].metadata.get("timings", {})))
            except Exception as e:  # noqa: BLE001 - reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                time.sleep(0.5)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.duration + args.warmup + 600)
    done = [(t0, t1, tm) for t0, t1, tm in records if t_measure <= t1 <= t_end]
    lat = [(t1 - t0) * 1e3 for t0, t1, _ in done]
    sizes: dict[str, int] = {}
    for _, _, tm in done:
        key = str(tm.get("batch_size", "?"))
        sizes[key] = sizes.get(key, 0) + 1
    mean = lambda key: float(np.mean([tm[key] for _, _, tm in done if key in tm])) if done else None  # noqa: E731
    return {"concurrency": concurrency, "measured_s": args.duration, "completed": len(done),
            "images_per_s": len(done) / args.duration, "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "mean_ms": float(np.mean(lat)) if lat else None, "max_ms": max(lat) if lat else None,
            "images_by_batch_size": dict(sorted(sizes.items())), "server_mean_queue_ms": mean("queue_ms"),
            "server_mean_sampling_ms": mean("sampling_ms"), "server_mean_vae_decode_ms": mean("vae_decode_ms"),
            "server_mean_head_condition_ms": mean("head_condition_ms"), "errors": len(errors),
            "first_errors": errors[:5], "requests_in_warmup_or_after": len(records) - len(done)}


def serve_and_measure(args, cuda: bool, results: dict, save) -> None:
    import tritonclient.grpc as grpcclient

    from caphuman.tritonserver.client import CapHumanClient
    from caphuman.tritonserver.launcher import ServerConfig, TritonServer, free_port
    from caphuman.tritonserver.weights import RANDOM_CONFIG_ENV

    work = Path(tempfile.mkdtemp(prefix="caphuman-bench-serving-"))
    repo = make_repository(args, cuda, work / "model_repository")
    env = {RANDOM_CONFIG_ENV: args.config}
    for item in args.server_env:
        key, _, value = item.partition("=")
        env[key] = value
    log_file = Path(args.server_log) if args.server_log else work / "tritonserver.log"
    cfg = ServerConfig(model_repository=repo, host="127.0.0.1", grpc_port=free_port(), http_port=free_port(),
                       metrics_port=free_port(), log_file=log_file, extra_env=env)
    server = TritonServer(cfg)
    t0 = time.perf_counter()
    server.start()
    try:
        server.wait_ready(timeout=args.start_timeout)
        results["server"] = {"ready_s": round(time.perf_counter() - t0, 1), "log": str(log_file),
                             "repository": {"caphuman": (repo / "caphuman" / "config.pbtxt").read_text()
                                            .split("instance_group", 1)[1].splitlines()[0].strip()}}
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            meta = c.get_server_metadata()
            results["server"]["tritonserver"] = meta.version
        warm = [ln for ln in server.log_path.read_text(errors="replace").splitlines() if "caphuman: warm in" in ln
                or "caphuman: device" in ln]
        results["server"]["caphuman_log"] = [ln.split("] ", 1)[-1][:400] for ln in warm]
        log(f"server ready in {results['server']['ready_s']} s")
        save()
        reference = Path(args.reference).read_bytes()
        client = CapHumanClient(server.grpc_url, timeout=600)
        t = time.perf_counter()
        first = client.generate(reference, PROMPTS[0], seed=1, steps=args.steps, resolution=args.resolution,
                                guidance=args.guidance, progress=args.progress)[0]
        results["server"]["first_request_s"] = round(time.perf_counter() - t, 2)
        results["server"]["first_request_timings"] = first.metadata.get("timings")
        results["server"]["backend"] = first.metadata.get("backend")
        results["levels"] = []
        for i, c in enumerate(args.concurrency):
            log(f"concurrency {c}: {args.warmup:.0f} s warm-up + {args.duration:.0f} s measured ...")
            level = run_level(server.grpc_url, reference, c, args, seed0=100000 * (i + 1))
            results["levels"].append(level)
            log(f"  {level['images_per_s']:.3f} images/s, p50 {level['p50_ms']} ms, p99 {level['p99_ms']} ms, "
                f"batches {level['images_by_batch_size']}, errors {level['errors']}")
            save()
    finally:
        code = server.stop()
        results.setdefault("server", {})["exit_code"] = code
        results["server"]["log_tail"] = server.log_tail(30).splitlines()
        log_text = server.log_path.read_text(errors="replace") if server.log_path.is_file() else ""
        results["server"]["model_errors"] = sorted({ln.split("] ", 1)[-1][:300] for ln in log_text.splitlines()
                                                    if "failed to load" in ln or "UNAVAILABLE" in ln})[:10]
        save()


# ---------------------------------------------------------------------------------------- report
def goals(results: dict) -> dict:
    levels = {lv["concurrency"]: lv for lv in results.get("levels", [])}
    base = results.get("baseline", {}).get("images_per_s")
    out = {}
    if 1 in levels and base:
        frac = levels[1]["images_per_s"] / base
        out["concurrency_1_vs_single_stream"] = {"target": f">= {GOAL_C1_FRACTION:.0%}", "measured": round(frac, 3),
                                                 "met": frac >= GOAL_C1_FRACTION}
    if 1 in levels and 16 in levels and levels[1]["images_per_s"]:
        ratio = levels[16]["images_per_s"] / levels[1]["images_per_s"]
        out["concurrency_16_vs_1_throughput"] = {"target": f">= {GOAL_C16_SPEEDUP}x", "measured": round(ratio, 3),
                                                 "met": ratio >= GOAL_C16_SPEEDUP}
    return out


def table(results: dict) -> str:
    rows = ["| concurrency | images/s | p50 ms | p99 ms | images by batch size | errors |",
            "| --- | --- | --- | --- | --- | --- |"]
    base = results.get("baseline")
    if base:
        rows.append(f"| in-process single stream | {base['images_per_s']:.3f} | {base['p50_ms']:.1f} | | | |")
    for lv in results.get("levels", []):
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        rows.append(f"| {lv['concurrency']} | {lv['images_per_s']:.3f} | {fmt(lv['p50_ms'])} | {fmt(lv['p99_ms'])} | "
                    f"{lv['images_by_batch_size']} | {lv['errors']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--config", default=None, help="random-weight config: cldm_v15 (CUDA default) or cldm_tiny")
    ap.add_argument("--resolution", type=int, default=None, help="512 on CUDA, 256 on the CPU")
    ap.add_argument("--steps", type=int, default=None, help="20 on CUDA, 2 on the CPU")
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--duration", type=float, default=30.0, help="measured seconds per concurrency")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds per concurrency before measuring")
    ap.add_argument("--baseline-runs", type=int, default=10)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--max-batch", type=int, default=None, help="caphuman's max_batch (default: the repository's)")
    ap.add_argument("--batch-sizes", default=None, help="caphuman's batch_sizes, e.g. 1,2,4,8")
    ap.add_argument("--gather-ms", type=float, default=None, help="caphuman's batch_gather_ms")
    ap.add_argument("--run-ahead", type=int, default=None, help="caphuman's run_ahead_steps")
    ap.add_argument("--no-server", action="store_true", help="only the in-process baseline (and its run-ahead probe)")
    ap.add_argument("--engine", default=None, choices=["auto", "eager", "torch", "onnxruntime"],
                    help="caphuman's engine parameter (default: its config.pbtxt's, auto)")
    ap.add_argument("--progress", action="store_true", help="ask for a progress response per step")
    ap.add_argument("--aux-gpu", action="store_true", help="identity and head_condition on the GPU too")
    ap.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    ap.add_argument("--server-log", default=None, help="where the server writes its log")
    ap.add_argument("--start-timeout", type=float, default=420.0)
    ap.add_argument("--reference", default=str(ROOT / "tests" / "data" / "faces" / "reference_196251.png"))
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/serving_<device>.json)")
    args = ap.parse_args(argv)

    import torch
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    args.config = args.config or ("cldm_v15" if cuda else "cldm_tiny")
    args.resolution = args.resolution or (512 if cuda else 256)
    args.steps = args.steps or (20 if cuda else 2)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    out = Path(args.out or ROOT / "bench" / "results" / f"serving_{'cuda' if cuda else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"benchmark": "bench/bench_serving.py", "environment": environment(cuda),
                     "config": {"weights": f"random, {args.config} sizes", "resolution": args.resolution,
                                "steps": args.steps, "guidance": args.guidance, "concurrency": args.concurrency,
                                "duration_s": args.duration, "warmup_s": args.warmup, "progress": args.progress,
                                "max_batch": args.max_batch, "batch_sizes": args.batch_sizes,
                                "gather_ms": args.gather_ms, "run_ahead": args.run_ahead, "engine": args.engine,
                                "aux_models_on_gpu": args.aux_gpu,
                                "device": "cuda" if cuda else "cpu"}}

    def save():
        results["goals"] = goals(results)
        out.write_text(json.dumps(results, indent=2, default=str))

    if not args.skip_baseline:
        log(f"baseline: in-process single stream ({args.config}, {args.resolution}x{args.resolution}, "
            f"{args.steps} steps) ...")
        results["baseline"] = baseline(args, cuda)
        log(f"  {results['baseline']['images_per_s']:.3f} images/s (p50 {results['baseline']['p50_ms']:.1f} ms)")
        save()
    if args.no_server:
        save()
        print(table(results))
        return 0
    try:
        serve_and_measure(args, cuda, results, save)
    except Exception as e:  # noqa: BLE001 - recorded in the JSON
        results["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        save()
        log(f"FAILED: {results['error']}")
        print(table(results))
        return 1
    save()
    print(table(results))
    for name, g in results["goals"].items():
        print(f"goal {name}: target {g['target']}, measured {g['measured']}: {'met' if g['met'] else 'MISSED'}")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
