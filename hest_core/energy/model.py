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

Batched decode (optional, `calib_rows.py`): the rows of one decode step share its weight reads.
  shared[l][p]       J per decode step of the part of unit[l][p] that m rows on path p in layer
                     l pay once between them (the weight read, the per-call overhead)
  head_shared        J per decode step of the part of head paid once by all the step's rows
so a decode step with m >= 1 rows on path p in layer l costs shared + m (unit - shared) there,
and each of those rows is attributed (unit - shared) + shared / m: at m = 1 exactly its unit
cost, never more at any m. A table without them (shared all 0) is the batch-1 model. Only the
decode phase has them (a prefill token's unit cost is measured per token of a 256-token GEMM,
whose weight reads are already shared).
  rows_unit[p][m-1]  the units' part of a decode step of m rows on path p, in single rows' units
                     (1 at m = 1), measured at every m up to the most rows a step runs
where a table has it, it replaces the line above: the kernels change with the rows (on the
Xeon, int4 products of 9+ rows run on the AMX tiles, 16-bit ones of 5+; measured, session 19:
int4 steps of 16 rows cost 4.9 one-row steps where the line fitted through 1-16 rows said
5.9), so a step with m rows on path p in layer l costs unit x rows_unit[p][m-1] there and each
row is attributed unit x rows_unit[p][m-1] / m, kept non-increasing in m (`calib_rows.curve`)
and at most its unit; past the measured m, each row pays the last measured m's share.

Mixed-path prefill (optional, `calib_split.py`): a prefill round whose rows in a layer take
several paths reads the weights of each of them; the unit costs (measured at SPLIT_ROWS rows on
one path) carry one weight pass per SPLIT_ROWS rows, so a path run by few rows is under-charged.
  split[p]           J per layer for path p's weight pass in a prefill round (and its rows'
                     gathers and scatters), measured beside a majority path
