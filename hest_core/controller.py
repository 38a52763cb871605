"""The factorised, budget-conditioned controller.

f(l, t) = sigmoid(W_tok h(l, t)) * sigmoid(w_l + u * beta)   in R^k
logits  = A f + a0                                             3 paths: fp16, int8, skip
h(l, t) is the normalised hidden state entering layer l; beta = log(budget ratio).
Parameters: d*k + L*k + k + 3k + 3, independent of sequence length.
"""

from __future__ import annotations

import torch
from torch import nn


class Controller(nn.Module):
    def __init__(self, hidden: int, n_layers: int, k: int = 32):
        super().__init__()
        self.hidden, self.n_layers, self.k = hidden, n_layers, k
        self.hest_w_tok = nn.Parameter(torch.zeros(k, hidden))  # (k, d)
        self.hest_w_layer = nn.Parameter(torch.zeros(n_layers, k))  # (L, k)
        self.hest_u = nn.Parameter(torch.zeros(k))  # (k,)
        self.hest_a = nn.Parameter(torch.zeros(3, k))  # (3, k)
        self.hest_a0 = nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))  # untrained: always fp16

    @staticmethod
    def n_params(hidden: int, n_layers: int, k: int) -> int:
        return hidden * k + n_layers * k + k + 3 * k + 3

    def init_for_training(self, seed: int = 0, std: float = 0.02) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.hest_w_tok.normal_(0.0, std, generator=g)
            self.hest_a.normal_(0.0, std, generator=g)
            self.hest_a0.copy_(torch.tensor([2.0, 0.0, -2.0]))

    def forward(self, h: torch.Tensor, layer: int, beta: torch.Tensor) -> torch.Tensor:
        """h: (N, d), beta: (N,) -> logits (N, 3) in fp32."""
        tok = torch.sigmoid(h.float() @ self.hest_w_tok.t())  # (N, k)
        lay = torch.sigmoid(self.hest_w_layer[layer] + self.hest_u * beta[:, None])  # (N, k)
        return (tok * lay) @ self.hest_a.t() + self.hest_a0  # (N, 3)


# method name (HestConfig.method) -> controller class; baselines register theirs here.
# Each class takes (hidden, n_layers, k) and maps (h (N, d), layer, beta (N,)) -> logits (N, 3).
CONTROLLERS: dict[str, type[nn.Module]] = {
    "hest": Controller,
    "hest-fp16only": Controller,
    "hest-no-dual": Controller,
}


def build_controller(method: str, hidden: int, n_layers: int, k: int) -> nn.Module:
    from .errors import AdapterMismatchError

    if method not in CONTROLLERS:
        raise AdapterMismatchError(
            f"adapter method {method!r} has no controller class; known: {sorted(CONTROLLERS)}",
            param="adapter",
        )
    return CONTROLLERS[method](hidden, n_layers, k)


# ---- baselines and ablations (training/; appended, existing code above unchanged) -------------
NEG_LOGIT = -1e4  # logit of a path a method never uses


class UnfactorisedController(nn.Module):
    """Ablation `hest-unfactorised`: a separate d x k feature map per layer, budget-conditioned.

    f = sigmoid(W_l h + u_l beta + b_l), logits = A_l f + a0_l.  Parameters L (d k + 2k + 3k + 3).
    """

    def __init__(self, hidden: int, n_layers: int, k: int = 32):
        super().__init__()
        self.hidden, self.n_layers, self.k = hidden, n_layers, k
        self.hest_w = nn.Parameter(torch.zeros(n_layers, k, hidden))  # (L, k, d)
        self.hest_u = nn.Parameter(torch.zeros(n_layers, k))  # (L, k)
        self.hest_b = nn.Parameter(torch.zeros(n_layers, k))
        self.hest_a = nn.Parameter(torch.zeros(n_layers, 3, k))  # (L, 3, k)
        self.hest_a0 = nn.Parameter(torch.tensor([[1.0, 0.0, 0.0]] * n_layers))  # (L, 3)

    def init_for_training(self, seed: int = 0, std: float = 0.02) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.hest_w.normal_(0.0, std, generator=g)
            self.hest_a.normal_(0.0, std, generator=g)
            self.hest_a0.copy_(torch.tensor([[2.0, 0.0, -2.0]] * self.n_layers))

    def forward(self, h: torch.Tensor, layer: int, beta: torch.Tensor) -> torch.Tensor:
        f = torch.sigmoid(
            h.float() @ self.hest_w[layer].t()
            + self.hest_u[layer] * beta[:, None]
            + self.hest_b[layer]
        )  # (N, k)
        return f @ self.hest_a[layer].t() + self.hest_a0[layer]  # (N, 3)


