"""TensorRT: build engines from the exported graphs, cache them, refit them, run them.

Written to the TensorRT 10 Python API (`tensorrt` module: Builder, OnnxParser, IBuilderConfig,
optimization profiles, ITimingCache, Runtime, IExecutionContext.execute_async_v3, Refitter).
`tensorrt` is imported lazily: it cannot be installed on the machines this project is built and
tested on, so everything that does not need it -- profile shapes, cache keys, the refit weight
map -- is plain Python with its own tests, and the rest is tested where `tensorrt` imports.

    settings = BuildSettings(batch=(1, 1, 4), resolution=(256, 512, 1024))
    plan = build_engine("onnx/unet.onnx", spec, "engines/", settings)      # cached by content
    unet = TensorRTEngine(plan, spec)
    eps = unet.run(feed)["eps"]                                            # CUDA graph per shape
    unet.refit(unet_refit_weights("onnx/", "unet", config, "other-sd15.safetensors"))
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from caphuman.export.onnx_specs import GraphSpec, ShapeError

from .base import Engine, EngineError

log = logging.getLogger(__name__)

RESOLUTION_STEP = 64
RESOLUTION_RANGE = (256, 1024)
CFG_BATCH_GRAPHS = ("unet",)   # graphs that run on [cond, uncond] pairs: twice the batch


class TensorRTUnavailable(EngineError):
    """The `tensorrt` Python package (or a CUDA GPU) is not available here."""


def import_tensorrt():
    """`import tensorrt`, or a clear TensorRTUnavailable saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            "TensorRT is not installed: `pip install tensorrt` (NVIDIA's wheels, TensorRT >= 10) on a machine with "
            f"an NVIDIA GPU; the onnxruntime and torch backends work without it ({e})") from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} found; this code is written for TensorRT >= 10")
    return trt


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


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, "smXY") of a CUDA device, for the cache key."""
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need a CUDA GPU; none is visible")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"sm{major}{minor}"


def engine_cache_key(graph_sha256: str, gpu_name: str, sm: str, trt_version: str, settings: BuildSettings,
                     shapes: dict) -> str:
    """Content key of an engine: graph hash + GPU + SM + TensorRT version + settings + profile shapes.
    Any change rebuilds; nothing is reused on "file exists" alone."""
    blob = json.dumps({"graph": graph_sha256, "gpu": gpu_name, "sm": sm, "trt": trt_version,
                       "settings": asdict(settings), "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_file_name(graph: str, settings: BuildSettings, sm: str, key: str) -> str:
    return f"{graph}-{'fp16' if settings.fp16 else 'fp32'}-{sm}-{key[:12]}.plan"


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


class _Logger:
    """One trt.Logger per process (TensorRT keeps a reference to it)."""
    _logger = None

    @classmethod
    def get(cls, trt):
        if cls._logger is None:
            cls._logger = trt.Logger(trt.Logger.WARNING)
        return cls._logger


def build_engine(onnx_path: str | Path, spec: GraphSpec, out_dir: str | Path, settings: BuildSettings,
                 timing_cache: str | Path | None = None) -> Path:
    """Build (or find in the cache) the engine of one graph; returns the plan's path.

    The plan is `<graph>-<precision>-<sm>-<key>.plan` with a JSON sidecar of the key's fields; the
    timing cache (`timing.cache` in out_dir by default) is read before and written after the build.
    """
    from caphuman.export.onnx_export import graph_hash

    trt = import_tensorrt()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu, sm = gpu_identity()
    shapes = profile_shapes(spec, settings)
    key = engine_cache_key(graph_hash(onnx_path), gpu, sm, trt.__version__, settings, shapes)
    plan_path = out_dir / engine_file_name(spec.name, settings, sm, key)
    sidecar = plan_path.with_suffix(".json")
    if plan_path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()).get("key") == key:
        log.info("%s: cached engine %s", spec.name, plan_path.name)
        return plan_path

    logger = _Logger.get(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads <name>.onnx.data next to the graph itself
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors[:5]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    if settings.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if settings.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else out_dir / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    log.info("%s: building TensorRT engine (%s)", spec.name, "fp16" if settings.fp16 else "fp32")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build an engine for {onnx_path} (see the TensorRT log above)")
    plan_path.write_bytes(bytes(plan))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    sidecar.write_text(json.dumps({"key": key, "graph": spec.name, "onnx": onnx_path.name, "gpu": gpu, "sm": sm,
                                   "tensorrt": trt.__version__, "settings": asdict(settings),
                                   "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}}, indent=1))
    return plan_path


def build_engines(onnx_dir: Path, names: list[str], out_dir: Path, settings: BuildSettings) -> dict[str, Path]:
    """`caphuman build`: every named graph of an export folder; writes `engines.json` (graph -> plan)."""
    from caphuman.export.config import load_config, packaged_config
    from caphuman.export.onnx_specs import graph_specs

    import_tensorrt()
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    cfg_name = manifest.get("config", "cldm_v15.yaml")
    config = load_config(onnx_dir / cfg_name if (onnx_dir / cfg_name).is_file() else packaged_config(Path(cfg_name).stem))
    specs = graph_specs(config)
    built = {n: build_engine(onnx_dir / f"{n}.onnx", specs[n], out_dir, settings) for n in names}
    index = out_dir / "engines.json"
    old = json.loads(index.read_text()) if index.is_file() else {}
    old.update({n: {"plan": p.name} for n, p in built.items()})
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

    backend = "tensorrt"

    def __init__(self, plan_path: str | Path, spec: GraphSpec, *, cuda_graph: bool = True, device: int = 0):
        trt = self._trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("TensorRT engines need a CUDA GPU; none is visible")
        self.spec = spec
        self.device = torch.device("cuda", device)
        self.plan_path = Path(plan_path)
        self.runtime = trt.Runtime(_Logger.get(trt))  # must outlive the engine
        self.engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{plan_path}: TensorRT could not deserialize the plan (other TensorRT version or GPU?)")
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
        refitter = trt.Refitter(self.engine, _Logger.get(trt))
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

    def close(self) -> None:
        self._graphs.clear()
        self._buffers.clear()
        self.context = None
        self.engine = None
