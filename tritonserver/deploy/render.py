"""Render the Kubernetes manifests from one values file (a tiny, offline stand-in for `helm template`).

    python -m caphuman.tritonserver.deploy.render                        # defaults -> tritonserver/deploy/k8s/rendered/
    python -m caphuman.tritonserver.deploy.render --values mine.yaml --set image.tag=0.2.0 --out out/
    python -m caphuman.tritonserver.deploy.render --check                # exit 1 if rendered/ is out of date (CI)

`k8s/values.yaml` holds every value a user changes. A values file given with --values is merged over it
(maps merge key by key, everything else replaces), then each --set KEY.PATH=VALUE (VALUE read as YAML).
Templates are Jinja2 with undefined values an error; every rendered file is parsed back as YAML.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

from caphuman.export.extras import require

HERE = Path(__file__).resolve().parent
K8S = HERE / "k8s"
DEFAULT_VALUES = K8S / "values.yaml"
TEMPLATES = K8S / "templates"
RENDERED = K8S / "rendered"
METRICS = ("pending_requests", "queue_time_us")


class ValuesError(ValueError):
    """Values that cannot be rendered into working manifests."""


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_set(values: dict, assignment: str) -> dict:
    path, sep, raw = assignment.partition("=")
    if not sep or not path:
        raise ValuesError(f"--set takes KEY.PATH=VALUE, got {assignment!r}")
    keys = path.split(".")
    node = values
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            raise ValuesError(f"--set {path}: {k!r} is not a map in the values")
        node = node[k]
    if keys[-1] not in node:
        raise ValuesError(f"--set {path}: no such value (see {DEFAULT_VALUES.name})")
    node[keys[-1]] = yaml.safe_load(raw)
    return values


def check(v: dict) -> None:
    """Refuse values that would render valid YAML but a broken deployment."""
    a = v["autoscaling"]
    if a["metric"] not in METRICS:
        raise ValuesError(f"autoscaling.metric must be one of {METRICS}, got {a['metric']!r}")
    if not 1 <= a["minReplicas"] <= a["maxReplicas"]:
        raise ValuesError("autoscaling needs 1 <= minReplicas <= maxReplicas")
    if int(v["gpusPerPod"]) < 1:
        raise ValuesError("gpusPerPod must be at least 1")
    if any(int(n) < 1 for n in v["instancesPerGpu"].values()):
        raise ValuesError("instancesPerGpu counts must be at least 1")
    if v["tritonExitTimeoutSeconds"] >= v["terminationGracePeriodSeconds"]:
        raise ValuesError("terminationGracePeriodSeconds must exceed tritonExitTimeoutSeconds "
                          "(Triton finishes in-flight requests before the pod is killed)")
    if v["image"]["digest"] and not str(v["image"]["digest"]).startswith("sha256:"):
        raise ValuesError("image.digest must look like sha256:<hex>")
    if not v["weights"]["claimName"]:
        raise ValuesError("weights.claimName must name the PersistentVolumeClaim holding the official weights")


def load_values(files: list[Path] = (), sets: list[str] = ()) -> dict:
    values = yaml.safe_load(DEFAULT_VALUES.read_text())
    for f in files:
        values = merge(values, yaml.safe_load(Path(f).read_text()) or {})
    for s in sets:
        values = apply_set(values, s)
    check(values)
    return values


def render(values: dict) -> dict[str, str]:
    """{output file name: text} for every template."""
    jinja2 = require("jinja2", "rendering the Kubernetes manifests")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.policies["json.dumps_kwargs"] = {"sort_keys": False}
    out = {}
    for tpl in sorted(TEMPLATES.glob("*.j2")):
        if tpl.name == "servicemonitor.yaml.j2" and not values["monitoring"]["serviceMonitor"]:
            continue
        text = env.get_template(tpl.name).render(v=values).rstrip("\n") + "\n"
        try:
            list(yaml.safe_load_all(text))
        except yaml.YAMLError as e:
            raise ValuesError(f"{tpl.name} rendered to invalid YAML (check the values it uses): {e}") from e
        out[tpl.name.removesuffix(".j2")] = text
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m caphuman.tritonserver.deploy.render", description=__doc__.split("\n")[0])
    ap.add_argument("--values", action="append", default=[], help="values file merged over k8s/values.yaml")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="KEY.PATH=VALUE (repeatable)")
    ap.add_argument("--out", default=str(RENDERED), help="output folder")
    ap.add_argument("--check", action="store_true", help="only compare with --out; exit 1 where they differ")
    args = ap.parse_args(argv)
    try:
        files = render(load_values([Path(f) for f in args.values], args.sets))
    except (ValuesError, OSError, yaml.YAMLError) as e:
        print(f"render: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.check:
        stale = [name for name, text in files.items()
                 if not (out / name).is_file() or (out / name).read_text() != text]
        for name in stale:
            print(f"{out / name} is out of date: run python -m caphuman.tritonserver.deploy.render", file=sys.stderr)
        return 1 if stale else 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
        print(out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
