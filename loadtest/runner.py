"""Arrival schedules and the bounded request loop.

Open loop (`poisson`, `constant`): request i is sent at its scheduled time whether or not earlier
ones have answered, so queueing shows in the latencies. Closed loop (`closed`): `concurrency`
workers each send the next request as soon as their previous one answers. Every run stops issuing
at `max_requests` or `duration_s`, whichever comes first, waits at most `drain_s` more for requests
in flight, then cancels the rest (counted as errors `deadline`). So a run never outlives
duration_s + drain_s, and it only ever talks to the one URL it was given.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from loadtest.client import RequestRecord, Target, send
from loadtest.spec import BudgetSpec, LoadtestError, PromptSource

MODES = ("poisson", "constant", "closed")


@dataclass
class RunConfig:
    """One run's load shape and bounds."""

    mode: str = "poisson"
    rate: float | None = 1.0  # requests/s for open-loop modes
    concurrency: int = 1  # workers for the closed loop
    max_requests: int = 50
    duration_s: float = 60.0
    drain_s: float = 60.0
    request_timeout_s: float = 120.0
    warmup: int = 0  # requests sent (one at a time) before the measured run, not counted
    seed: int = 0
    keepalive: bool = True  # reuse connections (False: a new connection per request)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    prompts: PromptSource = field(default_factory=PromptSource.generated)
    # long prompts mixed in: one every long_every_s seconds while the run sends (the first at
    # half that), read whole (native API), recorded apart (RunResult.long_records)
    long_prompts: PromptSource | None = None
    long_every_s: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LoadtestError(f"--mode {self.mode!r}: use one of {MODES}")
        if self.mode != "closed" and (self.rate is None or not self.rate > 0):
            raise LoadtestError(f"--rate {self.rate}: open-loop modes need a rate > 0 requests/s")
        if self.mode == "closed" and self.concurrency < 1:
            raise LoadtestError(f"--concurrency {self.concurrency}: give at least 1")
        if self.max_requests < 1 or not self.duration_s > 0:
            raise LoadtestError(
                f"--max-requests {self.max_requests} / --duration {self.duration_s}: "
                "both bounds must be positive"
            )
        if self.drain_s < 0 or not self.request_timeout_s > 0:
            raise LoadtestError("--drain must be >= 0 and --request-timeout > 0 seconds")
        if self.long_prompts is not None and not self.long_every_s > 0:
            raise LoadtestError(f"--long-every {self.long_every_s}: give seconds > 0")

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "rate_rps": self.rate if self.mode != "closed" else None,
            "concurrency": self.concurrency if self.mode == "closed" else None,
            "max_requests": self.max_requests,
            "duration_s": self.duration_s,
            "drain_s": self.drain_s,
            "request_timeout_s": self.request_timeout_s,
            "warmup": self.warmup,
            "seed": self.seed,
            "keepalive": self.keepalive,
            "budget": self.budget.describe(),
            "prompts": self.prompts.origin,
            "long_prompts": None
            if self.long_prompts is None
            else {"source": self.long_prompts.origin, "every_s": self.long_every_s},
        }


@dataclass
class RunResult:
    target: Target
    config: RunConfig
    records: list[RequestRecord]
    started_at: str
    wall_s: float
    server_info: dict[str, Any] | None = None
    long_records: list[RequestRecord] = field(default_factory=list)  # --long-prompts requests

    @property
    def every_record(self) -> list[RequestRecord]:
        """The run's own requests, then the long prompts mixed in."""
        return self.records + self.long_records


def schedule(config: RunConfig) -> list[float]:
    """Send times (s from start) for open-loop modes: at most max_requests, all < duration_s."""
    assert config.rate is not None
    rng = random.Random(config.seed)
    times: list[float] = []
    t = 0.0
    while len(times) < config.max_requests:
        if config.mode == "poisson":
            t += rng.expovariate(config.rate)
        else:
            t = len(times) / config.rate
        if t >= config.duration_s:
            break
        times.append(t)
    return times


def make_records(
    config: RunConfig, count: int, budget: BudgetSpec | None = None
) -> list[RequestRecord]:
    """The request list (budgets drawn with their own seeded generator: same for every target).
    `budget` overrides the run's budget spec (a baseline target that gets other budgets)."""
    spec = budget or config.budget
    rng = random.Random(config.seed + 1)
    records = []
    for i in range(count):
        value = spec.draw(i, rng)
        records.append(
            RequestRecord(
                index=i,
                budget_field=spec.field,
                budget_sent=value,
                budget_group=spec.group(value),
            )
        )
    return records


def _client(config: RunConfig, pool: int) -> httpx.AsyncClient:
    timeout = httpx.Timeout(config.request_timeout_s, connect=10.0)
    # without keep-alive every request opens its own connection: llama-server (cpp-httplib) now and
    # then closes a kept-alive connection just as the next request goes out on it, which reads as
    # RemoteProtocolError here (1 of 40 streamed requests in a test); a new connection never does
    keep = pool if config.keepalive else 0
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=keep)
    # trust_env=False: no proxy from the environment; requests go to the given URL only
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)


