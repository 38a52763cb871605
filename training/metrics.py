"""ROUGE (rouge-score, stemming on), the lead-3 reference and small statistics helpers.

ROUGE-Lsum needs one sentence per line. nltk's `sent_tokenize` needs the punkt data, which
cannot be downloaded on this machine, so sentences are split with a simple regex: a split after
`.`, `!` or `?` (optionally followed by a closing quote or bracket) and whitespace. It misses
abbreviations ("U.S. officials" splits after "U.S."); the same splitter is used for every
policy, the references and lead-3, so comparisons between rows stay fair.
"""

from __future__ import annotations

import math
import re

_SENT = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def split_sentences(text: str) -> list[str]:
    out = []
    for line in text.strip().split("\n"):
        out.extend(s.strip() for s in _SENT.split(line.strip()) if s.strip())
    return out


def lead3(article: str) -> str:
    return "\n".join(split_sentences(article)[:3])


_scorer = None


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """F-measures x100 for ROUGE-1/2/L/Lsum; both texts re-split one sentence per line."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(list(KEYS), use_stemmer=True)
    pred = "\n".join(split_sentences(prediction))
    ref = "\n".join(split_sentences(reference))
    s = _scorer.score(ref, pred)
    return {k: 100.0 * s[k].fmeasure for k in KEYS}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for an empty list."""
    if not values:
        return math.nan
    v = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(v)))
    return v[rank - 1]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
