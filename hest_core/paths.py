"""The paths a gated unit can take, in one registry: every other module reads it from here.

A gated unit is the linear work of one decoder layer for one token (DESIGN.md). A `Path` says
how that work runs, by *kind* of weights:

| kind        | runtime (model.py)                                  | trainer's twin (training/forward.py) |
| ----------- | --------------------------------------------------- | ------------------------------------ |
| "dense16"   | the 16-bit copy (`linear16`: native gemv / oneDNN)  | dense F.linear                        |
| "int8"      | the int8 copy (`Int8Linear`: weight-only or W8A8)   | fake-quantised weights and rows (STE) |
| "int4"      | the Q4_1 copy (`int4.Int4Linear`: q4 gemv / bf16)   | Q4_1 fake-quantised weights (STE)     |
| None (MLP)  | no MLP: the residual passes (or the rank-R shortcut) | nothing added (passthrough)           |

`proj` is the kind of the attention projections (q, k, v, o), `mlp` that of gate/up/down.
Calibration measures every path the same way (whole forward passes with every unit on it, minus
the fixed work; `calibrate.py`); `calib_cap` names a path whose cost caps this one's (skip's work
is a subset of int8's, so timing noise must not make it dearer), and the attention slope of the
fused decode is measured on the first path whose MLP is skipped (`lightest()`).
`quality` orders the outputs (0 best): the energy model runs a better path where a device's table
says it costs no more (`EnergyModel.sub`); `prefill_floor` names a path whose prefill kernel this
one runs (int4's prefill is fp16's GEMM on the dequantized 4-bit copy), so it is never cheaper
there and fp16 runs in its place. The guard demotes along each device's *cost* order.
`native_code` is the path code the fused C layer (`hest_decode_layer`, kernels/layer.c) runs the
unit with; None: the fused layer cannot run it and such steps take the PyTorch loop.

Index order is fixed: the built-in three come first (0 fp16, 1 int8, 2 skip), as calibration
tables, controller outputs and artifacts store them; `register` appends. `OPTIONAL` holds the
paths a configuration may add (`HEST_PATHS=fp16,int8,int4,skip`, `RuntimeConfig.paths`):
`enable` registers them for the whole process (they stay; an engine built before keeps working
only on the paths its weights were built for). Read the registry through
these helpers or `paths.PATHS` at call time, never `from .paths import PATHS` (a registration
would not show there).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

KINDS = ("dense16", "int8", "int4")  # weight kinds a projection or MLP runs on


@dataclass(frozen=True)
class Path:
    """One way to execute a gated unit. See the module docstring for what each field drives."""

    name: str  # as responses, metrics, policies and artifacts spell it
    index: int  # position in every (..., P) vector: counts, costs, logits
    quality: int  # output quality rank, 0 = best
    proj: str  # attention projections' weights: one of KINDS
    mlp: str | None  # MLP weights: one of KINDS, or None (MLP skipped)
    native_code: int | None  # path code of the fused C layer, None: not in C
    prior: float  # the controller's starting logit for training (`init_for_training`)
    calib_cap: str | None = None  # calibration: this path's unit cost is at most that one's
    description: str = ""
    # prefill: this path runs that path's kernel on a copy of its own (int4: the 16-bit GEMM on
    # its dequantized blocks, exec/int4.py), so its prefill unit costs at least that path's
    # (`EnergyModel` raises a lower figure: timing noise), and where they are equal the better
    # path runs instead (`EnergyModel.sub`): the same work without a second weight pass
    prefill_floor: str | None = None

    def __post_init__(self):
        if self.proj not in KINDS or (self.mlp is not None and self.mlp not in KINDS):
            raise ValueError(f"path {self.name!r}: proj/mlp must be one of {KINDS} (mlp or None)")


BUILTIN: tuple[Path, ...] = (
    Path("fp16", 0, 0, "dense16", "dense16", 0, 2.0, None, "all seven projections 16-bit"),
    Path("int8", 1, 1, "int8", "int8", 1, 0.0, None, "all seven projections int8 weights"),
    Path("skip", 2, 3, "int8", None, 2, -2.0, "int8", "attention int8, MLP skipped"),
)
BUILTIN_NAMES = tuple(p.name for p in BUILTIN)  # what artifacts without a path list were made on
FP16, INT8, SKIP = (p.index for p in BUILTIN)  # the built-ins' indices (fixed: register appends)
REFERENCE = "fp16"  # the path budget ratios and relative costs are measured against

PATHS: tuple[Path, ...] = BUILTIN

# opt-in paths (`enable`): name -> `Path` fields but name and index. int4's quality sits between
# int8's and skip's (teacher-forced CE on the default model: docs/runtime.md, "The int4 path")
OPTIONAL: dict[str, dict] = {
    "int4": dict(
        quality=2,
        proj="int4",
        mlp="int4",
        native_code=3,  # PATH_INT4 in kernels/layer.c: Q4_1 copies (+ their low-rank terms)
        prior=-1.0,
        prefill_floor="fp16",
        description="all seven projections on 4-bit weights (Q4_1), 16-bit activations",
    ),
}


# ---- reading -----------------------------------------------------------------------------------
def n_paths() -> int:
    """P, the number of registered paths."""
    return len(PATHS)


def names() -> tuple[str, ...]:
    """Path names in index order."""
    return tuple(p.name for p in PATHS)


def index(name: str) -> int:
    """The index of path `name`. Raises KeyError naming the registered paths."""
    for p in PATHS:
        if p.name == name:
            return p.index
    raise KeyError(f"no path {name!r}; registered: {names()}")


def find(name: str) -> int | None:
    """The index of path `name`, or None where no such path is registered."""
    return next((p.index for p in PATHS if p.name == name), None)


def get(i: int) -> Path:
    """The path at index i."""
    return PATHS[i]


def ref() -> int:
    """Index of the reference path (fp16): budget ratios and relative costs divide by it."""
    return index(REFERENCE)


def zeros() -> list[int]:
    """A (P,) count vector of zeros."""
    return [0] * len(PATHS)


def one_hot(i: int, n: int = 1) -> list[int]:
    """A (P,) count vector: n units on path i."""
    c = [0] * len(PATHS)
    c[i] = n
    return c


def cost(counts: Sequence[int], unit_costs: Sequence) -> int | float:
    """sum_p counts[p] * unit_costs[p]: (P,) counts, (P,) costs per unit (any unit, exact on
    ints)."""
    return sum(n * c for n, c in zip(counts, unit_costs, strict=True))


def with_proj(kind: str) -> list[int]:
    """Indices of the paths whose attention projections run on weights of `kind`."""
    return [p.index for p in PATHS if p.proj == kind]


def with_mlp(kind: str | None) -> list[int]:
    """Indices of the paths whose MLP runs on `kind` (None: MLP skipped)."""
    return [p.index for p in PATHS if p.mlp == kind]


def lightest() -> int:
    """The first path whose MLP is skipped (the least work), else the last path."""
    skipped = with_mlp(None)
    return skipped[0] if skipped else len(PATHS) - 1


def by_cost(c: Sequence) -> list[int]:
    """Path indices dearest first by (P,) unit costs c (ties: lower index first)."""
    return sorted(range(len(c)), key=lambda p: (-c[p], p))


def demotion_steps(c: Sequence) -> Iterator[tuple[int, int]]:
    """(dearer, cheaper) pairs the guard moves units along, in order: one step down the device's
    cost order first, then two, ... (for 3 paths: 1st->2nd, 2nd->3rd, 1st->3rd)."""
    order = by_cost(c)
    for gap in range(1, len(order)):
        for i in range(len(order) - gap):
            yield order[i], order[i + gap]


def best_within(c: Sequence) -> tuple[int, ...]:
    """(P,) for one unit's (P,) costs c: for each path, the best-quality path (ties: lower
    index) costing no more that is at least as good (itself where none is better)."""
    out = []
    for p in PATHS:
        ok = [q for q in PATHS if (q.quality < p.quality or q is p) and c[q.index] <= c[p.index]]
        out.append(min(ok, key=lambda q: (q.quality, q.index)).index)
    return tuple(out)


def pairs() -> Iterator[tuple[int, int]]:
    """Every (a, b) pair of path indices with a < b."""
    return itertools.combinations(range(len(PATHS)), 2)


def native_codes() -> list[int] | None:
    """(P,) the fused C layer's code of each path, or None where some path has none."""
    codes = [p.native_code for p in PATHS]
    return None if any(c is None for c in codes) else codes  # type: ignore[return-value]


