"""ONNX export of every CapHuman network: export -> clean up -> save -> shape inference -> checks.

    sources = load_sources("cldm_v15.yaml", checkpoint="caphuman.ckpt", names=["unet", "capface"])
    reports = export_graphs(sources, ["unet", "capface"], "onnx/", fp16=True)

Exporter: torch.onnx.export with the TorchScript exporter (`dynamo=False`), opset 17. The dynamo
exporter needs onnxscript (not a dependency here) and its graphs of diffusers' UNet carry more
shape arithmetic; the TorchScript exporter traces diffusers' UNet/ControlNet/AutoencoderKL and
transformers' CLIP cleanly at opset 17, which every TensorRT 10 release parses (opset 9..20).
`keep_initializers_as_inputs=True` during export turns off the exporter's value deduplication of
weights (two LayerNorms with equal weights would otherwise share one initializer, and a TensorRT
refit with another checkpoint could not set them apart); the initializers are removed from the
graph inputs afterwards.

Each graph lands as `<out>/<name>.onnx` (+ `<name>.onnx.data` above 2 GB), with `manifest.json`
describing every graph's I/O, dtype, opset, hash and validation error, and `<name>.refit.json` for
the UNet-bearing graphs (`caphuman.export.onnx_refit`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import onnx_wrappers as W
from .checkpoints import VISION_PREFIX, read_official
from .clip import ImageEncoder, TextEncoder
from .config import CapHumanConfig, load_config
from .extras import require
from .fingerprint import file_sha256
from .models import (VAE, CapHumanDenoiser, clip_folder_state, denoiser_from_state, image_encoder_from_state,
                     text_encoder_from_state, vae_from_state)
from .onnx_refit import RefitError, build_refit_map, save_refit_map
from .onnx_specs import FACE_GRAPHS, NETWORK_GRAPHS, GraphSpec, graph_specs
from .trt_ops import check_model

onnx = require("onnx", "ONNX export and graph checks")

log = logging.getLogger(__name__)

OPSET = 17
EXTERNAL_DATA_THRESHOLD = 1800 << 20  # protobuf's hard limit is 2 GiB; stay clear of it
REFIT_GRAPHS = {"unet": "unet.", "denoiser": "den.unet."}  # graph -> parameter prefix of the UNet


class ExportError(RuntimeError):
    """A graph could not be exported or failed a check."""


@dataclass
class ExportSources:
    """The PyTorch networks to export (any may be None when its graphs are not asked for)."""
    config: CapHumanConfig
    denoiser: CapHumanDenoiser | None = None
    vae: VAE | None = None
    text: TextEncoder | None = None
    image: ImageEncoder | None = None
    facenet: nn.Module | None = None
    bisenet: nn.Module | None = None
    deca: nn.Module | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class GraphReport:
    name: str
    path: str
    dtype: str
    opset: int
    seconds: float
    bytes: int
    external_data: bool
    sha256: str
    nodes: int
    op_types: list[str]
    trt_problems: list[str]
    validation: dict[str, float] = field(default_factory=dict)   # output -> relative error vs PyTorch
    validation_note: str = ""
    refit_unmapped: list[str] | None = None


_NEEDS = {"text_encoder": ("text",), "image_encoder": ("image", "denoiser"), "capface": ("denoiser",),
          "unet": ("denoiser",), "denoiser": ("denoiser",), "vae_decoder": ("vae",), "vae_encoder": ("vae",),
          "facenet": ("facenet", "denoiser"), "bisenet": ("bisenet",), "deca_encoder": ("deca",)}


def face_modules_available() -> dict[str, bool]:
    """Whether the face networks' modules (export/face/, another engineer's work) exist here."""
    out = {}
    for graph, mod in (("facenet", "facenet"), ("bisenet", "bisenet"), ("deca_encoder", "deca_encoder")):
        try:
            __import__(f"caphuman.export.face.{mod}")
            out[graph] = True
        except ImportError:
            out[graph] = False
    return out


def _random_face_nets(names) -> dict[str, nn.Module]:
    nets = {}
    if "facenet" in names:
        from .face.facenet import InceptionResnetV1
        nets["facenet"] = InceptionResnetV1().eval()
    if "bisenet" in names:
        from .face.bisenet import BiSeNet
        nets["bisenet"] = BiSeNet().eval()
    if "deca_encoder" in names:
        from .face.deca_encoder import DecaEncoder
        nets["deca"] = DecaEncoder().eval()
    return nets


def load_sources(config_path, checkpoint=None, sd_checkpoint=None, vae_checkpoint=None, clip_dir=None, *,
                 names=NETWORK_GRAPHS, random_weights: bool = False, seed: int = 0, facenet=None, bisenet=None,
                 deca=None) -> ExportSources:
    """The networks that `names` need, from the official files (or random weights for tests/benchmarks)."""
    config = load_config(config_path)
    need = {n for g in names for n in _NEEDS[g]}
    src = ExportSources(config)
    if random_weights:
        torch.manual_seed(seed)
        if "denoiser" in need:
            src.denoiser = CapHumanDenoiser(config).eval()
        if "vae" in need:
            src.vae = VAE(config).eval()
        if "text" in need:
            src.text = TextEncoder(config.text_clip).eval()
        if "image" in need:
            src.image = ImageEncoder(config.vision_clip).eval()
        for k, v in _random_face_nets(names).items():
            setattr(src, k, v)
        for m in (src.denoiser, src.vae, src.text, src.image):
            if m is not None:
                distinct_random_(m, seed)
        src.notes.append(f"random weights (seed {seed})")
    else:
        if checkpoint is None:
            raise ValueError("a checkpoint is needed (or random weights)")
        state = read_official(checkpoint, sd_checkpoint, vae_checkpoint)
        if "image" in need and not any(k.startswith(VISION_PREFIX) for k in state) and clip_dir:
            state.update(clip_folder_state(clip_dir, "vision_model"))
        if "denoiser" in need:
            src.denoiser = denoiser_from_state(config, state)
        if "vae" in need:
            src.vae = vae_from_state(config, state)
        if "text" in need:
            src.text = text_encoder_from_state(config, state, clip_dir)
        if "image" in need:
            src.image = image_encoder_from_state(config, state)
        del state
        face_paths = {"facenet": facenet, "bisenet": bisenet, "deca_encoder": deca}
        for g in FACE_GRAPHS:
            if g in names:
                if face_paths[g] is None:
                    raise ValueError(f"graph {g!r} needs its weight file (--{g.replace('_encoder', '')})")
                if g == "facenet":
                    from .face.facenet import load_facenet
                    src.facenet = load_facenet(face_paths[g])
                elif g == "bisenet":
                    from .face.bisenet import load_bisenet
                    src.bisenet = load_bisenet(face_paths[g])
                else:
                    from .face.deca_encoder import load_deca_encoder
                    src.deca = load_deca_encoder(face_paths[g])
    for m in (src.denoiser, src.vae, src.text, src.image, src.facenet, src.bisenet, src.deca):
        if m is not None:
            m.eval().requires_grad_(False)
    return src


@torch.no_grad()
def distinct_random_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every constant-valued parameter (norm weights of ones, zero biases, zero convs) so that
    random-weight graphs look like trained ones: every weight distinct, every branch active."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        flat = p.detach().reshape(-1)
        if flat.numel() > 1 and bool((flat == flat[0]).all()):
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)
    return module


def graph_module(name: str, src: ExportSources) -> nn.Module:
    """The trace-clean wrapper for graph `name`."""
    den = src.denoiser
    builders: dict[str, Callable[[], nn.Module]] = {
        "text_encoder": lambda: W.TextEncoderGraph(src.text),
        "image_encoder": lambda: W.ImageEncoderGraph(src.image, den.img_linear),
        "capface": lambda: W.CapFaceGraph(den),
        "unet": lambda: W.UNetGraph(den),
        "denoiser": lambda: W.DenoiserGraph(den),
        "vae_decoder": lambda: W.VAEDecoderGraph(src.vae),
        "vae_encoder": lambda: W.VAEEncoderGraph(src.vae),
        "facenet": lambda: W.FaceNetGraph(src.facenet, den.id_linear),
        "bisenet": lambda: W.PlainGraph(src.bisenet),
        "deca_encoder": lambda: W.PlainGraph(src.deca),
    }
    if name not in builders:
        raise ValueError(f"unknown graph {name!r}; known: {sorted(builders)}")
    missing = [n for n in _NEEDS[name] if getattr(src, n) is None]
    if missing:
        raise ValueError(f"graph {name!r} needs the {', '.join(missing)} network(s), which were not loaded")
    return builders[name]().eval()


def trace_size(config: CapHumanConfig) -> tuple[int, int]:
    """Image size for tracing: large enough that the deepest UNet level is 2x2 or more."""
    levels = len(config.unet.channel_mult)
    side = max(64, 8 * 2 ** (levels - 1) * 2)
    return side, side



def graph_hash(path: str | Path) -> str:
    """sha256 over the graph file and its external data file (if any): the engine cache key's graph part."""
    path = Path(path)
    h = hashlib.sha256(file_sha256(path).encode())
    data = path.with_name(path.name + ".data")
    if data.is_file():
        h.update(file_sha256(data).encode())
    return h.hexdigest()


def cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop initializers from the graph inputs, dead nodes and unused initializers; topological order.

    onnx-graphsurgeon's cleanup/toposort when it is installed, else the same with onnx alone.
    """
    inits = {i.name for i in model.graph.initializer}
    keep_inputs = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep_inputs)
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        gs = None
    if _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        gs = None  # graphsurgeon copies every weight; full-size fp32 graphs would need twice their size in RAM
    if gs is not None:
        graph = gs.import_onnx(model)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        cleaned = gs.export_onnx(graph, do_type_check=False)
        del cleaned.opset_import[:]
        cleaned.opset_import.extend(model.opset_import)
        cleaned.ir_version = model.ir_version
        return cleaned
    return _dead_code_elimination(model)


def _dead_code_elimination(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    live = {o.name for o in g.output}
    kept = []
    for node in reversed(g.node):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(i for i in node.input if i)
    kept.reverse()
    del g.node[:]
    g.node.extend(kept)
    used_inits = [i for i in g.initializer if i.name in live]
    del g.initializer[:]
    g.initializer.extend(used_inits)
    return model


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for i in model.graph.initializer:
        n = int(np.prod(i.dims)) if len(i.dims) else 1
        total += n * (2 if i.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) else 4 if i.data_type
                      in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT32) else 8)
    return total


def save_model(model: onnx.ModelProto, path: Path) -> bool:
    """Save; weights go to `<name>.onnx.data` when the model is near protobuf's 2 GB limit. Returns
    whether external data was used."""
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        data.chmod(0o644)  # onnx creates it owner-only; serving may run as another user
    else:
        onnx.save_model(model, str(path))
    return external


@contextlib.contextmanager
def _global_avg_pool_war():
    """WAR(BiSeNet): `F.avg_pool2d(x, x.shape[2:])` takes its kernel from traced shapes, which the
    ONNX exporter cannot export. During the trace only, a pool whose kernel covers the whole feature
    map is traced as `adaptive_avg_pool2d(x, 1)` (GlobalAveragePool: the same mean); the graph is then
    validated against the unpatched module. Other calls pass through unchanged."""
    original = torch.nn.functional.avg_pool2d

    def pool(x, kernel_size, *args, **kwargs):
        k = tuple(int(v) for v in (kernel_size if isinstance(kernel_size, (tuple, list, torch.Size)) else
                                   (kernel_size, kernel_size)))
        if not args and not kwargs and k == tuple(int(v) for v in x.shape[2:]):
            return torch.nn.functional.adaptive_avg_pool2d(x, 1)
        return original(x, kernel_size, *args, **kwargs)

    torch.nn.functional.avg_pool2d = pool
    try:
        yield
    finally:
        torch.nn.functional.avg_pool2d = original


def export_graph(name: str, module: nn.Module, spec: GraphSpec, path: Path, *, float_dtype=torch.float32,
                 opset: int = OPSET, size: tuple[int, int] = (64, 64), stage: Callable[[str], None] = lambda s: None
                 ) -> GraphReport:
    """Export one wrapper to `path`, clean it up, infer shapes, run the ONNX checker and the TensorRT
    operator check; write `<name>.refit.json` for UNet-bearing graphs."""
    t0 = time.perf_counter()
    module = module.to(float_dtype)
    h, w = spec.fixed_size or size
    feed = spec.sample_inputs(2, h, w, float_dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{name}-") as tmp:
        raw = Path(tmp) / f"{name}.onnx"
        stage("trace + export")
        war = _global_avg_pool_war() if name == "bisenet" else contextlib.nullcontext()
        with torch.no_grad(), warnings.catch_warnings(), war:
            warnings.simplefilter("ignore")  # TracerWarnings of diffusers' shape asserts; deprecation notes
            torch.onnx.export(module, tuple(feed.values()), str(raw), input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(), opset_version=opset,
                              do_constant_folding=True, keep_initializers_as_inputs=True, dynamo=False)
        stage("clean up")
        model = cleanup(onnx.load(str(raw)))
    refit_unmapped = None
    if name in REFIT_GRAPHS:
        stage("refit map")
        refit_path = path.with_name(f"{name}.refit.json")
        try:
            entries, unmapped = build_refit_map(model, module.state_dict(), (REFIT_GRAPHS[name],))
            save_refit_map(refit_path, entries, unmapped)
            refit_unmapped = unmapped
        except RefitError as e:  # untrained weights with many equal tensors: no refit, the graph is fine
            log.info("%s: no refit map (%s)", name, e)
            refit_path.unlink(missing_ok=True)
    stage("save + shape inference")
    external = save_model(model, path)
    nodes, ops = len(model.graph.node), sorted({n.op_type for n in model.graph.node})
    problems = [str(p) for p in check_model(model)]
    del model
    onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True)
    stage("onnx checker")
    onnx.checker.check_model(str(path), full_check=True)
    size_bytes = path.stat().st_size + (path.with_name(path.name + ".data").stat().st_size if external else 0)
    return GraphReport(name, str(path), str(float_dtype).removeprefix("torch."), opset,
                       round(time.perf_counter() - t0, 2), size_bytes, external, graph_hash(path), nodes, ops, problems,
                       refit_unmapped=refit_unmapped)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def validate_graph(path: Path, module: nn.Module, spec: GraphSpec, *, float_dtype=torch.float32,
                   size: tuple[int, int] = (64, 128), batch: int = 1, seed: int = 1,
                   providers: list[str] | None = None) -> dict[str, float]:
    """Run the graph under ONNX Runtime and the wrapper in PyTorch on the same random inputs (a batch
    and a size other than the traced ones, so the dynamic axes are exercised); relative error per output."""
    ort = require("onnxruntime", "checking ONNX graphs against PyTorch")

    h, w = spec.fixed_size or size
    feed = spec.sample_inputs(batch, h, w, float_dtype, seed=seed)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    got = sess.run(spec.output_names, {k: v.numpy() for k, v in feed.items()})
    with torch.no_grad():
        want = module.to(float_dtype)(*feed.values())
    return {n: rel_err(g, t.float().numpy()) for n, g, t in zip(spec.output_names, got, want)}


def export_graphs(src: ExportSources, names, out_dir, *, fp16: bool = False, opset: int = OPSET, validate: bool = True,
                  progress: bool = True, size: tuple[int, int] | None = None) -> list[GraphReport]:
    """Export `names` into `out_dir` with a progress display; write/merge `manifest.json`."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = graph_specs(src.config)
    dtype = torch.float16 if fp16 else torch.float32
    size = size or trace_size(src.config)
    reports = []
    bar = tqdm(list(names), desc="export", unit="graph", disable=not progress)
    for name in bar:
        spec = specs[name]
        module = graph_module(name, src)

        def stage(s, _n=name):
            bar.set_postfix_str(f"{_n}: {s}")

        rep = export_graph(name, module, spec, out_dir / f"{name}.onnx", float_dtype=dtype, opset=opset, size=size,
                           stage=stage)
        if validate:
            stage("validate (ONNX Runtime vs PyTorch)")
            try:
                vsize = (size[0], size[1] + 64)
                rep.validation = validate_graph(Path(rep.path), module, spec, float_dtype=dtype, size=vsize)
            except Exception as e:  # noqa: BLE001 - ORT's CPU provider lacks some fp16 kernels
                if not fp16:
                    raise
                rep.validation_note = f"fp16 not run on ONNX Runtime's CPU provider ({type(e).__name__}); check on a GPU"
        module.float()
        reports.append(rep)
        errs = ", ".join(f"{k} {v:.2e}" for k, v in rep.validation.items()) or rep.validation_note or "not validated"
        bar.write(f"{name:>13}: {rep.nodes} nodes, {rep.bytes / 2**20:.1f} MiB{' (+external data)' if rep.external_data else ''}, "
                  f"{rep.seconds:.1f} s; TensorRT ops {'ok' if not rep.trt_problems else rep.trt_problems[:3]}; "
                  f"ORT rel. error: {errs}")
    _write_manifest(out_dir, src, specs, reports)
    return reports


