"""The deployment artifacts under deploy/: what a user relies on, checked without kubectl or promtool
(deploy/check.py renders the kustomizations and runs promtool; these read the files as written)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

from pgnotify_worker.adapters.registry import build_providers
from pgnotify_worker.config import ENV_PREFIX, Settings
from pgnotify_worker.logs import FIELDS

yaml = pytest.importorskip("yaml")  # PyYAML comes with kubernetes-validate (the dev extra)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CORE = DEPLOY / "base" / "core"
OPERATIONS = ROOT / "docs" / "operations.md"
SETTINGS = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
SECRET_SETTINGS = {
    f"{ENV_PREFIX}{name.upper()}"
    for name, field in Settings.model_fields.items()
    if "SecretStr" in str(field.annotation)
}
# kustomize v5, nothing deprecated (no bases, patchesStrategicMerge, commonLabels)
KUSTOMIZE_V5_FIELDS = {"resources", "patches", "images", "namespace", "labels"}


def docs_in(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def one(path: Path, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in docs_in(path)
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{path}: expected one {kind}"
    return found[0]


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A strategic merge patch, as far as these manifests need: maps merge, null deletes, lists
    of named items (containers, env, volumes) merge by name, other lists replace."""
    out = dict(base)
    for key, value in patch.items():
        old = out.get(key)
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(old, dict):
            out[key] = merged(old, value)
        elif isinstance(value, list) and isinstance(old, list) and named(value) and named(old):
            items = {item["name"]: item for item in old}
            for item in value:
                items[item["name"]] = merged(items.get(item["name"], {}), item)
            out[key] = list(items.values())
        else:
            out[key] = value
    return out


def named(items: list[Any]) -> bool:
    return all(isinstance(item, dict) and "name" in item for item in items)


def effective(directory: Path, kind: str, name: str) -> dict[str, Any] | None:
    """One object as a kustomization builds it: its bases' version with its own patches merged."""
    spec = kustomization(directory)
    found = None
    for resource in spec.get("resources", []):
        if (directory / resource).is_dir():
            found = effective((directory / resource).resolve(), kind, name) or found
            continue
        for doc in docs_in(directory / resource):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                found = doc
    for patch in spec.get("patches", []):
        for doc in docs_in(directory / patch["path"]):
            if found is not None and doc["kind"] == kind and doc["metadata"]["name"] == name:
                found = merged(found, doc)
    return found


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


# --- kustomize ----------------------------------------------------------------------------------


def test_kustomizations_use_only_current_kustomize_v5_fields() -> None:
    dirs = kustomization_dirs()
    assert {d.relative_to(DEPLOY).as_posix() for d in dirs} >= {
        "base",
        "base/core",
        "overlays/example",
        "overlays/autoscaling",
        "overlays/autoscaling/hpa",
    }
    for directory in dirs:
        spec = kustomization(directory)
        assert set(spec) <= KUSTOMIZE_V5_FIELDS, directory
        for resource in spec.get("resources", []):
            target = directory / resource
            assert target.is_file() or (target / "kustomization.yaml").is_file(), target
        for patch in spec.get("patches", []):
            assert set(patch) == {"path"}, patch  # strategic-merge files, target by their name
            assert (directory / patch["path"]).is_file(), patch


def test_production_overlays_never_ship_the_example_secret() -> None:
    for name in ("example", "autoscaling", "autoscaling/hpa"):
        directory = DEPLOY / "overlays" / name
        assert effective(directory, "Secret", "pgnotify-worker-secrets") is None, name
    assert effective(DEPLOY / "base", "Secret", "pgnotify-worker-secrets") is not None


# --- settings -----------------------------------------------------------------------------------


def test_secret_names_every_secret_setting_and_nothing_else() -> None:
    secret = one(DEPLOY / "base" / "secret.example.yaml", "Secret", "pgnotify-worker-secrets")
    assert set(secret["stringData"]) == SECRET_SETTINGS
    assert len(SECRET_SETTINGS) >= 11


