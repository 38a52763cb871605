"""Building the C kernels: compiled once with the machine's `gcc` (`-O3 -march=native -fopenmp`)
into the cache (`~/.cache/hest/kernels/`), keyed by the sources of the kernels folder, the flags,
the compiler's version and the CPU flags, and loaded once, on first use (`Lazy`). `native.py`
(the gemv kernels and the fused layer) and `q4.py` (the int4 kernel) build their libraries here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from ..config import RuntimeConfig
from ..dtypes import cpu_flags

log = logging.getLogger("hest.native")

CFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno"]
# HEST_NATIVE_SANITIZE=1 builds the kernels with AddressSanitizer and UBSan (tests: the process
# must preload libasan, see tests/hest_core/test_native_sanitizer.py); never for serving.
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512vl")


def compile_kernels(source: Path, stem: str, extra: list[str] | tuple[str, ...] = ()):
    """Build `source` into a shared library (or find it built) in the cache:
    `kernels/<stem>-<key>.so`, keyed by the source and every C file beside it (hest.c includes
    them), the flags, the compiler's version and the CPU flags; written atomically, so concurrent builds and readers see a whole file. Returns
    (path, compiler version) or (None, "off (why)") where the kernels cannot run here."""
    # process-wide: built once, on first use (config.py)
    cfg = RuntimeConfig.from_env(only=("native", "cc", "cache_dir"))
    if not cfg.native:
        return None, "off (HEST_NATIVE=0)"
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"off (no kernels for {platform.machine()})"
    missing = [f for f in NEEDED_FLAGS if f not in cpu_flags()]
    if missing:
        return None, f"off (CPU lacks {', '.join(missing)})"
    cc = cfg.cc or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None, "off (no C compiler: install gcc for faster decode)"
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return None, f"off ({cc} --version failed: {e})"
    cflags = [*CFLAGS, *extra]
    texts = [f.read_text() for f in sorted(source.parent.glob("*.[ch]"))]  # hest.c includes
    key = hashlib.sha256(
        "\n".join(
            [source.read_text(), *texts, " ".join(cflags), version, " ".join(sorted(cpu_flags()))]
        ).encode()
    ).hexdigest()[:16]
    out = cfg.cache_dir / "kernels" / f"{stem}-{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            r = subprocess.run(
                [cc, *cflags, "-o", tmp, str(source)], capture_output=True, text=True, timeout=300
            )
            if r.returncode != 0:
                log.warning("%s failed to build:\n%s", source.name, r.stderr[-2000:])
                return None, f"off (build failed: {r.stderr.strip().splitlines()[-1:]})"
            os.replace(tmp, out)  # atomic: a concurrent build or reader sees a whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out, version


def load_library(cls, source: Path, stem: str, extra, label: str):
    """Build (or take from the cache) `source` and load it as `cls(path, note)`: (library or None,
    "on" or "off (why)"). A library that fails to load is logged and off, never raised."""
    out, version = compile_kernels(source, stem, extra)
    if out is None:
        return None, version
    try:
        return cls(out, f"avx512 {label} ({version.split()[0]}, {out.name})"), "on"
    except OSError as e:
        log.warning("%s kernels failed to load (%s), using PyTorch's", label, e)
        return None, f"off (load failed: {e})"


class Lazy:
    """A native library built once, on first use, by `build() -> (library or None, why)`."""

    def __init__(self, build):
        self._build, self._lock, self._state = build, threading.Lock(), None

    def get(self):
        """The library; None where it is off (see `status()`)."""
        if self._state is None:
            with self._lock:
                if self._state is None:
                    self._state = self._build()
        return self._state[0]

    def status(self) -> str:
        """What runs: a note on the loaded library, or "off (why)"."""
        lib = self.get()
        return lib.note if lib is not None else self._state[1]
