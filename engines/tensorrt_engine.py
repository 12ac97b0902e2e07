"""TensorRT: build engines from the exported graphs, cache them, refit them, run them.

One code path for both TensorRT libraries (`caphuman.engines.tensorrt_library`): datacenter TensorRT 10
(`tensorrt`) and TensorRT for RTX (`tensorrt_rtx_bindings`), whose Python APIs are the same (Builder,
OnnxParser, IBuilderConfig, optimization profiles, Runtime, IExecutionContext.execute_async_v3, Refitter);
what differs -- typed vs flagged precision, timing vs runtime cache, the build target -- is named there.
The libraries are imported lazily: everything that needs neither (profile shapes, cache keys, the refit
weight map) is plain Python with its own tests.

    settings = BuildSettings(batch=(1, 1, 4), resolution=(256, 512, 1024))
    plan = build_engine("onnx/unet.onnx", spec, "engines/", settings)               # cached by content
    plan = build_engine("onnx/unet.onnx", spec, "engines/", settings, library=RTX)  # any machine, no GPU
    unet = TensorRTEngine(plan, spec)
    eps = unet.run(feed)["eps"]                                                     # CUDA graph per shape
    unet.refit(unet_refit_weights("onnx/", "unet", config, "other-sd15.safetensors"))
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from caphuman.export.onnx_specs import GraphSpec, ShapeError

from .artifacts import content_key, is_cached, read_sidecar, write_sidecar
from .base import Engine, EngineError
from .tensorrt_library import (DATACENTER, LIBRARIES, RTX, BuildTarget, TensorRTLibrary, TensorRTUnavailable,
                               gpu_identity)

__all__ = ["DATACENTER", "LIBRARIES", "RTX", "BuildSettings", "BuildTarget", "TensorRTEngine", "TensorRTUnavailable",
           "build_engine", "build_engines", "engine_cache_key", "engine_file_name", "gpu_identity", "import_tensorrt",
           "profile_shapes", "unet_refit_weights"]

log = logging.getLogger(__name__)

RESOLUTION_STEP = 64
RESOLUTION_RANGE = (256, 1024)
CFG_BATCH_GRAPHS = ("unet",)   # graphs that run on [cond, uncond] pairs: twice the batch


def import_tensorrt(library: TensorRTLibrary = DATACENTER):
    """The library's module, or a clear TensorRTUnavailable saying how to get it."""
    return library.load()


@dataclass(frozen=True)
class BuildSettings:
    """What an engine is built for. Every field is part of the engine cache key."""
    batch: tuple[int, int, int] = (1, 1, 4)                  # MIN, OPT, MAX images per request
    resolution: tuple[int, int, int] = (256, 512, 1024)      # MIN, OPT, MAX side in pixels (square and not)
    fp16: bool = True
    refit: bool = True
    workspace_bytes: int = 8 << 30
    optimization_level: int = 3

    def validate(self) -> None:
        lo, opt, hi = self.resolution
        for v in self.resolution:
            if v % RESOLUTION_STEP or not RESOLUTION_RANGE[0] <= v <= RESOLUTION_RANGE[1]:
                raise ShapeError(f"resolution {v} must be a multiple of {RESOLUTION_STEP} in {list(RESOLUTION_RANGE)}")
        if not lo <= opt <= hi:
            raise ShapeError(f"resolution needs MIN <= OPT <= MAX, got {self.resolution}")
        if not 0 < self.batch[0] <= self.batch[1] <= self.batch[2]:
            raise ShapeError(f"batch needs 0 < MIN <= OPT <= MAX, got {self.batch}")


