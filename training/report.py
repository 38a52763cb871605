"""The evaluation's aggregation: one summary row per (method, budget) from its samples, the
markdown table, the longest prompts (where overshoot is reported) and the output files
(X.json, X.md and the figures). `training/evaluate.py` runs the samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hest_core import paths as reg
from hest_core.runtime.endings import ends_sentence

from .methods import METHODS
from .metrics import KEYS, mean, percentile
from .plots import plot_heatmaps, plot_mix_shift, plot_pareto


def summarise(name: str, policy: str, recs: list[dict], longest: set[str]) -> dict:
    """One table row from a row's samples `recs` (run_one's dicts): ROUGE means (a refusal
    counts 0), joules, latency, endings, budget use, path shares overall and per layer (L, P);
    `longest` holds the pair ids whose overshoot is reported."""
    out = {"row": name, "policy": policy, "n": len(recs)}
    for k in KEYS:
        out[k] = mean([r["rouge"][k] for r in recs])
    ev = METHODS[policy].evaluation
    if ev.engine == "extractive" or not recs:
        return out
    out["refused"] = sum(bool(r.get("refused")) for r in recs)
    recs = [r for r in recs if not r.get("refused")]  # ROUGE above counts a refusal as 0
    if not recs:
        return out
    lat = [r["total_s"] for r in recs]
    measured = [r["measured_j"] for r in recs if r["measured_j"] is not None]
    over = [r["modelled_j"] / r["budget_j"] for r in recs if r["id"] in longest and ev.budgeted]
    paths = {p: sum(r["paths"][p] for r in recs) for p in reg.names()}
    tot = sum(paths.values()) or 1
    n_layers = len(recs[0]["paths_per_layer"])
    grid = []
    for li in range(n_layers):
        c = [sum(r["paths_per_layer"][li][p] for r in recs) for p in reg.names()]
        grid.append([x / (sum(c) or 1) for x in c])
    out.update(
        modelled_j=mean([r["modelled_j"] for r in recs]),
        fp16_cost_j=mean([r["fp16_cost_j"] for r in recs]),
        measured_j=mean(measured) if measured else None,
        meter=recs[0]["meter"],
        wall_s=mean([r["wall_s"] for r in recs]),
        p50_s=percentile(lat, 50),
        p99_s=percentile(lat, 99),
        completion_tokens=mean([r["completion_tokens"] for r in recs]),
        # older sample files (before clean endings) lack these: computed from the text then
        # over outputs with text; an empty one (no sentence fitted the budget) is counted apart
        sentence_end_share=mean(
            [float(r.get("ends_sentence", ends_sentence(r["text"]))) for r in recs if r["text"]]
        ),
        empty=sum(not r["text"] for r in recs),
        budget_violations=sum(r["modelled_j"] > r["budget_j"] * (1 + 1e-9) for r in recs),
        energy_budget_stops=sum(r["finish_reason"] == "energy_budget" for r in recs),
        budget_ended_share=mean([float(r["finish_reason"] == "energy_budget") for r in recs]),
        spent_over_budget=mean([r["modelled_j"] / r["budget_j"] for r in recs]),
        overshoot_longest_max=max(over) if over else None,
        overshoot_longest_mean=mean(over) if over else None,
        controller_params=recs[0]["controller_params"],
        # the share of the article read (the read plan; older sample files lack it: None)
        read_share=mean(read) if (read := _read_shares(recs)) else None,
        path_shares={p: v / tot for p, v in paths.items()},
        path_shares_per_layer=grid,
    )
    return out


def _read_shares(recs: list[dict]) -> list[float]:
    """Per sample with an article: the share of its tokens the prompt held."""
    return [r["article_tokens_read"] / r["article_tokens"] for r in recs if r.get("article_tokens")]


def markdown(rows: list[dict], n: int) -> str:
    """The summary rows as one markdown table (n: pairs per row)."""

    def f(v, d=1):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"

    head = (
        "| row | n | R-1 | R-2 | R-L | R-Lsum | modelled J/sample | measured J | wall s/sample | "
        "p50 s | p99 s | violations | budget stops | overshoot longest 10% (max) | "
        f"paths {'/'.join(reg.names())} | ctrl params | tokens | sentence ends | budget-ended | J/budget | "
        "refused | empty | read |"
    )
    lines = [head, "|" + " --- |" * 23]
    for r in rows:
        sh = r.get("path_shares")
        shares = "/".join(f"{sh[p]:.2f}" for p in reg.names()) if sh else "-"
        meas = (
            "no meter"
            if "modelled_j" in r and r.get("measured_j") is None
            else f(r.get("measured_j"), 2)
        )
        lines.append(
            f"| {r['row']} | {r['n']} | {f(r['rouge1'])} | {f(r['rouge2'])} | {f(r['rougeL'])} | "
            f"{f(r['rougeLsum'])} | {f(r.get('modelled_j'), 2)} | {meas if 'modelled_j' in r else '-'} | "
            f"{f(r.get('wall_s'), 2)} | {f(r.get('p50_s'), 2)} | {f(r.get('p99_s'), 2)} | "
            f"{r.get('budget_violations', '-')} | {r.get('energy_budget_stops', '-')} | "
            f"{f(r.get('overshoot_longest_max'), 3)} | {shares} | {r.get('controller_params', '-')} | "
            f"{f(r.get('completion_tokens'))} | {f(r.get('sentence_end_share'), 2)} | "
            f"{f(r.get('budget_ended_share'), 2)} | {f(r.get('spent_over_budget'), 2)} | "
            f"{r.get('refused', '-')} | {r.get('empty', '-')} | {f(r.get('read_share'), 2)} |"
        )
    return "\n".join(lines) + "\n"


def longest_prompts(rows, ids: list[str], done: dict) -> set[str]:
    """The longest 10% of prompts (by prompt tokens), where overshoot is reported."""
    plen = {
        i: max(
            (
                done[(n, i)].get("prompt_tokens", 0)
                for n, pol, _ in rows
                if METHODS[pol].evaluation.engine != "extractive"
            ),
            default=0,
        )
        for i in ids
    }
    k = max(1, math.ceil(len(ids) / 10))
    return set(sorted(ids, key=lambda i: -plen.get(i, 0))[:k])


def _budget_of(row: str) -> tuple[str, float] | None:
    """("hest@0.2") -> ("hest", 0.2); None for a row without a numeric budget (lead-3)."""
    name, _, r = row.partition("@")
    try:
        return (name, float(r)) if r else None
    except ValueError:
        return None


def _shifts(rows: list[dict]):
    """For each method run at two or more budgets (rows with per-layer shares), each budget
    below its largest: (method, budget, largest, row, its row at the largest, the signed
    (L, P) per-layer share difference)."""
    groups: dict[str, dict[float, dict]] = {}
    for r in rows:
        nb = _budget_of(r["row"])
        if nb is not None and r.get("path_shares_per_layer") and r.get("path_shares"):
            groups.setdefault(nb[0], {})[nb[1]] = r
    for name, by_r in groups.items():
        if len(by_r) < 2:
            continue
        top = max(by_r)
        ref = by_r[top]
        for b, r in sorted(by_r.items()):
            if b != top:
                diff = [
                    [x - y for x, y in zip(a, c, strict=True)]
                    for a, c in zip(
                        r["path_shares_per_layer"], ref["path_shares_per_layer"], strict=True
                    )
                ]
                yield name, b, top, r, ref, diff


def mix_shift(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """How each method's path mix at every budget differs from its mix at its largest budget
    (issue 14: the mix where the budget binds against r = 1), from the rows'
    `path_shares_per_layer` (L, P). {method: {budget: {"vs": largest budget, "max_layer_diff":
    the largest |share difference| of one path in one layer, "mean_tv": the total-variation
    distance between the two mixes (half the L1 distance, 0..1) averaged over layers,
    "share_diff": {path: overall share at this budget minus at the largest}}}}. Methods run at
    one budget, or whose rows carry no per-layer shares, are left out."""
    out: dict[str, dict[str, dict]] = {}
    for name, b, top, r, ref, diff in _shifts(rows):
        out.setdefault(name, {})[f"{b:g}"] = {
            "vs": f"{top:g}",
            "max_layer_diff": max(abs(v) for d in diff for v in d),
            "mean_tv": sum(sum(abs(v) for v in d) / 2 for d in diff) / len(diff),
            "share_diff": {
                p: r["path_shares"][p] - ref["path_shares"].get(p, 0.0) for p in r["path_shares"]
            },
        }
    return out


def write_outputs(js: Path, out: dict, md: str) -> None:
    """X.json (with `mix_shift`), X.md, X_paths.png, X_pareto.png and, where a method ran at
    several budgets, X_mix_shift.png (its per-layer shares at each budget minus at its
    largest)."""
    summary = out["rows"]
    out["mix_shift"] = mix_shift(summary)
    js.write_text(json.dumps(out, indent=1, default=str))
    js.with_suffix(".md").write_text(md)
    plot_heatmaps(
        {s["row"]: s["path_shares_per_layer"] for s in summary if "path_shares_per_layer" in s},
        js.with_name(js.stem + "_paths.png"),
    )
    moved = {  # methods whose mix moves at all (a fixed path's never does)
        name
        for name, per in out["mix_shift"].items()
        if any(d["max_layer_diff"] > 0 for d in per.values())
    }
    plot_mix_shift(
        {
            f"{r['row']} - @{ref['row'].partition('@')[2]}": diff
            for name, _, _, r, ref, diff in _shifts(summary)
            if name in moved
        },
        js.with_name(js.stem + "_mix_shift.png"),
    )
    plot_pareto(
        [
            {"name": s["row"], "joules": s["modelled_j"], "rouge_l": s["rougeL"]}
            for s in summary
            if "modelled_j" in s
        ],
        js.with_name(js.stem + "_pareto.png"),
    )
