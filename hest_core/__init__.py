"""HEST runtime: energy-budgeted generation with per-token paths (fp16 / int8 / skip: the registry
in `hest_core/paths.py`)."""

from .artifact import HestAdapter, HestConfig, load_adapter
from .controller import Controller
from .decoding import TextDelta, TokenLogprob
from .engine import Engine
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
from .prompt import build_prompt
from .request import GenerationRequest, GenerationResult, PreparedRequest, RequestStats
from .scheduler import Scheduler

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
