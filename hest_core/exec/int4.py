"""The `int4` path's weights in the runtime (issue 13): Q4_1 copies of the seven projections.

Opt-in (`paths.OPTIONAL`, `HEST_PATHS=fp16,int8,int4,skip`): when the path is registered, the
engine calls `attach` after `build_lean`, which gives every layer four `Int4Linear`s (fused
q|k|v, o, fused gate|up, down) beside its 16-bit and int8 copies.

Weights: the base model's own Q4_1 blocks where it ships them (the default model's GGUF,
`gguf_blocks.read_gguf_q4`; taken only where they dequantize exactly to the weight loaded, so
nothing else is silently served), else `quantize_q4_1` at load. The adapter's spectral z
(W' = W + U diag(s z) V^T) enters one of two ways (`MODES`, measured in docs/runtime.md):
* "lowrank": the base blocks as they are, plus x V diag(s z) U^T beside the 4-bit product
  (rank = the z support of that weight): fp16-with-z up to the 4-bit error of W alone;
* "merged": W' requantized to Q4_1 (one product, but the 4-bit grid no longer the shipped one);
* "plain": the base blocks alone, z left out: the int4 path serves the base model at its 4-bit
  cost while the 16-bit and int8 copies carry z (an adapter trained with `--int4-z plain`
  chooses per unit between z's quality and int4's price; its config's `int4_mode`).

Numerics of `Int4Linear.__call__` (x in the model's 16-bit dtype):
* 1..16 rows in bf16 on CPU with the kernel built (decode, short prefill chunks): `hest_gemv_q4`
  (q4.c): weights exact, activations quantised per row to int16 (step max|x|/16383), fp32 sums,
  bf16 output rounded once;
* otherwise (prefill, no AVX-512, CUDA): the blocks dequantized once at load to the 16-bit dtype
  (d*q + m in fp32, then rounded to bf16: relative error <= 2^-9 per weight) and the 16-bit GEMM
  (oneDNN, prepacked, fp32 accumulation). Prefill on int4 therefore costs what fp16 costs; the
  calibration measures it, and the energy model runs int8 instead where int8 costs no more;
* the low-rank term in x's dtype: two thin products (R <= the z support, 16 for the default
  adapter) added to the 4-bit product's output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import q4, q8head
from .gguf_blocks import Q4Blocks, default_gguf, quantize_q4_1, read_gguf_q4
from .loading import DEFAULT_MODEL
from .weights import merge_delta, target_module

if TYPE_CHECKING:
    from ..adapter.spectral import SvdCache
    from .model import LeanModel

log = logging.getLogger("hest.int4")

MODES = ("lowrank", "merged", "plain")
DEFAULT_MODE = "lowrank"  # why: docs/runtime.md, "The int4 path"
# fused projection -> (the LayerWeights 16-bit copy it shadows, the targets stacked in it)
GROUPS = {
    "qkv4": ("wqkv", ("q_proj", "k_proj", "v_proj")),
    "o4": ("wo", ("o_proj",)),
    "gu4": ("wgu", ("gate_proj", "up_proj")),
    "down4": ("wdown", ("down_proj",)),
}


@dataclass
class LowRank:
    """The adapter's change beside a 4-bit product: x (M, K) -> (x a^T) b^T, (M, N)."""

    a: torch.Tensor  # (R, K) rows of diag(s z) V^T of each adapted target, stacked
    b: torch.Tensor  # (N, R) each target's U in its own rows of the fused output, zeros elsewhere


@dataclass
class Int4Linear:
    """A Q4_1 copy of one (possibly fused) linear, y = x W4^T (+ low-rank change) + bias."""

    w: q4.Q4Weight  # packed for hest_gemv_q4
    dense: torch.Tensor  # (N, K) the same weights dequantized, in the 16-bit dtype
    packed: torch.Tensor | None  # oneDNN-prepacked `dense` (CPU bf16), else None
    bias: torch.Tensor | None  # (N,) 16-bit
    low: LowRank | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) in the 16-bit dtype -> (M, N) in the same dtype (numerics: module doc)."""
        m = x.shape[0]
        kern = None
        if 1 <= m <= q4.MAX_ROWS and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            kern = q4.get()
        if kern is not None:
            y = kern.gemv(x, self.w, self.bias)
        elif self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.dense, self.bias)
        if self.low is not None:
            y = y + F.linear(F.linear(x, self.low.a), self.low.b)  # (M, R) -> (M, N)
        return y

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same product on the dequantized weights in fp32 (tests): (M, K) -> (M, N) fp32."""
        y = F.linear(
            x.float(), self.w.dequantized(), None if self.bias is None else self.bias.float()
        )
        if self.low is not None:
            y = y + F.linear(F.linear(x.float(), self.low.a.float()), self.low.b.float())
        return y


