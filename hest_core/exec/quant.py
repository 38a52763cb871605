"""INT8 weights (per output channel) and the two int8 kernels of the `int8` path.

* W8A8: activations quantised per token (one scale per row), int8 x int8 -> int32 with
  `torch._int_mm`, then rescaled. Compute-bound work (prefill) gains most.
* weight-only: 16-bit activations against the int8 weights: the native kernel (native.py;
  activations widened to int16 per row, finer than bf16) where it is built, else
  `_weight_int8pack_mm`. Memory-bound work (decode at small batch) gains from it.

Which kernel runs for which row count is a measured choice stored in the calibration table
(`Int8Linear.woq_max_rows`); 0 means W8A8 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import native

QMAX = 127.0


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8. w: (N, K) -> (int8 (N, K), fp32 scales (N,))."""
    wf = w.float()
    scale = wf.abs().amax(dim=1).clamp_min(1e-12) / QMAX  # (N,)
    q = torch.round(wf / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) symmetric int8. x: (M, K) -> (int8 (M, K), fp32 scales (M, 1))."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / QMAX  # (M, 1)
    q = torch.round(xf / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Quantise-dequantise with a straight-through gradient (training)."""
    scale = w.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / QMAX
    wq = torch.round(w / scale).clamp(-QMAX, QMAX) * scale
    return w + (wq - w).detach()


def fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / QMAX
    xq = torch.round(x / scale).clamp(-QMAX, QMAX) * scale
    return x + (xq - x).detach()


@dataclass
class Int8Linear:
    """An int8 copy of one (possibly fused) linear layer, y = x W^T + b."""

    q: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N,) fp32
    scale_half: torch.Tensor  # (N,) in the activation dtype (weight-only kernel wants it)
    bias: torch.Tensor | None  # (N,) activation dtype
    woq_max_rows: int = 0

    @classmethod
    def from_weight(
        cls, w: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype
    ) -> Int8Linear:
        q, scale = quantize_weight(w)
        return cls(
            q=q.contiguous(),
            scale=scale,
            scale_half=scale.to(act_dtype),
            bias=None if bias is None else bias.to(act_dtype),
            woq_max_rows=0,
        )

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (M, K) in the activation dtype -> (M, N) in the same dtype."""
        m = x.shape[0]
        if m <= self.woq_max_rows and x.device.type == "cpu":
            nat = native.get() if native.fits(x, self.q.shape[0]) else None
            if nat is not None:
                return nat.gemv8(x, self.q, self.scale, self.bias)
            y = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale_half)
        else:
            y = w8a8_matmul(x, self.q, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y


def w8a8_matmul(x: torch.Tensor, wq: torch.Tensor, wscale: torch.Tensor) -> torch.Tensor:
    """(M, K) x int8 (N, K) with per-token activation scales -> (M, N) in x's dtype."""
    xq, xs = quantize_rows(x)
    if x.device.type == "cuda" and x.shape[0] <= 16:
        # cuBLAS int8 GEMM wants M > 16; pad rows (zeros contribute nothing)
        pad = torch.zeros(17 - x.shape[0], xq.shape[1], dtype=torch.int8, device=x.device)
        acc = torch._int_mm(torch.cat([xq, pad]), wq.t())[: x.shape[0]]
    else:
        acc = torch._int_mm(xq, wq.t())  # (M, N) int32; wq.t() is the column-major view
    return (acc.float() * xs * wscale).to(x.dtype)
