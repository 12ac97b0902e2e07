"""A missing optional dependency is reported with the extra that installs it."""
from __future__ import annotations

import sys

import pytest

from caphuman.export.extras import EXTRA_OF, MissingExtra, require
from caphuman.runtime.cli import main


def test_require_returns_the_module():
    import json

    assert require("json", "nothing") is json


@pytest.mark.parametrize("module,extra", [("onnxruntime", "onnx"), ("tritonclient.grpc", "serve"), ("jinja2", "dev")])
def test_missing_module_names_its_extra(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingExtra, match=rf"caphuman-rt\[{extra}\]") as info:
        require(module, "this feature")
    assert "this feature needs" in str(info.value)
    assert EXTRA_OF[module.split(".")[0]] == extra


def test_cli_export_without_onnx_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    for name in [m for m in sys.modules if m.startswith(("caphuman.export.onnx", "caphuman.export.trt_ops"))]:
        monkeypatch.delitem(sys.modules, name)
    rc = main(["export", "--random-weights", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "caphuman-rt[onnx]" in err[0], err
