"""The native decode kernels (hest_core/exec/kernels/gemv.c) against fp32 references."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from hest_core.exec import native
from hest_core.exec.kvcache import SeqSlot
from hest_core.exec.loading import TINY, build_lean, load_hf_model
from hest_core.exec.native import NativeArgumentError
from hest_core.exec.quant import Int8Linear
from hest_core.exec.routing import const_decider
from hest_core.paths import FP16, INT8

NAT = native.get()
needs_native = pytest.mark.skipif(NAT is None, reason=f"native kernels {native.status()}")

# (M, N, K): decode row counts; N not a multiple of the 4-row block; K with a tail under 32
SHAPES = [(1, 960, 576), (2, 7, 40), (3, 33, 1536), (4, 5, 17), (1, 49153, 64), (4, 576, 576)]


def _bf16_bound(ref: torch.Tensor) -> torch.Tensor:
    # one bf16 rounding of the result (2^-8 relative) plus fp32 summation-order noise
    return ref.abs() * 2**-8 + 1e-3


@needs_native
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv16_matches_fp32(m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    ref = x.float() @ w.float().t() + (0 if b is None else b.float())
    y = NAT.gemv16(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert ((y.float() - ref).abs() <= _bf16_bound(ref)).all()


@needs_native
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv8_matches_dequantised_fp32(m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k + 1)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    lin = Int8Linear.from_weight(w, b, torch.bfloat16)
    ref = x.float() @ lin.dequantized().t() + (0 if lin.bias is None else lin.bias.float())
    y = NAT.gemv8(x, lin.q, lin.scale, lin.bias)
    # the int16 activation step is 1/16383 of the row's max |x|: below bf16's own rounding
    err = (y.float() - ref).abs()
    assert (err <= _bf16_bound(ref) + x.float().abs().amax() / 16383 * w.abs().sum(1).max()).all()


@needs_native
def test_zero_and_extreme_rows():
    w = torch.randn(8, 64).bfloat16()
    x = torch.zeros(2, 64).bfloat16()
    assert (NAT.gemv16(x, w, None) == 0).all()
    lin = Int8Linear.from_weight(w.float(), None, torch.bfloat16)
    assert (NAT.gemv8(x, lin.q, lin.scale, None) == 0).all()  # an all-zero row has no scale
    big = torch.full((1, 64), 3e38).bfloat16()
    assert torch.isinf(NAT.gemv16(big, torch.ones(1, 64).bfloat16(), None)).all()


@needs_native
@pytest.mark.parametrize("kind", TINY)
def test_decode_steps_native_vs_pytorch_kernels(kind):
    """Decode steps of each tiny family (q/k norms, qkv bias) on the fp16 and int8 paths: the
    native kernels against PyTorch's (oneDNN, _weight_int8pack_mm) on the same cache."""
    hf = load_hf_model(kind)
    lean = build_lean(hf, torch.bfloat16, torch.device("cpu"), 64)
    for lw in lean.layers:
        for m in lw.int8_linears():
            m.woq_max_rows = 4  # weight-only int8 at decode, as the calibration picks here
    n, steps = 12, 4
    ids = torch.arange(n + steps) + 5
    for path in (FP16, INT8):
        dec = const_decider(path)
        logits = {}
        for off in (False, True):
            cache = lean.new_cache(1, n + steps)
            slots = [SeqSlot(0, n, 0, 0)]
            rows = []
            with torch.inference_mode(), native.disabled() if off else contextlib.nullcontext():
                lean.forward(ids[:n], torch.arange(n), slots, cache, dec, False)
                for t in range(n, n + steps):
                    rows.append(
                        lean.forward(
                            ids[t : t + 1],
                            torch.tensor([t]),
                            [SeqSlot(0, 1, 0, t)],
                            cache,
                            dec,
                            True,
                        )
                    )
            logits[off] = torch.cat(rows)
        cos = torch.nn.functional.cosine_similarity(logits[False], logits[True])
        assert (cos > 0.999).all(), (kind, path, cos)


