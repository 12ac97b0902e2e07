"""Per-GPU model configs (tritonserver/deploy_configs.py): generated from the repository the server tests
load, one KIND_GPU instance group per GPU, and nothing else changed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from caphuman.tritonserver import deploy_configs as dc
from tests.paths import ROOT

REPO = ROOT / "tritonserver" / "model_repository"
needs_repo = pytest.mark.skipif(not any(REPO.glob("*/config.pbtxt")),
                                reason="tritonserver/model_repository has no model configs yet")


def without_groups(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != dc.FIELD}


def groups_of(path: Path) -> list[dict]:
    return dc.parse(path.read_text())[dc.FIELD]


# -- the parser -------------------------------------------------------------------------------------------

def test_parse_reads_triton_text_format():
    text = '''
    name: "m"  # a comment with instance_group [ { kind: KIND_CPU } ] inside
    backend: 'python'
    max_batch_size: 8
    dynamic_batching { max_queue_delay_microseconds: 2000 }
    model_transaction_policy: { decoupled: true }
    input [ { name: "A" data_type: TYPE_FP32 dims: [ -1, 3 ] optional: true },
            { name: "B{" data_type: TYPE_STRING dims: [ 1 ] } ]
    parameters { key: "k" value: { string_value: "say \\"hi\\"" } }
    parameters { key: "j" value: { string_value: "x" } };
    instance_group [ { count: 2 kind: KIND_CPU } ]
    '''
    cfg = dc.parse(text)
    assert cfg["name"] == ["m"] and cfg["backend"] == ["python"] and cfg["max_batch_size"] == ["8"]
    assert cfg["dynamic_batching"] == [{"max_queue_delay_microseconds": ["2000"]}]
    assert cfg["model_transaction_policy"] == [{"decoupled": ["true"]}]
    assert [i["name"] for i in cfg["input"]] == [["A"], ["B{"]]
    assert cfg["input"][0]["dims"] == ["-1", "3"]
    assert [p["value"][0]["string_value"] for p in cfg["parameters"]] == [['say "hi"'], ["x"]]
    assert cfg[dc.FIELD] == [{"count": ["2"], "kind": ["KIND_CPU"]}]
    assert isinstance(cfg[dc.FIELD][0]["kind"][0], dc.Ident) and isinstance(cfg["max_batch_size"][0], dc.Num)
    # only the real field counts, not the one inside the comment
    assert [s[0] for s in dc.top_level_spans(text)].count(dc.FIELD) == 1


@pytest.mark.parametrize("bad", ['name: "unterminated', "input [ { name: \"a\" ", "name: @", "input { name: \"a\""])
def test_parse_rejects_broken_text(bad):
    with pytest.raises(dc.ConfigError):
        dc.parse(bad)


def test_parse_agrees_with_tritons_own_protobuf():
    """Cross-check against Triton's ModelConfig message where tritonclient is installed (serve extra)."""
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient (serve extra) not installed")
    from google.protobuf import text_format
    for path in sorted(REPO.glob("*/config.pbtxt")):
        for text in (path.read_text(), dc.rewrite_config(path.read_text(), [0, 1, 2])):
            msg = text_format.Parse(text, mc.ModelConfig())
            ours = dc.parse(text)
            assert msg.name == ours["name"][0]
            assert [i.name for i in msg.input] == [i["name"][0] for i in ours.get("input", [])]
            assert [o.name for o in msg.output] == [o["name"][0] for o in ours.get("output", [])]
            assert [(g.count, mc.ModelInstanceGroup.Kind.Name(g.kind), list(g.gpus)) for g in msg.instance_group] == \
                [(int(g["count"][0]), g["kind"][0], [int(x) for x in g.get("gpus", [])]) for g in ours[dc.FIELD]]


# -- the rewrite ------------------------------------------------------------------------------------------

def test_rewrite_changes_only_instance_groups():
    text = ('name: "x"\n# keep me\ninstance_group [ { name: "g" count: 3 kind: KIND_CPU rate_limiter { priority: 2 } } ]\n'
            'parameters { key: "a" value: { string_value: "b" } }\n')
    out = dc.rewrite_config(text, [0, 1], count=2)
    assert out.startswith('name: "x"\n# keep me\ninstance_group [')
    assert out.endswith('parameters { key: "a" value: { string_value: "b" } }\n')
    assert without_groups(dc.parse(out)) == without_groups(dc.parse(text))
    assert dc.parse(out)[dc.FIELD] == [
        {"name": ["g_gpu0"], "count": ["2"], "kind": ["KIND_GPU"], "gpus": ["0"], "rate_limiter": [{"priority": ["2"]}]},
        {"name": ["g_gpu1"], "count": ["2"], "kind": ["KIND_GPU"], "gpus": ["1"], "rate_limiter": [{"priority": ["2"]}]},
    ]


def test_rewrite_handles_repeated_and_missing_groups():
    text = 'name: "x"\ninstance_group { count: 1 kind: KIND_CPU }\nbackend: "python"\ninstance_group { count: 1 }\n'
    out = dc.rewrite_config(text, [3])
    cfg = dc.parse(out)
    assert cfg[dc.FIELD] == [{"count": ["1"], "kind": ["KIND_GPU"], "gpus": ["3"]}] * 2
    assert [s[0] for s in dc.top_level_spans(out)] == ["name", dc.FIELD, "backend"]
    bare = dc.rewrite_config('name: "y"\n', [0, 1])
    assert dc.parse(bare)[dc.FIELD] == [{"count": ["1"], "kind": ["KIND_GPU"], "gpus": [str(g)]} for g in (0, 1)]


