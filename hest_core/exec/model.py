"""A lean Llama-layout decoder that runs each (layer, token) unit on its own path.

Weights are pulled out of a Hugging Face model once: fused q/k/v and gate/up projections in the
16-bit dtype, plus int8 copies (per output channel) for the `int8` and `skip` paths. The forward
works on a flat list of tokens from any number of sequences, so every path runs as one matmul
over the rows of the whole batch that chose it.

Paths, their indices and how each runs: `paths.py` (the registry). The pieces it is built from:
`weights.py` (what it holds), `ops.py` (norm, rope, the 16-bit product), `kvcache.py` (slots and
the cache), `routing.py` (path decisions per layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import paths as reg
from . import native
from .fused import FusedDecode
from .kvcache import KVCache, SeqSlot, check_slots
from .ops import apply_rope, can_pack, linear16, rms_norm
from .routing import Decider, Routing
from .weights import LayerWeights, ModelSpec

if TYPE_CHECKING:
    from .q8head import Q8Head


# a layer's mixed-path work runs the majority's kind on every row, then replaces the other rows,
# when those are at most this share of the rows (measured in docs/runtime.md, "Mixed-path
# prefill": gathering and scattering a row costs ~1/20 of its GEMM row on this model)
IN_PLACE_SHARE = 1 / 8
# the native 4-bit kernel's rows (q4.MAX_ROWS; not imported: q4 sits above this module, and a
# test checks that they agree): a product of more rows takes the 16-bit GEMM
KERNEL_ROWS = 16


def _in_place(groups: dict, n: int):
    """The kind whose function runs on all n rows (the rows of the other kinds then replaced),
    or None to run each kind on its own gathered rows. groups: kind -> (n_k,) row indices. In
    place when the largest group holds all but at most IN_PLACE_SHARE of the rows and more than
    KERNEL_ROWS of them (so its product takes the same kernel either way: the native 4-bit
    kernel serves 1..16 rows, the 16-bit GEMM more)."""
    major = max(groups, key=lambda k: groups[k].numel())
    m = groups[major].numel()
    if m > KERNEL_ROWS and n - m <= n * IN_PLACE_SHARE:
        return major
    return None


def norm_rows(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """`ops.rms_norm` of a (N, d) batch of rows. On CPU bf16 without autograd, the native kernel
    (`Native.rms_norm`: the fused decode layer's arithmetic, one pass over x; the PyTorch form
    makes four fp32 copies and took 3.9 ms at 2,600 rows on the 2-core Xeon); else PyTorch."""
    grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if x.dim() == 2 and x.dtype == torch.bfloat16 and x.device.type == "cpu" and not grad:
        nat = None if getattr(native._off, "v", False) else native.get()
        if nat is not None and w.dtype == torch.bfloat16 and w.is_contiguous():
            return nat.rms_norm(x, w, eps)
    return rms_norm(x, w, eps)


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
        self.head_q8: Q8Head | None = None  # the head's Q8_0 blocks, where exact (q8head.py)
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
        groups = {k: idx for k in fns if (idx := r.rows(reg.with_proj(k))) is not None}
        major = _in_place(groups, h.shape[0])
        if major is not None:  # the majority's kind on every row, the others' rows replaced
            out = fns[major](h)
        else:
            out = torch.empty(h.shape[0], n_out, dtype=h.dtype, device=h.device)
        for kind, idx in groups.items():
            if kind != major:
                out.index_copy_(0, idx, fns[kind](h.index_select(0, idx)))
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
        groups = {k: idx for k in fns if (idx := r.rows(reg.with_mlp(k))) is not None}
        # skipped rows stay skipped (no MLP work for them: what the energy model charges them)
        major = None if None in groups else _in_place(groups, h.shape[0])
        out = fns[major](h, lw) if major is not None else torch.zeros_like(h)
        for kind, idx in groups.items():
            if major is not None and kind == major:
                continue  # (None is also skip's kind: its rows still take their shortcut)
            y = fns[kind](h.index_select(0, idx), lw)
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
        check_slots(slots, cache, ids.shape[0])
        x = self.embed[ids]  # (N, d)
        if decode and self.fused.usable(ids, cache):
            h = norm_rows(x, self.layers[0].ln1, s.eps)
            self.fused.forward(x, h, positions, slots, cache, decide)  # x, h updated in place
            if logits_rows is not None:
                h = h.index_select(0, logits_rows)
            return self.logits(h)
        cos = self.rope_cos[positions][:, None, :]  # (N, 1, hd)
        sin = self.rope_sin[positions][:, None, :]
        fast = self.compiled if decode and self.compiled is not None else None
        h = None  # the next layer's normalised input, when the compiled path already made it
        for li, lw in enumerate(self.layers):
            if h is None:
                h = norm_rows(x, lw.ln1, s.eps)  # (N, d) the controller's h(l, t)
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
            q, k, v = self._pre(h, r, lw, cos, sin, positions)
            attn = self._attend(q, k, v, li, slots, cache, decode)  # (N, q_dim)
            x = self._post(x, attn, r, lw)
            h = None
        if logits_rows is not None:
            if logits_rows.numel() == 0:  # a prefill chunk that ends no prompt: no head at all
                return torch.empty(0, s.vocab, device=x.device)
            x = x.index_select(0, logits_rows)
            h = None
        if h is None:
            h = norm_rows(x, self.norm, s.eps)
        return self.logits(h)  # (rows, vocab)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (rows, d) normalised -> fp32 logits (rows, vocab). Where the 16-bit head would run
        on the native kernel (one row) and the model carries its Q8_0 blocks, they run instead:
        the same logits bit for bit, from ~half the bytes (q8head.py)."""
        q8 = self.head_q8
        if q8 is not None and h.device.type == "cpu" and native.fits(h, q8.codes.shape[0]):
            nat = native.get()
            if nat is not None:
                return nat.head_q8(h, q8.codes, q8.scales).float()
        return linear16(h, self.lm_head, self.lm_head_packed).float()

    def _pre(self, h, r: Routing, lw: LayerWeights, cos, sin, positions=None):
        """Attention projections of one layer, then q/k norms (Qwen3) and rope. cos / sin
        (N, 1, hd) the rope tables' rows at `positions` (N,)."""
        s, n = self.spec, h.shape[0]
        qkv = self._proj(h, r, lw, "qkv")  # (N, q + 2 kv)
        v = qkv[:, s.q_dim + s.kv_dim :].view(n, s.n_kv_heads, s.head_dim)
        if lw.q_norm is None and positions is not None and self._rope_native(qkv):
            # q and k heads rotated in place, bit for bit apply_rope below, in one pass
            native.get().rope_rows(
                qkv, s.n_heads + s.n_kv_heads, s.head_dim, positions, self.rope_cos, self.rope_sin
            )
            q = qkv[:, : s.q_dim].view(n, s.n_heads, s.head_dim)
            return q, qkv[:, s.q_dim : s.q_dim + s.kv_dim].view(n, s.n_kv_heads, s.head_dim), v
        if lw.q_norm is None:
            # q and k heads side by side: one rope over both (same maths, half the small ops)
            qk = apply_rope(qkv[:, : s.q_dim + s.kv_dim].view(n, -1, s.head_dim), cos, sin)
            return qk[:, : s.n_heads], qk[:, s.n_heads :], v
        q = qkv[:, : s.q_dim].view(n, s.n_heads, s.head_dim)
        k = qkv[:, s.q_dim : s.q_dim + s.kv_dim].view(n, s.n_kv_heads, s.head_dim)
        q, k = rms_norm(q, lw.q_norm, s.eps), rms_norm(k, lw.k_norm, s.eps)  # Qwen3
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _rope_native(self, qkv: torch.Tensor) -> bool:
        """Whether `Native.rope_rows` takes this projection output: CPU bf16 rows without
        autograd, native kernels on, contiguous bf16 rope tables. Measured (session 20, the
        2-core Xeon, 1 thread, 12 heads of 64, beside another busy process): 172 rows 0.070 ms against apply_rope's 0.123 ms
        (0.157 with the tables' gathers), 1,024 rows 0.43 against 1.00 ms."""
        if qkv.device.type != "cpu" or qkv.dtype != torch.bfloat16 or qkv.stride(1) != 1:
            return False
        if torch.is_grad_enabled() and qkv.requires_grad:
            return False
        if getattr(native._off, "v", False) or native.get() is None:
            return False
        t = (self.rope_cos, self.rope_sin)
        return all(x.dtype == torch.bfloat16 and x.is_contiguous() for x in t)

    def _post(self, x, attn, r: Routing, lw: LayerWeights):
        """Output projection, residual, MLP on each row's path, residual."""
        x = x + self._proj(attn, r, lw, "o")
        y = self._mlp(norm_rows(x, lw.ln2, self.spec.eps), r, lw)
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
        q8 = 0 if self.head_q8 is None else self.head_q8.nbytes
        return {"dense_16bit": dense, "int8": i8, "int4": i4, "lm_head": head, "lm_head_q8": q8}
