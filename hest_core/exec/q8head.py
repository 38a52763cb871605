"""The lm_head at decode from the model's own Q8_0 blocks (`hest_head_q8`, kernels/head.c).

The default model's GGUF stores the tied embedding (the lm_head) as Q8_0: per 32 weights along
the input an fp16 scale d and 32 int8 codes q, w = d * q (34 bytes on disk). Its 16-bit copy is
those blocks dequantized and rounded to bf16, so a kernel that reads the blocks, rounds d * q to
bf16 in registers and then runs the 16-bit kernel's own product loop returns the same logits bit
for bit while reading 34 bytes per 32 weights instead of 64: 30.1 MB a decode step instead of
56.6 on the default model (49152 x 576), about a third of an int4 step's bytes.

`attach(lean, head)` keeps the blocks on the LeanModel (`lean.head_q8`) only where they
reproduce its 16-bit head exactly (checked at load); `LeanModel.logits` then takes them wherever
the 16-bit head would have run on the native kernel (`native.fits`: one row), and everything else
(prefill, several rows, native off) stays on `linear16`, unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .gguf_blocks import BLOCK, default_gguf

if TYPE_CHECKING:
    from .model import LeanModel

log = logging.getLogger("hest.q8head")

BLOCK_BYTES = 34  # fp16 d, 32 int8 codes


@dataclass
class Q8Head:
    """Q8_0 blocks of an (N, K) weight split for the kernel: codes (N, K) int8, scales
    (N, K/32) fp16."""

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per call (what a decode step streams for its logits)."""
        return self.codes.numel() + self.scales.numel() * 2

    def dequantized(self) -> torch.Tensor:
        """w = d * q in fp32 (N, K): exact (11 and 8 significant bits)."""
        n, k = self.codes.shape
        w = self.codes.float().view(n, k // BLOCK, BLOCK) * self.scales.float()[..., None]
        return w.reshape(n, k)


def from_raw(raw: np.ndarray) -> Q8Head:
    """Q8_0 bytes as stored in GGUF, (N, K/32 * 34) uint8 -> Q8Head (copied)."""
    n, nbytes = raw.shape
    if nbytes % BLOCK_BYTES:
        raise ValueError(f"a Q8_0 row of {nbytes} bytes is not whole 34-byte blocks")
    b = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)).view(n, -1, BLOCK_BYTES)
    scales = b[..., 0:2].contiguous().view(torch.float16)[..., 0].contiguous()
    codes = b[..., 2:].contiguous().view(torch.int8).reshape(n, -1).contiguous()
    return Q8Head(codes, scales)


def quantize_q8_0(w: torch.Tensor) -> Q8Head:
    """llama.cpp's Q8_0 of w (N, K), K % 32 == 0: d = fp16(max|w| / 127) per block, q =
    round(w / d) (tests, and models that ship no blocks)."""
    n, k = w.shape
    g = w.float().reshape(n, k // BLOCK, BLOCK)
    d = (g.abs().amax(-1) / 127).half()
    inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros(()))
    q = torch.round(g * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return Q8Head(q.reshape(n, k).contiguous(), d.contiguous())


def read_gguf_head(path: str | Path | None = None, reader=None) -> Q8Head | None:
    """The lm_head's Q8_0 blocks of a GGUF file (`output.weight`, else the tied
    `token_embd.weight`), or None where it is stored otherwise. `reader`: an open
    `gguf.GGUFReader` of the file, else one is opened."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = reader or GGUFReader(str(path or default_gguf()))
    tensors = {t.name: t for t in reader.tensors}
    t = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if t is None or t.tensor_type != GGMLQuantizationType.Q8_0:
        return None
    return from_raw(np.asarray(t.data))


def attach(lean: LeanModel, head: Q8Head | None) -> bool:
    """Keep `head` as `lean.head_q8` if it reproduces the 16-bit lm_head exactly (its blocks
    dequantized and rounded to the model's dtype equal it, element for element) and the model
    runs bf16 on the CPU; returns whether it was kept."""
    lean.head_q8 = None
    w = lean.lm_head
    if head is None or lean.dtype != torch.bfloat16 or lean.device.type != "cpu":
        return False
    if head.codes.shape != tuple(w.shape) or w.shape[1] % BLOCK:
        return False
    if not torch.equal(head.dequantized().to(w.dtype), w):
        log.warning("the GGUF's Q8_0 lm_head differs from the loaded one: decode keeps bf16")
        return False
    lean.head_q8 = head
    return True
