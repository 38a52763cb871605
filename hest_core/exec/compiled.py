"""Compiled decode: `torch.compile` graphs for the pieces of a decoder layer, one per path.

Weights are graph inputs, not constants, so all layers of a model share one graph per path
(five graphs: two attention-input variants, three layer-output variants) and a cold compile
takes tens of seconds, not minutes. Inductor fuses the elementwise work around the matmuls
(norms, rope, per-token int8 quantisation and rescaling, SiLU x up, residual adds), which is
most of a batch-1 decode step's op count. Attention over the KV cache and the controller stay
eager between the graphs. Used for decode steps whose rows all took one path; anything else
runs the eager code. Numerics: fp16 pieces match eager to rounding; int8 pieces may round a
per-token scale differently (one quantisation step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..paths import Path
from .ops import apply_rope, rms_norm
from .weights import LayerWeights, ModelSpec


def _q8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8 with per-token activation scales, written out so inductor fuses the (de)quantising."""
    xf = x.float()
    xs = xf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0  # (M, 1)
    xq = torch.round(xf / xs).to(torch.int8)
    return (torch._int_mm(xq, q.t()).float() * xs * scale).to(x.dtype)


class CompiledDecode:
    def __init__(self, spec: ModelSpec):
        s = spec
        eps, qd, kvd = s.eps, s.q_dim, s.kv_dim

        def split_rope(qkv, qn, kn, cos, sin):
            n = qkv.shape[0]
            q = qkv[:, :qd].reshape(n, s.n_heads, s.head_dim)
            k = qkv[:, qd : qd + kvd].reshape(n, s.n_kv_heads, s.head_dim)
            v = qkv[:, qd + kvd :].reshape(n, s.n_kv_heads, s.head_dim)
            if qn is not None:
                q, k = rms_norm(q, qn, eps), rms_norm(k, kn, eps)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

        def pre16(h, w, b, qn, kn, cos, sin):
            return split_rope(F.linear(h, w, b), qn, kn, cos, sin)

        def pre8(h, q, sc, b, qn, kn, cos, sin):
            y = _q8(h, q, sc)
            return split_rope(y if b is None else y + b, qn, kn, cos, sin)

        def post16(x, attn, wo, ln2, wgu, wdn, ln_next):
            x = x + F.linear(attn, wo)
            g, u = F.linear(rms_norm(x, ln2, eps), wgu).chunk(2, -1)
            x = x + F.linear(F.silu(g) * u, wdn)
            return x, rms_norm(x, ln_next, eps)

        def post8(x, attn, oq, os_, ln2, guq, gus, dnq, dns, ln_next):
            x = x + _q8(attn, oq, os_)
            g, u = _q8(rms_norm(x, ln2, eps), guq, gus).chunk(2, -1)
            x = x + _q8(F.silu(g) * u, dnq, dns)
            return x, rms_norm(x, ln_next, eps)

        def post_skip(x, attn, oq, os_, ln_next):
            x = x + _q8(attn, oq, os_)
            return x, rms_norm(x, ln_next, eps)

        c = torch.compile
        self._pre16, self._pre8 = c(pre16, dynamic=None), c(pre8, dynamic=None)
        self._post = {  # keyed by the MLP's weight kind (paths.py); None: MLP skipped
            "dense16": c(post16, dynamic=None),
            "int8": c(post8, dynamic=None),
            None: c(post_skip, dynamic=None),
        }

    def pre(self, path: Path, lw: LayerWeights, h, cos, sin):
        """q, k, v of one layer on `path`'s projection weights."""
        if path.proj == "dense16":
            return self._pre16(h, lw.wqkv, lw.bqkv, lw.q_norm, lw.k_norm, cos, sin)
        m = lw.qkv8
        return self._pre8(h, m.q, m.scale, m.bias, lw.q_norm, lw.k_norm, cos, sin)

    def post(self, path: Path, lw: LayerWeights, x, attn, ln_next):
        """(x, next normalised input) after the output projection and the MLP on `path` (its
        projections must be int8 unless its MLP is 16-bit too, as every registered path's)."""
        if path.mlp == "dense16":
            return self._post["dense16"](x, attn, lw.wo, lw.ln2, lw.wgu, lw.wdown, ln_next)
        o = lw.o8
        if path.mlp == "int8":
            return self._post["int8"](
                x,
                attn,
                o.q,
                o.scale,
                lw.ln2,
                lw.gu8.q,
                lw.gu8.scale,
                lw.down8.q,
                lw.down8.scale,
                ln_next,
            )
        return self._post[None](x, attn, o.q, o.scale, ln_next)


def enable_compile(lean) -> None:
    """Give `lean` (a LeanModel) compiled decode pieces: one graph per path shared by all layers,
    built on first use (call Engine.warmup())."""
    lean.compiled = CompiledDecode(lean.spec)
