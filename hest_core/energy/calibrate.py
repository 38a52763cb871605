"""Per-device calibration: time each kernel here, times the power a meter reads (or a nominal
wattage where no meter exists), into a table of joules per unit of work.

    python -m hest_core.energy.calibrate [--model default] [--out PATH] [--watts 30]

All layers of a Llama-layout model have the same shapes, so one layer's kernels are timed and
the cost is used for every layer (the table still has a row per layer, so a per-layer
measurement can replace it). Decode costs are measured at batch 1, and then whole decode steps
of 2..16 rows give the part of each cost that a step's rows share (`calib_rows.py`; `--rows 1`
skips it and writes a batch-1 table). The measurements themselves are `calib_measure.py`'s.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

import torch

from .. import paths as reg
from ..config import RuntimeConfig
from ..dtypes import cpu_model_name, dtype_name
from ..exec import native
from ..exec.model import LeanModel
from . import calib_attention, calib_check, calib_isa, calib_measure, calib_rows, calib_split
from .calib_measure import _kernel_choice, _phase
from .meters import EstimateMeter, Meter, pick_meter
from .model import CalibrationTable

log = logging.getLogger("hest.calibrate")

PACKAGED = Path(__file__).parent / "calibration"
PREFILL_T = 256
DECODE_CTX = 576


def device_key(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_model_name() or "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]


def paths_suffix() -> str:
    """The registered opt-in paths as a name suffix ("-int4"; "" for the built-in three): they
    add columns, so their tables are named apart from the built-in three's."""
    return "".join(f"-{n}" for n in reg.names()[len(reg.BUILTIN_NAMES) :])


def table_name(fp: str, lean: LeanModel, isa: dict | None = None) -> str:
    """`<fp>-<device>-<dtype>-<threads>t[-amx][-native][<paths_suffix>].json`. On a CPU `isa` is
    the ISA record the name keys on (`calib_isa.record`; None: this host's, `calib_isa.here()`);
    "-amx" where AMX is used (`calib_isa.name_key`)."""
    cpu = lean.device.type == "cpu"
    threads = torch.get_num_threads() if cpu else 0
    key = calib_isa.name_key(isa or calib_isa.here()) if cpu else ""
    # the native decode kernels change the costs: tables with and without them are apart
    nat = "-native" if cpu and native.get() is not None else ""
    extra = paths_suffix()
    dev = device_key(lean.device)
    return f"{fp}-{dev}-{dtype_name(lean.dtype)}-{threads}t{key}{nat}{extra}.json"


def apply_kernel_choices(lean: LeanModel, table: CalibrationTable) -> None:
    rows = int(table.kernels.get("woq_max_rows", 0))
    for lw in lean.layers:
        for m in lw.int8_linears():
            m.woq_max_rows = rows