def test_env_switch_turns_them_off():
    env = {**os.environ, "HEST_NATIVE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", "from hest_core.exec import native; print(native.status())"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert out.strip() == "off (HEST_NATIVE=0)"
    with native.disabled():
        assert not native.fits(torch.zeros(1, 8, dtype=torch.bfloat16), 8)


needs_amx = pytest.mark.skipif(NAT is None or not NAT.amx, reason="no AMX tiles here")


@needs_amx
@pytest.mark.parametrize("m,n,k", [(5, 960, 576), (16, 33, 1536), (8, 16, 32), (16, 3072, 64)])
@pytest.mark.parametrize("int8", [False, True])
def test_amx_product_matches_fp32(m, n, k, int8):
    """The AMX tile product (kernels/amx.c) the fused layer runs at many rows: bf16 and int8
    weights, N not a multiple of the 16-row block (the last block overlaps), a bias."""
    from hest_core.exec.quant import quantize_weight

    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    if int8:
        q, s = quantize_weight(w)
        ref = x.float() @ (q.float() * s[:, None]).t() + b.float()
        y = NAT.gemv_amx(x, q, s, b)
    else:
        ref = x.float() @ w.float().t() + b.float()
        y = NAT.gemv_amx(x, w, None, b)
    assert ((y.float() - ref).abs() <= _bf16_bound(ref)).all()


@needs_amx
def test_amx_product_refuses_what_the_tiles_do_not_take():
    lib = NAT._lib
    x, w = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(32, 64, dtype=torch.bfloat16)
    y = torch.full((4, 32), 7.0, dtype=torch.bfloat16)
    s = torch.zeros(64 * 32 + 64, dtype=torch.uint8)
    sp = s.data_ptr() + (-s.data_ptr() % 64)
    wp, xp, yp = w.data_ptr(), x.data_ptr(), y.data_ptr()
    assert lib.hest_gemv_amx(wp, None, None, xp, None, yp, sp, 64 * 32, 4, 32, 64, 1) == 0
    y.fill_(7.0)
    assert lib.hest_gemv_amx(wp, wp, None, xp, None, yp, sp, 64 * 32, 4, 32, 64, 1) == -1  # two
    assert lib.hest_gemv_amx(None, wp, None, xp, None, yp, sp, 64 * 32, 4, 32, 64, 1) == -1
    assert lib.hest_gemv_amx(wp, None, None, xp, None, yp, sp, 64 * 32, 17, 32, 64, 1) == -2
    assert lib.hest_gemv_amx(wp, None, None, xp, None, yp, sp, 64 * 32, 4, 15, 64, 1) == -3
    assert lib.hest_gemv_amx(wp, None, None, xp, None, yp, sp, 64 * 32, 4, 32, 48, 1) == -3
    assert lib.hest_gemv_amx(wp, None, None, xp, None, yp, sp, 100, 4, 32, 64, 1) == -6
    assert lib.hest_gemv_amx(wp, None, None, xp, None, yp, sp + 1, 64 * 32, 4, 32, 64, 1) == -6
    assert lib.hest_gemv_amx(wp, None, None, xp, None, yp, sp, 64 * 32, 4, 32, 64, 0) == -7
    assert torch.equal(y, torch.full((4, 32), 7.0, dtype=torch.bfloat16))  # nothing written
    assert NAT.set_amx(False) is False
    try:
        assert lib.hest_gemv_amx(wp, None, None, xp, None, yp, sp, 64 * 32, 4, 32, 64, 1) == -3
    finally:
        assert NAT.set_amx(True) is True


@needs_amx
@pytest.mark.parametrize(
    "m,n,k", [(16, 960, 576), (9, 36, 224), (8, 33, 1536), (16, 20, 32), (1, 16, 96), (12, 48, 480)]
)
def test_amx_q4_product_matches_its_dequantised_weights(m, n, k):
    """The Q4_1 tile product (`hest_gemv_q4_amx`, the fused layer's int4 products from
    AMX_MIN_ROWS_Q4 rows): each weight dequantised once to bf16(d q + mn), the products summed in
    fp32. N not a multiple of 16 (the last block overlaps) nor of 4 (q4.c's zero rows are not
    written), K with every tail superblock (16, 8, 4, 2, 1 blocks), a bias."""
    from hest_core.exec.q4 import Q4Weight

    g = torch.Generator().manual_seed(m * 1000 + n + k)
    qw = Q4Weight.from_weight(torch.randn(n, k, generator=g) / k**0.5)
    x = torch.randn(m, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    y = torch.full((m + 1, n), 7.0, dtype=torch.bfloat16)  # a row past the output stays as it was
    y[:m] = NAT.gemv_q4_amx(x, qw, b)
    assert torch.equal(y[m], torch.full((n,), 7.0, dtype=torch.bfloat16))
    deq = qw.dequantized()  # fp32, exactly d q + mn
    ref16 = x.float() @ deq.bfloat16().float().t() + b.float()  # the weights as the tiles take them
    assert ((y[:m].float() - ref16).abs() <= _bf16_bound(ref16)).all()
    ref = x.float() @ deq.t() + b.float()  # and within a weight's bf16 step of the exact product
    assert (
        (y[:m].float() - ref).abs() <= _bf16_bound(ref) + (x.float().abs() @ deq.abs().t()) * 2**-8
    ).all()


@needs_amx
def test_amx_q4_product_refuses_what_the_tiles_do_not_take():
    from hest_core.exec.q4 import Q4Weight

    lib = NAT._lib
    qw = Q4Weight.from_weight(torch.randn(32, 64))
    x, y = torch.zeros(4, 64, dtype=torch.bfloat16), torch.full((4, 32), 7.0, dtype=torch.bfloat16)
    s = torch.zeros(64 * 32 + 64, dtype=torch.uint8)
    sp = s.data_ptr() + (-s.data_ptr() % 64)
    wp, xp, yp = qw.data.data_ptr(), x.data_ptr(), y.data_ptr()
    assert lib.hest_gemv_q4_amx(wp, xp, None, yp, sp, 64 * 32, 4, 32, 64, 1) == 0
    y.fill_(7.0)
    assert lib.hest_gemv_q4_amx(None, xp, None, yp, sp, 64 * 32, 4, 32, 64, 1) == -1
    assert lib.hest_gemv_q4_amx(wp, xp, None, yp, None, 64 * 32, 4, 32, 64, 1) == -1
    assert lib.hest_gemv_q4_amx(wp, xp, None, yp, sp, 64 * 32, 17, 32, 64, 1) == -2
    assert lib.hest_gemv_q4_amx(wp, xp, None, yp, sp, 64 * 32, 0, 32, 64, 1) == -2
    assert lib.hest_gemv_q4_amx(wp, xp, None, yp, sp, 64 * 32, 4, 15, 64, 1) == -3
    assert lib.hest_gemv_q4_amx(wp, xp, None, yp, sp, 64 * 32, 4, 32, 48, 1) == -3
    assert lib.hest_gemv_q4_amx(wp, xp, None, yp, sp, 100, 4, 32, 64, 1) == -6
    assert lib.hest_gemv_q4_amx(wp, xp, None, yp, sp + 1, 64 * 32, 4, 32, 64, 1) == -6
    assert lib.hest_gemv_q4_amx(wp, xp, None, yp, sp, 64 * 32, 4, 32, 64, 0) == -7
    assert torch.equal(y, torch.full((4, 32), 7.0, dtype=torch.bfloat16))  # nothing written
    with pytest.raises(NativeArgumentError):
        NAT.gemv_q4_amx(torch.zeros(4, 32, dtype=torch.bfloat16), qw)  # K does not match
    assert NAT.set_amx(False) is False
    try:
        assert lib.hest_gemv_q4_amx(wp, xp, None, yp, sp, 64 * 32, 4, 32, 64, 1) == -3
    finally:
        assert NAT.set_amx(True) is True


@needs_native
@pytest.mark.parametrize("m,d", [(1, 576), (3, 17), (172, 576), (600, 960), (5, 64)])
def test_rms_norm_rows_match_pytorch(m, d):
    """`Native.rms_norm` (prefill's row norms, `model.norm_rows`) against `ops.rms_norm`: the
    same maths, the mean square summed in another order, so at most one bf16 step apart and
    bit-equal almost everywhere; within one rounding of the fp32 reference."""
    from hest_core.exec.model import norm_rows
    from hest_core.exec.ops import rms_norm

    g = torch.Generator().manual_seed(m * 7 + d)
    x = (torch.randn(m, d, generator=g) * 3).bfloat16()
    w = (torch.rand(d, generator=g) + 0.5).bfloat16()
    got, ref = NAT.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5)
    assert got.dtype == torch.bfloat16 and got.shape == (m, d)
    xf = x.float()
    exact = w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert (got.float() - exact).abs().le(exact.abs() * 2**-7 + 1e-6).all()
    assert (got == ref).float().mean() >= 0.999
    assert torch.equal(norm_rows(x, w, 1e-5), got)  # the model's prefill norm takes it
    # a batch whose rows need autograd keeps PyTorch's (the kernel has no backward)
    xg = x.float().requires_grad_()
    assert norm_rows(xg, w.float(), 1e-5).requires_grad


@needs_native
def test_rms_norm_refuses_what_it_cannot_take():
    w = torch.ones(8, dtype=torch.bfloat16)
    with pytest.raises(native.NativeArgumentError, match="rms_norm"):
        NAT.rms_norm(torch.ones(2, 8), w, 1e-5)  # fp32
    with pytest.raises(native.NativeArgumentError, match="rms_norm"):
        NAT.rms_norm(torch.ones(2, 8, dtype=torch.bfloat16), w[:4], 1e-5)
    assert NAT.rms_norm(torch.ones(0, 8, dtype=torch.bfloat16), w, 1e-5).shape == (0, 8)


@needs_native
@pytest.mark.parametrize("m", [1, 5, 172, 1030])
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e-3])
def test_rope_rows_equal_apply_rope_bit_for_bit(m, scale):
    """`Native.rope_rows` (prefill's rope, `LeanModel._pre`) against `ops.apply_rope` on the
    same q|k heads of a projection's rows, at arbitrary positions: equal bit for bit (the
    same two products and sum, each rounded to bf16), v's columns untouched."""
    from hest_core.exec.ops import apply_rope

    g = torch.Generator().manual_seed(m)
    heads, hd, kv = 12, 64, 3
    cos, sin = (torch.randn(4096, hd, generator=g).bfloat16() for _ in range(2))
    qkv = (torch.randn(m, (heads + kv) * hd, generator=g) * scale).bfloat16()
    qkv[0, :4] = torch.tensor([0.0, -0.0, float("inf"), -1e-40])  # zeros, inf, a subnormal
    pos = torch.randint(0, 4096, (m,), generator=g)
    ref = apply_rope(qkv[:, : heads * hd].view(m, heads, hd), cos[pos][:, None], sin[pos][:, None])
    got = qkv.clone()
    NAT.rope_rows(got, heads, hd, pos, cos, sin)
    bits = got[:, : heads * hd].contiguous().view(torch.int16)
    assert torch.equal(bits, ref.reshape(m, -1).contiguous().view(torch.int16))
    assert torch.equal(
        got[:, heads * hd :].view(torch.int16), qkv[:, heads * hd :].view(torch.int16)
    )


