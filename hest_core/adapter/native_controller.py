"""The controller's per-row logits at decode in C (`hest_ctl_logits`, kernels/layer.c), for the
controller classes that have a native form (`NativeController.of` says which)."""

from __future__ import annotations

import ctypes
import weakref

import torch

from ..exec import native
from .controller import AdaptiveController, Controller

_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_of(ctl) -> tuple[torch.Tensor, torch.Tensor]:
    """The controller's W_tok (k, d) and A (P, k) as contiguous fp32, made once per controller."""
    w = _WEIGHTS.get(ctl)
    if w is None:
        with torch.no_grad():
            w = tuple(t.detach().float().contiguous() for t in (ctl.hest_w_tok, ctl.hest_a))
        _WEIGHTS[ctl] = w
    return w


def _fits(ctl, classes: tuple) -> bool:
    """Whether `ctl` (one of `classes`) runs in C here: native kernels on, shapes in range."""
    if type(ctl) not in classes or native.get() is None or getattr(native._off, "v", False):
        return False
    return (
        ctl.hest_a.shape[0] <= 16
        and ctl.k <= 256
        and ctl.hidden <= 4096
        and (ctl.hest_w_tok.device.type == "cpu")
    )


class NativeController:
    """A controller's logits for one row at decode, in C (hest_ctl_logits): one call per layer
    instead of ~8 PyTorch operators. For the factorised `Controller`, `lay` = sigmoid(w_layer +
    u beta) is made once per request and the additive term is a0 at every layer; for the
    `AdaptiveController`, `update(beta)` remakes both (L, k) and (L, P) at every decode step
    (its beta is the request's remaining ratio). Other classes (the baselines') stay in PyTorch."""

    def __init__(self, ctl, beta: float):
        w = _weights_of(ctl)
        self._keep, self.ctl = w, ctl
        self.adaptive = bool(getattr(ctl, "uses_remaining", False))
        self.k, self.d = ctl.k, ctl.hidden
        L, P = ctl.hest_w_layer.shape[0], ctl.hest_a.shape[0]  # layers, paths
        self.P = P
        self.lay = torch.empty(L, self.k, dtype=torch.float32)
        self.bias = torch.empty(L, P, dtype=torch.float32)
        self.update(beta)
        self.out = (ctypes.c_float * P)()
        self._args = (w[0].data_ptr(), w[1].data_ptr())
        self._lay0, self._bias0 = self.lay.data_ptr(), self.bias.data_ptr()
        self._out = ctypes.addressof(self.out)
        nat = native.get()
        assert nat is not None
        self._call = nat.ctl_logits

    def update(self, beta: float) -> None:
        """Set the request's beta for the next decode step (in place: the pointers stay)."""
        ctl = self.ctl
        with torch.no_grad():
            if self.adaptive:
                lay, bias = ctl.native_parts(beta, 1)
            else:
                lay = torch.sigmoid(ctl.hest_w_layer + ctl.hest_u * beta)
                bias = ctl.hest_a0.expand(self.bias.shape)
            self.lay.copy_(lay)
            self.bias.copy_(bias)

    @classmethod
    def of(cls, ctl, beta: float) -> NativeController | None:
        return cls(ctl, beta) if _fits(ctl, (Controller, AdaptiveController)) else None

    def logits(self, li: int, h: torch.Tensor) -> list[float]:
        """(P,) logits of one row. h: (1, d) contiguous bf16 on CPU; li in 0..n_layers-1.
        Raises NativeArgumentError for another h or layer."""
        if not h.is_contiguous():
            h = h.contiguous()
        ok = h.dtype == torch.bfloat16 and h.numel() == self.d and 0 <= li < self.lay.shape[0]
        if not ok:
            native.need(False, "ctl_logits", f"h must be bf16 of {self.d}, layer {li} known")
        w_tok, a = self._args
        rc = self._call(
            w_tok,
            self._lay0 + li * self.k * 4,
            a,
            self._bias0 + li * self.P * 4,
            self.k,
            self.d,
            self.P,
            h.data_ptr(),
            self._out,
        )
        if rc:
            native.check(rc, "ctl_logits")
        return self.out[:]


class NativeRows:
    """The paths of a decode step's rows, one row per request, from the budget-adaptive
    controller's logits in C (`hest_ctl_rows`): one call per layer for all rows (the PyTorch
    form, `AdaptiveController.for_rows`, ran ~6 operators and an argmax per layer). Row m's
    logits come from the same C code as `NativeController`'s for that request alone, on its
    per-request terms (`AdaptiveController.parts`) worked out for all rows at once: equal to
    those alone within float rounding (PyTorch's vectorised sigmoid can round the last bit
    differently at another position of a longer tensor), as the PyTorch form was. Built per
    decode step (betas change every step); `of` says where it applies (None: stay in PyTorch)."""

    def __init__(self, ctl, betas: list[float], sub_rows: list[list[int]] | None):
        self._keep = _weights_of(ctl)
        self.k, self.d, self.P, self.n = ctl.k, ctl.hidden, ctl.hest_a.shape[0], len(betas)
        lay, bias = ctl.parts(betas, 1)  # (L, n, k), (L, n, P): decode
        self.lay, self.bias = lay.contiguous(), bias.contiguous()
        self.sub = None if sub_rows is None else torch.tensor(sub_rows, dtype=torch.long)
        self.out = torch.empty(self.n, self.P, dtype=torch.float32)  # the last layer's logits
        nat = native.get()
        assert nat is not None
        self._call = nat.ctl_rows

    @classmethod
    def of(cls, ctl, betas: list[float], sub_rows) -> NativeRows | None:
        """A NativeRows for the `AdaptiveController` where the native kernels run and the
        shapes fit them (rows up to `native.LIMIT_ROWS`); else None."""
        if not (_fits(ctl, (AdaptiveController,)) and 1 <= len(betas) <= native.LIMIT_ROWS):
            return None
        return cls(ctl, betas, sub_rows)

    def paths(self, li: int, h: torch.Tensor) -> torch.Tensor:
        """(n,) int64 path codes of the step's n rows at layer li (the first largest logit, then
        the table's substitution); h (n, d) bf16 on CPU. Raises NativeArgumentError for
        another h or layer."""
        if not h.is_contiguous():
            h = h.contiguous()
        ok = h.dtype == torch.bfloat16 and tuple(h.shape) == (self.n, self.d)
        if not (ok and 0 <= li < self.lay.shape[0]):
            native.need(False, "ctl_rows", f"h must be ({self.n}, {self.d}) bf16, layer {li} known")
        paths = torch.empty(self.n, dtype=torch.long)
        rc = self._call(
            self._keep[0].data_ptr(),
            self.lay[li].data_ptr(),
            self._keep[1].data_ptr(),
            self.bias[li].data_ptr(),
            None if self.sub is None else self.sub[li].data_ptr(),
            self.k,
            self.d,
            self.P,
            self.n,
            h.data_ptr(),
            self.out.data_ptr(),
            paths.data_ptr(),
        )
        if rc:
            native.check(rc, "ctl_rows")
        return paths
