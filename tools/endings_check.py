"""Clean endings measured on real articles: share of outputs ending on a sentence boundary, mean
completion tokens, finish reasons and how the plan ended each output, with clean endings on and
off, for fp16 and HEST at a few budget ratios.

    python tools/endings_check.py [--data ../shared/data/cnndm/train.jsonl --skip 1610 --n 40]

By default rows 1610-1649 of train.jsonl: the validation split carved for the adaptive-budget
work (rows 1610-1809; adapters trained from now on use rows 0-1609). The session-4 adapter drew
its 300 training examples from the whole file, so a few of these may be among them: this is a
measurement of endings, not of quality. Never the test file.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hest_core import Engine, GenerationRequest  # noqa: E402
from hest_core.runtime.endings import ends_sentence  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/cnndm/train.jsonl")
    ap.add_argument("--skip", type=int, default=1610)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lines = [ln for ln in open(args.data) if ln.strip()][args.skip : args.skip + args.n]
    arts = [json.loads(ln)["article"] for ln in lines]
    rows = []
    for pol, ad, ratios in (("fp16", None, (1.0,)), ("hest", "default", (0.3, 0.6, 1.0))):
        e = Engine.from_pretrained("default", adapter=ad, policy=pol, progress=False)
        e.warmup()
        for r in ratios:
            for clean in (False, True):
                t0, outs = time.perf_counter(), []
                for a in arts:
                    req = GenerationRequest(
                        a, energy_budget_ratio=r, max_new_tokens=args.max_new, clean_end=clean
                    )
                    outs.append(e.generate([req])[0])
                row = {
                    "policy": pol,
                    "ratio": r,
                    "clean_end": clean,
                    "n": len(outs),
                    "boundary_share": sum(ends_sentence(o.text) for o in outs) / len(outs),
                    "mean_tokens": statistics.mean(o.stats.completion_tokens for o in outs),
                    "mean_modelled_j": statistics.mean(o.stats.modelled_j for o in outs),
                    "finish": dict(collections.Counter(o.finish_reason for o in outs)),
                    "detail": dict(collections.Counter(str(o.finish_detail) for o in outs)),
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
