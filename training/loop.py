"""The one training loop every trainable method runs (training/methods.py names the trainer).

A trainer owns its model, optimiser and artifact; the loop owns the run directory:

* `OUT/ckpt.pt`: every `--ckpt-every` steps, at `--steps` and at `--stop-after` (written to a
  temporary file, then renamed). Running the same command again resumes from it; a checkpoint of
  another method or seed is refused. A larger `--steps` extends a finished run.
* `OUT/log.jsonl`: one line per step, `{"step": ..., **trainer.step(step)}`; on resume the lines
  at and after the checkpoint's step are dropped, so a resumed run's log equals the
  uninterrupted run's.
* `OUT/curves.png`: redrawn from the log at every checkpoint.
* a progress bar (tqdm; `--no-progress` turns it off).

Repeatability is the trainers' part: whatever a step draws (examples, budget, noise) is a
function of (seed, step).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from .plots import plot_curves


class Trainer(Protocol):
    """What the loop needs of a method's trainer (training/gated.py, training/lora.py)."""

    def state_dict(self) -> dict:
        """The checkpoint payload: trainable tensors, optimiser, dual variables."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def step(self, step: int) -> dict:
        """One optimiser step; returns the log record (`ce` and `loss` at least)."""
        ...

    def checkpoint(self, out: Path, done: int, wall_s: float) -> None:
        """Write what must exist after every checkpoint (e.g. the artifact)."""
        ...

    def finish(self, out: Path, done: int, wall_s: float) -> Path:
        """Write the final outputs when the command ends; returns the artifact's path."""
        ...


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def truncate_log(log: Path, upto: int) -> None:
    """Keep log lines of steps < upto (a resumed run rewrites what came after its checkpoint)."""
    if not log.is_file():
        return
    keep = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] < upto]
    log.write_text("".join(ln + "\n" for ln in keep))


def resume(trainer: Trainer, ckpt: Path, args: argparse.Namespace) -> tuple[int, float]:
    """Load `ckpt` into the trainer if it exists: (first step to run, wall seconds so far)."""
    if not ckpt.is_file():
        return 0, 0.0
    st = torch.load(ckpt, weights_only=False)
    method, seed = st.get("method", args.method), st.get("seed", args.seed)  # old lora-r8 ckpts
    if method != args.method or seed != args.seed:
        raise SystemExit(f"{ckpt} is a {method} run with seed {seed}; use another --out")
    trainer.load_state_dict(st)
    print(f"[train] resuming {args.method} from step {st['step']}", flush=True)
    return st["step"], st.get("wall_s", 0.0)


def postfix(rec: dict) -> dict[str, str]:
    """Progress-bar fields from a log record: CE, and the energy terms where the method has them."""
    out = {"ce": f"{rec['ce']:.3f}"}
    if "lambda" in rec:
        out |= {
            "E": f"{rec['e_ratio']:.2f}/{rec['r']:g}",
            "lam": f"{rec['lambda']:.2f}",
            "fp16": f"{rec['share_fp16']:.2f}",
            "int8": f"{rec['share_int8']:.2f}",
        }
    return out


def run(trainer: Trainer, args: argparse.Namespace, out: Path) -> Path:
    """Steps from the checkpoint (or 0) to `--steps` (or `--stop-after`); returns the artifact."""
    ckpt, log = out / "ckpt.pt", out / "log.jsonl"
    start, wall0 = resume(trainer, ckpt, args)
    truncate_log(log, start)
    t0, done = time.perf_counter(), start
    steps = range(start, args.steps)
    bar = tqdm(
        steps,
        initial=start,
        total=args.steps,
        disable=args.no_progress,
        desc=args.method,
        dynamic_ncols=True,
    )
    for step in bar:
        rec = {"step": step, **trainer.step(step)}
        with log.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix(postfix(rec))
        done = step + 1
        stop = bool(args.stop_after) and done >= args.stop_after
        if done % args.ckpt_every == 0 or done == args.steps or stop:
            wall = wall0 + time.perf_counter() - t0
            state = {"step": done, "method": args.method, "seed": args.seed, "wall_s": wall}
            save_checkpoint(ckpt, state | trainer.state_dict())
            trainer.checkpoint(out, done, wall)
            plot_curves(log, out / "curves.png")
        if stop:
            break
    bar.close()
    return trainer.finish(out, done, wall0 + time.perf_counter() - t0)
