"""Serving logic: validation, the bounded queue, continuous batching, brownout and drain.

The runtime's scheduler (`hest_core.runtime.scheduler.Scheduler`) runs in ONE engine thread
(`serve_forever`) and works per iteration: between decode steps, requests that ended leave and
waiting ones join, their prompts prefilled in chunks between the running requests' decode steps.
One asyncio task here feeds it: it takes a request from the bounded queue whenever fewer than
`max_batch_size` run (on an idle server it first waits up to `max_wait_ms` for others, so a burst
shares its first prefill round), so requests beyond that wait in the queue, which is what 429s
when full. Streamed text pieces and each result come back from the engine thread through
`loop.call_soon_threadsafe`. A request whose client went away has its `cancelled` Event set:
dropped if still queued, stopped at its next step if running.

Brownout answers overload, not slowness. The server keeps the service times (admitted to done)
of the last `SERVICE_WINDOW` requests; their median is the typical request time (one outlier, a
stall or a long summary, does not move a median). A new request's *wait* is the time before a
row is free for it: when every row is taken, what is left of the oldest running request, plus a
typical request time for every `max_batch_size` requests queued ahead of it. On a server with a
free row and an empty queue the wait is 0 and there is no brownout, however slow the last
request was. The SLO leaves `slack = SLO - typical request time` for waiting; past
`brownout_start` x slack the level rises linearly to 1 at the whole slack, and each new budget
ratio r becomes r - level x (r - floor): lower budgets mean more int8 units and earlier stops,
i.e. rows freed sooner. Only when the queue is full is a request refused (429).
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
    Scheduler,
)

from .exceptions import EngineFailedError, NotReadyError, QueueFullError, ShuttingDownError
from .metrics import Metrics, co2e_g
from .settings import Settings

log = logging.getLogger("hest.server")

_DONE = None  # end-of-stream marker in a job's delta queue
SERVICE_WINDOW = 16  # recent service times whose median is the typical request time


# ---- one request in flight ----------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    prepared: PreparedRequest
    cancelled: threading.Event
    arrived: float  # time.perf_counter() when it was queued
    brownout: bool
    stream: asyncio.Queue[str | None] | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    queue_s: float = 0.0  # queued until the runtime took it
    started: float = 0.0  # time.perf_counter() when the runtime took it
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
        self._running: list[Job] = []  # handed to the runtime, not finished
        self._jobs: weakref.WeakSet[Job] = weakref.WeakSet()  # every accepted, referenced job
        self._service_s: deque[float] = deque(maxlen=SERVICE_WINDOW)  # recent service times
        self._sched: Scheduler | None = None
        self._engine_loop: asyncio.Future | None = None
        self._room = asyncio.Event()  # set whenever a running request finishes
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
        self._sched = engine.scheduler(
            max_rows=self.settings.max_batch_size,
            static=self.settings.batching == "static",
            prefill_tokens=self.settings.prefill_tokens or None,
            decode_steps_per_chunk=self.settings.decode_steps_per_chunk,
        )
        self._engine_loop = loop.run_in_executor(
            self._worker, self._sched.serve_forever, self.metrics.batch_size.observe
        )
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
        if self._sched is not None:
            self._sched.stop()  # the engine loop ends after its current step
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._engine_loop), 30)
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
    def typical_request_s(self) -> float | None:
        """Median service time (admitted to done) of the last SERVICE_WINDOW requests (None
        before the first)."""
        return statistics.median(self._service_s) if self._service_s else None

    def predicted_wait_s(self) -> float:
        """Seconds a request arriving now waits for a row: when every row is taken, what is left
        of the oldest running request, then one typical request time per `max_batch_size`
        requests queued ahead of it. 0 while a row is free and nothing is queued."""
        typical = self.typical_request_s()
        rows = self.settings.max_batch_size
        full = len(self._running) >= rows
        if typical is None or (not full and self._queue.empty()):
            return 0.0
        left = 0.0
        if full:
            oldest = min(job.started for job in self._running)
            left = max(0.0, typical - (time.perf_counter() - oldest))
        return left + (self._queue.qsize() // rows) * typical

    def predicted_latency_s(self) -> float:
        """A request arriving now: its wait plus one typical request (0 before the first)."""
        typical = self.typical_request_s()
        return 0.0 if typical is None else self.predicted_wait_s() + typical

    def brownout_level(self) -> float:
        """0..1: how far the predicted wait has eaten into the slack the SLO leaves for waiting
        (SLO minus a typical request). 0 whenever nothing would wait."""
        if not self._guarded:
            return 0.0
        wait = self.predicted_wait_s()
        if wait <= 0.0:
            return 0.0
        s = self.settings
        slack = s.slo_s - (self.typical_request_s() or 0.0)
        if slack <= 0.0:
            return 1.0  # a request alone takes the whole SLO: any wait breaks it
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

    # ---- feeding the runtime's scheduler ----------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        """False once the feeding task or the engine loop has died (a bug); /healthz then fails."""
        dead = [t for t in (self._scheduler, self._engine_loop) if t is not None and t.done()]
        return not dead or self.draining

    async def _schedule(self) -> None:
        """Hand queued requests to the runtime while rows are free."""
        loop, rows = asyncio.get_running_loop(), self.settings.max_batch_size
        while True:
            while len(self._running) >= rows:
                self._room.clear()
                await self._room.wait()
            group = [await self._queue.get()]
            if not self._running:  # idle: let a burst share its first prefill round
                deadline = loop.time() + self.settings.max_wait_ms / 1000
                while len(group) < rows and (remaining := deadline - loop.time()) > 0:
                    try:
                        group.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except TimeoutError:
                        break
            self.metrics.queue_depth.set(self._queue.qsize())
            for job in group:
                try:
                    self._admit(job)
                except Exception:  # a bug in the bookkeeping must not stop the scheduler
                    log.exception("could not hand request %s to the runtime", job.id)
                    if not job.done.is_set():
                        job._finish(None, EngineFailedError("internal error in the scheduler"))

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():  # the client left while queued: no work at all
            self.metrics.requests.labels("cancelled").inc()
            job._finish(None, EngineFailedError("cancelled before it ran"))
            return
        assert self._sched is not None
        loop = asyncio.get_running_loop()
        job.started = time.perf_counter()
        job.queue_s = job.started - job.arrived
        on_token = None
        if job.stream is not None:
            q = job.stream

            def on_token(delta) -> None:  # engine thread
                loop.call_soon_threadsafe(q.put_nowait, delta)

        def on_done(result: GenerationResult) -> None:  # engine thread
            loop.call_soon_threadsafe(self._complete, job, result)

        self._sched.submit(job.prepared, on_token, on_done)  # on_done runs after this returns
        self._running.append(job)
        self.metrics.inflight.set(len(self._running))

    def _fail_one(self, job: Job, err: HestError) -> None:
        """One request failed on its own: its own input (a 4xx, e.g. a budget below its minimum)
        or its own step or forward (a 500); the other running requests were served."""
        bad_input = isinstance(err, InvalidInputError)
        self.metrics.requests.labels("invalid" if bad_input else "error").inc()
        err.counted = True  # type: ignore[attr-defined]  # the error handler must not count it again
        if not bad_input:
            log.error("request %s failed in the engine: %s", job.id, err)
            err = EngineFailedError(
                f"the engine failed on this request ({err}); the server keeps serving, retry it"
            )
        job._finish(None, err)

    def _complete(self, job: Job, result: GenerationResult) -> None:
        """The runtime ended a request (event loop thread): metrics, the answer, a free row."""
        with contextlib.suppress(ValueError):
            self._running.remove(job)
        if job.done.is_set():  # answered already (a drain that timed out)
            self._room.set()
            return
        self._service_s.append(time.perf_counter() - job.started)
        try:
            if result.error is not None:  # this request failed on its own; the rest ran
                self._fail_one(job, result.error)
            else:
                job.co2e_g = co2e_g(result.stats, self.settings.grid_intensity_g_per_kwh)
                self.metrics.observe_result(
                    result.stats, result.finish_reason, job.queue_s, job.check_s, job.co2e_g
                )
                self.metrics.observe_energy_ratio(result.stats)
                job._finish(result, None)
        finally:
            if not job.done.is_set():
                job._finish(None, EngineFailedError("internal error in the scheduler"))
            self.metrics.inflight.set(len(self._running))
            self.metrics.brownout_level.set(self.brownout_level())
            self._room.set()
