"""The container's start step: TensorRT engines for this node's GPU, built once and kept on a volume.

    python -m caphuman.tritonserver.deploy.engine_cache --weights /weights --cache /engines

1. ONNX graphs of the mounted weights, exported once per weight set into `<cache>/onnx/<fingerprint>/`
   (`caphuman export`; the graphs do not depend on the GPU, so every node shares them).
2. `caphuman build --onnx-dir <that folder> --out <cache>/trt/<gpu>/<fingerprint>`: the engine builder keys
   each plan by graph hash + GPU + SM + TensorRT version + settings (engines/tensorrt_engine.py), so a node
   whose GPU and TensorRT already have engines there pays nothing. The folder is per GPU type and weight
   set because the builder's `engines.json` index and timing cache are per folder: nodes of different GPU
   types, and old and new pods during a base-model upgrade, share one volume without overwriting each
   other's index.
3. The engine folder is written to `--record FILE` (the entrypoint passes it on to the models as
   CAPHUMAN_ENGINE_DIR).

Where TensorRT does not import, the torch engine serves: `caphuman build --backend torch --out
<cache>/torch/<gpu>` builds its compiled artifacts for the server's buckets instead (keyed by content
inside the folder; an up-to-date artifact is reused at once) and that folder is recorded.
Skipped, with the reason printed, where no CUDA GPU is visible (the torch backend serves, uncompiled),
where no weights are mounted (the built-in tiny model has nothing to build) or with
CAPHUMAN_BUILD_ENGINES=0.
A file lock on the volume keeps two pods of one node from building the same thing at once; exports land in
a temporary folder renamed into place, so a pod killed mid-export leaves nothing half-written behind.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from caphuman.runtime.weights_layout import MERGED_FILE_NAME
from caphuman.tritonserver.generation import DEFAULT_BUCKETS

# The engine builder's command line, in one place (runtime/export_cli.py defines it). {onnx} and {engines}
# are filled in below; extra arguments come from CAPHUMAN_BUILD_ARGS / CAPHUMAN_EXPORT_ARGS, after these (they
# override them). The batch profile covers every batch the `caphuman` model runs on a GPU (its buckets).
BUILD_COMMAND = ("caphuman", "build", "--onnx-dir", "{onnx}", "--out", "{engines}", "--batch",
                 f"1:1:{max(DEFAULT_BUCKETS)}")
EXPORT_COMMAND = ("caphuman", "export", "--out", "{onnx}")
# Without TensorRT the torch engine serves: its compiled artifacts for the server's buckets at 512x512, keyed
# by content inside the folder (engines/torch_artifacts.py), so one folder per GPU type serves every weight set.
TORCH_BUILD_COMMAND = ("caphuman", "build", "--backend", "torch", "--weights", "{weights}", "--out", "{torch}",
                       "--batch-sizes", ",".join(str(b) for b in DEFAULT_BUCKETS))
SAMPLE_BYTES = 1 << 20


def fingerprint(paths: list[Path]) -> str:
    """A short key of a weight set: each file's name, size, first and last MiB (cheap on multi-GB files)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.relative_to(p.parent)}\0{size}\0".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(SAMPLE_BYTES))
                if size > SAMPLE_BYTES:
                    fh.seek(max(size - SAMPLE_BYTES, SAMPLE_BYTES))
                    h.update(fh.read())
    return h.hexdigest()[:16]


def export_args(files) -> list[str]:
    """`caphuman export` flags for a caphuman.tritonserver.weights.WeightFiles (the files the served models load)."""
    args = ["--checkpoint", str(files.checkpoint)]
    for flag, path in (("--sd-checkpoint", files.sd_checkpoint), ("--vae-checkpoint", files.vae_checkpoint),
                       ("--clip-dir", files.clip_dir)):
        if path is not None:
            args += [flag, str(path)]
    return args


def gpu_tag() -> str | None:
    """'nvidia-h100-80gb-hbm3-sm90' for the first visible GPU (as the builder names it), None without one."""
    import torch
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return f"{name}-sm{major}{minor}"


