"""Every native entry point refuses out-of-range arguments with a Python error and touches no
memory (issue 11: a request once made the fused layer write past its KV cache and killed the
process). The C checks are called directly here, with one field at a time made wrong, so a check
the Python wrapper happens to make first does not hide a missing one in C."""

from __future__ import annotations

import ctypes

import pytest
import torch

from hest_core.errors import CacheOverflowError, NativeArgumentError
from hest_core.exec import native
from hest_core.exec.int4 import attach
from hest_core.exec.kvcache import SeqSlot
from hest_core.exec.loading import build_lean, load_hf_model
from hest_core.exec.routing import const_decider
from hest_core.paths import FP16

NAT = native.get()
needs_native = pytest.mark.skipif(NAT is None, reason=f"native kernels {native.status()}")


@pytest.fixture(scope="module")
def lean():
    torch.manual_seed(0)
    lean = build_lean(load_hf_model("tiny:llama"), torch.bfloat16, torch.device("cpu"), 64)
    for lw in lean.layers:
        for m in lw.int8_linears():
            m.woq_max_rows = 4
    return lean


# ---- the products -------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("m", [17, 40])
def test_gemv_rows_over_the_limit_are_refused_in_c(m):
    x = torch.randn(m, 64).bfloat16()
    w = torch.randn(8, 64).bfloat16()
    with pytest.raises(NativeArgumentError, match="row count"):
        NAT.gemv16(x, w, None)
    q, s = torch.zeros(8, 64, dtype=torch.int8), torch.ones(8)
    with pytest.raises(NativeArgumentError, match="row count"):
        NAT.gemv8(x, q, s, None)


@needs_native
def test_gemv_raw_zero_rows_and_bad_shapes_return_codes():
    lib = NAT._lib
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    y = torch.full((1, 8), 7.0, dtype=torch.bfloat16)
    p = (w.data_ptr(), x.data_ptr(), None, y.data_ptr())
    assert lib.hest_gemv_bf16(*p, 0, 8, 64, 1) == -2  # no rows
    assert lib.hest_gemv_bf16(*p, 1, 0, 64, 1) == -3  # no outputs
    assert lib.hest_gemv_bf16(*p, 1, 8, 64, 0) == -7  # no threads
    assert lib.hest_gemv_bf16(None, x.data_ptr(), None, y.data_ptr(), 1, 8, 64, 1) == -1
    q, s = torch.zeros(8, 64, dtype=torch.int8), torch.ones(8)
    scratch = torch.zeros(64 * 64, dtype=torch.int16)
    args = (q.data_ptr(), s.data_ptr(), x.data_ptr(), None, y.data_ptr(), scratch.data_ptr())
    assert lib.hest_gemv_i8(*args, 1, 8, 32768, 1) == -3  # int32 sums could overflow
    assert lib.hest_gemv_i8(*args, 17, 8, 64, 1) == -2
    assert torch.equal(y, torch.full((1, 8), 7.0, dtype=torch.bfloat16))  # nothing written


@needs_native
def test_gemv_python_side_checks_what_c_cannot_see():
    x = torch.randn(1, 64).bfloat16()
    with pytest.raises(NativeArgumentError, match="columns"):
        NAT.gemv16(x, torch.randn(8, 32).bfloat16(), None)
    with pytest.raises(NativeArgumentError, match="bias"):
        NAT.gemv16(x, torch.randn(8, 64).bfloat16(), torch.randn(9).bfloat16())
    with pytest.raises(NativeArgumentError, match="bf16"):
        NAT.gemv16(x.float(), torch.randn(8, 64).bfloat16(), None)
    with pytest.raises(NativeArgumentError, match="scale"):
        NAT.gemv8(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(7), None)


# ---- the fused decode layer ---------------------------------------------------------------------
def _step_inputs(lean, n: int, max_len: int = 16):
    d = lean.spec.hidden
    x = torch.randn(n, d).bfloat16()
    h = torch.randn(n, d).bfloat16()
    cache = lean.new_cache(n, max_len)
    slots = [SeqSlot(i, 1, i, 3) for i in range(n)]
    return x, h, cache, slots


def _snapshot(x, h, cache):
    return [t.clone() for t in (x, h, *cache.k, *cache.v)]


def _unchanged(before, x, h, cache) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, (x, h, *cache.k, *cache.v), strict=True))


@needs_native
@pytest.mark.parametrize("bad", [16, 17, 10_000, -1])
def test_position_outside_the_cache_is_refused(lean, bad):
    """The C check, not model.py's slot check: fused.forward is called directly."""
    x, h, cache, slots = _step_inputs(lean, 2)
    before = _snapshot(x, h, cache)
    pos = torch.tensor([3, bad])
    with pytest.raises(NativeArgumentError, match="position"):
        lean.fused.forward(x, h, pos, slots, cache, const_decider(FP16))
    assert _unchanged(before, x, h, cache)


