"""The prompt-attention fit of the calibration (issue 16, hest_core/energy/calib_attention.py):
the two-term fit, the anchoring that keeps the calibrated prefill exact, the runtime's chunks,
and a real measurement on the tiny model."""

from __future__ import annotations

import pytest
import torch

from hest_core.energy import calib_attention as ca
from hest_core.energy import calib_measure
from hest_core.energy.meters import EstimateMeter
from hest_core.energy.model import CalibrationTable, PhaseCosts
from hest_core.exec.loading import build_lean, load_hf_model


def _table(attn=6.0e-6, tok=1.5e-3, n_layers=2) -> CalibrationTable:
    def phase():
        return PhaseCosts([[6e-4, 9e-4, 2e-4] for _ in range(n_layers)], tok, attn, 3e-2)

    return CalibrationTable(
        "tiny:llama", "f" * 16, n_layers, "cpu-test", "estimate", "estimate", "2026-12-01",
        "bf16", 2, phase(), phase(), {},
    )  # fmt: skip


def test_fit_recovers_both_terms():
    a, b = 4.1e-6, 3.9e-4
    lengths = [256, 512, 1024, 2048, 4096]
    js = [a * n * (n + 1) / 2 + b * n for n in lengths]
    fa, fb = ca.fit(lengths, js)
    assert fa == pytest.approx(a, rel=1e-9) and fb == pytest.approx(b, rel=1e-6)
    with pytest.raises(ValueError, match="two distinct lengths"):
        ca.fit([512, 512], [1.0, 1.0])


def test_anchoring_keeps_the_calibrated_prefill():
    """The modelled fixed cost of the calibration's own T-token prefill is the same before and
    after a fit is written, and a second fit anchors from the calibration's constants, not from
    the first fit's."""
    t, T = _table(), 256

    def fixed(tab):
        p = tab.prefill
        return T * p.token_fixed + p.attn_ctx * T * (T + 1) / 2

    before = fixed(t)
    tok, a0, f0 = ca.anchored(t, 4.0e-6, T)
    assert (a0, f0) == (6.0e-6, 1.5e-3)
    t.prefill.attn_ctx, t.prefill.token_fixed = 4.0e-6, tok
    t.kernels["prefill_attention"] = {"calibrated_attn_ctx": a0, "calibrated_token_fixed": f0}
    assert fixed(t) == pytest.approx(before, rel=1e-12)
    tok2, a0b, f0b = ca.anchored(t, 5.0e-6, T)
    assert (a0b, f0b) == (a0, f0) and tok2 == pytest.approx(f0 + (a0 - 5.0e-6) * (T + 1) / 2)
    # a session-9 fit replaced attn_ctx only, recording the calibration's as previous_attn_ctx
    old = _table(attn=7.0e-6)
    old.kernels["prefill_attention"] = {"previous_attn_ctx": 6.0e-6}
    assert ca.anchored(old, 4.0e-6, T)[1:] == (6.0e-6, 1.5e-3)


def test_chunks_are_the_runtimes():
    from hest_core.runtime.generation import PREFILL_CHUNK
    from hest_core.runtime.scheduler import DEFAULT_PREFILL_TOKENS

    assert ca.WHOLE_PROMPT_TOKENS == PREFILL_CHUNK
    assert ca.CHUNK_TOKENS == DEFAULT_PREFILL_TOKENS
    assert ca.runtime_chunk(PREFILL_CHUNK) == PREFILL_CHUNK
    assert ca.runtime_chunk(PREFILL_CHUNK + 1) == DEFAULT_PREFILL_TOKENS


def test_fit_into_measures_the_tiny_model(monkeypatch):
    """On the tiny model, out to 2,048 tokens: a positive fit is written anchored and recorded;
    a model with positions for only one length above T leaves the table untouched."""
    monkeypatch.setattr(calib_measure, "WINDOW_SCALE", 0.2)
    hf = load_hf_model("tiny:llama")
    lean = build_lean(hf, torch.bfloat16, torch.device("cpu"), 2048)
    t = _table(n_layers=lean.spec.n_layers)
    rec = ca.fit_into(t, lean, EstimateMeter(30), 256, lengths=(256, 512, 1024, 2048), repeats=1)
    assert rec is not None and t.kernels["prefill_attention"] is rec
    assert rec["lengths"] == [256, 512, 1024, 2048] and len(rec["measured_j"]) == 4
    assert t.prefill.attn_ctx == rec["fit_attn_ctx"] > 0
    assert t.prefill.token_fixed == pytest.approx(ca.anchored(t, t.prefill.attn_ctx, 256)[0])
    small = build_lean(hf, torch.bfloat16, torch.device("cpu"), 512)
    u = _table(n_layers=lean.spec.n_layers)
    assert ca.fit_into(u, small, EstimateMeter(30), 256) is None
    assert u.prefill.attn_ctx == 6.0e-6 and "prefill_attention" not in u.kernels
