"""Where batched energy stands against the meter (issue 15): whole static batches split by phase,
and whole decode steps of 1-16 rows against the table's model.

    python tools/batched_energy.py split [--rows 1,4,8,16] [--repeats 4] [--ratio 1.0]
        [--max-new-tokens 48]
    python tools/batched_energy.py steps [--rows 1,2,...,16]

`split`: the served engine (the default adapter on its packaged table), static batches of CNN/DM
training articles 200-215 through `Engine.generate`, every batch size in turn per repeat (a drift
of the host's speed hits them alike); every prefill round and decode step is timed, so each
request's modelled prefill_j and decode_j are set against the wall time of the forwards of that
phase x the estimate meter's watts. Prints, per batch size, the medians of modelled / estimate
(whole run) and of modelled J / (forward seconds x W) per phase, each also relative to one
request's. `steps`: whole decode steps of m rows with every unit on one path
(`calib_rows.step_j`, the calibration's context), each in one-row steps, beside what the
table's model says for the same steps (`EnergyModel.decode_step_j`). Both time the machine:
run nothing else beside them. The engine is built and run in one worker thread (docs/runtime.md:
OpenMP's thread team belongs to the thread that starts it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from closed_loop_inproc import _timed_forwards  # noqa: E402  (tools/, this script's directory)

from hest_core import Engine, GenerationRequest  # noqa: E402
from hest_core import paths as reg  # noqa: E402
from hest_core.energy.calibrate import PACKAGED  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnndm" / "train.jsonl"


def split(a) -> None:
    arts = [json.loads(line)["article"] for line in a.data.read_text().splitlines()[200:216]]
    log: list[tuple[str, int, float]] = []  # (phase, tokens or rows, seconds) of every forward
    _timed_forwards(log)
    e = Engine.from_pretrained(progress=False, calibration=PACKAGED, threads=a.threads)
    e.warmup()
    watts = e._nominal_watts()

    def once(rows: int) -> tuple[float, float, float]:
        reqs = [
            GenerationRequest(
                arts[i % len(arts)],
                energy_budget_ratio=a.ratio,
                max_new_tokens=a.max_new_tokens,
                clean_end=False,
            )
            for i in range(rows)
        ]
        log.clear()
        res = e.generate(reqs)
        pj = sum(r.stats.prefill_j for r in res)
        dj = sum(r.stats.decode_j for r in res)
        est = sum(r.stats.estimated_j for r in res)
        ps = sum(s for k, _, s in log if k == "p")
        ds = sum(s for k, _, s in log if k == "d")
        return (pj + dj) / est, pj / (ps * watts), dj / (ds * watts)

    once(1)  # warm
    got: dict[int, list[tuple[float, float, float]]] = {m: [] for m in a.rows}
    for _ in range(a.repeats):
        for m in got:
            got[m].append(once(m))
    base = None
    print(f"static batches, r = {a.ratio}, {a.max_new_tokens} new tokens, medians of {a.repeats}")
    for m, v in got.items():
        med = [statistics.median(x[i] for x in v) for i in range(3)]
        base = base or med
        print(
            f"rows {m:2d}: modelled / estimate {med[0]:.3f} (relative {med[0] / base[0]:.3f}) | "
            f"prefill {med[1]:.3f} ({med[1] / base[1]:.3f}) | decode {med[2]:.3f} "
            f"({med[2] / base[2]:.3f})"
        )


def steps(a) -> None:
    from hest_core.energy import calib_rows
    from hest_core.energy.calibrate import DECODE_CTX
    from hest_core.energy.meters import EstimateMeter

    e = Engine.from_pretrained(progress=False, calibration=PACKAGED, threads=a.threads)
    e.warmup()
    meter, lean, em = EstimateMeter(e._nominal_watts()), e.lean, e.energy
    L, P = lean.spec.n_layers, reg.n_paths()
    ctx = min(DECODE_CTX, lean.rope_cos.shape[0] - 1)
    one = [em.decode_step_j([ctx], [[p] * L]) for p in range(P)]
    first: list[float] = []
    print(f"whole decode steps in one-row steps, measured / modelled; paths {reg.names()}")
    for m in a.rows:
        cache = calib_rows.noisy_cache(lean, m, ctx)
        js = [calib_rows.step_j(lean, meter, m, ctx, p, cache) for p in range(P)]
        first = first or js
        model = [em.decode_step_j([ctx] * m, [[p] * L] * m) / one[p] for p in range(P)]
        print(
            f"{m:2d} rows: "
            + ", ".join(
                f"{n} {j / f:.2f} / {mo:.2f}"
                for n, j, f, mo in zip(reg.names(), js, first, model, strict=True)
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("split", "steps"))
    ap.add_argument("--rows", default=None, help="batch sizes (split: 1,4,8,16; steps: 1..16)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=1.0, help="energy budget ratio (split)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=DATA, help="JSONL with an 'article' field")
    a = ap.parse_args()
    default = "1,4,8,16" if a.what == "split" else ",".join(map(str, range(1, 17)))
    a.rows = [int(v) for v in (a.rows or default).split(",")]
    if a.rows[0] != 1:
        ap.error("--rows must start at 1 (every figure is relative to one row)")
    run = split if a.what == "split" else steps
    with ThreadPoolExecutor(1, thread_name_prefix="engine") as worker:
        worker.submit(run, a).result()


if __name__ == "__main__":
    main()
