"""Which networks each served model loads: the official files from a weights folder, or tiny random ones.

`caphuman serve --weights DIR` sets CAPHUMAN_WEIGHTS=DIR for the server; every model reads it in
`initialize`. The folder holds the official files under their official names (the rule lives in
`caphuman.runtime.weights_layout`, which `caphuman generate --weights DIR` uses too):

    caphuman.ckpt                          required (CapFace, projections, CLIP image encoder, UNet/VAE/text)
    caphuman-merged.safetensors            optional: caphuman.ckpt + SD + VAE merged (`caphuman build --weights-out`),
                                           read instead of them, straight to the GPU
    <one SD1.x>.ckpt | .safetensors        optional, overrides UNet/VAE/text (e.g. Realistic_Vision_V3.0.ckpt)
    vae*.ckpt                              optional, overrides the VAE (vae-ft-mse-840000-ema-pruned.ckpt)
    clip-vit-large-patch14/                optional tokenizer folder
    20180402-114759-vggface2.pt            FaceNet (name must contain 'vggface2' or start with 'facenet')
    79999_iter.pth                         BiSeNet face parsing
    deca_model.tar                         optional DECA encoder (else neutral head codes)
    generic_model.pkl, FLAME_texture.npz   optional FLAME (else the rigid template head)

Without CAPHUMAN_WEIGHTS every model builds the same seeded tiny random-weight networks (the
`cldm_tiny` config), says so in the server log, and every response's metadata says
`"random_weights": true`. CAPHUMAN_RANDOM_CONFIG=cldm_v15 (`caphuman serve --random-config cldm_v15`)
builds them at the official sizes instead: same compute as the real model, for benchmarks.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from caphuman.runtime.weights_layout import WeightFiles  # the folder layout, shared with `caphuman generate --weights`

WEIGHTS_ENV = "CAPHUMAN_WEIGHTS"
RANDOM_CONFIG_ENV = "CAPHUMAN_RANDOM_CONFIG"   # packaged config of the random-weight networks (default cldm_tiny)
RANDOM_WEIGHTS_NOTICE = ("NO WEIGHTS GIVEN: serving the built-in TINY model with RANDOM weights; images are "
                         "patterns, not photos. Start with `caphuman serve --weights DIR` for real images.")
TINY_SEED = 0
BACKEND_ENV = "CAPHUMAN_BACKEND"           # launch option: the caphuman model's backend (overrides config.pbtxt)
ENGINE_DIR_ENV = "CAPHUMAN_ENGINE_DIR"     # ONNX graphs or TensorRT engines (the entrypoint sets it after a build)


def weight_files(environ=os.environ) -> WeightFiles | None:
    root = environ.get(WEIGHTS_ENV, "").strip()
    return WeightFiles.discover(root) if root else None


def random_config(environ=os.environ) -> str:
    name = environ.get(RANDOM_CONFIG_ENV, "").strip() or "cldm_tiny"
    if name not in ("cldm_tiny", "cldm_v15"):
        raise ValueError(f"{RANDOM_CONFIG_ENV} must be cldm_tiny or cldm_v15, got {name!r}")
    return name


def serving_networks(files: WeightFiles | None, device: str, with_image_encoder: bool = False):
    """The served networks (`caphuman.runtime.pipeline.Networks`): the official files in fp16 on CUDA (fp32 on the
    CPU), or seeded RANDOM weights of `random_config()`'s size without files."""
    from caphuman.runtime.pipeline import load_networks, random_networks
    if files is None:
        return random_networks(random_config(), seed=TINY_SEED, device=device, with_image_encoder=with_image_encoder)
    from caphuman.export.config import packaged_config
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    return load_networks(packaged_config("cldm_v15"), files.checkpoint, files.sd_checkpoint, files.vae_checkpoint,
                         files.clip_dir, device=device, dtype=dtype, with_image_encoder=with_image_encoder)


