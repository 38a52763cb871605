"""How well a calibration table models this machine: modelled J against the estimate meter
(wall time x nominal watts) on real requests, fp16 and HEST@0.6, 2 threads by default.

    python tools/calibration_check.py OLD_TABLE NEW_TABLE [--data PAIRS.jsonl --skip 100 --n 8]

Uses training pairs by default (a measurement, not an evaluation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hest_core import Engine, GenerationRequest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tables", nargs="+")
    ap.add_argument("--data", default="../shared/data/cnndm/train.jsonl")
    ap.add_argument("--skip", type=int, default=100)
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_args()
    lines = [ln for ln in open(args.data) if ln.strip()][args.skip : args.skip + args.n]
    arts = [json.loads(ln)["article"] for ln in lines]
    for cal in args.tables:
        for pol, ad, r in (("fp16", None, 1.0), ("hest", "default", 0.6)):
            e = Engine.from_pretrained(
                "default", adapter=ad, policy=pol, calibration=cal, progress=False
            )
            e.warmup()
            ms, es = [], []
            for a in arts:
                req = GenerationRequest(a, energy_budget_ratio=r, max_new_tokens=96)
                st = e.generate([req])[0].stats
                ms.append(st.modelled_j)
                es.append(st.estimated_j)
            ratio = statistics.median(m / x for m, x in zip(ms, es, strict=True))
            print(
                f"{cal}: {pol}@{r}: modelled {statistics.median(ms):.2f} J, estimate meter "
                f"{statistics.median(es):.2f} J, median ratio {ratio:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
