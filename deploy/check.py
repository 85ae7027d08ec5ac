#!/usr/bin/env python3
"""Check the deployment artifacts under deploy/ (the Makefile runs `python deploy/check.py`).

(a) kustomize: every kustomization.yaml uses only current kustomize v5 fields (no deprecated
    `bases`, `patchesStrategicMerge`, `commonLabels`); deploy/base and every overlay render with
    `kubectl kustomize`; every rendered object validates offline against the Kubernetes schemas
    of kubernetes-validate (strict: unknown fields are errors); the CRD objects (ServiceMonitor,
    PrometheusRule, ScaledObject, TriggerAuthentication) get a structural check, and the
    PrometheusRule's groups must equal deploy/prometheus/rules.yml; references between objects
    resolve.
(b) Prometheus: `promtool check rules` and `promtool test rules` on deploy/prometheus/.
(c) Grafana: the dashboard parses, and every panel query (and every alert expression) names only
    metrics the worker exports (the README metrics table or adapters/metrics.py).

Prints what failed and exits 1 on any problem. Missing tools: kubectl comes from Debian's
`kubernetes-client` and promtool from `prometheus`, installed with apt-get when running as root
(Debian 12's kubectl 1.20 is too old for the v5 kustomizations: the check says so; use a current
kubectl, e.g. from pkgs.k8s.io or the Google Cloud SDK).

    python deploy/check.py                       # everything
    python deploy/check.py --kubectl /x/kubectl  # render with this kubectl (repeatable); it needs
                                                 # kustomize v5 inside (kubectl 1.27 or newer)
    python deploy/check.py --sync-rules          # rewrite base/core/prometheusrule.yaml from
                                                 # prometheus/rules.yml
"""

# ruff: noqa: T201 - a command-line checker: it reports by printing

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
PROMETHEUS_RULE = DEPLOY / "base" / "core" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "pgnotify-worker.json"
README = ROOT / "README.md"
METRICS_PY = ROOT / "src" / "pgnotify_worker" / "adapters" / "metrics.py"

# kustomize v5 fields, none deprecated (v5 warns about bases, patchesStrategicMerge, commonLabels).
KUSTOMIZATION_FIELDS = {
    "resources",
    "patches",
    "images",
    "namespace",
    "labels",
}
CRD_API = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
}
PREFERRED_K8S = "1.30"  # schemas to validate against when kubernetes-validate ships them


def _reexec_in_venv() -> None:
    """Without PyYAML / kubernetes-validate, rerun with the project's .venv Python."""
    try:
        import kubernetes_validate  # noqa: F401, PLC0415
        import yaml  # noqa: F401, PLC0415
    except ImportError:
        venv = ROOT / ".venv" / "bin" / "python"
        if venv.exists() and Path(sys.executable).resolve() != venv.resolve():
            os.execv(str(venv), [str(venv), *sys.argv])  # noqa: S606
        sys.exit(
            "deploy/check.py needs PyYAML and kubernetes-validate: "
            "pip install -e '.[dev]' (the Makefile's .venv has them)"
        )


_reexec_in_venv()

import kubernetes_validate  # noqa: E402
import yaml  # noqa: E402
from kubernetes_validate import utils as kv_utils  # noqa: E402


class Report:
    """Collects failures; prints as it goes."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def ok(self, message: str) -> None:
        print(f"ok    {message}")

    def fail(self, message: str) -> None:
        self.failures.append(message)
        print(f"FAIL  {message}")


# --- tools ------------------------------------------------------------------------------------


def _apt_install(package: str) -> bool:
    """apt-get install one package (root only); refreshes the lists once if needed."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    print(f"....  installing {package}: {' '.join(cmd)}")
    if subprocess.run(cmd, env=env, check=False, capture_output=True).returncode == 0:  # noqa: S603
        return True
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True)  # noqa: S607
    return subprocess.run(cmd, env=env, check=False, capture_output=True).returncode == 0  # noqa: S603


def find_tool(name: str, package: str, report: Report) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    if _apt_install(package) and shutil.which(name):
        return shutil.which(name)
    why = "" if os.geteuid() == 0 else " (not root: cannot apt-get install it)"
    report.fail(f"{name} is missing{why}: install Debian's `{package}` package")
    return None


# --- (a) kustomize and Kubernetes objects -----------------------------------------------------


