"""What each request carries: its prompt text and its energy budget.

Budgets are given with one grammar for `--budget-ratio` and `--budget-j`:
  "0.6"              every request gets 0.6
  "0.4,0.6,1.0"      requests cycle through the list (request i gets item i % 3)
  "uniform:0.4,1.0"  drawn uniformly in [0.4, 1.0] (seeded)
  "loguniform:0.5,4" drawn log-uniformly in [0.5, 4]
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

DISTRIBUTIONS = ("uniform", "loguniform")

_TEXT = (
    "the council said on tuesday that the new bridge over the river would open next spring after "
    "two years of delays caused by rising costs and a shortage of steel engineers told reporters "
    "that traffic in the city centre is expected to fall by a third while local shops fear fewer "
    "visitors officials added that the project had been funded by the regional government and a "
    "group of private investors who expect tolls to repay the loan within fifteen years"
)
_WORDS = _TEXT.split(" ")


class LoadtestError(Exception):
    """A bad option or an unusable input; the message says what to change."""


@dataclass(frozen=True)
class BudgetSpec:
    """How to pick a budget per request: none, a fixed value, a cycled list or a distribution."""

    field: str | None = None  # "energy_budget_ratio" | "energy_budget_j" | None (server default)
    values: tuple[float, ...] = ()
    distribution: str | None = None  # one of DISTRIBUTIONS
    low: float = 0.0
    high: float = 0.0

    @classmethod
    def parse(cls, text: str | None, *, kind: str) -> BudgetSpec:
        """Parse `text` for `kind` ("ratio" or "j"); None gives the server's default budget."""
        if text is None:
            return cls()
        name = "energy_budget_ratio" if kind == "ratio" else "energy_budget_j"
        option = "--budget-ratio" if kind == "ratio" else "--budget-j"
        text = text.strip()
        if ":" in text:
            dist, _, bounds = text.partition(":")
            if dist not in DISTRIBUTIONS:
                raise LoadtestError(
                    f"{option} {text!r}: unknown distribution {dist!r}; use one of {DISTRIBUTIONS}"
                )
            low, high = _floats(bounds, option, text)[:2] if "," in bounds else (None, None)
            if low is None or high is None or not 0 < low <= high:
                raise LoadtestError(
                    f"{option} {text!r}: give two bounds 0 < low <= high, e.g. {dist}:0.4,1.0"
                )
            return cls(field=name, distribution=dist, low=low, high=high)
        values = _floats(text, option, text)
        if not values or any(v <= 0 for v in values):
            raise LoadtestError(
                f"{option} {text!r}: give positive numbers, e.g. 0.6 or 0.4,0.6,1.0"
            )
        return cls(field=name, values=tuple(values))

    def draw(self, index: int, rng: random.Random) -> float | None:
        """The budget for request `index` (None: send no budget field)."""
        if self.field is None:
            return None
        if self.distribution == "uniform":
            return rng.uniform(self.low, self.high)
        if self.distribution == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return self.values[index % len(self.values)]

    def group(self, value: float | None) -> str:
        """Label of the budget group a drawn value falls in (for per-budget tables)."""
        if value is None:
            return "server default"
        unit = "ratio" if self.field == "energy_budget_ratio" else "J"
        if self.distribution is not None:
            value = round(value, 1) if unit == "ratio" else float(f"{value:.2g}")
        return f"{unit} {value:g}"

    def describe(self) -> str:
        if self.field is None:
            return "server default"
        if self.distribution is not None:
            return f"{self.field} ~ {self.distribution}({self.low:g}, {self.high:g})"
        return f"{self.field} = {','.join(f'{v:g}' for v in self.values)}"


def _floats(text: str, option: str, whole: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise LoadtestError(f"{option} {whole!r}: not a number list ({err})") from err
    if any(not math.isfinite(v) for v in values):
        raise LoadtestError(f"{option} {whole!r}: values must be finite")
    return values


@dataclass
class PromptSource:
    """Prompt texts, read from a JSONL file or generated; request i gets text i % len."""

    texts: list[str] = field(default_factory=list)
    origin: str = ""

    @classmethod
    def from_jsonl(
        cls, path: str | Path, *, text_field: str = "article", limit: int | None = None
    ) -> PromptSource:
        path = Path(path)
        if not path.is_file():
            raise LoadtestError(f"--prompts {path}: no such file; give a JSONL file or omit it")
        texts: list[str] = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise LoadtestError(f"{path}:{number}: not JSON ({err})") from err
                value = row.get(text_field) if isinstance(row, dict) else None
                if not isinstance(value, str) or not value.strip():
                    raise LoadtestError(
                        f"{path}:{number}: no non-empty string field {text_field!r}; "
                        f"pick the field with --prompt-field"
                    )
                texts.append(value)
                if limit is not None and len(texts) >= limit:
                    break
        if not texts:
            raise LoadtestError(f"--prompts {path}: the file holds no rows")
        return cls(texts=texts, origin=f"{path} (field {text_field!r}, {len(texts)} rows)")

    @classmethod
    def generated(cls, *, words: int = 300, count: int = 32, seed: int = 0) -> PromptSource:
        """Deterministic news-like filler text of `words` words, `count` variants."""
        if words < 1 or count < 1:
            raise LoadtestError(f"--generated-words {words}: give a positive word count")
        rng = random.Random(seed)
        texts = []
        for _ in range(count):
            start = rng.randrange(len(_WORDS))
            body = [_WORDS[(start + j) % len(_WORDS)] for j in range(words)]
            sentences = [" ".join(body[k : k + 15]).capitalize() + "." for k in range(0, words, 15)]
            texts.append(" ".join(sentences))
        return cls(texts=texts, origin=f"generated ({count} texts of {words} words, seed {seed})")

    def truncated(self, max_chars: int | None) -> PromptSource:
        if max_chars is None:
            return self
        return PromptSource(
            [t[:max_chars] for t in self.texts], f"{self.origin}, <= {max_chars} chars"
        )

    def get(self, index: int) -> str:
        return self.texts[index % len(self.texts)]
