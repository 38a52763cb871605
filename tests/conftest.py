"""Shared fixtures. Engines are expensive: one per model per session."""

from __future__ import annotations

import pytest

from hest_core import Engine


@pytest.fixture(scope="session")
def tiny_engine() -> Engine:
    return Engine.from_pretrained("tiny:llama", adapter=None, progress=False)


@pytest.fixture(scope="session")
def default_engine() -> Engine:
    """The real default model (SmolLM2-135M-Instruct), no adapter."""
    return Engine.from_pretrained("default", adapter=None, progress=False)