def kustomization_dirs() -> list[Path]:
    """deploy/base, its parts and every overlay: each directory with a kustomization.yaml."""
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def check_kustomization_fields(report: Report) -> None:
    for directory in kustomization_dirs():
        path = directory / "kustomization.yaml"
        data = yaml.safe_load(path.read_text()) or {}
        rel = path.relative_to(ROOT)
        extra = set(data) - KUSTOMIZATION_FIELDS
        if extra:
            report.fail(
                f"{rel}: {', '.join(sorted(extra))} deprecated or unknown in kustomize v5 "
                f"(use only {', '.join(sorted(KUSTOMIZATION_FIELDS))})"
            )
            continue
        missing = [r for r in data.get("resources", []) if not (directory / r).exists()]
        missing += [
            p["path"]
            for p in data.get("patches", [])
            if "path" in p and not (directory / p["path"]).is_file()
        ]
        if missing:
            report.fail(f"{rel}: missing files or directories {missing}")
            continue
        report.ok(f"{rel}: kustomize v5 fields only")


def render(kubectl: str, directory: Path) -> tuple[list[dict[str, Any]] | None, str]:
    proc = subprocess.run(  # noqa: S603
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return None, proc.stderr.strip() or proc.stdout.strip()
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return docs, ""


def k8s_version() -> str:
    versions = kv_utils.all_versions()
    for version in versions:
        if kv_utils.major_minor(version) == PREFERRED_K8S:
            return version
    return versions[-1]


def rules_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def check_crd(doc: dict[str, Any], where: str, report: Report) -> bool:
    kind = doc["kind"]
    problems = []
    if doc.get("apiVersion") != CRD_API[kind]:
        problems.append(f"apiVersion {doc.get('apiVersion')!r}, expected {CRD_API[kind]!r}")
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name missing")
    spec = doc.get("spec")
    if not isinstance(spec, dict) or not spec:
        problems.append("spec missing")
        spec = {}
    if kind == "PrometheusRule" and spec.get("groups") != rules_groups():
        problems.append(
            "spec.groups differ from deploy/prometheus/rules.yml "
            "(run: python deploy/check.py --sync-rules)"
        )
    if kind == "ServiceMonitor":
        endpoints = spec.get("endpoints") or []
        if not endpoints or not all(e.get("port") and e.get("path") for e in endpoints):
            problems.append("spec.endpoints need port and path")
        if not (spec.get("selector") or {}).get("matchLabels"):
            problems.append("spec.selector.matchLabels missing")
    if kind == "ScaledObject":
        if not (spec.get("scaleTargetRef") or {}).get("name"):
            problems.append("spec.scaleTargetRef.name missing")
        triggers = spec.get("triggers") or []
        if not triggers or not all(t.get("type") and t.get("metadata") for t in triggers):
            problems.append("spec.triggers need type and metadata")
    if kind == "TriggerAuthentication":
        refs = spec.get("secretTargetRef") or []
        if not refs or not all({"parameter", "name", "key"} <= set(r) for r in refs):
            problems.append("spec.secretTargetRef entries need parameter, name and key")
    for problem in problems:
        report.fail(f"{where}: {kind}/{(doc.get('metadata') or {}).get('name')}: {problem}")
    return not problems


def _find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d.get("kind") == kind and (name is None or d["metadata"].get("name") == name)
    ]


