"""The runtime's configuration, one frozen object: `RuntimeConfig`, validated where it is built.

`RuntimeConfig.from_env()` is the one place the runtime reads the environment (a test greps for
it). The server (`server/settings.py: Settings.runtime_config`) and the command lines build it
and pass it in (`Engine.from_pretrained(config=...)`); a function that needs it and is given none
builds it from the environment, so library use without a config behaves as before.

| field | variable | meaning |
| --- | --- | --- |
| threads | HEST_THREADS | torch threads; 0: torch's default |
| compile | HEST_COMPILE | compiled decode (torch.compile; slow cold start) |
| meter | HEST_METER | auto, nvml, rapl or estimate (`meters.pick_meter`) |
| nominal_watts | HEST_NOMINAL_WATTS | watts behind every estimate (`estimated_j`, estimate meter) |
| calibration | HEST_CALIBRATION | a calibration table file or a directory of tables |
| cache_dir | HEST_CACHE_DIR | converted models, SVDs, calibration tables, kernels |
| fused | HEST_FUSED | one native call per decoder layer at decode (fused.py) |
| native | HEST_NATIVE | the native kernels (native.py) |
| native_sanitize | HEST_NATIVE_SANITIZE | build them with ASan/UBSan (tests) |
| cc | CC | the C compiler of the kernels (else gcc, else cc) |
| paths | HEST_PATHS | the path set, comma-separated: fp16,int8,skip plus opt-in int4 (paths.py) |
| onednn_max_isa | ONEDNN_MAX_CPU_ISA | oneDNN's own cap on its kernels' ISA, read here only to key calibration tables (energy/calib_isa.py) |

The native kernels are one library per process, built on first use from the hot path (quant.py,
fused.py) where no engine is at hand: their fields (cache_dir, native, native_sanitize, cc) are
read from `RuntimeConfig.from_env()` when they are built, not from an engine's config.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import paths as reg
from .errors import HestError

# the meters (energy/meters.py: pick_meter) by the names a configuration gives them
METERS = ("auto", "nvml", "rapl", "estimate")
DEFAULT_NOMINAL_WATTS = 30.0  # a 2-core slice of a server CPU; RuntimeConfig.nominal_watts

# field -> environment variable
ENV = {
    "threads": "HEST_THREADS",
    "compile": "HEST_COMPILE",
    "meter": "HEST_METER",
    "nominal_watts": "HEST_NOMINAL_WATTS",
    "calibration": "HEST_CALIBRATION",
    "cache_dir": "HEST_CACHE_DIR",
    "fused": "HEST_FUSED",
    "native": "HEST_NATIVE",
    "native_sanitize": "HEST_NATIVE_SANITIZE",
    "cc": "CC",
    "paths": "HEST_PATHS",
    "onednn_max_isa": "ONEDNN_MAX_CPU_ISA",
}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class ConfigError(HestError):
    """A configuration value the runtime cannot use; the message names the variable (or field)
    and the values allowed."""

    code = "invalid_config"


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "hest"


@dataclass(frozen=True)
class RuntimeConfig:
    threads: int = 0
    compile: bool = False
    meter: str = "auto"
    nominal_watts: float = DEFAULT_NOMINAL_WATTS
    calibration: Path | None = None
    cache_dir: Path = field(default_factory=_default_cache_dir)
    fused: bool = True
    native: bool = True
    native_sanitize: bool = False
    cc: str | None = None
    paths: tuple[str, ...] = reg.BUILTIN_NAMES
    onednn_max_isa: str | None = None  # e.g. "AVX512_CORE_BF16": oneDNN runs no AMX kernels

    def __post_init__(self) -> None:
        """Raises ConfigError naming the variable and the values allowed."""
        t = self.threads
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            _bad("threads", t, "an integer >= 0 (0: torch's default)")
        w = self.nominal_watts
        if (
            isinstance(w, bool)
            or not isinstance(w, int | float)
            or not (math.isfinite(w) and w > 0)
        ):
            _bad("nominal_watts", w, "a finite number of watts > 0")
        if self.meter not in METERS:
            _bad("meter", self.meter, f"one of {', '.join(METERS)}")
        for name in ("compile", "fused", "native", "native_sanitize"):
            if not isinstance(getattr(self, name), bool):
                _bad(name, getattr(self, name), "true or false")
        if not isinstance(self.cache_dir, Path):
            _bad("cache_dir", self.cache_dir, "a directory path")
        if self.calibration is not None and not isinstance(self.calibration, Path):
            _bad("calibration", self.calibration, "a table file or directory path, or unset")
        if self.onednn_max_isa is not None and not isinstance(self.onednn_max_isa, str):
            _bad(
                "onednn_max_isa", self.onednn_max_isa, "an ISA name like AVX512_CORE_AMX, or unset"
            )
        try:
            ok = reg.check_names(self.paths) if isinstance(self.paths, tuple | list) else None
        except ValueError:
            ok = None
        if ok is None:
            allowed = (
                f"{','.join(reg.BUILTIN_NAMES)} each once, plus any of {','.join(reg.OPTIONAL)}"
            )
            shown = ",".join(map(str, self.paths)) if isinstance(self.paths, tuple | list) else None
            _bad("paths", shown or self.paths, f"{allowed} (e.g. fp16,int8,int4,skip)")
        object.__setattr__(self, "paths", ok)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        only: tuple[str, ...] | None = None,
        **overrides,
    ) -> RuntimeConfig:
        """The configuration from the environment (`os.environ`, or `environ`): each field from
        its variable (ENV), unset or empty -> the default; `overrides` (field=value) win; `only`
        reads just those fields (the process-wide kernels and caches, which must not fail on
        another field's variable). Raises ConfigError for a value it cannot parse or use,
        naming the variable."""
        env = os.environ if environ is None else environ
        kw: dict = {}
        for f in fields(cls):
            raw = env.get(ENV[f.name], "").strip()
            if f.name in overrides or not raw or (only is not None and f.name not in only):
                continue
            kw[f.name] = _parse(f.name, raw)
        return cls(**(kw | overrides))


def _parse(name: str, raw: str):
    if name in ("compile", "fused", "native", "native_sanitize"):
        low = raw.lower()
        if low not in TRUE + FALSE:
            _bad(name, raw, f"one of {', '.join(TRUE + FALSE[:-1])}")
        return low in TRUE
    if name == "threads":
        try:
            return int(raw)
        except ValueError:
            _bad(name, raw, "an integer >= 0 (0: torch's default)")
    if name == "nominal_watts":
        try:
            return float(raw)
        except ValueError:
            _bad(name, raw, "a finite number of watts > 0")
    if name == "meter":
        return raw.lower()
    if name in ("calibration", "cache_dir"):
        return Path(raw).expanduser()
    if name == "paths":
        return tuple(raw.split(","))
    return raw


def _bad(name: str, value, allowed: str):
    raise ConfigError(f"{ENV[name]}={value!r} is not valid: use {allowed}", param=ENV[name])