@pytest.mark.parametrize("overlay", ["base", "overlays/example"])
def test_every_env_var_named_is_a_real_setting(overlay: str) -> None:
    config = effective(DEPLOY / overlay, "ConfigMap", "pgnotify-worker")
    assert config is not None
    assert set(config["data"]) <= SETTINGS, set(config["data"]) - SETTINGS
    assert not set(config["data"]) & SECRET_SETTINGS, "credentials belong in the Secret"
    for workload in (effective(DEPLOY / overlay, "Deployment", "pgnotify-worker"),):
        assert workload is not None
        pod = workload["spec"]["template"]["spec"]
        for each in [*pod.get("initContainers", []), *pod["containers"]]:
            names = {e["name"] for e in each.get("env", [])}
            assert names <= SETTINGS, names - SETTINGS


def test_settings_mentioned_anywhere_in_the_manifests_are_real_too() -> None:
    # comments included: a commented-out example with a typo is a trap
    service_links = re.compile(r"PGNOTIFY_WORKER_(SERVICE|PORT)")  # what enableServiceLinks avoids
    for path in DEPLOY.rglob("*.yaml"):
        for name in re.findall(r"\bPGNOTIFY_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
            if not service_links.match(name):
                assert name in SETTINGS, f"{path.relative_to(ROOT)}: {name}"


@pytest.mark.parametrize("overlay", ["base", "overlays/example"])
def test_the_configuration_is_accepted_by_the_worker(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = effective(DEPLOY / overlay, "ConfigMap", "pgnotify-worker")
    secret = one(DEPLOY / "base" / "secret.example.yaml", "Secret", "pgnotify-worker-secrets")
    assert config is not None
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**config["data"], **secret["stringData"]}.items():
        monkeypatch.setenv(name, str(value))
    deployment = effective(DEPLOY / overlay, "Deployment", "pgnotify-worker")
    assert deployment is not None
    for env in container(deployment).get("env", []):
        monkeypatch.setenv(env["name"], env["value"])
    settings = Settings()  # raises on anything the worker would refuse at start (exit 2)
    assert settings.migrate_on_start is False
    assert settings.log_format == "json"
    # provider lists and rate limits make sense (a provider lacking its credential only turns
    # its channel off; a ConfigError here would stop the worker)
    built = build_providers(settings, None)  # type: ignore[arg-type]
    assert set(built) == set(settings.channels)
    assert not built["inapp"].disabled_reason


# --- the Deployment -----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["base", "overlays/example", "overlays/autoscaling"])
def test_termination_grace_exceeds_the_worker_grace_period(overlay: str) -> None:
    deployment = effective(DEPLOY / overlay, "Deployment", "pgnotify-worker")
    config = effective(DEPLOY / overlay, "ConfigMap", "pgnotify-worker")
    assert deployment is not None and config is not None
    grace = float(
        config["data"].get("PGNOTIFY_GRACE_PERIOD", Settings.model_fields["grace_period"].default)
    )
    kill_after = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # the sends' grace period, then up to ~10 s to write outcomes and hand claims back
    assert kill_after > grace + 10


def test_migrations_run_in_an_init_container_as_the_owner_not_in_the_worker() -> None:
    deployment = one(CORE / "deployment.yaml", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in container(deployment)["env"]}
    assert env["PGNOTIFY_MIGRATE_ON_START"] == "false"
    (migrate,) = pod["initContainers"]
    assert migrate["image"] == container(deployment)["image"]
    assert migrate["command"] + migrate["args"] == ["pgnotify-worker", "migrate"]
    assert container(deployment)["command"] + container(deployment)["args"] == [
        "pgnotify-worker",
        "run",
    ]
    # the owner's URL goes to the init container only; the worker never sees that Secret
    (url,) = migrate["env"]
    assert url["name"] == "PGNOTIFY_DATABASE_URL"
    assert url["valueFrom"]["secretKeyRef"] == {
        "name": "pgnotify-worker-migrate",
        "key": "PGNOTIFY_DATABASE_URL",
    }
    assert not any("secretRef" in source for source in migrate["envFrom"])
    assert "pgnotify-worker-migrate" not in yaml.safe_dump(pod["containers"])
    # no Job any more: nothing immutable to delete by hand on a release
    for directory in kustomization_dirs():
        for path in directory.glob("*.yaml"):
            assert all(d.get("kind") != "Job" for d in docs_in(path)), path
    example = one(DEPLOY / "base" / "secret.example.yaml", "Secret", "pgnotify-worker-migrate")
    assert set(example["stringData"]) == {"PGNOTIFY_DATABASE_URL"}


def test_probes_hit_healthz_and_readyz_on_the_http_port() -> None:
    deployment = one(CORE / "deployment.yaml", "Deployment")
    worker = container(deployment)
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    config = one(CORE / "configmap.yaml", "ConfigMap")
    assert ports == {"http": int(config["data"]["PGNOTIFY_HTTP_PORT"])} == {"http": 9090}
    expected = {
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in expected.items():
        assert worker[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    # a slow start must not be killed by the liveness probe
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    service = one(CORE / "service.yaml", "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 9090, "targetPort": "http", "protocol": "TCP"}
    ]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_rollout_keeps_capacity_and_spreads_replicas() -> None:
    deployment = one(CORE / "deployment.yaml", "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = spec["template"]["spec"]
    assert pod.get("topologySpreadConstraints") or pod.get("affinity", {}).get("podAntiAffinity")
    spread = pod["topologySpreadConstraints"]
    assert any(c["topologyKey"] == "kubernetes.io/hostname" for c in spread)
    resources = container(deployment)["resources"]
    assert resources["requests"] == {"cpu": "250m", "memory": "128Mi"}
    assert resources["limits"] == {"memory": "256Mi"}
    pdb = one(CORE / "poddisruptionbudget.yaml", "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= spec["selector"]["matchLabels"].items()
    example = effective(DEPLOY / "overlays" / "example", "Deployment", "pgnotify-worker")
    assert example is not None and example["spec"]["replicas"] == 3
    scaled = effective(DEPLOY / "overlays" / "autoscaling", "Deployment", "pgnotify-worker")
    assert scaled is not None and "replicas" not in scaled["spec"], "the autoscaler owns it"


@pytest.mark.parametrize("which", ["containers", "initContainers"])
def test_pods_are_hardened(which: str) -> None:
    workload = one(CORE / "deployment.yaml", "Deployment")
    pod = workload["spec"]["template"]["spec"]
    (each,) = pod[which]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # no PGNOTIFY_WORKER_* service variables
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    context = each["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == context["runAsGroup"] == 10001
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in each["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    account = one(CORE / "serviceaccount.yaml", "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_network_policy_allows_only_what_the_worker_needs() -> None:
    policy = one(CORE / "networkpolicy.yaml", "NetworkPolicy")
    spec = policy["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
    assert ingress_ports == {9090}
    egress_ports = {p["port"] for rule in spec["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 5432, 443, 587, 465}
    https = next(r for r in spec["egress"] if 443 in {p["port"] for p in r["ports"]})
    excepted = {e for peer in https["to"] for e in peer["ipBlock"].get("except", [])}
    assert "169.254.169.254/32" in excepted


def test_autoscalers_count_ready_rows() -> None:
    overlay = DEPLOY / "overlays" / "autoscaling"
    scaled = one(overlay / "scaledobject.yaml", "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "pgnotify-worker"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    # only rows some worker can send (schema 0014): unconfigured or paused channels never scale
    assert trigger["metadata"]["query"] == "SELECT ready FROM pgnotify.sendable_backlog"
    auth = one(overlay / "triggerauthentication.yaml", "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (ref,) = auth["spec"]["secretTargetRef"]
    # a read-only role in pgnotify_scaler, never the worker's (or the owner's) credentials
    assert ref["name"] == "pgnotify-scaler"
    assert ref["key"] not in SECRET_SETTINGS
    assert "pgnotify_scaler" in (overlay / "triggerauthentication.yaml").read_text()
    hpa = one(overlay / "hpa" / "hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"] == {
        "name": "pgnotify_queue_depth",
        "selector": {"matchLabels": {"state": "ready"}},
    }
    assert "prometheus-adapter" in (overlay / "hpa" / "hpa.yaml").read_text()


# --- monitoring ---------------------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def github_anchors(markdown: str) -> set[str]:
    anchors = set(re.findall(r'<a (?:id|name)="([^"]+)"', markdown))
    for heading in re.findall(r"^#{1,6} +(.+?) *$", markdown, flags=re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def test_prometheus_rule_has_exactly_the_groups_of_rules_yml() -> None:
    rule = one(CORE / "prometheusrule.yaml", "PrometheusRule")
    plain = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == plain["groups"]
    assert [g["name"] for g in plain["groups"]] == ["pgnotify-worker"]


def test_every_alert_has_severity_summary_description_and_a_runbook_anchor_that_exists() -> None:
    anchors = github_anchors(OPERATIONS.read_text())
    names = [rule["alert"] for rule in rules()]
    assert {
        "PgnotifyBacklogHigh",
        "PgnotifyDeadLetters",
        "PgnotifySlowDelivery",
        "PgnotifyJobFailing",
        "PgnotifyJobStale",
        "PgnotifyListenerDown",
        "PgnotifyCircuitOpen",
        "PgnotifyWorkerAbsent",
        "PgnotifyNotReady",
        "PgnotifyOldestReady",
    } <= set(names)
    assert len(names) == len(set(names))
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        url = annotations["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page.endswith("docs/operations.md"), url
        assert anchor == rule["alert"].lower(), url
        assert anchor in anchors, f"docs/operations.md has no section #{anchor}"


def test_every_aggregation_keeps_the_namespace() -> None:
    # one Prometheus often watches prod and staging: an aggregation without namespace would let
    # one hide or mix into the other. Only the fallback "no worker anywhere" is global.
    for rule in rules():
        expr = rule["expr"]
        for labels in re.findall(r"\b(?:sum|max|min|count|avg) by \(([^)]*)\)", expr):
            assert "namespace" in {label.strip() for label in labels.split(",")}, rule["alert"]
        if rule["alert"] != "PgnotifyWorkerAbsentEverywhere":
            assert not re.search(r"\b(?:sum|max|min|count|avg) *\(", expr), rule["alert"]
            assert "absent(" not in expr, rule["alert"]
        assert "exported_job" not in expr
    job_rules = [r for r in rules() if "pgnotify_job_" in r["expr"]]
    assert job_rules and all("periodic_job" in r["expr"] for r in job_rules)


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    tests = yaml.safe_load((DEPLOY / "prometheus" / "rules_test.yml").read_text())
    assert tests["rule_files"] == ["rules.yml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            if check.get("exp_alerts"):
                fires.add(check["alertname"])
                for alert in check["exp_alerts"]:
                    assert "severity" in alert["exp_labels"]
                    assert "runbook_url" in alert["exp_annotations"]
            else:
                quiet.add(check["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert fires == names, names - fires
    assert quiet == names, names - quiet


def load_check_module() -> Any:
    pytest.importorskip("kubernetes_validate")  # check.py imports it (and re-execs without it)
    spec = importlib.util.spec_from_file_location("deploy_check", DEPLOY / "check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_alerts_and_dashboard_use_only_exported_metrics() -> None:
    check = load_check_module()
    known = check.known_metrics()
    assert {"pgnotify_notifications_total", "pgnotify_end_to_end_latency_seconds_bucket"} <= known
    for rule in rules():
        names = check.metric_names(rule["expr"])
        assert names <= known, (rule["alert"], names - known)
    report = check.Report()
    check.check_dashboard(report)
    assert report.failures == []


def test_service_monitor_scrapes_the_service_every_15s_with_the_workers_job_labels() -> None:
    monitor = one(CORE / "servicemonitor.yaml", "ServiceMonitor")
    service = one(CORE / "service.yaml", "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    # no worker metric has a `job` label (the periodic job is `periodic_job`): the target's
    # labels win, and no metric can pose as another namespace
    assert not endpoint.get("honorLabels")
    # ... while `up` gets job=<Service name>, which PgnotifyWorkerAbsent uses
    absent = next(r for r in rules() if r["alert"] == "PgnotifyWorkerAbsent")
    assert f'job="{service["metadata"]["name"]}"' in absent["expr"]


# --- docs ---------------------------------------------------------------------------------------


def test_operations_doc_lists_the_log_fields_and_the_sections_users_look_for() -> None:
    text = OPERATIONS.read_text()
    anchors = github_anchors(text)
    for anchor in (
        "json-log-lines",
        "scaling",
        "retention",
        "upgrading-the-schema",
        "graceful-shutdown",
        "health-endpoints",
    ):
        assert anchor in anchors, anchor
    section = text.split("## JSON log lines", 1)[1].split("\n## ", 1)[0]
    for field in ("ts", "level", "logger", "message", *FIELDS):
        assert f"`{field}`" in section, field
    kubernetes = (ROOT / "docs" / "kubernetes.md").read_text()
    assert "the-secret" in github_anchors(kubernetes)
