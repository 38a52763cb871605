"""Modelled J of single-path rows (fp16, int8, lora-r8: one path everywhere, no guard) under
another calibration table, from each sample's prompt and completion tokens. Every sample is
first recomputed under the table it was made with and must match its recorded figure.

    python tools/recompute_joules.py OLD_TABLE NEW_TABLE SAMPLES.jsonl [SAMPLES.jsonl ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hest_core import paths as reg  # noqa: E402
from hest_core.energy.model import CalibrationTable, EnergyModel  # noqa: E402
from training.methods import METHODS  # noqa: E402

# rows that run one path everywhere (training/methods.py): fp16, int8, lora-r8
PATH = {
    n: reg.index(m.paths[0])
    for n, m in METHODS.items()
    if len(m.paths) == 1 and not m.evaluation.budgeted
}


def cost(em: EnergyModel, r: dict) -> float:
    # prefill makes the first token; a request that ends on EOS ran one more step than it kept
    steps = r["completion_tokens"] - (0 if r["finish_reason"] == "stop" else 1)
    return em.request_cost_q(r["prompt_tokens"], steps + 1, PATH[r["row"]]) / 1e12


def main() -> None:
    old, new = (EnergyModel(CalibrationTable.load(p)) for p in sys.argv[1:3])
    rows: dict[str, list[tuple[float, float]]] = {}
    for f in sys.argv[3:]:
        for ln in open(f):
            r = json.loads(ln)
            if r["row"] not in PATH:
                continue
            if abs(cost(old, r) - r["modelled_j"]) > 1e-9 * r["modelled_j"]:
                raise SystemExit(f"{r['row']} {r['id']}: does not reproduce {r['modelled_j']}")
            rows.setdefault(r["row"], []).append((r["modelled_j"], cost(new, r)))
    for k, v in rows.items():
        print(
            f"{k}: n={len(v)}, old table {statistics.mean(a for a, _ in v):.2f} J, "
            f"new table {statistics.mean(b for _, b in v):.2f} J"
        )


if __name__ == "__main__":
    main()