so a request whose rows in a prefill layer take several paths also pays, for each path but its
majority one with m rows on it, split[p] (SPLIT_ROWS - m) / SPLIT_ROWS (the part of the pass
m rows' unit costs do not carry; 0 from SPLIT_ROWS rows on). Batch mates on the same path in
the same round share that pass (`split_rebate_q`). A single-path prompt, every fixed policy's,
pays nothing more: their costs are what they were without it.

Prefill rounds of several requests (optional, `calib_round.py`): a prompt token costs less in a
round of more tokens (the weights read once per round, each operator dispatched once per layer,
more rows per GEMM tile); fitted as b (1 + c / T) over rounds of T tokens up to round_cap.
  round_tokens       c, tokens (0: not measured, every round alike)
  round_cap          the largest round measured, tokens (T is capped there)
A request is charged as alone; after a round in which it ran t of the round's T tokens it gets
back 1 - (1 + c/T) / (1 + c/t) of its units' and per-token fixed work's charge for that round
(`round_rebate_q`): nothing alone, never more than was charged.
  round_tokens_ctrl, round_cap_ctrl   the same, for rounds as a controller engine runs them
                     (runtime/calib_ctrl.py): used by a model built with controlled=True

The serving loop (optional, `runtime/calib_host.py`): a served decode step also chooses each row's
token, runs the guard and streams text, outside the forward the other costs are measured on.
  host               J per row per decode step, charged with token_fixed
  host_step          J per decode step, charged with the head's shared part (head_shared)

The controller (optional, `runtime/calib_ctrl.py`): an engine whose paths a controller chooses
(policy "hest") also runs it on every token in every layer, and its guard fits and commits each
layer's choice. Fixed-path policies run none of it.
  ctrl[phase]        J per token (prefill) or per row per step (decode), charged with token_fixed
  ctrl_step          J per decode step, charged with the head's shared part
charged only by a model built with controlled=True (the engine does for a controller policy).
The ratio's reference, the all-fp16 cost (`reference_cost_q`), is the fixed fp16 policy's and
never carries it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .. import paths as reg
from ..errors import CalibrationError

CALIBRATION_VERSION = 1
PHASES = ("prefill", "decode")
PJ = (
    10**12
)  # the budget guard keeps its ledger in integer picojoules: exact sums, no rounding slack
# prompt tokens of the calibration's prefill forward: its per-token unit costs carry one weight
# pass per this many rows (energy.calibrate.PREFILL_T; a test checks that they agree)
SPLIT_ROWS = 256


@dataclass
class PhaseCosts:
    unit: list[list[float]]  # (L, P) joules per token per unit, paths in registry order
    token_fixed: float
    attn_ctx: float
    head: float
    # (L, P) joules per decode step shared by the rows on a path (None: nothing shared, the
    # batch-1 model of tables written before batched attribution); 0 <= shared <= unit
    shared: list[list[float]] | None = None
    head_shared: float = 0.0  # joules per decode step of the head shared by its rows
    # (P, M) the units' part of a decode step of m = 1..M rows on a path, in one row's units
    # (calib_rows.py; None: the line through `shared`); decode only
    rows_unit: list[list[float]] | None = None
    # (P,) joules per layer of a minority path's weight pass in a prefill round (None: not
    # measured, nothing charged for it); prefill only
    split: list[float] | None = None
    # the serving loop's work outside the forward in a decode step (choosing each row's token,
    # the guard, streaming, clean endings; runtime/calib_host.py): joules per row per step, and per step
    # shared by its rows (0: not measured, nothing charged); decode only
    host: float = 0.0
    host_step: float = 0.0
    # the controller's work (choosing each row's path in every layer and the guard fitting it;
    # runtime/calib_ctrl.py): joules per token (prefill) or per row per step (decode), and per
    # decode step shared by its rows; charged only where a controller chooses the paths
    ctrl: float = 0.0
    ctrl_step: float = 0.0
    # prefill rounds of several requests (energy/calib_round.py): a token of a round of T tokens
    # costs b (1 + round_tokens / T), T capped at round_cap (the largest round measured); 0: not
    # measured, a token costs the same in any round; prefill only
    round_tokens: float = 0.0
    round_cap: int = 0
    # the same fit for rounds as a controller engine runs them (runtime/calib_ctrl.py,
    # `measure_round_ctrl`: the controller and guards run once a layer per round, so a round's
    # fixed work is larger); used where a controller chooses the paths; 0: round_tokens
    round_tokens_ctrl: float = 0.0
    round_cap_ctrl: int = 0

    def check(self, n_layers: int, phase: str) -> None:
        """Raises CalibrationError unless unit (and shared, where given) is (n_layers, P) of
        finite costs >= 0, each shared part at most its unit cost and head_shared at most head;
        the prefill phase shares nothing."""
        P = reg.n_paths()
        if len(self.unit) != n_layers or any(len(r) != P for r in self.unit):
            widths = sorted({len(r) for r in self.unit})
            raise CalibrationError(
                f"calibration {phase}.unit must be {n_layers} rows of {P} costs (paths "
                f"{', '.join(reg.names())}), got {len(self.unit)} rows of {widths}; recalibrate "
                "with `python -m hest_core.energy.calibrate`"
            )
        vals = [v for r in self.unit for v in r] + [self.token_fixed, self.attn_ctx, self.head]
        vals += [self.head_shared, self.host, self.host_step, self.ctrl, self.ctrl_step]
        vals += [self.round_tokens, self.round_cap, self.round_tokens_ctrl, self.round_cap_ctrl]
        if any(not math.isfinite(v) or v < 0 for v in vals):
            raise CalibrationError(f"calibration {phase} has negative or non-finite costs")
        if phase == "prefill" and (self.shared is not None or self.head_shared):
            raise CalibrationError(
                "calibration prefill has shared costs: only decode steps share their weight "
                "reads between rows (hest_core/energy/model.py); recalibrate"
            )
        if phase == "prefill" and (self.host or self.host_step):
            raise CalibrationError(
                "calibration prefill has host costs: they are the serving loop's work per "
                "decode step (hest_core/runtime/calib_host.py); recalibrate"
            )
        if phase == "decode" and (
            self.round_tokens or self.round_cap or self.round_tokens_ctrl or self.round_cap_ctrl
        ):
            raise CalibrationError(
                "calibration decode has round_tokens: a prefill round's tokens share its fixed "
                "work (hest_core/energy/calib_round.py), a decode step has shared terms of its "
                "own; recalibrate"
            )
        if phase == "prefill" and self.ctrl_step:
            raise CalibrationError(
                "calibration prefill has ctrl_step: the controller's per-step work is a decode "
                "cost (hest_core/runtime/calib_ctrl.py); recalibrate"
            )
        if self.split is not None:
            if phase != "prefill":
                raise CalibrationError(
                    f"calibration {phase}.split is for prefill only (a mixed-path prefill "
                    "round's extra weight passes); recalibrate"
                )
            if len(self.split) != P or any(not math.isfinite(v) or v < 0 for v in self.split):
                raise CalibrationError(
                    f"calibration prefill.split must be {P} finite costs >= 0 (paths "
                    f"{', '.join(reg.names())}), got {self.split!r}; recalibrate with "
                    "`python -m hest_core.energy.calibrate`"
                )
        if self.head_shared > self.head:
            raise CalibrationError(
                f"calibration {phase}.head_shared {self.head_shared:.4g} J is above its head "
                f"cost {self.head:.4g} J: a shared part cannot exceed the whole; recalibrate"
            )
        if self.rows_unit is not None:
            self._check_rows(phase, P)
        if self.shared is None:
            return
        if len(self.shared) != n_layers or any(len(r) != P for r in self.shared):
            raise CalibrationError(
                f"calibration {phase}.shared must be {n_layers} rows of {P} costs like unit; "
                "recalibrate with `python -m hest_core.energy.calibrate`"
            )
        for r, u in zip(self.shared, self.unit, strict=True):
            for v, c in zip(r, u, strict=True):
                if not math.isfinite(v) or v < 0 or v > c:
                    raise CalibrationError(
                        f"calibration {phase}.shared cost {v!r} J is outside 0..its unit cost "
                        f"{c:.4g} J; recalibrate with `python -m hest_core.energy.calibrate`"
                    )

    def _check_rows(self, phase: str, P: int) -> None:
        """Raises CalibrationError unless rows_unit is a decode phase's (P, M >= 1) of finite
        step multiples, 1 at one row, each row's share (g / m) in (0, 1] and non-increasing."""
        g = self.rows_unit
        fix = "recalibrate with `python tools/package_shares.py`"
        if phase != "decode":
            raise CalibrationError(f"calibration {phase}.rows_unit is for decode steps; {fix}")
        if len(g) != P or len({len(r) for r in g}) != 1 or not g[0]:
            raise CalibrationError(
                f"calibration decode.rows_unit must be {P} rows (paths {', '.join(reg.names())}) "
                f"of one length >= 1; {fix}"
            )
        for p, r in enumerate(g):
            share = [v / m for m, v in enumerate(r, 1)]
            if not all(math.isfinite(v) for v in r) or abs(r[0] - 1.0) > 1e-9:
                raise CalibrationError(
                    f"calibration decode.rows_unit[{p}] must start at 1 (one row) and be "
                    f"finite, got {r[:3]!r}...; {fix}"
                )
            if any(not 0 < a <= 1 + 1e-9 for a in share) or any(
                b > a + 1e-9 for a, b in zip(share, share[1:], strict=False)
            ):
                raise CalibrationError(
                    f"calibration decode.rows_unit[{p}]: a row's share of an m-row step must be "
                    f"in (0, 1] and never rise with m, got {[round(a, 3) for a in share]}; {fix}"
                )


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
                    "recalibrate with `python -m hest_core.energy.calibrate`"
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


def _as_fixed(c: PhaseCosts, per_row: float, per_step: float) -> PhaseCosts:
    """c with per_row joules charged beside token_fixed and per_step beside the head's part
    shared by a step's rows (so one row pays it whole, m rows a ceil(1/m) share each, by the
    head's sharing in the guard); c itself where both are 0."""
    if not (per_row or per_step):
        return c
    return replace(
        c,
        token_fixed=c.token_fixed + per_row,
        head=c.head + per_step,
        head_shared=min(c.head_shared, c.head) + per_step,
    )


def with_host(c: PhaseCosts) -> PhaseCosts:
    """Decode costs with the serving loop's work (`host`, `host_step`; runtime/calib_host.py)
    charged as fixed work (`_as_fixed`). The same costs where neither was measured."""
    return _as_fixed(c, c.host, c.host_step)


def with_ctrl(c: PhaseCosts) -> PhaseCosts:
    """Costs with the controller's work (`ctrl`, `ctrl_step`; runtime/calib_ctrl.py) charged as
    fixed work (`_as_fixed`), the way `with_host` charges the serving loop's. The same costs
    where neither was measured."""
    return _as_fixed(c, c.ctrl, c.ctrl_step)


def floored(unit: list[tuple]) -> list[tuple]:
    """Prefill unit costs (L, P) with each path that has a `prefill_floor` raised to at least
    that path's cost in every layer: int4's prefill runs fp16's GEMM on its dequantized blocks
    (exec/int4.py), the same work on another copy, so a table that says it is cheaper
    (measured: 0.974 of fp16 in both packaged Xeon tables, against 178.9 / 179.0 ms for a
    600-token prefill timed alone on each, session 16) holds timing noise. With the costs
    equal, `EnergyModel.sub` runs fp16 for the units the controller puts on int4, so a layer
    whose rows split between the two reads one weight copy, not two (docs/runtime.md,
    "Mixed-path prefill")."""
    floors = [(p.index, reg.index(p.prefill_floor)) for p in reg.PATHS if p.prefill_floor]
    if not floors:
        return unit
    out = []
    for r in unit:
        r = list(r)
        for p, q in floors:
            r[p] = max(r[p], r[q])
        out.append(tuple(r))
    return out


class EnergyModel:
    """Cost arithmetic over a calibration table. All results in joules (modelled).

    controlled: a controller chooses the paths (policy "hest"), so every token also pays the
    table's `ctrl` costs (the module docstring); the all-fp16 reference (`reference_cost_q`)
    never does."""

    def __init__(self, table: CalibrationTable, controlled: bool = False):
        self.table = table
        self.L = table.n_layers
        pre, dec = table.prefill, with_host(table.decode)
        self.controlled = controlled and bool(
            pre.ctrl or table.decode.ctrl or table.decode.ctrl_step or pre.round_tokens_ctrl
        )
        # the fixed fp16 policy's model: the ratio's reference runs no controller
        self.plain = EnergyModel(table) if self.controlled else self
        if self.controlled:
            pre, dec = with_ctrl(pre), with_ctrl(dec)
        self.ph = {"prefill": pre, "decode": dec}
        self.paths = reg.names()  # the registry this model was built under
        self.ref = reg.ref()  # index of fp16, the reference path
        P = len(self.paths)
        # per phase: (L, P) costs, and the cost of a whole token per path summed over layers
        self.unit = {k: [tuple(r) for r in v.unit] for k, v in self.ph.items()}
        self.unit["prefill"] = floored(self.unit["prefill"])
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

        # batched decode: picojoules per step shared by the rows on a path, rounded DOWN (less
        # sharing: each row charged more), so a row's share w + ceil(s / m) <= its unit_q
        dec = self.ph["decode"]
        sh = dec.shared or [[0.0] * P for _ in range(self.L)]
        self.shared_q = [
            tuple(min(u, math.floor(v * PJ)) for u, v in zip(ur, sr, strict=True))
            for ur, sr in zip(self.unit_q["decode"], sh, strict=True)
        ]
        self.head_shared_q = min(math.floor(dec.head_shared * PJ), math.floor(dec.head * PJ))
        # measured steps of 1..M rows (rows_unit): each row's rebate per m, precomputed
        # (rounded so a row pays at least its share: ceil), the last m's share past M
        self.rows_q: list[list[tuple[int, ...]]] | None = None
        if dec.rows_unit is not None:
            share = [[v / m for m, v in enumerate(r, 1)] for r in dec.rows_unit]
            self.rows_q = [
                [tuple(u - min(u, math.ceil(u * a)) for a in share[p]) for p, u in enumerate(ur)]
                for ur in self.unit_q["decode"]
            ]
        self.shares = dec.shared is not None or self.head_shared_q > 0 or self.rows_q is not None

        # prefill rounds of several requests: a token costs less in a larger round
        self.round_tokens = float(table.prefill.round_tokens)
        self.round_cap = int(table.prefill.round_cap)
        if self.controlled and table.prefill.round_tokens_ctrl and table.prefill.round_cap_ctrl:
            self.round_tokens = float(table.prefill.round_tokens_ctrl)
            self.round_cap = int(table.prefill.round_cap_ctrl)
        self.round_shares = self.round_tokens > 0 and self.round_cap > 0
        # a prompt token's fixed work (with the controller's, where it is charged), picojoules:
        # charged per token by `prefill_fixed_q`, shared in a round like its units
        self.prefill_token_q = math.ceil(self.ph["prefill"].token_fixed * PJ)

        # mixed-path prefill: picojoules of each path's weight pass, rounded UP (charged more)
        split = table.prefill.split or [0.0] * P
        self.split_q = tuple(math.ceil(v * PJ) for v in split)
        self.splits = any(self.split_q)

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

    # ---- batched decode: each row's share of a step (picojoules) ---------------------------------
    def unit_rebate_q(self, li: int, p: int, m: int) -> int:
        """What one row on path p in layer li pays less than its batch-1 unit cost unit_q when m
        rows (m >= 1, itself included) ran that path in that layer of the decode step: it pays
        its own work unit_q - s plus ceil(s / m) of the shared s, so the rebate is
        s - ceil(s / m), 0 at m = 1 and never more than s. With measured steps of 1..M rows
        (`rows_q`): unit_q less its share of the m-row step, rounded up (the last measured m's
        share past M). Picojoules."""
        if self.rows_q is not None:
            r = self.rows_q[li][p]
            return r[min(max(1, m), len(r)) - 1]
        s = self.shared_q[li][p]
        return s - -(-s // max(1, m))

    def head_rebate_q(self, n: int) -> int:
        """What one of n rows of a decode step pays less than its batch-1 head cost (its share of
        the head's shared part, as `unit_rebate_q`). Picojoules."""
        s = self.head_shared_q
        return s - -(-s // max(1, n))

    # ---- prefill rounds of several requests (picojoules) -------------------------------------------
    def round_rebate_q(self, units_q: int, own: int, total: int) -> int:
        """What a request whose `own` tokens ran in a prefill round of `total` tokens (every
        request's, >= own) pays less for them than in a round of its own. Of what those tokens
        were charged for the round's work, `units_q` (its units in that round, picojoules) plus
        own x `prefill_token_q` (their fixed per-token work), the fraction 1 - (1 + c/T) / (1 +
        c/t) (energy/calib_round.py), c = round_tokens, T = min(total, round_cap), t = min(own,
        T), rounded down. Attention (over the request's own prompt) and the head are not shared.
        0 where the table has no round fit or the request ran alone; never more than the base."""
        if not self.round_shares or total <= own or own <= 0:
            return 0
        base = max(0, units_q) + own * self.prefill_token_q
        T = min(total, self.round_cap)
        t = min(own, T)
        frac = 1.0 - (1.0 + self.round_tokens / T) / (1.0 + self.round_tokens / t)
        return min(base, max(0, math.floor(base * frac)))

    # ---- mixed-path prefill: the weight passes of minority paths (picojoules) -----------------------
    @staticmethod
    def _major(counts: list[int]) -> int:
        """The first most-used path of counts (P,)."""
        return max(range(len(counts)), key=counts.__getitem__)

    def _pass_left_q(self, p: int, m: int) -> int:
        """The part of path p's weight pass that m rows' unit costs do not carry:
        ceil(split_q[p] (SPLIT_ROWS - m) / SPLIT_ROWS), 0 from SPLIT_ROWS rows on."""
        return -(-self.split_q[p] * max(0, SPLIT_ROWS - m) // SPLIT_ROWS)

    def split_premium_q(self, counts: list[int]) -> int:
        """What a request's rows in one prefill layer pay on top of their unit costs, counts (P,)
        rows per path: for each path but its majority one (the first most used), the part of
        that path's weight pass its rows do not carry (`_pass_left_q`). 0 on one path, and
        without a measured `split`. Picojoules."""
        if not self.splits:
            return 0
        major = self._major(counts)
        return sum(self._pass_left_q(p, m) for p, m in enumerate(counts) if m and p != major)

    def split_rebate_q(self, counts: list[int], on_path: list[int]) -> int:
        """After a prefill round's layer: what the request with `counts` (P,) pays less than its
        `split_premium_q(counts)` because batch mates ran the same minority paths. on_path (P,):
        the round's rows per path there (>= counts). A path that is the round's majority is
        paid by its own rows' units (rebate all); otherwise the request keeps its rows' share
        of the pass the round's rows on that path do not carry. Never more than was charged.
        Picojoules."""
        if not self.splits:
            return 0
        major, round_major = self._major(counts), self._major(on_path)
        back = 0
        for p, m in enumerate(counts):
            if not m or p == major:
                continue
            charged = self._pass_left_q(p, m)
            kept = 0 if p == round_major else -(-self._pass_left_q(p, on_path[p]) * m // on_path[p])
            back += max(0, charged - kept)
        return back

    def decode_step_j(self, ctxs: list[int], paths: list[list[int]]) -> float:
        """Modelled joules of one whole decode step of len(ctxs) rows: row i at context ctxs[i]
        ran path paths[i][l] in layer l. Sums the fixed work per row, the head's shared part once
        and the per-row part per row, and per (layer, path) in use the shared part once plus
        the per-row part per row, or unit x rows_unit where the table has measured steps (the
        docstring's formulas; float joules, for reports and tests)."""
        c = self.ph["decode"]
        sh = c.shared
        n = len(ctxs)
        head_s = min(c.head_shared, c.head)
        total = sum(c.token_fixed + c.attn_ctx * x for x in ctxs) + head_s + n * (c.head - head_s)
        for li in range(self.L):
            on = [0] * len(self.paths)
            for row in paths:
                on[row[li]] += 1
            for p, m in enumerate(on):
                if not m:
                    continue
                u = self.unit["decode"][li][p]
                if c.rows_unit is not None:
                    g = c.rows_unit[p]
                    k = min(m, len(g))
                    total += u * g[k - 1] * m / k  # past M: the last measured m's share each
                    continue
                s = sh[li][p] if sh is not None else 0.0
                total += s + m * (u - s)
        return total

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

    def reference_cost_q(self, p: int, max_new: int) -> int:
        """The budget ratio's reference: the fixed fp16 policy's cost of p prompt tokens and
        max_new generated ones (`request_cost_q` on fp16 without the controller's work, which
        that policy does not run), in picojoules."""
        return self.plain.request_cost_q(p, max_new, self.ref)

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
        """The all-fp16 reference in joules (`reference_cost_q`'s float form)."""
        return self.plain.request_cost(p, max_new, self.ref)

    def min_decode_step(self, ctx: int) -> float:
        return self.decode_fixed(ctx) + self.min_sum["decode"]

    def min_feasible(self, p: int, max_new: int) -> float:
        """Prompt with every unit on its cheapest path (skip), plus one generated token."""
        cost = self.prefill_fixed(p) + p * self.min_sum["prefill"]
        if max_new >= 2:
            cost += self.min_decode_step(p + 1)
        return cost
