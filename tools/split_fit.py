"""Mixed-path prefill's weight passes (`prefill.split`), measured into an existing calibration table:
`python -m hest_core.energy.calibrate` does the same as one of its last steps
(`hest_core/energy/calib_split.py` says how). This tool adds it to a table measured before the
step existed, e.g. a packaged one.

    python tools/split_fit.py --table PATH [--repeats 3] [--dry-run]

The table's path set comes from its name (`-int4.json`: fp16, int8, int4, skip). The default
model is loaded as the server loads it, with the default adapter for a four-path table (the fp16
path then carries its z), without one for a three-path table.
Prints each path's weight pass per layer in mJ and writes prefill.split and
kernels["prefill_split"] into the table (not with --dry-run). Run it on a quiet machine: it
times things.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hest_core import Engine  # noqa: E402
from hest_core import paths as reg  # noqa: E402
from hest_core.energy import calib_split  # noqa: E402
from hest_core.energy.meters import EstimateMeter  # noqa: E402
from hest_core.energy.model import CalibrationTable  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", required=True, help="the calibration table file to write into")
    ap.add_argument("--repeats", type=int, default=3, help="timings per path (median kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    args = ap.parse_args()
    path = Path(args.table)
    four = path.name.endswith("-int4.json")
    paths = ("fp16", "int8", "int4", "skip") if four else reg.BUILTIN_NAMES
    # the default adapter needs its int4 path; a three-path table is measured on the base model
    # (the same weight shapes: a pass costs what it costs with the adapter's z merged)
    eng = Engine.from_pretrained(
        adapter="default" if four else None,
        threads=args.threads,
        progress=False,
        calibration=path,
        paths=paths,
    )
    table = CalibrationTable.load(path)
    meter = EstimateMeter(eng.config.nominal_watts)
    rec = calib_split.measure_split(eng.lean, meter, table, repeats=args.repeats)
    for name, v in zip(reg.names(), rec["split"], strict=True):
        print(f"{name:5s} {v * 1e3:7.2f} mJ per layer for its weight pass as a minority path")
    if not args.dry_run:
        calib_split.write_split(table, rec)
        table.save(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
