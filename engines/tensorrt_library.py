"""The two TensorRT libraries one engine code serves, and the few ways in which they differ.

- **tensorrt** (datacenter TensorRT >= 10, NVIDIA's package index or the NGC container): engines are
  built on the GPU that runs them, precision is a builder flag on a weakly typed network (FP16), and
  a timing cache speeds up rebuilds.
- **tensorrt-rtx** (TensorRT for RTX, PyPI wheels `tensorrt-rtx-cu13-*`, import name
  `tensorrt_rtx_bindings`): engines are compiled ahead of time on any x86-64 machine, GPU or not, for
  a list of compute capabilities, and specialised just in time on the user's RTX GPU. Networks are
  strongly typed (an fp16 engine comes from an fp16 graph: `caphuman export --fp16`), and a runtime
  cache of JIT-compiled kernels replaces the timing cache.

Everything else (parsing our ONNX graphs, optimization profiles, refit, the content-keyed engine cache)
is the same API and lives in `caphuman.engines.tensorrt_engine`.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

import torch

from .base import EngineError


class TensorRTUnavailable(EngineError):
    """The library (or a GPU it runs on) is not available here."""


@dataclass(frozen=True)
class BuildTarget:
    """What an engine is built for; part of its cache key and file name."""
    library: str          # "tensorrt" | "tensorrt-rtx"
    version: str          # the library's version
    device: str           # the GPU it was built on, or "portable" (an RTX build for compute capabilities)
    arch: str             # "sm90" (the build GPU) or "sm80+sm86+sm89+sm120" (RTX targets)

    @property
    def tag(self) -> str:
        """Short file-name part: 'sm90' for datacenter engines, 'rtx-sm80.86.89.120' for RTX ones."""
        if self.library == "tensorrt":
            return self.arch
        return "rtx-sm" + ".".join(a.removeprefix("sm") for a in self.arch.split("+"))


@dataclass(frozen=True)
class TensorRTLibrary:
    """One TensorRT library: how to import it and its library-specific build and run settings."""
    name: str                                # backend name: "tensorrt" | "tensorrt-rtx"
    module: str                              # Python import name
    install_hint: str
    strongly_typed: bool                     # precision comes from the graph's dtypes, not a builder flag
    cache_kind: str                          # "timing" (build-time tactic timings) | "runtime" (JIT kernels)
    compute_capabilities: tuple[str, ...]    # portable build targets; () = the GPU the build runs on
    supported_gpus: str                      # for errors where the engines cannot run

    def load(self):
        """Import the library, or raise TensorRTUnavailable saying how to get it."""
        try:
            trt = importlib.import_module(self.module)
        except ImportError as e:
            raise TensorRTUnavailable(f"{self.display} is not installed: {self.install_hint}; the onnxruntime and "
                                      f"torch backends work without it ({e})") from None
        if self.name == "tensorrt" and int(trt.__version__.split(".")[0]) < 10:
            raise TensorRTUnavailable(f"TensorRT {trt.__version__} found; this code is written for TensorRT >= 10")
        return trt

    @property
    def display(self) -> str:
        return "TensorRT for RTX" if self.name == "tensorrt-rtx" else "TensorRT"

    def build_target(self, trt) -> BuildTarget:
        """Datacenter engines belong to the GPU they are built on (one is needed); RTX engines to the
        library's compute-capability targets, so any machine builds them."""
        if self.compute_capabilities:
            return BuildTarget(self.name, trt.__version__, "portable", "+".join(self.compute_capabilities))
        name, sm = gpu_identity()
        return BuildTarget(self.name, trt.__version__, name, sm)

    def network_flags(self, trt) -> int:
        # TensorRT 10: explicit batch is the only mode (flags 0); TensorRT for RTX only builds typed networks
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if self.strongly_typed else 0

    def set_targets(self, trt, config) -> None:
        """Name the RTX compute capabilities explicitly (the build then does not depend on the library's
        default list, and the cache key says what the engine runs on)."""
        if not self.compute_capabilities:
            return
        config.num_compute_capabilities = len(self.compute_capabilities)
        for i, cc in enumerate(self.compute_capabilities):
            if not config.set_compute_capability(getattr(trt.ComputeCapability, cc.upper()), i):
                raise EngineError(f"{self.display} {trt.__version__} refused compute capability {cc}")

    def check_device(self, device: int = 0) -> None:
        """Raise TensorRTUnavailable (one line naming the supported GPUs) where these engines cannot run."""
        if not torch.cuda.is_available():
            raise TensorRTUnavailable(f"{self.display} engines run on {self.supported_gpus}; no CUDA GPU is visible "
                                      "here (building them needs none: `caphuman build`)")
        if not self.compute_capabilities:
            return
        name, sm = gpu_identity(device)
        if not runs_rtx_engine(sm, self.compute_capabilities):
            raise TensorRTUnavailable(f"{self.display} engines run on {self.supported_gpus}; this GPU is {name} ({sm})")


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, "smXY") of a CUDA device."""
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need a CUDA GPU to be built and run on; none is visible")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"sm{major}{minor}"


def runs_rtx_engine(sm: str, targets: tuple[str, ...]) -> bool:
    """Whether a GPU of compute capability `sm` ("sm89") runs an RTX engine built for `targets`: an exact
    target, or a later minor revision of the Blackwell target (12.x)."""
    if sm in targets:
        return True
    m = re.fullmatch(r"sm(\d+?)(\d)", sm)
    return bool(m) and m.group(1) == "12" and any(t.startswith("sm12") for t in targets)


DATACENTER = TensorRTLibrary(
    name="tensorrt", module="tensorrt",
    install_hint="`pip install tensorrt` (NVIDIA's wheels, TensorRT >= 10) on a machine with an NVIDIA GPU",
    strongly_typed=False, cache_kind="timing", compute_capabilities=(),
    supported_gpus="the NVIDIA GPU they were built on (datacenter GPUs: Ampere, Hopper, Blackwell)")

RTX = TensorRTLibrary(
    name="tensorrt-rtx", module="tensorrt_rtx_bindings",
    install_hint="`pip install 'caphuman-rt[tensorrt-rtx]'` (PyPI wheels, Linux x86-64)",
    strongly_typed=True, cache_kind="runtime", compute_capabilities=("sm80", "sm86", "sm89", "sm120"),
    supported_gpus="NVIDIA RTX GPUs: Ampere (sm80, sm86), Ada (sm89) and Blackwell (sm120 and later 12.x); "
                   "not Hopper")

LIBRARIES = {lib.name: lib for lib in (DATACENTER, RTX)}


def library(name: str) -> TensorRTLibrary:
    if name not in LIBRARIES:
        raise ValueError(f"TensorRT library must be one of {sorted(LIBRARIES)}, got {name!r}")
    return LIBRARIES[name]