@pytest.mark.parametrize("spec,gpus", [("1", [0]), ("4", [0, 1, 2, 3]), ("0,2", [0, 2]), (" 5 ", [0, 1, 2, 3, 4])])
def test_parse_gpus(spec, gpus):
    assert dc.parse_gpus(spec) == gpus


@pytest.mark.parametrize("spec", ["0", "-1", "a", "1,1", "", "0,-2"])
def test_parse_gpus_rejects(spec):
    with pytest.raises(dc.ConfigError):
        dc.parse_gpus(spec)


def test_parse_counts():
    assert dc.parse_counts(["2", "identity=3"]) == {"*": 2, "identity": 3}
    for bad in (["x"], ["identity=0"], ["a=b"]):
        with pytest.raises(dc.ConfigError):
            dc.parse_counts(bad)


# -- the repository the server tests load -----------------------------------------------------------------

@needs_repo
@pytest.mark.parametrize("gpus", [[0], [0, 1], [0, 1, 2, 3, 4, 5, 6, 7], [1, 3]])
def test_generated_repository_has_one_group_per_gpu_and_nothing_else_changed(tmp_path, gpus):
    out = tmp_path / "repo"
    written = dc.generate(REPO, out, gpus, {"caphuman": 2})
    configs = sorted(REPO.glob("*/config.pbtxt"))
    assert sorted(p.parent.name for p in written) == [c.parent.name for c in configs]
    for src in configs:
        name = src.parent.name
        dst = out / name / "config.pbtxt"
        original, generated = dc.parse(src.read_text()), dc.parse(dst.read_text())
        assert without_groups(generated) == without_groups(original), name
        want = 2 if name == "caphuman" else 1
        assert generated[dc.FIELD] == [{"count": [str(want)], "kind": ["KIND_GPU"], "gpus": [str(g)]} for g in gpus]
        # textually too: everything before and after the (first) instance_group is byte for byte the source
        src_text, dst_text = src.read_text(), dst.read_text()
        span = [s for s in dc.top_level_spans(src_text) if s[0] == dc.FIELD][0]
        assert dst_text.startswith(src_text[:span[1]]) and dst_text.endswith(src_text[span[2]:])
    # every other file (model.py, version folders) copied unchanged
    for f in REPO.rglob("*"):
        if f.is_file() and f.name != "config.pbtxt" and "__pycache__" not in f.parts:
            assert (out / f.relative_to(REPO)).read_bytes() == f.read_bytes()


@needs_repo
def test_keep_cpu_and_unknown_models(tmp_path):
    dc.generate(REPO, tmp_path / "r", [0, 1], keep_cpu=("identity",))
    assert (tmp_path / "r" / "identity" / "config.pbtxt").read_text() == (REPO / "identity" / "config.pbtxt").read_text()
    with pytest.raises(dc.ConfigError, match="not in"):
        dc.generate(REPO, tmp_path / "s", [0], keep_cpu=("nope",))
    with pytest.raises(dc.ConfigError, match="not in"):
        dc.generate(REPO, tmp_path / "t", [0], {"nope": 2})


@needs_repo
def test_out_folder_safety(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(dc.ConfigError, match="not made by this tool"):
        dc.generate(REPO, foreign, [0])
    assert (foreign / "precious.txt").is_file()
    with pytest.raises(dc.ConfigError, match="outside"):
        dc.generate(REPO, REPO / "generated", [0])
    ours = tmp_path / "ours"
    dc.generate(REPO, ours, [0, 1])
    dc.generate(REPO, ours, [0])            # a container restart regenerates in place
    assert len(groups_of(ours / "caphuman" / "config.pbtxt")) == 1
    with pytest.raises(dc.ConfigError, match="not a model repository"):
        dc.generate(tmp_path / "empty", tmp_path / "o", [0])


@needs_repo
def test_cli(tmp_path):
    out = tmp_path / "repo"
    r = subprocess.run([sys.executable, "-m", "caphuman.tritonserver.deploy_configs", "--gpus", "2", "--out", str(out),
                        "--count", "identity=2"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == len(list(REPO.glob("*/config.pbtxt")))
    assert [g["count"][0] for g in groups_of(out / "identity" / "config.pbtxt")] == ["2", "2"]
    r = subprocess.run([sys.executable, "-m", "caphuman.tritonserver.deploy_configs", "--gpus", "x", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--gpus" in r.stderr


def test_deployment_serves_the_repository_the_server_tests_load():
    """One repository: the launcher's default (what the server tests start), the tool's source, the image's copy."""
    from caphuman.tritonserver import launcher
    assert dc.DEFAULT_REPOSITORY == launcher.DEFAULT_MODEL_REPOSITORY == REPO
    dockerfile = (ROOT / "tritonserver" / "deploy" / "Dockerfile").read_text()
    assert "cp -r tritonserver/model_repository /opt/caphuman/model_repository" in dockerfile
    assert "CAPHUMAN_MODEL_REPOSITORY=/opt/caphuman/model_repository" in dockerfile
    entry = (ROOT / "tritonserver" / "deploy" / "entrypoint.sh").read_text()
    assert "python3 -m caphuman.tritonserver.deploy_configs --model-repository \"${CAPHUMAN_MODEL_REPOSITORY}\"" in entry
