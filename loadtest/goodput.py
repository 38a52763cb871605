"""`python -m loadtest.goodput RUN.jsonl [...] --slo S [--slo-ttft T] [--slo-tpot P]`: goodput of
stored runs under other SLOs, from the per-request records a run keeps (`OUT/partial.jsonl` or
`OUT/report.json`), without running the load again.

Prints a markdown table, one row per load (server label and concurrency or rate): requests/s,
goodput within `--slo` end to end alone, and goodput within every SLO given (`report.within_slo`;
DistServe's goodput when TTFT and TPOT SLOs are set). Exit status 2 for a file that holds no
runs, or a bad SLO.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from loadtest.report import check_slos, describe_slos, goodput, tpot_of
from loadtest.spec import LoadtestError


def load_runs(path: Path) -> list[dict[str, Any]]:
    """The runs ({"summary", "requests"}) of a partial.jsonl (a JSON object a line) or a
    report.json (its "runs"). Raises LoadtestError for a file without runs."""
    try:
        text = path.read_text()
    except OSError as err:
        raise LoadtestError(f"{path}: {err.strerror}") from err
    try:
        if path.suffix == ".jsonl":
            runs = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            runs = json.loads(text).get("runs", [])
    except (json.JSONDecodeError, AttributeError) as err:
        raise LoadtestError(f"{path}: not a loadtest partial.jsonl or report.json") from err
    if not runs or not all(isinstance(r, dict) and "requests" in r for r in runs):
        raise LoadtestError(f"{path}: holds no runs with their requests")
    return runs


def regoodput(run: dict[str, Any], slo_s: float, ttft_slo_s=None, tpot_slo_s=None) -> dict:
    """`report.goodput` of one stored run under these SLOs (seconds), over the run's main
    requests (long prompts mixed in are apart, as in its summary) and its wall time."""
    reqs = [r for r in run["requests"] if r.get("kind", "main") == "main"]
    answered = [
        (r["latency_s"], r["ttft_s"], tpot_of(r["latency_s"], r["ttft_s"], r["completion_tokens"]))
        for r in reqs
        if r.get("ok")
    ]
    return goodput(answered, len(reqs), run["summary"]["wall_s"], slo_s, ttft_slo_s, tpot_slo_s)


def _load(summary: dict[str, Any]) -> str:
    if summary.get("concurrency") is not None and summary.get("mode") == "closed":
        return f"c={summary['concurrency']}"
    return f"{summary.get('rate_rps')} req/s"


def table(runs: list[dict[str, Any]], slo_s: float, ttft_slo_s=None, tpot_slo_s=None) -> str:
    """The markdown table described in the module docstring."""
    slos = describe_slos(slo_s, ttft_slo_s, tpot_slo_s)
    head = f"| load | server | requests/s | goodput <= {slo_s:g} s | goodput ({slos}) |"
    lines = [head, "| --- | --- | --- | --- | --- |"]
    for run in runs:
        s = run["summary"]
        e2e = regoodput(run, slo_s)
        every = regoodput(run, slo_s, ttft_slo_s, tpot_slo_s)
        cells = [_load(s), s["label"], f"{s['requests_per_s']:.3f}"]
        for g in (e2e, every):
            cells.append(
                f"{g['requests_per_s']:.3f} ({g['ok_within_slo']} of {s['requests']['sent']})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.goodput", description=__doc__.split("\n")[0]
    )
    ap.add_argument("runs", nargs="+", type=Path, help="partial.jsonl or report.json files")
    ap.add_argument("--slo", type=float, default=5.0, help="end-to-end SLO in s (default 5)")
    ap.add_argument("--slo-ttft", type=float, help="time-to-first-token SLO in s")
    ap.add_argument("--slo-tpot", type=float, help="time-per-output-token SLO in s")
    args = ap.parse_args(argv)
    try:
        check_slos({"--slo": args.slo, "--slo-ttft": args.slo_ttft, "--slo-tpot": args.slo_tpot})
        runs = [run for path in args.runs for run in load_runs(path)]
    except LoadtestError as err:
        print(f"loadtest.goodput: error: {err}", file=sys.stderr)
        return 2
    print(table(runs, args.slo, args.slo_ttft, args.slo_tpot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
