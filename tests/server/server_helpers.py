"""Helpers and fixtures of the server tests (imported by conftest.py and the tests): the tiny
engine for in-process tests, real `python -m server` processes, and a uvicorn-in-a-thread runner
for tests that need real sockets (client disconnects)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from hest_core import Engine, Scheduler
from server import Settings, create_app

ROOT = Path(__file__).resolve().parents[2]
CNNDM = ROOT.parent / "shared" / "data" / "cnndm" / "test.jsonl"
SERVER_START_S = float(os.environ.get("HEST_TEST_SERVER_START_S", "420"))
# torch threads of the test servers. One: on a shared 2-core machine two OpenMP threads per process
# oversubscribe the cores and made the default model ~10x slower (2.2 s vs 24 s a request).
TEST_THREADS = os.environ.get("HEST_TEST_THREADS", "1")
ARTICLE = (
    "The city council voted on Tuesday to expand the bus network after a year of delays. "
    "Officials said the new routes would serve twelve neighbourhoods and cut average commute "
    "times by a quarter. Critics argued the plan was too expensive, but supporters pointed to "
    "rising ridership and cleaner air. Construction of new stops begins next month. "
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_engine() -> Engine:
    return Engine.from_pretrained("tiny:llama", adapter=None, progress=False)


def tiny_settings(**overrides) -> Settings:
    return Settings(**({"warmup": False, "max_wait_ms": 5.0} | overrides))


@contextlib.asynccontextmanager
async def in_process(engine: Engine, **overrides) -> AsyncIterator[httpx.AsyncClient]:
    """An app on `engine` with its lifespan running, and an httpx client talking ASGI to it."""
    app = create_app(tiny_settings(**overrides), engine=engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


def slow_submit(delay_s: float, seen: list) -> Callable:
    """A wrapper of the real `Scheduler.submit` (monkeypatch it onto the class): remember each
    request handed to the runtime, sleep per streamed delta (in the engine thread, so every step
    of the running batch slows down). Clean endings are turned off so every token is a streamed
    delta (the tiny random model writes no sentences, and clean endings hold a sentence back
    until it ends)."""
    real = Scheduler.submit

    def submit(self, req, on_token=None, on_done=None):
        seen.append(req)

        def on_token_slow(delta) -> None:
            time.sleep(delay_s)
            if on_token is not None:
                on_token(delta)

        return real(self, replace(req, clean_end=False), on_token_slow, on_done)

    return submit


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0.0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@contextlib.contextmanager
def uvicorn_thread(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# ---- real `python -m server` processes ------------------------------------------------------------
class ServerProcess:
    def __init__(self, env: dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        keep = ("HEST_CALIBRATION",)  # the fixed test tables (tests/conftest.py)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("HEST_") or k in keep}
        clean |= {"HEST_HOST": "127.0.0.1", "HEST_PORT": str(self.port)} | env
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server"],
                cwd=ROOT,
                env=clean,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout_s: float = SERVER_START_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=3).status_code == 200:
                    return
            time.sleep(0.3)
        pytest.fail(f"server not ready after {timeout_s:g} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture(scope="session")
def real_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """One `python -m server` with the REAL default model and adapter for the whole session."""
    log = tmp_path_factory.mktemp("real_server") / "server.log"
    # a lax SLO: these tests check budgets as sent; brownout has its own test
    env = {"HEST_MODEL": "default", "HEST_MAX_WAIT_MS": "50", "HEST_SLO_S": "900"}
    env["HEST_THREADS"] = TEST_THREADS
    server = ServerProcess(env, log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def articles(n: int, max_chars: int = 400) -> list[str]:
    """`n` short texts: CNN/DM test articles where the shared data exists, else a fixed one."""
    import json

    if CNNDM.is_file():
        with CNNDM.open() as fh:
            lines = [line for _, line in zip(range(n), fh, strict=False)]
        texts = [json.loads(line)["article"][:max_chars] for line in lines]
        if len(texts) == n:
            return texts
    return [f"{i}. {ARTICLE}" for i in range(n)]
