"""A lean Llama-layout decoder that runs each (layer, token) unit on its own path.

Weights are pulled out of a Hugging Face model once: fused q/k/v and gate/up projections in the
16-bit dtype, plus int8 copies (per output channel) for the `int8` and `skip` paths. The forward
works on a flat list of tokens from any number of sequences, so every path runs as one matmul
over the rows of the whole batch that chose it.

Paths, their indices and how each runs: `paths.py` (the registry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import native
from . import paths as reg
from .errors import CacheOverflowError, HestError
from .fused import FusedDecode
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


@dataclass
class Routing:
    """Rows of one layer grouped by path (indices of the registry, `paths.py`). `only` is set
    when every row took one path; `idx[p]` (n_p,) are the rows on path p (None: none)."""

    paths: torch.Tensor  # (N,) int64
    only: int | None
    idx: list[torch.Tensor | None] = field(default_factory=list)

    @classmethod
    def of(cls, paths: torch.Tensor, counts: list[int]) -> Routing:
        """paths (N,) path indices, counts (P,) rows per path."""
        n = paths.shape[0]
        for p, c in enumerate(counts):
            if c == n:
                return cls(paths=paths, only=p)
        idx = [(paths == p).nonzero().squeeze(1) if c else None for p, c in enumerate(counts)]
        return cls(paths=paths, only=None, idx=idx)

    def rows(self, on: list[int]) -> torch.Tensor | None:
        """(n,) the rows on any of the paths `on` (in path order), None where there are none."""
        parts = [self.idx[p] for p in on if self.idx[p] is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class SeqSlot:
    """Where one sequence's rows sit in the flat batch and in the KV cache."""

    row0: int  # first row in the flat token batch
    n: int  # rows of this sequence in this call
    cache_row: int  # batch row in the KV cache
    pos0: int  # position of its first row


