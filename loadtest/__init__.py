"""Load generator for HEST serving: latency percentiles, goodput and joules per request.

Talks to a server over HTTP only (the native `/v1/summarize` API or OpenAI chat-completions).
Run it as `python -m loadtest --help`.
"""

from loadtest.client import RequestRecord
from loadtest.report import summarize_run
from loadtest.runner import RunConfig, run_load
from loadtest.spec import BudgetSpec, PromptSource

__all__ = [
    "BudgetSpec",
    "PromptSource",
    "RequestRecord",
    "RunConfig",
    "run_load",
    "summarize_run",
]
