"""Gates, straight-through estimators, the energy terms and dual ascent."""

from __future__ import annotations

import pytest
import torch

from hest_core.exec.quant import fake_quant_rows, fake_quant_weight
from training.forward import st_gumbel
from training.methods import METHODS
from training.objective import Duals, fixed_cost, path_mask, tau_at


def test_st_gumbel_is_one_hot_forward_with_soft_gradient():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]], requires_grad=True)
    g = st_gumbel(logits, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(g.detach().sum(-1), torch.ones(2))
    assert set(g.detach().flatten().tolist()) <= {0.0, 1.0}
    (g * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_masked_path_is_never_sampled():
    mask = path_mask(METHODS["hest-fp16only"])
    logits = torch.zeros(2000, 3) + mask
    g = st_gumbel(logits, 1.0, torch.Generator().manual_seed(1))
    assert g[:, 1].sum() == 0 and g[:, 0].sum() > 0 and g[:, 2].sum() > 0


def test_fake_quant_straight_through():
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(4, 16, requires_grad=True)
    wq, xq = fake_quant_weight(w), fake_quant_rows(x)
    assert not torch.equal(wq, w) and (wq - w).abs().max() < w.abs().max() / 100
    (wq.sum() + xq.sum()).backward()
    assert torch.equal(w.grad, torch.ones_like(w)) and torch.equal(x.grad, torch.ones_like(x))


def test_dual_ascent_moves_lambda_the_right_way():
    d = Duals([0.4, 1.0], init=1.0, alpha=0.5, cap=5.0, dual=True)
    d.update(0.4, 1.5)  # over budget: lambda rises
    assert d.get(0.4) == pytest.approx(1.25)
    d.update(1.0, 0.2)  # under budget: lambda falls ...
    assert d.get(1.0) == pytest.approx(0.6)
    for _ in range(10):
        d.update(1.0, 0.0)  # ... but never below 0
    assert d.get(1.0) == 0.0
    for _ in range(100):
        d.update(0.4, 3.0)
    assert d.get(0.4) == 5.0  # capped
    fixed = Duals([0.6], init=1.0, alpha=0.5, cap=5.0, dual=False)
    fixed.update(0.6, 2.0)
    assert fixed.get(0.6) == 1.0


def test_tau_anneals_from_start_to_end():
    assert tau_at(0, 100, 1.0, 0.3) == pytest.approx(1.0)
    assert tau_at(99, 100, 1.0, 0.3) == pytest.approx(0.3)
    assert tau_at(50, 100, 1.0, 0.3) < tau_at(10, 100, 1.0, 0.3)


def test_fixed_plus_units_is_the_fp16_cost(tiny_engine):
    em = tiny_engine.energy
    p, s = 40, 9
    units = p * em.unit_sum["prefill"][0] + (s - 1) * em.unit_sum["decode"][0]
    assert fixed_cost(em, p, s) + units == pytest.approx(em.fp16_cost(p, s))