def base_blocks(hf, gguf: list[dict[str, Q4Blocks]] | None) -> tuple[list[dict], int]:
    """Q4_1 blocks of every target of `hf` (unmerged base weights): the GGUF's where given and
    equal to the loaded weight once dequantized, else `quantize_q4_1` of it. Returns (a list over
    layers of {target: Q4Blocks}, how many came from the GGUF)."""
    out, shipped = [], 0
    for li in range(len(hf.model.layers)):
        row = {}
        for _, targets in GROUPS.values():
            for t in targets:
                w = target_module(hf, li, t).weight.detach().float()
                b = gguf[li].get(t) if gguf is not None and li < len(gguf) else None
                if b is not None and b.shape == tuple(w.shape) and torch.equal(b.dequantize(), w):
                    row[t], shipped = b, shipped + 1
                else:
                    row[t] = quantize_q4_1(w)
        out.append(row)
    if gguf is not None and shipped < len(out) * 7:
        log.warning(
            "%d of %d GGUF Q4_1 weights differ from the loaded model: quantized those at load",
            len(out) * 7 - shipped,
            len(out) * 7,
        )
    return out, shipped


def _z_factors(z, svd, li: int, t: str):
    """(U (n, R), s z (R,), Vh (R, K)) of target t in layer li trimmed to its z support, or None
    where its z is zero."""
    if z is None or t not in z:
        return None
    zt = z[t][li].float()
    nz = (zt != 0).nonzero()
    if nz.numel() == 0:
        return None
    r = int(nz.max()) + 1
    u, s, vh = svd.factors(li, t)
    if r > s.numel():
        raise ValueError(f"z of {t} reaches past the {s.numel()} cached singular directions")
    return u[:, :r], s[:r] * zt[:r], vh[:r]


def _group(hf, blocks: dict, targets, z, svd, li: int, mode: str, dtype, device):
    """(stacked Q4Blocks, LowRank or None) of one fused projection."""
    parts, a_rows, b_cols, rows = [], [], [], []
    n_total = sum(blocks[t].shape[0] for t in targets)
    off = 0
    for t in targets:
        b, f = blocks[t], _z_factors(z, svd, li, t)
        n = b.shape[0]
        if f is not None and mode == "merged":
            u, sz, vh = f
            w = target_module(hf, li, t).weight.detach().float()
            b = quantize_q4_1(w + merge_delta(u, sz, vh, torch.ones_like(sz)))  # W' to Q4_1
        elif f is not None:
            u, sz, vh = f
            a_rows.append(sz[:, None] * vh)  # (R_t, K)
            col = torch.zeros(n_total, u.shape[1])
            col[off : off + n] = u
            b_cols.append(col)
        parts.append(b)
        rows.append(n)
        off += n
    low = None
    if a_rows:
        low = LowRank(
            torch.cat(a_rows).to(device, dtype).contiguous(),
            torch.cat(b_cols, dim=1).to(device, dtype).contiguous(),
        )
    return Q4Blocks.cat(parts), low


