"""End to end: a real server, a real Prometheus scraping it every second, a short real load.

Then every PromQL expression of the Grafana dashboard and of the alert rules (for a threshold
alert, its left-hand side) must return data through Prometheus's HTTP API, and the load
generator's JSON report must hold every field. One server and one Prometheus serve the module:
the CPU has 2 cores and the model takes tens of seconds to load.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, alert_rules, dashboard_exprs, find_tool

from loadtest.cli import main as loadtest_main
from loadtest.report import SUMMARY_FIELDS, lookup

pytestmark = [pytest.mark.e2e, pytest.mark.deploy_tools]

SERVER_START_S = float(os.environ.get("HEST_TEST_SERVER_START_S", "420"))
CNNDM = ROOT.parent / "shared" / "data" / "cnndm" / "test.jsonl"
COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=3.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    pytest.fail(f"{what} not ready at {url} after {timeout_s:g} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory) -> Iterator[str]:
    if not (ROOT / "server" / "__main__.py").is_file():
        pytest.fail("server/__main__.py does not exist yet: `python -m server` cannot start")
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = os.environ | {"HEST_HOST": "127.0.0.1", "HEST_PORT": str(port)}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/readyz", proc, log, SERVER_START_S, "python -m server")
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def prometheus_url(server_url, tmp_path_factory) -> Iterator[str]:
    binary = find_tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / "prometheus" / name) for name in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [server_url.removeprefix("http://")]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = work / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={work / 'data'}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/-/ready", proc, log, 60, "prometheus")
        yield url
    finally:
        _stop(proc)


def query(prometheus_url: str, expr: str) -> list[dict]:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, trust_env=False)
    body = response.json()
    assert body.get("status") == "success", f"{expr}: {body}"
    return body["data"]["result"]


@pytest.fixture(scope="module")
def load_report(server_url, prometheus_url, tmp_path_factory) -> dict:
    """A short real load (after Prometheus has scraped the idle server), then a few more scrapes."""
    deadline = time.monotonic() + 30
    while not any(r["value"][1] == "1" for r in query(prometheus_url, 'up{job="hest-server"}')):
        assert time.monotonic() < deadline, "Prometheus never scraped the server"
        time.sleep(0.5)
    out = tmp_path_factory.mktemp("load")
    prompts = ["--prompts", str(CNNDM), "--prompt-limit", "8"] if CNNDM.is_file() else []
    args = [
        *("--url", server_url, "--mode", "poisson", "--rate", "1", "--duration", "5"),
        *("--max-requests", "4", "--max-new-tokens", "8", "--max-chars", "800"),
        *("--budget-ratio", "0.3,0.6,1.0", "--slo", "30", "--request-timeout", "180"),
        *("--drain", "180", "--json", str(out / "report.json"), "--no-progress", *prompts),
    ]
    assert loadtest_main(args) == 0
    time.sleep(4)  # a few 1 s scrapes and rule evaluations after the last request
    return json.loads((out / "report.json").read_text())


def test_load_report_holds_every_field(load_report) -> None:
    (run,) = load_report["runs"]
    summary = run["summary"]
    for path in SUMMARY_FIELDS:
        value = lookup(summary, tuple(path.split(".")))
        optional = path.startswith("energy.measured_j")  # null where the server has no meter
        assert value is not None or optional, f"{path} missing from the report"
    assert summary["requests"]["ok"] == summary["requests"]["sent"] >= 1, summary[
        "errors_by_status"
    ]
    assert summary["ttft_source"].get("stream"), "the server sent no SSE text delta"
    assert summary["budget_violations"] == 0
    assert summary["energy"]["meters"], "energy.meter missing from responses"
    for request in run["requests"]:
        assert request["modelled_j"] is not None and request["budget_j"] is not None
        assert request["ttft_s"] <= request["latency_s"]


def test_openai_api_run_against_the_real_server(server_url, load_report, tmp_path) -> None:
    args = [
        *("--url", server_url, "--api", "openai", "--mode", "closed", "--concurrency", "1"),
        *("--max-requests", "2", "--duration", "60", "--max-new-tokens", "8"),
        *("--generated-words", "60", "--budget-ratio", "0.6", "--no-progress"),
        *("--json", str(tmp_path / "openai.json")),
    ]
    assert loadtest_main(args) == 0
    (run,) = json.loads((tmp_path / "openai.json").read_text())["runs"]
    assert run["summary"]["requests"]["ok"] == 2, run["summary"]["errors_by_status"]
    assert all(r["modelled_j"] is not None for r in run["requests"]), "no energy in usage"


def left_hand_side(expr: str) -> str:
    """The part of `expr` before its top-level comparison (the whole expr if it has none)."""
    depth, quote, i = 0, "", 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            for op in COMPARISONS:
                if expr.startswith(op, i):
                    return expr[:i].strip()
        i += 1
    return expr.strip()


def test_left_hand_side() -> None:
    assert left_hand_side('up{job="a"} == 0') == 'up{job="a"}'
    assert left_hand_side('sum(x{a=~"b"}) / sum(y) > 0.2') == 'sum(x{a=~"b"}) / sum(y)'
    assert left_hand_side("abs(1 - (a or b) / c) > 0.25") == "abs(1 - (a or b) / c)"
    assert left_hand_side("rate(x[1m])") == "rate(x[1m])"


def test_every_dashboard_and_alert_query_returns_data(prometheus_url, load_report) -> None:
    queries = [(f"dashboard: {title}", expr) for title, expr in dashboard_exprs()]
    queries += [(f"alert: {r['alert']}", left_hand_side(r["expr"])) for r in alert_rules()]
    empty, not_finite = [], []
    for name, expr in queries:
        result = query(prometheus_url, expr)
        if not result:
            empty.append(f"{name}: {expr}")
        elif not any(math.isfinite(float(r["value"][1])) for r in result):
            not_finite.append(f"{name}: {expr} -> {[r['value'][1] for r in result]}")
    assert not empty, "queries with no data:\n" + "\n".join(empty)
    assert not not_finite, "queries with only NaN/Inf:\n" + "\n".join(not_finite)


def test_alert_rules_load_and_evaluate_cleanly(prometheus_url, load_report) -> None:
    body = httpx.get(f"{prometheus_url}/api/v1/rules", trust_env=False).json()
    rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad, bad
    firing = {r["name"] for r in rules if r["state"] == "firing"}
    assert "HestBudgetViolation" not in firing and "HestServerDown" not in firing
