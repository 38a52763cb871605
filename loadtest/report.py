"""Turn request records into a run summary, and summaries into tables (terminal, markdown).

Energy labels follow the server: `modelled_j` is the energy model's figure for the work executed,
`measured_j` comes from a hardware meter (NVML, RAPL) and is null where there is none, and
`estimated_j` is time x nominal watts — an estimate, reported as one and never as measured.
For servers that report no energy at all (llama.cpp's `llama-server`), `client_estimated_j` is the
same estimate made here from the client's timings (`busy_time_joules`), for every server alike.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from loadtest.client import RequestRecord
from loadtest.runner import RunResult
from loadtest.spec import LoadtestError

VIOLATION_TOLERANCE_J = 1e-9
# The estimate meter's nominal power: hest_core.config.DEFAULT_NOMINAL_WATTS (not imported: the load
# generator installs without torch; tests/loadtest/test_lt_peer.py checks the two agree)
NOMINAL_WATTS = 30.0

# Dotted paths every run summary holds (the figures issue 5 asks for); tests check them all.
SUMMARY_FIELDS = (
    "ttft_s.p50", "ttft_s.p90", "ttft_s.p99", "ttft_source",
    "latency_s.p50", "latency_s.p90", "latency_s.p99",
    "requests_per_s", "completion_tokens_per_s",
    "goodput.slo_s", "goodput.requests_per_s", "goodput.ok_within_slo",
    "energy.modelled_j_per_request.mean", "energy.measured_j_per_request.mean",
    "energy.estimated_j_per_request.mean", "energy.meters", "energy.budget_j_per_request.mean",
    "energy.client_estimated_j_per_request.mean", "energy.client_estimate.watts",
    "budget_exhaustions", "budget_exhaustion_rate", "budget_violations",
    "errors_by_status", "requests.sent", "requests.ok", "requests.errors",
    "finish_reasons", "per_budget",
)  # fmt: skip
# Also in every summary, not null where requests streamed at least two text deltas (TBT) and
# generated at least two tokens (TPOT); issue 15. tests/loadtest/test_lt_peer.py checks them.
TOKEN_FIELDS = ("tbt_s.p50", "tbt_s.p99", "tpot_s.p50", "tpot_s.p99")


def stats(values: list[float]) -> dict[str, float | int | None]:
    """n, mean, p50, p90, p99 and max of `values` (None when there are none)."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    arr = np.asarray(values, dtype=float)
    p50, p90, p99 = (float(x) for x in np.percentile(arr, [50, 90, 99]))
    return {
        "n": len(values),
        "mean": float(arr.mean()),
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": float(arr.max()),
    }


def _present(records: list[RequestRecord], name: str) -> list[float]:
    return [v for r in records if (v := getattr(r, name)) is not None]


def _error_key(record: RequestRecord) -> str:
    return str(record.status) if record.status and record.status >= 400 else str(record.error)


def is_violation(record: RequestRecord) -> bool:
    """The server spent more modelled energy than the budget it reported (must never happen)."""
    return (
        record.modelled_j is not None
        and record.budget_j is not None
        and record.modelled_j > record.budget_j + VIOLATION_TOLERANCE_J
    )


def busy_time_joules(records: list[RequestRecord], watts: float) -> list[float | None]:
    """Per request, its share of `watts` x the run's busy time, from the client's timings: at each
    moment the watts are split equally among the requests in flight (sent, last byte not yet in).
    The shape of the server's estimate meter (busy wall time x nominal watts, shared among the
    requests in the batch) for a server that reports no energy; an estimate. Shares add up to
    watts x the time at least one request was in flight. None for a request with no latency."""
    spans = [
        (r.sent_s, r.sent_s + r.latency_s) if r.latency_s is not None else None for r in records
    ]
    bounds = sorted({t for span in spans if span for t in span})
    joules = [0.0 if span else None for span in spans]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        live = [i for i, span in enumerate(spans) if span and span[0] <= lo and span[1] >= hi]
        for i in live:
            joules[i] += (hi - lo) * watts / len(live)  # type: ignore[operator]
    return joules


