"""Serving pieces that need no running server: the request table vs config.pbtxt, request validation,
photo decoding limits, weights discovery, the launcher's command line, the client's request arrays."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caphuman.tritonserver import params
from caphuman.tritonserver.params import (RequestError, ServerSettings, check_request_photos, parse_request,
                                          request_arrays)
from caphuman.tritonserver.services import LRU, decode_photo
from caphuman.tritonserver.weights import WeightFiles
from tests.paths import ROOT

REPO = ROOT / "tritonserver" / "model_repository"


def _config(model: str):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason="tritonclient[grpc] not installed")
    from google.protobuf import text_format
    return text_format.Parse((REPO / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _type_name(enum_value: int) -> str:
    from tritonclient.grpc import model_config_pb2
    return model_config_pb2.DataType.Name(enum_value).removeprefix("TYPE_")


def test_caphuman_config_matches_the_request_table():
    cfg = _config("caphuman")
    assert cfg.name == "caphuman" and cfg.backend == "python" and cfg.model_transaction_policy.decoupled
    got = {i.name: (_type_name(i.data_type), tuple(i.dims), i.optional) for i in cfg.input}
    want = {f.name: (f.dtype, f.dims, f.optional) for f in params.INPUTS}
    assert got == want
    got_out = {o.name: (_type_name(o.data_type), tuple(o.dims)) for o in cfg.output}
    assert got_out == {f.name: (f.dtype, f.dims) for f in params.OUTPUTS}


@pytest.mark.parametrize("model", ["caphuman", "identity", "head_condition"])
def test_every_model_config_parses_and_has_instances(model):
    cfg = _config(model)
    assert cfg.name == model and cfg.instance_group and all(g.kind == g.KIND_CPU for g in cfg.instance_group)
    assert (REPO / model / "1" / "model.py").is_file()
    if model == "identity":
        assert cfg.max_batch_size > 0 and cfg.HasField("dynamic_batching")


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


PHOTO = _png(64, 64)


def _arrays(**kw):
    return request_arrays(kw.pop("reference", PHOTO), kw.pop("prompts", "a photo"), **kw)


def test_parse_request_defaults_and_batch():
    r = parse_request(_arrays(), ServerSettings())
    assert (r.steps, r.guidance, r.seed, r.resolution, r.progress, r.num_items) == (20, 7.0, 12345, 512, True, 1)
    r = parse_request(_arrays(prompts=["a", "b", "c"], head_pose=[(10, 0, 0)]), ServerSettings())
    assert r.num_items == 3 and r.item(r.head_poses, 2) == (10.0, 0.0, 0.0) and r.item(r.pose_images, 1) is None


@pytest.mark.parametrize("kw,msg", [
    (dict(steps=0), "STEPS"), (dict(steps=1001), "STEPS"), (dict(guidance=float("nan")), "GUIDANCE"),
    (dict(eta=-1.0), "ETA"), (dict(tau=2000.0), "TAU"), (dict(seed=-1), "SEED"), (dict(seed=2 ** 32), "SEED"),
    (dict(resolution=300), "RESOLUTION"), (dict(preview_size=4), "PREVIEW_SIZE"),
    (dict(prompts=["a"] * 9), "at most 8"), (dict(prompts=["a", "b"], head_pose=[(0, 0, 0)] * 3), "1 or N=3"),
    (dict(head_pose=[(float("inf"), 0, 0)]), "HEAD_POSE"), (dict(light="disco"), "LIGHT"),
    (dict(prompts=["x" * 5000]), "byte limit"),
    (dict(guidance=1e38), "GUIDANCE must be in \\[0, 100\\]"), (dict(strength=1e38), "STRENGTH must be in \\[0, 10\\]"),
    (dict(guidance=-3.0), "GUIDANCE"), (dict(strength=-1.0), "STRENGTH"),
])
def test_parse_request_rejects(kw, msg):
    with pytest.raises(RequestError, match=msg):
        parse_request(_arrays(**kw), ServerSettings())


def huge_header_png(w: int, h: int) -> bytes:
    """A PNG whose header says w x h (and whose pixels are not there): only a header check can refuse it cheaply."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = struct.pack(">I", 0) + b"IDAT" + struct.pack(">I", zlib.crc32(b"IDAT"))
    return b"\x89PNG\r\n\x1a\n" + chunk + idat


@pytest.mark.parametrize("kw,msg", [
    # every photo's header is read while parsing, before any model runs (no identity/hint work, no cache)
    (dict(reference=huge_header_png(5000, 5000)), "REFERENCE_IMAGE is 5000x5000 pixels"),
    (dict(pose_image=[PHOTO, huge_header_png(8000, 3000)]), "POSE_IMAGE\\[1\\] is 8000x3000 pixels"),
    (dict(pose_image=[PHOTO, b"not an image at all"]), "POSE_IMAGE\\[1\\] is not a readable image"),
    # the per-request cost bound: steps x images x (resolution / 512)^2 <= 400 by default
    (dict(steps=500), "over the server's limit of 400"),
    (dict(steps=100, resolution=1024, prompts=["a", "b"]), "800 steps-at-512x512"),
    (dict(steps=50, prompts=["a"] * 8, resolution=576), "over the server's limit"),
])
def test_parse_request_refuses_before_any_model_runs(kw, msg):
    with pytest.raises(RequestError, match=msg):
        parse_request(_arrays(**kw), ServerSettings())


