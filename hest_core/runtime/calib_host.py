"""The serving loop's own work in a decode step, in the calibration (the `host` costs).

The unit, fixed and head costs are measured on bare forward passes (`calib_measure`,
`calib_rows`). A served decode step does more: the scheduler arranges the rows and builds the
step's decisions, every request's guard commits each layer's paths, each row's next token is
chosen, its text decoded, streamed and checked for a clean ending (`runtime/scheduler.py`,
`runtime/generation.py`). That work runs on the same cores for as long as it takes, so it is
work the request costs. Left out, a model of the forward alone fell short of the estimate meter
by ~1.1 ms a step on every path (session 16, Intel Xeon VM: fp16 12.2 ms a step against 11.1
modelled, int4 6.2 against 5.1), which is 9% of an fp16 step and 18% of an int4 one, so the
modelled / estimate ratio of a whole request fell with its share of decode.

This module serves real decode steps of m rows through `Engine.scheduler` (a fixed-path
engine: every unit on its policy's path) and times bare forward steps of the same m rows on
the same path at the same context (`calib_rows.step_j`), interleaved; the difference is the
loop's work, h(m) = (loop(m) - forward(m)) k, for each m in `ROWS`, where k = the table's
modelled bare step over the one measured now puts it in the table's joules (a packaged table may
come from a faster or slower day; `calib_split` rescales the same way). `fit_host` fits
h(m) = a + b m through the one-row points: `host` = b, joules per row per step, and `host_step`
= a, joules per step shared by its rows (both >= 0). The energy model
charges them with each decode step's fixed work (`model.EnergyModel`).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import replace

from .. import paths as reg
from ..energy import calib_rows
from ..energy.meters import EstimateMeter, Meter
from ..energy.model import EnergyModel
from .request import GenerationRequest

ROWS = (1, 4, 16)  # rows per decode step served
STEPS = 6  # decode steps per timed window
WINDOWS = 5  # windows per m (the least for the estimate meter, else the median)
# a prompt of ordinary prose; the instruction asks for more text than the steps need, and
# requests that end early (an end-of-text token) are replaced before their window counts
TEXT = (
    "The river rose through the night and by morning the old bridge was closed to traffic. "
    "Engineers walked its length at dawn, measuring the cracks that had opened in the stone, "
    "while the town's two ferries carried commuters across in a steady line. "
) * 3
INSTRUCTION = "Continue this report with a long, detailed account of the following week."


def fit_host(ms: list[int], hs: list[float]) -> tuple[float, float]:
    """(host_step a, host b) of h(m) = a + b m through the mean of the one-row points h1 (a + b
    = h1: a lone request, the common case, is charged what it was measured to cost), b fitted
    by least squares to the other points: b = sum (m - 1)(h - h1) / sum (m - 1)^2, the way
    `calib_rows.through_one` fits the decode shares. Both >= 0: b < 0 gives b = 0, a = h1;
    a < 0 gives a = 0, b = h1; h1 < 0 (noise) gives (0, 0). Without a one-row point: a = 0
    and b the mean of h / m. Joules."""
    one = [h for m, h in zip(ms, hs, strict=True) if m == 1]
    if not one:
        return 0.0, max(0.0, statistics.fmean(h / m for m, h in zip(ms, hs, strict=True)))
    h1 = statistics.fmean(one)
    if h1 <= 0:
        return 0.0, 0.0
    den = sum((m - 1) ** 2 for m in ms)
    b = sum((m - 1) * (h - h1) for m, h in zip(ms, hs, strict=True)) / den if den else 0.0
    b = min(max(b, 0.0), h1)
    return h1 - b, b


def _batch(engine, m: int, max_new: int):
    """A scheduler holding m requests past their prefill (every row decoding), and the event
    that cancels them."""
    sch, cancel = engine.scheduler(max_rows=m), threading.Event()
    for _ in range(m):
        req = GenerationRequest(
            TEXT,
            energy_budget_ratio=4.0,
            max_new_tokens=max_new,
            cancelled=cancel,
            clean_end=False,
            instruction=INSTRUCTION,
        )
        sch.submit(engine.check(req), None, lambda r: None)
    sch.step()  # admit and prefill all m, and their first decode step
    return sch, cancel


def served_windows(engine, meter: Meter, m: int, probe=None) -> tuple[list[tuple], int]:
    """WINDOWS windows of STEPS served decode steps of m rows each, every row decoding
    throughout (a batch in which a request ended early is replaced, 4 tries): per window
    (joules per step, probe(states) before it, probe(states) after it; None without a probe),
    and the context of the middle step. Raises RuntimeError where no batch held m rows."""
    steps = 3 + WINDOWS * STEPS
    for _attempt in range(4):
        sch, cancel = _batch(engine, m, steps + 4)
        p0 = max(len(t.req.ids) for t in sch._active) if sch._active else 0
        for _ in range(3):  # warm the step
            sch.step()
        got, ok = [], True
        for _ in range(WINDOWS):
            sts = [t.st for t in sch._active]
            before = probe(sts) if probe is not None else None
            w = meter.begin()
            rows = [sch.step() for _ in range(STEPS)]
            r = meter.end(w)
            if any(n != m for n in rows):  # a request ended: its rows left the step
                ok = False
                break
            after = probe(sts) if probe is not None else None
            got.append((r.energy_j / STEPS, before, after))
        cancel.set()  # the rest of the batch ends at its next step
        sch.run_until_idle()
        if ok and got:
            return got, p0 + 4 + (WINDOWS * STEPS) // 2
    raise RuntimeError(f"calib_host: no {m}-row window without a request ending early")


def _loop_j(engine, meter: Meter, m: int) -> tuple[float, int]:
    """(joules per served decode step of m rows, the context of the middle step)."""
    got, ctx = served_windows(engine, meter, m)
    js = [g[0] for g in got]
    pick = min(js) if isinstance(meter, EstimateMeter) else statistics.median(js)
    return pick, ctx


def measure_host(engine, meter: Meter, rows: tuple[int, ...] = ROWS, repeats: int = 3) -> dict:
    """The serving loop's work per decode step (module docstring) on `engine` (a fixed-path
    policy: its path runs every unit). Returns the record: host (J per row per step),
    host_step (J per step), the measured points, method and date. Raises ValueError for an
    engine whose policy is not one path."""
    path = reg.find(engine.policy)
    if path is None:
        raise ValueError(f"calib_host needs a fixed-path engine, not policy {engine.policy!r}")
    base = EnergyModel(
        replace(
            engine.energy.table, decode=replace(engine.energy.table.decode, host=0.0, host_step=0.0)
        )
    )
    L = engine.lean.spec.n_layers
    ms, hs, points = [], [], {}
    for m in rows:
        for _ in range(repeats):  # interleaved: a drift hits both alike
            loop, ctx = _loop_j(engine, meter, m)
            fwd = calib_rows.step_j(engine.lean, meter, m, ctx, path)
            # in the table's own joules: its modelled bare step over the one measured now
            modelled = base.decode_step_j([ctx] * m, [[path] * L] * m)
            scale = modelled / fwd if fwd > 0 else 1.0
            ms.append(m)
            hs.append((loop - fwd) * scale)
            points.setdefault(str(m), []).append(
                {"loop_j": loop, "forward_j": fwd, "ctx": ctx, "scale": scale}
            )
    a, b = fit_host(ms, hs)
    return {
        "method": f"calib_host: served decode steps of {list(rows)} rows on {engine.policy} "
        f"against bare forward steps, {meter.name} meter, {repeats} interleaved each",
        "host": b,
        "host_step": a,
        "points": points,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_host(table, record: dict) -> None:
    """Write a `measure_host` record into `table` (in place): decode.host, decode.host_step and
    kernels["decode_host"]."""
    table.decode.host = float(record["host"])
    table.decode.host_step = float(record["host_step"])
    table.kernels["decode_host"] = record


def measure_into(
    path,
    model: str,
    meter: Meter,
    device: str = "cpu",
    threads: int | None = None,
    say=None,
    write: bool = True,
) -> dict:
    """Load `model` as an engine on the table at `path` (the fixed fp16 policy, the registered
    paths, no adapter), measure its serving loop with `meter` (`measure_host`) and write it
    into that table file (not with write=False). Returns the record. Raises CalibrationError
    where the table cannot be read."""
    eng = table_engine(path, model, reg.REFERENCE, None, device, threads)
    eng.warmup()
    rec = measure_host(eng, meter)
    if write:
        save_into(path, write_host, rec)
    if say is not None:
        say(
            f"serving loop: {rec['host'] * 1e3:.3g} mJ per row and {rec['host_step'] * 1e3:.3g} "
            "mJ per step beyond the forward, per decode step"
        )
    return rec


def table_engine(path, model: str, policy: str, adapter, device: str, threads: int | None):
    """`model` as an engine on the table file at `path` (the registered paths, no progress
    bars): what the measurements of this module and `calib_ctrl` run on. Raises
    CalibrationError where the table cannot be read."""
    from .engine import Engine

    return Engine.from_pretrained(
        model,
        adapter=adapter,
        device=device,
        policy=policy,
        calibration=path,
        progress=False,
        threads=threads,
        paths=reg.names(),
    )


def save_into(path, write, record: dict) -> None:
    """Load the table file at `path`, `write(table, record)` into it, and save it."""
    from ..energy.model import CalibrationTable

    table = CalibrationTable.load(path)
    write(table, record)
    table.save(path)