def engine_dir(cache: Path, files, gpu: str) -> Path:
    return cache / "trt" / gpu / fingerprint(_weight_paths(files))


def _weight_paths(files) -> list[Path]:
    return [p for p in (files.checkpoint, files.sd_checkpoint, files.vae_checkpoint) if p is not None]


def plan(cache: Path, files, gpu: str, environ=os.environ) -> list[tuple[str, list[str], Path | None]]:
    """The steps to run: (what, command, folder the step creates or None)."""
    onnx = cache / "onnx" / fingerprint(_weight_paths(files))
    steps = []
    if not (onnx / "manifest.json").is_file():
        cmd = [a.format(onnx=onnx.with_name(onnx.name + ".partial")) for a in EXPORT_COMMAND]
        steps.append(("export", cmd + export_args(files) + environ.get("CAPHUMAN_EXPORT_ARGS", "").split(), onnx))
    cmd = [a.format(onnx=onnx, engines=engine_dir(cache, files, gpu)) for a in BUILD_COMMAND]
    steps.append(("build", cmd + environ.get("CAPHUMAN_BUILD_ARGS", "").split(), None))
    return steps


def skip_reason(weights: Path | None, environ=os.environ) -> str | None:
    if environ.get("CAPHUMAN_BUILD_ENGINES", "1").strip().lower() in ("0", "false", "no", "off"):
        return "CAPHUMAN_BUILD_ENGINES=0"
    if weights is None or not weights.is_dir() or not any((weights / n).is_file() for n in ("caphuman.ckpt",
                                                                                           MERGED_FILE_NAME)):
        return f"no caphuman.ckpt under {weights} (the built-in tiny model serves; nothing to build)"
    return None


def gpu_or_reason(gpu_fn=None) -> tuple[str | None, str | None]:
    gpu = (gpu_fn or gpu_tag)()
    return (gpu, None) if gpu else (None, "no CUDA GPU visible (the torch backend serves)")


@contextlib.contextmanager
def locked(path: Path):
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare(cache: Path, weights: Path | None, run=subprocess.run, environ=os.environ, gpu_fn=None,
            record: Path | None = None) -> int:
    reason = skip_reason(weights, environ)
    gpu = None
    if reason is None:
        gpu, reason = gpu_or_reason(gpu_fn)
    if reason:
        print(f"engine cache: skipped: {reason}", flush=True)
        return 0
    from caphuman.tritonserver.weights import WeightFiles
    files = WeightFiles.discover(weights)
    if importlib.util.find_spec("tensorrt") is None:
        print("engine cache: TensorRT does not import here (the torch backend serves): its compiled artifacts",
              flush=True)
        engines = cache / "torch" / gpu
        steps = [("build", [a.format(weights=weights, torch=engines) for a in TORCH_BUILD_COMMAND]
                  + environ.get("CAPHUMAN_TORCH_BUILD_ARGS", "").split(), None)]
    else:
        engines, steps = engine_dir(cache, files, gpu), plan(cache, files, gpu, environ)
    with locked(cache / ".lock"):
        for what, cmd, creates in steps:
            print(f"engine cache: {what}: {' '.join(cmd)}", flush=True)
            if creates is not None:
                partial = creates.with_name(creates.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
            rc = run(cmd).returncode
            if rc != 0:
                print(f"engine cache: {what} failed with exit status {rc}", file=sys.stderr, flush=True)
                return rc
            if creates is not None:
                partial.rename(creates)
    print(f"engine cache: ready: {engines}", flush=True)
    if record is not None:
        Path(record).write_text(f"{engines}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m caphuman.tritonserver.deploy.engine_cache", description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=os.environ.get("CAPHUMAN_WEIGHTS") or None, help="official weights folder")
    ap.add_argument("--cache", default=os.environ.get("CAPHUMAN_ENGINE_CACHE", "/engines"), help="engine cache volume")
    ap.add_argument("--record", help="file to write the engine folder to (only when engines are ready)")
    args = ap.parse_args(argv)
    return prepare(Path(args.cache), Path(args.weights) if args.weights else None,
                   record=Path(args.record) if args.record else None)


if __name__ == "__main__":
    raise SystemExit(main())
