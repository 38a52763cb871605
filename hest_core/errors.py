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
