"""Turn request records into a run summary, and summaries into tables (terminal, markdown).

Energy labels follow the server: `modelled_j` is the energy model's figure for the work executed,
`measured_j` comes from a hardware meter (NVML, RAPL) and is null where there is none, and
`estimated_j` is time x nominal watts — an estimate, reported as one and never as measured.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from loadtest.client import RequestRecord
from loadtest.runner import RunResult

VIOLATION_TOLERANCE_J = 1e-9

# Dotted paths every run summary holds (the figures issue 5 asks for); tests check them all.
SUMMARY_FIELDS = (
    "ttft_s.p50", "ttft_s.p90", "ttft_s.p99", "ttft_source",
    "latency_s.p50", "latency_s.p90", "latency_s.p99",
    "requests_per_s", "completion_tokens_per_s",
    "goodput.slo_s", "goodput.requests_per_s", "goodput.ok_within_slo",
    "energy.modelled_j_per_request.mean", "energy.measured_j_per_request.mean",
    "energy.estimated_j_per_request.mean", "energy.meters", "energy.budget_j_per_request.mean",
    "budget_exhaustions", "budget_exhaustion_rate", "budget_violations",
    "errors_by_status", "requests.sent", "requests.ok", "requests.errors",
    "finish_reasons", "per_budget",
)  # fmt: skip


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


def summarize_run(result: RunResult, *, slo_s: float, label: str | None = None) -> dict[str, Any]:
    """Every reported figure for one run; see docs/loadtest.md for each field."""
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
        "requests_per_s": per_s(len(ok)),
        "completion_tokens_per_s": per_s(completion),
        "prompt_tokens_per_s": per_s(prompt),
        "completion_tokens": completion,
        "prompt_tokens": prompt,
        "goodput": _goodput(records, ok, slo_s, wall_s),
        "energy": _energy(ok, completion),
        "budget_exhaustions": exhaustions,
        "budget_exhaustion_rate": exhaustions / len(ok) if ok else None,
        "budget_violations": sum(is_violation(r) for r in ok),
        "brownout_requests": sum(bool(r.brownout) for r in ok),
        "finish_reasons": dict(Counter(str(r.finish_reason) for r in ok)),
        "paths": dict(paths),
        "per_budget": _per_budget(ok),
    }


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


def _goodput(records, ok, slo_s: float, wall_s: float) -> dict[str, Any]:
    """Requests answered within the SLO (end to end, seconds): count, per second, share of sent."""
    within = [r for r in ok if r.latency_s is not None and r.latency_s <= slo_s]
    return {
        "slo_s": slo_s,
        "ok_within_slo": len(within),
        "requests_per_s": len(within) / wall_s if wall_s else None,
        "fraction_of_sent": len(within) / len(records) if records else None,
    }


def _energy(ok: list[RequestRecord], completion: int) -> dict[str, Any]:
    """Joules per request (modelled, measured, estimate: labelled), budgets, J per token."""
    modelled = _present(ok, "modelled_j")
    return {
        "modelled_j_per_request": stats(modelled),
        "measured_j_per_request": stats(_present(ok, "measured_j")),
        "estimated_j_per_request": stats(_present(ok, "estimated_j")),
        "estimated_is_estimate": True,
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
    ("requests/s", ("requests_per_s",), ".3f"),
    ("completion tokens/s", ("completion_tokens_per_s",), ".2f"),
    ("goodput req/s (<= SLO)", ("goodput", "requests_per_s"), ".3f"),
    ("modelled J/request", ("energy", "modelled_j_per_request", "mean"), ".3f"),
    ("measured J/request", ("energy", "measured_j_per_request", "mean"), ".3f"),
    ("estimated J/request (estimate)", ("energy", "estimated_j_per_request", "mean"), ".3f"),
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
    """Header + one row per metric; a last column B/A when `ratios` (two summaries)."""
    header = ["metric", *[_run_title(s) for s in summaries]]
    if ratios:
        header.append("B/A")
    rows = [header]
    for title, path, fmt in ROWS:
        values = [lookup(s, path) for s in summaries]
        row = [title, *[_fmt(v, fmt) for v in values]]
        if ratios:
            row.append(_ratio(values[0], values[1]) if title in RATIO_ROWS else "")
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