@needs_native
@pytest.mark.parametrize("code", [3, -1, 7, 2**40])
def test_unknown_path_code_is_refused(lean, code):
    """A row whose path code is not 0..3 (3 int4: only where the layer has int4 copies, which
    this one has not) was once silently dropped; now it is an error."""
    x, h, cache, slots = _step_inputs(lean, 3)
    before = _snapshot(x, h, cache)

    def decide(li, hh):
        return torch.tensor([0, code, 1]), [1, 1, 1]

    with pytest.raises(NativeArgumentError, match="path code"):
        lean.fused.forward(x, h, torch.tensor([3, 3, 3]), slots, cache, decide)
    assert _unchanged(before, x, h, cache)


@needs_native
def test_rows_over_the_limit_are_refused(lean):
    n = native.LIMIT_ROWS + 1
    with pytest.raises(NativeArgumentError, match="rows=17"):
        NAT.scratch_bytes(64, 128, 4, 2, 16, 32, n, 1)
    x, h, cache, slots = _step_inputs(lean, 2)
    with pytest.raises(NativeArgumentError, match="positions, 2 rows"):
        lean.fused.forward(x, h, torch.tensor([3, 3, 3]), slots, cache, const_decider(FP16))


def _raw_layer_call(lean, mutate) -> int:
    """One raw hest_decode_layer call on valid arguments with one StepArgs field changed by
    `mutate(step)`; returns the C return code. x and h are checked untouched on failure."""
    fused = lean.fused
    x, h, cache, slots = _step_inputs(lean, 2)
    pos = torch.tensor([3, 4])
    fused.forward(x, h, pos, slots, cache, const_decider(FP16))  # builds the layer blocks
    st = native.StepArgs.from_buffer_copy(fused._step)
    st.pos = pos.data_ptr()
    mutate(st)
    paths = torch.zeros(2, dtype=torch.long)
    before = _snapshot(x, h, cache)
    rc = NAT.decode_layer(
        fused._addr[0],
        ctypes.addressof(st),
        paths.data_ptr(),
        x.data_ptr(),
        h.data_ptr(),
        fused._ln_next[0],
        cache.k[0].data_ptr(),
        cache.v[0].data_ptr(),
    )
    if rc:
        assert _unchanged(before, x, h, cache)
    return rc


@needs_native
def test_raw_layer_call_checks_every_bound(lean):
    assert _raw_layer_call(lean, lambda st: None) == 0  # the valid call runs
    cases = {
        "rows over the limit": (lambda st: setattr(st, "M", 17), -2),
        "no rows": (lambda st: setattr(st, "M", 0), -2),
        "cache holds fewer rows": (lambda st: setattr(st, "cache_rows", 1), -2),
        "rope table too short": (lambda st: setattr(st, "rope_len", 4), -4),
        "positions past max_len": (lambda st: setattr(st, "max_len", 4), -4),
        "scratch too small": (lambda st: setattr(st, "scratch_bytes", 64), -6),
        "no threads": (lambda st: setattr(st, "threads", 0), -7),
        "odd head_dim": (lambda st: setattr(st, "hd", 15), -3),
        "no scratch": (lambda st: setattr(st, "scratch", None), -1),
    }
    for name, (mutate, code) in cases.items():
        assert _raw_layer_call(lean, mutate) == code, name
        with pytest.raises(NativeArgumentError):
            native.check(code, "decode_layer")


@pytest.fixture(scope="module")
def lean4():
    """A tiny model with int4 copies (the int4 path's code 3 is valid on it)."""
    torch.manual_seed(0)
    hf = load_hf_model("tiny:llama")
    lean = build_lean(hf, torch.bfloat16, torch.device("cpu"), 64)
    attach(lean, hf)
    return lean


def _raw_int4_call(lean4, mutate, codes=(3, 0)) -> int:
    """One raw hest_decode_layer call on layer 0 of `lean4` with its LayerArgs changed by
    `mutate(layer_args, keep)` (keep: a list that holds tensors the mutation points at) and rows
    on `codes`; returns the C return code, x, h and the cache checked untouched on failure."""
    fused = lean4.fused
    x, h, cache, slots = _step_inputs(lean4, 2)
    pos = torch.tensor([3, 4])
    fused.forward(x, h, pos, slots, cache, const_decider(FP16))  # builds the layer blocks
    la = native.LayerArgs.from_buffer_copy(fused._layers[0])
    keep: list = []
    mutate(la, keep)
    st = native.StepArgs.from_buffer_copy(fused._step)
    st.pos = pos.data_ptr()
    paths = torch.tensor(codes, dtype=torch.long)
    before = _snapshot(x, h, cache)
    rc = NAT.decode_layer(
        ctypes.addressof(la),
        ctypes.addressof(st),
        paths.data_ptr(),
        x.data_ptr(),
        h.data_ptr(),
        fused._ln_next[0],
        cache.k[0].data_ptr(),
        cache.v[0].data_ptr(),
    )
    if rc:
        assert _unchanged(before, x, h, cache)
    return rc


