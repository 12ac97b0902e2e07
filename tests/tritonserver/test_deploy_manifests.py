"""The Kubernetes manifests rendered from one values file, and the compose file: what they promise
(GPU requests, probes on Triton's health endpoints, ports, read-only weights, HPA on a Triton metric through
the Prometheus adapter), and that the committed rendering is up to date."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from caphuman.tritonserver.deploy import render
from tests.paths import ROOT

DEPLOY = ROOT / "tritonserver" / "deploy"


def docs(text: str) -> dict[str, dict]:
    out = {}
    for d in yaml.safe_load_all(text):
        if d:
            out[f"{d['kind']}/{d['metadata']['name']}"] = d
    return out


@pytest.fixture(scope="module")
def default():
    values = render.load_values()
    return values, render.render(values)


def container(res: dict) -> dict:
    return res["Deployment/caphuman"]["spec"]["template"]["spec"]["containers"][0]


def test_committed_rendering_is_up_to_date():
    r = subprocess.run([sys.executable, "-m", "caphuman.tritonserver.deploy.render", "--check"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_deployment_requests_gpus_and_probes_triton_health(default):
    values, files = default
    res = docs(files["caphuman.yaml"])
    c = container(res)
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert c["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    # liveness also fails on a dead model process, which Triton's /v2/health/live does not see
    # (tests/tritonserver/test_serve_health.py runs that check against a real server)
    assert "httpGet" not in c["livenessProbe"]
    assert c["livenessProbe"]["exec"]["command"] == ["python3", "-m", "caphuman.tritonserver.deploy.liveness"]
    pod_grace = res["Deployment/caphuman"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert 0 < c["livenessProbe"]["terminationGracePeriodSeconds"] < pod_grace
    # the startup probe leaves time for a first-start engine build (>= 30 min)
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 1800
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["CAPHUMAN_INSTANCES_PER_GPU"] == "caphuman=1 identity=1 head_condition=1"
    assert env["TRITON_GRPC_PORT"] == "8001" and env["CAPHUMAN_GPUS"] == "auto"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/weights"]["readOnly"] is True and "readOnly" not in mounts["/engines"]
    pod = res["Deployment/caphuman"]["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["weights"]["persistentVolumeClaim"] == {"claimName": "caphuman-weights", "readOnly": True}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert pod["terminationGracePeriodSeconds"] > values["tritonExitTimeoutSeconds"]
    strategy = res["Deployment/caphuman"]["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0      # zero-downtime rollouts (base-model upgrades)


def test_services_pdb_and_selectors_agree(default):
    _, files = default
    res = docs(files["caphuman.yaml"])
    labels = res["Deployment/caphuman"]["spec"]["template"]["metadata"]["labels"]
    svc = res["Service/caphuman"]["spec"]
    assert {p["name"]: p["port"] for p in svc["ports"]} == {"grpc": 8001, "metrics": 8002}
    assert svc["selector"] == labels and res["Service/caphuman-headless"]["spec"]["selector"] == labels
    assert res["Service/caphuman-headless"]["spec"]["clusterIP"] == "None"
    assert res["PodDisruptionBudget/caphuman"]["spec"]["selector"]["matchLabels"] == labels
    assert res["Deployment/caphuman"]["spec"]["selector"]["matchLabels"] == labels
    net = res["NetworkPolicy/caphuman"]["spec"]
    # private by default: gRPC from this namespace, metrics from monitoring, HTTP only to the kubelet's probes
    rules = {r["ports"][0]["port"]: r.get("from") for r in net["ingress"]}
    assert rules == {8001: [{"podSelector": {}}],
                     8002: [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}
    for name in res:
        assert res[name]["metadata"]["namespace"] == "caphuman"


def test_hpa_scales_on_a_triton_metric_served_by_the_adapter(default):
    values, files = default
    hpa = docs(files["caphuman.yaml"])["HorizontalPodAutoscaler/caphuman"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "caphuman"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 8)
    metric = hpa["metrics"][0]["pods"]
    adapter = yaml.safe_load(files["prometheus-adapter-values.yaml"])
    rules = {r["name"]["as"]: r for r in adapter["rules"]["custom"]}
    assert metric["metric"]["name"] in rules
    rule = rules[metric["metric"]["name"]]
    assert rule["seriesQuery"].startswith("nv_inference_pending_request_count{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert 'model="caphuman"' in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    queue = rules[values["monitoring"]["queueTimeMetric"]]
    assert "rate(<<.Series>>" in queue["metricsQuery"] and "nv_inference_request_success" in queue["metricsQuery"]
    assert adapter["rules"]["default"] is False


def test_values_change_in_one_place(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"image": {"digest": "sha256:" + "a" * 64}, "gpusPerPod": 4,
                                    "autoscaling": {"metric": "queue_time_us", "maxReplicas": 3},
                                    "monitoring": {"serviceMonitor": False},
                                    "weights": {"claimName": "rv-v3", "subPath": "sd"}}))
    values = render.load_values([mine], ["namespace=gen", "instancesPerGpu.identity=2", "engineCache.create=false"])
    files = render.render(values)
    assert "servicemonitor.yaml" not in files
    res = docs(files["caphuman.yaml"])
    assert "PersistentVolumeClaim/caphuman-engines" not in res
    c = container(res)
    assert c["image"] == "registry.example.com/caphuman/caphuman-rt@sha256:" + "a" * 64
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert {e["name"]: e["value"] for e in c["env"]}["CAPHUMAN_INSTANCES_PER_GPU"] == \
        "caphuman=1 identity=2 head_condition=1"
    assert {m["mountPath"]: m for m in c["volumeMounts"]}["/weights"]["subPath"] == "sd"
    hpa = res["HorizontalPodAutoscaler/caphuman"]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "caphuman_queue_time_us" and hpa["maxReplicas"] == 3
    assert all(d["metadata"]["namespace"] == "gen" for d in res.values())
    # the other values kept their defaults
    assert res["Deployment/caphuman"]["spec"]["replicas"] == 2


@pytest.mark.parametrize("sets,match", [
    (["autoscaling.metric=cpu"], "autoscaling.metric"),
    (["autoscaling.minReplicas=9"], "minReplicas"),
    (["gpusPerPod=0"], "gpusPerPod"),
    (["terminationGracePeriodSeconds=30"], "terminationGracePeriodSeconds"),
    (["image.digest=latest"], "sha256"),
    (["nosuch=1"], "no such value"),
    (["image.tag.x=1"], "not a map"),
    (["weights.claimName="], "claimName"),
])
def test_bad_values_are_refused(sets, match):
    with pytest.raises(render.ValuesError, match=match):
        render.load_values([], sets)


def test_render_cli_writes_and_checks(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "caphuman.tritonserver.deploy.render", "--out", str(out), "--set", "replicas=3"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["caphuman.yaml", "prometheus-adapter-values.yaml",
                                                      "servicemonitor.yaml"]
    r = subprocess.run([sys.executable, "-m", "caphuman.tritonserver.deploy.render", "--out", str(out), "--check"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "out of date" in r.stderr
    r = subprocess.run([sys.executable, "-m", "caphuman.tritonserver.deploy.render", "--set", "replicas"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "KEY.PATH=VALUE" in r.stderr


# -- compose ----------------------------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())


def default_of(value: str) -> str:
    """'${X:-8000}:8000' -> '8000:8000' (compose's own interpolation of defaults)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def test_compose_runs_the_image_on_every_gpu_with_readonly_weights():
    svc = compose()["services"]["caphuman"]
    assert (DEPLOY / svc["build"]["context"]).resolve() == ROOT      # the build context is the repository root
    assert (ROOT / svc["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"ARG TRITON_VERSION={svc['build']['args']['TRITON_VERSION']}" in dockerfile
    # published on the host's loopback only unless CAPHUMAN_BIND_ADDRESS says otherwise
    assert [default_of(p) for p in svc["ports"]] == ["127.0.0.1:8000:8000", "127.0.0.1:8001:8001",
                                                     "127.0.0.1:8002:8002"]
    dev = svc["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"] and default_of(dev["count"]) == "all"
    vols = {v["target"]: v for v in svc["volumes"]}
    assert vols["/weights"]["read_only"] is True and vols["/engines"]["type"] == "volume"
    assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    assert svc["healthcheck"]["test"] == ["CMD", "python3", "-m", "caphuman.tritonserver.deploy.liveness", "--ready"]
    assert svc["init"] is True and default_of(svc["shm_size"]) == "1gb"


def test_compose_and_kubernetes_agree_with_the_image():
    """Ports, UID and image tag are the same in the Dockerfile, compose and values.yaml."""
    svc = compose()["services"]["caphuman"]
    values = render.load_values()
    assert default_of(svc["image"]).endswith(":" + values["image"]["tag"])
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "EXPOSE 8000 8001 8002" in dockerfile
    assert values["ports"] == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert "uid=10001" in svc["tmpfs"][0]
    pod = docs(render.render(values)["caphuman.yaml"])["Deployment/caphuman"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001


def test_compose_variables_all_have_defaults_except_none():
    text = (DEPLOY / "docker-compose.yaml").read_text()
    refs = re.findall(r"\$\{([A-Z0-9_]+)(:-[^}]*)?\}", text)
    assert refs and all(default for _, default in refs), [name for name, d in refs if not d]
