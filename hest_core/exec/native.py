"""Native decode kernels (`kernels/hest.c`: gemv.c, q4.c, the fused layer in layer.c and the
Q8_0 lm_head in head.c, one library): small-M matrix-vector products for x86-64 AVX-512, and one
decoder layer per call.

At decode a step reads every weight once and does two flops per weight, so it is bound by
memory bandwidth; oneDNN's GEMM reaches ~12 GB/s on it here, and a loop that streams the
weights with software prefetch reaches ~20 GB/s, the bandwidth a plain read of memory gets
(docs/runtime.md has the measurements). The kernels are C, built once with the machine's `gcc`
(`-O3 -march=native -fopenmp`) into the cache (`~/.cache/hest/kernels/`: kernel_build.py) and
called through ctypes. Single products run for the rows of a forward that fit them (`MAX_ROWS`
rows or fewer, `fits`); the fused decode layer (fused.py) for decode steps of up to
`FUSED_MAX_ROWS` rows; everything else stays with PyTorch.

Off when: the CPU lacks AVX-512 (F, BW, VL), there is no C compiler, the build fails (a warning
says why), or `HEST_NATIVE=0`. Nothing else changes then: the same paths run on oneDNN and
`_weight_int8pack_mm`, slower at decode.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from pathlib import Path

import torch

from ..config import RuntimeConfig
from ..errors import NativeArgumentError
from .kernel_build import SANITIZE, Lazy, load_library

SOURCE = Path(__file__).parent / "kernels" / "hest.c"  # includes the other kernels/*.c
# Rows up to which the native kernels beat oneDNN (measured at decode shapes, docs/runtime.md):
# at 1-4 rows for the layer weights; the 49152-row lm_head only at 1 row.
MAX_ROWS = 4
MAX_ROWS_WIDE = 1
WIDE_N = 16384
# Rows of a decode step the fused layer (fused.py, `hest_decode_layer`) takes: all of them up to
# gemv.c's limit (measured against the PyTorch loop at 1-16 rows: docs/runtime.md).
FUSED_MAX_ROWS = 16
# The most activation rows one native call accepts (HEST_MAX_ROWS in kernels/gemv.c).
LIMIT_ROWS = 16
# The error codes of kernels/gemv.c (HEST_E*): every exported function checks its arguments and
# returns one of these instead of touching memory it was not given.
ERRORS = {
    -1: "a required pointer is NULL",
    -2: f"the row count is outside 1..{LIMIT_ROWS}, or the KV cache holds fewer rows than the step",
    -3: "a dimension is outside the supported range",
    -4: "a position is outside the KV cache (0..max_len-1) or past the rope table",
    -5: "a path code the fused layer does not run (0 fp16, 1 int8, 2 skip, 3 int4 where the layer "
    "has int4 copies; paths.py native_code)",
    -6: "the scratch block is smaller than the call needs (or not 64-byte aligned)",
    -7: "threads < 1",
}

_P, _I = ctypes.c_void_p, ctypes.c_int


# fmt: off
_LAYER_PTRS = ("ln1", "ln2", "wqkv", "bqkv", "wo", "wgu", "wdown", "q_norm", "k_norm", "qkv8",
               "o8", "gu8", "down8", "qkv8_s", "o8_s", "gu8_s", "down8_s", "sc_a", "sc_b")
# fmt: on


class LayerArgs(ctypes.Structure):
    """`hest_layer_t` in kernels/layer.c: one decoder layer's weights (NULL where absent)."""

    _fields_ = [(name, _P) for name in _LAYER_PTRS] + [
        ("R", _I),
        ("q4", _P * 4),  # Q4_1 copies of qkv, o, gu, down (int4.py), or NULL
        ("lr_a", _P * 4),  # their low-rank terms: a (R, K), b^T (R, N) bf16, or NULL
        ("lr_b", _P * 4),
        ("lr_R", _I * 4),
        ("lr_span", _P * 4),  # per row of b^T its nonzero columns [lo, hi) (R, 2) int32, or NULL
    ]


