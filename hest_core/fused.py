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
import weakref
from typing import TYPE_CHECKING

import torch

from . import native
from . import paths as reg
from .config import RuntimeConfig

if TYPE_CHECKING:
    from .model import Decider, KVCache, LayerWeights, LeanModel, SeqSlot


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
        lean, s = self.lean, self.lean.spec
        nat = native.get()
        assert nat is not None
        n = x.shape[0]
        self._check_step(x, h, positions, slots, cache)
        if self._key is None:
            self._sync()  # usable() syncs every step; a direct caller may not have called it
        threads = torch.get_num_threads()
        skey = (n, cache.max_len, threads)
        if skey != self._scratch_key:
            nbytes = nat.scratch_bytes(
                s.hidden,
                s.intermediate,
                s.n_heads,
                s.n_kv_heads,
                s.head_dim,
                cache.max_len,
                n,
                threads,
            )
            self._scratch = torch.empty(nbytes + 64, dtype=torch.uint8)
            self._scratch_key = skey
        assert self._scratch is not None
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
        xp, hp = x.data_ptr(), h.data_ptr()
        call, step, addr, ln_next = nat.decode_layer, self._step_addr, self._addr, self._ln_next
        ks, vs = cache.k, cache.v
        for li in range(s.n_layers):
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


class NativeController:
    """A controller's logits for one row at decode, in C (hest_ctl_logits): one call per layer
    instead of ~8 PyTorch operators. For the factorised `Controller`, `lay` = sigmoid(w_layer +
    u beta) is made once per request and the additive term is a0 at every layer; for the
    `AdaptiveController`, `update(beta)` remakes both (L, k) and (L, P) at every decode step
    (its beta is the request's remaining ratio). Other classes (the baselines') stay in PyTorch."""

    _weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, ctl, beta: float):
        w = self._weights.get(ctl)
        if w is None:
            with torch.no_grad():
                w = tuple(t.detach().float().contiguous() for t in (ctl.hest_w_tok, ctl.hest_a))
            self._weights[ctl] = w
        self._keep, self.ctl = w, ctl
        self.adaptive = bool(getattr(ctl, "uses_remaining", False))
        self.k, self.d = ctl.k, ctl.hidden
        L, P = ctl.hest_w_layer.shape[0], ctl.hest_a.shape[0]  # layers, paths
        self.P = P
        self.lay = torch.empty(L, self.k, dtype=torch.float32)
        self.bias = torch.empty(L, P, dtype=torch.float32)
        self.update(beta)
        self.out = (ctypes.c_float * P)()
        self._args = (w[0].data_ptr(), w[1].data_ptr())
        self._lay0, self._bias0 = self.lay.data_ptr(), self.bias.data_ptr()
        self._out = ctypes.addressof(self.out)
        nat = native.get()
        assert nat is not None
        self._call = nat.ctl_logits

    def update(self, beta: float) -> None:
        """Set the request's beta for the next decode step (in place: the pointers stay)."""
        ctl = self.ctl
        with torch.no_grad():
            if self.adaptive:
                lay, bias = ctl.native_parts(beta, 1)
            else:
                lay = torch.sigmoid(ctl.hest_w_layer + ctl.hest_u * beta)
                bias = ctl.hest_a0.expand(self.bias.shape)
            self.lay.copy_(lay)
            self.bias.copy_(bias)

    @classmethod
    def of(cls, ctl, beta: float) -> NativeController | None:
        from .controller import AdaptiveController, Controller

        if type(ctl) not in (Controller, AdaptiveController) or native.get() is None:
            return None
        if getattr(native._off, "v", False) or ctl.hest_a.shape[0] > 16:
            return None
        if ctl.k > 256 or ctl.hidden > 4096 or ctl.hest_w_tok.device.type != "cpu":
            return None
        return cls(ctl, beta)

    def logits(self, li: int, h: torch.Tensor) -> list[float]:
        """(P,) logits of one row. h: (1, d) contiguous bf16 on CPU; li in 0..n_layers-1.
        Raises NativeArgumentError for another h or layer."""
        if not h.is_contiguous():
            h = h.contiguous()
        ok = h.dtype == torch.bfloat16 and h.numel() == self.d and 0 <= li < self.lay.shape[0]
        if not ok:
            native.need(False, "ctl_logits", f"h must be bf16 of {self.d}, layer {li} known")
        w_tok, a = self._args
        rc = self._call(
            w_tok,
            self._lay0 + li * self.k * 4,
            a,
            self._bias0 + li * self.P * 4,
            self.k,
            self.d,
            self.P,
            h.data_ptr(),
            self._out,
        )
        if rc:
            native.check(rc, "ctl_logits")
        return self.out[:]
