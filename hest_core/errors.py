"""One exception family for the runtime. Messages carry the bad value and the fix."""

from __future__ import annotations


class HestError(Exception):
    """Base class of every error the runtime raises on purpose."""

    code = "hest_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidInputError(HestError):
    """A request the runtime cannot run as given (empty text, bad budget, too long...)."""

    code = "invalid_input"


class BudgetTooLowError(InvalidInputError):
    """The budget is below the cheapest feasible work for this prompt."""

    code = "budget_below_minimum"

    def __init__(self, message: str, *, minimum_j: float, param: str | None = None):
        super().__init__(message, param=param)
        self.minimum_j = minimum_j


class AdapterMismatchError(HestError):
    """An adapter artifact does not fit the base model it is loaded onto."""

    code = "adapter_mismatch"


class ModelLoadError(HestError):
    """The base model could not be found, converted or loaded."""

    code = "model_load_failed"


class CalibrationError(HestError):
    """The energy calibration table is missing, malformed or for another model."""

    code = "calibration_error"


class NativeArgumentError(HestError):
    """A native kernel refused its arguments (rows, shapes, positions, path codes, scratch)
    before touching memory. Always a bug in the caller, never a user's input: the message names
    the kernel and what it refused."""

    code = "native_argument_error"


class CacheOverflowError(HestError):
    """A forward would write past the KV cache sized for its requests (a position beyond
    max_len, or a cache row that does not exist). A bug in the caller, refused before any write."""

    code = "kv_cache_overflow"


class MeterUnavailableError(HestError):
    """An energy meter was asked for by name (HEST_METER / meter=) and cannot be read here, or
    the name is not a meter. Auto-detection never raises this: it falls back to the estimate."""

    code = "meter_unavailable"


class RequestFailedError(HestError):
    """One request of a batch failed in its own per-token step (not its input, not the batched
    forward): that request ends with finish_reason "error"; the rest of its batch is served."""

    code = "request_failed"