def _low_rank(i: int, rank: int, real_rank: int | None = None):
    """A mutation giving product i (0 qkv, 1 o, 2 gu, 3 down) a low-rank term of `rank` rows
    (declared as `real_rank` when given)."""

    def mutate(la, keep):
        d = 64  # tiny:llama's hidden size; K and N of each product are at most 4 d here
        a = torch.zeros(max(rank, 1), 4 * d, dtype=torch.bfloat16)
        b = torch.zeros(4 * d, max(rank, 1), dtype=torch.bfloat16)
        keep += [a, b]
        la.lr_a[i], la.lr_b[i] = a.data_ptr(), b.data_ptr()
        la.lr_R[i] = rank if real_rank is None else real_rank

    return mutate


def _span(lo: int, hi: int):
    """A low-rank term on product 2 (gu, N = 256 here) whose first row spans [lo, hi)."""

    def mutate(la, keep):
        _low_rank(2, 4)(la, keep)
        span = torch.tensor([[lo, hi]] + [[0, 256]] * 3, dtype=torch.int32)
        keep.append(span)
        la.lr_span[2] = span.data_ptr()

    return mutate


@needs_native
def test_raw_int4_layer_call_checks_its_arguments(lean4):
    """The int4 arguments of hest_layer_t (Q4_1 copies, low-rank terms) and the path code 3."""
    assert _raw_int4_call(lean4, lambda la, keep: None) == 0  # int4 beside fp16 runs
    assert _raw_int4_call(lean4, _low_rank(2, 4)) == 0  # with a low-rank term
    assert _raw_int4_call(lean4, _span(3, 100)) == 0  # and the columns of its rows
    assert _raw_int4_call(lean4, lambda la, keep: None, codes=(4, 0)) == -5  # no path 4

    def no_int4(la, keep):
        for i in range(4):
            la.q4[i] = None

    assert _raw_int4_call(lean4, no_int4) == -5  # code 3 on a layer without int4 copies
    assert _raw_int4_call(lean4, no_int4, codes=(1, 2)) == 0  # other rows still run

    def some_int4(la, keep):
        la.q4[2] = None

    cases = {
        "three of the four int4 copies": (some_int4, -1),
        "a low-rank a without b": (
            lambda la, keep: (
                _low_rank(1, 4)(la, keep),
                setattr(la, "lr_b", (ctypes.c_void_p * 4)()),
            ),
            -1,
        ),
        "low-rank rank 0": (_low_rank(0, 4, real_rank=0), -3),
        "low-rank rank past K": (_low_rank(3, 4, real_rank=129), -3),
        "a span past N": (_span(0, 257), -3),
        "a span backwards": (_span(9, 8), -3),
        "a negative span": (_span(-1, 8), -3),
    }
    for name, (mutate, code) in cases.items():
        assert _raw_int4_call(lean4, mutate) == code, name


@needs_native
def test_controller_logits_refuses_bad_sizes():
    out = (ctypes.c_float * 3)(9.0, 9.0, 9.0)
    w = torch.zeros(300 * 8)
    h = torch.zeros(8, dtype=torch.bfloat16)
    p = w.data_ptr()
    lib = NAT._lib
    hp, op = h.data_ptr(), ctypes.addressof(out)
    assert lib.hest_ctl_logits(p, p, p, p, 300, 8, 3, hp, op) == -3
    assert lib.hest_ctl_logits(p, p, p, p, 4, 5000, 3, hp, op) == -3
    assert lib.hest_ctl_logits(p, p, p, p, 4, 8, 0, hp, op) == -3  # no paths
    assert lib.hest_ctl_logits(p, p, p, p, 4, 8, 17, hp, op) == -3  # more paths than it takes
    assert lib.hest_ctl_logits(p, p, p, None, 4, 8, 3, hp, op) == -1
    assert list(out) == [9.0, 9.0, 9.0]


# ---- the PyTorch loop -----------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_forward_past_the_cache_is_refused_before_any_write(lean, fused):
    """model.forward checks every slot against the cache, native layer or not (HEST_FUSED=0 once
    answered this with an IndexError at the cache write)."""
    lean.fused.enabled = fused
    try:
        cache = lean.new_cache(1, 8)
        before = [t.clone() for t in cache.k]
        with pytest.raises(CacheOverflowError, match="outside the KV cache"):
            lean.forward(
                torch.tensor([5]),
                torch.tensor([8]),
                [SeqSlot(0, 1, 0, 8)],
                cache,
                const_decider(FP16),
                True,
            )
        with pytest.raises(CacheOverflowError):
            lean.forward(
                torch.tensor([5, 6]),
                torch.tensor([0, 1]),
                [SeqSlot(0, 2, 1, 0)],  # a cache row that does not exist
                cache,
                const_decider(FP16),
                False,
            )
        assert all(torch.equal(a, b) for a, b in zip(before, cache.k, strict=True))
    finally:
        lean.fused.enabled = True
