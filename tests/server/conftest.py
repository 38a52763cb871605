"""Fixtures of the server tests; the code lives in server_helpers.py (a unique module name, since
several test folders have a conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).parent) not in sys.path:  # --import-mode=importlib adds no test dirs
    sys.path.insert(0, str(Path(__file__).parent))

from server_helpers import anyio_backend, real_server, tiny_engine  # noqa: E402

__all__ = ["anyio_backend", "real_server", "tiny_engine"]