def test_request_cost_limit_is_a_setting():
    assert parse_request(_arrays(steps=50, prompts=["a"] * 8), ServerSettings()).steps == 50   # 400: at the limit
    parse_request(_arrays(steps=500), ServerSettings(max_request_cost=500))
    with pytest.raises(RequestError, match="limit of 10"):
        parse_request(_arrays(steps=11), ServerSettings(max_request_cost=10))


def test_parse_request_of_several_people():
    anna, ben = _png(64, 64), _png(80, 64)
    a = request_arrays([anna, ben], ["p", "q"], people=[{"center": [0.3, 0.5]}, {"yaw": -20, "strength": 0.5}],
                       pose_image=[PHOTO, PHOTO])
    r = parse_request(a, ServerSettings())
    assert r.num_people == 2 and r.num_items == 2 and r.references == [anna, ben]  # poses are per person
    assert r.people == [{"center": [0.3, 0.5], "strength": 1.0}, {"yaw": -20, "strength": 0.5}]


@pytest.mark.parametrize("refs, kw, msg", [
    ([b"a"] * 5, {}, "1 to 4 photos"),
    ([PHOTO, b"not a photo"], {}, r"REFERENCE_IMAGE\[1\] is not a readable image"),
    ([b"a", b"b"], dict(people=[{}]), "one object per REFERENCE_IMAGE"),
    ([b"a", b"b"], dict(people=[{"size": 2}, {}]), r"PEOPLE\[0\] must be a JSON object with keys"),
    ([b"a", b"b"], dict(people=[{"yaw": 500}, {}]), r"PEOPLE\[0\]: .*yaw"),
    ([b"a", b"b"], dict(people=[{"strength": "x"}, {}]), "strength must be a finite number"),
    ([b"a", b"b"], dict(head_controls={"scale": 0.3}), "several people take their controls in PEOPLE"),
    ([b"a", b"b"], dict(pose_image=[b"p"]), "0 or one photo per person"),
    ([b"a"], dict(people=[{"yaw": 3}]), "PEOPLE is for several people"),
])
def test_parse_request_rejects_bad_people(refs, kw, msg):
    with pytest.raises(RequestError, match=msg):
        parse_request(request_arrays([PHOTO if r == b"a" else r for r in refs], "p",
                                     **{k: [PHOTO if p == b"p" else p for p in v] if k == "pose_image" else v
                                        for k, v in kw.items()}), ServerSettings())


def test_parse_request_rejects_bad_utf8_and_empty_reference():
    a = _arrays()
    a["PROMPT"] = np.array([b"\xff\xfe"], dtype=object)
    with pytest.raises(RequestError, match="UTF-8"):
        parse_request(a, ServerSettings())
    a = _arrays()
    a["REFERENCE_IMAGE"] = np.array([b""], dtype=object)
    with pytest.raises(RequestError, match="REFERENCE_IMAGE"):
        parse_request(a, ServerSettings())


def test_request_arrays_types_and_unknown_field():
    a = request_arrays(b"x", ["p", "q"], steps=4, guidance=5.0, seed=3, head_pose=[(1, 2, 3)], progress=False)
    assert a["STEPS"].dtype == np.int32 and a["SEED"].dtype == np.int64 and a["HEAD_POSE"].shape == (1, 3)
    assert a["PROMPT"].tolist() == [b"p", b"q"] and a["PROGRESS"].dtype == np.bool_
    with pytest.raises(ValueError, match="guidence"):
        request_arrays(b"x", "p", guidence=7.0)


def test_settings_from_env():
    assert ServerSettings.from_env({}).max_items == 8
    assert ServerSettings.from_env({"CAPHUMAN_SERVE_SETTINGS": json.dumps({"max_items": 2})}).max_items == 2
    with pytest.raises(ValueError, match="unknown keys"):
        ServerSettings.from_env({"CAPHUMAN_SERVE_SETTINGS": '{"max_itemz": 2}'})
    with pytest.raises(ValueError, match="positive integer"):
        ServerSettings.from_env({"CAPHUMAN_SERVE_SETTINGS": '{"max_items": -1}'})