def check_references(docs: list[dict[str, Any]], where: str, report: Report) -> None:
    """Names that point at other objects of the same render resolve."""
    problems = []
    deployments = _find(docs, "Deployment")
    configmaps = {d["metadata"]["name"] for d in _find(docs, "ConfigMap")}
    services = _find(docs, "Service")
    for workload in [*deployments, *_find(docs, "Job")]:
        pod = workload["spec"]["template"]["spec"]
        sa = pod.get("serviceAccountName")
        if sa and not _find(docs, "ServiceAccount", sa):
            problems.append(f"{workload['kind']} uses missing ServiceAccount {sa}")
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef")
                if ref and ref["name"] not in configmaps:
                    problems.append(f"{workload['kind']} uses missing ConfigMap {ref['name']}")
    for monitor in _find(docs, "ServiceMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        ports = {e["port"] for e in monitor["spec"]["endpoints"]}
        hits = [
            s for s in services if wanted.items() <= (s["metadata"].get("labels") or {}).items()
        ]
        if not hits:
            problems.append(f"ServiceMonitor selects no Service ({wanted})")
        for service in hits:
            names = {p.get("name") for p in service["spec"]["ports"]}
            if not ports <= names:
                problems.append(f"ServiceMonitor ports {ports} not on Service {names}")
    for service in services:
        selector = service["spec"].get("selector") or {}
        if not any(
            selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in deployments
        ):
            problems.append(f"Service {service['metadata']['name']} selects no Deployment pods")
    targets: list[str] = []
    for scaled in _find(docs, "ScaledObject"):
        targets.append(scaled["spec"]["scaleTargetRef"]["name"])
        for trigger in scaled["spec"]["triggers"]:
            auth = (trigger.get("authenticationRef") or {}).get("name")
            if auth and not _find(docs, "TriggerAuthentication", auth):
                problems.append(f"ScaledObject uses missing TriggerAuthentication {auth}")
    for hpa in _find(docs, "HorizontalPodAutoscaler"):
        targets.append(hpa["spec"]["scaleTargetRef"]["name"])
    for target in targets:
        if not _find(docs, "Deployment", target):
            problems.append(f"autoscaler targets missing Deployment {target}")
    if len(targets) != len(set(targets)):
        problems.append("two autoscalers (HPA/ScaledObject) drive the same Deployment")
    for problem in problems:
        report.fail(f"{where}: {problem}")


def kustomize_major(kubectl: str) -> int | None:
    """The major version of the kustomize built into this kubectl (None: unknown)."""
    proc = subprocess.run(  # noqa: S603
        [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, check=False
    )
    try:
        found = re.match(r"v?(\d+)", json.loads(proc.stdout).get("kustomizeVersion", ""))
    except ValueError:
        return None
    return int(found.group(1)) if found else None


def check_kustomize(kubectls: list[str], report: Report) -> None:
    check_kustomization_fields(report)
    version = k8s_version()
    for kubectl in kubectls:
        label = kubectl
        major = kustomize_major(kubectl)
        if major is not None and major < 5:
            report.fail(
                f"{kubectl}: kustomize v{major} inside; the kustomizations need v5 "
                "(kubectl 1.27 or newer)"
            )
            continue
        for directory in kustomization_dirs():
            where = f"{directory.relative_to(ROOT)} [{label}]"
            docs, error = render(kubectl, directory)
            if docs is None:
                report.fail(f"{where}: kubectl kustomize failed:\n{error}")
                continue
            bad = 0
            for doc in docs:
                kind = doc.get("kind", "?")
                name = (doc.get("metadata") or {}).get("name", "?")
                if kind in CRD_API:
                    bad += not check_crd(doc, where, report)
                    continue
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    path = "/".join(str(p) for p in exc.path) or "(top)"
                    report.fail(f"{where}: {kind}/{name}: {path}: {exc.message}")
                    bad += 1
                except kv_utils.SchemaNotFoundError as exc:
                    report.fail(f"{where}: {kind}/{name}: {exc.message}")
                    bad += 1
            before = len(report.failures)
            check_references(docs, where, report)
            if not bad and len(report.failures) == before:
                kinds = ", ".join(sorted({d["kind"] for d in docs}))
                report.ok(
                    f"{where}: {len(docs)} objects valid (Kubernetes {version} strict): {kinds}"
                )


# --- (b) Prometheus rules -----------------------------------------------------------------------


def check_promtool(report: Report) -> None:
    promtool = find_tool("promtool", "prometheus", report)
    if promtool is None:
        return
    for args, path in ((["check", "rules"], RULES), (["test", "rules"], RULES_TEST)):
        proc = subprocess.run(  # noqa: S603
            [promtool, *args, str(path)], capture_output=True, text=True, check=False
        )
        what = f"promtool {' '.join(args)} {path.relative_to(ROOT)}"
        if proc.returncode != 0:
            report.fail(f"{what}:\n{proc.stdout}{proc.stderr}")
        else:
            report.ok(what)


# --- (c) Grafana dashboard and metric names -----------------------------------------------------


def known_metrics() -> set[str]:
    """Every series name the worker exposes, from metrics.py and the README metrics table."""
    names: set[str] = set()
    text = METRICS_PY.read_text()
    for kind, name in re.findall(r"\b(Counter|Gauge|Histogram|Info)\(\s*\"(pgnotify_\w+)\"", text):
        if kind == "Counter":
            base = name.removesuffix("_total")
            names.add(f"{base}_total")  # no _created: metrics.py calls disable_created_metrics()
        elif kind == "Histogram":
            names |= {name, *(f"{name}_{s}" for s in ("bucket", "sum", "count"))}
        elif kind == "Info":
            names.add(f"{name}_info")
        else:
            names.add(name)
    table = README.read_text().split("| metric | labels |", 1)[-1].split("\n\n", 1)[0]
    for row in table.splitlines():
        first = row.split("|")[1] if row.count("|") >= 2 else ""
        for name in re.findall(r"`(pgnotify_\w+)`", first):
            names.add(name)
            if "histogram" in first:
                names |= {f"{name}_{s}" for s in ("bucket", "sum", "count")}
    # prometheus_client's standard collectors, registered in the worker's registry
    if "ProcessCollector(" in text:
        names |= {f"process_{n}" for n in PROCESS_METRICS}
    return names


# What ProcessCollector exports (Linux).
PROCESS_METRICS = (
    "cpu_seconds_total",
    "open_fds",
    "max_fds",
    "virtual_memory_bytes",
    "resident_memory_bytes",
    "start_time_seconds",
)


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:pgnotify|process)_[a-z0-9_]+\b", expr))


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for panel in panels:
        found.append(panel)
        found += _panels(panel.get("panels") or [])
    return found


def check_dashboard(report: Report) -> None:
    known = known_metrics()
    try:
        board = json.loads(DASHBOARD.read_text())
    except (OSError, ValueError) as exc:
        report.fail(f"{DASHBOARD.relative_to(ROOT)}: {exc}")
        return
    where = DASHBOARD.relative_to(ROOT)
    problems = []
    if not board.get("uid") or not board.get("title"):
        problems.append("uid and title are required")
    variables = {v.get("name"): v for v in board.get("templating", {}).get("list", [])}
    if not any(v.get("type") == "datasource" for v in variables.values()):
        problems.append("no datasource template variable")
    if "channel" not in variables:
        problems.append("no channel template variable")
    queries = 0
    for panel in _panels(board.get("panels") or []):
        if panel.get("type") == "row":
            continue
        targets = [t for t in panel.get("targets") or [] if t.get("expr")]
        if not targets:
            problems.append(f"panel {panel.get('title')!r} has no query")
        for target in targets:
            queries += 1
            names = metric_names(target["expr"])
            unknown = names - known
            if not names:
                problems.append(f"panel {panel.get('title')!r}: no pgnotify metric in {target}")
            elif unknown:
                problems.append(f"panel {panel.get('title')!r}: unknown metric(s) {unknown}")
    for variable in variables.values():
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        if variable.get("type") == "query" and metric_names(text) - known:
            problems.append(f"variable {variable.get('name')}: unknown metric in {text!r}")
    for problem in problems:
        report.fail(f"{where}: {problem}")
    if not problems:
        report.ok(f"{where}: {queries} queries, all on exported metrics")
    # The alerts too: a renamed metric would make an alert silently never fire.
    bad = []
    for group in rules_groups():
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - known
            if unknown:
                bad.append(f"{rule.get('alert')}: unknown metric(s) {unknown}")
    for problem in bad:
        report.fail(f"{RULES.relative_to(ROOT)}: {problem}")
    if not bad:
        report.ok(f"{RULES.relative_to(ROOT)}: every alert uses exported metrics")


# --- the PrometheusRule is generated from rules.yml ---------------------------------------------

PROMETHEUS_RULE_HEADER = """\
# GENERATED from deploy/prometheus/rules.yml by `python deploy/check.py --sync-rules`:
# edit rules.yml (and rules_test.yml), then regenerate. deploy/check.py and the tests fail when
# the two differ. Your Prometheus selects PrometheusRules by label (kube-prometheus-stack:
# release: <its release>): add it in an overlay (overlays/example does).
"""


def sync_rules() -> None:
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "pgnotify-worker",
            "labels": {
                "app.kubernetes.io/name": "pgnotify-worker",
                "app.kubernetes.io/component": "monitoring",
                "app.kubernetes.io/part-of": "pgnotify",
            },
        },
        "spec": {"groups": rules_groups()},
    }
    body = yaml.safe_dump(manifest, sort_keys=False, width=1000, allow_unicode=True)
    PROMETHEUS_RULE.write_text(PROMETHEUS_RULE_HEADER + body)
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kubectl",
        action="append",
        help="kubectl binary to render with (repeatable; default: kubectl on PATH)",
    )
    parser.add_argument(
        "--sync-rules", action="store_true", help="rewrite base/core/prometheusrule.yaml and exit"
    )
    args = parser.parse_args()
    if args.sync_rules:
        sync_rules()
        return 0
    started = time.monotonic()
    report = Report()
    kubectls = args.kubectl or []
    if not kubectls:
        found = find_tool("kubectl", "kubernetes-client", report)
        kubectls = [found] if found else []
    if kubectls:
        check_kustomize(kubectls, report)
    else:
        check_kustomization_fields(report)
    check_promtool(report)
    check_dashboard(report)
    took = time.monotonic() - started
    if report.failures:
        print(f"\ndeploy/check.py: {len(report.failures)} problem(s) ({took:.1f}s)")
        return 1
    print(f"\ndeploy/check.py: all checks passed ({took:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
