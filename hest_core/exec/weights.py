"""The weights of a Llama-layout decoder as the runtime holds them: the shapes (`ModelSpec`), one
layer's copies per path (`LayerWeights`: 16-bit, int8, int4, the skip shortcut), and the seven
projections an adapter changes (`TARGETS`; `target_module` finds one in a Hugging Face model,
`merge_delta` is a low-rank change to one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import HestError
from .quant import Int8Linear

if TYPE_CHECKING:
    from .int4 import Int4Linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    qk_norm: bool
    max_positions: int

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


@dataclass
class LayerWeights:
    ln1: torch.Tensor  # (d,)
    ln2: torch.Tensor  # (d,)
    wqkv: torch.Tensor  # (q_dim + 2 kv_dim, d)
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # (d, q_dim)
    wgu: torch.Tensor  # (2 I, d)
    wdown: torch.Tensor  # (d, I)
    q_norm: torch.Tensor | None = None  # (head_dim,) Qwen3
    k_norm: torch.Tensor | None = None
    qkv8: Int8Linear | None = None
    o8: Int8Linear | None = None
    gu8: Int8Linear | None = None
    down8: Int8Linear | None = None
    qkv4: Int4Linear | None = None  # Q4_1 copies, built by int4.attach where int4 is enabled
    o4: Int4Linear | None = None
    gu4: Int4Linear | None = None
    down4: Int4Linear | None = None
    shortcut: tuple[torch.Tensor, torch.Tensor] | None = None  # (R, d), (d, R)
    packed: dict[str, torch.Tensor] = field(default_factory=dict)  # oneDNN-prepacked 16-bit weights

    def pack(self) -> None:
        """Prepack the dense 16-bit weights for oneDNN (CPU): same results as F.linear, bit for
        bit, without re-laying the weight out on every call."""
        for name in ("wqkv", "wo", "wgu", "wdown"):
            self.packed[name] = torch.ops.mkldnn._reorder_linear_weight(getattr(self, name), 1)

    def build_int8(self, act_dtype: torch.dtype) -> None:
        self.qkv8 = Int8Linear.from_weight(self.wqkv, self.bqkv, act_dtype)
        self.o8 = Int8Linear.from_weight(self.wo, None, act_dtype)
        self.gu8 = Int8Linear.from_weight(self.wgu, None, act_dtype)
        self.down8 = Int8Linear.from_weight(self.wdown, None, act_dtype)

    def int8_linears(self) -> list[Int8Linear]:
        return [m for m in (self.qkv8, self.o8, self.gu8, self.down8) if m is not None]

    def int4(self, name: str) -> Int4Linear:
        """The int4 copy `name` (qkv4, o4, gu4, down4); raises HestError where none was built."""
        m = getattr(self, name)
        if m is None:
            raise HestError(
                "a unit took the int4 path but this model has no int4 weights: enable the path "
                "before loading (HEST_PATHS=fp16,int8,int4,skip or Engine.from_pretrained(paths=...))"
            )
        return m


def target_module(hf, li: int, target: str) -> torch.nn.Linear:
    layer = hf.model.layers[li]
    part = layer.self_attn if target in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
    return getattr(part, target)


def merge_delta(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """U diag(s z) V^T: (out, r) (r,) (r, in) (r,) -> (out, in)."""
    return (u * (s * z)[None, :]) @ vh
