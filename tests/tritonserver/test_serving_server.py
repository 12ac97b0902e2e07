"""The real Triton Inference Server on the CPU with the tiny random-weight models, over gRPC.

One server for the whole module (started once, ~20-40 s on 2 cores). Requests use 256x256 and 2-4
steps to keep CI fast. Photos come from shared/testdata/faces (skipped with a reason if absent).
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed (pip install -e '.[serve]')")
pytest.importorskip("pytriton", reason="nvidia-pytriton (bundled tritonserver) not installed (pip install -e '.[serve]')")

from caphuman.tritonserver.client import CapHumanClient, GeneratedImage, Progress, ServerError  # noqa: E402
from caphuman.tritonserver.launcher import ServerConfig, TritonServer, free_port  # noqa: E402
from caphuman.tritonserver.weights import BACKEND_ENV, ENGINE_DIR_ENV  # noqa: E402
from tests.tritonserver.serve_process import CAPHUMAN, read_rest, read_until
from tests.paths import ROOT, face_photo

FAST = dict(steps=2, resolution=256)
CONCURRENT_CLIENTS = 16
CONCURRENCY_SECONDS = float(os.environ.get("CAPHUMAN_SERVING_LOAD_SECONDS", "60"))


def face(name: str) -> bytes:
    return face_photo(name).read_bytes()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = ServerConfig(host="127.0.0.1", grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                       log_file=tmp_path_factory.mktemp("triton") / "tritonserver.log")
    srv = TritonServer(cfg)
    srv.start()
    try:
        srv.wait_ready(timeout=300)
    except BaseException:
        srv.stop()
        raise
    yield srv
    code = srv.stop()
    assert code == 0, f"tritonserver exited with {code}:\n{srv.log_tail()}"


@pytest.fixture(scope="module")
def client(server):
    return CapHumanClient(server.grpc_url, timeout=300)


def assert_same_seed_bound(a: np.ndarray, b: np.ndarray) -> None:
    """The documented bound (README, "Same seed, same image"): at most one level, on under 1% of the values."""
    d = np.abs(a.astype(int) - b.astype(int))
    assert d.max() <= 1 and (d > 0).mean() < 0.01, (d.max(), (d > 0).mean())


def assert_good_image(img: GeneratedImage, size: int = 256):
    assert img.image.dtype == np.uint8 and img.image.shape == (size, size, 3)
    assert img.metadata["random_weights"] is True and "RANDOM" in img.metadata["notice"]


# ------------------------------------------------------------------------------------ generation
def test_full_generation_is_deterministic(client):
    ref = face("reference_196251.png")
    a = client.generate(ref, "a photo of a person", seed=7, **FAST)
    b = client.generate(ref, "a photo of a person", seed=7, **FAST)
    c = client.generate(ref, "a photo of a person", seed=8, **FAST)
    assert len(a) == 1
    assert_good_image(a[0])
    meta = a[0].metadata
    assert meta["seed"] == 7 and meta["steps"] == 2 and meta["prompt"] == "a photo of a person"
    for key in ("parse_ms", "identity_ms", "identity_cache", "head_condition_ms", "sampling_ms", "vae_decode_ms",
                "item_ms"):
        assert key in meta["timings"], key
    assert np.array_equal(a[0].image, b[0].image), "same request, same seed: same image"
    assert not np.array_equal(a[0].image, c[0].image), "another seed: another image"


def test_streamed_generation_sends_progress_then_image(client):
    msgs = list(client.stream(face("reference_196251.png"), "a portrait", steps=4, resolution=256,
                              preview_size=32))
    progress = [m for m in msgs if isinstance(m, Progress)]
    images = [m for m in msgs if isinstance(m, GeneratedImage)]
    assert [p.step for p in progress] == [1, 2, 3, 4] and all(p.total == 4 for p in progress)
    assert all(p.preview is not None and p.preview.shape == (32, 32, 3) for p in progress)
    assert len(images) == 1 and isinstance(msgs[-1], GeneratedImage)
    assert_good_image(images[0])
    quiet = list(client.stream(face("reference_196251.png"), "a portrait", progress=False, **FAST))
    assert len(quiet) == 1 and isinstance(quiet[0], GeneratedImage)


def test_batch_request_results_in_order_and_match_single_requests(client):
    ref = face("reference_196251.png")
    prompts = ["a photo of a person", "a person at the beach", "a person in a garden"]
    poses = [(0.0, 0.0, 0.0), (25.0, 0.0, 0.0), (-20.0, 10.0, 5.0)]
    batch = client.generate(ref, prompts, head_pose=poses, seed=100, **FAST)
    assert [g.index for g in batch] == [0, 1, 2]
    assert [g.metadata["prompt"] for g in batch] == prompts
    assert [g.metadata["seed"] for g in batch] == [100, 101, 102]
    assert [g.metadata["timings"]["batch_size"] for g in batch] == [3, 3, 3], "a batch request runs as one batch"
    single = client.generate(ref, prompts[1], head_pose=[poses[1]], seed=101, **FAST)
    assert_same_seed_bound(batch[1].image, single[0].image)  # item 1 of a batch ~ the same request alone
    # one identity, several pose photos
    pose_batch = client.generate(ref, "a photo", pose_image=[face("pose1.png"), face("pose2.png")], **FAST)
    assert [g.index for g in pose_batch] == [0, 1] and all(g.metadata["pose_image"] for g in pose_batch)


def test_identity_cache_hit_on_second_request(client):
    ref = face("exp_3.jpg")  # used by no other test before this one
    first = client.generate(ref, "a photo", **FAST)[0].metadata["timings"]
    second = client.generate(ref, "a photo", **FAST)[0].metadata["timings"]
    assert first["identity_cache"] == "miss"
    assert second["identity_cache"] == "hit" and second["identity_cache_level"] in ("orchestrator", "identity-model")
    assert second["identity_ms"] < first["identity_ms"]
    assert second["head_condition_cache"] == "hit"


def test_long_prompt_is_truncated_with_a_warning(client):
    out = client.generate(face("reference_196251.png"), "a photo of a person " * 30, **FAST)
    assert any("truncated" in w for w in out[0].metadata["warnings"])


def test_identity_and_head_models_are_callable_directly(server):
    """The separately scalable models answer plain (non-streaming) gRPC inference; identity batches dynamically."""
    import concurrent.futures

    import tritonclient.grpc as grpcclient

    def identity(photo: bytes):
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            t = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            t.set_data_from_numpy(np.array([[photo]], dtype=object))
            r = c.infer("identity", [t])
            return r.as_numpy("CONTEXT"), bool(r.as_numpy("CACHE_HIT").reshape(-1)[0])

    photos = [face("reference_196251.png"), face("IMG_0392_inputs.jpg")] * 2
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(identity, photos))
    assert all(ctx.shape[:2] == (1, 258) and np.isfinite(ctx).all() for ctx, _ in results)
    assert np.array_equal(results[0][0], results[2][0]) and not np.array_equal(results[0][0], results[1][0])
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        ins = []
        for name, shape, dtype, value in (("REFERENCE_IMAGE", [1], "BYTES", np.array([photos[0]], dtype=object)),
                                          ("HEAD_POSE", [3], "FP32", np.array([15, 0, 0], np.float32)),
                                          ("RESOLUTION", [1], "INT32", np.array([256], np.int32))):
            t = grpcclient.InferInput(name, shape, dtype)
            t.set_data_from_numpy(value)
            ins.append(t)
        hint = c.infer("head_condition", ins).as_numpy("HINT")
    assert hint.shape == (9, 256, 256) and np.isfinite(hint).all() and np.abs(hint).max() > 0


# ------------------------------------------------------------------------------------ bad requests
def _no_face_png() -> bytes:
    y, x = np.mgrid[0:256, 0:256]
    return png(np.stack([x, y, (x + y) // 2], -1).astype(np.uint8))


def _huge_pixels_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4200, 4200)).save(buf, format="PNG")  # 17.6 M pixels, ~20 kB
    return buf.getvalue()


BAD_REQUESTS = {
    "corrupt image bytes": (lambda: (b"\x89PNG\r\n\x1a\nnot really a png", "a", {}), "not a readable image"),
    "truncated image": (lambda: (face("reference_196251.png")[:5000], "a", {}), "not a readable image"),
    "photo with no face": (lambda: (_no_face_png(), "a", {}), "no face found"),
    "image over the byte limit": (lambda: (os.urandom(17 << 20), "a", {}), "MiB limit"),
    "image over the pixel limit": (lambda: (_huge_pixels_png(), "a", {}), "pixel limit"),
    "pose photo with no face": (lambda: (face("reference_196251.png"), "a", {"pose_image": _no_face_png()}),
                                "no face found in POSE_IMAGE"),
    "steps 0": (lambda: (face("reference_196251.png"), "a", {"steps": 0}), "STEPS must be"),
    "unusable DDIM steps": (lambda: (face("reference_196251.png"), "a", {"steps": 3}), "steps=3 is not usable"),
    "NaN guidance": (lambda: (face("reference_196251.png"), "a", {"guidance": float("nan")}), "GUIDANCE must be"),
    "infinite strength": (lambda: (face("reference_196251.png"), "a", {"strength": float("inf")}), "STRENGTH"),
    "bad resolution": (lambda: (face("reference_196251.png"), "a", {"resolution": 100}), "RESOLUTION must be"),
    "yaw out of range": (lambda: (face("reference_196251.png"), "a", {"head_pose": [(500, 0, 0)]}), "yaw=500"),
    "too many items": (lambda: (face("reference_196251.png"), ["a"] * 9, {}), "at most 8"),
    "mismatched batch": (lambda: (face("reference_196251.png"), ["a", "b"], {"head_pose": [(0, 0, 0)] * 3}),
                         "1 or N=3"),
    "unknown light": (lambda: (face("reference_196251.png"), "a", {"light": "disco"}), "LIGHT must be"),
    "bad modes": (lambda: (face("reference_196251.png"), "a", {"modes": "everything"}), "mode"),
    "overlapping people": (lambda: ([face("reference_196251.png"), face("IMG_0392_inputs.jpg")], "a",
                                    {"people": [{"center": [0.5, 0.5]}, {"center": [0.52, 0.5]}]}),
                           "covered by the other heads"),
    "person off the frame": (lambda: ([face("reference_196251.png"), face("IMG_0392_inputs.jpg")], "a",
                                      {"people": [{"center": [1.0, 0.5], "scale": 0.6}, {"center": [0.3, 0.5]}]}),
                             "outside the frame"),
    "five people": (lambda: ([face("reference_196251.png")] * 5, "a", {}), "1 to 4 photos"),
    "PEOPLE of the wrong length": (lambda: ([face("reference_196251.png"), face("IMG_0392_inputs.jpg")], "a",
                                            {"people": [{}]}), "one object per REFERENCE_IMAGE"),
    "HEAD_POSE with several people": (lambda: ([face("reference_196251.png"), face("IMG_0392_inputs.jpg")], "a",
                                               {"head_pose": [(10, 0, 0)]}), "several people take their controls"),
    "a person with no face": (lambda: ([face("reference_196251.png"), _no_face_png()], "a",
                                       {"people": [{"center": [0.3, 0.5]}, {"center": [0.7, 0.5]}]}), "no face"),
}


def _raw(client, drop: str, name: str, shape, dtype: str, value):
    import tritonclient.grpc as grpcclient
    inputs = [i for i in client.inputs(face("reference_196251.png"), "a", **FAST) if i.name() != drop]
    if name:
        t = grpcclient.InferInput(name, list(shape), dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    return inputs


RAW_BAD = {
    "STEPS as FP32": (("STEPS", "STEPS", [1], "FP32", np.array([2.0], np.float32)), "expects 'INT32'"),
    "PROMPT of shape [1,1]": (("PROMPT", "PROMPT", [1, 1], "BYTES", np.array([[b"a"]], dtype=object)),
                              "unexpected shape"),
    "HEAD_POSE of 2 columns": (("", "HEAD_POSE", [1, 2], "FP32", np.zeros((1, 2), np.float32)), "unexpected shape"),
    "missing REFERENCE_IMAGE": (("REFERENCE_IMAGE", "", None, None, None), "REFERENCE_IMAGE"),
    "unknown input": (("", "GUIDENCE", [1], "FP32", np.array([7.0], np.float32)), "GUIDENCE"),
}


def _good_request_works(client):
    out = client.generate(face("reference_196251.png"), "a photo", seed=3, **FAST)
    assert len(out) == 1
    assert_good_image(out[0])


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_clear_error_then_server_serves(client, case):
    make, expected = BAD_REQUESTS[case]
    ref, prompts, fields = make()
    with pytest.raises(ServerError) as e:
        client.generate(ref, prompts, **{**FAST, **fields})
    assert expected in str(e.value), str(e.value)
    assert e.value.bad_request, f"not flagged as a bad request: {e.value}"
    _good_request_works(client)


def test_a_refused_request_leaves_the_caches_unchanged(client):
    """Every field and every photo's header is checked before any model runs: a refused request computes no
    identity and renders no hint, so the same photo's next request misses every cache."""
    arr = np.asarray(Image.open(io.BytesIO(face("reference_196251.png"))).convert("RGB")).copy()
    arr[0, 0] ^= 1  # one pixel: a photo no other test sends (nothing of it cached)
    ref = png(arr)
    with pytest.raises(ServerError) as refused:   # item 1's pose photo is not an image
        client.generate(ref, ["a photo", "a photo"], pose_image=[face("pose1.png"), b"not an image"], **FAST)
    assert refused.value.bad_request and "POSE_IMAGE[1]" in str(refused.value)
    first = client.generate(ref, "a photo", pose_image=face("pose1.png"), **FAST)[0].metadata["timings"]
    assert (first["identity_cache"], first["head_condition_cache"]) == ("miss", "miss"), first
    # the per-request cost bound (steps x images x (resolution/512)^2 <= 400) and DDIM's unusable counts
    for over in (dict(steps=500, resolution=512), dict(steps=3, resolution=1024)):
        t0 = time.monotonic()
        with pytest.raises(ServerError) as refused:
            client.generate(ref, "a photo", pose_image=face("pose2.png"), **over)
        assert refused.value.bad_request and time.monotonic() - t0 < 20
    again = client.generate(ref, "a photo", pose_image=face("pose2.png"), **FAST)[0].metadata["timings"]
    assert again["head_condition_cache"] == "miss", "no hint was rendered for the refused requests"


