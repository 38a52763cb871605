"""PNG plots: latency CDF, p99 latency against arrival rate, joules per request against budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def p99_vs_rate(summaries: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(s["label"] for s in summaries):
        runs = sorted(
            (s for s in summaries if s["label"] == label and s["rate_rps"] is not None),
            key=lambda s: s["rate_rps"],
        )
        xs = [s["rate_rps"] for s in runs if s["latency_s"]["p99"] is not None]
        ys = [s["latency_s"]["p99"] for s in runs if s["latency_s"]["p99"] is not None]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("p99 latency (s)")
    ax.set_title("p99 latency against arrival rate")
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
