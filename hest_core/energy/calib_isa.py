"""The instruction-set features a calibration table's costs depend on, recorded in the table and
checked where a table is looked up (`calibrate.resolve`).

Table names key on the CPU's model name, and under KVM very different CPUs share one ("Intel(R)
Xeon(R) Processor"): a Xeon with AMX runs oneDNN's 16-bit prefill GEMMs on AMX tiles (fp16
prefill there is cheaper than int8) and one without does not (fp16 prefill ~4x dearer per unit).
So a table records, in `kernels.cpu`:

    isa       the sorted subset of the CPU's flags in COST_FLAGS
    amx_used  {"onednn": bool, "native": bool}: AMX tiles used by oneDNN's GEMMs (the CPU has
              AMX and ONEDNN_MAX_CPU_ISA does not cap oneDNN below it) and by the fused decode
              layer (`native.get().amx`: from 5 rows)

and its name carries `name_key` ("-amx" where either uses AMX; "" elsewhere, so a CPU without
AMX keeps the names tables had before). A table whose record differs from this host's
(`mismatch`) is not used for this device unless given explicitly; one without a record (older
tables) is used and logged once as "ISA unknown".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from ..config import RuntimeConfig
from ..dtypes import cpu_flags
from ..exec import native
from .model import CalibrationTable

log = logging.getLogger("hest.calibrate")

# The CPU flags that change what a kernel here costs (any other flag changes nothing we run):
#   avx2, fma               ATen's vectorised CPU kernels (e.g. `_weight_int8pack_mm`, the int8
#                           weight-only product) and oneDNN's fallback GEMMs without AVX-512
#   avx512f/bw/vl           the native kernels need all three (kernel_build.NEEDED_FLAGS); ATen's
#                           AVX512 build and oneDNN's avx512_core GEMMs
#   avx512_vnni             int8 dot products: oneDNN's W8A8 (`_int_mm`) and the native int8
#                           kernels (`_mm512_dpwssd_epi32` under __AVX512VNNI__)
#   avx512_bf16             oneDNN's bf16 GEMMs without AMX (avx512_core_bf16) and the native
#                           kernels' bf16 conversions (__AVX512BF16__)
#   amx_tile/_bf16/_int8    oneDNN's avx512_core_amx GEMMs (16-bit and int8 prefill) and the
#                           fused layer's tiles (kernels/amx.c)
# Left out: avx512_fp16 and amx_fp16 (the CPU computes in bf16: the "fp16" path is bf16 here),
# avx_vnni (oneDNN's avx2_vnni, only on CPUs without AVX-512). Adding a flag here makes tables
# recorded before it look different on CPUs that have it: re-record the packaged ones then.
COST_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
AMX_FLAGS = frozenset({"amx_tile", "amx_bf16"})  # what both AMX users need


def onednn_amx_allowed(cap: str | None) -> bool:
    """Whether ONEDNN_MAX_CPU_ISA = `cap` lets oneDNN dispatch to AMX kernels: unset, empty,
    ALL, DEFAULT, or an ISA name with AMX in it (AVX512_CORE_AMX, AVX10_1_512_AMX_FP16, ...);
    a cap below AMX (AVX2, AVX512_CORE_BF16, ...) does not."""
    c = (cap or "").strip().upper()
    return c in ("", "ALL", "DEFAULT") or "AMX" in c


def record(flags: Iterable[str], native_amx: bool, onednn_cap: str | None) -> dict:
    """The ISA record of a table measured with CPU `flags`, the fused layer's AMX state
    `native_amx` (False without the native kernels) and ONEDNN_MAX_CPU_ISA = `onednn_cap`:
    {"isa": sorted flags in COST_FLAGS, "amx_used": {"onednn": bool, "native": bool}}."""
    have = set(flags)
    amx = AMX_FLAGS.issubset(have)
    return {
        "isa": sorted(f for f in COST_FLAGS if f in have),
        "amx_used": {
            "onednn": amx and onednn_amx_allowed(onednn_cap),
            "native": amx and native_amx,
        },
    }


def here(config: RuntimeConfig | None = None) -> dict:
    """This process's ISA record (`record`): /proc/cpuinfo's flags, the native library's AMX
    state now (`Native.amx_enabled`; building it on first use, as the engine does) and `config.onednn_max_isa` (None:
    ONEDNN_MAX_CPU_ISA from the environment)."""
    cap = (config or RuntimeConfig.from_env(only=("onednn_max_isa",))).onednn_max_isa
    lib = native.get()
    return record(cpu_flags(), lib is not None and lib.amx_enabled, cap)


def name_key(rec: dict) -> str:
    """The table-name part of an ISA record: "-amx" where oneDNN or the fused layer uses AMX,
    else "" (the names of tables from CPUs without AMX are as they were)."""
    return "-amx" if any(rec["amx_used"].values()) else ""


def mismatch(cpu: dict | None, rec: dict) -> list[str] | None:
    """How a table's recorded `kernels.cpu` differs from `rec` (this host's), in cost-relevant
    terms: flags of COST_FLAGS only one side has, an AMX user only one side has. [] where they
    agree; None where the table records no ISA (older tables)."""
    if not cpu or "isa" not in cpu:
        return None
    theirs, ours = set(cpu["isa"]) & set(COST_FLAGS), set(rec["isa"])
    out = []
    if theirs - ours:
        out.append(f"flags only the table's CPU has: {','.join(sorted(theirs - ours))}")
    if ours - theirs:
        out.append(f"flags only this CPU has: {','.join(sorted(ours - theirs))}")
    for user, used in cpu.get("amx_used", {}).items():
        if user in rec["amx_used"] and bool(used) != rec["amx_used"][user]:
            out.append(f"AMX used by {user}: {bool(used)} in the table, {not used} here")
    return out


_unknown_logged: set[str] = set()


def fits(table: CalibrationTable, rec: dict | None, kind: str) -> bool:
    """Whether `table` (found as `kind`: "explicit", "cached" or "packaged") is used on this
    host, whose ISA record is `rec` (None: not a CPU, nothing to check). A table without a
    record is used (logged once per file as "ISA unknown"); an explicit one always is, with a
    warning where its ISA differs; a cached or packaged one that differs is not (logged: the
    caller measures instead, setting a cached one aside)."""
    if rec is None:
        return True
    why = mismatch(table.kernels.get("cpu"), rec)
    if why is None:
        if table.source not in _unknown_logged:
            _unknown_logged.add(table.source)
            log.info("calibration %s: ISA unknown (the table records none); using it", table.source)
        return True
    if not why:
        return True
    if kind == "explicit":
        log.warning(
            "calibration %s was measured on another ISA (%s); using it as given, but its costs "
            "may not be this CPU's",
            table.source,
            "; ".join(why),
        )
        return True
    log.warning(
        "%s calibration %s was measured on another ISA (%s): not used on this CPU, measuring",
        kind,
        table.source,
        "; ".join(why),
    )
    return False


def file_fits(path: Path, rec: dict | None) -> bool:
    """`mismatch` for a table file read leniently (no checks of its costs): False only where it
    records an ISA that differs from `rec`'s."""
    try:
        cpu = json.loads(path.read_text()).get("kernels", {}).get("cpu")
    except (OSError, ValueError, AttributeError):
        cpu = None
    return rec is None or not mismatch(cpu, rec)
