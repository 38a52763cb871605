"""The request types of the runtime, in one module: what a caller asks (`GenerationRequest`),
what `Engine.check` makes of it (`PreparedRequest`: tokens, limits and the budget in exact
integer picojoules), and what comes back (`GenerationResult` with its `RequestStats`).
`engine.py` and `generation.py` re-export them under their old names."""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field

from .decoding import TokenLogprob
from .energy import PJ
from .errors import HestError


@dataclass
class PreparedRequest:
    ids: list[int]
    max_new: int
    budget_j: float
    budget_ratio: float
    fp16_cost_j: float
    min_j: float
    truncated: bool
    cancelled: threading.Event | None = None
    budget_q: int | None = None  # the exact budget in picojoules, when it came from check()
    # decoding (hest_core/decoding.py): stop strings, top-k log probabilities, sampling
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    clean_end: bool = True  # end on a sentence boundary, not mid-sentence (endings.py)

    def ledger_budget(self) -> int:
        """The guard's budget: the exact one from check() unless budget_j was changed since."""
        if self.budget_q is not None and self.budget_q / 10**12 == self.budget_j:
            return self.budget_q
        return math.floor(self.budget_j * 10**12)


@dataclass
class GenerationRequest:
    text: str
    energy_budget_j: float | None = None
    energy_budget_ratio: float | None = None
    max_new_tokens: int | None = None
    cancelled: threading.Event | None = None
    # decoding (hest_core/decoding.py; docs/contracts.md): None/empty = greedy, no stop, no logprobs
    stop: str | tuple[str, ...] = ()  # end the text before the first of these (at most 4)
    logprobs: int | None = None  # return each token's log probability and this many alternatives
    temperature: float | None = None  # 0 or None: greedy; else sample (0..2)
    top_p: float | None = None  # nucleus of the sampling (0..1)
    seed: int | None = None  # the sampling generator's seed
    system: str | None = None  # a system instruction for the chat template (replaces its default)
    # end on a sentence boundary, never mid-sentence because a limit ran out, and before a
    # repeated sentence (hest_core/endings.py); on by default for summaries
    clean_end: bool = True
    # a prompt over the context (minus max_new_tokens) is refused with the numbers unless this
    # asks to cut the article to fit (then stats.truncated is true)
    truncate: bool = False


@dataclass
class RequestStats:
    budget_j: float
    budget_ratio: float
    fp16_cost_j: float
    modelled_j: float
    measured_j: float | None
    prefill_j: float  # modelled: the prompt (and the first generated token, which it yields)
    decode_j: float  # modelled: every later decode step
    estimated_j: float
    meter: str
    prompt_tokens: int
    completion_tokens: int
    paths: dict[str, int]
    paths_per_layer: list[dict[str, int]]
    demotions: int
    truncated: bool
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    finish_reason: str
    stats: RequestStats = field(repr=False)
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)  # when asked
    # this request failed on its own (finish_reason "error"); the rest of its batch was served
    error: HestError | None = None
    # how the clean-ending plan shaped the end: "planned" (ended at a boundary because the next
    # sentence would not fit), "trimmed" (a limit struck mid-sentence: cut to the last boundary),
    # "repetition" (ended before a repeated sentence); None when it did not
    finish_detail: str | None = None


def budget_to_q(budget_j: float) -> int:
    """A budget in joules -> the guard's integer picojoules, rounded down."""
    return math.floor(budget_j * PJ)


def q_to_min_j(min_q: int) -> float:
    """The smallest float of joules whose budget_to_q() is >= min_q (so quoting it back works)."""
    m = min_q / PJ
    while budget_to_q(m) < min_q:
        m = math.nextafter(m, math.inf)
    return m
