"""PNG figures: training curves, path-share heat-maps (and their shift between budgets), the
ROUGE-L vs joules Pareto plot."""

from __future__ import annotations

import json
from pathlib import Path

from hest_core import paths as reg


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(v: list[float], w: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x
        if i >= w:
            acc -= v[i - w]
        out.append(acc / min(i + 1, w))
    return out


def plot_curves(log: str | Path, png: str | Path) -> None:
    rows = [json.loads(ln) for ln in Path(log).read_text().splitlines() if ln]
    if not rows:
        return
    plt = _plt()
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].plot(steps, _smooth([r["ce"] for r in rows]), label="CE (10-step mean)")
    ax[0, 0].plot(steps, _smooth([r["loss"] for r in rows]), label="loss", alpha=0.7)
    ax[0, 0].set_title("loss")
    ax[0, 0].legend()
    by_r: dict[float, list[tuple[int, float]]] = {}
    for r in rows:
        by_r.setdefault(r["r"], []).append((r["step"], r["e_ratio"]))
    for b, pts in sorted(by_r.items()):
        ax[0, 1].plot([p[0] for p in pts], [p[1] for p in pts], ".", ms=3, label=f"r={b:g}")
        ax[0, 1].axhline(1.0, color="k", lw=0.5)
    ax[0, 1].set_title("E_bar / E_max per budget bucket")
    ax[0, 1].legend()
    for key in rows[-1]["lambdas"]:
        ax[1, 0].plot(steps, [r["lambdas"].get(key, 0.0) for r in rows], label=f"lambda r={key}")
    ax[1, 0].set_title("dual variables")
    if rows[-1]["lambdas"]:
        ax[1, 0].legend()
    else:  # lora-r8, tabs: no energy constraint, nothing to plot
        ax[1, 0].text(0.5, 0.5, "none: this method has no dual variables", ha="center")
    for p in reg.names():
        ax[1, 1].plot(steps, _smooth([r[f"share_{p}"] for r in rows]), label=p)
    ax[1, 1].set_title("path shares (hard gates, 10-step mean)")
    ax[1, 1].legend()
    for a in ax.flat:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_heatmaps(shares: dict[str, list[list[float]]], png: str | Path) -> None:
    """shares: policy -> (L, P) fraction of units per path per layer."""
    if not shares:
        return
    plt = _plt()
    n = len(shares)
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n + 1, 6), squeeze=False)
    for ax, (name, grid) in zip(axes[0], shares.items(), strict=True):
        im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(list(range(reg.n_paths())), list(reg.names()))
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="share of units")
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_mix_shift(diffs: dict[str, list[list[float]]], png: str | Path) -> None:
    """diffs: title -> (L, P) share at one budget minus the share at the method's largest
    budget, per layer and path (report.mix_shift); a diverging scale centred on 0, symmetric
    around the largest |difference| (at least 0.05, so noise-sized shifts stay pale)."""
    if not diffs:
        return
    plt = _plt()
    top = max([0.05] + [abs(v) for g in diffs.values() for row in g for v in row])
    n = len(diffs)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n + 1.2, 6), squeeze=False)
    for ax, (name, grid) in zip(axes[0], diffs.items(), strict=True):
        im = ax.imshow(grid, aspect="auto", vmin=-top, vmax=top, cmap="RdBu_r")
        ax.set_xticks(list(range(reg.n_paths())), list(reg.names()), fontsize=7)
        if ax is axes[0][0]:
            ax.set_ylabel("layer")
        ax.set_title(name, fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="share of units minus at the largest budget")
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_pareto(points: list[dict], png: str | Path) -> dict[str, int]:
    """points: {name, joules, rouge_l}; a name "METHOD@r" is one budget of METHOD's sweep, and
    each method with two or more budgets is one curve (joined in order of joules); single points
    (a row without a budget) are squares. Every point is labelled with its name. Returns
    method -> points drawn (empty, and no file, without points)."""
    if not points:
        return {}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    sweeps: dict[str, list[dict]] = {}
    for p in points:
        sweeps.setdefault(p["name"].split("@")[0], []).append(p)
    for method, pts in sweeps.items():
        pts = sorted(pts, key=lambda p: p["joules"])
        if len(pts) > 1:
            ax.plot([p["joules"] for p in pts], [p["rouge_l"] for p in pts], "-o", label=method)
        else:
            ax.plot(pts[0]["joules"], pts[0]["rouge_l"], "s", label=method)
    names: dict[tuple[float, float], list[str]] = {}  # points that coincide share one label
    for p in points:
        names.setdefault((round(p["joules"], 1), round(p["rouge_l"], 2)), []).append(p["name"])
    for (j, r), ns in names.items():
        ax.annotate(" = ".join(ns), (j, r), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.legend(fontsize=8)
    ax.set_xlabel("modelled J / sample (estimate meter)")
    ax.set_ylabel("ROUGE-L")
    ax.set_title("ROUGE-L vs modelled energy")
    ax.grid(alpha=0.3)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {m: len(p) for m, p in sweeps.items()}
