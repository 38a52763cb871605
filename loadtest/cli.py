"""`python -m loadtest`: run bounded loads against one or two servers and report.

Examples (see docs/loadtest.md):
  python -m loadtest --url http://127.0.0.1:8000 --mode poisson --rate 0.5 --duration 60 \\
      --max-requests 30 --prompts ../shared/data/cnndm/test.jsonl --budget-ratio 0.6 --out runs/lt
  python -m loadtest --compare http://127.0.0.1:8000 http://127.0.0.1:8001 --sweep 0.2,0.4,0.8
  python -m loadtest.peer -- --mode closed --concurrency 1,4,8,16 ...   (against llama-server)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest.client import APIS, Target
from loadtest.report import (
    NOMINAL_WATTS,
    check_slos,
    describe_slos,
    render_markdown,
    render_text,
    summarize_run,
    table_rows,
)
from loadtest.runner import MODES, RunConfig, RunResult, run_load, wait_ready
from loadtest.spec import BudgetSpec, LoadtestError, PromptSource


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load generator for HEST serving (latency, goodput, joules per request).",
    )
    t = p.add_argument_group("target")
    t.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    t.add_argument(
        "--compare",
        nargs="+",
        metavar="URL",
        help="URL_A URL_B [URL_C ...]: run the same load on each in turn; ratios B/A (C/A, ...)",
    )
    t.add_argument("--labels", nargs="+", help="names for the target(s) in tables and plots")
    t.add_argument("--api", choices=APIS, default="native", help="native /v1/summarize or openai")
    t.add_argument(
        "--api-b",
        nargs="+",
        choices=APIS,
        help="protocol of the --compare targets after A: one for all, or one per target "
        "(default --api)",
    )
    t.add_argument("--endpoint", help="override the request path (e.g. /summarize)")
    t.add_argument("--model", default="default", help="OpenAI `model` field")
    t.add_argument("--max-new-tokens", type=int, default=64)
    t.add_argument("--no-stream", action="store_true", help="no SSE; TTFT from timings.ttft_s")
    t.add_argument("--wait-ready", type=float, default=0.0, metavar="S", help="wait for readiness")
    load = p.add_argument_group("load (every run is bounded by --max-requests AND --duration)")
    load.add_argument("--mode", choices=MODES, default="poisson")
    load.add_argument("--rate", type=float, default=1.0, help="requests/s (open loop)")
    load.add_argument("--sweep", help="comma-separated rates: one run per rate (open loop)")
    load.add_argument(
        "--concurrency", default="1", help="workers (closed loop); 1,4,8,16: one run per value"
    )
    load.add_argument("--max-requests", type=int, default=50)
    load.add_argument("--duration", type=float, default=60.0, help="seconds of sending")
    load.add_argument("--drain", type=float, default=60.0, help="extra seconds for in-flight")
    load.add_argument("--request-timeout", type=float, default=120.0)
    load.add_argument("--warmup", type=int, default=0, help="unmeasured requests before each run")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument(
        "--no-keepalive", action="store_true", help="a new connection per request (no reuse)"
    )
    src = p.add_argument_group("prompts and budgets")
    src.add_argument("--prompts", help="JSONL file (e.g. ../shared/data/cnndm/test.jsonl)")
    src.add_argument("--prompt-field", default="article")
    src.add_argument("--prompt-limit", type=int, help="read at most this many rows")
    src.add_argument("--generated-words", type=int, default=300, help="without --prompts")
    src.add_argument("--max-chars", type=int, help="cut each prompt to this many characters")
    src.add_argument(
        "--long-prompts",
        help="JSONL of long prompts to mix in (e.g. a digests_4096.jsonl of training.digests): "
        "one every --long-every s while the run sends, read whole, reported apart",
    )
    src.add_argument("--long-field", default="article", help="field of --long-prompts")
    src.add_argument("--long-every", type=float, default=10.0, help="seconds between long prompts")
    budget = src.add_mutually_exclusive_group()
    budget.add_argument("--budget-ratio", help="0.6 | 0.4,0.6,1.0 | uniform:0.4,1.0")
    budget.add_argument("--budget-j", help="joules, same forms as --budget-ratio")
    src.add_argument(
        "--budget-ratio-b",
        nargs="+",
        help="budget ratios for the --compare targets after A, one for all or one per target "
        "(e.g. 1.0 for an fp16 baseline; none: send none)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--slo", type=float, default=5.0, help="latency SLO in s for goodput")
    out.add_argument(
        "--slo-ttft",
        type=float,
        help="also a time-to-first-token SLO in s for goodput (default: none)",
    )
    out.add_argument(
        "--slo-tpot",
        type=float,
        help="also a time-per-output-token SLO in s for goodput (default: none)",
    )
    out.add_argument(
        "--nominal-watts",
        type=float,
        default=NOMINAL_WATTS,
        help="watts behind the client-side estimate of joules per request (busy time x W; "
        "default: the server's estimate meter's)",
    )
    out.add_argument(
        "--out",
        help="directory for report.json, report.md and PNG plots, and partial.jsonl (each load's "
        "summary and requests as it ends)",
    )
    out.add_argument("--json", help="write the JSON report here")
    out.add_argument("--markdown", help="write the markdown report here")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--no-progress", action="store_true")
    return p


def _per_target(values: list[str] | None, n: int, option: str) -> list[str | None]:
    """Values of an option for the n --compare targets after A: none, one for all, or one each."""
    if values is None:
        return [None] * n
    if n == 0:
        raise LoadtestError(f"{option} applies to the --compare targets after URL_A (URL_B, ...)")
    if len(values) not in (1, n):
        raise LoadtestError(f"{option}: give one value for all {n} targets after A, or {n}")
    return list(values) * n if len(values) == 1 else list(values)


def _targets(args: argparse.Namespace) -> list[Target]:
    urls = list(args.compare) if args.compare else [args.url]
    if args.compare and len(urls) < 2:
        raise LoadtestError("--compare: give at least two URLs")
    apis = [args.api] + [a or args.api for a in _per_target(args.api_b, len(urls) - 1, "--api-b")]
    labels = args.labels or urls
    if len(labels) != len(urls):
        raise LoadtestError(f"--labels: give {len(urls)} names, one per target")
    budgets: list[BudgetSpec | None] = [None]
    for text in _per_target(args.budget_ratio_b, len(urls) - 1, "--budget-ratio-b"):
        if text is None:
            budgets.append(None)
        else:
            budgets.append(BudgetSpec.parse(None if text.lower() == "none" else text, kind="ratio"))
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise LoadtestError(f"{url!r}: give a full URL such as http://127.0.0.1:8000")
    if args.max_new_tokens < 1:
        raise LoadtestError(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    return [
        Target(
            url=url,
            api=api,
            stream=not args.no_stream,
            max_new_tokens=args.max_new_tokens,
            model=args.model,
            path=args.endpoint,
            label=label,
            budget=budget,
        )
        for url, api, label, budget in zip(urls, apis, labels, budgets, strict=True)
    ]


def _configs(args: argparse.Namespace) -> list[RunConfig]:
    check_slos({"--slo": args.slo, "--slo-ttft": args.slo_ttft, "--slo-tpot": args.slo_tpot})
    if args.prompts:
        prompts = PromptSource.from_jsonl(
            args.prompts, text_field=args.prompt_field, limit=args.prompt_limit
        )
    else:
        prompts = PromptSource.generated(words=args.generated_words, seed=args.seed)
    prompts = prompts.truncated(args.max_chars)
    longs = None
    if args.long_prompts:
        longs = PromptSource.from_jsonl(args.long_prompts, text_field=args.long_field)
    if args.budget_j is not None:
        budget = BudgetSpec.parse(args.budget_j, kind="j")
    else:
        budget = BudgetSpec.parse(args.budget_ratio, kind="ratio")
    try:
        concurrencies = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    except ValueError as err:
        raise LoadtestError(f"--concurrency {args.concurrency!r}: give 4 or 1,4,8,16") from err
    if not concurrencies:
        raise LoadtestError("--concurrency: give at least one worker count")
    if len(concurrencies) > 1 and args.mode != "closed":
        raise LoadtestError("a list of --concurrency values is for --mode closed")
    if args.sweep:
        if args.mode == "closed":
            raise LoadtestError("--sweep is over arrival rates: use --mode poisson or constant")
        try:
            rates = [float(x) for x in args.sweep.split(",") if x.strip()]
        except ValueError as err:
            raise LoadtestError(f"--sweep {args.sweep!r}: give rates like 0.2,0.5,1") from err
    else:
        rates = [args.rate]
    loads = [(r, c) for r in rates for c in concurrencies]
    return [
        RunConfig(
            mode=args.mode,
            rate=rate,
            concurrency=concurrency,
            max_requests=args.max_requests,
            duration_s=args.duration,
            drain_s=args.drain,
            request_timeout_s=args.request_timeout,
            warmup=args.warmup,
            seed=args.seed,
            keepalive=not args.no_keepalive,
            budget=budget,
            prompts=prompts,
            long_prompts=longs,
            long_every_s=args.long_every,
        )
        for rate, concurrency in loads
    ]


async def _run_all(
    targets: list[Target], configs: list[RunConfig], args: argparse.Namespace
) -> tuple[list[RunResult], list[dict[str, Any]]]:
    """Every load on every target, in turn; (results, their summaries). With --out, each load's
    summary and requests go to partial.jsonl as it ends."""
    if args.wait_ready > 0:
        for target in targets:
            await wait_ready(target, args.wait_ready)
    results, summaries = [], []
    partial = Path(args.out) / "partial.jsonl" if args.out else None
    if partial:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("")
    for config in configs:
        for target in targets:  # one after the other: the two servers never share the load
            result = await run_load(target, config, progress=not args.no_progress)
            summary = summarize_run(
                result,
                slo_s=args.slo,
                label=target.label,
                watts=args.nominal_watts,
                ttft_slo_s=args.slo_ttft,
                tpot_slo_s=args.slo_tpot,
            )
            results.append(result)
            summaries.append(summary)
            if partial:  # each load as it ends: an interrupted sweep keeps what it measured
                reqs = [r.to_dict() for r in result.every_record]
                line = {"summary": summary, "requests": reqs}
                with partial.open("a") as f:
                    f.write(json.dumps(line, default=str) + "\n")
    return results, summaries


def main(argv: list[str] | None = None, *, setup: dict[str, Any] | None = None) -> int:
    """Run the load and report; `setup` (e.g. how `loadtest.peer` started the servers) is kept
    in report.json and shown in report.md."""
    args = build_parser().parse_args(argv)
    try:
        targets = _targets(args)
        configs = _configs(args)
        results, summaries = asyncio.run(_run_all(targets, configs, args))
    except LoadtestError as err:
        print(f"loadtest: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr)
        return 130
    comparisons = _comparisons(summaries, len(targets)) if len(targets) > 1 else []
    text = [render_text(table_rows(summaries))]
    for comp in comparisons:
        text.append(f"\ncompare at {comp['load']} (X/A):\n" + render_text(comp["rows"]))
    print("\n".join(text))
    report = {
        "tool": "loadtest",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "slo_s": args.slo,
        "ttft_slo_s": args.slo_ttft,
        "tpot_slo_s": args.slo_tpot,
        "nominal_watts": args.nominal_watts,
        "setup": setup,
        "runs": [
            {"summary": s, "requests": [rec.to_dict() for rec in r.every_record]}
            for s, r in zip(summaries, results, strict=True)
        ],
        "comparisons": comparisons,
    }
    _write_outputs(args, report, results, summaries)
    if not any(s["requests"]["ok"] for s in summaries):
        print("loadtest: no request succeeded; see errors_by_status above", file=sys.stderr)
        return 3
    return 0


def _comparisons(summaries: list[dict[str, Any]], n_targets: int) -> list[dict[str, Any]]:
    """One table per load: the targets' runs side by side (they ran in turn), ratios X/A."""
    comps = []
    for start in range(0, len(summaries), n_targets):
        group = summaries[start : start + n_targets]
        a = group[0]
        load = f"c={a['concurrency']}" if a["mode"] == "closed" else f"{a['rate_rps']:g} req/s"
        comps.append(
            {
                "load": load,
                "a": a["label"],
                "b": ", ".join(s["label"] for s in group[1:]),
                "rows": table_rows(group, ratios=True),
            }
        )
    return comps


