"""Fault injection: real HTTP runs of the load generator against the fake server
(tests/loadtest/conftest.py), which answers 422/429/slowly on cue and can report a budget
violation, which a real server never does. The happy paths run against a real server in
test_lt_real_server.py."""

from __future__ import annotations

import asyncio
import time

from loadtest.cli import main
from loadtest.client import Target
from loadtest.report import summarize_run
from loadtest.runner import RunConfig, run_load
from loadtest.spec import PromptSource


def _run(target: Target, **kwargs) -> dict:
    kwargs.setdefault("prompts", PromptSource.generated(words=40, count=4))
    config = RunConfig(**kwargs)
    result = asyncio.run(run_load(target, config, progress=False))
    return summarize_run(result, slo_s=1.0) | {"_records": result.records}


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


def test_cli_refuses_bad_options_with_a_clear_message(capsys) -> None:
    assert main(["--url", "127.0.0.1:8000"]) == 2
    assert "give a full URL" in capsys.readouterr().err
    assert main(["--budget-ratio", "uniform:1"]) == 2
    assert main(["--mode", "closed", "--sweep", "1,2"]) == 2
    assert main(["--budget-ratio-b", "1.0"]) == 2  # needs --compare
    assert "URL_B" in capsys.readouterr().err
