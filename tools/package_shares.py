"""Add batched-decode shares to an existing calibration table (issue 15) without re-measuring its
batch-1 costs.

    python tools/package_shares.py [--table PATH] [--repeats 3] [--rows 1,2,...,16]

Each repeat measures, on the default model here, the decode costs at batch 1
(`calib_measure._phase`) and whole decode steps of 1..16 rows (`calib_rows.measure_rows`), and
takes each path's shared FRACTION of its unit cost (and the head's) and its measured step
curve (rows_unit: a step of m rows in one row's units, `calib_rows.curve`). Fractions, not joules: a
ratio measured within one run does not move with the machine's speed that day, so it applies
to the table's own batch-1 costs (measured on another day). The table gets shared = median
fraction x unit, head_shared = median fraction x head, rows_unit = the median curve (what the
energy model prices steps by), and a record in kernels["batched_decode"] (the fractions and
curves of every repeat, the CPU, the load average, the date). ~3 min with 3 repeats.
Default table: the packaged one of this machine (`calibrate.table_name`) for the path set of
`HEST_PATHS` (`HEST_PATHS=fp16,int8,int4,skip`: the four-column table the default adapter loads,
measured on the model as the engine builds it, with the int4 copies).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hest_core import paths as reg  # noqa: E402
from hest_core.config import RuntimeConfig  # noqa: E402
from hest_core.energy import calib_measure, calib_rows
from hest_core.energy.calibrate import DECODE_CTX, PACKAGED, apply_kernel_choices, table_name  # noqa: E402
from hest_core.energy.meters import EstimateMeter  # noqa: E402
from hest_core.energy.model import CalibrationTable
from hest_core.exec.loading import build_lean, fingerprint, load_hf_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default=",".join(map(str, calib_rows.ROWS_ALL)))
    args = ap.parse_args()
    rows = tuple(int(v) for v in args.rows.split(","))
    cfg = RuntimeConfig.from_env()
    reg.enable(cfg.paths)  # HEST_PATHS=fp16,int8,int4,skip: the four-column table
    hf = load_hf_model("default", config=cfg)
    fp = fingerprint(hf)
    if "int4" in cfg.paths:  # int4 rows need the Q4_1 copies, as the engine builds them
        from hest_core.bench.int4 import build

        lean, _ = build(progress=False)
    else:
        lean = build_lean(hf, torch.bfloat16, torch.device("cpu"), max_positions=4096)
    path = Path(args.table) if args.table else PACKAGED / table_name(fp, lean)
    table = CalibrationTable.load(path)
    apply_kernel_choices(lean, table)
    meter = EstimateMeter(cfg.nominal_watts)
    ctx = min(DECODE_CTX, lean.rope_cos.shape[0] - 1)
    fracs, heads, fits, curves = [], [], [], []
    t0 = time.perf_counter()
    for i in range(args.repeats):
        d1 = calib_measure._phase(lean, meter, 1, ctx)
        d, rec = calib_rows.measure_rows(
            lean, meter, d1, ctx, rows, lambda m, i=i: print(f"[repeat {i + 1}] {m}", flush=True)
        )
        fracs.append([s / u for s, u in zip(d.shared[0], d.unit[0], strict=True)])
        heads.append(d.head_shared / d.head)
        fits.append(rec["fit_error"])
        curves.append(d.rows_unit)
        print(
            f"[repeat {i + 1}] shared fractions "
            + ", ".join(f"{n} {f:.3f}" for n, f in zip(reg.names(), fracs[-1], strict=True))
            + f", head {heads[-1]:.3f}; fit error {rec['fit_error']}",
            flush=True,
        )
    med = [statistics.median(f[p] for f in fracs) for p in range(reg.n_paths())]
    head = statistics.median(heads)
    dec = table.decode
    dec.shared = [[f * u for f, u in zip(med, r, strict=True)] for r in dec.unit]
    dec.head_shared = head * dec.head
    dec.rows_unit = calib_rows.median_rows(curves)
    table.kernels["batched_decode"] = {
        "method": "tools/package_shares.py: shared fractions of the batch-1 costs measured in "
        "the same run, median of the repeats, applied to this table's batch-1 costs",
        "rows": list(rows),
        "ctx": ctx,
        "fractions": fracs,
        "head_fractions": heads,
        "fit_error": fits,
        "rows_unit": curves,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cpu": calib_rows.cpu_record(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    table.save(path)
    print(f"wrote {path}: shared fractions {med}, head {head:.3f}")
    if dec.rows_unit is not None:
        for name, g in zip(reg.names(), dec.rows_unit, strict=True):
            print(f"  {name}: a step of m rows costs " + " ".join(f"{v:.2f}" for v in g))


if __name__ == "__main__":
    main()
