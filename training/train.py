"""Train a HEST adapter, a baseline or an ablation on CNN/DM pairs.

    python -m training.train --method hest --steps 200 --out runs/hest

The method (training/methods.py) names its trainer; every trainer runs in the one loop of
training/loop.py. Resumable: run the same command again and it continues from `OUT/ckpt.pt`
(every `--ckpt-every` steps); a larger `--steps` extends a finished run. Writes `OUT/log.jsonl`
(one line per step), `OUT/curves.png` and the artifact (`OUT/adapter/`, also to `--adapter-out`;
`lora-r8`: the merged model `OUT/merged/`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hest_core.runtime.engine import DEFAULT_MAX_NEW_TOKENS

from .loop import run
from .methods import METHODS, enable_paths, require_paths, trainable

DEFAULT_DATA = "../shared/data/cnndm/train.jsonl"


def _run_args(ap: argparse.ArgumentParser) -> None:
    """Data, schedule, checkpoints, output."""
    ap.add_argument("--method", default="hest", choices=trainable())
    ap.add_argument("--model", default="default")
    ap.add_argument(
        "--paths",
        default=None,
        help="the path set, e.g. fp16,int8,int4,skip (default: HEST_PATHS, else fp16,int8,skip)",
    )
    ap.add_argument(
        "--data", default=DEFAULT_DATA, help="JSONL path or hub:abisee/cnn_dailymail:train"
    )
    ap.add_argument("--limit", type=int, default=None, help="use only the first N pairs")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=2, help="sequences per step (one budget each)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--adapter-out", default=None, help="also copy the final artifact here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-article-tokens", type=int, default=256)
    ap.add_argument("--max-summary-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--ckpt-every", type=int, default=20)
    ap.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="checkpoint and exit after this many steps (resume later with --steps)",
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")


def _objective_args(ap: argparse.ArgumentParser) -> None:
    """Controller, spectral z, learning rates, budgets, penalty, temperature, calibration."""
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3, help="controller learning rate (Adam)")
    ap.add_argument("--z-lr", type=float, default=5e-4)
    ap.add_argument("--lora-lr", type=float, default=2e-4, help="lora-r8 learning rate (AdamW)")
    ap.add_argument(
        "--z-rank",
        type=int,
        default=64,
        help="top singular directions with a trainable z (0: none)",
    )
    ap.add_argument(
        "--budgets",
        default="0.25,0.3,0.4,0.5,0.6,0.8,1.0",
        help="budget ratios a step draws from (one lambda each)",
    )
    ap.add_argument(
        "--budget-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help="E_max = r x the all-fp16 cost of the prompt plus this many generated tokens, as "
        "the runtime defines a budget ratio (its default max_new_tokens); 0: the reference's "
        "length (before session 6)",
    )
    ap.add_argument(
        "--base-z",
        default=None,
        help="an adapter directory whose spectral z is merged into the frozen base and kept "
        "(train the controller only; needs --z-rank 0)",
    )
    ap.add_argument(
        "--fix-path",
        default=None,
        help="train the spectral z alone with every unit on this path and loss = CE (a quality "
        "adapter for the path the runtime serves; pair it with a controller through --base-z)",
    )
    ap.add_argument(
        "--int4-z",
        choices=("lowrank", "plain"),
        default="lowrank",
        help="how the int4 path serves the spectral z: 'lowrank' beside the 4-bit blocks (what "
        "runs at serving by default), 'plain' not at all (int4 runs the base model at its 4-bit "
        "cost, the 16-bit and int8 paths carry z; recorded in the artifact's int4_mode)",
    )
    ap.add_argument(
        "--energy-floor",
        type=float,
        default=0.0,
        help="a fixed price added at every budget: loss += this x E_bar / all-fp16 cost, so "
        "between paths of equal quality the cheaper wins where the budget does not bind",
    )
    ap.add_argument(
        "--cost-jitter",
        type=float,
        default=0.0,
        help="per step, scale the int8 and skip unit costs by exp(U(-j, j)) (the controller "
        "and the energy term see the same costs), so a cost-reading controller learns to "
        "follow another device's table",
    )
    ap.add_argument("--alpha", type=float, default=0.05, help="dual ascent step")
    ap.add_argument("--lambda-init", type=float, default=0.5)
    ap.add_argument("--lambda-max", type=float, default=20.0)
    ap.add_argument("--lambda-fixed", type=float, default=1.0, help="hest-no-dual's fixed lambda")
    ap.add_argument("--flop-mu", type=float, default=0.5, help="tabs: weight of the FLOP penalty")
    ap.add_argument("--tau-start", type=float, default=1.0)
    ap.add_argument("--tau-end", type=float, default=0.3)
    ap.add_argument(
        "--calibration", default=None, help="calibration table JSON (default: this device's)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__.split("\n")[0]
    )
    _run_args(ap)
    _objective_args(ap)
    return ap.parse_args(argv)


def train(args: argparse.Namespace) -> Path:
    """Build the method's trainer and run the loop; returns the artifact's path."""
    enable_paths(args.paths)
    method = METHODS[args.method]
    require_paths(method)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    return run(method.trainer(method, args), args, out)


def main(argv: list[str] | None = None) -> None:
    path = train(parse_args(argv))
    print(f"[train] artifact: {path}")


if __name__ == "__main__":
    main()
