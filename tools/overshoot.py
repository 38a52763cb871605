"""Modelled joules / budget per row of `python -m training.evaluate` runs, read from their samples
(X.samples*.jsonl next to each X.json): max, mean, how many requests went over 1, and the prompt
lengths. It shows a method without a guard (TABS) overshooting beside the guarded ones.

usage: python tools/overshoot.py runs/digests/eval_4096.json [more runs ...]"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from training.samples import other_samples


def ratios(js: Path) -> dict[str, list[tuple[float, int]]]:
    """row -> [(modelled J / budget J, prompt tokens)] over the run's samples with a budget."""
    by: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for (row, _), r in sorted(other_samples(js).items()):
        if r.get("budget_j"):
            by[row].append((r["modelled_j"] / r["budget_j"], r.get("prompt_tokens", 0)))
    return by


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    for arg in argv:
        print(arg)
        for row, v in sorted(ratios(Path(arg)).items()):
            o = [x for x, _ in v]
            p = [n for _, n in v]
            print(
                f"  {row}: n {len(o)}, J/budget max {max(o):.2f}, mean {sum(o) / len(o):.2f}, "
                f"over 1: {sum(x > 1 for x in o)}, prompt tokens {min(p)}-{max(p)}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
