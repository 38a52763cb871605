"""Methods, energy terms and the dual variables of the HEST objective.

loss = CE + lambda_b (E_bar / E_max - 1), E_max = r x the modelled all-fp16 cost of the same
sequence, lambda_b <- max(0, lambda_b + alpha (mean E_bar/E_max - 1)) after every batch, one
lambda per budget bucket b (the ratio r sampled for that batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hest_core.energy import EnergyModel
from hest_core.model import FP16, INT8, SKIP

NEG = -1e4


@dataclass(frozen=True)
class Method:
    name: str
    paths: tuple[int, ...]  # paths the method may use
    penalty: str  # "energy" (Lagrangian) | "flops" (TABS: fixed FLOP penalty)
    dual: bool  # dual ascent on lambda (False: fixed lambda)
    train_z: bool  # spectral z vectors trainable


METHODS: dict[str, Method] = {
    "hest": Method("hest", (FP16, INT8, SKIP), "energy", True, True),
    "hest-fp16only": Method("hest-fp16only", (FP16, SKIP), "energy", True, True),
    "hest-no-dual": Method("hest-no-dual", (FP16, INT8, SKIP), "energy", False, True),
    "hest-unfactorised": Method("hest-unfactorised", (FP16, INT8, SKIP), "energy", True, True),
    "bhsp": Method("bhsp", (FP16, SKIP), "energy", True, False),
    "tabs": Method("tabs", (FP16, SKIP), "flops", False, False),
}


def path_mask(method: Method) -> torch.Tensor:
    """(3,) additive logit mask: 0 for allowed paths, NEG for the others."""
    return torch.tensor([0.0 if p in method.paths else NEG for p in range(3)])


def unit_costs(em: EnergyModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, 3) joules per gated unit, prefill and decode."""
    return (
        torch.tensor(em.unit["prefill"], dtype=torch.float32),
        torch.tensor(em.unit["decode"], dtype=torch.float32),
    )


def fixed_cost(em: EnergyModel, p: int, s: int) -> float:
    """Ungated joules of a prompt of p tokens + s generated tokens (s - 1 decode steps)."""
    gated = p * em.unit_sum["prefill"][FP16] + max(0, s - 1) * em.unit_sum["decode"][FP16]
    return em.request_cost(p, s, FP16) - gated


def tau_at(step: int, steps: int, start: float, end: float) -> float:
    """Exponential anneal start -> end over the run."""
    frac = min(1.0, step / max(1, steps - 1))
    return start * math.exp(frac * math.log(end / start))


class Duals:
    """One lambda per budget bucket."""

    def __init__(self, budgets: list[float], init: float, alpha: float, cap: float, dual: bool):
        self.lam = {f"{r:g}": float(init) for r in budgets}
        self.alpha, self.cap, self.dual = alpha, cap, dual

    def get(self, r: float) -> float:
        return self.lam[f"{r:g}"]

    def update(self, r: float, ratio: float) -> None:
        if not self.dual:
            return
        key = f"{r:g}"
        self.lam[key] = min(self.cap, max(0.0, self.lam[key] + self.alpha * (ratio - 1.0)))
