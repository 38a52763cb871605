"""The tensor operations of the decoder outside the per-path products: the 16-bit product
(`linear16`: native kernel, oneDNN or PyTorch), RMS norm and rotary embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native


def linear16(
    x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor | None, bias=None
) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T in 16-bit: the native small-M kernel at decode where it is built,
    oneDNN with prepacked weights on CPU otherwise, F.linear elsewhere."""
    if x.device.type == "cpu" and native.fits(x, w.shape[0]):
        nat = native.get()
        if nat is not None:
            return nat.gemv16(x, w, bias)
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, w, bias)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As HF LlamaRMSNorm: statistics in fp32, result cast back, then scaled."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, hd); cos/sin: (N, 1, hd) in x's dtype."""
    return x * cos + _rotate_half(x) * sin
