"""Train a HEST adapter (or a baseline / ablation) on CNN/DM pairs.

    python -m training.train --method hest --steps 200 --out runs/hest

Resumable: run the same command again and it continues from `OUT/ckpt.pt` (every
`--ckpt-every` steps); a larger `--steps` extends a finished run. Writes `OUT/log.jsonl` (one
line per step), `OUT/curves.png` and the artifact `OUT/adapter/` (also to `--adapter-out`).
Methods: hest, hest-fp16only, hest-no-dual, hest-unfactorised, bhsp, tabs (training/objective.py)
and lora-r8 (training/lora.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from hest_core.artifact import HestAdapter, HestConfig
from hest_core.controller import build_controller
from hest_core.dtypes import resolve_dtype
from hest_core.energy import CalibrationTable, EnergyModel
from hest_core.loading import fingerprint, load_hf_model, load_tokenizer, spec_of
from hest_core.spectral import SvdCache, spectrum_sizes

from .data import Example, load_pairs, tokenize
from .forward import SpectralZ, TrainModel, forward
from .objective import METHODS, NEG, Duals, fixed_cost, path_mask, tau_at, unit_costs

DEFAULT_DATA = "../shared/data/cnndm/train.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--method", default="hest", choices=[*METHODS, "lora-r8"])
    ap.add_argument("--model", default="default")
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
    ap.add_argument("--budgets", default="0.4,0.6,0.8,1.0")
    ap.add_argument("--alpha", type=float, default=0.05, help="dual ascent step")
    ap.add_argument("--lambda-init", type=float, default=0.5)
    ap.add_argument("--lambda-max", type=float, default=20.0)
    ap.add_argument("--lambda-fixed", type=float, default=1.0, help="hest-no-dual's fixed lambda")
    ap.add_argument("--flop-mu", type=float, default=0.5, help="tabs: weight of the FLOP penalty")
    ap.add_argument("--tau-start", type=float, default=1.0)
    ap.add_argument("--tau-end", type=float, default=0.3)
    ap.add_argument("--ckpt-every", type=int, default=20)
    ap.add_argument(
        "--calibration", default=None, help="calibration table JSON (default: this device's)"
    )
    ap.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="checkpoint and exit after this many steps (resume later with --steps)",
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def energy_model(hf, fp: str, path: str | None) -> tuple[EnergyModel, CalibrationTable]:
    """The real calibration table: an explicit file, else the Engine's resolution for this device."""
    if path is not None:
        table = CalibrationTable.load(path)
    else:
        from hest_core import calibrate as calib
        from hest_core.loading import build_lean
        from hest_core.meters import pick_meter

        lean = build_lean(hf, resolve_dtype("auto", torch.device("cpu")), torch.device("cpu"), 4096)
        table = calib.resolve(lean, fp, None, pick_meter("cpu"), True)
    return EnergyModel(table), table


class Batches:
    """Deterministic example order: a seeded permutation per epoch; tokenised lazily."""

    def __init__(self, pairs, tokenizer, args):
        self.pairs, self.tok, self.args = pairs, tokenizer, args
        self.cache: dict[int, Example] = {}
        self.perms: dict[int, list[int]] = {}

    def _index(self, flat: int) -> int:
        n = len(self.pairs)
        epoch, i = divmod(flat, n)
        if epoch not in self.perms:
            g = torch.Generator().manual_seed(self.args.seed * 7919 + epoch)
            self.perms[epoch] = torch.randperm(n, generator=g).tolist()
        return self.perms[epoch][i]

    def get(self, step: int) -> list[Example]:
        out = []
        for j in range(self.args.batch):
            i = self._index(step * self.args.batch + j)
            if i not in self.cache:
                a = self.args
                self.cache[i] = tokenize(
                    self.tok, self.pairs[i], a.max_article_tokens, a.max_summary_tokens
                )
            out.append(self.cache[i])
        return out


def budget_at(step: int, seed: int, budgets: list[float]) -> float:
    return random.Random(seed * 1_000_003 + step).choice(budgets)


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


def build_adapter(ctl, zmod, method, spec, fp, sizes, args, extra: dict) -> HestAdapter:
    ctl = copy.deepcopy(ctl).float().eval()
    m = METHODS[method]
    if method == "hest-fp16only":  # bake the path mask into the bias so argmax never picks int8
        with torch.no_grad():
            for p in range(3):
                if p not in m.paths:
                    ctl.hest_a[p].zero_()
                    ctl.hest_a0[p] = NEG
    cfg = HestConfig(
        base_model=spec.name,
        base_model_fingerprint=fp,
        n_layers=spec.n_layers,
        hidden=spec.hidden,
        k=args.k,
        method=method,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        training=extra,
    )
    z = (
        zmod.full_z()
        if zmod is not None
        else {t: torch.zeros(spec.n_layers, n) for t, n in sizes.items()}
    )
    return HestAdapter(cfg, ctl, z)


