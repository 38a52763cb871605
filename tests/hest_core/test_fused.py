"""The fused decode layer (hest_core/fused.py, `hest_decode_layer` in kernels/gemv.c) against the
PyTorch loop, the C controller against `Controller`, and batches of unequal prompts."""

from __future__ import annotations

import pytest
import torch

from hest_core import native
from hest_core.controller import Controller
from hest_core.engine import Engine, GenerationRequest
from hest_core.fused import NativeController
from hest_core.loading import TINY, build_lean, load_hf_model
from hest_core.model import SeqSlot, const_decider
from hest_core.paths import FP16, INT8, SKIP

needs_native = pytest.mark.skipif(native.get() is None, reason=f"native {native.status()}")


def _lean(kind: str, rank: int = 0):
    torch.manual_seed(0)
    lean = build_lean(load_hf_model(kind), torch.bfloat16, torch.device("cpu"), 64)
    for lw in lean.layers:
        for m in lw.int8_linears():
            m.woq_max_rows = 4  # weight-only int8 at decode, as the calibration picks here
        if rank:
            d = lean.spec.hidden
            lw.shortcut = (
                (torch.randn(rank, d) / d**0.5).bfloat16(),
                (torch.randn(d, rank) / rank**0.5).bfloat16(),
            )
    return lean


def _row_decider(paths: list[int]):
    """Each row of a step on its own path (a batch mixing all three)."""
    p = torch.tensor(paths)

    def decide(li, h):
        n = h.shape[0]
        q = p[:n]
        return q, torch.bincount(q, minlength=3).tolist()

    return decide


def _decode(lean, prompts: list[list[int]], steps: int, decide, fused: bool):
    """Prefill each prompt (rows at different positions), then `steps` teacher-forced decode
    steps of all rows together; returns the decode logits (steps, rows, vocab)."""
    lean.fused.enabled = fused
    b = len(prompts)
    cache = lean.new_cache(b, max(map(len, prompts)) + steps)
    out = []
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            one = lean.new_cache(1, cache.max_len)
            lean.forward(
                torch.tensor(p),
                torch.arange(len(p)),
                [SeqSlot(0, len(p), 0, 0)],
                one,
                const_decider(FP16),
                False,
            )
            for li in range(lean.spec.n_layers):
                cache.k[li][i] = one.k[li][0]
                cache.v[li][i] = one.v[li][0]
        for t in range(steps):
            pos = [len(p) + t for p in prompts]
            ids = torch.tensor([(7 * i + 3 * t + 11) % 500 for i in range(b)])
            slots = [SeqSlot(i, 1, i, pos[i]) for i in range(b)]
            assert lean.fused.usable(ids, cache) == fused
            out.append(lean.forward(ids, torch.tensor(pos), slots, cache, decide, True))
    return torch.stack(out)


@needs_native
@pytest.mark.parametrize("kind", TINY)
@pytest.mark.parametrize("rank", [0, 4])
def test_fused_layer_matches_pytorch_loop(kind, rank):
    """Every path alone at batch 1, and three rows at different positions on three paths: the
    fused layer and the PyTorch loop (same native products) agree to bf16 rounding noise."""
    lean = _lean(kind, rank)
    cases = [
        ([list(range(5, 17))], const_decider(FP16)),
        ([list(range(5, 17))], const_decider(INT8)),
        ([list(range(5, 17))], const_decider(SKIP)),
        ([list(range(5, 17)), list(range(40, 45)), list(range(90, 119))], _row_decider([0, 1, 2])),
        ([list(range(5, 9)), list(range(40, 77))], _row_decider([2, 2])),
    ]
    for prompts, dec in cases:
        a = _decode(lean, prompts, 4, dec, fused=True)
        b = _decode(lean, prompts, 4, dec, fused=False)
        assert torch.isfinite(a).all()
        cos = torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1))
        assert (cos > 0.9995).all(), (kind, rank, cos.min())
        assert (a - b).abs().max() < 0.05 * b.abs().max(), (kind, rank)


@needs_native
def test_fused_off_switch_and_fallbacks():
    lean = _lean("tiny:llama")
    ids = torch.tensor([5])
    cache = lean.new_cache(1, 8)
    assert lean.fused.usable(ids, cache)
    lean.fused.enabled = False
    assert not lean.fused.usable(ids, cache)
    lean.fused.enabled = True
    for lw in lean.layers:  # an int8 copy on W8A8 at this row count: the PyTorch loop runs it
        lw.gu8.woq_max_rows = 0
    assert not lean.fused.usable(ids, cache)
    five = lean.new_cache(5, 8)  # more rows than the native kernels take
    assert not lean.fused.usable(torch.arange(5), five)
    with native.disabled():
        assert not lean.fused.usable(ids, lean.new_cache(1, 8))


@needs_native
def test_native_controller_matches_controller():
    torch.manual_seed(1)
    ctl = Controller(96, 5, k=32)
    ctl.init_for_training(seed=3, std=0.3)
    with torch.no_grad():
        ctl.hest_w_layer.normal_(0, 1.0)
        ctl.hest_u.normal_(0, 1.0)
    for beta in (-0.9, 0.0, 0.4):
        nc = NativeController.of(ctl, beta)
        assert nc is not None
        for li in range(5):
            h = torch.randn(1, 96).bfloat16()
            ref = ctl(h, li, torch.tensor([beta]))[0]
            got = torch.tensor(nc.logits(li, h))
            assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (li, got, ref)
    assert NativeController.of(torch.nn.Linear(2, 2), 0.0) is None  # other classes: PyTorch


@needs_native
def test_native_adaptive_controller_matches_pytorch():
    """The budget-adaptive controller in C: a per-layer additive term, remade per step."""
    from hest_core.controller import AdaptiveController

    torch.manual_seed(2)
    ctl = AdaptiveController(96, 5, k=32)
    with torch.no_grad():
        for p in ctl.parameters():
            p.normal_(0, 0.5)
    ctl.set_costs(torch.rand(5, 3) + 0.1, torch.rand(5, 3) + 0.1)
    nc = NativeController.of(ctl, 0.0)
    assert nc is not None and nc.adaptive
    for beta in (-2.0, -0.5, 0.2):
        nc.update(beta)
        for li in range(5):
            h = torch.randn(1, 96).bfloat16()
            ref = ctl(h, li, torch.tensor([beta]), torch.ones(1))[0]
            got = torch.tensor(nc.logits(li, h))
            assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (beta, li, got, ref)


@pytest.mark.parametrize("fused", [True, False])
def test_batch_of_unequal_prompts_equals_each_alone(tiny_engine: Engine, fused):
    """Rows of a batch sit at different positions; each must decode as it would alone (the
    masked tail of a short row's cache once held uninitialised memory)."""
    eng = tiny_engine
    eng.lean.fused.enabled = fused
    texts = ["a short one.", "a much longer article " * 12 + "with an ending."]
    try:
        reqs = [GenerationRequest(t, energy_budget_ratio=1.0, max_new_tokens=12) for t in texts]
        together = eng.generate(reqs)
        alone = [eng.generate([r])[0] for r in reqs]
    finally:
        eng.lean.fused.enabled = True
    for t, a in zip(together, alone, strict=True):
        assert t.text == a.text
        assert t.stats.completion_tokens == a.stats.completion_tokens
