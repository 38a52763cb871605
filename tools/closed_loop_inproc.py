"""An in-process closed loop over `Engine.scheduler`: where a served engine's time goes under load,
without HTTP (issue 15).

    python tools/closed_loop_inproc.py [--clients 16] [--requests 64] [--mode continuous|static]
        [--ratio 0.6] [--max-new-tokens 64] [--prefill-tokens N] [--data PATH] [--ceiling]

C client threads each submit a request (a CNN/DM training article, budget ratio r, max new
tokens) as soon as their last one ended, `requests` in all after the first C (the opening burst,
not counted). Prints requests/s, TTFT, the longest gap between a request's tokens and end-to-end
latency (p50 / p99), then every prefill round (its prompt tokens, ms per token) and decode step
(its rows, median ms per row count) the engine ran. The default engine (the shipped adapter, its
table), 2 threads. Timings are only as quiet as the machine: run nothing else beside it.

`--ceiling` then times one prefill round of 16 of the prompts together (the cheapest price per
prompt token the runtime has: static batching's shared round) and prints a ceiling, the
requests/s a schedule of these forwards would reach at best at C clients: every prompt at that
price and every generated token in a full step of min(C, 16) rows at this run's median step
time, nothing else between forwards. It needs the run's steps of that many rows (continuous
batching at C clients has them; a static run mostly runs fewer) and is an estimate from this
run's timings, not a proof: prompts of other lengths price their rounds a little differently.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hest_core import Engine, GenerationRequest
from hest_core.runtime import scheduler as sched_mod

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnndm" / "train.jsonl"


def _pct(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]


def _timed_forwards(log: list[tuple[str, int, float]]) -> None:
    """Record every prefill round (prompt tokens) and decode step (rows) with its seconds."""
    pre, dec = sched_mod.Scheduler._prefill_round, sched_mod.Scheduler._decode_step

    def prefill_round(self):
        n = sum(len(t.req.ids) - t.pos for t in self._prefilling)
        t0 = time.perf_counter()
        pre(self)
        log.append(("p", n, time.perf_counter() - t0))

    def decode_step(self):
        t0 = time.perf_counter()
        rows = dec(self)
        log.append(("d", rows, time.perf_counter() - t0))
        return rows

    sched_mod.Scheduler._prefill_round, sched_mod.Scheduler._decode_step = (
        prefill_round,
        decode_step,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64, help="counted, after the first C")
    ap.add_argument("--mode", choices=("continuous", "static"), default="continuous")
    ap.add_argument("--ratio", type=float, default=0.6, help="energy budget ratio")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=None, help="the round's token budget")
    ap.add_argument("--data", type=Path, default=DATA, help="JSONL with an 'article' field")
    ap.add_argument("--ceiling", action="store_true", help="also print the requests/s ceiling")
    a = ap.parse_args()
    arts = [json.loads(line)["article"] for line in a.data.read_text().splitlines()][100:400]
    # the engine is built, warmed and served from one thread, as the server does (its worker):
    # OpenMP's thread team belongs to the thread that starts it, and a second team beside the
    # first one's spinning workers oversubscribes the cores (here: decode steps 5x slower)
    worker = ThreadPoolExecutor(1, thread_name_prefix="engine")
    eng = worker.submit(lambda: Engine.from_pretrained(threads=2, progress=False)).result()
    worker.submit(eng.warmup).result()
    log: list[tuple[str, int, float]] = []
    _timed_forwards(log)
    kw = {} if a.prefill_tokens is None else {"prefill_tokens": a.prefill_tokens}
    s = eng.scheduler(max_rows=16, static=a.mode == "static", **kw)
    loop = worker.submit(s.serve_forever)
    lock, nxt, recs = threading.Lock(), [0], []
    counted: list[tuple[int, int]] = []  # (prompt, completion tokens) of counted requests
    C = a.clients

    def client() -> None:
        while True:
            with lock:
                k = nxt[0]
                nxt[0] += 1
            if k >= a.requests + C:
                return
            req = eng.check(GenerationRequest(arts[k % len(arts)], None, a.ratio, a.max_new_tokens))
            t0, toks, done, res = time.perf_counter(), [], threading.Event(), []
            s.submit(
                req,
                lambda *_, toks=toks: toks.append(time.perf_counter()),
                lambda r, done=done, res=res: (res.append(r), done.set()),
            )
            done.wait()
            t1 = time.perf_counter()
            if k >= C:  # the opening burst is not counted
                gap = max((b - x for x, b in zip(toks, toks[1:], strict=False)), default=0.0)
                with lock:
                    recs.append((t0, t1, (toks[0] if toks else t1) - t0, gap, t1 - t0))
                    u = res[0].stats
                    counted.append((u.prompt_tokens, u.completion_tokens))

    threads = [threading.Thread(target=client) for _ in range(C)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.stop()
    loop.result()
    run_log = list(log)  # the run's forwards (the ceiling's round is timed into `log` after)
    shared = worker.submit(_shared_round_ms, eng, arts, a, log).result() if a.ceiling else None
    worker.shutdown()
    span = max(r[1] for r in recs) - min(r[0] for r in recs)
    ttft, gap, e2e = ([r[i] for r in recs] for i in (2, 3, 4))
    print(
        f"{a.mode} clients={C} requests={len(recs)} requests/s={len(recs) / span:.2f} | TTFT p50 "
        f"{_pct(ttft, 0.5):.2f} p99 {_pct(ttft, 0.99):.2f} s | longest gap p50 {_pct(gap, 0.5):.2f} "
        f"p99 {_pct(gap, 0.99):.2f} s | end to end p50 {_pct(e2e, 0.5):.2f} p99 {_pct(e2e, 0.99):.2f} s"
    )
    p = [x for x in run_log if x[0] == "p" and x[1] > 0]
    d = [x for x in run_log if x[0] == "d" and x[1] > 0]
    if p:
        toks = sum(x[1] for x in p)
        print(
            f"prefill rounds {len(p)}: prompt tokens a round median {statistics.median(x[1] for x in p)}, "
            f"{sum(x[2] for x in p):.1f} s, {1e3 * sum(x[2] for x in p) / toks:.3f} ms a token"
        )
    if d:
        by: dict[int, list[float]] = {}
        for _, m, sec in d:
            by.setdefault(m, []).append(sec)
        per = {
            m: round(1e3 * statistics.median(v), 1) for m, v in sorted(by.items()) if len(v) >= 3
        }
        print(
            f"decode steps {len(d)}: rows median {statistics.median(x[1] for x in d)}, "
            f"{sum(x[2] for x in d):.1f} s; median ms by rows {per}"
        )
    if shared is not None and d:
        _print_ceiling(C, counted, shared, d)


def _shared_round_ms(eng, arts: list[str], a, log: list) -> float:
    """ms a prompt token in one prefill round of 16 of the run's prompts (least of 3 rounds)."""
    best = float("inf")
    for _ in range(3):
        log.clear()
        reqs = [GenerationRequest(arts[i], None, a.ratio, 1) for i in range(16)]
        eng.generate(reqs)
        for kind, n, sec in log:
            if kind == "p" and n > 0:
                best = min(best, 1e3 * sec / n)
    return best


def _print_ceiling(C: int, counted, shared_ms: float, d) -> None:
    """The ceiling of requests/s at C clients (the module's doc says what it assumes)."""
    m = min(C, 16)
    steps = [sec for _, rows, sec in d if rows == m]
    if len(steps) < 3:
        print(f"ceiling: fewer than 3 steps of {m} rows in this run; not computed")
        return
    step_ms = 1e3 * statistics.median(steps)
    prompt = statistics.mean(x[0] for x in counted)
    gen = statistics.mean(x[1] for x in counted)
    per_req = prompt * shared_ms + gen * step_ms / m  # ms of forwards a request, at best
    print(
        f"ceiling at {C} clients: {1e3 / per_req:.2f} requests/s = 1 / ({prompt:.0f} prompt tokens "
        f"x {shared_ms:.3f} ms (one round of 16 prompts) + {gen:.1f} tokens x {step_ms:.1f} ms / "
        f"{m} rows)"
    )


if __name__ == "__main__":
    main()