def train(args: argparse.Namespace) -> Path:
    if args.method == "lora-r8":
        from .lora import train_lora

        return train_lora(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    method = METHODS[args.method]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = [float(b) for b in args.budgets.split(",")]
    progress = not args.no_progress
    torch.manual_seed(args.seed)

    tok = load_tokenizer(args.model, progress)
    hf = load_hf_model(args.model, progress, seed=args.seed)
    spec, fp = spec_of(hf), fingerprint(hf)
    sizes = spectrum_sizes(hf)
    em, table = energy_model(hf, fp, args.calibration)
    tm = TrainModel(hf, resolve_dtype(args.dtype, torch.device("cpu")))
    zmod = None
    if method.train_z and args.z_rank > 0:
        zmod = SpectralZ(
            SvdCache(hf, fp, progress, keep=args.z_rank),
            spec.n_layers,
            sizes,
            args.z_rank,
            tm.dtype,
        )
    del hf
    ctl = build_controller(args.method, spec.hidden, spec.n_layers, args.k)
    ctl.init_for_training(args.seed)
    groups = [{"params": list(ctl.parameters()), "lr": args.lr}]
    if zmod is not None:
        groups.append({"params": list(zmod.parameters()), "lr": args.z_lr})
    opt = torch.optim.Adam(groups)
    duals = Duals(
        budgets,
        args.lambda_fixed if not method.dual else args.lambda_init,
        args.alpha,
        args.lambda_max,
        method.dual,
    )
    mask, costs = path_mask(method), unit_costs(em)
    batches = Batches(load_pairs(args.data, args.limit), tok, args)

    ckpt, log = out / "ckpt.pt", out / "log.jsonl"
    start, wall0 = 0, 0.0
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        if st["method"] != args.method or st["seed"] != args.seed:
            raise SystemExit(
                f"{ckpt} is a {st['method']} run with seed {st['seed']}; use another --out"
            )
        ctl.load_state_dict(st["ctl"])
        if zmod is not None:
            zmod.load_state_dict(st["z"])
        opt.load_state_dict(st["opt"])
        duals.lam = st["lam"]
        start, wall0 = st["step"], st.get("wall_s", 0.0)
        print(f"[train] resuming {args.method} from step {start}", flush=True)
    truncate_log(log, start)

    from tqdm import tqdm

    t0 = time.perf_counter()
    bar = tqdm(
        range(start, args.steps),
        initial=start,
        total=args.steps,
        disable=not progress,
        desc=args.method,
        dynamic_ncols=True,
    )
    for step in bar:
        r = budget_at(step, args.seed, budgets)
        tau = tau_at(step, args.steps, args.tau_start, args.tau_end)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        lam = duals.get(r)
        rec = {"step": step, "r": r, "tau": round(tau, 4), "lambda": lam}
        ces, ratios, shares, losses = [], [], torch.zeros(3), []
        for ex in batches.get(step):
            e_max = r * em.fp16_cost(len(ex.prompt), len(ex.summary))
            fo = forward(
                tm,
                ctl,
                zmod,
                ex.prompt,
                ex.summary,
                float(torch.log(torch.tensor(r))),
                tau,
                mask,
                costs,
                fixed_cost(em, len(ex.prompt), len(ex.summary)),
                gen,
            )
            ratio = fo.e_bar / e_max
            if method.penalty == "flops":
                loss = fo.ce + args.flop_mu * fo.fp16_share
            else:
                loss = fo.ce + lam * (ratio - 1.0)
            (loss / args.batch).backward()
            ces.append(float(fo.ce.detach()))
            ratios.append(float(ratio.detach()))
            losses.append(float(loss.detach()))
            shares += fo.counts.sum(0)
        gnorm = torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean_ratio = sum(ratios) / len(ratios)
        duals.update(r, mean_ratio)
        shares = (shares / shares.sum()).tolist()
        rec.update(
            loss=sum(losses) / len(losses),
            ce=sum(ces) / len(ces),
            e_ratio=mean_ratio,
            share_fp16=shares[0],
            share_int8=shares[1],
            share_skip=shares[2],
            grad_norm=float(gnorm),
            lambdas=dict(duals.lam),
        )
        with log.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix(
            ce=f"{rec['ce']:.3f}",
            E=f"{mean_ratio:.2f}/{r:g}",
            lam=f"{lam:.2f}",
            fp16=f"{shares[0]:.2f}",
            int8=f"{shares[1]:.2f}",
        )
        done = step + 1
        stop = bool(args.stop_after) and done >= args.stop_after
        if done % args.ckpt_every == 0 or done == args.steps or stop:
            wall = wall0 + time.perf_counter() - t0
            save_checkpoint(
                ckpt,
                {
                    "step": done,
                    "method": args.method,
                    "seed": args.seed,
                    "ctl": ctl.state_dict(),
                    "z": zmod.state_dict() if zmod is not None else None,
                    "opt": opt.state_dict(),
                    "lam": dict(duals.lam),
                    "wall_s": wall,
                },
            )
            extra = {
                "command": "python -m training.train " + " ".join(sys.argv[1:]),
                "steps": done,
                "seed": args.seed,
                "batch": args.batch,
                "data": str(args.data),
                "max_article_tokens": args.max_article_tokens,
                "max_summary_tokens": args.max_summary_tokens,
                "z_rank": args.z_rank,
                "budgets": budgets,
                "lambdas": dict(duals.lam),
                "wall_s": round(wall, 1),
                "calibration": {
                    "source": table.source,
                    "device": table.device,
                    "method": table.method,
                    "date": table.date,
                },
            }
            ad = build_adapter(ctl, zmod, args.method, spec, fp, sizes, args, extra)
            ad.save(out / "adapter")
            from .plots import plot_curves

            plot_curves(log, out / "curves.png")
        if stop:
            break
    bar.close()
    if args.adapter_out and (out / "adapter").is_dir():
        dst = Path(args.adapter_out)
        dst.mkdir(parents=True, exist_ok=True)
        for f in (out / "adapter").iterdir():
            shutil.copy2(f, dst / f.name)
    return out / "adapter"


def main(argv: list[str] | None = None) -> None:
    path = train(parse_args(argv))
    print(f"[train] artifact: {path}")


if __name__ == "__main__":
    main()
