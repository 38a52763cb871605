"""The one place where dtype and device names map to torch objects."""

from __future__ import annotations

import torch

from .errors import HestError

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HestError(
            f"device={device!r} asked for CUDA but torch sees no GPU; use device='cpu'",
            param="device",
            code="device_unavailable",
        )
    return dev


def half_dtype(device: torch.device) -> torch.dtype:
    """The '16-bit float' of the fp16 path: float16 on CUDA, bfloat16 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        return half_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError as err:
        raise HestError(
            f"dtype={name!r} is not known; use one of {sorted(_DTYPES)} or 'auto'",
            param="dtype",
            code="bad_dtype",
        ) from err


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def cpu_model_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo ("model name"), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo ("flags": e.g. "avx512f", "amx_tile"); an
    empty set where it cannot be read (not Linux, not x86: no "flags" line)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
