"""The controller's own work, in the calibration (the `ctrl` costs).

An engine whose paths a controller chooses (policy "hest") runs, in every layer of every
forward, the controller on each row's hidden state, the argmax over its path logits and each
request's guard fitting and committing that layer's choice (`runtime/generation.py`,
`_controller_decider`, or the native decider for a lone decode row). A fixed-path policy runs
none of it, and the unit, fixed and head costs are measured on forwards without it
(`calib_measure`, `calib_rows`). Left out, the model charged a HEST request less than it ran:
a 556-token prefill took 209 ms against fp16's 188 on the same fp16 units, and a decode step
~0.4 ms more than int4's on the same int4 units (session 17, Intel Xeon VM), so HEST's modelled /
estimate ratio sat ~10% below the fixed policies' (0.93 against 1.03 at 556 tokens).

This module serves the same requests on a controller engine and on a fixed-path engine on the
path the controller mostly ran, interleaved, with the meter around each, and reads what each
request was charged (its guard's ledger, the table without `ctrl`). In the table's joules
(k = the fixed engine's modelled over its measured, as `calib_host` rescales), the
controller's work is what the controller engine ran beyond its own model:
x = k measured - modelled.
- prefill: requests of `PROMPTS` tokens read whole with one new token; ctrl = the median of
  x / tokens over the points (per prompt token, through the origin);
- decode: m rows of a scheduler past their prefill (m in `calib_host.ROWS`), per step;
  x(m) fitted as a + b m through the one-row points (`calib_host.fit_host`): ctrl = b per row,
  ctrl_step = a per step.
The energy model charges them only where a controller chooses the paths (`model.EnergyModel`,
controlled=True).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from .. import paths as reg
from ..energy.meters import EstimateMeter, Meter
from ..energy.model import EnergyModel
from . import calib_host
from .request import GenerationRequest

PROMPTS = (128, 512)  # prompt tokens of the prefill points (about: whole words of TEXT)
REPEATS = 3


def without_ctrl(table):
    """`table` with its controller costs zeroed (what a measurement charges against)."""
    return replace(
        table,
        prefill=replace(table.prefill, ctrl=0.0, ctrl_step=0.0),
        decode=replace(table.decode, ctrl=0.0, ctrl_step=0.0),
    )


def _pick(xs: list[float], meter: Meter) -> float:
    """The least reading for the estimate meter (time: noise only adds), else the median."""
    return min(xs) if isinstance(meter, EstimateMeter) else statistics.median(xs)


def _prompt(engine, n: int) -> str:
    """Prose of about n tokens on `engine`'s tokenizer (calib_host.TEXT repeated, cut)."""
    tok = engine.tokenizer
    ids = tok(calib_host.TEXT * (1 + n // 60), add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids)


def _prefill(engine, meter: Meter, text: str) -> tuple[float, float, list[int], int]:
    """(measured J, modelled J, paths (P,) run, prompt tokens) of one request read whole with
    one new token."""
    req = GenerationRequest(
        text, energy_budget_ratio=1.0, max_new_tokens=1, clean_end=False, read="whole"
    )
    w = meter.begin()
    res = engine.generate([req])[0]
    r = meter.end(w)
    s = res.stats
    return r.energy_j, s.modelled_j, [s.paths[p] for p in engine.energy.paths], s.prompt_tokens


def _ledger(sts) -> tuple[float, list[int]]:
    """(joules charged so far, units run per path (P,)) of these requests together."""
    n = reg.n_paths()
    spent = sum(st.guard.spent_j for st in sts)
    return spent, [sum(c[i] for st in sts for c in st.layer_counts) for i in range(n)]


def _decode(engine, meter: Meter, m: int) -> tuple[float, float, list[int]]:
    """(measured J, modelled J per served decode step of m rows, paths (P,) run in the window),
    the window of least measured joules (the estimate meter) else the median one."""
    got, _ctx = calib_host.served_windows(engine, meter, m, _ledger)
    steps = calib_host.STEPS
    rows = sorted(
        (j, (b[0] - a[0]) / steps, [y - x for x, y in zip(a[1], b[1], strict=True)])
        for j, a, b in got
    )
    return rows[0] if isinstance(meter, EstimateMeter) else rows[len(rows) // 2]


def _point(mj: float, mod: float, fj: float, fmod: float, fixed: str) -> dict:
    """One measured point: the controller engine's measured and modelled joules (mj, mod), the
    fixed engine's (fj, fmod), and x_j = k mj - mod, the controller's work in the table's
    joules (k = fmod / fj: the table's scale against today's meter)."""
    k = fmod / fj if fj > 0 else 1.0
    return {
        "measured_j": mj,
        "modelled_j": mod,
        "fixed_measured_j": fj,
        "fixed_modelled_j": fmod,
        "fixed": fixed,
        "x_j": k * mj - mod,
    }


def _majority(counts: list[int]) -> int:
    return max(range(len(counts)), key=counts.__getitem__)


def measure_ctrl(
    controlled,
    fixed: dict,
    meter: Meter,
    rows: tuple[int, ...] = calib_host.ROWS,
    prompts: tuple[int, ...] = PROMPTS,
    repeats: int = REPEATS,
) -> dict:
    """The controller's work (module docstring): `controlled` is an engine whose controller
    chooses the paths, `fixed` maps a path's name to a fixed-path engine on it (the same model
    and table; built on demand by `fixed[name]` where it is a `FixedEngines`). Both engines'
    energy models must be built on the table without ctrl (`without_ctrl`). Returns the record:
    prefill_ctrl (J per prompt token), ctrl (J per row per decode step), ctrl_step (J per
    step), the points, method and date. Raises ValueError where `controlled` is a fixed-path
    engine."""
    if reg.find(controlled.policy) is not None:
        raise ValueError(f"calib_ctrl needs a controller engine, not policy {controlled.policy!r}")
    names = controlled.energy.paths
    pts: dict = {"prefill": [], "decode": {}}
    xs, ns = [], []
    for n in prompts:
        text = _prompt(controlled, n)
        for _ in range(repeats):  # interleaved: a drift hits both alike
            got = [_prefill(controlled, meter, text) for _ in range(2)]
            _, mod, counts, p = got[-1]
            mj = _pick([g[0] for g in got], meter)
            ref = fixed[names[_majority(counts)]]
            fgot = [_prefill(ref, meter, text) for _ in range(2)]
            fj, fmod = _pick([g[0] for g in fgot], meter), fgot[-1][1]
            point = _point(mj, mod, fj, fmod, names[_majority(counts)])
            pts["prefill"].append({"tokens": p, **point})
            xs.append(point["x_j"])
            ns.append(p)
    # per prompt token, the median over the points: one slow window moves a prefill by several
    # percent, which is the size of x itself (~12 ms on ~200 ms at 556 tokens)
    prefill_ctrl = max(0.0, statistics.median(x / n for x, n in zip(xs, ns, strict=True)))
    ms, hs = [], []
    for m in rows:
        for _ in range(repeats):
            mj, mod, counts = _decode(controlled, meter, m)
            name = names[_majority(counts)]
            fj, fmod, _ = _decode(fixed[name], meter, m)
            point = _point(mj, mod, fj, fmod, name)
            pts["decode"].setdefault(str(m), []).append(point)
            ms.append(m)
            hs.append(point["x_j"])
    a, b = calib_host.fit_host(ms, hs)
    return {
        "method": f"calib_ctrl: {controlled.policy} against fixed-path engines on its majority "
        f"path, prompts of {list(prompts)} tokens and decode steps of {list(rows)} rows, "
        f"{meter.name} meter, {repeats} interleaved each",
        "prefill_ctrl": prefill_ctrl,
        "ctrl": b,
        "ctrl_step": a,
        "points": pts,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_ctrl(table, record: dict) -> None:
    """Write a `measure_ctrl` record into `table` (in place): prefill.ctrl, decode.ctrl,
    decode.ctrl_step and kernels["controller"]."""
    table.prefill.ctrl = float(record["prefill_ctrl"])
    table.decode.ctrl = float(record["ctrl"])
    table.decode.ctrl_step = float(record["ctrl_step"])
    table.kernels["controller"] = record


class FixedEngines(dict):
    """Fixed-path engines built on first use: name -> Engine (`make(name)`)."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, name: str):
        self[name] = eng = self._make(name)
        return eng


def measure_into(
    path,
    model: str,
    meter: Meter,
    adapter: str = "default",
    device: str = "cpu",
    threads: int | None = None,
    say=None,
    write: bool = True,
    repeats: int = REPEATS,
) -> dict:
    """Load `model` with `adapter` (policy "hest") and fixed-path engines on the table at
    `path`, the table's controller costs left out, measure the controller's work with `meter`
    (`measure_ctrl`, `repeats` points per prompt length and row count) and write it into that
    table file (not with write=False). Returns the record. Raises CalibrationError where the
    table cannot be read."""

    def build(policy: str, ad):
        eng = calib_host.table_engine(path, model, policy, ad, device, threads)
        eng.energy = EnergyModel(without_ctrl(eng.energy.table))
        eng.warmup()
        return eng

    ctl = build("hest", adapter)
    rec = measure_ctrl(ctl, FixedEngines(lambda name: build(name, None)), meter, repeats=repeats)
    if write:
        calib_host.save_into(path, write_ctrl, rec)
    if say is not None:
        say(
            f"controller: {rec['prefill_ctrl'] * 1e3:.3g} mJ per prompt token, "
            f"{rec['ctrl'] * 1e3:.3g} mJ per row and {rec['ctrl_step'] * 1e3:.3g} mJ per decode "
            "step"
        )
    return rec


# ---- prefill rounds as a controller engine runs them ------------------------------------------------
# requests per measured round, of ROUND_TOKENS each (~172 with the chat template: up to ~2,750
# tokens, where a token stops getting cheaper; calib_round.ROUND_KS says what was measured)
ROUND_KS = (1, 2, 4, 8, 16)
ROUND_TOKENS = 128


def measure_round_ctrl(
    engine, meter: Meter, repeats: int = REPEATS, tokens: int = ROUND_TOKENS, ks=ROUND_KS
) -> dict:
    """How a prompt token's cost falls with its round on `engine` as served (its policy's
    controller and guards included): static batches of k requests of ~`tokens` prompt tokens
    each (read whole, one new token), k in `ks`, interleaved, the least reading of `repeats`
    (estimate meter) else the median, fitted as joules = a + b T over the rounds' T tokens
    (`calib_round.fit_round_tokens`) up to the round whose token costs least (the cap:
    `calib_round.cheapest`). A controller engine's round has more fixed work than the
    units alone (`calib_round`'s fp16 forwards): the controller, the argmax and each guard run
    once a layer per round, whatever its rows (session 19, 2-core Xeon: a lone 303-token HEST
    prompt at 0.58 ms a token, 16 in one round at 0.35). Returns {"round_tokens_ctrl": c,
    "round_cap_ctrl": the cap's T, "a_j", "b_j_per_token", "tokens": {k: T}, "joules": {k: J},
    "method", "date"}. Raises ValueError where the rounds do not grow with their tokens."""
    from ..energy.calib_round import cheapest, fit_round_tokens

    text = _prompt(engine, tokens)

    def batch(k: int) -> list[GenerationRequest]:
        return [
            GenerationRequest(
                text, energy_budget_ratio=1.0, max_new_tokens=1, clean_end=False, read="whole"
            )
            for _ in range(k)
        ]

    got: dict[int, list[float]] = {k: [] for k in ks}
    size: dict[int, int] = {}
    engine.generate(batch(1))  # warm
    for _ in range(repeats):
        for k in ks:
            w = meter.begin()
            res = engine.generate(batch(k))
            got[k].append(meter.end(w).energy_j)
            size[k] = sum(r.stats.prompt_tokens for r in res)
    js = {k: _pick(v, meter) for k, v in got.items()}
    ks = sorted(ks, key=size.__getitem__)
    n = cheapest([size[k] for k in ks], [js[k] for k in ks])
    c, a, b = fit_round_tokens([size[k] for k in ks[:n]], [js[k] for k in ks[:n]])
    return {
        "method": f"calib_ctrl.measure_round_ctrl: static batches of k requests of ~{tokens} "
        f"tokens (k in {list(ks)}) read whole with one new token on the {engine.info().get('policy')} "
        f"engine, {meter.name} meter, {'least' if isinstance(meter, EstimateMeter) else 'median'} "
        f"of {repeats}; joules = a + b tokens, round_tokens_ctrl = a / b",
        "round_tokens_ctrl": c,
        "round_cap_ctrl": size[ks[n - 1]],
        "a_j": a,
        "b_j_per_token": b,
        "tokens": {str(k): size[k] for k in ks},
        "joules": {str(k): js[k] for k in ks},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