@needs_native
def test_rope_rows_refuse_what_they_cannot_take():
    cos = torch.zeros(8, 4, dtype=torch.bfloat16)
    x = torch.zeros(2, 12, dtype=torch.bfloat16)
    with pytest.raises(NativeArgumentError, match="position"):
        NAT.rope_rows(x, 3, 4, torch.tensor([0, 8]), cos, cos)  # past the table
    with pytest.raises(NativeArgumentError, match="rope_rows"):
        NAT.rope_rows(x.float(), 3, 4, torch.tensor([0, 1]), cos, cos)
    with pytest.raises(NativeArgumentError, match="rope_rows"):
        NAT.rope_rows(x, 4, 4, torch.tensor([0, 1]), cos, cos)  # 4 heads of 4 > 12 columns
    with pytest.raises(NativeArgumentError, match="rope_rows"):
        NAT.rope_rows(x, 3, 4, torch.tensor([0]), cos, cos)  # one position for two rows


@needs_native
@pytest.mark.parametrize("kind", TINY)
def test_prefill_with_native_rope_writes_what_pytorch_rope_does(kind):
    """A prefill forward of each tiny family with the native rope (where its layers take it)
    and with `apply_rope` (native kernels off for rope only): the same logits and KV cache bit
    for bit."""
    from hest_core.exec.model import LeanModel

    hf = load_hf_model(kind)
    lean = build_lean(hf, torch.bfloat16, torch.device("cpu"), 64)
    n, ids = 23, torch.arange(23) + 7
    out, took = {}, []
    for use in (True, False):
        cache = lean.new_cache(1, n)
        keep = LeanModel._rope_native
        LeanModel._rope_native = (
            (lambda self, qkv, keep=keep: took.append(keep(self, qkv)) or took[-1])
            if use
            else (lambda self, qkv: False)
        )
        try:
            with torch.inference_mode():
                logits = lean.forward(
                    ids, torch.arange(n), [SeqSlot(0, n, 0, 0)], cache, const_decider(FP16), False
                )
        finally:
            LeanModel._rope_native = keep
        out[use] = (logits, torch.stack(cache.k), torch.stack(cache.v))
    for a, b in zip(out[True], out[False], strict=True):
        assert torch.equal(a, b), kind
    if lean.layers[0].q_norm is None:  # every layer took the native rope
        assert len(took) == len(lean.layers) and all(took)
    else:  # Qwen3's q/k norms come before rope: apply_rope stays
        assert not took