def load_generation_pipeline(files: WeightFiles | None, device: str, backend: str = "eager",
                             engine_dir: str | None = None, compile: bool = False):
    """The orchestrator's CapHumanPipeline on `backend`'s engine (fp16 networks on CUDA; the graph backends
    keep fp32 graphs on the CPU)."""
    from caphuman.runtime.pipeline import build_pipeline
    nets = serving_networks(files, device)
    cuda = device.startswith("cuda")
    options = {"compile": compile} if backend == "torch" and compile else {}
    if backend == "torch" and engine_dir is not None and _has_torch_artifacts(engine_dir):
        options["engine_dir"] = engine_dir  # compiled torch artifacts (`caphuman build --backend torch`)
    if backend in ("eager", "torch"):
        return build_pipeline(nets, backend, device=device, dtype=torch.float16 if cuda else torch.float32, **options)
    if backend == "onnxruntime":
        return build_pipeline(nets.to(device, torch.float32), backend, device=device, dtype=torch.float32,
                              engine_dir=engine_dir)
    return build_pipeline(nets, backend, device=device, engine_dir=engine_dir)


def _has_torch_artifacts(engine_dir: str) -> bool:
    """Whether the folder holds torch artifacts (a folder of TensorRT plans only does not turn compile on)."""
    from caphuman.engines.torch_artifacts import ARTIFACT_GLOB
    return any(Path(engine_dir).glob(ARTIFACT_GLOB))


def load_face_networks(files: WeightFiles | None, device: str):
    """(FaceNet, BiSeNet) for the identity context: official weights, or seeded random ones (tiny mode)."""
    from caphuman.export.face.bisenet import load_bisenet
    from caphuman.export.face.facenet import load_facenet
    if files is None:
        from caphuman.runtime.pipeline import random_face_networks
        return random_face_networks(TINY_SEED, device)
    if files.facenet is None or files.bisenet is None:
        raise FileNotFoundError(f"weights folder {files.root} needs the FaceNet VGGFace2 weights "
                                "(20180402-114759-vggface2.pt) and BiSeNet's 79999_iter.pth for the identity model")
    return load_facenet(files.facenet).eval().to(device), load_bisenet(files.bisenet).eval().to(device)


def load_condition_builder(files: WeightFiles | None):
    from caphuman.runtime.condition import ConditionBuilder
    if files is None:
        return ConditionBuilder()
    return ConditionBuilder(files.deca, files.flame_model, files.flame_texture)


def serving_backend(configured: str = "auto", configured_dir: str = "", cuda: bool = False,
                    environ=os.environ) -> tuple[str, str | None]:
    """(backend, engine folder) of the `caphuman` model: the launch options (CAPHUMAN_BACKEND,
    CAPHUMAN_ENGINE_DIR) over config.pbtxt's `engine` and `engine_dir`. "auto" serves the TensorRT engines
    when a folder of them is given, TensorRT imports and there is a GPU; else the torch engine on CUDA and
    the eager modules on the CPU."""
    from caphuman.engines.factory import BACKENDS
    backend = environ.get(BACKEND_ENV, "").strip() or configured.strip() or "auto"
    engine_dir = environ.get(ENGINE_DIR_ENV, "").strip() or configured_dir.strip() or None
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"engine must be one of {('auto', *BACKENDS)}, got {backend!r}")
    if backend == "auto":
        has_plans = engine_dir is not None and (Path(engine_dir) / "engines.json").is_file()
        if has_plans and cuda and importlib.util.find_spec("tensorrt") is not None:
            backend = "tensorrt"
        else:
            backend = "torch" if cuda else "eager"
    if backend in ("tensorrt", "tensorrt-rtx") and engine_dir is None:
        raise ValueError(f"engine {backend!r} needs an engine folder: config.pbtxt engine_dir or {ENGINE_DIR_ENV}")
    return backend, engine_dir