def calibrate(
    lean: LeanModel,
    fp: str,
    meter: Meter | None = None,
    progress: bool = True,
    repeats: int | None = None,
    max_repeats: int | None = None,
    rows: tuple[int, ...] = calib_rows.ROWS,
) -> CalibrationTable:
    """Measure this device's table in repeats until `repeats` consecutive ones pass
    `calib_check.problems` and agree (`calib_check.disagreements`), at most `max_repeats`; returns
    their median with `kernels["settled"] = True`. When they never settle: the median of every
    repeat with `kernels["settled"] = False` and the reasons in `kernels["unsettled"]` (resolve()
    then caches nothing). `rows`: the rows per decode step whose costs give the shared part of
    each decode cost (`calib_rows.measure_rows`; (1,): none, a batch-1 table). Each repeat takes
    ~6 s on the default model at 2 threads, plus ~25 s for decode steps of `calib_rows.ROWS` rows
    up to 16; then the prompt
    attention is measured out to the model's positions and fitted (`calib_attention.fit_into`,
    a few seconds), and each path's weight pass in a mixed-path prefill (`calib_split`, ~20 s)."""
    if meter is None:
        cfg = RuntimeConfig.from_env()
        meter = pick_meter(lean.device.type, cfg.meter, cfg.nominal_watts)
    repeats = calib_check.REPEATS if repeats is None else repeats
    max_repeats = calib_check.MAX_REPEATS if max_repeats is None else max_repeats
    say = (lambda msg: print(f"[hest] {msg}", flush=True)) if progress else (lambda msg: None)
    say(f"calibrating energy costs on {device_key(lean.device)} with {meter.describe()}")
    t0 = time.perf_counter()
    kernels = _kernel_choice(lean, meter)
    kernels["cpu"] = calib_rows.cpu_record() if lean.device.type == "cpu" else {}
    from ..exec.int4 import lowrank_factors

    if (low := lowrank_factors(lean)) is not None:  # what an engine rescales from (int4.py)
        kernels["int4_lowrank"] = {ph: [round(v, 6) for v in f] for ph, f in low.items()}
    dummy = CalibrationTable("", "", 0, "", "", "", "", "", 0, None, None, kernels)  # type: ignore[arg-type]
    apply_kernel_choices(lean, dummy)
    tables: list[CalibrationTable] = []
    settled = None
    while settled is None and len(tables) < max(repeats, max_repeats):
        tables.append(_measure_once(lean, fp, meter, kernels, rows, say))
        bad = calib_check.problems(tables[-1])
        say(f"calibration repeat {len(tables)}: " + ("; ".join(bad) if bad else "ok"))
        settled = calib_check.settle(tables, repeats)
    table = settled or calib_check.median_table(tables)
    k = table.kernels
    k["settled"], k["repeats"] = settled is not None, len(tables)
    if settled is None:
        last = tables[-repeats:]
        k["unsettled"] = [p for t in last for p in calib_check.problems(t)]
        k["unsettled"] += calib_check.disagreements(last)
    # the prompt attention out to long prompts, in the runtime's chunks (calib_attention)
    att = calib_attention.fit_into(table, lean, meter, min(PREFILL_T, lean.rope_cos.shape[0]))
    if att is not None:
        say(
            f"prefill attention fitted on {att['lengths'][0]}-{att['lengths'][-1]} tokens: "
            f"{att['fit_attn_ctx']:.3g} J per attended position (first estimate "
            f"{att['calibrated_attn_ctx']:.3g}), largest error "
            f"{max(abs(e) for e in att['fit_rel_err']):.0%}"
        )
    # mixed-path prefill: each path's weight pass beside a majority path (calib_split)
    split = calib_split.measure_split(lean, meter, table)
    calib_split.write_split(table, split)
    say(
        "mixed-path prefill: "
        + ", ".join(
            f"{n} {v * 1e3:.3g} mJ" for n, v in zip(reg.names(), split["split"], strict=True)
        )
        + " per layer for a minority path's weight pass"
    )
    k["load_avg_1m"] = round(calib_check.load_avg(), 2)
    k["warnings"] = calib_check.sanity(table.prefill, table.decode)
    for w in k["warnings"]:
        say(f"warning: {w}")
    k["calibration_s"] = round(time.perf_counter() - t0, 2)
    state = "settled" if settled is not None else "did NOT settle"
    say(f"calibration {state} after {len(tables)} repeats in {k['calibration_s']} s")
    return table


def _measure_once(
    lean: LeanModel, fp: str, meter: Meter, kernels: dict, rows=calib_rows.ROWS, say=print
) -> CalibrationTable:
    """One measurement of every cost (no checks); `rows` as `calibrate`'s."""
    prefill = _phase(lean, meter, min(PREFILL_T, lean.rope_cos.shape[0]), None)
    ctx = min(DECODE_CTX, lean.rope_cos.shape[0] - 1)
    decode = _phase(lean, meter, 1, ctx)
    decode, fit = calib_rows.measure_rows(lean, meter, decode, ctx, rows, say)
    kernels = dict(kernels, batched_decode=fit) if fit else dict(kernels)
    method = meter.describe()
    if isinstance(meter, EstimateMeter):
        method = f"estimate: kernel time x nominal {meter.watts:g} W"
    return CalibrationTable(
        model=lean.spec.name,
        model_fingerprint=fp,
        n_layers=lean.spec.n_layers,
        device=device_key(lean.device),
        method=method,
        meter=meter.name,
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        dtype=dtype_name(lean.dtype),
        threads=torch.get_num_threads() if lean.device.type == "cpu" else 0,
        prefill=prefill,
        decode=decode,
        kernels=kernels,
    )


