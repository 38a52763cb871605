"""The prefill attention-over-context term, measured out to long prompts and fitted (issue 16).

The energy model charges a prompt of p tokens `attn_ctx * p (p + 1) / 2` joules of attention
(all layers; `model.EnergyModel.prefill_fixed`). The calibration's first estimate of `attn_ctx`
times one causal attention of `PREFILL_T` tokens (`calib_measure._phase`), which says little
about a 4k-token prompt: there the runtime prefills in chunks, each attending to the cache before
it, and the cost per attended position differs (session 12: the 256-token constant modelled a
4k-token fp16 prefill 1.3x the estimate meter).

Here, for each prompt length L, one layer's attention is timed the way the runtime runs it for
the whole prompt (`LeanModel._attend` in the scheduler's chunks: whole up to
`WHOLE_PROMPT_TOKENS`, else `CHUNK_TOKENS` at a time), scaled by the layers; q/k/v random in the
model's dtype. The fit has two terms, J(L) = a P + b L with P = L(L+1)/2: a per attended position
and b per prompt token, minimising the squared *relative* error, so short and long prompts count
alike.

Written into a table anchored at the calibration's prefill length T (`anchored`): the
calibration derived the prefill unit costs from a whole forward of T tokens minus the attention it
modelled there, so a new `a` alone would move the modelled cost of that very forward. The table
gets attn_ctx = a and token_fixed raised by (a0 - a) (T + 1) / 2 (a0 the calibration's own
constant): the model still charges what was measured at T tokens and grows with the fitted `a`
beyond it. The per-token b is then already inside the per-token costs measured at T, so it is
recorded, not written.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..exec.kvcache import SeqSlot
from .calib_measure import measure
from .meters import Meter
from .model import CalibrationTable

# the runtime's prefill chunking (runtime.generation.PREFILL_CHUNK: prompts up to this are
# prefilled whole; runtime.scheduler.DEFAULT_PREFILL_TOKENS: longer ones in chunks of this);
# written here because energy sits below runtime (a test checks that they agree)
WHOLE_PROMPT_TOKENS = 1024
CHUNK_TOKENS = 512
# prompt lengths the fit measures, capped at the model's positions
LENGTHS = (256, 512, 1024, 2048, 4096, 6144, 8192)


def runtime_chunk(length: int) -> int:
    """The chunk (tokens) the scheduler prefills a `length`-token prompt in: the whole prompt up
    to WHOLE_PROMPT_TOKENS, else CHUNK_TOKENS."""
    return length if length <= WHOLE_PROMPT_TOKENS else CHUNK_TOKENS


def prompt_attention(lean, length: int, chunk: int | None = None):
    """A zero-argument callable running one layer's attention for a `length`-token prompt the
    way the runtime prefills it (chunks of `chunk` tokens; None: `runtime_chunk(length)`), on
    random q/k/v of the model's dtype. Needs `length` <= the model's positions."""
    chunk = runtime_chunk(length) if chunk is None else chunk
    s = lean.spec
    cache = lean.new_cache(1, length)
    dt, dev = lean.dtype, lean.device
    q = torch.randn(length, s.n_heads, s.head_dim, dtype=dt, device=dev)
    k = torch.randn(length, s.n_kv_heads, s.head_dim, dtype=dt, device=dev)
    v = torch.randn(length, s.n_kv_heads, s.head_dim, dtype=dt, device=dev)
    bounds = [(a, min(a + chunk, length)) for a in range(0, length, chunk)]

    def run() -> None:
        with torch.inference_mode():
            for a, b in bounds:
                slot = SeqSlot(row0=0, n=b - a, cache_row=0, pos0=a)
                lean._attend(q[a:b], k[a:b], v[a:b], 0, [slot], cache, False)

    return run


def measure_lengths(
    lean, meter: Meter, lengths, chunk: int | None = None, repeats: int = 3
) -> list[float]:
    """Joules of the whole prompt's attention, all layers, per length (the median of `repeats`
    timings, each `calib_measure.measure`'s least window)."""
    out = []
    for n in lengths:
        run = prompt_attention(lean, n, chunk)
        j = statistics.median(measure(run, meter, lean.device)[1] for _ in range(repeats))
        out.append(j * lean.spec.n_layers)
    return out


