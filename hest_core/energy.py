"""The energy model: calibrated per-unit costs, summed over the work actually executed.

Costs are per phase, because the same unit costs very different joules per token when it runs
as part of a compute-bound prefill GEMM or a memory-bound decode GEMV:
  unit[phase][l][p]  J for one token through layer l's gated linear work on path p (the
                     registry's index order, `paths.py`; on disk a row of P costs)
  token_fixed[phase] J per token for ungated work (embedding, norms, rope, residual adds)
  attn_ctx[phase]    J per token per attended position, summed over layers (softmax(QK)V)
  head[phase]        J per row of logits (final norm + lm_head)
A prefill of P tokens attends P(P+1)/2 positions; decode step i (context c) attends c.
The modelled all-fp16 cost of a request = prefill + (max_new_tokens - 1) decode steps (the first
generated token comes out of the prefill).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import paths as reg
from .errors import CalibrationError

CALIBRATION_VERSION = 1
PHASES = ("prefill", "decode")
PJ = (
    10**12
)  # the budget guard keeps its ledger in integer picojoules: exact sums, no rounding slack


@dataclass
class PhaseCosts:
    unit: list[list[float]]  # (L, P) joules per token per unit, paths in registry order
    token_fixed: float
    attn_ctx: float
    head: float

    def check(self, n_layers: int, phase: str) -> None:
        """Raises CalibrationError unless unit is (n_layers, P) of finite costs >= 0."""
        P = reg.n_paths()
        if len(self.unit) != n_layers or any(len(r) != P for r in self.unit):
            widths = sorted({len(r) for r in self.unit})
            raise CalibrationError(
                f"calibration {phase}.unit must be {n_layers} rows of {P} costs (paths "
                f"{', '.join(reg.names())}), got {len(self.unit)} rows of {widths}; recalibrate "
                "with `python -m hest_core.calibrate`"
            )
        vals = [v for r in self.unit for v in r] + [self.token_fixed, self.attn_ctx, self.head]
        if any(not math.isfinite(v) or v < 0 for v in vals):
            raise CalibrationError(f"calibration {phase} has negative or non-finite costs")


@dataclass
class CalibrationTable:
    model: str
    model_fingerprint: str
    n_layers: int
    device: str
    method: str  # "nvml" | "rapl" | "estimate (wall time x nominal 30 W)"
    meter: str  # "nvml" | "rapl" | "estimate"
    date: str
    dtype: str
    threads: int
    prefill: PhaseCosts
    decode: PhaseCosts
    kernels: dict = field(default_factory=dict)  # measured kernel choices and timings
    version: int = CALIBRATION_VERSION
    source: str = ""  # where it was loaded from (not saved)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(p)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationTable:
        try:
            d = json.loads(Path(path).read_text())
            if d.get("version") != CALIBRATION_VERSION:
                raise CalibrationError(
                    f"{path}: calibration version {d.get('version')} != {CALIBRATION_VERSION}; "
                    "recalibrate with `python -m hest_core.calibrate`"
                )
            d["prefill"] = PhaseCosts(**d["prefill"])
            d["decode"] = PhaseCosts(**d["decode"])
            t = cls(**d)
        except CalibrationError:
            raise
        except Exception as err:
            raise CalibrationError(f"cannot read calibration table {path}: {err}") from err
        t.source = str(path)
        for ph in PHASES:
            getattr(t, ph).check(t.n_layers, ph)
        return t


class EnergyModel:
    """Cost arithmetic over a calibration table. All results in joules (modelled)."""

    def __init__(self, table: CalibrationTable):
        self.table = table
        self.L = table.n_layers
        self.ph = {"prefill": table.prefill, "decode": table.decode}
        self.paths = reg.names()  # the registry this model was built under
        self.ref = reg.ref()  # index of fp16, the reference path
        P = len(self.paths)
        # per phase: (L, P) costs, and the cost of a whole token per path summed over layers
        self.unit = {k: [tuple(r) for r in v.unit] for k, v in self.ph.items()}
        self.unit_sum = {k: [sum(r[p] for r in v) for p in range(P)] for k, v in self.unit.items()}
        # the cheapest path of each unit (skip on real devices; tiny models can differ)
        self.min_sum = {k: sum(min(r) for r in v) for k, v in self.unit.items()}

        # integer picojoule ledger for the guard: every charge rounded up, budgets rounded down
        self.unit_q = {
            k: [tuple(math.ceil(c * PJ) for c in r) for r in v] for k, v in self.unit.items()
        }
        self.unit_sum_q = {
            k: [sum(r[p] for r in v) for p in range(P)] for k, v in self.unit_q.items()
        }
        self.min_sum_q = {k: sum(min(r) for r in v) for k, v in self.unit_q.items()}
        self.min_after_q = {}
        for k, rows in self.unit_q.items():
            acc, outq = 0, [0] * (self.L + 1)
            for li in range(self.L - 1, -1, -1):
                acc += min(rows[li])
                outq[li] = acc
            self.min_after_q[k] = outq

        # a path no cheaper than a better one is never worth running (the registry's quality
        # order: fp16 > int8 > skip): sub[phase][l][p] = the best path costing no more than p
        self.sub = {k: [reg.best_within(r) for r in v] for k, v in self.unit_q.items()}

    def substitutions(self) -> dict[str, dict[str, str]]:
        """Per phase, {chosen path: path run instead} where some layer substitutes (empty on a
        device whose costs follow the quality order, e.g. every CPU table shipped here)."""
        names = self.paths
        out: dict[str, dict[str, str]] = {}
        for ph, rows in self.sub.items():
            for r in rows:
                for p, q in enumerate(r):
                    if q != p:
                        out.setdefault(ph, {})[names[p]] = names[q]
        return out

    # ---- exact integer (picojoule) costs: what the guard charges ---------------------------------
    def prefill_fixed_q(self, p: int) -> int:
        return math.ceil(self.prefill_fixed(p) * PJ)

    def decode_fixed_q(self, ctx: int) -> int:
        return math.ceil(self.decode_fixed(ctx) * PJ)

    def request_cost_q(self, p: int, max_new: int, path: int | None) -> int:
        """Exactly what the guard charges for the whole request with every unit on `path`
        (None: on its cheapest path), in picojoules."""
        pre = self.min_sum_q["prefill"] if path is None else self.unit_sum_q["prefill"][path]
        dec = self.min_sum_q["decode"] if path is None else self.unit_sum_q["decode"][path]
        total = self.prefill_fixed_q(p) + p * pre
        for i in range(1, max_new):  # decode step i attends p + i positions
            total += self.decode_fixed_q(p + i) + dec
        return total

    def gated_step_q(self, phase: str, path: int | None) -> int:
        """Picojoules of one token's gated units, all on `path` (None: each on its cheapest)."""
        return self.min_sum_q[phase] if path is None else self.unit_sum_q[phase][path]

    def min_decode_step_q(self, ctx: int, path: int | None = None) -> int:
        return self.decode_fixed_q(ctx) + self.gated_step_q("decode", path)

    def min_feasible_q(self, p: int, max_new: int, path: int | None = None) -> int:
        """The least a request can be served for, in picojoules: its prompt plus one generated
        token, every unit on its cheapest path (or all on `path`, for a fixed-path request)."""
        q = self.prefill_fixed_q(p) + p * self.gated_step_q("prefill", path)
        return q + (self.min_decode_step_q(p + 1, path) if max_new >= 2 else 0)

    # ---- float costs in joules (closed forms; training and reports) ------------------------------
    def prefill_fixed(self, p: int) -> float:
        c = self.ph["prefill"]
        return p * c.token_fixed + c.attn_ctx * p * (p + 1) / 2 + c.head

    def decode_fixed(self, ctx: int) -> float:
        c = self.ph["decode"]
        return c.token_fixed + c.attn_ctx * ctx + c.head

    def _decode_fixed_sum(self, p: int, steps: int) -> float:
        c = self.ph["decode"]
        return steps * (c.token_fixed + c.head) + c.attn_ctx * (steps * p + steps * (steps + 1) / 2)

    def request_cost(self, p: int, max_new: int, path: int | None) -> float:
        """Cost of a prompt of p tokens + max_new generated tokens with every unit on `path`
        (None: every unit on its cheapest path)."""
        steps = max(0, max_new - 1)
        pre = self.min_sum["prefill"] if path is None else self.unit_sum["prefill"][path]
        dec = self.min_sum["decode"] if path is None else self.unit_sum["decode"][path]
        return self.prefill_fixed(p) + p * pre + self._decode_fixed_sum(p, steps) + steps * dec

    def fp16_cost(self, p: int, max_new: int) -> float:
        return self.request_cost(p, max_new, self.ref)

    def min_decode_step(self, ctx: int) -> float:
        return self.decode_fixed(ctx) + self.min_sum["decode"]

    def min_feasible(self, p: int, max_new: int) -> float:
        """Prompt with every unit on its cheapest path (skip), plus one generated token."""
        cost = self.prefill_fixed(p) + p * self.min_sum["prefill"]
        if max_new >= 2:
            cost += self.min_decode_step(p + 1)
        return cost
