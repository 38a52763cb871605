"""The controllers: the factorised, budget-conditioned one (below), the budget-adaptive one
(`AdaptiveController`, the default adapter's since session 6) and the baselines' classes.

f(l, t) = sigmoid(W_tok h(l, t)) * sigmoid(w_l + u * beta)   in R^k
logits  = A f + a0                                             P paths (paths.py): fp16, int8, skip
h(l, t) is the normalised hidden state entering layer l; beta = log(budget ratio).
Parameters: d*k + L*k + k + P*k + P, independent of sequence length.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import paths as reg


def _priors() -> torch.Tensor:
    """(P,) each path's starting logit for training (paths.py `prior`: fp16 2, int8 0, skip -2)."""
    return torch.tensor([p.prior for p in reg.PATHS])


def _untrained() -> torch.Tensor:
    """(P,) logits of an untrained controller: 1 on fp16 (the reference path), 0 elsewhere."""
    return torch.tensor(reg.one_hot(reg.ref()), dtype=torch.float32)


class Controller(nn.Module):
    def __init__(self, hidden: int, n_layers: int, k: int = 32):
        super().__init__()
        self.hidden, self.n_layers, self.k = hidden, n_layers, k
        self.hest_w_tok = nn.Parameter(torch.zeros(k, hidden))  # (k, d)
        self.hest_w_layer = nn.Parameter(torch.zeros(n_layers, k))  # (L, k)
        self.hest_u = nn.Parameter(torch.zeros(k))  # (k,)
        P = reg.n_paths()
        self.hest_a = nn.Parameter(torch.zeros(P, k))  # (P, k)
        self.hest_a0 = nn.Parameter(_untrained())  # (P,) untrained: always fp16

    @staticmethod
    def n_params(hidden: int, n_layers: int, k: int) -> int:
        """Parameter count with the registry's P paths."""
        P = reg.n_paths()
        return hidden * k + n_layers * k + k + P * k + P

    def init_for_training(self, seed: int = 0, std: float = 0.02) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.hest_w_tok.normal_(0.0, std, generator=g)
            self.hest_a.normal_(0.0, std, generator=g)
            self.hest_a0.copy_(_priors())

    def forward(
        self, h: torch.Tensor, layer: int, beta: torch.Tensor, phase: torch.Tensor | None = None
    ) -> torch.Tensor:
        """h: (N, d), beta: (N,) -> logits (N, P) in fp32. `phase` is not an input of this
        controller (accepted so every controller has one call)."""
        tok = torch.sigmoid(h.float() @ self.hest_w_tok.t())  # (N, k)
        lay = torch.sigmoid(self.hest_w_layer[layer] + self.hest_u * beta[:, None])  # (N, k)
        return (tok * lay) @ self.hest_a.t() + self.hest_a0  # (N, P)