def source_fingerprints(src: ExportSources, names) -> dict[str, str]:
    """graph -> `weights_fingerprint` of the network(s) it is made from (the denoiser graphs: of the whole
    denoiser, as the onnxruntime backend compares it with the loaded one)."""
    from .fingerprint import weights_fingerprint
    cache: dict[str, str] = {}
    out = {}
    for name in names:
        parts = [n for n in _NEEDS[name] if getattr(src, n) is not None]
        for n in parts:
            if n not in cache:
                cache[n] = weights_fingerprint(getattr(src, n))
        out[name] = cache[parts[0]] if len(parts) == 1 else \
            hashlib.sha256("".join(cache[n] for n in parts).encode()).hexdigest()
    return out


def _write_manifest(out_dir: Path, src: ExportSources, specs: dict[str, GraphSpec], reports: list[GraphReport]) -> None:
    path = out_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {"graphs": {}}
    manifest.update(config=Path(src.config.path).name, torch=torch.__version__, onnx=onnx.__version__,
                    notes=src.notes)
    fingerprints = source_fingerprints(src, [rep.name for rep in reports])
    for rep in reports:
        spec = specs[rep.name]
        manifest["graphs"][rep.name] = {
            **asdict(rep), "path": Path(rep.path).name, "doc": spec.doc, "weights_sha256": fingerprints[rep.name],
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.outputs],
            "fixed_size": spec.fixed_size}
    path.write_text(json.dumps(manifest, indent=1))
