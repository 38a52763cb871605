"""The serving loop's work per decode step (`decode.host`, `decode.host_step`), the
controller's work (`prefill.ctrl`, `decode.ctrl`, `decode.ctrl_step`) and how a prompt token's
cost falls in a prefill round of several requests (`prefill.round_tokens`, `round_cap`),
measured into an existing calibration table (`hest_core/runtime/calib_host.py`, `calib_ctrl.py`
and `hest_core/energy/calib_round.py` say how). Both need an
engine on the table, which the energy layer's `python -m hest_core.energy.calibrate` cannot
load: run this after it, on the table it wrote (a table without them charges none of either).

    python tools/host_fit.py --table PATH [--what host,controller,round] [--repeats 3] [--threads 2]
        [--dry-run]

The table's path set comes from `HEST_PATHS` where set, else from the table's width (four costs a
layer: fp16, int8, int4, skip; three: the built-in paths). The serving loop is measured on the
fixed fp16 policy without an adapter (its work does not depend on the path); the controller's
work with the default adapter against fixed-path engines on the paths it mostly ran; prefill
rounds on the default model's fp16 path (`round_tokens`, what fixed policies get) and as the
default adapter's engine serves them (`round_tokens_ctrl`, what a controller engine gets).
Prints each fit and its points; writes them into the table, with kernels["decode_host"],
kernels["controller"], kernels["prefill_round"] and kernels["prefill_round_ctrl"] (not with
--dry-run). `--what` defaults to host,controller; round is asked for by name. Run it on a quiet machine: it times things.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hest_core import paths as reg  # noqa: E402
from hest_core.config import RuntimeConfig  # noqa: E402
from hest_core.energy.meters import EstimateMeter  # noqa: E402
from hest_core.runtime import calib_ctrl, calib_host  # noqa: E402


def _paths_of(path: Path) -> tuple[str, ...]:
    """The path set to load `path` under: HEST_PATHS's, else the one its unit rows' width says."""
    env = os.environ.get("HEST_PATHS")
    if env:
        return tuple(n.strip() for n in env.split(",") if n.strip())
    try:
        width = len(json.loads(path.read_text())["prefill"]["unit"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise SystemExit(f"cannot read calibration table {path}: {err}") from err
    return ("fp16", "int8", "int4", "skip") if width == 4 else reg.BUILTIN_NAMES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", required=True, help="the calibration table file to write into")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    ap.add_argument(
        "--what",
        default="host,controller",
        help="comma list: host (the serving loop), controller (the controller's work, with the "
        "default adapter), round (prefill rounds of several requests)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=calib_ctrl.REPEATS,
        help="the controller's points per prompt length and row count (more: less noise)",
    )
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: give at least 1")
    path = Path(args.table)
    what = {w.strip() for w in args.what.split(",") if w.strip()}
    if not what or what - {"host", "controller", "round"}:
        ap.error(f"--what takes host, controller and/or round, not {args.what!r}")
    reg.enable(_paths_of(path))
    watts = RuntimeConfig.from_env().nominal_watts
    if "host" in what:
        _host(path, watts, args)
    if "controller" in what:
        _controller(path, watts, args)
    if "round" in what:
        _round(path, watts, args)
    if not args.dry_run:
        print(f"wrote {path}")


def _controller(path: Path, watts: float, args) -> None:
    rec = calib_ctrl.measure_into(
        path,
        "default",
        EstimateMeter(watts),
        threads=args.threads,
        write=not args.dry_run,
        repeats=args.repeats,
    )
    print(
        f"controller: {rec['prefill_ctrl'] * 1e3:.3g} mJ per prompt token, "
        f"{rec['ctrl'] * 1e3:.3g} mJ per row and {rec['ctrl_step'] * 1e3:.3g} mJ per decode step"
    )
    for p in rec["points"]["prefill"]:
        print(
            f"  prefill {p['tokens']} tokens: {p['x_j'] * 1e3:.1f} mJ beyond the model "
            f"(measured {1e3 * p['measured_j'] / watts:.1f} ms, {p['fixed']} "
            f"{1e3 * p['fixed_measured_j'] / watts:.1f} ms)"
        )
    for m, pts in rec["points"]["decode"].items():
        xs = ", ".join(f"{p['x_j'] * 1e3:.2f}" for p in pts)
        print(f"  {m:>2} rows: mJ per step beyond the model: {xs} (against {pts[0]['fixed']})")


def _round(path: Path, watts: float, args) -> None:
    import torch

    from hest_core.energy import calib_round
    from hest_core.energy.calibrate import apply_kernel_choices
    from hest_core.energy.model import CalibrationTable
    from hest_core.exec.loading import build_lean, load_hf_model

    torch.set_num_threads(args.threads)
    table = CalibrationTable.load(path)
    lean = build_lean(
        load_hf_model("default", progress=False), torch.bfloat16, torch.device("cpu"), 4096
    )
    apply_kernel_choices(lean, table)
    rec = calib_round.measure_round(lean, EstimateMeter(watts), repeats=args.repeats)
    ms = ", ".join(
        f"{k} x {rec['tokens_per_request']}: {v:.3f}" for k, v in rec["ms_per_token"].items()
    )
    print(
        f"prefill rounds: round_tokens {rec['round_tokens']:.1f} (a {rec['a_j']:.3f} J, "
        f"b {rec['b_j_per_token'] * 1e3:.2f} mJ per token), cap {rec['round_cap']} tokens; "
        f"ms per token: {ms}"
    )
    if not args.dry_run:
        calib_round.write_round(table, rec)
        table.save(path)
    # the same rounds as the default adapter's engine runs them (controller and guards)
    eng = calib_host.table_engine(path, "default", "hest", "default", "cpu", args.threads)
    eng.warmup()
    rc = calib_ctrl.measure_round_ctrl(eng, EstimateMeter(watts), repeats=max(3, args.repeats))
    pts = ", ".join(
        f"{rc['tokens'][k]} tokens {1e3 * j / watts / rc['tokens'][k]:.3f}"
        for k, j in rc["joules"].items()
    )
    print(
        f"prefill rounds on the controller engine: round_tokens_ctrl "
        f"{rc['round_tokens_ctrl']:.1f}, cap {rc['round_cap_ctrl']} tokens; ms per token: {pts}"
    )
    if not args.dry_run:
        calib_host.save_into(path, lambda t, r: calib_round.write_round(t, r, ctrl=True), rc)


def _host(path: Path, watts: float, args) -> None:
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


if __name__ == "__main__":
    main()