def _write_outputs(
    args: argparse.Namespace,
    report: dict[str, Any],
    results: list[RunResult],
    summaries: list[dict[str, Any]],
) -> None:
    out = Path(args.out) if args.out else None
    json_path = Path(args.json) if args.json else (out / "report.json" if out else None)
    md_path = Path(args.markdown) if args.markdown else (out / "report.md" if out else None)
    plots: list[Path] = []
    if out and not args.no_plots:
        from loadtest.plots import write_plots

        plots = write_plots(results, summaries, out)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {json_path}", file=sys.stderr)
    if md_path:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(_markdown(report, summaries, plots, md_path.parent))
        print(f"wrote {md_path}", file=sys.stderr)
    for plot in plots:
        print(f"wrote {plot}", file=sys.stderr)


def _markdown(
    report: dict[str, Any], summaries: list[dict[str, Any]], plots: list[Path], base: Path
) -> str:
    lines = [
        "# Load test report",
        "",
        f"Created {report['created_at']}; command: `{_command(report)}`",
        "",
        "Goodput counts requests within "
        f"{describe_slos(report['slo_s'], report.get('ttft_slo_s'), report.get('tpot_slo_s'))}. `estimated` joules are the server's "
        "time x nominal watts (an estimate); `busy time x W` joules are the same estimate made by "
        f"the client for every server ({report['nominal_watts']:g} W x the time requests were in "
        "flight, split among them); `measured` joules come from a hardware meter and are n/a "
        "without one. TBT: time between successive streamed text deltas.",
        "",
    ]
    if report.get("setup"):
        lines += ["## Setup", "", "```json", json.dumps(report["setup"], indent=2), "```", ""]
    lines.append(render_markdown(table_rows(summaries)))
    for comp in report["comparisons"]:
        lines += ["", f"## {comp['b']} against {comp['a']} at {comp['load']}", ""]
        lines.append(render_markdown(comp["rows"]))
    for s in summaries:
        if s["per_budget"]:
            lines += ["", f"## Per budget: {s['label']} ({s['mode']}, {s['rate_rps']} req/s)", ""]
            keys = list(s["per_budget"][0])
            rows = [keys] + [[_cell(row[k]) for k in keys] for row in s["per_budget"]]
            lines.append(render_markdown(rows))
    for plot in plots:
        rel = plot.relative_to(base) if plot.is_relative_to(base) else plot
        lines += ["", f"![{plot.stem}]({rel})"]
    return "\n".join(lines) + "\n"


def _command(report: dict[str, Any]) -> str:
    """The command that made the report: the peer's where it started the servers."""
    own = f"python -m loadtest {' '.join(report['argv'])}"
    setup = report.get("setup") or {}
    return f"{setup['command']}` (it ran `{own}" if "command" in setup else own


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
