"""The errors the server raises itself, each with its HTTP status, error type and code (runtime
errors pass through as they are). Free of FastAPI and of the serving logic, so every module can
raise them; `errors.py` turns them into responses."""

from __future__ import annotations

from hest_core import HestError


class ServerError(HestError):
    status = 500
    type = "server_error"
    code = "server_error"

    def __init__(self, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(ServerError):
    status, type, code = 429, "overloaded_error", "queue_full"


class ShuttingDownError(ServerError):
    status, type, code = 503, "unavailable_error", "shutting_down"


class NotReadyError(ServerError):
    status, type, code = 503, "unavailable_error", "not_ready"


class EngineFailedError(ServerError):
    status, type, code = 500, "server_error", "engine_error"
