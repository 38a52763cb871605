"""Write deploy/grafana/dashboards/hest.json, the "HEST serving" Grafana dashboard.

The JSON is generated so that every query lives in one readable table below; edit PANELS and
run `python deploy/grafana/build_dashboard.py`. Tests check the committed JSON matches this
script and run every query through a real Prometheus. Metric names: docs/contracts.md section 3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "hest-prometheus"}
OUT = Path(__file__).parent / "dashboards" / "hest.json"


def _q(quantile: float, metric: str, window: str = "1m") -> str:
    return f"histogram_quantile({quantile}, sum by (le) (rate({metric}_bucket[{window}])))"


def _share(path: str) -> str:
    # share of each layer's gated units that ran on `path` (0..1), one series per layer
    return (
        f'sum by (layer) (rate(hest_layer_units_total{{path=~"{path}"}}[1m]))'
        " / sum by (layer) (rate(hest_layer_units_total[1m]))"
    )


# the paths are the runtime's registry (hest_core/paths.py), read from the metrics' labels: one
# path-share panel is repeated per path the server reports, none is spelt out here
PATH_VARIABLE = {
    "name": "path",
    "label": "path",
    "type": "query",
    "datasource": DATASOURCE,
    "definition": "label_values(hest_units_total, path)",
    "query": {"query": "label_values(hest_units_total, path)", "refId": "PathVariable"},
    "refresh": 1,
    "includeAll": True,
    "multi": True,
    "sort": 0,
    "hide": 0,
    "options": [],
    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
}
REPEATED = {"Path mix per layer: $path share": "path"}  # panel title -> variable it repeats over


# (title, panel type, unit, width, height, [(expr, legend)], description)
PANELS: list[tuple[str, str, str, int, int, list[tuple[str, str]], str]] = [
    ("Joules per request", "timeseries", "joule", 8, 8, [
        ("sum by (source) (rate(hest_request_energy_joules_sum[1m]))"
         " / sum by (source) (rate(hest_request_energy_joules_count[1m]))", "{{source}}"),
    ], "Mean energy per answered request. modelled: energy model; measured: hardware meter; "
       "estimated: time x nominal watts (an estimate)."),
    ("Power (W)", "timeseries", "watt", 8, 8, [
        ("sum by (source, meter) (rate(hest_energy_joules_total[1m]))", "{{source}} ({{meter}})"),
    ], "rate(hest_energy_joules_total[1m]): joules per second = watts, per source and meter."),
    ("Budget per request", "timeseries", "joule", 8, 8, [
        ("sum(rate(hest_request_budget_joules_sum[1m]))"
         " / sum(rate(hest_request_budget_joules_count[1m]))", "mean budget (J)"),
        (_q(0.5, "hest_request_budget_ratio", "5m"), "p50 budget ratio (x fp16 cost)"),
    ], "Requested budgets: joules and ratio of the all-fp16 cost."),
    ("Latency p50 / p99", "timeseries", "s", 8, 8, [
        (_q(0.5, "hest_request_duration_seconds"), "p50"),
        (_q(0.99, "hest_request_duration_seconds"), "p99"),
    ], "End-to-end latency of answered requests."),
    ("Time to first token p50 / p99", "timeseries", "s", 8, 8, [
        (_q(0.5, "hest_time_to_first_token_seconds"), "p50"),
        (_q(0.99, "hest_time_to_first_token_seconds"), "p99"),
    ], "TTFT as the server measures it."),
    ("Queue wait p50 / p99", "timeseries", "s", 8, 8, [
        (_q(0.5, "hest_queue_wait_seconds"), "p50"),
        (_q(0.99, "hest_queue_wait_seconds"), "p99"),
    ], "Time in the queue before the request's batch started."),
    ("Path mix per layer: $path share", "heatmap", "percentunit", 24, 9,
     [(_share("$path"), "{{layer}}")],
     "Share of each layer's gated units that ran on this path (one panel per path the server "
     "reports: fp16 is 16-bit float, bf16 on CPU; see hest_core/paths.py)."),
    ("Units per path", "timeseries", "ops", 8, 8, [
        ("sum by (path) (rate(hest_units_total[1m]))", "{{path}}"),
    ], "Gated units executed per second, by path."),
    ("Budget exhaustions", "timeseries", "reqps", 8, 8, [
        ("sum(rate(hest_budget_exhaustions_total[1m]))", "exhausted (finish_reason=energy_budget)"),
        ("sum(rate(hest_request_duration_seconds_count[1m]))", "answered"),
    ], "Requests that stopped because not even the cheapest next token fitted the budget."),
    ("Requests by outcome", "timeseries", "reqps", 8, 8, [
        ("sum by (outcome) (rate(hest_requests_total[1m]))", "{{outcome}}"),
    ], "ok, energy_budget, invalid, rejected, cancelled, error."),
    ("Queue depth and in-flight", "timeseries", "short", 8, 8, [
        ("sum(hest_queue_depth)", "queue depth"),
        ("sum(hest_inflight_requests)", "in flight"),
        (_q(0.5, "hest_batch_size", "5m"), "p50 batch size"),
    ], "Requests waiting, being generated, and requests per engine batch."),
    ("Brownout level", "timeseries", "percentunit", 8, 8, [
        ("max(hest_brownout_level)", "level"),
        ("sum(rate(hest_brownout_requests_total[1m]))", "tightened requests/s"),
    ], "0 = off .. 1 = budgets at the configured floor."),
    ("Observed / modelled energy", "timeseries", "percentunit", 8, 8, [
        ("(sum(rate(hest_energy_joules_total{source=\"measured\"}[15m]))"
         " or sum(rate(hest_energy_joules_total{source=\"estimated\"}[15m])))"
         " / sum(rate(hest_energy_joules_total{source=\"modelled\"}[15m]))", "observed / modelled"),
    ], "Measured joules (or, with no meter, the estimate) over modelled joules; the drift alert "
       "fires when this leaves 0.75..1.25."),
    ("Budget violations (must be 0)", "stat", "short", 8, 8, [
        ("sum(hest_budget_violations_total)", "violations"),
    ], "Requests whose modelled energy exceeded their budget since the server started."),
    ("Tokens per second", "timeseries", "short", 8, 8, [
        ("sum(rate(hest_completion_tokens_total[1m]))", "completion"),
        ("sum(rate(hest_prompt_tokens_total[1m]))", "prompt"),
    ], "Token throughput."),
    ("Served model", "table", "short", 8, 8, [
        ("max by (model, adapter, device, meter, policy) (hest_info)", "{{model}} {{policy}}"),
    ], "What each server serves (hest_info)."),
]  # fmt: skip


def _panel(index: int, spec: tuple, x: int, y: int) -> dict[str, Any]:
    title, kind, unit, width, height, queries, description = spec
    panel: dict[str, Any] = {
        "id": index + 1,
        "title": title,
        "description": description,
        "type": kind,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": width, "h": height},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {
                "refId": chr(ord("A") + n),
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                **({"instant": True, "format": "table"} if kind == "table" else {}),
            }
            for n, (expr, legend) in enumerate(queries)
        ],
    }
    if title in REPEATED:
        panel |= {"repeat": REPEATED[title], "repeatDirection": "h", "maxPerRow": 3}
    if kind == "heatmap":
        panel["options"] = {
            "calculate": False,
            "yAxis": {"axisLabel": "layer"},
            "color": {"mode": "scheme", "scheme": "Viridis", "min": 0, "max": 1},
            "cellGap": 1,
        }
    if kind == "stat":
        panel["fieldConfig"]["defaults"]["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}],
        }
    return panel


def build() -> dict[str, Any]:
    panels, x, y, row_height = [], 0, 0, 0
    for index, spec in enumerate(PANELS):
        width, height = spec[3], spec[4]
        if x + width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel(index, spec, x, y))
        x, row_height = x + width, max(row_height, height)
    return {
        "uid": "hest-serving",
        "title": "HEST serving",
        "description": "Energy-budgeted summarisation: joules, power, latency, path mix.",
        "tags": ["hest"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [PATH_VARIABLE]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help
    OUT.write_text(render())
    print(f"wrote {OUT}")
