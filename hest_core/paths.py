"""Where HEST keeps what it builds once: converted models, SVDs, calibration tables, kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("HEST_CACHE_DIR", Path.home() / ".cache" / "hest"))
