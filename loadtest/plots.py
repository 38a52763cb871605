"""PNG plots: latency CDF; p99 latency and goodput against offered load (arrival rate for open
loops, workers for closed ones), every target on one figure; joules per request against budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.report import lookup
from loadtest.runner import RunResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(
    results: list[RunResult], summaries: list[dict[str, Any]], out_dir: Path
) -> list[Path]:
    """Write the plots that the runs have data for; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [latency_cdf(results, summaries, out_dir / "latency_cdf.png")]
    rates = {s["rate_rps"] for s in summaries if s["rate_rps"] is not None}
    if len(rates) > 1:
        written.append(p99_vs_rate(summaries, out_dir / "p99_vs_rate.png"))
        written.append(vs_load(summaries, "rate_rps", GOODPUT, out_dir / "goodput_vs_rate.png"))
    workers = {s["concurrency"] for s in summaries if s["concurrency"] is not None}
    if len(workers) > 1:
        for metric, name in ((P99, "p99"), (GOODPUT, "goodput")):
            path = out_dir / f"{name}_vs_concurrency.png"
            written.append(vs_load(summaries, "concurrency", metric, path))
    if any(r.modelled_j is not None for res in results for r in res.records):
        written.append(joules_vs_budget(results, summaries, out_dir / "joules_vs_budget.png"))
    return written


def _name(summary: dict[str, Any]) -> str:
    if summary["mode"] == "closed":
        return f"{summary['label']} c={summary['concurrency']}"
    return f"{summary['label']} {summary['rate_rps']:g}/s"


def latency_cdf(results: list[RunResult], summaries: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result, summary in zip(results, summaries, strict=True):
        values = sorted(r.latency_s for r in result.records if r.ok and r.latency_s is not None)
        if values:
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, ys, where="post", label=_name(summary))
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("fraction of answered requests")
    ax.set_title("Latency CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# (y-axis title, path into a run summary)
P99 = ("p99 latency (s)", ("latency_s", "p99"))
GOODPUT = ("goodput (answered within the SLO, requests/s)", ("goodput", "requests_per_s"))
LOADS = {"rate_rps": "offered load (requests/s)", "concurrency": "closed-loop workers"}


def p99_vs_rate(summaries: list[dict[str, Any]], path: Path) -> Path:
    return vs_load(summaries, "rate_rps", P99, path)


def vs_load(
    summaries: list[dict[str, Any]], load: str, metric: tuple[str, tuple[str, ...]], path: Path
) -> Path:
    """One line per target: `metric` against `load` ("rate_rps" or "concurrency")."""
    plt = _pyplot()
    ylabel, keys = metric
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(s["label"] for s in summaries):
        runs = sorted(
            (s for s in summaries if s["label"] == label and s[load] is not None),
            key=lambda s: s[load],
        )
        points = [(s[load], lookup(s, keys)) for s in runs if lookup(s, keys) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    if "goodput" in keys and load == "rate_rps":
        top = max(s[load] for s in summaries if s[load] is not None)
        ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="offered")
    if load == "concurrency":  # the worker counts run, not a fractional scale
        ax.set_xticks(sorted({s[load] for s in summaries if s[load] is not None}))
    ax.set_xlabel(LOADS[load])
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel.split(' (')[0]} against {LOADS[load].split(' (')[0]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def joules_vs_budget(results: list[RunResult], summaries: list[dict[str, Any]], path: Path) -> Path:
    """Per request: modelled joules against the budget in joules (the line y = x is the cap)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 0.0
    by_label: dict[str, list[tuple[float, float]]] = {}
    for result, summary in zip(results, summaries, strict=True):
        by_label.setdefault(summary["label"], []).extend(
            (r.budget_j, r.modelled_j)
            for r in result.records
            if r.ok and r.budget_j is not None and r.modelled_j is not None
        )
    for label, pts in by_label.items():  # all rates of one target in one colour
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, s=14, alpha=0.6, label=label)
            top = max(top, *xs, *ys)
    if top:
        ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="budget")
    ax.set_xlabel("budget per request (J, modelled units)")
    ax.set_ylabel("modelled energy per request (J)")
    ax.set_title("Joules per request against budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