class AdaptiveController(nn.Module):
    """The budget-adaptive controller (issue 14): it reads what the request has left and what
    each path costs on the device at hand, so one artifact holds across calibration tables.

        f      = sigmoid(W_tok h) * sigmoid(w_l + u beta + v phase)            in R^k
        q      = A f + a0 + phase * b                                          (P,) path scores
        price  = softplus(m0 + m1 beta + m2 phase)                             >= 0
        logits = q - price * rc[phase, l]                                       (P,)

    h (N, d): the normalised hidden state entering layer l; beta = log of the budget ratio the
    request has left (at run time (budget - spent) / the all-fp16 cost of its remaining work,
    `BudgetGuard.remaining_ratio`; in training the step's ratio r, which is what that ratio
    stays at when a request spends on plan); phase: 0 for prompt tokens (prefill), 1 for
    generated ones (decode); rc[phase, l, p] = c_p / c_fp16 of layer l's unit on this device
    (`set_costs`, from the Engine's own energy model, never from the artifact). A path is chosen
    for its score minus its relative cost at the request's price: a Lagrangian choice whose price
    the budget sets, so a device where int8 saves less sees less int8 with the same artifact.
    Parameters: d*k + L*k + 2k + P*k + 2P + 3.
    """

    uses_remaining = True  # the runtime feeds beta = log(remaining ratio), per step

    def __init__(self, hidden: int, n_layers: int, k: int = 32, n_paths: int | None = None):
        super().__init__()
        n_paths = reg.n_paths() if n_paths is None else n_paths
        self.hidden, self.n_layers, self.k, self.n_paths = hidden, n_layers, k, n_paths
        self.hest_w_tok = nn.Parameter(torch.zeros(k, hidden))  # (k, d)
        self.hest_w_layer = nn.Parameter(torch.zeros(n_layers, k))  # (L, k)
        self.hest_u = nn.Parameter(torch.zeros(k))  # (k,) budget
        self.hest_v = nn.Parameter(torch.zeros(k))  # (k,) phase
        self.hest_a = nn.Parameter(torch.zeros(n_paths, k))  # (P, k)
        self.hest_a0 = nn.Parameter(torch.zeros(n_paths))  # (P,) untrained: a price decides
        self.hest_b = nn.Parameter(torch.zeros(n_paths))  # (P,) decode offset
        self.hest_m = nn.Parameter(torch.tensor([0.0, -2.0, 0.0]))  # price: m0, m1 (beta), m2
        # relative path costs of this device, (2, L, P): prefill, decode; not saved
        self.register_buffer("rc", torch.ones(2, n_layers, n_paths), persistent=False)

    def init_for_training(self, seed: int = 0, std: float = 0.02) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.hest_w_tok.normal_(0.0, std, generator=g)
            self.hest_a.normal_(0.0, std, generator=g)
            # prior scores by the registry's quality rank: the best path 2, the worst (skip)
            # -2, every path between 1; the price term then tells them apart by cost
            q = [reg.get(i).quality for i in range(self.n_paths)]
            prior = [2.0 if v == min(q) else -2.0 if v == max(q) else 1.0 for v in q]
            self.hest_a0.copy_(torch.tensor(prior))
            self.hest_m.copy_(torch.tensor([0.5, -2.0, 0.0]))

    def set_costs(self, prefill: torch.Tensor, decode: torch.Tensor) -> None:
        """prefill, decode: (L, P) joules per unit (or any positive unit): rc = c / c_fp16.

        Raises ValueError for a shape other than (L, P) or a non-positive fp16 cost."""
        pre, dec = torch.as_tensor(prefill).float(), torch.as_tensor(decode).float()
        if pre.shape != self.rc.shape[1:] or dec.shape != self.rc.shape[1:]:
            raise ValueError(
                f"costs must be 2 x {tuple(self.rc.shape[1:])}, got {tuple(pre.shape)} and "
                f"{tuple(dec.shape)}"
            )
        costs = torch.stack([pre, dec])
        if not bool((costs[..., 0] > 0).all()):
            raise ValueError("the fp16 cost of every unit must be > 0")
        self.rc.copy_((costs / costs[..., :1]).to(self.rc.device))

    def price(self, beta: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """(N,) beta, (N,) phase -> (N,) price >= 0."""
        m = self.hest_m
        return torch.nn.functional.softplus(m[0] + m[1] * beta + m[2] * phase)

    def forward(
        self, h: torch.Tensor, layer: int, beta: torch.Tensor, phase: torch.Tensor | None = None
    ) -> torch.Tensor:
        """h: (N, d), beta: (N,), phase: (N,) 0/1 (None: prompt tokens) -> logits (N, P) fp32."""
        beta = beta.float()
        ph = torch.zeros_like(beta) if phase is None else phase.float().reshape(beta.shape)
        tok = torch.sigmoid(h.float() @ self.hest_w_tok.t())  # (N, k)
        lay = torch.sigmoid(
            self.hest_w_layer[layer] + self.hest_u * beta[:, None] + self.hest_v * ph[:, None]
        )  # (N, k)
        q = (tok * lay) @ self.hest_a.t() + self.hest_a0 + ph[:, None] * self.hest_b  # (N, P)
        rc = self.rc[0, layer] + ph[:, None] * (self.rc[1, layer] - self.rc[0, layer])  # (N, P)
        return q - self.price(beta, ph)[:, None] * rc

    def for_rows(self, betas: list[float], ns: list[int], phase: int):
        """The per-layer logits of a forward whose rows come in groups of one request each:
        group g holds ns[g] rows with budget term betas[g], all at `phase` (0 prefill, 1
        decode). Returns logits(layer, h (N, d)) -> (N, P) fp32, the same as `forward` of those
        rows up to float rounding (what depends on beta and phase alone, `parts`, is worked out
        once per forward for all the requests instead of per row and layer: the products over
        h are what is left per layer; a 556-token prefill spent 9.4 ms in `forward`, 2 threads,
        session 16)."""
        lay, bias = self.parts(betas, phase)  # (L, G, k), (L, G, P)
        if len(ns) > 1:
            n = torch.tensor(ns, device=self.rc.device)
            lay, bias = lay.repeat_interleave(n, dim=1), bias.repeat_interleave(n, dim=1)
        w, a = self.hest_w_tok.float(), self.hest_a.float()

        def logits(layer: int, h: torch.Tensor) -> torch.Tensor:
            tok = torch.sigmoid(h.float() @ w.t())  # (N, k)
            return torch.addmm(bias[layer], tok * lay[layer], a.t())  # (N, P)

        return logits

    def parts(self, betas: list[float], phase: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For G requests at `phase` with budget terms betas: lay (L, G, k) and the additive
        term of the logits (L, G, P), so request g's logits at layer l are (sigmoid(W_tok h) *
        lay[l, g]) @ A^T + bias[l, g]."""
        with torch.no_grad():
            b = torch.tensor(betas, dtype=torch.float32, device=self.rc.device)  # (G,)
            lay = torch.sigmoid(
                self.hest_w_layer[:, None, :] + self.hest_u * b[:, None] + self.hest_v * phase
            )  # (L, G, k)
            price = self.price(b, torch.full_like(b, float(phase)))  # (G,)
            bias = (self.hest_a0 + phase * self.hest_b)[None, None, :] - price[
                None, :, None
            ] * self.rc[phase][:, None, :]  # (L, G, P)
        return lay.float(), bias.float()

    def native_parts(self, beta: float, phase: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For one row at `phase`: lay (L, k) and the additive term of the logits (L, P), so the
        logits at layer l are (sigmoid(W_tok h) * lay[l]) @ A^T + bias[l] (what hest_ctl_logits
        computes with a per-layer a0): `parts` of one request."""
        lay, bias = self.parts([beta], phase)
        return lay[:, 0], bias[:, 0]


# controller name (HestConfig.controller, else HestConfig.method) -> class; baselines register
# theirs here. Each class takes (hidden, n_layers, k) and maps (h (N, d), layer, beta (N,),
# phase (N,) or None) -> logits (N, P), P = paths.n_paths().
CONTROLLERS: dict[str, type[nn.Module]] = {
    "hest": Controller,
    "hest-fp16only": Controller,
    "hest-no-dual": Controller,
    "adaptive": AdaptiveController,
}


def build_controller(name: str, hidden: int, n_layers: int, k: int) -> nn.Module:
    """The controller class registered as `name` (an artifact's `controller`, else its method).

    Raises AdapterMismatchError for a name with no class."""
    from ..errors import AdapterMismatchError

    if name not in CONTROLLERS:
        raise AdapterMismatchError(
            f"adapter controller {name!r} has no controller class; known: {sorted(CONTROLLERS)}",
            param="adapter",
        )
    return CONTROLLERS[name](hidden, n_layers, k)


# ---- baselines and ablations (training/; appended, existing code above unchanged) -------------
NEG_LOGIT = -1e4  # logit of a path a method never uses


def _fp16_skip(two: torch.Tensor) -> torch.Tensor:
    """(N, 2) logits of fp16 and skip (the {skip, fp16} baselines) -> (N, P), NEG_LOGIT on every
    other path."""
    out = torch.full((two.shape[0], reg.n_paths()), NEG_LOGIT, dtype=two.dtype, device=two.device)
    out[:, [reg.index("fp16"), reg.index("skip")]] = two
    return out


class UnfactorisedController(nn.Module):
    """Ablation `hest-unfactorised`: a separate d x k feature map per layer, budget-conditioned.

    f = sigmoid(W_l h + u_l beta + b_l), logits = A_l f + a0_l.  Parameters L (d k + 2k + Pk + P).
    """

    def __init__(self, hidden: int, n_layers: int, k: int = 32):
        super().__init__()
        self.hidden, self.n_layers, self.k = hidden, n_layers, k
        self.hest_w = nn.Parameter(torch.zeros(n_layers, k, hidden))  # (L, k, d)
        self.hest_u = nn.Parameter(torch.zeros(n_layers, k))  # (L, k)
        self.hest_b = nn.Parameter(torch.zeros(n_layers, k))
        P = reg.n_paths()
        self.hest_a = nn.Parameter(torch.zeros(n_layers, P, k))  # (L, P, k)
        self.hest_a0 = nn.Parameter(_untrained().repeat(n_layers, 1))  # (L, P)

    def init_for_training(self, seed: int = 0, std: float = 0.02) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.hest_w.normal_(0.0, std, generator=g)
            self.hest_a.normal_(0.0, std, generator=g)
            self.hest_a0.copy_(_priors().repeat(self.n_layers, 1))

    def forward(self, h: torch.Tensor, layer: int, beta: torch.Tensor, phase=None) -> torch.Tensor:
        f = torch.sigmoid(
            h.float() @ self.hest_w[layer].t()
            + self.hest_u[layer] * beta[:, None]
            + self.hest_b[layer]
        )  # (N, k)
        return f @ self.hest_a[layer].t() + self.hest_a0[layer]  # (N, P)


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

    def forward(self, h: torch.Tensor, layer: int, beta: torch.Tensor, phase=None) -> torch.Tensor:
        f = torch.sigmoid(h.float() @ self.hest_w[layer].t() + self.hest_b[layer])  # (N, k)
        two = f @ self.hest_a[layer].t() + self.hest_a0[layer]  # (N, 2)
        return _fp16_skip(two)  # (N, P)


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

    def forward(self, h: torch.Tensor, layer: int, beta: torch.Tensor, phase=None) -> torch.Tensor:
        two = self.hest_state[layer] + self.hest_slope[layer] * beta[:, None]  # (N, 2)
        return _fp16_skip(two)  # (N, P)


CONTROLLERS["hest-unfactorised"] = UnfactorisedController
CONTROLLERS["tabs"] = TabsController
CONTROLLERS["bhsp"] = BhspController