@pytest.mark.parametrize("case", list(RAW_BAD))
def test_wrong_tensor_type_or_shape_is_rejected(client, case):
    args, expected = RAW_BAD[case]
    with pytest.raises(ServerError) as e:
        client.generate(b"", "", raw_inputs=_raw(client, *args))
    assert expected in str(e.value), str(e.value)
    _good_request_works(client)


def test_client_disconnect_mid_stream_does_not_wedge(client, server):
    ref = face("reference_196251.png")
    for _ in range(2):  # both orchestrator instances may take one
        stream = client.stream(ref, "a long one", steps=200, resolution=256)
        for msg in stream:
            if isinstance(msg, Progress) and msg.step >= 2:
                break
        stream.close()  # cancels the request and drops the stream
    t0 = time.monotonic()
    for seed in range(3):
        out = client.generate(ref, "a photo", seed=seed, **FAST)
        assert_good_image(out[0])
    assert time.monotonic() - t0 < 60, "requests after a disconnect waited for the abandoned generation"
    deadline = time.monotonic() + 10
    while "cancelled by the client" not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "cancelled by the client" in server.log_path.read_text()


def test_prometheus_metrics_are_on(server):
    text = urllib.request.urlopen(server.endpoints()["metrics"].replace("localhost", "127.0.0.1"), timeout=10).read()
    assert b'nv_inference_request_success{model="caphuman"' in text


