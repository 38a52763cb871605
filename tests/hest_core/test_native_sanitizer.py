"""The native kernels under AddressSanitizer and UBSan (issue 11, item 1: a request once made the
fused layer write past its KV cache). A child pytest loads kernels built with
`-fsanitize=address,undefined` (HEST_NATIVE_SANITIZE=1) with libasan preloaded, and runs the
bounds tests, the Q8_0 head and the attention shapes (test_q8head.py), the fused layer against
the PyTorch loop, prefill's rope rows, and generation over random text and
batches (1..16 rows, int4 rows with and without their low-rank term): any out-of-bounds access
or undefined behaviour aborts it. A sanitizer alone misses a
write that stays inside an allocation (another row or head of the cache): test_native_bounds.py
checks those with explicit positions, rows and path codes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hest_core.exec import native

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent


def _libasan() -> str | None:
    cc = shutil.which("gcc")
    if cc is None:
        return None
    out = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(native.get() is None, reason=f"native kernels {native.status()}")
@pytest.mark.skipif(_libasan() is None, reason="gcc's libasan is not installed")
def test_kernels_under_address_sanitizer(tmp_path):
    env = dict(os.environ)
    env |= {
        "HEST_NATIVE_SANITIZE": "1",
        "LD_PRELOAD": _libasan() or "",
        # torch's allocator pairs differ from ASan's view; leaks at exit are not this test's
        "ASAN_OPTIONS": "detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "HEST_SANITIZER_CHILD": "1",
    }
    tests = [
        str(HERE / "test_native_bounds.py"),
        str(HERE / "test_q8head.py"),
        str(HERE / "test_fused.py") + "::test_fused_layer_matches_pytorch_loop",
        str(HERE / "test_fused.py") + "::test_fused_layer_at_1_to_16_rows",
        str(HERE / "test_int4.py") + "::test_fused_layer_runs_int4_like_the_pytorch_loop",
        str(HERE / "test_generation_limits.py")
        + "::test_limit_holds_for_any_text_policy_and_batch",
        str(HERE / "test_native.py") + "::test_rope_rows_equal_apply_rope_bit_for_bit",
        str(HERE / "test_native.py") + "::test_rope_rows_refuse_what_they_cannot_take",
        str(HERE / "test_native_sanitizer.py") + "::test_loaded_kernels_are_sanitized",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    out = r.stdout[-3000:] + r.stderr[-6000:]
    assert r.returncode == 0, out
    assert "AddressSanitizer" not in out and "runtime error" not in out, out
    passed = re.search(r"(\d+) passed", r.stdout.splitlines()[-1])
    assert passed and int(passed.group(1)) >= 20, out  # every selected test ran


@pytest.mark.skipif(os.environ.get("HEST_SANITIZER_CHILD") != "1", reason="the child's check")
def test_loaded_kernels_are_sanitized():
    lib = native.get()
    assert lib is not None
    assert b"__asan_report" in Path(lib.path).read_bytes()
