"""The request types of the runtime, in one module: what a caller asks (`GenerationRequest`),
what `Engine.check` makes of it (`PreparedRequest`: tokens, limits and the budget in exact
integer picojoules), and what comes back (`GenerationResult` with its `RequestStats`).
`engine.py` and `generation.py` re-export them under their old names."""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field, replace

from ..energy.model import PJ
from ..errors import HestError
from .budget import below_minimum, q_to_min_j
from .decoding import TokenLogprob


@dataclass(frozen=True)
class PreparedRequest:
    """A checked request (`Engine.check`). Its budget is integer picojoules, `budget_q`; joules
    and ratio are views of it. Built only with a budget at or above its minimum `min_q` when
    `guarded` (else BudgetTooLowError), so lowering it goes through `tighten`, which clamps."""

    ids: list[int]
    max_new: int
    budget_q: int  # the budget, picojoules (what the guard's ledger starts from)
    fp16_q: int  # the modelled all-fp16 cost of prompt + max_new tokens, picojoules
    min_q: int  # the cheapest feasible work (EnergyModel.min_feasible_q), picojoules
    truncated: bool
    cancelled: threading.Event | None = None
    # the article's tokens and how many of them the prompt holds (the read plan, reading.py);
    # truncated_by: "context" (cut to the model's context, asked with truncate), "budget" or
    # "policy" (the adapter's own read plan, reading.policy_read_budget_q)
    article_tokens: int = 0
    article_read: int = 0
    truncated_by: str | None = None
    budget_param: str = "energy_budget_ratio"  # the request field the budget came from
    guarded: bool = True  # False under a fixed policy (guard off): no minimum is enforced
    min_path: str | None = None  # the one path min_q is costed on (guard "stop"); None: cheapest
    # decoding (hest_core/runtime/decoding.py): stop strings, top-k log probabilities, sampling
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    clean_end: bool = True  # end on a sentence boundary, not mid-sentence (endings.py)

    def __post_init__(self) -> None:
        for name in ("budget_q", "fp16_q", "min_q"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TypeError(f"PreparedRequest.{name}={v!r} must be an integer >= 0 (pJ)")
        if self.fp16_q <= 0:
            raise ValueError(f"PreparedRequest.fp16_q={self.fp16_q} must be > 0 (pJ)")
        if self.guarded and self.budget_q < self.min_q:
            raise below_minimum(
                self.budget_param,
                self.budget_q,
                self.min_q,
                self.fp16_q,
                len(self.ids),
                self.min_path,
            )

    @property
    def budget_j(self) -> float:
        """The budget in joules (a view of budget_q)."""
        return self.budget_q / PJ

    @property
    def budget_ratio(self) -> float:
        """The budget over the all-fp16 cost (budget_q / fp16_q)."""
        return self.budget_q / self.fp16_q

    @property
    def fp16_cost_j(self) -> float:
        """The modelled all-fp16 cost in joules (a view of fp16_q)."""
        return self.fp16_q / PJ

    @property
    def min_j(self) -> float:
        """The minimum in joules: the smallest float whose picojoules reach min_q."""
        return q_to_min_j(self.min_q)

    def tighten(self, ratio: float) -> PreparedRequest:
        """This request with its budget lowered to `ratio` x its all-fp16 cost (pJ, rounded
        down), clamped at its minimum `min_q`; never raised: returns `self` when the new budget
        would not be lower. Raises ValueError for a ratio that is not a finite number >= 0."""
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio >= 0:
            raise ValueError(f"tighten(ratio={ratio!r}): the ratio must be a number >= 0")
        if not math.isfinite(ratio):
            raise ValueError(f"tighten(ratio={ratio!r}): the ratio must be finite")
        q = max(math.floor(ratio * self.fp16_q), self.min_q)
        return self if q >= self.budget_q else replace(self, budget_q=q)


@dataclass
class GenerationRequest:
    text: str
    energy_budget_j: float | None = None
    energy_budget_ratio: float | None = None
    max_new_tokens: int | None = None
    cancelled: threading.Event | None = None
    # decoding (hest_core/runtime/decoding.py; docs/contracts.md): None/empty = greedy, no stop, no logprobs
    stop: str | tuple[str, ...] = ()  # end the text before the first of these (at most 4)
    logprobs: int | None = None  # return each token's log probability and this many alternatives
    temperature: float | None = None  # 0 or None: greedy; else sample (0..2)
    top_p: float | None = None  # nucleus of the sampling (0..1)
    seed: int | None = None  # the sampling generator's seed
    system: str | None = None  # a system instruction for the chat template (replaces its default)
    # the instruction before the text in the user turn (replaces prompt.INSTRUCTION, "Summarize
    # the following news article in 3 sentences."); e.g. a digest's "Summarize each of ..."
    instruction: str | None = None
    # end on a sentence boundary, never mid-sentence because a limit ran out, and before a
    # repeated sentence (hest_core/runtime/endings.py); on by default for summaries
    clean_end: bool = True
    # a prompt over the context (minus max_new_tokens) is refused with the numbers unless this
    # asks to cut the article to fit (then stats.truncated is true)
    truncate: bool = False
    # "budget": where the budget cannot pay for the whole article and a summary, read the
    # article's head that leaves the summary paid for (reading.py); "whole": read everything
    read: str = "budget"


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
    article_tokens: int = 0  # the article's tokens (after any cut to the context)
    article_tokens_read: int = 0  # ... of which the prompt held (the read plan)
    truncated_by: str | None = None  # "context" | "budget" | "policy" | None
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