class StepArgs(ctypes.Structure):
    """`hest_step_t` in kernels/layer.c: the shapes and per-step inputs of one decode step."""

    _fields_ = [
        *((name, _I) for name in ("d", "I", "H", "KVH", "hd", "max_len", "M", "threads")),
        ("eps", ctypes.c_float),
        ("pos", _P),
        ("cos", _P),
        ("sin", _P),
        ("scratch", _P),
        ("cache_rows", _I),
        ("rope_len", _I),
        ("scratch_bytes", ctypes.c_size_t),
    ]


def need(ok: bool, entry: str, what: str) -> None:
    """The Python side of an entry point's checks (what C cannot see: dtypes, tensor sizes)."""
    if not ok:
        raise NativeArgumentError(f"native {entry}: {what}", code="native_" + entry)


def _bias_ok(bias: torch.Tensor | None, n: int) -> bool:
    return bias is None or (
        bias.dtype == torch.bfloat16 and bias.is_contiguous() and bias.numel() == n
    )


def check(rc: int, entry: str) -> None:
    """Raise NativeArgumentError for a nonzero return code of native function `entry`."""
    if rc:
        why = ERRORS.get(rc, f"unknown error code {rc}")
        raise NativeArgumentError(
            f"native {entry} refused its arguments: {why}", code="native_" + entry
        )