def summarize_run(
    result: RunResult,
    *,
    slo_s: float,
    label: str | None = None,
    watts: float = NOMINAL_WATTS,
    ttft_slo_s: float | None = None,
    tpot_slo_s: float | None = None,
) -> dict[str, Any]:
    """Every reported figure for one run; see docs/loadtest.md for each field. `watts`: the
    nominal power behind the client-side estimate (`energy.client_estimated_j_per_request`).
    `slo_s`, `ttft_slo_s`, `tpot_slo_s`: the SLOs a request must all meet to count in goodput
    (`within_slo`; None: that one is not checked)."""
    records = result.records
    ok = [r for r in records if r.ok]
    wall_s = max([r.sent_s + r.latency_s for r in records if r.latency_s is not None] or [0.0])
    wall_s = wall_s or result.wall_s
    completion = sum(r.completion_tokens or r.stream_deltas for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    exhaustions = sum(r.finish_reason == "energy_budget" for r in ok)
    paths: Counter[str] = Counter()
    for r in ok:
        paths.update(r.paths)

    def per_s(n: float) -> float | None:
        return n / wall_s if wall_s else None

    return {
        **_run_header(result, label),
        "wall_s": wall_s,
        "requests": {"sent": len(records), "ok": len(ok), "errors": len(records) - len(ok)},
        "errors_by_status": dict(Counter(_error_key(r) for r in records if not r.ok)),
        "latency_s": stats(_present(ok, "latency_s")),
        "ttft_s": stats(_present(ok, "ttft_s")),
        "ttft_source": dict(Counter(r.ttft_source for r in ok if r.ttft_source)),
        "tbt_s": stats([gap for r in ok for gap in r.tbt_s]),
        "tpot_s": stats([t for r in ok if (t := _tpot(r)) is not None]),
        "requests_per_s": per_s(len(ok)),
        "completion_tokens_per_s": per_s(completion),
        "prompt_tokens_per_s": per_s(prompt),
        "completion_tokens": completion,
        "prompt_tokens": prompt,
        "goodput": goodput(
            [_slo_view(r) for r in ok], len(records), wall_s, slo_s, ttft_slo_s, tpot_slo_s
        ),
        "energy": _energy(records, ok, completion, watts),
        "budget_exhaustions": exhaustions,
        "budget_exhaustion_rate": exhaustions / len(ok) if ok else None,
        "budget_violations": sum(is_violation(r) for r in ok),
        "brownout_requests": sum(bool(r.brownout) for r in ok),
        "finish_reasons": dict(Counter(str(r.finish_reason) for r in ok)),
        "paths": dict(paths),
        "per_budget": _per_budget(ok),
        "long_requests": _long(result.long_records),
    }


def _long(records: list[RequestRecord]) -> dict[str, Any] | None:
    """The long prompts mixed in (`--long-prompts`), apart from the run's own figures; None
    where none were."""
    if not records:
        return None
    ok = [r for r in records if r.ok]
    return {
        "sent": len(records),
        "ok": len(ok),
        "errors_by_status": dict(Counter(_error_key(r) for r in records if not r.ok)),
        "prompt_tokens": stats([float(r.prompt_tokens) for r in ok if r.prompt_tokens]),
        "ttft_s": stats(_present(ok, "ttft_s")),
        "latency_s": stats(_present(ok, "latency_s")),
    }


def _tpot(record: RequestRecord) -> float | None:
    return tpot_of(record.latency_s, record.ttft_s, record.completion_tokens)


def tpot_of(latency_s: float | None, ttft_s: float | None, tokens: int | None) -> float | None:
    """Time per output token after the first, (latency - TTFT) / (completion tokens - 1) in s,
    vLLM's TPOT: every generated token counts, also those a server held back or cut at a clean
    ending. None without a TTFT or a latency, or with fewer than 2 tokens."""
    if ttft_s is None or latency_s is None or not tokens or tokens < 2:
        return None
    return (latency_s - ttft_s) / (tokens - 1)


def _run_header(result: RunResult, label: str | None) -> dict[str, Any]:
    """What ran against what: target, API, endpoint, the run's configuration, server info."""
    t = result.target
    return {
        "label": label or t.url,
        "target": t.url,
        "api": t.api,
        "endpoint": t.endpoint,
        "stream": t.stream,
        "max_new_tokens": t.max_new_tokens,
        "started_at": result.started_at,
        "server_info": result.server_info,
        **result.config.describe(),
    }


def _slo_view(r: RequestRecord) -> tuple[float | None, float | None, float | None]:
    return r.latency_s, r.ttft_s, _tpot(r)


def check_slos(slos: dict[str, float | None]) -> None:
    """Raises LoadtestError unless every SLO given ({option: seconds or None}) is a finite
    number of seconds > 0."""
    for option, value in slos.items():
        if value is not None and not (0 < value < float("inf")):
            raise LoadtestError(f"{option} {value}: give a number of seconds > 0")


def describe_slos(
    slo_s: float, ttft_slo_s: float | None = None, tpot_slo_s: float | None = None
) -> str:
    """The goodput SLOs in words, e.g. "5 s end to end, TTFT <= 1 s"."""
    out = [f"{slo_s:g} s end to end"]
    for name, value in (("TTFT", ttft_slo_s), ("TPOT", tpot_slo_s)):
        if value is not None:
            out.append(f"{name} <= {value:g} s")
    return ", ".join(out)


def within_slo(
    latency_s: float | None,
    ttft_s: float | None,
    tpot_s: float | None,
    slo_s: float,
    ttft_slo_s: float | None = None,
    tpot_slo_s: float | None = None,
) -> bool:
    """Whether an answered request meets every SLO given (seconds): end to end <= slo_s, and
    where set TTFT <= ttft_slo_s and TPOT <= tpot_slo_s. A request with no TTFT misses a TTFT
    SLO; one with no TPOT (fewer than 2 tokens) has nothing to miss there. Goodput with TTFT and
    TPOT SLOs is DistServe's (Zhong et al., OSDI 2024: requests/s served within both)."""
    if latency_s is None or latency_s > slo_s:
        return False
    if ttft_slo_s is not None and (ttft_s is None or ttft_s > ttft_slo_s):
        return False
    return tpot_slo_s is None or tpot_s is None or tpot_s <= tpot_slo_s


def goodput(
    answered: list[tuple[float | None, float | None, float | None]],
    sent: int,
    wall_s: float,
    slo_s: float,
    ttft_slo_s: float | None = None,
    tpot_slo_s: float | None = None,
) -> dict[str, Any]:
    """Requests answered within the SLOs (`within_slo`): count, per second of `wall_s`, share of
    `sent`. answered: (latency_s, ttft_s, tpot_s) of each answered request."""
    n = sum(within_slo(*a, slo_s, ttft_slo_s, tpot_slo_s) for a in answered)
    return {
        "slo_s": slo_s,
        "ttft_slo_s": ttft_slo_s,
        "tpot_slo_s": tpot_slo_s,
        "ok_within_slo": n,
        "requests_per_s": n / wall_s if wall_s else None,
        "fraction_of_sent": n / sent if sent else None,
    }


def _energy(
    records: list[RequestRecord], ok: list[RequestRecord], completion: int, watts: float
) -> dict[str, Any]:
    """Joules per request (modelled, measured, estimate: labelled), budgets, J per token."""
    modelled = _present(ok, "modelled_j")
    shares = dict(zip(map(id, records), busy_time_joules(records, watts), strict=True))
    client = [j for r in ok if (j := shares[id(r)]) is not None]
    return {
        "modelled_j_per_request": stats(modelled),
        "measured_j_per_request": stats(_present(ok, "measured_j")),
        "estimated_j_per_request": stats(_present(ok, "estimated_j")),
        "estimated_is_estimate": True,
        "client_estimated_j_per_request": stats(client),
        "client_estimate": {
            "watts": watts,
            "busy_s": sum(j for j in shares.values() if j is not None) / watts,
            "basis": "estimate: busy wall time x nominal watts, split among the requests in flight "
            "(client timings)",
        },
        "meters": dict(Counter(r.meter for r in ok if r.meter is not None)),
        "budget_j_per_request": stats(_present(ok, "budget_j")),
        "budget_ratio": stats(_present(ok, "budget_ratio")),
        "fp16_cost_j_per_request": stats(_present(ok, "fp16_cost_j")),
        "modelled_j_per_completion_token": (
            sum(modelled) / completion if completion and modelled else None
        ),
    }


def _per_budget(ok: list[RequestRecord]) -> list[dict[str, Any]]:
    rows = []
    for group in sorted({r.budget_group for r in ok}):
        members = [r for r in ok if r.budget_group == group]
        rows.append(
            {
                "group": group,
                "n": len(members),
                "budget_j_mean": stats(_present(members, "budget_j"))["mean"],
                "modelled_j_mean": stats(_present(members, "modelled_j"))["mean"],
                "latency_p50_s": stats(_present(members, "latency_s"))["p50"],
                "exhaustions": sum(r.finish_reason == "energy_budget" for r in members),
                "violations": sum(is_violation(r) for r in members),
            }
        )
    return rows


# (row title, path into the summary, format)
ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("requests sent / ok", ("requests",), "sent_ok"),
    ("errors by status", ("errors_by_status",), "dict"),
    ("latency p50 s", ("latency_s", "p50"), ".3f"),
    ("latency p90 s", ("latency_s", "p90"), ".3f"),
    ("latency p99 s", ("latency_s", "p99"), ".3f"),
    ("TTFT p50 s", ("ttft_s", "p50"), ".3f"),
    ("TTFT p90 s", ("ttft_s", "p90"), ".3f"),
    ("TTFT p99 s", ("ttft_s", "p99"), ".3f"),
    ("TBT p50 s", ("tbt_s", "p50"), ".4f"),
    ("TBT p99 s", ("tbt_s", "p99"), ".4f"),
    ("TPOT p50 s", ("tpot_s", "p50"), ".4f"),
    ("TPOT p99 s", ("tpot_s", "p99"), ".4f"),
    ("requests/s", ("requests_per_s",), ".3f"),
    ("completion tokens/s", ("completion_tokens_per_s",), ".2f"),
    ("goodput req/s (<= SLO)", ("goodput", "requests_per_s"), ".3f"),
    ("modelled J/request", ("energy", "modelled_j_per_request", "mean"), ".3f"),
    ("measured J/request", ("energy", "measured_j_per_request", "mean"), ".3f"),
    ("estimated J/request (estimate)", ("energy", "estimated_j_per_request", "mean"), ".3f"),
    (
        "busy time x W J/request (client estimate)",
        ("energy", "client_estimated_j_per_request", "mean"),
        ".3f",
    ),
    ("budget J/request", ("energy", "budget_j_per_request", "mean"), ".3f"),
    ("budget ratio (applied)", ("energy", "budget_ratio", "mean"), ".3f"),
    ("fp16 cost J/request", ("energy", "fp16_cost_j_per_request", "mean"), ".3f"),
    ("meter", ("energy", "meters"), "dict"),
    ("budget exhaustions", ("budget_exhaustions",), "d"),
    ("budget violations", ("budget_violations",), "d"),
    ("brownout-tightened requests", ("brownout_requests",), "d"),
    ("completion tokens", ("completion_tokens",), "d"),
]
# rows whose ratio B/A is meaningful in a comparison
RATIO_ROWS = {title for title, _, fmt in ROWS if fmt not in ("dict", "sent_ok", "d")}