def test_decode_photo_limits_and_errors():
    s = ServerSettings(max_image_bytes=1 << 20, max_image_pixels=1000 * 1000)
    assert decode_photo(_png(64, 48, "L"), "X", s).mode == "RGB"
    with pytest.raises(RequestError, match="pixel limit"):
        decode_photo(_png(1001, 1000), "X", s)
    with pytest.raises(RequestError, match="MiB limit"):
        decode_photo(b"\0" * ((1 << 20) + 1), "X", s)
    with pytest.raises(RequestError, match="not a readable image"):
        decode_photo(b"GIF89a garbage", "X", s)
    with pytest.raises(RequestError, match="not a readable image"):
        decode_photo(_png(300, 300)[:60], "X", s)
    with pytest.raises(RequestError, match="empty"):
        decode_photo(b"", "X", s)


def test_photos_of_one_request_are_bounded_together():
    s = ServerSettings(max_image_bytes=4 << 20, max_request_bytes=6 << 20)
    check_request_photos([b"x" * (3 << 20), b"x" * (3 << 20)], s)
    with pytest.raises(RequestError, match=r"7\.0 MiB together, over the 6 MiB limit"):
        check_request_photos([b"x" * (3 << 20), b"x" * (4 << 20)], s)


def test_lru_evicts_least_recent():
    c = LRU(2)
    c.put("a", 1), c.put("b", 2), c.get("a"), c.put("c", 3)
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3


def test_weight_files_discovery(tmp_path):
    with pytest.raises(FileNotFoundError, match="caphuman.ckpt"):
        WeightFiles.discover(tmp_path)
    for name in ("caphuman.ckpt", "Realistic_Vision_V3.0.ckpt", "vae-ft-mse-840000-ema-pruned.ckpt",
                 "20180402-114759-vggface2.pt", "79999_iter.pth", "deca_model.tar"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "clip-vit-large-patch14").mkdir()
    w = WeightFiles.discover(tmp_path)
    assert w.sd_checkpoint.name == "Realistic_Vision_V3.0.ckpt" and w.vae_checkpoint.name.startswith("vae")
    assert w.facenet.name.endswith("vggface2.pt") and w.bisenet and w.deca and w.clip_dir and w.flame_model is None
    (tmp_path / "other_sd.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="more than one"):
        WeightFiles.discover(tmp_path)


def test_launcher_command_uses_the_wheel_and_this_python(tmp_path):
    pytest.importorskip("pytriton", reason="nvidia-pytriton not installed")
    import sys
    from caphuman.tritonserver.launcher import ServerConfig, TritonServer
    (tmp_path / "w").mkdir()
    srv = TritonServer(ServerConfig(weights=tmp_path / "w", grpc_port=1, http_port=2, metrics_port=3))
    args, env = srv.command()
    assert args[0].endswith("bin/tritonserver") and "--allow-metrics=true" in args and "--metrics-port=3" in args
    # gRPC and HTTP: tritonserver on loopback, behind the gateway that listens on ports 1 and 2
    assert f"--grpc-port={srv.upstream_grpc_port}" in args and f"--http-port={srv.upstream_http_port}" in args
    assert "--grpc-address=127.0.0.1" in args and "--http-address=127.0.0.1" in args
    backend_dir = Path(next(a for a in args if a.startswith("--backend-directory=")).split("=", 1)[1])
    assert (backend_dir / "python" / "triton_python_backend_stub").is_file()
    assert (backend_dir / "python" / "libtriton_python.so").is_file()
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert "nvidia_pytriton.libs" in env["LD_LIBRARY_PATH"]
    assert env["CAPHUMAN_WEIGHTS"] == str((tmp_path / "w").resolve())


@pytest.mark.parametrize("name,detections", [("reference_196251.png", 1), ("exp_3.jpg", 2)])
def test_photo_from_bytes_detects_a_512_photo_once_with_the_same_result(monkeypatch, name, detections):
    """A 512x512 photo is its own DECA frame: one MTCNN run, the same Photo as detecting both."""
    from tests.paths import face_photo

    from caphuman.runtime.condition import FaceAnalyzer
    from caphuman.runtime.condition.faces import DECA_FRAME
    from caphuman.runtime.condition.images import resize_like_deca
    from caphuman.tritonserver.services import photo_from_bytes

    analyzer = FaceAnalyzer()
    detect, calls = analyzer.mtcnn.detect, []
    monkeypatch.setattr(analyzer.mtcnn, "detect", lambda img: calls.append(img.shape) or detect(img))
    photo = photo_from_bytes(analyzer, face_photo(name).read_bytes(), "REFERENCE_IMAGE", ServerSettings())
    assert len(calls) == detections
    arr = np.asarray(photo.image)
    frame = resize_like_deca(arr, DECA_FRAME)  # the previous code: detect in the photo, then in its frame
    assert np.array_equal(photo.frame, frame)
    for got, want in ((photo.detection, detect(arr)[0]), (photo.frame_detection, detect(frame)[0])):
        assert np.array_equal(got.box, want.box) and np.array_equal(got.landmarks, want.landmarks)
        assert got.prob == want.prob
    assert str(photo.path).endswith("REFERENCE_IMAGE")
