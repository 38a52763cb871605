"""HEST runtime: energy-budgeted generation with per-token fp16 / int8 / skip paths."""

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
    "load_adapter",
]
