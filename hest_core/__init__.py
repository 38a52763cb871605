"""HEST runtime: energy-budgeted generation with per-token paths (fp16 / int8 / skip: the registry
in `hest_core/paths.py`). This module is its public API (`from hest_core import Engine, ...`).

The layout, in layers (lowest first); a module may import its own layer and those below it, never
one above (tests/test_import_graph.py checks it, lazy imports included):

* the foundation, top-level modules: `errors.py` (one exception family), `paths.py` (the path
  registry), `config.py` (`RuntimeConfig`, the one place the environment is read),
  `cachedirs.py`, `dtypes.py`; they import only each other;
* `exec/`: the lean decoder, its per-path products, the KV cache, the native kernels;
* `adapter/`: the controller that picks the paths, the spectral weight change, the artifact;
* `energy/`: meters, the energy model and the calibration that measures it;
* `runtime/`: the engine, requests and their budgets, admission, continuous batching;
* the entry points: this module, `__main__.py` (`python -m hest_core summarize`) and `bench/`
  (`python -m hest_core.bench`); they may import everything.

Each package's `__init__.py` says what it owns and what it may import.
"""

from .adapter.artifact import HestAdapter, HestConfig, load_adapter
from .adapter.controller import Controller
from .errors import (
    AdapterMismatchError,
    BudgetTooLowError,
    CalibrationError,
    HestError,
    InvalidInputError,
    MeterUnavailableError,
    ModelLoadError,
)
from .paths import names as path_names
from .runtime.decoding import TextDelta, TokenLogprob
from .runtime.engine import Engine
from .runtime.prompt import build_prompt
from .runtime.request import GenerationRequest, GenerationResult, PreparedRequest, RequestStats
from .runtime.scheduler import Scheduler

__all__ = [
    "AdapterMismatchError",
    "BudgetTooLowError",
    "CalibrationError",
    "Controller",
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "HestAdapter",
    "HestConfig",
    "HestError",
    "InvalidInputError",
    "MeterUnavailableError",
    "ModelLoadError",
    "PreparedRequest",
    "RequestStats",
    "Scheduler",
    "TextDelta",
    "TokenLogprob",
    "build_prompt",
    "path_names",
    "load_adapter",
]
