"""Schemathesis fuzzes the OpenAPI schema against the in-process app (ASGI, lifespan running, tiny
model): no 5xx for any input, and every response matches its declared status, content type and
schema. A short run sits in the default tier; `-m slow` runs many more examples per operation.
Set HEST_FUZZ_EXAMPLES to change the slow tier's count."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from server_helpers import tiny_settings

from server import create_app

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


# The app loads its own tiny engine in its lifespan, which schemathesis runs. (Not a fixture:
# schemathesis 4.32's `from_fixture` breaks on pytest 9, `Function._nodeid`.)
APP = create_app(
    tiny_settings(model="tiny:llama", adapter="none", max_new_tokens=16), background_load=False
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much]


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=HEALTH, derandomize=True)
def test_fuzz_quick(case) -> None:
    _bounded(case)
    case.call_and_validate(checks=CHECKS)


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("HEST_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=HEALTH,
)
def test_fuzz_many(case) -> None:
    _bounded(case)
    case.call_and_validate(checks=CHECKS)


def _bounded(case) -> None:
    """Keep generation short: a valid max_new_tokens / max_tokens above 16 becomes 16 (the server
    still validates every other field as generated)."""
    body = case.body
    if isinstance(body, dict):
        for key in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if type(value) is int and 16 < value <= 512:
                body[key] = 16
