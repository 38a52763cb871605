"""The prefill attention-over-context energy term, measured out to the model's context and fitted
(issue 16), on its own: `python -m hest_core.energy.calibrate` does the same as its last step
(`hest_core/energy/calib_attention.py` says how: the runtime's chunks, a P + b L, anchored at the
calibration's prefill length). This tool re-fits an existing table and shows the fit.

    python tools/attention_fit.py [--lengths 256,512,1024,2048,4096,6144,8192] [--repeats 3] \
        [--json docs/results/attention_fit.json] [--plot docs/results/attention_fit.png] \
        [--write | --table PATH] [--chunk N]

Prints each length's measured joules (all layers), the fit's and the table's modelled joules.
`--write` puts the fit into this machine's packaged tables (three paths, and with int4: the
default adapter's), `--table PATH` into one table file instead (a table measured on the day with
`python -m hest_core.energy.calibrate --out PATH`): prefill `attn_ctx` and the anchored
`token_fixed`, with the lengths, measurements and fit in `kernels["prefill_attention"]`. Run it on
a quiet machine: it times things.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hest_core import paths as reg  # noqa: E402
from hest_core.config import RuntimeConfig  # noqa: E402
from hest_core.dtypes import cpu_model_name  # noqa: E402
from hest_core.energy import calib_attention as ca  # noqa: E402
from hest_core.energy.calibrate import PACKAGED, PREFILL_T, table_name  # noqa: E402
from hest_core.energy.meters import EstimateMeter  # noqa: E402
from hest_core.energy.model import CalibrationTable  # noqa: E402
from hest_core.exec.loading import build_lean, fingerprint, load_hf_model  # noqa: E402


def load_table(path: Path) -> CalibrationTable:
    """A table under the path set its name says (`-int4`: four columns)."""
    reg.enable(
        ("fp16", "int8", "int4", "skip") if path.name.endswith("-int4.json") else reg.BUILTIN_NAMES
    )
    return CalibrationTable.load(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default=",".join(map(str, ca.LENGTHS)))
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--write", action="store_true", help="put the fit into the packaged tables")
    ap.add_argument("--table", default=None, help="put the fit into this table file instead")
    ap.add_argument(
        "--chunk", type=int, default=None, help="prefill chunk (default: the runtime's)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timings per length (median kept)")
    args = ap.parse_args()
    if args.write and args.table:
        ap.error("--write and --table are exclusive")
    lengths = [int(v) for v in args.lengths.split(",")]
    cfg = RuntimeConfig.from_env()
    hf = load_hf_model("default", config=cfg)
    lean = build_lean(hf, torch.bfloat16, torch.device("cpu"), max_positions=max(lengths))
    # this machine's packaged tables: the three-path one and the one with int4 (the default
    # adapter's); attention does not depend on the path set, so --write updates both
    base = table_name(fingerprint(hf), lean).removesuffix(".json").removesuffix("-int4")
    tables = [p for p in (PACKAGED / f"{base}.json", PACKAGED / f"{base}-int4.json") if p.is_file()]
    if args.table:
        tables = [Path(args.table)]
    if not tables:
        raise SystemExit(f"no packaged table {base}[-int4].json in {PACKAGED}")
    meter = EstimateMeter(cfg.nominal_watts)
    load0 = os.getloadavg()[0]
    table = load_table(tables[-1])
    old = table.prefill.attn_ctx
    if args.write or args.table:
        written = ca.measure_fit(lean, meter, PREFILL_T, lengths, args.chunk, args.repeats)
        if written is None:
            raise SystemExit("too few lengths above the calibration's prefill length to fit")
        for path in tables:  # one measurement, written into each table
            t = load_table(path)
            rec = ca.write_fit(t, written, PREFILL_T)
            t.save(path)
            print(
                f"wrote {path}: prefill attn_ctx {rec['previous_attn_ctx']:.4g} -> "
                f"{t.prefill.attn_ctx:.4g}, token_fixed {rec['previous_token_fixed']:.4g} -> "
                f"{t.prefill.token_fixed:.4g} (anchored at {PREFILL_T} tokens)"
            )
    else:
        js = ca.measure_lengths(lean, meter, lengths, args.chunk, args.repeats)
        a, b = ca.fit(lengths, js)
        written = {"lengths": lengths, "measured_j": js, "fit_attn_ctx": a, "fit_per_token_j": b}
    a, b, js = written["fit_attn_ctx"], written["fit_per_token_j"], written["measured_j"]
    print(f"\nfit: {a:.4g} J per attended position + {b:.4g} J per prompt token (table: {old:.4g})")
    print(
        f"{'tokens':>6} {'measured J':>10} {'fit J':>8} {'fit err':>7} {'table J':>8} {'tbl err':>7}"
    )
    rows = []
    for n, j in zip(lengths, js, strict=True):
        p = n * (n + 1) / 2
        f = a * p + b * n
        rows.append(
            {"tokens": n, "measured_j": j, "fit_j": f, "table_j": old * p,
             "fit_rel_err": f / j - 1, "table_rel_err": old * p / j - 1}
        )  # fmt: skip
        r = rows[-1]
        print(
            f"{n:6d} {j:10.4f} {f:8.4f} {r['fit_rel_err']:+7.1%} {r['table_j']:8.4f} "
            f"{r['table_rel_err']:+7.1%}"
        )
    record = written | {
        "rows": rows,
        "cpu": cpu_model_name(),
        "threads": torch.get_num_threads(),
        "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        _plot(rows, a, b, old, Path(args.plot))


def _plot(rows: list[dict], a: float, b: float, old: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["measured_j"] for r in rows], "o", label="measured (estimate meter)")
    grid = list(range(xs[0], xs[-1] + 1, max(1, (xs[-1] - xs[0]) // 200)))
    ax.plot(
        grid,
        [a * g * (g + 1) / 2 + b * g for g in grid],
        "-",
        label=f"fit: {a:.3g} J/position + {b:.3g} J/token",
    )
    ax.plot(grid, [old * g * (g + 1) / 2 for g in grid], "--", label=f"table: {old:.3g} J/position")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("attention joules per prompt (all layers)")
    ax.set_title("Prefill attention against prompt length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
