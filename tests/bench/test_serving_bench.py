"""bench/bench_serving.py's pure parts (the end-to-end run starts a server: a manual smoke test, see
docs/serving.md): the repository parameters it sets, the goal checks and the table."""
from __future__ import annotations


from tests.conftest import load_bench
from tests.paths import ROOT



def _bench():
    return load_bench("bench_serving")


def test_set_parameters_replaces_and_adds(tmp_path):
    b = _bench()
    cfg = tmp_path / "config.pbtxt"
    src = (ROOT / "tritonserver" / "model_repository" / "caphuman" / "config.pbtxt").read_text()
    cfg.write_text(src)
    b.set_parameters(cfg, {"max_batch": "4", "batch_gather_ms": "10", "new_key": "x"})
    text = cfg.read_text()
    assert 'parameters { key: "max_batch" value: { string_value: "4" } }' in text
    assert 'parameters { key: "batch_gather_ms" value: { string_value: "10" } }' in text
    assert text.count('key: "max_batch"') == 1 and text.rstrip().endswith('{ string_value: "x" } }')
    from caphuman.tritonserver.deploy_configs import parse
    assert parse(text)["name"] == parse(src)["name"]


def test_goals_and_table():
    b = _bench()
    res = {"baseline": {"images_per_s": 3.0, "p50_ms": 330.0},
           "levels": [{"concurrency": c, "images_per_s": r, "p50_ms": 1.0, "p99_ms": 2.0,
                       "images_by_batch_size": {"1": 1}, "errors": 0} for c, r in ((1, 2.8), (4, 4.0), (16, 3.5))]}
    g = b.goals(res)
    assert g["concurrency_1_vs_single_stream"]["met"] and g["concurrency_1_vs_single_stream"]["measured"] == 0.933
    assert not g["concurrency_16_vs_1_throughput"]["met"]
    assert "| 16 | 3.500 |" in b.table(res)
    assert b.goals({"levels": []}) == {}
    assert b.percentile([1.0, 2.0, 3.0], 50) == 2.0 and b.percentile([], 99) is None
