"""Goodput under TTFT and TPOT SLOs (issue 15): `report.within_slo` / `goodput`, the load test's
`--slo-ttft` / `--slo-tpot`, and `python -m loadtest.goodput`, which recomputes goodput of stored
runs under other SLOs from their request records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import goodput as regood
from loadtest.cli import main
from loadtest.report import goodput, tpot_of, within_slo

RUN = Path(__file__).resolve().parents[2] / "loadtest/results/2026-12-01-s14-peer-closed"


@pytest.mark.parametrize(
    "latency, ttft, tpot, slos, expected",
    [
        (4.0, 0.5, 0.05, (5.0, None, None), True),
        (5.0, 0.5, 0.05, (5.0, None, None), True),  # at the SLO counts
        (5.1, 0.5, 0.05, (5.0, None, None), False),
        (None, None, None, (5.0, None, None), False),  # no answer
        (4.0, 1.5, 0.05, (5.0, 1.0, None), False),  # first token too late
        (4.0, None, 0.05, (5.0, 1.0, None), False),  # no TTFT misses a TTFT SLO
        (4.0, 0.5, 0.2, (5.0, 1.0, 0.1), False),  # tokens too slow
        (4.0, 0.5, None, (5.0, 1.0, 0.1), True),  # one token: no TPOT to miss
        (4.0, 0.5, 0.1, (5.0, 1.0, 0.1), True),
    ],
)
def test_within_slo(latency, ttft, tpot, slos, expected) -> None:
    assert within_slo(latency, ttft, tpot, *slos) is expected


def test_goodput_counts_requests_within_every_slo() -> None:
    answered = [(1.0, 0.2, 0.01), (2.0, 1.5, 0.01), (3.0, 0.3, 0.5), (6.0, 0.1, 0.01)]
    g = goodput(answered, sent=5, wall_s=10.0, slo_s=5.0)
    assert (g["ok_within_slo"], g["requests_per_s"], g["fraction_of_sent"]) == (3, 0.3, 0.6)
    g = goodput(answered, sent=5, wall_s=10.0, slo_s=5.0, ttft_slo_s=1.0, tpot_slo_s=0.1)
    assert (g["ok_within_slo"], g["ttft_slo_s"], g["tpot_slo_s"]) == (1, 1.0, 0.1)
    assert tpot_of(2.0, 0.5, 4) == pytest.approx(0.5)
    assert tpot_of(2.0, 0.5, 1) is None and tpot_of(2.0, None, 4) is None


def test_loadtest_reports_ttft_slo_goodput_as_the_stored_records_recompute(
    fake_server, tmp_path
) -> None:
    argv = ["--url", fake_server, "--mode", "closed", "--concurrency", "2", "--max-requests", "6"]
    argv += ["--generated-words", "20", "--max-new-tokens", "4", "--no-progress"]
    # a TTFT SLO below every real first token: nothing is within it
    assert main([*argv, "--slo-ttft", "1e-6", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    g = report["runs"][0]["summary"]["goodput"]
    assert (g["ttft_slo_s"], g["tpot_slo_s"], g["ok_within_slo"]) == (1e-6, None, 0)
    assert "TTFT <= 1e-06 s" in (tmp_path / "report.md").read_text()
    (run,) = regood.load_runs(tmp_path / "partial.jsonl")
    assert regood.regoodput(run, 5.0, 1e-6) == g
    # without it every answered request of the fake server is within 5 s
    assert (
        regood.regoodput(run, 5.0)["ok_within_slo"]
        == report["runs"][0]["summary"]["requests"]["ok"]
        == 6
    )


def test_loadtest_refuses_a_bad_slo(fake_server, capsys) -> None:
    assert main(["--url", fake_server, "--slo-tpot", "0"]) == 2
    assert "--slo-tpot 0.0: give a number of seconds > 0" in capsys.readouterr().err


def test_goodput_of_a_stored_run_recomputes_its_summary(capsys) -> None:
    """The session-14 closed loop against llama-server (stored records): the recomputed 5 s
    goodput equals each run's own summary, and a TTFT SLO of 1 s tells continuous batching from
    static batching at 8 clients (static's first tokens wait for the running batch)."""
    runs = regood.load_runs(RUN / "report.json")
    for run in runs:
        assert regood.regoodput(run, run["summary"]["goodput"]["slo_s"]) == {
            **run["summary"]["goodput"], "ttft_slo_s": None, "tpot_slo_s": None,
        }  # fmt: skip
    at8 = {r["summary"]["label"]: r for r in runs if r["summary"]["concurrency"] == 8}
    cont = regood.regoodput(at8["hest"], 5.0, 1.0, 0.1)["ok_within_slo"]
    static = regood.regoodput(at8["hest-static"], 5.0, 1.0, 0.1)["ok_within_slo"]
    assert (cont, static) == (57, 12)
    assert regood.main([str(RUN / "report.json"), "--slo-ttft", "1", "--slo-tpot", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "| c=8 | hest-static | 2.753 | 2.707 (59 of 60) | 0.551 (12 of 60) |" in out


def test_goodput_tool_refuses_what_it_cannot_read(tmp_path, capsys) -> None:
    empty = tmp_path / "partial.jsonl"
    empty.write_text("")
    assert regood.main([str(empty)]) == 2
    assert "holds no runs" in capsys.readouterr().err
    assert regood.main([str(tmp_path / "missing.jsonl")]) == 2
    assert regood.main([str(RUN / "report.json"), "--slo", "-1"]) == 2
