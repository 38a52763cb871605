"""Prefill rounds of several requests in the calibration: how a prompt token's cost falls as its
round grows.

The prefill unit costs price a prompt token as one request's forward runs it. A prefill round of
continuous batching, or a static batch, runs the chunks of several requests in one flat forward,
and a token there costs less than in a round of its own: every weight is read once per round,
every operator is dispatched once per layer, and the GEMMs run more rows per weight tile. On the
2-core Xeon (session 18) a lone HEST prompt of ~240 tokens ran at 0.45-0.48 ms a token and the same
prompts in rounds of 2-16 at 0.32-0.37, while the energy model charged both alike: a static batch
of 16 was modelled at 1.3-1.5x its estimate-meter prefill joules against 1.0 alone.

This times rounds of k requests of `ROUND_TOKENS` prompt tokens each, every unit on the reference
path (fp16), for k in `ROUND_KS` (interleaved, median of the repeats), and fits the round's time
as a line in its tokens T, t(T) = a + b T (least squares on the time per token, b + a / T, over
the rounds up to the one whose token costs least): a token of a round of T tokens costs
b (1 + c / T), c = a / b tokens, clamped at >= 0. Each request's attention is over its own prompt,
so it grows with T like the units and lands in b. The energy model (`EnergyModel.round_rebate_q`)
then gives a request that ran t of a round's T tokens back the part of its units' charge for that
round which a round of T saves over one of t:

    1 - (1 + c / T) / (1 + c / t)       (0 for T = t, < 1 always)

so a request alone pays what it paid before (the units as measured), and never more in a round.
T is capped at the round whose token cost least (`round_cap`, below): past it a token costs
more again, so the model does not extrapolate.
"""

from __future__ import annotations

import statistics
import time

import torch

from .. import paths as reg
from ..exec.kvcache import SeqSlot
from .calib_measure import measure
from .calib_split import _forward
from .meters import Meter

ROUND_TOKENS = 128  # prompt tokens of each request in a measured round
# requests per measured round: rounds of up to 2,048 tokens, what a static batch or a burst of
# short prompts runs. Measured on the 2-core Xeon (session 19, fp16, 128-token prompts): 0.52 /
# 0.38 / 0.27 / 0.27 / 0.26 ms a token at 1 / 2 / 4 / 8 / 16 prompts, and through the engine
# (`calib_ctrl.measure_round_ctrl`) still falling to ~2,800 tokens and rising again past ~5,000
# (activations outgrow the caches), so the model caps T at the largest round measured
# (`round_cap`) instead of extrapolating the line. (Session 18 measured 1-4 prompts only and saw
# 0.35 ms at 2,048 tokens once, on a slower host.)
ROUND_KS = (1, 2, 4, 8, 16)


def _round(lean, k: int, t: int, seed: int = 0):
    """A zero-argument callable: one prefill forward of k requests of t random tokens each (one
    cache row each, positions 0..t-1), every unit on the reference path, logits for each
    request's last token (what a round that ends the prompts computes)."""
    dev = lean.device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, lean.spec.vocab, (k * t,), generator=g).to(dev)
    pos = torch.arange(t, device=dev).repeat(k)
    slots = [SeqSlot(row0=i * t, n=t, cache_row=i, pos0=0) for i in range(k)]
    cache = lean.new_cache(k, t)
    paths = torch.full((k * t,), reg.ref(), dtype=torch.long, device=dev)
    last = torch.arange(t - 1, k * t, t, device=dev)
    return _forward(lean, ids, pos, slots, cache, paths, last)


def fit_round_tokens(tokens: list[int], joules: list[float]) -> tuple[float, float, float]:
    """The line joules = a + b tokens through the rounds' points (>= 2 distinct token counts),
    fitted as each point's joules per token, J / T = b + a / T, by least squares (every round
    weighs alike: on joules themselves the largest round would set the line); returns (c = a / b
    clamped at >= 0, a, b). Raises ValueError for fewer than two distinct token counts or a
    slope <= 0 (no per-token cost: nothing to fit)."""
    if len(set(tokens)) < 2:
        raise ValueError(f"need rounds of at least two sizes, got token counts {tokens}")
    xs = [1.0 / t for t in tokens]
    ys = [j / t for t, j in zip(tokens, joules, strict=True)]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    b = my - a * mx
    if b <= 0:
        raise ValueError(f"round joules do not grow with its tokens (slope {b:.3g} J/token)")
    return max(0.0, a / b), a, b


def cheapest(tokens: list[int], joules: list[float]) -> int:
    """How many of the rounds (sorted by tokens) to fit: up to and including the one whose
    token costs least (past it a token costs more again: the cap), at least two."""
    per = [j / t for t, j in zip(tokens, joules, strict=True)]
    return max(2, per.index(min(per)) + 1)


def measure_round(
    lean,
    meter: Meter,
    repeats: int = 3,
    tokens: int = ROUND_TOKENS,
    ks: tuple[int, ...] = ROUND_KS,
) -> dict:
    """Time prefill rounds of k requests of `tokens` tokens each for k in `ks` (module
    docstring); returns the record: round_tokens (c, tokens), round_cap (the largest round's
    tokens), the fit's a (J) and b (J/token), the medians per k, the method and date. `tokens` is capped at the model's positions; k at
    the rows a cache may hold."""
    t = min(tokens, lean.rope_cos.shape[0])
    ks = tuple(k for k in ks if k >= 1)
    runs = {k: _round(lean, k, t, seed=k) for k in ks}
    js: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(repeats):  # interleaved, so a drift of the host hits every k alike
        for k in ks:
            js[k].append(measure(runs[k], meter, lean.device)[1])
    med = {k: statistics.median(v) for k, v in js.items()}
    xs = [k * t for k in ks]
    n = cheapest(xs, [med[k] for k in ks])
    c, a, b = fit_round_tokens(xs[:n], [med[k] for k in ks[:n]])
    return {
        "method": f"calib_round: prefill rounds of k requests of {t} tokens (k in {list(ks)}), "
        f"every unit on {reg.get(reg.ref()).name}, {meter.name} meter, median of {repeats}; "
        "joules = a + b tokens, round_tokens = a / b",
        "round_tokens": c,
        "round_cap": xs[n - 1],
        "a_j": a,
        "b_j_per_token": b,
        "tokens_per_request": t,
        "round_j": {str(k): med[k] for k in ks},
        "ms_per_token": {str(k): 1e3 * med[k] / meter.watts / (k * t) for k in ks}
        if getattr(meter, "watts", None)
        else {},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_round(table, record: dict, ctrl: bool = False) -> None:
    """Write a `measure_round` record into `table` (in place): prefill.round_tokens,
    prefill.round_cap and kernels["prefill_round"]; with ctrl, a
    `calib_ctrl.measure_round_ctrl` record: round_tokens_ctrl, round_cap_ctrl and
    kernels["prefill_round_ctrl"]."""
    end = "_ctrl" if ctrl else ""
    setattr(table.prefill, "round_tokens" + end, float(record["round_tokens" + end]))
    setattr(table.prefill, "round_cap" + end, int(record["round_cap" + end]))
    table.kernels["prefill_round" + end] = record