def profile_shapes(spec: GraphSpec, settings: BuildSettings) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every input for one optimization profile.

    Spatial graphs take any height and width in [MIN, MAX] in steps of 64 (independently: the
    profile's min uses MIN x MIN, max MAX x MAX); fixed-size graphs (CLIP 224, FaceNet 160, ...)
    take only the batch range. The UNet's batch is twice the request batch (CFG pairs)."""
    settings.validate()
    mult = 2 if spec.name in CFG_BATCH_GRAPHS else 1
    out = {}
    for t in spec.inputs:
        triple = []
        for b, r in zip(settings.batch, settings.resolution):
            h, w = spec.fixed_size or (r, r)
            triple.append(t.resolve(b * mult, h, w))
        out[t.name] = tuple(triple)
    return out


def engine_cache_key(graph_sha256: str, target: BuildTarget, settings: BuildSettings, shapes: dict) -> str:
    """Content key of an engine: graph hash + library, its version and the build target (the GPU, or the
    RTX compute capabilities) + settings + profile shapes. Any change rebuilds; nothing is reused on
    "file exists" alone."""
    return content_key({"graph": graph_sha256, "target": asdict(target), "settings": asdict(settings),
                        "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}})


def engine_file_name(graph: str, settings: BuildSettings, target: BuildTarget, key: str) -> str:
    return f"{graph}-{'fp16' if settings.fp16 else 'fp32'}-{target.tag}-{key[:12]}.plan"


def unet_refit_weights(onnx_dir: str | Path, graph: str, config, sd_checkpoint: str | Path,
                       dtype: np.dtype | None = None) -> dict[str, np.ndarray]:
    """New UNet initializers of `graph` ("unet" or "denoiser") from another SD1.x checkpoint: the
    base-model swap a refit does without a rebuild. Pure numpy/torch; no TensorRT needed."""
    from caphuman.export import keymap
    from caphuman.export.checkpoints import UNET_PREFIX, load_module, read_official
    from caphuman.export.networks import build_unet
    from caphuman.export.onnx_export import REFIT_GRAPHS
    from caphuman.export.onnx_refit import load_refit_map, refit_weights

    if graph not in REFIT_GRAPHS:
        raise ValueError(f"graph {graph!r} holds no UNet; refit graphs: {sorted(REFIT_GRAPHS)}")
    entries = load_refit_map(Path(onnx_dir) / f"{graph}.refit.json")
    state = read_official(None, sd_checkpoint)
    unet = build_unet(config.unet).eval()
    load_module(unet, state, UNET_PREFIX, lambda n: keymap.unet_key(n, config.unet), "UNet")
    prefix = REFIT_GRAPHS[graph]
    named = {prefix + k: v for k, v in unet.state_dict().items()}
    if dtype is None:
        manifest = json.loads((Path(onnx_dir) / "manifest.json").read_text())
        dtype = np.float16 if manifest["graphs"][graph]["dtype"] == "float16" else np.float32
    return refit_weights(entries, named, dtype, prefix_filter=prefix)


_LOGGERS: dict[str, object] = {}


def _logger(trt):
    """One logger per library and process (TensorRT keeps a reference to it). It forwards warnings and
    errors to Python logging and keeps the errors, so a failed build can say what the library said."""
    if trt.__name__ not in _LOGGERS:
        class RecordingLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if int(severity) <= int(trt.ILogger.Severity.ERROR):
                    self.errors.append(msg)
                    log.error("%s: %s", trt.__name__, msg)
                elif int(severity) <= int(trt.ILogger.Severity.WARNING):
                    log.warning("%s: %s", trt.__name__, msg)

        _LOGGERS[trt.__name__] = RecordingLogger()
    return _LOGGERS[trt.__name__]


def build_engine(onnx_path: str | Path, spec: GraphSpec, out_dir: str | Path, settings: BuildSettings,
                 timing_cache: str | Path | None = None, library: TensorRTLibrary = DATACENTER) -> Path:
    """Build (or find in the cache) the engine of one graph with `library`; returns the plan's path.

    The plan is `<graph>-<precision>-<target>-<key>.plan` with a JSON sidecar of the key's fields.
    Datacenter TensorRT reads and writes a timing cache (`timing.cache` in out_dir by default) and needs
    the GPU it builds for; TensorRT for RTX builds for its compute capabilities on any machine, and its
    precision is the graph's (strongly typed: fp16 engines from `caphuman export --fp16` graphs).
    """
    from caphuman.export.onnx_export import graph_hash

    trt = library.load()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = library.build_target(trt)
    shapes = profile_shapes(spec, settings)
    key = engine_cache_key(graph_hash(onnx_path), target, settings, shapes)
    plan_path = out_dir / engine_file_name(spec.name, settings, target, key)
    if is_cached(plan_path, key):
        log.info("%s: cached engine %s", spec.name, plan_path.name)
        return plan_path

    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(library.network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads <name>.onnx.data next to the graph itself
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"{library.display}'s ONNX parser rejected {onnx_path}: {errors[:5]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    _set_precision(trt, library, network, config, settings, onnx_path)
    if settings.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    library.set_targets(trt, config)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = None
    if library.cache_kind == "timing":
        cache_path = Path(timing_cache) if timing_cache else out_dir / "timing.cache"
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    log.info("%s: building %s engine (%s, %s)", spec.name, library.display, "fp16" if settings.fp16 else "fp32",
             target.tag)
    logger.errors.clear()
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        said = "; ".join(logger.errors[-3:]) or "see its log above"
        hint = ""
        if library is RTX and settings.refit and not torch.cuda.is_available():
            # measured with 1.7.1.116: its Myelin compiler calls CUDA for refittable weights, so on a
            # machine without an NVIDIA driver only non-refittable RTX engines build
            hint = (" -- without a CUDA driver TensorRT for RTX cannot build refittable engines; build them "
                    "here without --refit, or refittable ones on a machine with an NVIDIA GPU")
        raise EngineError(f"{library.display} {trt.__version__} could not build an engine for {onnx_path}: "
                          f"{said}{hint}")
    plan_path.write_bytes(bytes(plan))
    log.info("%s: built in %.1f s, %.1f MiB", spec.name, time.perf_counter() - started, plan_path.stat().st_size / 2**20)
    if cache_path is not None:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    write_sidecar(plan_path, {"key": key, "graph": spec.name, "onnx": onnx_path.name, "library": library.name,
                              "version": trt.__version__, "device": target.device, "arch": target.arch,
                              "settings": asdict(settings),
                              "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}})
    return plan_path


def _set_precision(trt, library: TensorRTLibrary, network, config, settings: BuildSettings, onnx_path: Path) -> None:
    """Datacenter TensorRT: fp16 is a builder flag over an fp32 or fp16 graph. TensorRT for RTX: the
    network is strongly typed, so the graph's own float type is the engine's; a mismatch is an error."""
    if not library.strongly_typed:
        if settings.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        return
    floats = {network.get_output(i).dtype for i in range(network.num_outputs)} & {trt.float16, trt.float32}
    graph_fp16 = floats == {trt.float16}
    if graph_fp16 != settings.fp16:
        want, have = ("fp16", "fp32") if settings.fp16 else ("fp32", "fp16")
        raise EngineError(f"{library.display} networks are strongly typed: a {want} engine needs a {want} graph, and "
                          f"{onnx_path} is {have} (`caphuman export{' --fp16' if settings.fp16 else ''}` writes "
                          f"{want} graphs)")


PIPELINE_GRAPHS = ("text_encoder", "image_encoder", "capface", "unet", "vae_decoder",
                   "facenet", "bisenet", "deca_encoder")   # what the pipeline runs; `denoiser` on request


def build_engines(onnx_dir: Path, names: list[str], out_dir: Path, settings: BuildSettings,
                  library: TensorRTLibrary = DATACENTER) -> dict[str, Path]:
    """`caphuman build`: every named graph of an export folder; writes `engines.json` (graph -> plan, library)."""
    from caphuman.export.config import load_config, packaged_config
    from caphuman.export.onnx_specs import graph_specs

    library.load()
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    cfg_name = manifest.get("config", "cldm_v15.yaml")
    config = load_config(onnx_dir / cfg_name if (onnx_dir / cfg_name).is_file() else packaged_config(Path(cfg_name).stem))
    specs = graph_specs(config)
    built = {n: build_engine(onnx_dir / f"{n}.onnx", specs[n], out_dir, settings, library=library) for n in names}
    index = out_dir / "engines.json"
    old = json.loads(index.read_text()) if index.is_file() else {}
    old.update({n: {"plan": p.name, "library": library.name} for n, p in built.items()})
    index.write_text(json.dumps(old, indent=1))
    return built


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool}
    if dt not in table:
        raise EngineError(f"TensorRT I/O type {dt} has no torch equivalent here")
    return table[dt]


class TensorRTEngine(Engine):
    """A deserialized plan with its execution context, device buffers and per-shape CUDA graphs.

    `run(feed)` copies the feed into static input buffers, sets the input shapes, binds every
    tensor address and enqueues `execute_async_v3` on the current torch stream. With
    `cuda_graph=True` the first run of a shape is eager, the second captures the enqueue into a
    CUDA graph, later runs replay it. Outputs are views of the static buffers (see caphuman.engines.base).
    """

    def __init__(self, plan_path: str | Path, spec: GraphSpec, *, cuda_graph: bool = True, device: int = 0,
                 library: TensorRTLibrary = DATACENTER):
        self.plan_path = Path(plan_path)
        built_with = _plan_library(self.plan_path)
        if built_with not in (None, library.name):
            raise EngineError(f"{plan_path} was built with {built_with}, not {library.name}: load it with the "
                              f"{built_with} backend, or rebuild it")
        trt = self._trt = library.load()
        library.check_device(device)
        self.library = library
        self.backend = library.name
        self.spec = spec
        self.device = torch.device("cuda", device)
        self.runtime = trt.Runtime(_logger(trt))  # must outlive the engine
        self.engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{plan_path}: {library.display} could not deserialize the plan (other library version "
                              "or GPU?)")
        self._runtime_cache = None
        if library.cache_kind == "runtime":
            self.context = self._context_with_runtime_cache(trt)
        else:
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(self._inputs) != sorted(spec.input_names) or sorted(self._outputs) != sorted(spec.output_names):
            raise EngineError(f"{plan_path}: engine I/O {self._inputs} -> {self._outputs} does not match the "
                              f"{spec.name} spec; rebuild it")
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.float_dtype = self._dtypes[spec.outputs[0].name]
        self.cuda_graph = cuda_graph
        self._buffers: dict[tuple, dict[str, torch.Tensor]] = {}
        self._graphs: dict[tuple, torch.cuda.CUDAGraph | None] = {}
        self._seen_once: set[tuple] = set()

    def _allocate(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        for name in self._inputs:
            if not self.context.set_input_shape(name, shapes[name]):
                raise ShapeError(f"{self.name}: input {name} shape {shapes[name]} is outside the engine's profile "
                                 f"{self.engine.get_tensor_profile_shape(name, 0)}")
        bufs = {n: torch.empty(shapes[n], dtype=self._dtypes[n], device=self.device) for n in self._inputs}
        for n in self._outputs:
            bufs[n] = torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtypes[n], device=self.device)
        return bufs

    def _enqueue(self, bufs: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> None:
        for n, b in bufs.items():
            self.context.set_tensor_address(n, b.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"{self.name}: execute_async_v3 failed")

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_feed(feed)
        key = tuple(tuple(feed[n].shape) for n in self._inputs)
        bufs = self._buffers.get(key)
        if bufs is None:
            bufs = self._buffers[key] = self._allocate({n: tuple(feed[n].shape) for n in self._inputs})
            self._graphs[key] = None
        else:
            for name in self._inputs:  # the context's shapes belong to the last key run
                self.context.set_input_shape(name, tuple(bufs[name].shape))
        for n in self._inputs:
            bufs[n].copy_(feed[n].to(self.device, self._dtypes[n]), non_blocking=True)
        stream = torch.cuda.current_stream(self.device)
        graph = self._graphs[key]
        if graph is not None:
            graph.replay()
        elif self.cuda_graph and key in self._seen_once:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
                self._enqueue(bufs, torch.cuda.current_stream(self.device))
            self._graphs[key] = graph
            graph.replay()
        else:
            self._enqueue(bufs, stream)
            self._seen_once.add(key)
        return {n: bufs[n] for n in self._outputs}

    def refit(self, weights: dict[str, np.ndarray]) -> None:
        """Replace weights by ONNX initializer name (`unet_refit_weights`) without a rebuild; drops
        the captured CUDA graphs (they may reference the old weights' memory)."""
        trt = self._trt
        refitter = trt.Refitter(self.engine, _logger(trt))
        known = set(refitter.get_all_weights())
        unknown = sorted(set(weights) - known)
        if unknown:
            raise EngineError(f"{self.name}: {len(unknown)} weights are not refittable in this engine: {unknown[:5]}"
                              " (was it built with REFIT, from the same graph?)")
        keep = []
        for name, arr in weights.items():
            arr = np.ascontiguousarray(arr)
            keep.append(arr)  # TensorRT reads the host memory during refit_cuda_engine
            if not refitter.set_named_weights(name, trt.Weights(arr)):
                raise EngineError(f"{self.name}: TensorRT refused new weights for {name} {arr.shape} {arr.dtype}")
        missing = refitter.get_missing_weights()
        if missing:
            raise EngineError(f"{self.name}: refit needs all of its weights; missing {list(missing)[:5]}")
        if not refitter.refit_cuda_engine():
            raise EngineError(f"{self.name}: TensorRT refit failed (see the TensorRT log)")
        self._graphs = {k: None for k in self._graphs}
        self._seen_once = set()

    @property
    def runtime_cache_path(self) -> Path:
        """Where the JIT-compiled kernels of this plan on this GPU are kept (next to the plan)."""
        _, sm = gpu_identity(self.device.index or 0)
        return self.plan_path.with_name(f"{self.plan_path.stem}.{sm}.runtime.cache")

    def _context_with_runtime_cache(self, trt):
        """TensorRT for RTX compiles kernels just in time for this GPU; the runtime cache keeps them across
        processes. A cache from another GPU, driver or library version is rejected by the library and
        started afresh."""
        runtime_config = self.engine.create_runtime_config()
        cache = runtime_config.create_runtime_cache()
        path = self.runtime_cache_path
        if path.is_file() and not cache.deserialize(path.read_bytes()):
            log.info("%s: runtime cache %s does not match this GPU/driver; starting a new one", self.name, path.name)
        runtime_config.set_runtime_cache(cache)
        self._runtime_cache = cache
        return self.engine.create_execution_context(runtime_config)

    def save_runtime_cache(self) -> Path | None:
        """Write the runtime cache next to the plan (TensorRT for RTX); called by close()."""
        if self._runtime_cache is None:
            return None
        path = self.runtime_cache_path
        tmp = path.with_suffix(".partial")
        tmp.write_bytes(bytes(self._runtime_cache.serialize()))
        tmp.replace(path)  # never leave a half-written cache for the next process
        return path

    def close(self) -> None:
        if self.context is not None:
            try:
                self.save_runtime_cache()
            except OSError as e:  # a read-only engine folder still serves
                log.warning("%s: runtime cache not saved: %s", self.name, e)
        self._graphs.clear()
        self._buffers.clear()
        self.context = None
        self._runtime_cache = None
        self.engine = None


def _plan_library(plan_path: Path) -> str | None:
    """The library a plan's sidecar names (None for a plan without one)."""
    sidecar = read_sidecar(plan_path)
    return None if sidecar is None else sidecar.get("library", "tensorrt")