def lookup(summary: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _fmt(value: Any, fmt: str) -> str:
    if fmt == "sent_ok":
        return f"{value['sent']} / {value['ok']}"
    if fmt == "dict":
        return ", ".join(f"{k}:{v}" for k, v in value.items()) if value else "-"
    if value is None:
        return "n/a"
    return format(value, fmt)


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or a == 0:
        return "n/a"
    return f"{b / a:.3f}x"


def table_rows(summaries: list[dict[str, Any]], *, ratios: bool = False) -> list[list[str]]:
    """Header + one row per metric; with `ratios`, a column X/A for each summary after the first
    (A): B/A for two, B/A and C/A for three."""
    header = ["metric", *[_run_title(s) for s in summaries]]
    others = "BCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(summaries) - 1] if ratios else ""
    header += [f"{x}/A" for x in others]
    rows = [header]
    for title, path, fmt in ROWS:
        values = [lookup(s, path) for s in summaries]
        row = [title, *[_fmt(v, fmt) for v in values]]
        for value in values[1 : len(others) + 1]:
            row.append(_ratio(values[0], value) if title in RATIO_ROWS else "")
        rows.append(row)
    return rows


def _run_title(summary: dict[str, Any]) -> str:
    load = (
        f"c={summary['concurrency']}"
        if summary["mode"] == "closed"
        else f"{summary['mode']} {summary['rate_rps']:g}/s"
    )
    return f"{summary['label']} ({load})"


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"

    return "\n".join([line(rows[0]), line(["---"] * len(rows[0])), *map(line, rows[1:])])
