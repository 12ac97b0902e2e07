from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from caphuman.export.config import load_config, packaged_config

from tests.ldm_reference import CapHumanReference, official_alphas_cumprod, randomize_
from tests.paths import ROOT

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def load_bench(name: str):
    """A benchmark script under bench/ (not a package) as a module, for tests of its pure parts."""
    import importlib.util

    path = ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_interpreted(script: str, *args: str, timeout: int = 600) -> str:
    """Run ``script`` in a fresh Python with TRITON_INTERPRET=1 (it must be set before triton is first
    imported, which another test module may already have done here); returns its stdout."""
    import subprocess
    import sys

    root = ROOT
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=root, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"interpreted run failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def tiny_unet(seed: int = 0):
    """A two-level UNet2DConditionModel with cross-attention and GEGLU feed-forwards, small enough
    for the CPU interpreter."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8).eval()


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
