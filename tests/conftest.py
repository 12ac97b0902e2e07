from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from export.config import load_config, packaged_config

from .ldm_reference import CapHumanReference, official_alphas_cumprod, randomize_

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[2] / "shared"


def load_bench(name: str):
    """A benchmark script under bench/ (not a package) as a module, for tests of its pure parts."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    return packaged_config("cldm_tiny")


@pytest.fixture(scope="session")
def tiny_config(tiny_config_path):
    return load_config(tiny_config_path)


@pytest.fixture(scope="session")
def reference_model(tiny_config):
    """The independent ldm-layout CapHuman with random weights (every layer non-zero)."""
    ref = randomize_(CapHumanReference(tiny_config), seed=1).eval()
    return ref


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory, reference_model) -> Path:
    """A caphuman.ckpt in the official layout: a Lightning-style dict with 'state_dict'."""
    path = tmp_path_factory.mktemp("ckpt") / "caphuman.ckpt"
    state = dict(reference_model.state_dict())
    state["alphas_cumprod"] = official_alphas_cumprod()
    torch.save({"state_dict": state, "global_step": 1000, "epoch": 3}, path)
    return path