class TabsController(nn.Module):
    """Baseline `tabs` (our re-implementation of the description, not a published method):
    token-wise, an unfactorised d x k router per layer, paths {fp16, skip} only, not
    conditioned on the budget. logits[fp16, skip] = A_l sigmoid(W_l h + b_l) + a0_l."""

    def __init__(self, hidden: int, n_layers: int, k: int = 32):
        super().__init__()
        self.hidden, self.n_layers, self.k = hidden, n_layers, k
        self.hest_w = nn.Parameter(torch.zeros(n_layers, k, hidden))  # (L, k, d)
        self.hest_b = nn.Parameter(torch.zeros(n_layers, k))
        self.hest_a = nn.Parameter(torch.zeros(n_layers, 2, k))  # (L, 2, k): fp16, skip
        self.hest_a0 = nn.Parameter(torch.tensor([[1.0, 0.0]] * n_layers))  # (L, 2)

    def init_for_training(self, seed: int = 0, std: float = 0.02) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.hest_w.normal_(0.0, std, generator=g)
            self.hest_a.normal_(0.0, std, generator=g)
            self.hest_a0.copy_(torch.tensor([[2.0, -2.0]] * self.n_layers))

    def forward(self, h: torch.Tensor, layer: int, beta: torch.Tensor) -> torch.Tensor:
        f = torch.sigmoid(h.float() @ self.hest_w[layer].t() + self.hest_b[layer])  # (N, k)
        two = f @ self.hest_a[layer].t() + self.hest_a0[layer]  # (N, 2)
        never = torch.full_like(two[:, :1], NEG_LOGIT)
        return torch.cat([two[:, :1], never, two[:, 1:]], dim=-1)  # (N, 3)


class BhspController(nn.Module):
    """Baseline `bhsp` (our re-implementation of the description, not a published method):
    token-agnostic, one learned {fp16, skip} state per layer, shifted by the budget:
    logits[fp16, skip] = s_l + c_l beta, the same for every token of the layer."""

    def __init__(self, hidden: int, n_layers: int, k: int = 32):
        super().__init__()
        self.hidden, self.n_layers, self.k = hidden, n_layers, k
        self.hest_state = nn.Parameter(torch.tensor([[1.0, 0.0]] * n_layers))  # (L, 2)
        self.hest_slope = nn.Parameter(torch.zeros(n_layers, 2))  # (L, 2)

    def init_for_training(self, seed: int = 0, std: float = 0.02) -> None:
        with torch.no_grad():
            self.hest_state.copy_(torch.tensor([[2.0, -2.0]] * self.n_layers))

    def forward(self, h: torch.Tensor, layer: int, beta: torch.Tensor) -> torch.Tensor:
        two = self.hest_state[layer] + self.hest_slope[layer] * beta[:, None]  # (N, 2)
        never = torch.full_like(two[:, :1], NEG_LOGIT)
        return torch.cat([two[:, :1], never, two[:, 1:]], dim=-1)  # (N, 3)


CONTROLLERS["hest-unfactorised"] = UnfactorisedController
CONTROLLERS["tabs"] = TabsController
CONTROLLERS["bhsp"] = BhspController