def resolve(
    lean: LeanModel,
    fp: str,
    path,
    meter: Meter,
    progress: bool = True,
    config: RuntimeConfig | None = None,
) -> CalibrationTable:
    """The table this engine runs under, in this order:

    1. `path` (or `config.calibration`, $HEST_CALIBRATION; config None: from the environment,
       as is the cache directory): a table file, or a directory searched for this device's
       table name, then `<fingerprint><paths_suffix()>.json` (a table for this model and this
       path set from any device, e.g. `<fingerprint>-int4.json` with int4 registered), then
       `<fingerprint>.json`;
    2. this device's cached table, unless it fails `calib_check.problems` or records another
       ISA than this CPU's (`calib_isa.mismatch`): then it is set aside as `*.rejected` and
       measured again;
    3. the table packaged for this device, unless it records another ISA (then: 4.);
    4. measured now in repeats (`calibrate`) and cached only if the repeats settled; if they did
       not, the packaged table of this CPU family where one exists, else the unsettled
       measurement for this process only. Nothing unsettled is ever cached.

    An explicit table (1.) is used whatever ISA it records (a warning where it differs); a table
    that records none (older ones) is used anywhere, logged once as "ISA unknown".
    Raises CalibrationError for an explicit table file that cannot be read."""
    cfg = config or RuntimeConfig.from_env()
    isa = calib_isa.here(cfg) if lean.device.type == "cpu" else None
    name = table_name(fp, lean, isa)
    path = path or cfg.calibration
    if path is not None:
        explicit = _explicit_table(Path(path), name, fp)
        if explicit is not None:
            calib_isa.fits(explicit, isa, "explicit")  # warns where the ISA differs
            return explicit
    cached = cfg.cache_dir / "calibration" / name
    table = calib_check.checked_cache(cached, isa)
    if table is not None:
        return table
    if (PACKAGED / name).is_file():
        table = CalibrationTable.load(PACKAGED / name)
        if calib_isa.fits(table, isa, "packaged"):
            return table
    table = calibrate(lean, fp, meter, progress)
    if table.kernels.get("settled"):
        table.save(cached)
        table.source = str(cached)
        return table
    return _unsettled(table, fp, lean)


def _explicit_table(p: Path, name: str, fp: str) -> CalibrationTable | None:
    """The table a given path names: the file itself, or in a directory this device's table,
    then this model's for this path set, then this model's; None where the directory has none."""
    if not p.is_dir():
        return CalibrationTable.load(p)
    for cand in (p / name, p / f"{fp}{paths_suffix()}.json", p / f"{fp}.json"):
        if cand.is_file():
            return CalibrationTable.load(cand)
    return None


def _unsettled(table: CalibrationTable, fp: str, lean: LeanModel) -> CalibrationTable:
    """A measurement whose repeats did not settle: the packaged table of this CPU family where
    one exists, else the measurement itself for this process only (nothing is cached)."""
    why = "; ".join(table.kernels.get("unsettled", [])) or "repeats disagree"
    family = packaged_family(fp, lean)  # not one that records another ISA
    if family is not None:
        log.warning(
            "this machine's calibration did not settle (%s); using the packaged table for this "
            "CPU family, %s, and caching nothing. Run `make calibrate` on a quiet machine",
            why,
            family.name,
        )
        return CalibrationTable.load(family)
    log.warning(
        "this machine's calibration did not settle (%s) and no packaged table fits this CPU "
        "family: using the measurement for this process only, caching nothing. Run "
        "`make calibrate` on a quiet machine",
        why,
    )
    table.source = "measured at start (did not settle; not cached)"
    return table


def packaged_family(fp: str, lean: LeanModel) -> Path | None:
    """A packaged table for this model, dtype, threads, ISA key and kernels from a CPU of the same
    vendor (e.g. another Intel Xeon) whose recorded ISA, if any, is this CPU's; or None."""
    isa = calib_isa.here() if lean.device.type == "cpu" else None
    name = table_name(fp, lean, isa)
    dev = device_key(lean.device)
    suffix = name[len(fp) + 1 + len(dev) :]
    vendor = dev.split("-")[0]
    for p in sorted(PACKAGED.glob(f"{fp}-{vendor}-*{suffix}")):
        same = (
            p.name.endswith(suffix) and p.name[len(fp) + 1 : -len(suffix)].split("-")[0] == vendor
        )
        if same and calib_isa.file_fits(p, isa):
            return p
    return None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m hest_core.energy.calibrate", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--meter", default=None, choices=["nvml", "rapl", "estimate"])
    ap.add_argument(
        "--watts", type=float, default=None, help="nominal watts for the estimate meter"
    )
    ap.add_argument("--out", default=None, help="where to write the table (default: the cache)")
    ap.add_argument(
        "--package",
        action="store_true",
        help="write into hest_core/energy/calibration/ (ships with the code)",
    )
    ap.add_argument(
        "--force", action="store_true", help="write the table even if its repeats did not settle"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=calib_check.REPEATS,
        help="consecutive repeats that must agree (default %(default)s)",
    )
    ap.add_argument(
        "--max-repeats",
        type=int,
        default=calib_check.MAX_REPEATS,
        help="repeats measured at most before giving up (default %(default)s)",
    )
    ap.add_argument(
        "--rows",
        default=",".join(map(str, calib_rows.ROWS)),
        help="rows per decode step to time for the batched-decode shares (default %(default)s; "
        "1: a batch-1 table)",
    )
    ap.add_argument(
        "--window-scale",
        type=float,
        default=1.0,
        help="scale every timing window (below 1: faster and noisier; tests use 0.2)",
    )
    return ap


