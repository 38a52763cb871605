"""The fused decode layer (hest_core/exec/fused.py, `hest_decode_layer` in kernels/layer.c) against the
PyTorch loop, the C controller against `Controller`, and batches of unequal prompts."""

from __future__ import annotations

import pytest
import torch

from hest_core.adapter.controller import Controller
from hest_core.adapter.native_controller import NativeController
from hest_core.exec import native
from hest_core.exec.loading import TINY, build_lean, load_hf_model
from hest_core.exec.routing import const_decider
from hest_core.paths import FP16, INT8, SKIP
from hest_core.runtime.engine import Engine, GenerationRequest
from tests.hest_core.decode_steps import assert_agree, decode, prompts_for, row_decider

needs_native = pytest.mark.skipif(native.get() is None, reason=f"native {native.status()}")


def _lean(kind: str, rank: int = 0):
    torch.manual_seed(0)
    lean = build_lean(load_hf_model(kind), torch.bfloat16, torch.device("cpu"), 64)
    for lw in lean.layers:
        for m in lw.int8_linears():
            m.woq_max_rows = 16  # weight-only int8 at decode in the loop, as the fused layer
        if rank:
            d = lean.spec.hidden
            lw.shortcut = (
                (torch.randn(rank, d) / d**0.5).bfloat16(),
                (torch.randn(d, rank) / rank**0.5).bfloat16(),
            )
    return lean


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
        ([list(range(5, 17)), list(range(40, 45)), list(range(90, 119))], row_decider([0, 1, 2])),
        ([list(range(5, 9)), list(range(40, 77))], row_decider([2, 2])),
    ]
    for prompts, dec in cases:
        a = decode(lean, prompts, 4, dec, fused=True)
        b = decode(lean, prompts, 4, dec, fused=False)
        assert_agree(a, b, (kind, rank))


@needs_native
@pytest.mark.parametrize("rows", [1, 4, 8, 16])
@pytest.mark.parametrize("rank", [0, 4])
def test_fused_layer_at_1_to_16_rows(rows, rank):
    """Up to native.FUSED_MAX_ROWS rows in one step, each row at its own position, the paths
    mixed row by row (and every row on one path): the fused layer equals the PyTorch loop."""
    lean = _lean("tiny:qwen3", rank)
    prompts = prompts_for(rows)
    mixed = [(i * 5 + rows) % 3 for i in range(rows)]
    for dec in (row_decider(mixed), const_decider(FP16), const_decider(INT8)):
        a = decode(lean, prompts, 2, dec, fused=True)
        b = decode(lean, prompts, 2, dec, fused=False)
        assert_agree(a, b, (rows, rank))


@needs_native
def test_fused_layer_at_16_rows_without_amx():
    """The same at 16 rows on gemv.c's vdpbf16ps and VNNI loops (where the CPU has AMX, the
    test above ran the tiles for the bf16 and int8 rows)."""
    nat = native.get()
    lean = _lean("tiny:llama", 4)
    prompts = prompts_for(16)
    dec = row_decider([i % 3 for i in range(16)])
    nat.set_amx(False)
    try:
        a = decode(lean, prompts, 2, dec, fused=True)
    finally:
        nat.set_amx(True)  # back on where the CPU has the tiles
    b = decode(lean, prompts, 2, dec, fused=False)
    assert_agree(a, b, "no amx")


@needs_native
def test_fused_off_switch_and_fallbacks():
    lean = _lean("tiny:llama")
    ids = torch.tensor([5])
    cache = lean.new_cache(1, 8)
    assert lean.fused.usable(ids, cache)
    lean.fused.enabled = False
    assert not lean.fused.usable(ids, cache)
    lean.fused.enabled = True
    for lw in lean.layers:  # W8A8 for the loop's int8 products: the fused layer runs weight-only
        lw.gu8.woq_max_rows = 0
    assert lean.fused.usable(ids, cache)
    n = native.FUSED_MAX_ROWS
    assert lean.fused.usable(torch.arange(n), lean.new_cache(n, 8))
    over = lean.new_cache(n + 1, 8)  # more rows than the fused layer takes
    assert not lean.fused.usable(torch.arange(n + 1), over)
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
    from hest_core.adapter.controller import AdaptiveController

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
