"""The `int4` path's weights and decode kernel (`kernels/q4.c`): Q4_1 blocks, packed for AVX-512.

* `pack(blocks)` lays Q4_1 blocks (`gguf_blocks.Q4Blocks`: read from the default model's GGUF
  file, or made by `quantize_q4_1` at load) out the way `hest_gemv_q4` streams them: 20 bytes
  per 32 weights, codes reordered so that each vpdpwssd lane belongs to one block (q4.c's header
  has the layout and the numerics). `unpack` inverts it.
* `get()` builds the kernel once, as native.py builds hest.c (kernel_build.py: the machine's
  `gcc -O3 -march=native -fopenmp`, cached under `cache_dir()/kernels/` keyed by source, flags,
  compiler and CPU flags) and returns `Q4Kernels`, or None where it is off: `status()` says why
  (no AVX-512 F/BW/VL, no x86-64, no compiler, a failed build, or `HEST_NATIVE=0`).

Arguments the kernel refuses (rows outside 1..16, K not a multiple of 32, NULL pointers, ...)
raise `errors.NativeArgumentError`; the C entry point checks them before touching memory.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import NativeArgumentError
from . import kernel_build
from .gguf_blocks import BLOCK, Q4Blocks, quantize_q4_1

log = logging.getLogger("hest.q4")

SOURCE = Path(__file__).parent / "kernels" / "q4.c"
MAX_ROWS = 16  # activation rows per call (Q4_MAX_ROWS in q4.c)
TILE = 4  # weight rows interleaved in the packed layout
ERRORS = {
    -1: "a required pointer is NULL",
    -2: f"the row count M is outside 1..{MAX_ROWS}",
    -3: "N < 1, or K is not a positive multiple of 32",
    -6: "the scratch block is smaller than hest_q4_scratch_bytes(M, K)",
    -7: "threads < 1",
}

_P, _I, _S = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t


def groups(n_blocks: int) -> list[tuple[int, int]]:
    """Superblocks of a row of n_blocks blocks: (first block, G) with G = 16 while 16 remain,
    then the binary digits of the rest (q4.c's `q4_group`)."""
    out, b0 = [], 0
    while b0 < n_blocks:
        left = n_blocks - b0
        g = 16 if left >= 16 else 1 << (left.bit_length() - 1)
        out.append((b0, g))
        b0 += g
    return out


@functools.cache
def _order(g: int) -> torch.Tensor:
    """(G, 32) weight index inside a superblock of G blocks for word j of vector v."""
    v = torch.arange(g)[:, None]
    j = torch.arange(32)[None, :]
    lane, e, w = j // 2, j % 2, 16 // g
    return (lane // w) * BLOCK + 2 * ((lane % w) * g + v) + e


@dataclass
class Q4Weight:
    """One (possibly fused) weight packed for `hest_gemv_q4`: data (ceil(N/4), 80 * K/32) uint8
    (tiles of 4 rows, 20 bytes per 32 weights)."""

    data: torch.Tensor
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per product (the bandwidth floor's numerator; N rounded up to
        a multiple of 4)."""
        return self.data.numel()

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> Q4Weight:
        """Quantise a dense (N, K) weight at load (asymmetric 4-bit per group of 32) and pack."""
        return pack(quantize_q4_1(w))

    def dequantized(self) -> torch.Tensor:
        """(N, K) fp32: the weights the kernel multiplies by, exactly."""
        return unpack(self).dequantize()


def pack(b: Q4Blocks) -> Q4Weight:
    """Q4_1 blocks -> the kernel's layout (q4.c header): tiles of 4 rows (N padded with zero
    rows), each superblock's codes chunk by chunk for the 4 rows, then their scales and minimums."""
    n, k = b.shape
    nt = -(-n // TILE)
    pad = nt * TILE - n
    codes = F.pad(b.codes().reshape(n, k), (0, 0, 0, pad))  # (Np, K) uint8 0..15
    d = F.pad(b.d.view(torch.int16), (0, 0, 0, pad)).view(torch.uint8)  # (Np, 2 nb) bytes
    m = F.pad(b.m.view(torch.int16), (0, 0, 0, pad)).view(torch.uint8)
    segs = []
    for b0, g in groups(k // BLOCK):
        vec = codes[:, b0 * BLOCK : (b0 + g) * BLOCK][:, _order(g)]  # (Np, G, 32) words
        # G > 1: (Np, G/2, 32), vector 2c in the low nibbles, 2c+1 in the high; G = 1: (Np, 16)
        lo, hi = (vec[:, 0::2], vec[:, 1::2]) if g > 1 else (vec[:, 0, :16], vec[:, 0, 16:])
        nib = (lo | (hi << 4)).reshape(nt, TILE, -1, 32 if g > 1 else 16)  # (tiles, 4, chunks, B)
        dm = torch.cat([d[:, 2 * b0 : 2 * (b0 + g)], m[:, 2 * b0 : 2 * (b0 + g)]], 1)  # (Np, 4G)
        segs += [nib.transpose(1, 2).reshape(nt, -1), dm.reshape(nt, -1)]
    return Q4Weight(torch.cat(segs, dim=1).contiguous(), n, k)


def unpack(w: Q4Weight) -> Q4Blocks:
    """The kernel's layout -> Q4_1 blocks (pack's inverse)."""
    n, k = w.n, w.k
    nt = w.data.shape[0]
    codes = torch.empty(nt * TILE, k, dtype=torch.uint8)
    ds, ms, off = [], [], 0
    for b0, g in groups(k // BLOCK):
        nib = w.data[:, off : off + 64 * g]  # (tiles, chunks x 4 rows x bytes)
        nib = nib.reshape(nt, -1, TILE, 32 if g > 1 else 16).transpose(1, 2).reshape(nt * TILE, -1)
        if g > 1:
            nib = nib.reshape(-1, g // 2, 32)
            vec = torch.stack([nib & 0x0F, nib >> 4], dim=2).reshape(-1, g, 32)
        else:
            vec = torch.cat([nib & 0x0F, nib >> 4], dim=1).reshape(-1, 1, 32)
        sb = torch.empty(nt * TILE, g * BLOCK, dtype=torch.uint8)
        sb[:, _order(g).reshape(-1)] = vec.reshape(nt * TILE, -1)
        codes[:, b0 * BLOCK : (b0 + g) * BLOCK] = sb
        dm = w.data[:, off + 64 * g : off + 80 * g].reshape(nt * TILE, 4 * g).contiguous()
        ds.append(dm[:, : 2 * g].contiguous().view(torch.float16))
        ms.append(dm[:, 2 * g :].contiguous().view(torch.float16))
        off += 80 * g
    c = codes[:n].reshape(n, k // BLOCK, BLOCK)
    return Q4Blocks(
        (c[..., :16] | (c[..., 16:] << 4)).contiguous(),
        torch.cat(ds, 1)[:n].contiguous(),
        torch.cat(ms, 1)[:n].contiguous(),
    )


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise NativeArgumentError(f"native gemv_q4: {what}", code="native_gemv_q4")


class Q4Kernels:
    """The loaded library. `gemv` takes and returns torch tensors (CPU, contiguous, bf16)."""

    def __init__(self, path: Path, note: str):
        lib = ctypes.CDLL(str(path))
        lib.hest_gemv_q4.argtypes = [_P, _P, _P, _P, _P, _S, _I, _I, _I, _I]
        lib.hest_gemv_q4.restype = _I
        lib.hest_q4_scratch_bytes.argtypes = [_I, _I]
        lib.hest_q4_scratch_bytes.restype = _S
        lib.hest_q4_stream_read.argtypes = [_P, _S, _I]
        lib.hest_q4_stream_read.restype = ctypes.c_uint64
        self._lib, self.path, self.note = lib, path, note

    def stream_read(self, buf: torch.Tensor, threads: int) -> int:
        """A plain streaming read of buf's bytes on `threads` threads (the bandwidth that
        bench_q4's floor divides by); returns an XOR of the data."""
        return int(
            self._lib.hest_q4_stream_read(buf.data_ptr(), buf.numel() * buf.element_size(), threads)
        )

    def scratch_bytes(self, m: int, k: int) -> int:
        """Bytes of working memory a call with m activation rows of k columns needs."""
        return int(self._lib.hest_q4_scratch_bytes(m, k))

    def raw(self, w, x, bias, y, scratch, scratch_bytes: int, m: int, n: int, k: int, threads: int):
        """`hest_gemv_q4` on raw addresses (ints or None); a refusal raises NativeArgumentError."""
        rc = self._lib.hest_gemv_q4(w, x, bias, y, scratch, scratch_bytes, m, n, k, threads)
        if rc:
            why = ERRORS.get(rc, f"unknown error code {rc}")
            raise NativeArgumentError(
                f"native gemv_q4 refused its arguments (M={m}, N={n}, K={k}, threads={threads}): "
                f"{why}",
                code="native_gemv_q4",
            )

    def gemv(
        self,
        x: torch.Tensor,
        w: Q4Weight,
        bias: torch.Tensor | None = None,
        threads: int | None = None,
        out: torch.Tensor | None = None,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (M, K) bf16 @ W^T (+ bias (N,) bf16) -> (M, N) bf16, M = 1..16.

        out / scratch: optional preallocated (M, N) bf16 result and uint8 working memory of at
        least `scratch_bytes(M, K)` (benchmarks reuse them); threads defaults to torch's.
        """
        _need(
            x.dim() == 2 and x.dtype == torch.bfloat16 and x.device.type == "cpu",
            "x must be (M, K) bf16 on CPU",
        )
        x = x.contiguous()
        m, k = x.shape
        _need(k == w.k, f"x has {k} columns, the weight {w.k}")
        ok = w.data.dtype == torch.uint8 and w.data.is_contiguous()
        size = -(-w.n // TILE) * TILE * (w.k // BLOCK) * 20
        _need(ok and w.data.numel() == size, "weight data: (ceil(N/4), 80*K/32) uint8")
        _need(
            bias is None
            or (bias.dtype == torch.bfloat16 and bias.is_contiguous() and bias.numel() == w.n),
            "bias must be (N,) bf16",
        )
        if out is None:
            out = torch.empty(m, w.n, dtype=torch.bfloat16)
        _need(
            out.dtype == torch.bfloat16 and out.is_contiguous() and out.shape == (m, w.n),
            "out must be (M, N) bf16",
        )
        need = self.scratch_bytes(m, k)
        if scratch is None:
            scratch = torch.empty(max(need, 1), dtype=torch.uint8)
        self.raw(
            w.data.data_ptr(),
            x.data_ptr(),
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            scratch.data_ptr(),
            scratch.numel() * scratch.element_size(),
            m,
            w.n,
            k,
            torch.get_num_threads() if threads is None else threads,
        )
        return out


def build(extra: tuple[str, ...] = ()) -> tuple[Q4Kernels | None, str]:
    """Build (or load from the cache) q4.c, with extra compiler flags for variants (bench_q4
    `--flag=-DQ4_PD=2048`, the tests' `-mno-avx512vnni`); (kernels or None, why)."""
    return kernel_build.load_library(Q4Kernels, SOURCE, "q4", extra, "q4")


_kernels = kernel_build.Lazy(build)


def get() -> Q4Kernels | None:
    """The kernel, built on first use; None where it is off (see `status()`)."""
    return _kernels.get()


def status() -> str:
    """What runs: a note on the loaded library, or "off (why)"."""
    return _kernels.status()
