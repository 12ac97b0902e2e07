"""Optional dependencies: import one, or fail with the name of the caphuman-rt extra that installs it.

The base install runs generation and head conditions on the CPU or GPU with PyTorch; ONNX export and
ONNX Runtime, serving, the GPU fast paths and the deployment checks each come with an extra.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# top-level import name -> the extra that installs it
EXTRA_OF = {
    "onnx": "onnx", "onnxruntime": "onnx", "onnx_graphsurgeon": "onnx",
    "pytriton": "serve", "tritonclient": "serve",
    "triton": "gpu", "tensorrt": "gpu",
    "jinja2": "dev", "kubernetes_validate": "dev",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def install_hint(extra: str) -> str:
    return f"pip install 'caphuman-rt[{extra}]' (in a checkout: pip install -e '.[{extra}]')"


def require(module: str, purpose: str) -> ModuleType:
    """`importlib.import_module(module)`, or MissingExtra saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the package is there but one of ITS imports failed: show that error as it is
        extra = EXTRA_OF[top]
        raise MissingExtra(f"{purpose} needs the `{top}` package, which is not installed: "
                           f"{install_hint(extra)}") from None