class Native:
    """The loaded library. Methods take and return torch tensors (CPU, contiguous bf16)."""

    def __init__(self, path: Path, note: str):
        lib = ctypes.CDLL(str(path))
        lib.hest_gemv_bf16.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I]
        lib.hest_gemv_bf16.restype = _I
        lib.hest_gemv_i8.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I]
        lib.hest_gemv_i8.restype = _I
        lib.hest_decode_layer.argtypes = [_P] * 8
        lib.hest_decode_layer.restype = _I
        lib.hest_decode_scratch_bytes.argtypes = [_I] * 8
        lib.hest_decode_scratch_bytes.restype = ctypes.c_size_t
        lib.hest_ctl_logits.argtypes = [_P, _P, _P, _P, _I, _I, _I, _P, _P]
        lib.hest_ctl_logits.restype = _I
        lib.hest_ctl_rows.argtypes = [_P] * 5 + [_I] * 4 + [_P] * 3
        lib.hest_ctl_rows.restype = _I
        lib.hest_amx_init.restype = _I
        lib.hest_amx_enable.argtypes = [_I]
        lib.hest_amx_enable.restype = _I
        lib.hest_gemv_amx.argtypes = [_P] * 7 + [ctypes.c_size_t] + [_I] * 4
        lib.hest_gemv_amx.restype = _I
        lib.hest_gemv_q4_amx.argtypes = [_P] * 5 + [ctypes.c_size_t] + [_I] * 4
        lib.hest_gemv_q4_amx.restype = _I
        lib.hest_head_q8.argtypes = [_P] * 4 + [_I] * 4
        lib.hest_head_q8.restype = _I
        lib.hest_rms_norm.argtypes = [_P, _P, _P, _I, _I, ctypes.c_float, _I]
        lib.hest_rms_norm.restype = _I
        lib.hest_rope_rows.argtypes = [_P] * 4 + [_I] * 6
        lib.hest_rope_rows.restype = _I
        self.amx = bool(lib.hest_amx_init())  # AMX tiles for the fused layer's many-row products
        self.amx_enabled = self.amx  # whether they are used now (`set_amx`)
        if self.amx:
            note += ", amx"
        self._lib, self.path, self.note = lib, path, note
        self.ctl_logits = lib.hest_ctl_logits  # (w_tok, lay, A, a0, k, d, P, h, out)
        # (w_tok, lay (M, k), A, a0 (M, P), sub (P) or None, k, d, P, M, h (M, d), out, paths)
        self.ctl_rows = lib.hest_ctl_rows
        # (layer*, step*, paths, x, h, ln_next, kc, vc) -> 0 or an error code: see check()
        self.decode_layer = lib.hest_decode_layer

    def scratch_bytes(
        self,
        d: int,
        inter: int,
        heads: int,
        kv_heads: int,
        hd: int,
        max_len: int,
        rows: int,
        threads: int,
    ) -> int:
        """Bytes of working memory one `decode_layer` call needs for these shapes. Raises
        NativeArgumentError for shapes the layer cannot take (rows outside 1..LIMIT_ROWS, ...)."""
        n = int(
            self._lib.hest_decode_scratch_bytes(
                d, inter, heads, kv_heads, hd, max_len, rows, threads
            )
        )
        need(
            n > 0,
            "decode_scratch_bytes",
            f"no decode layer for rows={rows}, threads={threads}, "
            f"d={d}, I={inter}, heads={heads}/{kv_heads}, head_dim={hd}, max_len={max_len}",
        )
        return n

    def set_amx(self, on: bool) -> bool:
        """Let the fused layer use the AMX tiles (where `hest_amx_init` found them) or not
        (benchmarks and tests compare the two); returns whether they are used now."""
        self.amx_enabled = bool(self._lib.hest_amx_enable(int(on)))
        return self.amx_enabled

    def gemv_amx(
        self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bias=None
    ) -> torch.Tensor:
        """The AMX tile product alone (kernels/amx.c): x (M, K) bf16 against w (N, K) bf16, or
        int8 with fp32 `scale` (N,) -> (M, N) bf16. Raises NativeArgumentError where the tiles
        do not take it (AMX off, N < 16, K not a multiple of 32)."""
        x = x.contiguous()
        m, k = x.shape
        n = w.shape[0]
        i8 = w.dtype == torch.int8
        need(
            x.dtype == torch.bfloat16 and w.is_contiguous() and w.shape[1] == k, "gemv_amx", "x, w"
        )
        need(not i8 or (scale is not None and scale.dtype == torch.float32), "gemv_amx", "scale")
        need(_bias_ok(bias, n), "gemv_amx", f"bias must be contiguous bf16 of {n}")
        weights = (None, w.data_ptr(), scale.data_ptr()) if i8 else (w.data_ptr(), None, None)
        return self._tiles(self._lib.hest_gemv_amx, "gemv_amx", weights, x, bias, n)

    def gemv_q4_amx(self, x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The Q4_1 tile product alone (kernels/amx.c, `hest_gemv_q4_amx`): x (M, K) bf16, M
        1..16, against w, a `q4.Q4Weight` (N, K) -> (M, N) bf16, each weight dequantised to
        bf16(d q + mn) and the products summed in fp32. Raises NativeArgumentError where the
        tiles do not take it (AMX off or disabled, N < 16, K not a multiple of 32)."""
        x = x.contiguous()
        m, k = x.shape
        n = w.n
        need(x.dtype == torch.bfloat16 and w.k == k, "gemv_q4_amx", f"x must be (M, {w.k}) bf16")
        need(_bias_ok(bias, n), "gemv_q4_amx", f"bias must be contiguous bf16 of {n}")
        return self._tiles(
            self._lib.hest_gemv_q4_amx, "gemv_q4_amx", (w.data.data_ptr(),), x, bias, n
        )

    @staticmethod
    def _tiles(fn, entry: str, weights: tuple, x: torch.Tensor, bias, n: int) -> torch.Tensor:
        """Call a tile product `fn(*weights, x, bias, y, scratch, scratch_bytes, M, N, K,
        threads)` on a fresh (M, N) bf16 output and a 64-byte aligned scratch of K/32 KB."""
        m, k = x.shape
        y = torch.empty(m, n, dtype=torch.bfloat16)
        scratch = torch.empty(k * 32 + 64, dtype=torch.uint8)
        base = scratch.data_ptr() + (-scratch.data_ptr() % 64)
        b = None if bias is None else bias.data_ptr()
        rc = fn(
            *weights, x.data_ptr(), b, y.data_ptr(), base, k * 32, m, n, k, torch.get_num_threads()
        )
        check(rc, entry)
        return y

    def gemv16(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (M, K) bf16, w (N, K) bf16 -> (M, N) bf16."""
        x = x.contiguous()
        m, k = x.shape
        n = w.shape[0]
        bf16 = torch.bfloat16
        need(x.dtype == bf16 and x.device.type == "cpu", "gemv_bf16", "x must be CPU bf16")
        need(w.is_contiguous() and w.dtype == bf16 and w.dim() == 2, "gemv_bf16", "w (N, K) bf16")
        need(w.shape[1] == k, "gemv_bf16", f"w has {w.shape[1]} columns, x has {k}")
        need(_bias_ok(bias, n), "gemv_bf16", f"bias must be contiguous bf16 of {n}")
        y = torch.empty(m, n, dtype=x.dtype)
        rc = self._lib.hest_gemv_bf16(
            w.data_ptr(),
            x.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            m,
            n,
            k,
            torch.get_num_threads(),
        )
        check(rc, "gemv_bf16")
        return y

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """RMS norm of x (M, d) CPU bf16 by weight w (d,) bf16 -> (M, d) bf16 (kernels/
        layer_ops.c: fp32 mean square, the normalised row rounded to bf16, then w's bf16
        product, as the fused layer computes it). Raises NativeArgumentError for other
        tensors."""
        x = x.contiguous()
        ok = x.dim() == 2 and x.dtype == torch.bfloat16 and x.device.type == "cpu"
        need(ok, "rms_norm", "x must be 2-D CPU bf16")
        d = x.shape[1]
        ok = w.dtype == torch.bfloat16 and w.is_contiguous() and w.numel() == d
        need(ok, "rms_norm", f"w must be contiguous bf16 of {d}")
        y = torch.empty_like(x)
        if x.shape[0] == 0:
            return y
        rc = self._lib.hest_rms_norm(
            x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0], d, eps, torch.get_num_threads()
        )
        check(rc, "rms_norm")
        return y

    def rope_rows(
        self,
        x: torch.Tensor,
        heads: int,
        hd: int,
        pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> None:
        """Rotary embedding, in place, of the first `heads` heads of hd values of every row of
        x (M, >= heads * hd) CPU bf16, rows contiguous (a row stride of its own is fine: a
        projection's q|k|v output); pos (M,) int64 positions into cos / sin (rope_len, hd)
        contiguous bf16. Bit for bit `ops.apply_rope` of those heads (kernels/layer_ops.c).
        Raises NativeArgumentError for other tensors or a position past the tables."""
        ok = x.dim() == 2 and x.dtype == torch.bfloat16 and x.device.type == "cpu"
        need(
            ok and x.stride(1) == 1 and x.shape[1] >= heads * hd,
            "rope_rows",
            f"x must be 2-D CPU bf16 rows of >= {heads} x {hd}",
        )
        ok = (
            all(
                t.dtype == torch.bfloat16
                and t.is_contiguous()
                and t.dim() == 2
                and t.shape[1] == hd
                for t in (cos, sin)
            )
            and cos.shape == sin.shape
        )
        need(ok, "rope_rows", f"cos and sin must be contiguous bf16 (rope_len, {hd})")
        pos = pos.to(torch.int64).contiguous()
        need(pos.dim() == 1 and pos.numel() == x.shape[0], "rope_rows", "pos must be (M,)")
        if x.shape[0] == 0:
            return
        rc = self._lib.hest_rope_rows(
            x.data_ptr(),
            pos.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            x.shape[0],
            x.stride(0),
            heads,
            hd,
            cos.shape[0],
            torch.get_num_threads(),
        )
        check(rc, "rope_rows")

    def head_q8(self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x (M, K) bf16 against Q8_0 weights: codes (N, K) int8, scales (N, K/32) fp16 ->
        (M, N) bf16, bit for bit `gemv16` on the weights `codes * scales` rounded to bf16
        (kernels/head.c)."""
        x = x.contiguous()
        m, k = x.shape
        n = codes.shape[0]
        need(x.dtype == torch.bfloat16 and x.device.type == "cpu", "head_q8", "x must be CPU bf16")
        ok = codes.dtype == torch.int8 and codes.is_contiguous() and codes.shape == (n, k)
        need(ok, "head_q8", f"codes must be contiguous int8 ({n}, {k})")
        ok = scales.dtype == torch.float16 and scales.is_contiguous()
        need(ok and scales.shape == (n, k // 32), "head_q8", f"scales: fp16 ({n}, {k // 32})")
        y = torch.empty(m, n, dtype=x.dtype)
        rc = self._lib.hest_head_q8(
            codes.data_ptr(),
            scales.data_ptr(),
            x.data_ptr(),
            y.data_ptr(),
            m,
            n,
            k,
            torch.get_num_threads(),
        )
        check(rc, "head_q8")
        return y

    def gemv8(
        self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x (M, K) bf16, q (N, K) int8 with fp32 scales (N,) -> (M, N) bf16."""
        x = x.contiguous()
        m, k = x.shape
        n = q.shape[0]
        need(x.dtype == torch.bfloat16 and x.device.type == "cpu", "gemv_i8", "x must be CPU bf16")
        need(
            q.is_contiguous() and q.dtype == torch.int8 and q.dim() == 2, "gemv_i8", "q (N, K) int8"
        )
        need(q.shape[1] == k, "gemv_i8", f"q has {q.shape[1]} columns, x has {k}")
        ok = scale.dtype == torch.float32 and scale.is_contiguous() and scale.numel() == n
        need(ok, "gemv_i8", f"scale must be contiguous fp32 of {n}")
        need(_bias_ok(bias, n), "gemv_i8", f"bias must be contiguous bf16 of {n}")
        y = torch.empty(m, n, dtype=x.dtype)
        scratch = torch.empty(m * (k + 2), dtype=torch.int16)  # int16 activations + fp32 scales
        rc = self._lib.hest_gemv_i8(
            q.data_ptr(),
            scale.data_ptr(),
            x.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            scratch.data_ptr(),
            m,
            n,
            k,
            torch.get_num_threads(),
        )
        check(rc, "gemv_i8")
        return y


def _sanitize() -> list[str]:
    return SANITIZE if RuntimeConfig.from_env(only=("native_sanitize",)).native_sanitize else []


def _build() -> tuple[Native | None, str]:
    return load_library(Native, SOURCE, "gemv", _sanitize(), "gemv")


_kernels = Lazy(_build)


def get() -> Native | None:
    """The kernels, built on first use; None where they are off (see `status()`)."""
    return _kernels.get()


def status() -> str:
    return _kernels.status()


PROF_STEPS = ("entry", "qkv", "rope", "attention", "o", "norm2", "gate_up", "silu", "down",
              "norm3", "exit")  # fmt: skip  # layer.c's PROF_* order


@contextlib.contextmanager
def variant(flags: list[str], stem: str = "gemv-variant"):
    """Run the kernels built with extra compiler `flags` (e.g. ["-DPF_ATT=0"]) in place of the
    normal ones, in this process, for the duration (benchmarks compare builds in one run).
    Yields the loaded Native, or None where that build is off."""
    global _kernels
    lib, _ = load_library(Native, SOURCE, stem, [*_sanitize(), *flags], "gemv " + " ".join(flags))
    if lib is None:
        yield None
        return
    saved, _kernels = _kernels, Lazy(lambda: (lib, "on"))
    try:
        yield lib
    finally:
        _kernels = saved


@contextlib.contextmanager
def profiling():
    """`variant(["-DHEST_PROFILE"])` (hest_core.bench.floor): layer.c then adds each step's wall
    time to its `hest_prof` array. Yields that array (ctypes doubles, zeroed), or None where the
    build is off. The normal build has no timers; the numerics are the same (they only add
    barriers)."""
    with variant(["-DHEST_PROFILE"], "gemv-prof") as lib:
        if lib is None:
            yield None
            return
        prof = (ctypes.c_double * len(PROF_STEPS)).in_dll(lib._lib, "hest_prof")
        ctypes.memset(prof, 0, ctypes.sizeof(prof))
        yield prof


_off = threading.local()


@contextlib.contextmanager
def disabled():
    """Run PyTorch's kernels instead in this thread (benchmarks and tests compare the two)."""
    before = getattr(_off, "v", False)
    _off.v = True
    try:
        yield
    finally:
        _off.v = before


def fits(x: torch.Tensor, n_out: int) -> bool:
    """Whether a product of x (M, K) with an (n_out, K) weight goes to the native kernels."""
    rows = MAX_ROWS_WIDE if n_out >= WIDE_N else MAX_ROWS
    return (
        1 <= x.shape[0] <= rows
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and not getattr(_off, "v", False)
    )