def attach(
    lean: LeanModel,
    hf,
    gguf: list[dict[str, Q4Blocks]] | None = None,
    z: dict[str, torch.Tensor] | None = None,
    svd: SvdCache | None = None,
    mode: str = DEFAULT_MODE,
) -> dict:
    """Give every layer of `lean` its int4 copies (`LayerWeights.qkv4, o4, gu4, down4`), from the
    base weights of `hf` (fp32, unmerged), the shipped blocks `gguf` where they match, and the
    adapter's z (target -> (L, r), with its `svd` factors) applied as `mode` says. Returns what
    was done (for the engine's info). Raises ValueError for an unknown mode or z past the SVD."""
    if mode not in MODES:
        raise ValueError(f"int4 mode {mode!r} is not one of {MODES}")
    if mode == "plain":
        z = None
    if z is not None and all(float(v.abs().max()) == 0 for v in z.values()):
        z = None
    blocks, shipped = base_blocks(hf, gguf)
    dt, dev = lean.dtype, lean.device
    pack = dev.type == "cpu" and dt == torch.bfloat16 and torch.backends.mkldnn.is_available()
    rank = 0
    for li, lw in enumerate(lean.layers):
        for name, (dense_name, targets) in GROUPS.items():
            b, low = _group(hf, blocks[li], targets, z, svd, li, mode, dt, dev)
            dense = b.dequantize().to(dev, dt)
            packed = None
            if torch.equal(dense, getattr(lw, dense_name)):  # the 16-bit copy is the same grid
                dense, packed = getattr(lw, dense_name), lw.packed.get(dense_name)
            elif pack:
                packed = torch.ops.mkldnn._reorder_linear_weight(dense, 1)
            bias = lw.bqkv if name == "qkv4" else None
            setattr(lw, name, Int4Linear(q4.pack(b), dense.contiguous(), packed, bias, low))
            rank = max(rank, 0 if low is None else low.a.shape[0])
    n = len(lean.layers) * 7
    return {
        "weights": f"{shipped} of {n} from the model's Q4_1 blocks, {n - shipped} quantized at load",
        "adapter": "none" if z is None else mode,
        "lowrank_rows": rank,
        "kernel": q4.status() if dev.type == "cpu" else "off (not a CPU device)",
    }


def attach_for_model(
    lean: LeanModel, hf, model: str, z=None, svd: SvdCache | None = None, mode: str = DEFAULT_MODE
) -> dict:
    """`attach` as the engine and `python -m hest_core.energy.calibrate` do it: the GGUF blocks of the
    default model (read ~2 s), quantization at load for any other; `DEFAULT_MODE` for z. The
    default model's lm_head also gets its Q8_0 blocks (q8head.py: the same logits at decode from
    ~half the bytes)."""
    if model != DEFAULT_MODEL:
        return attach(lean, hf, None, z, svd, mode)
    from gguf import GGUFReader

    reader = GGUFReader(str(default_gguf()))
    info = attach(lean, hf, read_gguf_q4(reader=reader), z, svd, mode)
    info["lm_head"] = (
        "Q8_0" if q8head.attach(lean, q8head.read_gguf_head(reader=reader)) else "bf16"
    )
    return info


def lowrank_factors(lean: LeanModel) -> dict[str, list[float]] | None:
    """What each layer's int4 unit costs with the adapter's low-rank term over what it costs
    without it, by the work the term adds (issue 14): {"prefill": (L,), "decode": (L,)}, 1.0
    where a layer has no term; None where the model has no int4 copies.

    decode (memory-bound: a step reads every weight once) = (Q4_1 bytes + the term's bytes) / Q4_1
    bytes, the term's bytes being a's and b's nonzero entries (the fused layer skips b's zeros,
    module doc) at their element size; prefill (compute-bound GEMMs) = (N K + the term's
    multiply-adds R K + nnz(b)) / N K per row. A model of the term's cost, not a measurement:
    docs/runtime.md ("The int4 path with a trained z") compares it with measured decode steps."""
    out: dict[str, list[float]] = {"prefill": [], "decode": []}
    for lw in lean.layers:
        mods = [getattr(lw, n, None) for n in GROUPS]
        if any(m is None for m in mods):
            return None
        q4b = lowb = macs = extra = 0
        for m in mods:
            q4b += m.w.nbytes
            macs += m.w.n * m.w.k
            if m.low is not None:
                nz = int(m.low.a.numel()) + int(torch.count_nonzero(m.low.b))
                lowb += nz * m.low.a.element_size()
                extra += nz
        out["decode"].append(1.0 + lowb / q4b)
        out["prefill"].append(1.0 + extra / macs)
    return out
