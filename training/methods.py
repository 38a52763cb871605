"""The registry of methods: every name `python -m training.train --method` and
`python -m training.evaluate --policies` accept, with its controller class, allowed paths,
penalty, trainer and how it is evaluated. The CLIs' choices, the trainers, the evaluation rows,
the tests and the methods table of docs/training.md all read it:

    python -m training.methods        # prints that table (a test checks the docs hold it)

Adding a method: one `Method(...)` here (and, for a new controller class, its entry in
`hest_core.adapter.controller.CONTROLLERS`, which loads its artifacts; a test checks they agree).
"""

from __future__ import annotations

import dataclasses

from hest_core import paths as reg
from hest_core.adapter.controller import (
    AdaptiveController,
    BhspController,
    Controller,
    TabsController,
    UnfactorisedController,
)
from hest_core.config import RuntimeConfig

from .gated import GateTrainer
from .lora import LoraTrainer
from .objective import Evaluation, Method

# int4 is opt-in (`--paths` / HEST_PATHS, hest_core/paths.py): a method lists it and uses it only
# where it is registered (path_mask)
ALL = ("fp16", "int8", "int4", "skip")
SWEEP = Evaluation("adapter", rows="sweep")  # one artifact, one row per budget ratio
# a fixed path under the same budgets: its own path only, ended cleanly when the budget runs out
# (guard "stop": no demotion), the fair baseline of issue 14's evaluation
FIXED_SWEEP = Evaluation("policy", rows="sweep", guard="stop")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "hest",
            "HEST: budget-adaptive controller (remaining budget, phase, device path costs; "
            "k = `--k`) and spectral z",
            ALL,
            Evaluation("adapter", rows="sweep", default_adapter="default"),
            controller=AdaptiveController,
            trainer=GateTrainer,
            penalty="energy",
            dual=True,
            train_z=True,
        ),
        Method(
            "hest-fp16only",
            "ablation: int8 masked, the mask baked into the artifact's bias",
            ("fp16", "skip"),
            SWEEP,
            controller=Controller,
            trainer=GateTrainer,
            penalty="energy",
            dual=True,
            train_z=True,
            bake_mask=True,
        ),
        Method(
            "hest-no-dual",
            "ablation: lambda fixed at `--lambda-fixed`",
            ALL,
            SWEEP,
            controller=Controller,
            trainer=GateTrainer,
            penalty="energy",
            train_z=True,
        ),
        Method(
            "hest-unfactorised",
            "ablation: a d x k feature map per layer",
            ALL,
            SWEEP,
            controller=UnfactorisedController,
            trainer=GateTrainer,
            penalty="energy",
            dual=True,
            train_z=True,
        ),
        Method(
            "bhsp",
            "baseline, our re-implementation: one {fp16, skip} state per layer, shifted by beta",
            ("fp16", "skip"),
            SWEEP,
            controller=BhspController,
            trainer=GateTrainer,
            penalty="energy",
            dual=True,
        ),
        Method(
            "tabs",
            "baseline, our re-implementation: token-wise d x k router per layer, no budget input",
            ("fp16", "skip"),
            Evaluation("adapter", rows="primary", guard="off"),
            controller=TabsController,
            trainer=GateTrainer,
            penalty="flops",
        ),
        Method(
            "lora-r8",
            "baseline: PEFT LoRA r=8, alpha 16, on the 7 targets, merged after training",
            ("fp16",),
            Evaluation("merged", rows="sweep", guard="stop"),
            trainer=LoraTrainer,
            penalty="ce",
        ),
        Method("fp16", "every unit fp16, no adapter", ("fp16",), FIXED_SWEEP),
        Method("int8", "every unit int8, no adapter", ("int8",), FIXED_SWEEP),
        Method(
            "int4",
            "every unit int4 (4-bit blocks; opt-in path: `--paths fp16,int8,int4,skip`), no adapter",
            ("int4",),
            FIXED_SWEEP,
        ),
        Method(
            "lead-3",
            "extractive reference: the first three sentences",
            (),
            Evaluation("extractive"),
        ),
    )
}


def enable_paths(spec: str | None) -> tuple[str, ...]:
    """Register the path set for this process (hest_core/paths.py) and return it. spec: a
    comma-separated list such as "fp16,int8,int4,skip"; None takes `RuntimeConfig`'s (HEST_PATHS,
    default fp16,int8,skip). Raises hest_core.errors.ConfigError for an unknown or incomplete set."""
    cfg = RuntimeConfig.from_env(only=("paths",))
    if spec:
        cfg = dataclasses.replace(cfg, paths=tuple(p.strip() for p in spec.split(",") if p.strip()))
    return reg.enable(cfg.paths)


def require_paths(m: Method) -> None:
    """Raise SystemExit naming `--paths` when none of method m's paths is registered (a fixed
    `int4` row without int4 enabled); a method with some of its paths registered runs on those."""
    missing = [p for p in m.paths if reg.find(p) is None]
    if m.paths and len(missing) == len(m.paths):
        raise SystemExit(
            f"{m.name} runs on {', '.join(missing)}, which is not registered: pass "
            f"--paths {','.join((*reg.names(), *missing))} (or set HEST_PATHS)"
        )


def trainable() -> list[str]:
    """Names `python -m training.train --method` accepts."""
    return [n for n, m in METHODS.items() if m.trainer is not None]


def _penalty(m: Method) -> str:
    if m.penalty == "energy":
        return "energy, dual ascent" if m.dual else "energy, fixed lambda"
    return {
        "flops": "FLOPs: `--flop-mu` x expected fp16 share, no dual",
        "ce": "CE only",
    }.get(m.penalty, "-")


def _evaluated(m: Method) -> str:
    ev = m.evaluation
    if ev.engine == "extractive":
        return "no model"
    rows = "a row per `--budget-ratios`" if ev.rows == "sweep" else "a row at `--primary-ratio`"
    if ev.engine == "policy":
        return f"Engine policy `{m.name}`, {rows}, guard {ev.guard}"
    if ev.engine == "merged":
        return f"`--adapters {m.name}=OUT/merged`, policy fp16, base calibration, {rows}, guard {ev.guard}"
    given = f"`--adapters {m.name}=OUT/adapter`"
    if ev.default_adapter == "default":
        given += " (default: the committed adapter)"
    return f"{given}, {rows}, guard {ev.guard}"


def markdown_table() -> str:
    """The methods table of docs/training.md."""
    head = "| `--method` / policy | what | controller | paths | penalty | z | trainer | evaluated |"
    lines = [head, "|" + " --- |" * 8]
    for m in METHODS.values():
        ctl = f"`{m.controller.__name__}`" if m.controller is not None else "-"
        trainer = f"`{m.trainer.__module__}`" if m.trainer is not None else "not trained"
        cells = [
            f"`{m.name}`",
            m.about,
            ctl,
            ", ".join(m.paths) or "-",
            _penalty(m),
            "yes" if m.train_z else "no",
            trainer,
            _evaluated(m),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
