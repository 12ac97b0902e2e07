"""`caphuman client` trusts nothing the server sends: replies with hostile strings cannot place files outside
--out, odd replies are refused in one line, and every image is written as a PNG + JSON pair.

The server is replaced by a fake `CapHumanClient.stream` that yields the replies under test."""
from __future__ import annotations

import json

import numpy as np
import pytest

from caphuman.runtime.cli import main
from caphuman.tritonserver import client as client_mod
from caphuman.tritonserver.client import GeneratedImage, ServerError
from tests.paths import face_photo


def fake_server(monkeypatch, *replies):
    def stream(self, reference, prompts, **fields):
        yield from replies
    monkeypatch.setattr(client_mod.CapHumanClient, "stream", stream)


def image(seed, index=0, **meta):
    return GeneratedImage(index, np.full((8, 8, 3), 7, np.uint8), {"seed": seed, **meta})


def run_client(tmp_path, *extra):
    out = tmp_path / "sub" / "out"
    return out, main(["client", "--reference", str(face_photo("reference_196251.png")), "--prompt", "a photo",
                      "--seed", "5", "--out", str(out), "--no-progress", *extra])


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_hostile_seed_in_a_reply_writes_nothing_outside_out(tmp_path, monkeypatch, capsys):
    fake_server(monkeypatch, image("x/../../../escaped_by_server"))
    out, code = run_client(tmp_path)
    err = capsys.readouterr().err
    assert files_under(tmp_path) == [], "nothing may be written for a reply that is not the requested item"
    assert code == 2 and len(err.strip().splitlines()) == 1 and "seed" in err, err


def test_a_reply_is_written_under_the_requested_name_as_a_png_json_pair(tmp_path, monkeypatch):
    fake_server(monkeypatch, image(5, warnings=["\x1b[31mred\x1b[0m"]))
    out, code = run_client(tmp_path)
    assert code == 0
    assert files_under(tmp_path) == ["sub/out/caphuman_5.json", "sub/out/caphuman_5.png"]
    assert json.loads((out / "caphuman_5.json").read_text())["seed"] == 5
    assert (out / "caphuman_5.png").stat().st_mode & 0o777 == (out / "caphuman_5.json").stat().st_mode & 0o777
    assert (out / "caphuman_5.png").stat().st_mode & 0o044, "ordinary permissions (not mkstemp's 0600)"


@pytest.mark.parametrize("reply, word", [
    (GeneratedImage(3, np.zeros((8, 8, 3), np.uint8), {"seed": 8}), "item 3"),       # index out of the request
    (GeneratedImage(-1, np.zeros((8, 8, 3), np.uint8), {}), "item -1"),
    (GeneratedImage(0, np.zeros((8, 8), np.float32), {"seed": 5}), "not an RGB uint8 image"),
    (GeneratedImage(0, np.zeros((8, 8, 3), np.uint8), ["x"]), "metadata"),
])
def test_replies_that_are_not_an_image_of_the_request_are_refused_in_one_line(tmp_path, monkeypatch, capsys,
                                                                                reply, word):
    fake_server(monkeypatch, reply)
    _, code = run_client(tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and word in err, err
    assert files_under(tmp_path) == []


def test_server_error_status_is_set_for_every_server_error():
    assert ServerError("invalid request: STEPS must be ...").status == "StatusCode.INVALID_ARGUMENT"
    assert ServerError("internal error (RuntimeError): boom").status == "StatusCode.INTERNAL"
    assert ServerError("Stub process 'caphuman_0_0' is not healthy.").status == "StatusCode.UNKNOWN"
    assert ServerError("x", "StatusCode.UNAVAILABLE").status == "StatusCode.UNAVAILABLE"