def fit(lengths, joules) -> tuple[float, float]:
    """(a, b) minimising sum(((a P + b L - J) / J)^2), P = L(L+1)/2, over the lengths L and their
    joules J (least squares of the rows (P/J, L/J) against 1). Raises ValueError with fewer than
    two distinct lengths."""
    x = [(n * (n + 1) / 2 / j, n / j) for n, j in zip(lengths, joules, strict=True)]
    s11 = sum(u * u for u, _ in x)
    s12 = sum(u * v for u, v in x)
    s22 = sum(v * v for _, v in x)
    t1, t2 = sum(u for u, _ in x), sum(v for _, v in x)
    det = s11 * s22 - s12 * s12
    if len(set(lengths)) < 2 or det <= 1e-12 * s11 * s22:
        raise ValueError("the attention fit needs at least two distinct lengths")
    return (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det


def anchored(table: CalibrationTable, a: float, prefill_t: int) -> tuple[float, float, float]:
    """(token_fixed, a0, f0): the table's prefill token_fixed with attention constant `a`,
    anchored at the calibration's prefill length T = prefill_t: f0 + (a0 - a) (T + 1) / 2, where
    a0 and f0 are the calibration's own attn_ctx and token_fixed (kept in
    `kernels["prefill_attention"]` once a fit is written; a session-9 fit, which only replaced
    attn_ctx, recorded a0 as its `previous_attn_ctx` and left token_fixed as measured)."""
    rec = (table.kernels or {}).get("prefill_attention") or {}
    pre = table.prefill
    a0 = rec.get("calibrated_attn_ctx", rec.get("previous_attn_ctx", pre.attn_ctx))
    f0 = rec.get("calibrated_token_fixed", pre.token_fixed)
    return f0 + (a0 - a) * (prefill_t + 1) / 2, a0, f0


def measure_fit(
    lean, meter: Meter, prefill_t: int, lengths=None, chunk: int | None = None, repeats: int = 3
) -> dict | None:
    """Measure the prompt attention at `lengths` (None: LENGTHS up to the model's positions) and
    fit it; returns the fit's record (lengths, measured_j, fit_attn_ctx, fit_per_token_j,
    fit_rel_err, method, date), or None where the model has positions for fewer than two lengths
    above `prefill_t` or the fit is not positive."""
    top = lean.rope_cos.shape[0]
    lengths = [n for n in (lengths or LENGTHS) if n <= top]
    if sum(n > prefill_t for n in lengths) < 2:
        return None
    js = measure_lengths(lean, meter, lengths, chunk, repeats)
    a, b = fit(lengths, js)
    if a <= 0:
        return None
    chunks = f"{chunk}-token chunks" if chunk else (
        f"the scheduler's chunks (whole up to {WHOLE_PROMPT_TOKENS} tokens, else {CHUNK_TOKENS})"
    )  # fmt: skip
    return {
        "method": "calib_attention: LeanModel._attend over whole prompts in "
        f"{chunks}, one layer x {lean.spec.n_layers}, {meter.name} meter, median of {repeats}; "
        f"a P + b L, least relative squared error; anchored at the calibration's {prefill_t}-"
        "token prefill",
        "lengths": list(lengths),
        "measured_j": js,
        "fit_attn_ctx": a,
        "fit_per_token_j": b,
        "fit_rel_err": [
            (a * n * (n + 1) / 2 + b * n) / j - 1 for n, j in zip(lengths, js, strict=True)
        ],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_fit(table: CalibrationTable, fitted: dict, prefill_t: int) -> dict:
    """Write a `measure_fit` record into `table`'s prefill (in place), anchored at `prefill_t`;
    returns the record as kept in `table.kernels["prefill_attention"]` (with the table's
    previous and calibrated constants)."""
    pre = table.prefill
    a = fitted["fit_attn_ctx"]
    tok, a0, f0 = anchored(table, a, prefill_t)
    record = fitted | {
        "previous_attn_ctx": pre.attn_ctx,
        "previous_token_fixed": pre.token_fixed,
        "calibrated_attn_ctx": a0,
        "calibrated_token_fixed": f0,
    }
    pre.attn_ctx, pre.token_fixed = a, tok
    table.kernels["prefill_attention"] = record
    return record


def fit_into(
    table: CalibrationTable,
    lean,
    meter: Meter,
    prefill_t: int,
    lengths=None,
    chunk: int | None = None,
    repeats: int = 3,
) -> dict | None:
    """`measure_fit`, then `write_fit` into `table` (in place); returns the record kept as
    `table.kernels["prefill_attention"]`, or None (table untouched) where `measure_fit` gives
    none."""
    fitted = measure_fit(lean, meter, prefill_t, lengths, chunk, repeats)
    return None if fitted is None else write_fit(table, fitted, prefill_t)