class KVCache:
    """Static per-layer cache: k, v each (B, kv_heads, max_len, head_dim)."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, dtype, device):
        shape = (batch, spec.n_kv_heads, max_len, spec.head_dim)
        # zeros, not empty: a batch row attends over the span of the longest row with its own
        # tail masked, and masked garbage (NaN bit patterns) would still reach SDPA's P @ V
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.n_layers)]
        self.max_len = max_len

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished sequences: keep only these batch rows (in this order)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]

    def first_rows(self, n: int) -> KVCache:
        """A cache over this one's first n batch rows, sharing its memory (still contiguous: the
        batch is the outer dimension), for a decode batch smaller than the allocation."""
        view = object.__new__(KVCache)
        view.k = [t[:n] for t in self.k]
        view.v = [t[:n] for t in self.v]
        view.max_len = self.max_len
        return view

    def move_rows(self, src: list[int]) -> None:
        """Row j becomes what row src[j] holds, for j < len(src) (the rest are left as they
        are); a permutation that compacts or reorders sequences in place."""
        if src == list(range(len(src))):
            return
        idx = torch.tensor(src, dtype=torch.long, device=self.k[0].device)
        for t in (*self.k, *self.v):
            t[: len(src)] = t.index_select(0, idx)  # index_select copies first: overlap is safe


def _check_slots(slots: list[SeqSlot], cache: KVCache, n_rows: int) -> None:
    """Every slot writes inside the cache it was given; raises CacheOverflowError otherwise."""
    rows = cache.k[0].shape[0]
    covered = 0
    for sl in slots:
        if not (0 <= sl.cache_row < rows and sl.pos0 >= 0 and sl.pos0 + sl.n <= cache.max_len):
            raise CacheOverflowError(
                f"a sequence slot (cache row {sl.cache_row}, positions {sl.pos0}.."
                f"{sl.pos0 + sl.n - 1}) is outside the KV cache ({rows} rows x {cache.max_len} "
                "positions): generation ran past what was allocated for the request"
            )
        covered += sl.n
    if covered != n_rows:
        raise CacheOverflowError(f"slots cover {covered} tokens, the forward has {n_rows}")


# decide(layer, h) -> (paths (N,) int64, counts (P,)) ; h is the normalised attention input
Decider = Callable[[int, torch.Tensor], tuple[torch.Tensor, list[int]]]


def const_decider(path: int) -> Decider:
    """Every unit on one path (calibration, benchmarks, warm-up)."""

    def decide(li: int, h: torch.Tensor):
        n = h.shape[0]
        paths = torch.full((n,), path, dtype=torch.long, device=h.device)
        return paths, reg.one_hot(path, n)

    return decide


class LeanModel:
    def __init__(
        self,
        spec: ModelSpec,
        layers: list[LayerWeights],
        embed: torch.Tensor,
        norm: torch.Tensor,
        lm_head: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.spec, self.layers = spec, layers
        self.embed, self.norm, self.lm_head = embed, norm, lm_head
        self.rope_cos, self.rope_sin = rope_cos, rope_sin  # (max_pos, hd) in dtype
        self.dtype, self.device = dtype, device
        self.lm_head_packed: torch.Tensor | None = None
        self.compiled = None

        self.fused = FusedDecode(self)  # one native call per layer at decode, where it applies
        if can_pack(device, dtype):
            for lw in layers:
                lw.pack()
            self.lm_head_packed = torch.ops.mkldnn._reorder_linear_weight(lm_head, 1)

    # ---- projections, per path -------------------------------------------------------------
    @staticmethod
    def _by_kind(h, r: Routing, fns: dict, n_out: int) -> torch.Tensor:
        """Attention projections: the rows of each path on its `proj` kind's function (fp16
        16-bit; int8 and skip the int8 copy; int4 the Q4_1 copy). h (N, K) -> (N, n_out)."""
        if r.only is not None:
            return fns[reg.get(r.only).proj](h)
        out = torch.empty(h.shape[0], n_out, dtype=h.dtype, device=h.device)
        for kind, fn in fns.items():
            idx = r.rows(reg.with_proj(kind))
            if idx is not None:
                out.index_copy_(0, idx, fn(h.index_select(0, idx)))
        return out

    def _proj(self, h, r: Routing, lw: LayerWeights, which: str) -> torch.Tensor:
        """Projection `which` ("qkv" or "o") of one layer on each row's path."""
        dense, bias, q8 = (lw.wqkv, lw.bqkv, lw.qkv8) if which == "qkv" else (lw.wo, None, lw.o8)
        packed = lw.packed.get("w" + which)
        fns = {
            "dense16": lambda x: linear16(x, dense, packed, bias),
            "int8": q8,
            "int4": lambda x: lw.int4(which + "4")(x),
        }
        return self._by_kind(h, r, fns, dense.shape[0])

    @staticmethod
    def _mlp_dense(h: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        pk = lw.packed
        gu = linear16(h, lw.wgu, pk.get("wgu"))  # (n, 2I)
        g, u = gu.chunk(2, dim=-1)
        return linear16(F.silu(g) * u, lw.wdown, pk.get("wdown"))

    @staticmethod
    def _mlp_int8(h: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        gu = lw.gu8(h)
        g, u = gu.chunk(2, dim=-1)
        return lw.down8(F.silu(g) * u)

    @staticmethod
    def _mlp_int4(h: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        g, u = lw.int4("gu4")(h).chunk(2, dim=-1)
        return lw.int4("down4")(F.silu(g) * u)

    @staticmethod
    def _mlp_skip(h: torch.Tensor, lw: LayerWeights) -> torch.Tensor | None:
        if lw.shortcut is None:
            return None  # pure passthrough: the residual stream is left as it is
        a, b = lw.shortcut
        return F.linear(F.linear(h, a), b)  # (n, d) via rank R

    def _mlp(self, h: torch.Tensor, r: Routing, lw: LayerWeights) -> torch.Tensor | None:
        """Each row's MLP on its path's `mlp` kind: 16-bit, int8, int4, or none (skip)."""
        fns = {
            "dense16": self._mlp_dense,
            "int8": self._mlp_int8,
            "int4": self._mlp_int4,
            None: self._mlp_skip,
        }
        if r.only is not None:
            return fns[reg.get(r.only).mlp](h, lw)
        out = torch.zeros_like(h)
        for kind, fn in fns.items():
            idx = r.rows(reg.with_mlp(kind))
            if idx is None:
                continue
            y = fn(h.index_select(0, idx), lw)
            if y is not None:
                out.index_copy_(0, idx, y)
        return out

    # ---- attention ---------------------------------------------------------------------------
    def _attend(self, q, k, v, li: int, slots: list[SeqSlot], cache: KVCache, decode: bool):
        """q: (N, H, hd), k/v: (N, KVH, hd) already rotated; returns (N, H*hd)."""
        s = self.spec
        ck, cv = cache.k[li], cache.v[li]
        if decode:
            # one row per sequence; row i belongs to cache row slots[i].cache_row == i
            bsz = len(slots)
            pos = [sl.pos0 for sl in slots]
            span = max(pos) + 1
            if min(pos) == span - 1:  # every row at the same position: no mask needed
                ck[:, :, span - 1] = k
                cv[:, :, span - 1] = v
                mask = None
            else:
                ar = torch.arange(bsz, device=q.device)
                pt = torch.tensor(pos, device=q.device)
                ck[ar, :, pt] = k
                cv[ar, :, pt] = v
                mask = torch.arange(span, device=q.device)[None, :] <= pt[:, None]  # (B, S)
                mask = mask[:, None, None, :]
            g = s.n_heads // s.n_kv_heads
            q4 = q.view(bsz, s.n_kv_heads, g, s.head_dim)  # query heads grouped per KV head
            o = F.scaled_dot_product_attention(
                q4, ck[:, :, :span], cv[:, :, :span], attn_mask=mask
            )  # (B, KVH, G, hd)
            return o.reshape(bsz, s.q_dim)
        out = torch.empty(q.shape[0], s.q_dim, dtype=q.dtype, device=q.device)
        for sl in slots:
            a, b = sl.row0, sl.row0 + sl.n
            p0, p1 = sl.pos0, sl.pos0 + sl.n
            ck[sl.cache_row, :, p0:p1] = k[a:b].transpose(0, 1)
            cv[sl.cache_row, :, p0:p1] = v[a:b].transpose(0, 1)
            qs = q[a:b].transpose(0, 1)[None]  # (1, H, n, hd)
            # a chunk after earlier ones (chunked prefill) attends to the cache before it and
            # causally within itself: row i (position p0 + i) sees positions 0..p0 + i
            mask = None
            if p0 > 0:
                mask = (
                    torch.arange(p1, device=q.device)[None, :]
                    <= torch.arange(p0, p1, device=q.device)[:, None]
                )  # (n, p1)
            o = F.scaled_dot_product_attention(
                qs,
                ck[sl.cache_row : sl.cache_row + 1, :, :p1],
                cv[sl.cache_row : sl.cache_row + 1, :, :p1],
                attn_mask=mask,
                is_causal=p0 == 0,
                enable_gqa=True,
            )  # (1, H, n, hd)
            out[a:b] = o[0].transpose(0, 1).reshape(sl.n, s.q_dim)
        return out

    # ---- one forward over a flat batch of tokens -----------------------------------------------
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: list[SeqSlot],
        cache: KVCache,
        decide: Decider,
        decode: bool,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids, positions: (N,). Returns logits (len(logits_rows), vocab) in fp32."""
        s = self.spec
        _check_slots(slots, cache, ids.shape[0])
        x = self.embed[ids]  # (N, d)
        if decode and self.fused.usable(ids, cache):
            h = rms_norm(x, self.layers[0].ln1, s.eps)
            self.fused.forward(x, h, positions, slots, cache, decide)  # x, h updated in place
            if logits_rows is not None:
                h = h.index_select(0, logits_rows)
            return linear16(h, self.lm_head, self.lm_head_packed).float()
        cos = self.rope_cos[positions][:, None, :]  # (N, 1, hd)
        sin = self.rope_sin[positions][:, None, :]
        fast = self.compiled if decode and self.compiled is not None else None
        h = None  # the next layer's normalised input, when the compiled path already made it
        for li, lw in enumerate(self.layers):
            if h is None:
                h = rms_norm(x, lw.ln1, s.eps)  # (N, d) the controller's h(l, t)
            paths, counts = decide(li, h)
            r = Routing.of(paths, counts)
            ln_next = self.layers[li + 1].ln1 if li + 1 < len(self.layers) else self.norm
            # compiled pieces pay off on the int8 and skip paths (fused quantisation); the eager
            # fp16 path keeps its oneDNN-prepacked weights, which the compiled graph cannot use
            # (measured: fp16 59.5 compiled vs 51.5 eager ms/token; int8 33.1 vs 40.5)
            only = None if r.only is None else reg.get(r.only)
            if (
                fast is not None
                and only is not None
                and only.proj == "int8"
                and (only.mlp is not None or lw.shortcut is None)
            ):
                q, k, v = fast.pre(only, lw, h, cos, sin)
                attn = self._attend(q, k, v, li, slots, cache, decode)  # (N, q_dim)
                x, h = fast.post(only, lw, x, attn, ln_next)
                continue
            q, k, v = self._pre(h, r, lw, cos, sin)
            attn = self._attend(q, k, v, li, slots, cache, decode)  # (N, q_dim)
            x = self._post(x, attn, r, lw)
            h = None
        if logits_rows is not None:
            if logits_rows.numel() == 0:  # a prefill chunk that ends no prompt: no head at all
                return torch.empty(0, s.vocab, device=x.device)
            x = x.index_select(0, logits_rows)
            h = None
        if h is None:
            h = rms_norm(x, self.norm, s.eps)
        return linear16(h, self.lm_head, self.lm_head_packed).float()  # (rows, vocab)

    def _pre(self, h, r: Routing, lw: LayerWeights, cos, sin):
        """Attention projections of one layer, then q/k norms (Qwen3) and rope."""
        s, n = self.spec, h.shape[0]
        qkv = self._proj(h, r, lw, "qkv")  # (N, q + 2 kv)
        v = qkv[:, s.q_dim + s.kv_dim :].view(n, s.n_kv_heads, s.head_dim)
        if lw.q_norm is None:
            # q and k heads side by side: one rope over both (same maths, half the small ops)
            qk = apply_rope(qkv[:, : s.q_dim + s.kv_dim].view(n, -1, s.head_dim), cos, sin)
            return qk[:, : s.n_heads], qk[:, s.n_heads :], v
        q = qkv[:, : s.q_dim].view(n, s.n_heads, s.head_dim)
        k = qkv[:, s.q_dim : s.q_dim + s.kv_dim].view(n, s.n_kv_heads, s.head_dim)
        q, k = rms_norm(q, lw.q_norm, s.eps), rms_norm(k, lw.k_norm, s.eps)  # Qwen3
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _post(self, x, attn, r: Routing, lw: LayerWeights):
        """Output projection, residual, MLP on each row's path, residual."""
        x = x + self._proj(attn, r, lw, "o")
        y = self._mlp(rms_norm(x, lw.ln2, self.spec.eps), r, lw)
        return x if y is None else x + y

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.spec, batch, max_len, self.dtype, self.device)

    def param_bytes(self) -> dict[str, int]:
        """Bytes of weights read per token on each path (for the bandwidth floor)."""
        dense = sum(
            t.numel() * t.element_size()
            for lw in self.layers
            for t in (lw.wqkv, lw.wo, lw.wgu, lw.wdown)
        )
        i8 = sum(m.q.numel() for lw in self.layers for m in lw.int8_linears())
        head = self.lm_head.numel() * self.lm_head.element_size()
        i4 = sum(m.w.nbytes for lw in self.layers for m in (lw.qkv4, lw.o4, lw.gu4, lw.down4) if m)
        return {"dense_16bit": dense, "int8": i8, "int4": i4, "lm_head": head}
