"""The import package: one top-level name, `caphuman`, mapped from the checkout's folders, and no bare
`kernels`/`tritonserver`/`runtime`/`export`/`engines` of ours that could shadow another distribution."""
from __future__ import annotations

import importlib.metadata
import importlib
import json
import re
import subprocess
import sys
import tomllib

import pytest

from tests.paths import ROOT

FOLDERS = ("export", "engines", "runtime", "kernels", "tritonserver")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
OLD_IMPORT = re.compile(rf"^\s*(from|import)\s+({'|'.join(FOLDERS)})(\.|\s|$)", re.M)
# a dotted module path after `-m` or a quote (the CLI dispatch table, subprocess calls), not a file name such as
# engines.json
OLD_MODULE_STRING = re.compile(rf"(-m\s+|[\"'])({'|'.join(FOLDERS)})\.(?!(json|log|md|yaml|txt)\b)[a-z_]+")


def _python_package_dirs() -> set[str]:
    """Folders holding Python modules, as dotted caphuman names (Triton's model.py files are loaded by path)."""
    found = set()
    for top in FOLDERS:
        for py in (ROOT / top).rglob("*.py"):
            rel = py.parent.relative_to(ROOT)
            if "model_repository" in rel.parts or "__pycache__" in rel.parts:
                continue
            found.add("caphuman." + ".".join(rel.parts))
    return found


def test_every_package_folder_is_declared_and_mapped():
    assert set(SETUPTOOLS["packages"]) == _python_package_dirs()
    assert SETUPTOOLS["package-dir"] == {f"caphuman.{top}": top for top in FOLDERS}


def test_top_level_folders_are_not_importable_packages():
    for top in FOLDERS:
        assert not (ROOT / top / "__init__.py").exists(), f"{top}/__init__.py would shadow another `{top}`"


def test_bare_names_from_the_checkout_root_are_never_ours():
    script = ("import importlib.util, json, sys\n"
              f"out = {{}}\nfor name in {FOLDERS!r}:\n"
              "    spec = importlib.util.find_spec(name)\n"
              "    out[name] = None if spec is None else [spec.origin, list(spec.submodule_search_locations or [])]\n"
              "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    for name, found in json.loads(proc.stdout).items():
        if found is None:
            continue
        origin, locations = found
        if origin not in (None, "namespace"):
            assert not origin.startswith(str(ROOT)), f"`import {name}` from the checkout root loads ours: {origin}"
        else:
            # a namespace portion: loses to any regular package of that name, and is empty of code
            assert all(not (p.startswith(str(ROOT)) and (ROOT / name / "__init__.py").exists()) for p in locations)


def test_hugging_face_kernels_wins_from_the_checkout_root():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed here (transformers < 5 does not need it)")
    proc = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert not proc.stdout.strip().startswith(str(ROOT))


def test_no_module_path_under_the_old_names():
    offenders = []
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    for path in (ROOT / name for name in tracked):
        if not path.is_file() or "results" in path.parts:
            continue
        if path.suffix not in {".py", ".sh", ".md", ".toml", ".j2", ".yaml", ".pbtxt"} and path.name != "Dockerfile":
            continue
        text = path.read_text(errors="replace")
        for rx in (OLD_IMPORT, OLD_MODULE_STRING):
            for m in rx.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0).strip()}")
    assert not offenders, "module paths under the old top-level names:\n" + "\n".join(offenders)


def test_console_script_resolves():
    target = PYPROJECT["project"]["scripts"]["caphuman"]
    module, func = target.split(":")
    assert module.startswith("caphuman.")
    assert callable(getattr(importlib.import_module(module), func))
