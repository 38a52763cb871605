"""The serving loop's work per decode step (`decode.host`, `decode.host_step`), measured into an
existing calibration table (`hest_core/runtime/calib_host.py` says how). It needs an engine on
the table, which the energy layer's `python -m hest_core.energy.calibrate` cannot load: run this
after it, on the table it wrote (a table without the loop's work charges none of it).

    python tools/host_fit.py --table PATH [--threads 2] [--dry-run]

The table's path set comes from its name (`-int4` in it: fp16, int8, int4, skip). The default
model is loaded on that table with the fixed fp16 policy and no adapter (the loop's work does not
depend on the path). Prints the fit and each row count's points; writes decode.host,
decode.host_step and kernels["decode_host"] into the table (not with --dry-run). Run it on a
quiet machine: it times things.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hest_core import paths as reg  # noqa: E402
from hest_core.config import RuntimeConfig  # noqa: E402
from hest_core.energy.meters import EstimateMeter  # noqa: E402
from hest_core.runtime import calib_host  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", required=True, help="the calibration table file to write into")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    args = ap.parse_args()
    path = Path(args.table)
    reg.enable(("fp16", "int8", "int4", "skip") if "-int4" in path.name else reg.BUILTIN_NAMES)
    watts = RuntimeConfig.from_env().nominal_watts
    rec = calib_host.measure_into(
        path, "default", EstimateMeter(watts), threads=args.threads, write=not args.dry_run
    )
    print(
        f"serving loop: {rec['host'] * 1e3:.3g} mJ per row, {rec['host_step'] * 1e3:.3g} mJ per "
        f"step ({watts:g} W nominal)"
    )
    for m, pts in rec["points"].items():
        ms = ", ".join(
            f"{1e3 * p['loop_j'] / watts:.2f} / {1e3 * p['forward_j'] / watts:.2f}" for p in pts
        )
        print(f"  {m:>2} rows: served / bare forward step, ms: {ms}")
    if not args.dry_run:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
