"""Real HTTP runs of the load generator against the fake server (tests/loadtest/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from loadtest.cli import main
from loadtest.client import Target
from loadtest.report import SUMMARY_FIELDS, lookup, summarize_run
from loadtest.runner import RunConfig, run_load
from loadtest.spec import BudgetSpec, PromptSource


def _run(target: Target, **kwargs) -> dict:
    kwargs.setdefault("prompts", PromptSource.generated(words=40, count=4))
    config = RunConfig(**kwargs)
    result = asyncio.run(run_load(target, config, progress=False))
    return summarize_run(result, slo_s=1.0) | {"_records": result.records}


@pytest.mark.parametrize(
    ("api", "stream", "ttft_source"),
    [
        ("native", True, "stream"),
        ("native", False, "server"),
        ("openai", True, "stream"),
        ("openai", False, "server"),
    ],
)
def test_run_reports_every_field(fake_server, api, stream, ttft_source) -> None:
    target = Target(url=fake_server, api=api, stream=stream, max_new_tokens=8)
    summary = _run(
        target,
        mode="poisson",
        rate=40,
        max_requests=12,
        duration_s=5,
        budget=BudgetSpec.parse("0.3,0.6", kind="ratio"),
    )
    for path in SUMMARY_FIELDS:
        assert lookup(summary, tuple(path.split("."))) is not None or path.startswith(
            ("energy.measured_j", "ttft_s")
        ), path
    assert summary["requests"] == {"sent": 12, "ok": 12, "errors": 0}
    assert summary["completion_tokens_per_s"] > 0
    assert summary["energy"]["meters"] == {"estimate": 12}
    assert summary["energy"]["measured_j_per_request"]["n"] == 0  # no meter: null, not estimated
    assert summary["energy"]["estimated_j_per_request"]["n"] == 12
    assert summary["budget_exhaustions"] == 6  # ratio 0.3 < 0.5 in the fake server
    assert summary["budget_violations"] == 0
    assert {row["group"] for row in summary["per_budget"]} == {"ratio 0.3", "ratio 0.6"}
    if ttft_source:
        assert summary["ttft_source"] == {ttft_source: 12}
        assert 0 < summary["ttft_s"]["p50"] <= summary["latency_s"]["p50"]


def test_closed_loop_errors_by_status_and_violations(fake_server) -> None:
    texts = ["fine text", "BAD text", "FULL text", "VIOLATE text"]
    target = Target(url=fake_server, max_new_tokens=4)
    summary = _run(
        target,
        mode="closed",
        concurrency=2,
        max_requests=8,
        duration_s=10,
        prompts=PromptSource(texts, "test"),
    )
    assert summary["requests"] == {"sent": 8, "ok": 4, "errors": 4}
    assert summary["errors_by_status"] == {"422": 2, "429": 2}
    assert summary["budget_violations"] == 2
    codes = {r.error for r in summary["_records"] if not r.ok}
    assert codes == {"invalid_text", "queue_full"}


def test_a_run_never_outlives_duration_plus_drain(fake_server) -> None:
    target = Target(url=fake_server, max_new_tokens=4)
    start = time.monotonic()
    summary = _run(
        target,
        mode="constant",
        rate=4,
        max_requests=100,
        duration_s=1.0,
        drain_s=0.5,
        prompts=PromptSource(["SLOW text"], "test"),
    )
    assert time.monotonic() - start < 3.0
    assert summary["requests"]["sent"] == 4
    assert summary["errors_by_status"] == {"deadline": 4}


def test_unreachable_target_counts_transport_errors(unused_url, capsys) -> None:
    url = unused_url  # nothing listens there
    code = main(["--url", url, "--rate", "20", "--max-requests", "3", "--no-progress"])
    assert code == 3
    captured = capsys.readouterr()
    assert "transport:ConnectError:3" in captured.out
    assert "no request succeeded" in captured.err


def test_cli_compare_writes_json_markdown_and_plots(fake_server, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(
        [
            *("--compare", fake_server, fake_server + "/"),
            *("--labels", "A", "B", "--sweep", "20,40", "--max-requests", "6"),
            *("--duration", "5", "--generated-words", "30", "--max-new-tokens", "4"),
            *("--budget-ratio", "uniform:0.4,1.0", "--budget-ratio-b", "1.0"),
            *("--out", str(out), "--no-progress"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "B/A" in printed and "latency p99 s" in printed
    report = json.loads((out / "report.json").read_text())
    assert len(report["runs"]) == 4 and len(report["comparisons"]) == 2
    assert [run["summary"]["label"] for run in report["runs"]] == ["A", "B", "A", "B"]
    a_budgets = {r["budget_sent"] for r in report["runs"][0]["requests"]}
    assert len(a_budgets) == 6 and all(0.4 <= b <= 1.0 for b in a_budgets)
    assert {r["budget_sent"] for r in report["runs"][1]["requests"]} == {1.0}  # the baseline's
    assert all(len(run["requests"]) == 6 for run in report["runs"])
    assert "| metric |" in (out / "report.md").read_text()
    for name in ("latency_cdf.png", "p99_vs_rate.png", "joules_vs_budget.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def test_cli_refuses_bad_options_with_a_clear_message(capsys) -> None:
    assert main(["--url", "127.0.0.1:8000"]) == 2
    assert "give a full URL" in capsys.readouterr().err
    assert main(["--budget-ratio", "uniform:1"]) == 2
    assert main(["--mode", "closed", "--sweep", "1,2"]) == 2
    assert main(["--budget-ratio-b", "1.0"]) == 2  # needs --compare
    assert "URL_B" in capsys.readouterr().err
