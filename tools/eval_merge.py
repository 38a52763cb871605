"""One results table from several `python -m training.evaluate` runs of the same pairs (e.g. the
fixed paths, HEST and lora-r8 run as separate commands or sessions): reads every run's samples
(X.samples.jsonl and X.samples.shard-*.jsonl), keeps the pairs that every row has finished, and
writes OUT.json, OUT.md, OUT_paths.png (path shares per layer) and OUT_pareto.png (ROUGE-L
against modelled joules, one curve per method) with `training.report`, as evaluate does.

usage: python tools/eval_merge.py --paths fp16,int8,int4,skip --out docs/results/X.json \
           runs/s10/test300.json runs/s10/test300h.json runs/s11/lora300.json
Rows present in several runs: the later run on the command line wins. Pairs some row has not
finished are left out (their number is printed and written as `pairs_left_out`).
`--summaries EARLIER.json` (an earlier OUT.json of the same pairs) supplies the rows that no run
given here has samples for, as that file summarised them: the way to replace one method's rows
once the other rows' sample files are gone; their pair count must equal this merge's."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from hest_core import paths as reg
from training.report import longest_prompts, markdown, summarise, write_outputs
from training.samples import other_samples


def run_params(js: Path) -> dict[str, int]:
    """row -> controller_params as the run's own summary gives it (evaluate fills LoRA's from
    the model), where the run's X.json exists."""
    if not js.exists():
        return {}
    rows = json.loads(js.read_text()).get("rows", [])
    return {r["row"]: r["controller_params"] for r in rows if "controller_params" in r}


def earlier_rows(path: Path, summary: list[dict], n: int) -> list[dict]:
    """`summary` with the rows of the earlier merge at `path` that it lacks, sorted by row
    name. Raises SystemExit where that merge summarised another number of pairs than n."""
    earlier = json.loads(path.read_text())
    if earlier.get("n") != n:
        raise SystemExit(f"{path} summarises {earlier.get('n')} pairs, this merge {n}")
    have = {r["row"] for r in summary}
    return sorted(
        summary + [r for r in earlier["rows"] if r["row"] not in have], key=lambda r: r["row"]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/eval_merge.py", description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path, help="the --json of each evaluate run")
    ap.add_argument("--paths", default="fp16,int8,int4,skip", help="the runs' path set")
    ap.add_argument("--out", type=Path, required=True, help="OUT.json")
    ap.add_argument(
        "--summaries",
        type=Path,
        default=None,
        help="an earlier OUT.json of the same pairs: its rows that no run here has",
    )
    args = ap.parse_args(argv)
    reg.enable(tuple(args.paths.split(",")))
    by_row: dict[str, dict[str, dict]] = defaultdict(dict)
    params: dict[str, int] = {}
    for js in args.runs:
        recs = other_samples(js)
        params.update(run_params(js))
        if not recs:
            raise SystemExit(f"no samples next to {js} ({js.stem}.samples*.jsonl)")
        for (row, pid), r in recs.items():
            by_row[row][pid] = r | {"id": pid}
    every = set.union(*(set(v) for v in by_row.values()))
    common = sorted(set.intersection(*(set(v) for v in by_row.values())))
    rows = [(row, row.split("@")[0], None) for row in sorted(by_row)]
    done = {(row, i): by_row[row][i] for row, _, _ in rows for i in common}
    longest = longest_prompts(rows, common, done)
    summary = [
        summarise(row, pol, [done[(row, i)] for i in common], longest) for row, pol, _ in rows
    ]
    for row in summary:  # LoRA's trainable parameters come from its run, not its samples
        if row["row"] in params and "controller_params" in row:
            row["controller_params"] = params[row["row"]]
    if args.summaries is not None:
        summary = earlier_rows(args.summaries, summary, len(common))
    md = markdown(summary, len(common))
    out = {
        "runs": [str(p) for p in args.runs] + ([str(args.summaries)] if args.summaries else []),
        "n": len(common),
        "pairs_left_out": len(every) - len(common),
        "rows": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_outputs(args.out, out, md)
    print(f"{len(common)} pairs done by all {len(rows)} rows ({len(every) - len(common)} left out)")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