# ---- opting in (configuration) -----------------------------------------------------------------
def check_names(wanted: Sequence[str]) -> tuple[str, ...]:
    """A path set a configuration asks for, checked: every built-in, any of `OPTIONAL`, no
    repeats; returned in registry order (built-ins first). Raises ValueError saying what is
    allowed."""
    allowed = (*BUILTIN_NAMES, *OPTIONAL)
    got = [str(n).strip().lower() for n in wanted]
    bad = [n for n in got if n not in allowed]
    missing = [n for n in BUILTIN_NAMES if n not in got]
    if bad or missing or len(set(got)) != len(got):
        raise ValueError(
            f"paths {','.join(got)!r}: list each of {', '.join(BUILTIN_NAMES)} once, plus any of "
            f"the optional {', '.join(OPTIONAL)} (e.g. fp16,int8,int4,skip)"
        )
    return (*BUILTIN_NAMES, *(n for n in OPTIONAL if n in got))


def enable(wanted: Sequence[str]) -> tuple[str, ...]:
    """Register the optional paths in `wanted` that are not registered yet, for the whole process
    (paths registered beyond `wanted`, by a test or an earlier call, stay). Returns `names()`.
    Raises ValueError as `check_names`."""
    for name in check_names(wanted)[len(BUILTIN_NAMES) :]:
        if find(name) is None:
            register(name, **OPTIONAL[name])
    return names()


# ---- registering (tests, experiments) --------------------------------------------------------
def register(name: str, **fields) -> Path:
    """Append a path (its index is the next one); `fields` are `Path`'s. Objects built before
    (engines, energy models, controllers) keep the paths they were built with.

    Raises ValueError for a name already registered."""
    global PATHS
    if find(name) is not None:
        raise ValueError(f"path {name!r} is already registered")
    p = Path(name=name, index=len(PATHS), **fields)
    PATHS = (*PATHS, p)
    return p


def unregister(name: str) -> None:
    """Remove a path registered with `register` (it must be the last). The built-ins stay.

    Raises ValueError for a built-in or a path that is not the last."""
    global PATHS
    if name in BUILTIN_NAMES or not PATHS or PATHS[-1].name != name:
        raise ValueError(f"only the last registered non-built-in path can go; {name!r} cannot")
    PATHS = PATHS[:-1]


@contextmanager
def registered(name: str, **fields) -> Iterator[Path]:
    """`register` for the duration of a with-block, then `unregister`."""
    p = register(name, **fields)
    try:
        yield p
    finally:
        unregister(name)


@contextmanager
def restored() -> Iterator[tuple[str, ...]]:
    """Run a with-block, then put the registry back as it was before it, whatever was
    registered or enabled inside (tests: an engine loading a four-path adapter registers int4
    for the process). Yields the names before. Engines built inside must not be used after."""
    global PATHS
    before = PATHS
    try:
        yield names()
    finally:
        PATHS = before
