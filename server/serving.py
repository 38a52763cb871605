"""Serving logic: validation, the bounded queue, the batching scheduler, brownout and drain.

One asyncio task (the scheduler) takes requests from a bounded queue, forms a batch (up to
`max_batch_size`, waiting at most `max_wait_ms` for it to fill) and runs `engine.generate` in ONE
worker thread, so the event loop keeps answering while the engine works. Streamed text pieces come
back from that thread through `loop.call_soon_threadsafe` into each request's own asyncio queue.
A request whose client went away has its `cancelled` Event set: dropped if still queued, stopped
at the next token if running.

Brownout answers overload, not slowness. The scheduler keeps the wall times of the last
`BATCH_WINDOW` batches; their median is the typical batch time (one outlier, a stall or a long
summary, does not move a median). A new request's *wait* is the time before its own batch can
start: what is left of the running batch, plus a typical batch for every full batch queued ahead
of it. On an idle server the wait is 0 and there is no brownout, however slow the last request
was. The SLO leaves `slack = SLO - typical batch time` for waiting; past `brownout_start` x slack
the level rises linearly to 1 at the whole slack, and each new budget ratio r becomes
r - level x (r - floor): lower budgets mean more int8 units and earlier stops, i.e. shorter
batches. Only when the queue is full is a request refused (429).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import statistics
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from hest_core import (
    Engine,
    GenerationRequest,
    GenerationResult,
    HestError,
    InvalidInputError,
    PreparedRequest,
)

from .exceptions import EngineFailedError, NotReadyError, QueueFullError, ShuttingDownError
from .metrics import Metrics, co2e_g
from .settings import Settings

log = logging.getLogger("hest.server")

_DONE = None  # end-of-stream marker in a job's delta queue
BATCH_WINDOW = 16  # recent batch wall times whose median is the typical batch time


# ---- one request in flight ----------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    prepared: PreparedRequest
    cancelled: threading.Event
    arrived: float  # time.perf_counter() when it was queued
    brownout: bool
    stream: asyncio.Queue[str | None] | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    queue_s: float = 0.0  # queued until its batch started
    check_s: float = 0.0  # validation + tokenisation before it was queued
    result: GenerationResult | None = None
    co2e_g: float | None = None  # an estimate, set when it finished (HEST_GRID_INTENSITY_G_PER_KWH)
    error: HestError | None = None  # a ServerError, or the runtime's error for this request
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def cancel(self) -> None:
        """The client went away: stop spending energy on this request."""
        self.cancelled.set()

    def _finish(self, result: GenerationResult | None, error: HestError | None) -> None:
        self.result, self.error = result, error
        self.done.set()
        if self.stream is not None:
            self.stream.put_nowait(_DONE)

    async def wait(self) -> GenerationResult:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    async def deltas(self):
        """Text pieces as the engine produces them (streaming jobs only)."""
        assert self.stream is not None
        while (piece := await self.stream.get()) is not _DONE:
            yield piece


class Serving:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.engine: Engine | None = None
        self.ready = False
        self.draining = False
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=settings.queue_size)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hest-engine")
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hest-check")
        self._scheduler: asyncio.Task | None = None
        self._running: list[Job] = []
        self._jobs: weakref.WeakSet[Job] = weakref.WeakSet()  # every accepted, referenced job
        self._busy_since = 0.0
        self._batch_s: deque[float] = deque(maxlen=BATCH_WINDOW)  # recent batch wall times
        self._guarded = True  # False for fixed policies: the budget guard is off, no brownout

    # ---- lifecycle ------------------------------------------------------------------------------
    async def load(self, build: Callable[[], Engine] | Engine, warmup: bool) -> None:
        """Load (in the worker thread) and warm the engine, then start scheduling."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        engine = (
            build if isinstance(build, Engine) else await loop.run_in_executor(self._worker, build)
        )
        if warmup:
            log.info("warming up")
            await loop.run_in_executor(self._worker, engine.warmup)
        self.engine = engine
        info = engine.info()
        self._guarded = info.get("policy", "hest") == "hest"
        self.metrics.set_info(info)
        self._scheduler = asyncio.create_task(self._schedule(), name="hest-scheduler")
        self.ready = True
        log.info(
            "ready: %s on %s in %.1f s",
            info.get("model"),
            info.get("device"),
            time.perf_counter() - t0,
        )

    def begin_drain(self) -> None:
        """Refuse new requests with 503 from now on (SIGTERM). Safe from a signal handler."""
        self.draining = True

    async def drain(self, timeout_s: float) -> None:
        """Finish queued and running requests (at most `timeout_s`), then stop the scheduler."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self._unfinished() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        for job in self._unfinished():  # only after a drain timeout: stop them, answer 503
            job.cancel()
            job._finish(None, ShuttingDownError("the server shut down before this request ended"))
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._checker.shutdown(wait=False, cancel_futures=True)
        self.ready = False

    def _unfinished(self) -> list[Job]:
        """Accepted jobs not finished yet: queued, being batched, or running."""
        return [job for job in self._jobs if not job.done.is_set()]

    # ---- admission ------------------------------------------------------------------------------
    def _refuse_if_closed(self) -> None:
        if self.draining:
            self.metrics.requests.labels("rejected").inc()
            self.metrics.rejections.labels("shutting_down").inc()
            raise ShuttingDownError(
                "the server is shutting down; retry on another replica or after Retry-After",
                retry_after=self.settings.retry_after_s,
            )
        if not self.ready:
            self.metrics.requests.labels("rejected").inc()
            raise NotReadyError(
                "the model is still loading; retry after Retry-After (see /readyz)",
                retry_after=self.settings.retry_after_s,
            )

    async def _check(self, req: GenerationRequest) -> PreparedRequest:
        """engine.check (tokenises) in its own thread so the event loop stays free."""
        assert self.engine is not None
        loop = asyncio.get_running_loop()
        for attempt in range(3):
            try:
                return await loop.run_in_executor(self._checker, self.engine.check, req)
            except RuntimeError as err:  # HF fast tokenizer "Already borrowed" under contention
                if "borrow" not in str(err) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def submit(self, req: GenerationRequest, *, stream: bool = False) -> Job:
        """Validate, maybe brown out, and queue one request. Raises InvalidInputError (422),
        QueueFullError (429), ShuttingDownError / NotReadyError (503)."""
        arrived = time.perf_counter()
        self._refuse_if_closed()
        if req.energy_budget_j is None and req.energy_budget_ratio is None:
            req = replace(req, energy_budget_ratio=self.settings.default_budget_ratio)
        if req.max_new_tokens is None:
            req = replace(req, max_new_tokens=self.settings.max_new_tokens)
        req.cancelled = threading.Event()
        prepared = await self._check(req)
        self._refuse_if_closed()
        if self._queue.full():
            self.metrics.requests.labels("rejected").inc()
            self.metrics.rejections.labels("queue_full").inc()
            raise QueueFullError(
                f"the queue is full ({self.settings.queue_size} requests waiting); "
                "retry after Retry-After seconds",
                retry_after=self.retry_after_s(),
            )
        level = self.brownout_level()
        self.metrics.brownout_level.set(level)
        prepared, browned = self._tighten(prepared, level)
        if browned:
            self.metrics.brownout_requests.inc()
        now = time.perf_counter()
        job = Job(prepared, req.cancelled, now, browned, asyncio.Queue() if stream else None)
        job.check_s = now - arrived
        self._queue.put_nowait(job)
        self._jobs.add(job)
        self.metrics.queue_depth.set(self._queue.qsize())
        return job

    # ---- brownout -------------------------------------------------------------------------------
    def typical_batch_s(self) -> float | None:
        """Median wall time of the last BATCH_WINDOW batches (None before the first)."""
        return statistics.median(self._batch_s) if self._batch_s else None

    def predicted_wait_s(self) -> float:
        """Seconds a request arriving now waits before its batch starts: the rest of the running
        batch, then one typical batch per full batch queued ahead of it. 0 on an idle server."""
        typical = self.typical_batch_s()
        if typical is None or (not self._running and self._queue.empty()):
            return 0.0
        left = 0.0
        if self._running:
            left = max(0.0, typical - (time.perf_counter() - self._busy_since))
        ahead = self._queue.qsize() // self.settings.max_batch_size  # full batches before ours
        return left + ahead * typical

    def predicted_latency_s(self) -> float:
        """A request arriving now: its wait plus one typical batch (0 before the first batch)."""
        typical = self.typical_batch_s()
        return 0.0 if typical is None else self.predicted_wait_s() + typical

    def brownout_level(self) -> float:
        """0..1: how far the predicted wait has eaten into the slack the SLO leaves for waiting
        (SLO minus a typical batch). 0 whenever nothing would wait."""
        if not self._guarded:
            return 0.0
        wait = self.predicted_wait_s()
        if wait <= 0.0:
            return 0.0
        s = self.settings
        slack = s.slo_s - (self.typical_batch_s() or 0.0)
        if slack <= 0.0:
            return 1.0  # a batch alone takes the whole SLO: any wait breaks it
        start = s.brownout_start * slack
        return min(1.0, max(0.0, (wait - start) / (slack - start)))

    def _tighten(self, p: PreparedRequest, level: float) -> tuple[PreparedRequest, bool]:
        """The request under brownout `level` (0..1): its ratio moved that far towards the floor
        ratio. The runtime lowers the budget (`PreparedRequest.tighten`, clamped at the minimum);
        True when it did."""
        floor = self.settings.brownout_floor_ratio
        if level <= 0.0 or p.budget_ratio <= floor:
            return p, False
        tightened = p.tighten(p.budget_ratio - level * (p.budget_ratio - floor))
        return tightened, tightened is not p

    def retry_after_s(self) -> int:
        wait = self.predicted_latency_s()
        return max(self.settings.retry_after_s, math.ceil(wait)) if math.isfinite(wait) else 60

    # ---- the scheduler --------------------------------------------------------------------------
    async def _next_batch(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.settings.max_wait_ms / 1000
        while len(batch) < self.settings.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        self.metrics.queue_depth.set(self._queue.qsize())
        return batch

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        """False once the scheduler task has died (a bug); /healthz then fails."""
        return self._scheduler is None or not self._scheduler.done() or self.draining

    async def _schedule(self) -> None:
        while True:
            batch = await self._next_batch()
            live = []
            for job in batch:
                if job.cancelled.is_set():  # the client left while queued: no work at all
                    self.metrics.requests.labels("cancelled").inc()
                    job._finish(None, EngineFailedError("cancelled before it ran"))
                else:
                    live.append(job)
            try:
                if live:
                    await self._run_batch(live)
            except Exception:  # a bug in the bookkeeping must not stop the scheduler
                log.exception("scheduler error on a batch of %d", len(live))
                for job in live:
                    if not job.done.is_set():
                        job._finish(None, EngineFailedError("internal error in the scheduler"))

    def _generate(self, prepared: list[PreparedRequest], on_token) -> list[GenerationResult]:
        assert self.engine is not None
        return self.engine.generate(prepared, on_token=on_token)

    def _fail_one(self, job: Job, err: HestError) -> None:
        """One request of a batch failed on its own: its own input (a 4xx, e.g. a budget below
        its minimum) or its own step (a 500); its batch mates were served."""
        bad_input = isinstance(err, InvalidInputError)
        self.metrics.requests.labels("invalid" if bad_input else "error").inc()
        err.counted = True  # type: ignore[attr-defined]  # the error handler must not count it again
        if not bad_input:
            log.error("request %s failed in its batch: %s", job.id, err)
            err = EngineFailedError(
                f"the engine failed on this request ({err}); the server keeps serving, retry it"
            )
        job._finish(None, err)

    async def _run_batch(self, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for job in jobs:
            job.queue_s = start - job.arrived
        self._running, self._busy_since = jobs, start
        self.metrics.inflight.set(len(jobs))
        streams = [job.stream for job in jobs]
        on_token = None
        if any(q is not None for q in streams):

            def on_token(index: int, delta: str) -> None:  # engine thread
                q = streams[index]
                if q is not None:
                    loop.call_soon_threadsafe(q.put_nowait, delta)

        try:
            results = await loop.run_in_executor(
                self._worker, self._generate, [job.prepared for job in jobs], on_token
            )
            if len(results) != len(jobs):
                raise RuntimeError(f"engine returned {len(results)} results for {len(jobs)}")
        except Exception as err:  # one bad batch must not stop the server
            log.exception("engine failed on a batch of %d requests", len(jobs))
            for job in jobs:
                self.metrics.requests.labels("error").inc()
                job._finish(
                    None,
                    EngineFailedError(
                        f"the engine failed on this request's batch ({type(err).__name__}: {err}); "
                        "the server keeps serving, retry the request"
                    ),
                )
        else:
            served = []
            for job, result in zip(jobs, results, strict=True):
                if result.error is not None:  # this request failed on its own; the rest ran
                    self._fail_one(job, result.error)
                    continue
                job.co2e_g = co2e_g(result.stats, self.settings.grid_intensity_g_per_kwh)
                self.metrics.observe_result(
                    result.stats, result.finish_reason, job.queue_s, job.check_s, job.co2e_g
                )
                job._finish(result, None)
                served.append(result.stats)
            if served:
                self.metrics.observe_batch(served)
        finally:
            batch_s = time.perf_counter() - start
            self._batch_s.append(batch_s)
            log.debug("batch of %d in %.2f s", len(jobs), batch_s)
            self._running = []
            self.metrics.inflight.set(0)
            self.metrics.brownout_level.set(self.brownout_level())
