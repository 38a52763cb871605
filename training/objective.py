"""What a method is, the energy terms and the dual variables of the HEST objective.

loss = CE + lambda_b (E_bar / E_max - 1), E_max = r x the modelled all-fp16 cost of the same
sequence, lambda_b <- max(0, lambda_b + alpha (mean E_bar/E_max - 1)) after every batch, one
lambda per budget bucket b (the ratio r sampled for that batch).

`Method` and `Evaluation` describe a method; the registry of methods is training/methods.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hest_core import paths as reg
from hest_core.energy.model import EnergyModel

from .forward import NEG

PENALTIES = ("energy", "flops", "ce", "none")
ENGINES = ("extractive", "policy", "adapter", "merged")
ROWS = ("one", "sweep", "primary")


@dataclass(frozen=True)
class Evaluation:
    """How `python -m training.evaluate` runs a method.

    engine: "extractive" (no model), "policy" (the Engine's fixed policy of the method's name,
    no adapter), "adapter" (a HEST artifact from `--adapters NAME=DIR`) or "merged" (a merged
    Hugging Face model directory from `--adapters`, fp16 policy, the base model's calibration).
    rows: "one" (one row, ratio 1.0), "sweep" (one row per `--budget-ratios`) or "primary" (one
    row at `--primary-ratio`).
    """

    engine: str
    rows: str = "one"
    # the budget guard: "hard" for adapter rows, "stop" for a fixed path (it ends cleanly when its
    # budget runs out, never demoted), "off" for a method without a budget input
    guard: str = "hard"
    default_adapter: str | None = None  # used when `--adapters` names none ("default": committed)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"Evaluation.engine={self.engine!r}; use one of {ENGINES}")
        if self.rows not in ROWS:
            raise ValueError(f"Evaluation.rows={self.rows!r}; use one of {ROWS}")

    @property
    def budgeted(self) -> bool:
        """Rows run under a budget below 1.0 (overshoot is reported for them)."""
        return self.rows != "one"


@dataclass(frozen=True)
class Method:
    """One entry of the registry (training/methods.py)."""

    name: str
    about: str  # one line for the docs table and `--help`
    paths: tuple[str, ...]  # path names (hest_core/paths.py) the method may use
    evaluation: Evaluation
    controller: type[nn.Module] | None = None  # hest_core.adapter.controller class of its artifacts
    trainer: type | None = None  # takes (method, args); None: evaluated only, never trained
    penalty: str = "none"  # "energy" (Lagrangian) | "flops" (TABS) | "ce" (CE only) | "none"
    dual: bool = False  # dual ascent on lambda (False: fixed `--lambda-fixed`)
    train_z: bool = False  # spectral z vectors trainable
    bake_mask: bool = False  # write the path mask into the artifact's bias (factorised controller)

    @property
    def controller_key(self) -> str:
        """The controller's name in hest_core.adapter.controller.CONTROLLERS (what the artifact records
        as `controller`): the method's own name where it is registered with this class, else the
        name the class is registered under."""
        from hest_core.adapter.controller import CONTROLLERS

        if self.controller is None:
            return ""
        if CONTROLLERS.get(self.name) is self.controller:
            return self.name
        return next(k for k, c in CONTROLLERS.items() if c is self.controller)

    def __post_init__(self) -> None:
        known = (*reg.BUILTIN_NAMES, *reg.OPTIONAL)
        if unknown := [p for p in self.paths if reg.find(p) is None and p not in known]:
            raise ValueError(f"Method {self.name!r}: paths {unknown} are not in {known}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"Method {self.name!r}: penalty={self.penalty!r}; use {PENALTIES}")
        if (self.trainer is None) != (self.penalty == "none"):
            raise ValueError(f"Method {self.name!r}: a trainer needs a penalty and vice versa")
        if self.evaluation.engine == "adapter" and self.controller is None:
            raise ValueError(f"Method {self.name!r}: adapter evaluation needs a controller class")


def path_mask(method: Method) -> torch.Tensor:
    """(P,) additive logit mask over the registry's paths: 0 for the method's, NEG elsewhere."""
    return torch.tensor([0.0 if p in method.paths else NEG for p in reg.names()])


def unit_costs(em: EnergyModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, P) joules per gated unit, prefill and decode."""
    return (
        torch.tensor(em.unit["prefill"], dtype=torch.float32),
        torch.tensor(em.unit["decode"], dtype=torch.float32),
    )


def fixed_cost(em: EnergyModel, p: int, s: int) -> float:
    """Ungated joules of a prompt of p tokens + s generated tokens (s - 1 decode steps)."""
    fp16 = em.ref
    gated = p * em.unit_sum["prefill"][fp16] + max(0, s - 1) * em.unit_sum["decode"][fp16]
    return em.request_cost(p, s, fp16) - gated


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
