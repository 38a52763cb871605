"""The load generator against a real `python -m server` process (the tiny random Llama, so it
starts in seconds): every report field, both APIs, streamed and not, and `--compare`.

The fake server in conftest.py stays for what a real server must never do (report a modelled
energy above the budget) and for injecting 422/429/slow answers on cue."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.cli import main
from loadtest.client import Target
from loadtest.report import SUMMARY_FIELDS, lookup, summarize_run
from loadtest.runner import RunConfig, run_load
from loadtest.spec import BudgetSpec, PromptSource

SERVER_TESTS = Path(__file__).resolve().parents[1] / "server"
if str(SERVER_TESTS) not in sys.path:  # --import-mode=importlib adds no test dirs
    sys.path.insert(0, str(SERVER_TESTS))

from server_helpers import ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("lt_tiny_server") / "server.log"
    env = {
        "HEST_MODEL": "tiny:llama",
        "HEST_ADAPTER": "none",  # policy hest with an untrained controller: the guard still runs
        "HEST_THREADS": "1",
        "HEST_WARMUP": "false",
        "HEST_MAX_WAIT_MS": "5",
        "HEST_SLO_S": "900",  # no brownout: these tests check budgets as sent
        "HEST_ACCESS_LOG": "false",
    }
    server = ServerProcess(env, log)
    try:
        server.wait_ready(timeout_s=180)
        yield server.url
    finally:
        server.stop()


def _run(target: Target, mode: str, budgets: str, prompts: int, **load):
    """One bounded run of generated 40-word prompts; (the raw result, its summary)."""
    config = RunConfig(
        mode=mode,
        duration_s=20,
        budget=BudgetSpec.parse(budgets, kind="ratio"),
        prompts=PromptSource.generated(words=40, count=prompts),
        **load,
    )
    result = asyncio.run(run_load(target, config, progress=False))
    return result, summarize_run(result, slo_s=30.0)


@pytest.mark.parametrize(
    ("api", "stream", "ttft_source"),
    [
        ("native", True, "stream"),
        ("native", False, "server"),
        ("openai", True, "stream"),
        ("openai", False, "server"),
    ],
)
def test_real_server_run_reports_every_field(tiny_server, api, stream, ttft_source) -> None:
    target = Target(url=tiny_server, api=api, stream=stream, max_new_tokens=6)
    result, summary = _run(target, "poisson", rate=20, max_requests=8, budgets="0.7,1.0", prompts=4)
    assert summary["requests"] == {"sent": 8, "ok": 8, "errors": 0}, summary["errors_by_status"]
    for path in SUMMARY_FIELDS:
        optional = path.startswith("energy.measured_j")  # null: no hardware meter here
        assert lookup(summary, tuple(path.split("."))) is not None or optional, path
    assert summary["energy"]["meters"] == {"estimate": 8}
    assert summary["energy"]["measured_j_per_request"]["n"] == 0
    assert summary["energy"]["estimated_j_per_request"]["n"] == 8
    assert summary["budget_violations"] == 0
    assert {row["group"] for row in summary["per_budget"]} == {"ratio 0.7", "ratio 1"}
    # a request whose budget ran out before its first sentence ended streams no text
    # (finish_detail no_sentence; the tiny model rarely ends a sentence): its TTFT is the server's
    src = summary["ttft_source"]
    assert sum(src.values()) == 8 and set(src) <= {ttft_source, "server"}, src
    assert src.get(ttft_source, 0) >= 4, src  # the ratio-1.0 half streams its text
    assert 0 < summary["ttft_s"]["p50"] <= summary["latency_s"]["p50"]
    for rec in result.records:
        assert rec.modelled_j is not None and rec.budget_j is not None
        assert rec.modelled_j <= rec.budget_j  # the server's invariant, as the client sees it


def test_real_server_refusals_are_counted_by_code(tiny_server) -> None:
    """A budget below the minimum is a real 422 `budget_below_minimum` from the server."""
    target = Target(url=tiny_server, max_new_tokens=4)
    result, summary = _run(
        target, "closed", concurrency=1, max_requests=3, budgets="1e-9", prompts=2
    )
    assert summary["requests"] == {"sent": 3, "ok": 0, "errors": 3}
    assert summary["errors_by_status"] == {"422": 3}
    assert {r.error for r in result.records} == {"budget_below_minimum"}


def test_cli_compare_sweep_writes_json_markdown_and_plots(tiny_server, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(
        [
            *("--compare", tiny_server, tiny_server + "/"),
            *("--labels", "A", "B", "--sweep", "10,20", "--max-requests", "6"),
            *("--duration", "20", "--generated-words", "30", "--max-new-tokens", "4"),
            *("--budget-ratio", "uniform:0.7,1.0", "--budget-ratio-b", "1.0"),
            *("--out", str(out), "--no-progress"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "B/A" in printed and "latency p99 s" in printed
    report = json.loads((out / "report.json").read_text())
    assert len(report["runs"]) == 4 and len(report["comparisons"]) == 2
    assert [run["summary"]["label"] for run in report["runs"]] == ["A", "B", "A", "B"]
    assert all(run["summary"]["requests"]["ok"] == 6 for run in report["runs"])
    a_budgets = {r["budget_sent"] for r in report["runs"][0]["requests"]}
    assert len(a_budgets) == 6 and all(0.7 <= b <= 1.0 for b in a_budgets)
    assert {r["budget_sent"] for r in report["runs"][1]["requests"]} == {1.0}  # the baseline's
    for run in report["runs"]:
        for r in run["requests"]:
            assert r["modelled_j"] <= r["budget_j"]
    assert "| metric |" in (out / "report.md").read_text()
    for name in ("latency_cdf.png", "p99_vs_rate.png", "joules_vs_budget.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def test_long_prompts_are_mixed_in_read_whole_and_reported_apart(tiny_server, tmp_path) -> None:
    """`long_prompts`: one long prompt every `long_every_s` while the run sends (the first at
    half of it), each read whole by the real server (its prompt longer than any short one),
    recorded apart (kind "long") and summarised under `long_requests`; the run's own figures
    count the short requests only. The CLI takes `--long-prompts/--long-every`."""
    long_file = tmp_path / "long.jsonl"
    text = " ".join(
        f"Sentence number {i} of a long report on the harbour works." for i in range(60)
    )
    long_file.write_text(json.dumps({"article": text}) + "\n")
    target = Target(url=tiny_server, max_new_tokens=4)
    config = RunConfig(
        mode="constant",
        rate=4,
        max_requests=12,
        duration_s=3.0,
        budget=BudgetSpec.parse("1.0", kind="ratio"),
        prompts=PromptSource.generated(words=40, count=3),
        long_prompts=PromptSource.from_jsonl(long_file),
        long_every_s=1.0,
    )
    result = asyncio.run(run_load(target, config, progress=False))
    summary = summarize_run(result, slo_s=30.0)
    assert [r.kind for r in result.records] == ["main"] * 12
    assert [r.scheduled_s for r in result.long_records] == [0.5, 1.5, 2.5]
    assert all(r.kind == "long" and r.ok for r in result.long_records)
    short_max = max(r.prompt_tokens for r in result.records)
    assert min(r.prompt_tokens for r in result.long_records) > 2 * short_max
    assert summary["requests"]["sent"] == 12
    lr = summary["long_requests"]
    assert lr["sent"] == lr["ok"] == 3 and lr["ttft_s"]["n"] == 3
    assert result.config.describe()["long_prompts"]["every_s"] == 1.0

    out = tmp_path / "out"
    code = main(
        [
            "--url", tiny_server, "--mode", "constant", "--rate", "4", "--max-requests", "8",
            "--duration", "2", "--max-new-tokens", "3", "--long-prompts", str(long_file),
            "--long-every", "1", "--out", str(out), "--no-progress", "--no-plots",
        ]
    )  # fmt: skip
    assert code in (0, None)
    rep = json.loads((out / "report.json").read_text())
    kinds = [r["kind"] for r in rep["runs"][0]["requests"]]
    assert kinds.count("long") == 2 and kinds.count("main") == 8
    assert rep["runs"][0]["summary"]["long_requests"]["sent"] == 2
