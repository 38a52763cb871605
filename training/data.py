"""CNN/DailyMail pairs from a local JSONL file or the hub, and tokenised training examples.

One loader for both sources:
* a local JSONL path: one object per line with `id`, `article`, `highlights`;
* ``"hub:abisee/cnn_dailymail:<split>"`` (config 3.0.0) through `datasets` (needs network).
Prompts always come from `hest_core.runtime.prompt.build_prompt`, the one format shared with the server,
and every target summary ends on `hest_core.runtime.prompt.end_of_turn_id`, a token generation stops on.
`Batches` is the deterministic example order every trainer uses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from hest_core.errors import HestError
from hest_core.runtime.prompt import build_prompt, end_of_turn_id

HUB_PREFIX = "hub:"
HUB_DATASET = "abisee/cnn_dailymail"
HUB_CONFIG = "3.0.0"
FIELDS = ("id", "article", "highlights")


class DataError(HestError):
    """A data source that cannot be read as CNN/DM pairs."""

    code = "data_error"


@dataclass(frozen=True)
class Pair:
    id: str
    article: str
    highlights: str  # reference summary, one sentence per line
    # a long-input set's own prompt (training/digests.py): the instruction that replaces the
    # default one, and the tokens its summary may take; None: the evaluation's defaults
    instruction: str | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class Example:
    """A tokenised teacher-forcing example: prompt ids then summary ids (end of turn last)."""

    id: str
    prompt: list[int]
    summary: list[int]
    truncated: bool


def _check(row: object, where: str) -> Pair:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with fields {FIELDS}, got {row!r:.80}")
    missing = [f for f in ("article", "highlights") if not isinstance(row.get(f), str)]
    if missing:
        raise DataError(
            f"{where}: missing or non-string field(s) {missing}; each line needs {FIELDS}",
            param="data",
        )
    instruction, max_new = row.get("instruction"), row.get("max_new_tokens")
    if instruction is not None and not (isinstance(instruction, str) and instruction.strip()):
        raise DataError(f"{where}: instruction must be a non-blank string", param="data")
    if max_new is not None and (isinstance(max_new, bool) or not isinstance(max_new, int)):
        raise DataError(f"{where}: max_new_tokens must be an integer", param="data")
    return Pair(str(row.get("id", where)), row["article"], row["highlights"], instruction, max_new)


def load_jsonl(path: str | Path, limit: int | None = None) -> list[Pair]:
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"data file {str(p)!r} does not exist; give a JSONL path with fields {FIELDS} "
            f"or '{HUB_PREFIX}{HUB_DATASET}:<train|validation|test>'",
            param="data",
        )
    out: list[Pair] = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{p}:{n}: not valid JSON ({err.msg})", param="data") from err
            out.append(_check(row, f"{p}:{n}"))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{p} holds no examples", param="data")
    return out


def load_hub(split: str, limit: int | None = None) -> list[Pair]:
    """abisee/cnn_dailymail 3.0.0 through `datasets` (downloads on first use)."""
    try:
        import datasets
    except ImportError as err:
        raise DataError("the hub source needs `pip install datasets`", param="data") from err
    try:
        ds = datasets.load_dataset(HUB_DATASET, HUB_CONFIG, split=split)
    except Exception as err:
        raise DataError(
            f"cannot load {HUB_DATASET} ({HUB_CONFIG}, split {split!r}) from the hub: "
            f"{type(err).__name__}: {err}. Check the network (or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE),"
            " or use a local JSONL file instead",
            param="data",
        ) from err
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [_check(dict(r), f"{HUB_DATASET}[{split}][{i}]") for i, r in enumerate(ds)]


def load_pairs(source: str | Path, limit: int | None = None) -> list[Pair]:
    """A local JSONL path, or 'hub:abisee/cnn_dailymail:<split>' (split defaults to train)."""
    s = str(source)
    if s.startswith(HUB_PREFIX):
        rest = s[len(HUB_PREFIX) :]
        name, _, split = rest.partition(":")
        if name != HUB_DATASET:
            raise DataError(
                f"hub source {name!r} is not supported; use '{HUB_PREFIX}{HUB_DATASET}:<split>'",
                param="data",
            )
        return load_hub(split or "train", limit)
    return load_jsonl(s, limit)


def target_text(highlights: str) -> str:
    """The reference as prose: CNN/DM highlights are one sentence per line with ' .' spacing."""
    lines = [re.sub(r"\s+([.,!?;:'])", r"\1", ln.strip()) for ln in highlights.split("\n")]
    return " ".join(ln for ln in lines if ln)


def tokenize(tokenizer, pair: Pair, max_article_tokens: int, max_summary_tokens: int) -> Example:
    prompt, truncated = build_prompt(tokenizer, pair.article, max_article_tokens)
    summ = tokenizer.encode(target_text(pair.highlights), add_special_tokens=False)
    summ = summ[: max_summary_tokens - 1] + [end_of_turn_id(tokenizer)]
    return Example(pair.id, prompt, summ, truncated)


class Batches:
    """Deterministic example order: a seeded permutation per epoch, so the examples of a step are
    a function of (seed, step) and a resumed run sees what the uninterrupted one saw. Examples
    are tokenised on first use."""

    def __init__(
        self,
        pairs: list[Pair],
        tokenizer,
        seed: int,
        batch: int,
        article_tokens: int,
        summary_tokens: int,
    ):
        self.pairs, self.tok, self.seed, self.batch = pairs, tokenizer, seed, batch
        self.limits = (article_tokens, summary_tokens)
        self.cache: dict[int, Example] = {}
        self.perms: dict[int, list[int]] = {}

    @classmethod
    def from_args(cls, args, tokenizer) -> Batches:
        """The order `python -m training.train` uses (--data, --limit, --seed, --batch, limits)."""
        pairs = load_pairs(args.data, args.limit)
        a = args
        return cls(pairs, tokenizer, a.seed, a.batch, a.max_article_tokens, a.max_summary_tokens)

    def _index(self, flat: int) -> int:
        n = len(self.pairs)
        epoch, i = divmod(flat, n)
        if epoch not in self.perms:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self.perms[epoch] = torch.randperm(n, generator=g).tolist()
        return self.perms[epoch][i]

    def get(self, step: int) -> list[Example]:
        """The `batch` examples of one step."""
        out = []
        for j in range(self.batch):
            i = self._index(step * self.batch + j)
            if i not in self.cache:
                self.cache[i] = tokenize(self.tok, self.pairs[i], *self.limits)
            out.append(self.cache[i])
        return out