def _rows(ap: argparse.ArgumentParser, spec: str) -> tuple[int, ...]:
    """--rows as row counts (1,2,4,...); exits with the parser's error on anything else."""
    try:
        rows = tuple(int(v) for v in spec.split(",") if v.strip())
    except ValueError:
        ap.error(f"--rows {spec!r}: give row counts like 1,2,4,8,16")
    if not rows or min(rows) < 1:
        ap.error(f"--rows {spec!r}: every row count must be >= 1")
    return rows


def _load(args, cfg: RuntimeConfig):
    """The model the table is for: (lean model, fingerprint, device), int4 copies built where
    the path is registered."""
    from ..dtypes import resolve_device, resolve_dtype
    from ..exec.loading import build_lean, fingerprint, load_hf_model

    dev = resolve_device(args.device)
    reg.enable(cfg.paths)  # HEST_PATHS: opt-in paths are measured too
    hf = load_hf_model(args.model, config=cfg)
    fp = fingerprint(hf)
    lean = build_lean(hf, resolve_dtype("auto", dev), dev, max_positions=4096)
    if reg.find("int4") is not None:
        from ..exec.int4 import attach_for_model

        attach_for_model(lean, hf, args.model)  # the base weights' blocks (tables hold no z)
    return lean, fp, dev


def _print_table(table: CalibrationTable, out: Path) -> None:
    """What was measured: unit costs per path, decode shares of a step's rows, the serving
    loop's work, kernel choice."""
    for ph in ("prefill", "decode"):
        c = getattr(table, ph)
        units = "  ".join(
            f"{p.name} {c.unit[0][p.index] * table.n_layers:.4g} J" for p in reg.PATHS
        )
        print(
            f"{ph:8s} per token, all layers: {units}  fixed {c.token_fixed:.4g} J  "
            f"attn/pos {c.attn_ctx:.3g} J  head {c.head:.4g} J"
        )
    d = table.decode
    if d.shared is not None:
        fit = table.kernels.get("batched_decode", {})
        shares = "  ".join(
            f"{p.name} {d.shared[0][p.index] / max(d.unit[0][p.index], 1e-30):.0%}"
            for p in reg.PATHS
        )
        errs = ", ".join(f"{k} {v:.0%}" for k, v in fit.get("fit_error", {}).items())
        print(
            f"decode shared by a step's rows (rows {fit.get('rows')}): {shares}  head "
            f"{d.head_shared / max(d.head, 1e-30):.0%}; fit error {errs}"
        )
    if d.host or d.host_step:
        print(
            f"serving loop per decode step: {d.host * 1e3:.3g} mJ per row, "
            f"{d.host_step * 1e3:.3g} mJ per step"
        )
    print(f"kernel choice: weight-only int8 up to {table.kernels['woq_max_rows']} rows, W8A8 above")
    print(f"wrote {out} ({table.method})")


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    rows = _rows(ap, args.rows)
    calib_measure.WINDOW_SCALE = args.window_scale
    cfg = (
        RuntimeConfig.from_env()
    )  # this command's boundary: HEST_METER, _NOMINAL_WATTS, _CACHE_DIR
    lean, fp, dev = _load(args, cfg)
    meter = (
        EstimateMeter(args.watts or cfg.nominal_watts)
        if args.meter == "estimate" or args.watts
        else pick_meter(dev.type, args.meter or cfg.meter, cfg.nominal_watts)
    )
    table = calibrate(
        lean, fp, meter, repeats=args.repeats, max_repeats=args.max_repeats, rows=rows
    )
    name = table_name(fp, lean)
    out = (
        Path(args.out)
        if args.out
        else (PACKAGED if args.package else cfg.cache_dir / "calibration") / name
    )
    if not table.kernels.get("settled") and not args.force:
        raise SystemExit(
            f"the calibration did not settle after {table.kernels['repeats']} repeats "
            f"({'; '.join(table.kernels.get('unsettled', []))}): nothing written. Rerun on a "
            "quiet machine, or pass --force to write it anyway"
        )
    table.save(out)
    _print_table(table, out)


if __name__ == "__main__":
    main()
