"""Where HEST keeps what it builds once: converted models, SVDs, calibration tables, kernels."""

from __future__ import annotations

from pathlib import Path

from .config import RuntimeConfig


def cache_dir(config: RuntimeConfig | None = None) -> Path:
    """The cache directory: `config.cache_dir` (None: `RuntimeConfig.from_env()`, i.e.
    $HEST_CACHE_DIR, else ~/.cache/hest)."""
    return (config or RuntimeConfig.from_env(only=("cache_dir",))).cache_dir
