"""Decode steps with one native call per decoder layer (`hest_decode_layer`, kernels/layer.c).

The products of a decode step already run in the native kernels; what was left was ~30 small
PyTorch operators per layer around them (norms, rope, cache writes, attention, residuals), each a
dispatch of its own: 5-8 ms of a ~20 ms step on this machine. Here each layer is one ctypes call
and one OpenMP region. Between layers Python still calls the decider (the controller and the
budget guard), on the normalised input the previous call wrote.

Used for decode steps of 1..`native.FUSED_MAX_ROWS` rows on CPU with bf16 weights when the
kernels are built and every registered path has a `native_code` (paths.py: fp16, int8, skip and
the opt-in int4, whose rows run on the Q4_1 copies plus the adapter's low-rank term where
`int4.attach` built one). Rows of one step may take any mix of paths. int8 rows run the
weight-only kernel (int16 activations) at every row count, whatever the calibration chose for
the PyTorch loop's products. Anything else, and `HEST_FUSED=0` (`RuntimeConfig.fused`), takes
the PyTorch loop in model.py.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from .. import paths as reg
from ..config import RuntimeConfig
from . import native

if TYPE_CHECKING:
    from .kvcache import KVCache, SeqSlot
    from .model import LeanModel
    from .routing import Decider
    from .weights import LayerWeights


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    assert t.is_contiguous(), "fused decode wants contiguous tensors"
    return t.data_ptr()


INT4_COPIES = ("qkv4", "o4", "gu4", "down4")  # LayerWeights fields, in LayerArgs.q4's order


def _set_int4(la: native.LayerArgs, lw: LayerWeights, keep: list) -> None:
    """Point `la` at the layer's Q4_1 copies and their low-rank terms (int4.Int4Linear: a, and b
    transposed, made here and held in `keep`); all NULL where the int4 path was not built.
    Raises NativeArgumentError for a copy the C layer cannot take (some of the four missing, low-
    rank factors not bf16, a bias other than the 16-bit copy's)."""
    copies = [getattr(lw, n) for n in INT4_COPIES]
    if all(c is None for c in copies):
        return
    ok = all(c is not None for c in copies)
    native.need(ok, "decode_layer", "a layer has some int4 copies but not all four")
    for i, c in enumerate(copies):
        native.need(
            c.w.data.dtype == torch.uint8 and c.bias is (lw.bqkv if i == 0 else None),
            "decode_layer",
            f"int4 copy {INT4_COPIES[i]}: packed uint8 data, the 16-bit copy's bias (qkv) or none",
        )
        la.q4[i] = _ptr(c.w.data)
        if c.low is not None:
            a, b = c.low.a, c.low.b
            ok = a.dtype == b.dtype == torch.bfloat16 and b.shape == (c.w.n, a.shape[0])
            native.need(ok, "decode_layer", f"int4 low-rank term of {INT4_COPIES[i]}: bf16 a, b")
            bt = b.t().contiguous()  # (R, N): the layer runs the second product along N
            span = _spans(bt)
            keep += [bt, span]
            la.lr_a[i], la.lr_b[i], la.lr_R[i] = _ptr(a), _ptr(bt), a.shape[0]
            la.lr_span[i] = _ptr(span)


def _spans(bt: torch.Tensor) -> torch.Tensor:
    """(R, 2) int32: per row of b^T (R, N) the columns [lo, hi) outside which it is zero (a fused
    projection's targets own separate rows and columns; an all-zero row gets [0, 0))."""
    nz = bt != 0
    any_nz = nz.any(dim=1)
    cols = torch.arange(bt.shape[1])
    lo = torch.where(nz, cols, bt.shape[1]).min(dim=1).values
    hi = torch.where(nz, cols + 1, 0).max(dim=1).values
    lo = torch.where(any_nz, lo, 0)
    return torch.stack([lo, hi], dim=1).to(torch.int32).contiguous()


class FusedDecode:
    """The per-layer argument blocks of one LeanModel, built on first use and rebuilt when a
    layer's weights or kernel choices change (an adapter's shortcut, a calibration)."""

    def __init__(self, lean: LeanModel, enabled: bool | None = None):
        """enabled: None -> RuntimeConfig.from_env().fused ($HEST_FUSED); the engine sets its
        config's value after building the model."""
        self.lean = lean
        self.enabled = RuntimeConfig.from_env(only=("fused",)).fused if enabled is None else enabled
        self._key: tuple | None = None
        self._layers: list[native.LayerArgs] = []
        self._addr: list[int] = []
        self._ln_next: list[int] = []
        self._scratch: torch.Tensor | None = None
        self._scratch_key: tuple | None = None
        self._step = native.StepArgs()
        self._step_addr = ctypes.addressof(self._step)
        self._cache_ok: tuple | None = None

    # ---- when it applies ---------------------------------------------------------------------
    @staticmethod
    def _layer_key(lw: LayerWeights) -> tuple:
        copies = [getattr(lw, n) for n in INT4_COPIES]
        lows = (id(getattr(c, "low", None)) for c in copies)  # a term set after attach
        return (id(lw.wqkv), id(lw.shortcut), *map(id, copies), *lows)

    def usable(self, ids: torch.Tensor, cache: KVCache) -> bool:
        lean = self.lean
        s = lean.spec
        if not self.enabled or lean.compiled is not None or lean.dtype != torch.bfloat16:
            return False
        if reg.native_codes() != list(range(reg.n_paths())):
            return False  # a registered path the C layer does not run as its own index
        if (
            lean.device.type != "cpu"
            or s.head_dim > 256
            or s.head_dim % 2
            or s.n_heads // s.n_kv_heads > 16
        ):
            return False
        n = ids.shape[0]
        if not 1 <= n <= native.FUSED_MAX_ROWS or cache.k[0].shape[0] != n:
            return False
        probe = lean.embed[:1]
        if not native.fits(probe, s.hidden) or native.get() is None:
            return False
        self._sync()
        return True

    def _sync(self) -> None:
        key = tuple(self._layer_key(lw) for lw in self.lean.layers)
        if key == self._key:
            return
        lean = self.lean
        layers, keep = [], []
        for lw in lean.layers:
            sc = lw.shortcut
            la = native.LayerArgs(
                ln1=_ptr(lw.ln1),
                ln2=_ptr(lw.ln2),
                wqkv=_ptr(lw.wqkv),
                bqkv=_ptr(lw.bqkv),
                wo=_ptr(lw.wo),
                wgu=_ptr(lw.wgu),
                wdown=_ptr(lw.wdown),
                q_norm=_ptr(lw.q_norm),
                k_norm=_ptr(lw.k_norm),
                qkv8=_ptr(lw.qkv8.q),
                o8=_ptr(lw.o8.q),
                gu8=_ptr(lw.gu8.q),
                down8=_ptr(lw.down8.q),
                qkv8_s=_ptr(lw.qkv8.scale),
                o8_s=_ptr(lw.o8.scale),
                gu8_s=_ptr(lw.gu8.scale),
                down8_s=_ptr(lw.down8.scale),
                sc_a=None if sc is None else _ptr(sc[0]),
                sc_b=None if sc is None else _ptr(sc[1]),
                R=0 if sc is None else sc[0].shape[0],
            )
            _set_int4(la, lw, keep)
            layers.append(la)
        self._layers = layers  # the blocks hold raw pointers: the tensors live in lean.layers
        self._keep = keep  # and here (the low-rank terms' b transposed)
        self._addr = [ctypes.addressof(la) for la in layers]
        nxt = [lw.ln1 for lw in lean.layers[1:]] + [lean.norm]
        self._ln_next = [_ptr(t) for t in nxt]
        self._key = key

    # ---- one decode step -------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        positions: torch.Tensor,
        slots: list[SeqSlot],
        cache: KVCache,
        decide: Decider,
    ) -> None:
        """x (N, d) residual stream, h (N, d) the first layer's normalised input; both updated
        in place: on return h is the final norm of x, ready for the lm_head."""
        nat = native.get()
        assert nat is not None
        n = x.shape[0]
        self._check_step(x, h, positions, slots, cache)
        if self._key is None:
            self._sync()  # usable() syncs every step; a direct caller may not have called it
        threads = torch.get_num_threads()
        self._ensure_scratch(nat, n, cache.max_len, threads)
        positions = self._fill_step(positions, n, cache, threads)  # held: the step points at it
        xp, hp = x.data_ptr(), h.data_ptr()
        call, step, addr, ln_next = nat.decode_layer, self._step_addr, self._addr, self._ln_next
        ks, vs = cache.k, cache.v
        for li in range(self.lean.spec.n_layers):
            paths, _counts = decide(li, h)
            if paths.dtype != torch.long or not paths.is_contiguous():
                paths = paths.to(torch.long).contiguous()
            if paths.numel() != n:
                native.need(False, "decode_layer", f"{paths.numel()} path codes for {n} rows")
            rc = call(
                addr[li],
                step,
                paths.data_ptr(),
                xp,
                hp,
                ln_next[li],
                ks[li].data_ptr(),
                vs[li].data_ptr(),
            )
            if rc:
                native.check(rc, "decode_layer")

    def _ensure_scratch(self, nat, n: int, max_len: int, threads: int) -> None:
        """The working memory of a `decode_layer` call of n rows (kept while the shapes stay)."""
        s = self.lean.spec
        skey = (n, max_len, threads)
        if skey != self._scratch_key:
            nbytes = nat.scratch_bytes(
                s.hidden,
                s.intermediate,
                s.n_heads,
                s.n_kv_heads,
                s.head_dim,
                max_len,
                n,
                threads,
            )
            self._scratch = torch.empty(nbytes + 64, dtype=torch.uint8)
            self._scratch_key = skey
        assert self._scratch is not None

    def _fill_step(self, positions, n: int, cache: KVCache, threads: int) -> torch.Tensor:
        """Write this step's shapes and inputs into the step block; returns the (n,) int64
        positions it points at (the caller holds them for the step)."""
        lean, s = self.lean, self.lean.spec
        positions = positions.to(torch.long).contiguous()
        st = self._step
        st.d, st.I, st.H, st.KVH = s.hidden, s.intermediate, s.n_heads, s.n_kv_heads
        st.hd, st.max_len, st.M, st.threads, st.eps = s.head_dim, cache.max_len, n, threads, s.eps
        st.pos = positions.data_ptr()
        st.cos, st.sin = lean.rope_cos.data_ptr(), lean.rope_sin.data_ptr()
        st.rope_len = lean.rope_cos.shape[0]
        st.cache_rows = cache.k[0].shape[0]
        base = self._scratch.data_ptr()
        st.scratch = base + (-base % 64)
        st.scratch_bytes = self._scratch.numel() - (st.scratch - base)
        return positions

    def _check_step(self, x, h, positions, slots, cache: KVCache) -> None:
        """What the native layer cannot see for itself: that the tensors it is handed hold the
        shapes the step describes (rows, hidden size, KV-cache layout, dtypes)."""
        s, n, bf16 = self.lean.spec, x.shape[0], torch.bfloat16
        need = native.need
        for t, name in ((x, "x"), (h, "h")):
            ok = t.shape == (n, s.hidden) and t.dtype == bf16 and t.is_contiguous()
            need(ok, "decode_layer", f"{name} must be contiguous bf16 ({n}, {s.hidden})")
        need(positions.numel() == n, "decode_layer", f"{positions.numel()} positions, {n} rows")
        for i, sl in enumerate(slots):
            ok = sl.cache_row == i and sl.n == 1
            need(ok, "decode_layer", "fused decode takes one row per cache row, in order")
        key = (id(cache.k), id(cache.v), n, cache.max_len)
        if key == self._cache_ok:
            return  # this cache's layers were checked at an earlier step
        shape = (n, s.n_kv_heads, cache.max_len, s.head_dim)
        need(len(cache.k) == len(cache.v) == s.n_layers, "decode_layer", "one cache per layer")
        for t in (*cache.k, *cache.v):
            ok = tuple(t.shape) == shape and t.dtype == bf16 and t.is_contiguous()
            need(ok, "decode_layer", f"KV cache layers must be contiguous bf16 {shape}")
        self._cache_ok = key