# ------------------------------------------------------------------------------------ load
def _server_rss_kib(pid: int) -> int:
    """Resident memory of tritonserver `pid` and its model processes (the stubs are its children)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if int(stat.parent.name) == pid or ppid == pid:
                total += int(next(line for line in (stat.parent / "status").read_text().splitlines()
                                  if line.startswith("VmRSS:")).split()[1])
        except (OSError, IndexError, ValueError, StopIteration):
            continue  # gone meanwhile
    return total


def test_16_concurrent_clients_for_60_seconds(client, server):
    """16 clients for 60 s, every 10th request a bad one: 0 wrong images, 0 errors on good requests, every
    bad request refused with its own clear error, and the server's memory flat."""
    ref = face("reference_196251.png")
    variants = [("a photo of a person", 11, (0.0, 0.0, 0.0)), ("a person smiling", 12, (20.0, 0.0, 0.0)),
                ("a person at night", 13, (-15.0, 5.0, 0.0)), ("a painting of a person", 14, (0.0, 0.0, 10.0))]
    bad = [(name, make(), expected) for name, (make, expected) in BAD_REQUESTS.items()]
    expected = {}
    for prompt, seed, pose in variants:
        expected[seed] = client.generate(ref, prompt, seed=seed, head_pose=[pose], **FAST)[0].image
    for name, (bad_ref, bad_prompts, bad_fields), _ in bad:  # every error path has run once before measuring
        with pytest.raises(ServerError):
            client.generate(bad_ref, bad_prompts, **{**FAST, **bad_fields})
    def good_request(c: CapHumanClient, i: int, **kw):
        prompt, seed, pose = variants[i % len(variants)]
        return prompt, seed, c.generate(ref, prompt, seed=seed, head_pose=[pose], **kw, **FAST)

    # ... and every batch size once: one concurrent round fills the server's buckets
    warm = [threading.Thread(target=good_request, args=(CapHumanClient(client.url, timeout=300), k))
            for k in range(CONCURRENT_CLIENTS)]
    for t in warm:
        t.start()
    for t in warm:
        t.join(timeout=300)
    errors: list[str] = []
    counts = [0] * CONCURRENT_CLIENTS
    refused = [0] * CONCURRENT_CLIENTS
    stop_at = time.monotonic() + CONCURRENCY_SECONDS

    def bad_request(c: CapHumanClient, k: int, j: int):
        name, (bad_ref, bad_prompts, bad_fields), why = bad[(k + j) % len(bad)]
        try:
            c.generate(bad_ref, bad_prompts, **{**FAST, **bad_fields})
            errors.append(f"client {k}: bad request {name!r} was served")
        except ServerError as e:
            if not e.bad_request or why not in str(e):
                errors.append(f"client {k}: bad request {name!r} got {e.status}: {e}")
        refused[k] += 1

    def worker(k: int):
        c = CapHumanClient(client.url, timeout=300)
        i = k
        j = 0
        while time.monotonic() < stop_at:
            j += 1
            if j % 10 == 1:  # requests 1, 11, 21, ... of each client: a tenth of them
                bad_request(c, k, j // 10)
                continue
            i += 1
            try:
                prompt, seed, out = good_request(c, i - 1, progress=(k % 2 == 0))
                if len(out) != 1 or out[0].metadata["seed"] != seed or out[0].metadata["prompt"] != prompt:
                    errors.append(f"client {k}: wrong response {[g.metadata.get('seed') for g in out]}")
                else:  # batched with other clients' items: equal up to the documented same-seed bound
                    d = np.abs(out[0].image.astype(int) - expected[seed].astype(int))
                    if d.max() > 1 or (d > 0).mean() >= 0.01:
                        errors.append(f"client {k}: image of seed {seed} differs from its reference by more than "
                                      f"the same-seed bound (max {d.max()}, {(d > 0).mean():.2%} of the values)")
                counts[k] += 1
            except Exception as e:  # noqa: BLE001 - every failure is reported
                errors.append(f"client {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(CONCURRENT_CLIENTS)]
    for t in threads:
        t.start()
    rss = []  # the server's memory every 2 s under load
    while any(t.is_alive() for t in threads) and time.monotonic() < stop_at + 300:
        rss.append(_server_rss_kib(server.proc.pid))
        time.sleep(2.0)
    for t in threads:
        t.join(timeout=CONCURRENCY_SECONDS + 300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors[:5]
    assert all(n >= 1 for n in counts), f"some clients got no response: {counts}"
    # Flat: the memory rises in the first seconds under load (allocator arenas growing with the number of
    # requests in flight), then stays; a leak would lift the last third's peak above the middle third's.
    third = len(rss) // 3
    middle, last = max(rss[third:2 * third]), max(rss[2 * third:])
    print(f"\n{sum(counts)} good and {sum(refused)} bad requests by {CONCURRENT_CLIENTS} clients in "
          f"{CONCURRENCY_SECONDS:.0f} s: {counts}; server memory at start {rss[0] / 1024:.0f} MiB, peak in the "
          f"first third {max(rss[:third]) / 1024:.0f} MiB, the middle {middle / 1024:.0f}, the last {last / 1024:.0f}")
    assert sum(refused) >= 0.09 * (sum(counts) + sum(refused)), (counts, refused)
    assert last <= 1.10 * middle, f"server memory grew under load: peak {middle} KiB, then {last} KiB"


# ------------------------------------------------------------------------------------ caphuman serve
def test_caphuman_serve_starts_prints_endpoints_and_stops_on_ctrl_c(tmp_path):
    """The CLI's life cycle (start, wait for ready, endpoints, Ctrl-C) on an empty model repository, so it
    does not load the models a second time (the module's server shows that they load)."""
    repo = tmp_path / "empty_repository"
    repo.mkdir()
    ports = [str(free_port()) for _ in range(3)]
    proc = subprocess.Popen([*CAPHUMAN, "serve", "--host", "127.0.0.1",
                             "--model-repository", str(repo),
                             "--grpc-port", ports[0], "--http-port", ports[1], "--metrics-port", ports[2],
                             "--log-file", str(tmp_path / "serve.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    lines: list[str] = []
    try:
        read_until(proc, "Ctrl-C stops", lines, 120)
        text = "".join(lines)
        assert f"gRPC     localhost:{ports[0]}" in text and "/metrics" in text, text
        assert "RANDOM" in text
        import tritonclient.grpc as grpcclient
        with grpcclient.InferenceServerClient(f"127.0.0.1:{ports[0]}") as c:
            assert c.is_server_ready()
        proc.send_signal(signal.SIGINT)
        out = read_rest(proc, lines, 60)
        assert proc.returncode == 0, text + out
        assert "stopped (status 0)" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_caphuman_serve_reports_a_missing_binary(tmp_path):
    out = subprocess.run([*CAPHUMAN, "serve", "--tritonserver", str(tmp_path / "nope")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "tritonserver binary not found" in out.stderr, out.stderr


# ------------------------------------------------------------------------------- server == CLI
CLI_REQUEST = dict(prompt="a photo of a person in a garden", seed=3, steps=4, sampler="dpmpp_2m")


def _cli_image(tmp_path, backend: str) -> np.ndarray:
    from caphuman.runtime.cli import main
    out = tmp_path / f"cli_{backend}"
    args = ["generate", "--reference", str(face_photo("reference_196251.png")), "--prompt", CLI_REQUEST["prompt"],
            "--seed", str(CLI_REQUEST["seed"]), "--steps", str(CLI_REQUEST["steps"]), "--sampler",
            CLI_REQUEST["sampler"], "--device", "cpu", "--backend", backend, "--out", str(out)]
    assert main(args) == 0
    return np.asarray(Image.open(out / f"caphuman_{CLI_REQUEST['seed']}.png").convert("RGB"))


def _served_image(client) -> GeneratedImage:
    prompt = CLI_REQUEST["prompt"]
    kw = {k: v for k, v in CLI_REQUEST.items() if k != "prompt"}
    images = client.generate(face("reference_196251.png"), prompt, resolution=512, **kw)
    assert len(images) == 1
    return images[0]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def test_served_image_equals_the_cli_image_eager(client, tmp_path):
    served = _served_image(client)
    assert served.metadata["backend"] == "eager" and served.metadata["sampler"] == "dpmpp_2m"
    assert _psnr(served.image, _cli_image(tmp_path, "eager")) >= 40


def test_served_image_equals_the_cli_image_onnxruntime(tmp_path):
    """A server launched with `--backend onnxruntime` (CAPHUMAN_BACKEND) denoises through the ONNX graphs,
    exported from its weights at start, and returns the CLI's image for the same request."""
    cfg = ServerConfig(host="127.0.0.1", grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                       log_file=tmp_path / "tritonserver.log",
                       extra_env={BACKEND_ENV: "onnxruntime", ENGINE_DIR_ENV: str(tmp_path / "onnx")})
    with TritonServer(cfg) as srv:
        srv.wait_ready(timeout=300)
        served = _served_image(CapHumanClient(srv.grpc_url, timeout=300))
    assert served.metadata["backend"].startswith("onnxruntime") and served.metadata["sampler"] == "dpmpp_2m"
    assert _psnr(served.image, _cli_image(tmp_path, "onnxruntime")) >= 40


def test_client_head_controls_reach_the_hint_and_the_metadata(client, tmp_path):
    """`caphuman client --scale --center` (HEAD_CONTROLS): another head framing, recorded in the metadata."""
    ref = face("reference_196251.png")
    plain = client.generate(ref, "a photo", seed=5, **FAST)[0]
    framed = client.generate(ref, "a photo", seed=5, head_controls={"scale": 0.3, "center": [0.3, 0.6]}, **FAST)[0]
    assert framed.metadata["head_controls"] == {"center": [0.3, 0.6], "scale": 0.3}
    assert framed.metadata["hint_sha256"] != plain.metadata["hint_sha256"]
    with pytest.raises(ServerError, match="HEAD_CONTROLS"):
        client.generate(ref, "a photo", head_controls={"tilt": 3}, **FAST)
    with pytest.raises(ServerError, match="scale"):
        client.generate(ref, "a photo", head_controls={"scale": 50}, **FAST)


def test_caphuman_client_batch_num_samples_and_sidecar(server, tmp_path):
    out = tmp_path / "client"
    args = [*CAPHUMAN, "client", "--url", server.grpc_url, "--reference", str(face_photo("reference_196251.png")),
            "--prompt", "a photo", "--num-samples", "2", "--seed", "40", "--scale", "0.5", "--steps", "2",
            "--resolution", "256", "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    import json
    metas = [json.loads((out / f"caphuman_{s}.json").read_text()) for s in (40, 41)]
    assert [m["timings"]["batch_size"] for m in metas] == [2, 2] and metas[0]["head_controls"] == {"scale": 0.5}
    assert metas[0]["inputs"]["files"]["reference"]["sha256"]
    again = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr


# ------------------------------------------------------------------------- several people == CLI
TWO_PEOPLE = [("reference_196251.png", {"center": [0.3, 0.5]}),
              ("IMG_0392_inputs.jpg", {"center": [0.7, 0.5], "yaw": -20.0, "strength": 0.8})]


def test_two_people_request_equals_the_cli_image(client, tmp_path):
    """One request with two reference photos and PEOPLE returns the image of `caphuman generate --person ...`;
    the identity cache serves each person (the second request hits for both)."""
    from caphuman.runtime.cli import main
    out = tmp_path / "cli_people"
    args = ["generate", "--prompt", CLI_REQUEST["prompt"], "--seed", str(CLI_REQUEST["seed"]), "--steps",
            str(CLI_REQUEST["steps"]), "--sampler", CLI_REQUEST["sampler"], "--device", "cpu", "--out", str(out)]
    for name, controls in TWO_PEOPLE:
        words = [f"reference={face_photo(name)}"] + [
            f"{k}={','.join(str(v) for v in value) if isinstance(value, list) else value}" for k, value in controls.items()]
        args += ["--person", *words]
    assert main(args) == 0
    cli = np.asarray(Image.open(out / f"caphuman_{CLI_REQUEST['seed']}.png").convert("RGB"))
    kw = {k: v for k, v in CLI_REQUEST.items() if k != "prompt"}
    refs = [face(name) for name, _ in TWO_PEOPLE]
    people = [controls for _, controls in TWO_PEOPLE]
    first = client.generate(refs, CLI_REQUEST["prompt"], people=people, resolution=512, **kw)
    assert len(first) == 1
    meta = first[0].metadata
    assert meta["people"] == 2 and meta["person_strength"] == [1.0, 0.8] and len(meta["hint_sha256"]) == 2
    assert _psnr(first[0].image, cli) >= 40
    again = client.generate(refs, CLI_REQUEST["prompt"], people=people, resolution=512, **kw)[0]
    assert again.metadata["timings"]["identity_cache"] == ["hit", "hit"]
    np.testing.assert_array_equal(again.image, first[0].image)