async def wait_ready(target: Target, timeout_s: float) -> None:
    """Poll the server's readiness endpoint until it answers 200, or raise after timeout_s."""
    path = "/readyz" if target.api == "native" else "/v1/models"
    url = target.url.rstrip("/") + path
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            try:
                response = await client.get(url)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as err:
                last = type(err).__name__
            await asyncio.sleep(0.5)
    raise LoadtestError(f"{url} not ready after {timeout_s:g} s (last: {last}); is the server up?")


async def fetch_info(target: Target) -> dict[str, Any] | None:
    """The native server's /v1/info (model, policy, meter), or None where there is none."""
    if target.api != "native":
        return None
    try:
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            response = await client.get(target.url.rstrip("/") + "/v1/info")
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def run_load(target: Target, config: RunConfig, *, progress: bool = True) -> RunResult:
    """Run one bounded load against `target` and return every request's record."""
    from tqdm.auto import tqdm

    times = schedule(config) if config.mode != "closed" else []
    count = len(times) if config.mode != "closed" else config.max_requests
    records = make_records(config, count, target.budget)
    info = await fetch_info(target)
    pool = max(config.concurrency, 64) if config.mode == "closed" else max(64, count)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    label = f"{target.url} {config.mode} " + (
        f"c={config.concurrency}" if config.mode == "closed" else f"{config.rate:g} req/s"
    )
    async with _client(config, pool) as client:
        for i in range(config.warmup):
            warm = RequestRecord(index=-1 - i, budget_field=None)
            await send(client, target, warm, config.prompts.get(i), time.perf_counter())
        bar = tqdm(total=count, desc=label, unit="req", disable=not progress, leave=False)
        t0 = time.perf_counter()
        sent: set[int] = set()

        async def one(record: RequestRecord) -> None:
            sent.add(record.index)
            await send(client, target, record, config.prompts.get(record.index), t0)
            bar.update(1)
            bar.set_postfix(errors=sum(r.error is not None for r in records), refresh=False)

        longs: list[RequestRecord] = []
        stop_long = asyncio.Event()
        mixer = None
        if config.long_prompts is not None:
            mixer = asyncio.create_task(_long_loop(config, client, target, longs, stop_long, t0))
        try:
            async with asyncio.timeout(config.duration_s + config.drain_s):
                if config.mode == "closed":
                    await _closed_loop(config, records, one, t0)
                else:
                    await _open_loop(config, times, records, one, t0)
                stop_long.set()  # the main load is done: no more long prompts; let those in
                if mixer is not None:  # flight finish within the drain
                    await mixer
        except TimeoutError:
            pass
        finally:
            stop_long.set()
            if mixer is not None and not mixer.done():
                mixer.cancel()
                await asyncio.gather(mixer, return_exceptions=True)
            bar.close()
    wall_s = time.perf_counter() - t0
    records = [r for r in records if r.index in sent]  # never-sent requests are not in the run
    for record in records + longs:
        if record.latency_s is None:  # still in flight when the hard deadline hit
            record.error = "deadline"
    return RunResult(target, config, records, started_at, wall_s, info, longs)


async def _cancel_rest(tasks: list[asyncio.Task]) -> None:
    """Cancel whatever of `tasks` is still running and wait for all of them (on any way out of a
    loop: done, cancelled, or the run's deadline)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _long_loop(config: RunConfig, client, target: Target, longs, stop, t0: float) -> None:
    """Send long prompt j at (j + 1/2) x long_every_s from the start while the run sends (and
    `stop` is not set), each read whole; wait for those sent."""
    assert config.long_prompts is not None
    extra = {"read": "whole"} if target.api == "native" else {}
    tasks: list[asyncio.Task] = []
    j = 0
    try:
        while True:
            when = (j + 0.5) * config.long_every_s
            if when >= config.duration_s:
                break
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, t0 + when - time.perf_counter()))
                break  # stopped before this one was due
            except TimeoutError:
                pass
            record = RequestRecord(index=1_000_000 + j, budget_field=None, kind="long")
            record.scheduled_s = when
            longs.append(record)
            text = config.long_prompts.get(j)
            tasks.append(asyncio.create_task(send(client, target, record, text, t0, extra)))
            j += 1
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        await _cancel_rest(tasks)


async def _open_loop(config: RunConfig, times: list[float], records, one, t0: float) -> None:
    tasks: list[asyncio.Task[None]] = []
    try:
        for when, record in zip(times, records, strict=True):
            delay = t0 + when - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            record.scheduled_s = when
            tasks.append(asyncio.create_task(one(record)))
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        await _cancel_rest(tasks)


async def _closed_loop(config: RunConfig, records, one, t0: float) -> None:
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(records) and time.perf_counter() - t0 < config.duration_s:
            record = records[next_index]
            next_index += 1
            record.scheduled_s = time.perf_counter() - t0
            await one(record)

    workers = [asyncio.create_task(worker()) for _ in range(config.concurrency)]
    try:
        await asyncio.gather(*workers)
    finally:
        await _cancel_rest(workers)
