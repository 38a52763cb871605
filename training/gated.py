"""The trainer of the gated methods (`hest`, its ablations, `bhsp`, `tabs`).

A controller (the method's class) gates every (layer, token) of the differentiable twin
(training/forward.py); `hest*` also train the spectral z vectors. One step: a budget ratio r and
a temperature for the step, then per example a teacher-forced forward, the penalty of the
method (energy Lagrangian with one lambda per budget bucket, or TABS's FLOP term) and a
backward; then one Adam step, gradient clipping at 1.0, and the dual update. The base model is
frozen. At every checkpoint the artifact `OUT/adapter/` is rewritten; `--adapter-out` gets a copy
when the command ends.
"""

from __future__ import annotations

import argparse
import copy
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hest_core import paths as reg
from hest_core.adapter.artifact import HestAdapter, HestConfig, load_adapter
from hest_core.adapter.spectral import SvdCache, merge_into, spectrum_sizes, z_support
from hest_core.config import RuntimeConfig
from hest_core.dtypes import resolve_dtype
from hest_core.energy import calibrate
from hest_core.energy.meters import pick_meter
from hest_core.energy.model import CalibrationTable, EnergyModel
from hest_core.exec.gguf_blocks import quantize_q4_1
from hest_core.exec.loading import build_lean, fingerprint, load_hf_model, load_tokenizer, spec_of
from hest_core.exec.weights import TARGETS, target_module

from .data import Batches, Example
from .forward import NEG, SpectralZ, TrainModel, forward
from .objective import Duals, Method, fixed_cost, path_mask, tau_at, unit_costs

CPU = torch.device("cpu")


def energy_model(hf, fp: str, path: str | None) -> tuple[EnergyModel, CalibrationTable]:
    """The real calibration table: an explicit file, else the Engine's resolution for this device
    (in `path` when it is a directory)."""
    if path is not None and not Path(path).is_dir():
        table = CalibrationTable.load(path)
    else:  # a directory is searched as the Engine searches it (calibrate.resolve)
        lean = build_lean(hf, resolve_dtype("auto", CPU), CPU, 4096)
        table = calibrate.resolve(
            lean, fp, path, pick_meter("cpu", RuntimeConfig.from_env().meter), True
        )
    return EnergyModel(table), table


def q4_plain(hf) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, target): Q4_1(W) dequantized} (fp32) of every adapted target of hf as it is
    (taken before `--base-z` merges z): the twin's int4 copy under `--int4-z plain` (the
    runtime's int4 "plain" mode)."""
    out = {}
    for li in range(hf.config.num_hidden_layers):
        for t in TARGETS:
            w = target_module(hf, li, t).weight.detach().float()
            out[(li, t)] = quantize_q4_1(w).dequantize().float()
    return out


def q4_errors(hf) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, target): Q4_1(W) - W} (fp32, the shape of W) for every adapted target of hf, taken
    before `--base-z` merges z, so TrainModel's int4 copy is the base's blocks + z's change."""
    return {
        (li, t): q - target_module(hf, li, t).weight.detach().float()
        for (li, t), q in q4_plain(hf).items()
    }


def budget_at(step: int, seed: int, budgets: list[float]) -> float:
    """The budget ratio of a step: a function of (seed, step)."""
    return random.Random(seed * 1_000_003 + step).choice(budgets)


@dataclass
class ExampleResult:
    """One example's contribution to a step (the graph is gone: backward already ran)."""

    ce: float
    ratio: float  # E_bar / E_max
    loss: float
    counts: torch.Tensor  # (P,) hard-gate path counts over layers and tokens


class GateTrainer:
    """Controller (+ spectral z) training for one gated method; see the module docstring."""

    def __init__(self, method: Method, args: argparse.Namespace):
        self.method, self.args = method, args
        self.budgets = [float(b) for b in args.budgets.split(",")]
        progress = not args.no_progress
        tok = load_tokenizer(args.model, progress)
        hf = load_hf_model(args.model, progress, seed=args.seed)
        self.spec, self.fp, self.sizes = spec_of(hf), fingerprint(hf), spectrum_sizes(hf)
        self.em, self.table = energy_model(hf, self.fp, args.calibration)
        # int4 with a merged --base-z: the base's 4-bit blocks + z beside (the runtime's lowrank)
        # --int4-z plain: the base's blocks as they are (z only on the 16-bit copies)
        plain = getattr(args, "int4_z", "lowrank") == "plain"
        q4_abs = q4_plain(hf) if reg.find("int4") and plain else None
        with_z = reg.find("int4") and getattr(args, "base_z", None) and not plain
        q4_err = q4_errors(hf) if with_z else None
        self.base_z = self._merge_base_z(hf, progress)
        self.tm = TrainModel(hf, resolve_dtype(args.dtype, CPU), q4_err, q4_abs)
        self.zmod = self._spectral_z(hf, progress)
        del hf  # TrainModel holds what it needs
        self.ctl = method.controller(self.spec.hidden, self.spec.n_layers, args.k)
        self.ctl.init_for_training(args.seed)
        self.fix_path = getattr(args, "fix_path", None)
        if self.fix_path is not None and self.zmod is None:
            raise ValueError("--fix-path trains the spectral z alone: it needs --z-rank > 0")
        # --fix-path: the controller is not trained (every unit runs that path)
        groups = [] if self.fix_path else [{"params": list(self.ctl.parameters()), "lr": args.lr}]
        if self.zmod is not None:
            groups.append({"params": list(self.zmod.parameters()), "lr": args.z_lr})
        self.params = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.Adam(groups)
        lam0 = args.lambda_init if method.dual else args.lambda_fixed
        self.duals = Duals(self.budgets, lam0, args.alpha, args.lambda_max, method.dual)
        self.mask, self.costs = path_mask(method), unit_costs(self.em)
        if self.fix_path is not None:
            fixed = reg.find(self.fix_path)
            if fixed is None or self.mask[fixed] != 0:
                raise ValueError(f"--fix-path {self.fix_path}: not a path {method.name} may use")
            self.mask = torch.full_like(self.mask, NEG)
            self.mask[fixed] = 0.0
        self.batches = Batches.from_args(args, tok)

    def _merge_base_z(self, hf, progress: bool) -> dict[str, torch.Tensor] | None:
        """`--base-z DIR`: merge that artifact's spectral z into the frozen base weights (the
        runtime's merge, `make_weight_fn`), train the controller on the merged model, and write
        the same z into the new artifact. Only without a trainable z (`--z-rank 0`).

        Raises ValueError with a trainable z; AdapterMismatchError for another base model."""
        path = getattr(self.args, "base_z", None)
        if not path:
            return None
        if self.method.train_z and self.args.z_rank > 0:
            raise ValueError("--base-z keeps a trained z fixed: use it with --z-rank 0")
        ad = load_adapter(path)
        ad.check_compatible(self.spec, self.fp)
        merge_into(hf, ad.z, SvdCache(hf, self.fp, progress, keep=z_support(ad.z)))
        return {t: zt.float() for t, zt in ad.z.items()}

    def _spectral_z(self, hf, progress: bool) -> SpectralZ | None:
        a = self.args
        if not self.method.train_z or a.z_rank <= 0:
            return None
        svd = SvdCache(hf, self.fp, progress, keep=a.z_rank)
        return SpectralZ(svd, self.spec.n_layers, self.sizes, a.z_rank, self.tm.dtype)

    # ---- one step ---------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        a = self.args
        r = budget_at(step, a.seed, self.budgets)
        tau = tau_at(step, a.steps, a.tau_start, a.tau_end)
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + step)  # this step's Gumbel noise
        lam = self.duals.get(r)
        rec = {"r": r, "tau": round(tau, 4), "lambda": lam}
        costs = self._step_costs(step)
        res = [self._backward(ex, r, tau, lam, gen, costs) for ex in self.batches.get(step)]
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        mean_ratio = sum(x.ratio for x in res) / len(res)
        self.duals.update(r, mean_ratio)
        counts = torch.stack([x.counts for x in res]).sum(0)  # (P,)
        shares = (counts / counts.sum()).tolist()
        rec.update(
            loss=sum(x.loss for x in res) / len(res),
            ce=sum(x.ce for x in res) / len(res),
            e_ratio=mean_ratio,
            **{f"share_{p}": s for p, s in zip(reg.names(), shares, strict=True)},
            grad_norm=float(gnorm),
            lambdas=dict(self.duals.lam),
        )
        return rec

    def _step_costs(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (L, P) prefill and decode unit costs of this step: the table's, with every path
        but fp16 scaled by exp(U(-j, j)) per phase and path under `--cost-jitter j` (a function
        of (seed, step)), the table's cheapest path kept the cheapest; a cost-reading controller
        is given the same costs."""
        j = float(getattr(self.args, "cost_jitter", 0.0) or 0.0)
        costs = self.costs
        if j > 0:
            g = torch.Generator().manual_seed(self.args.seed * 7_000_003 + step)
            out = []
            for c in costs:
                scale = torch.exp((torch.rand(c.shape[1], generator=g) * 2 - 1) * j)
                scale[0] = 1.0  # fp16 (the unit of a budget ratio) keeps its cost
                c = c * scale
                # the paths between fp16 and the cheapest move freely (int4 may cost more or less
                # than int8 from one device to the next); the cheapest path of the table stays
                # the cheapest, at most 0.95x any other
                low = int(c.sum(0).argmin())
                others = torch.cat([c[:, :low], c[:, low + 1 :]], 1)
                c[:, low] = torch.minimum(c[:, low], 0.95 * others.min(1).values)
                out.append(c)
            costs = (out[0], out[1])
        if hasattr(self.ctl, "set_costs"):
            self.ctl.set_costs(costs[0], costs[1])
        return costs

    def _backward(
        self,
        ex: Example,
        r: float,
        tau: float,
        lam: float,
        gen: torch.Generator,
        costs: tuple[torch.Tensor, torch.Tensor],
    ) -> ExampleResult:
        """Forward one example, add its loss / batch to the gradients."""
        p, s = len(ex.prompt), len(ex.summary)
        fp16_j = self.em.fp16_cost(p, getattr(self.args, "budget_tokens", 0) or s)
        e_max = r * fp16_j
        beta = float(torch.log(torch.tensor(r)))
        fixed = fixed_cost(self.em, p, s)
        fo = forward(
            self.tm,
            self.ctl,
            self.zmod,
            ex.prompt,
            ex.summary,
            beta,
            tau,
            self.mask,
            costs,
            fixed,
            gen,
        )
        ratio = fo.e_bar / e_max
        if self.fix_path is not None:  # a quality adapter: CE alone, no energy term
            loss = fo.ce
        elif self.method.penalty == "flops":
            loss = fo.ce + self.args.flop_mu * fo.fp16_share
        else:
            loss = fo.ce + lam * (ratio - 1.0)
            floor = float(getattr(self.args, "energy_floor", 0.0) or 0.0)
            if floor:
                loss = loss + floor * fo.e_bar / fp16_j
        (loss / self.args.batch).backward()
        return ExampleResult(
            float(fo.ce.detach()), float(ratio.detach()), float(loss.detach()), fo.counts.sum(0)
        )

    # ---- checkpoint and artifact --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "ctl": self.ctl.state_dict(),
            "z": self.zmod.state_dict() if self.zmod is not None else None,
            "opt": self.opt.state_dict(),
            "lam": dict(self.duals.lam),
        }

    def load_state_dict(self, state: dict) -> None:
        self.ctl.load_state_dict(state["ctl"])
        if self.zmod is not None:
            self.zmod.load_state_dict(state["z"])
        self.opt.load_state_dict(state["opt"])
        self.duals.lam = state["lam"]

    def checkpoint(self, out: Path, done: int, wall_s: float) -> None:
        self.adapter(done, wall_s).save(out / "adapter")

    def finish(self, out: Path, done: int, wall_s: float) -> Path:
        if self.args.adapter_out and (out / "adapter").is_dir():
            dst = Path(self.args.adapter_out)
            dst.mkdir(parents=True, exist_ok=True)
            for f in (out / "adapter").iterdir():
                shutil.copy2(f, dst / f.name)
        return out / "adapter"

    def adapter(self, done: int, wall_s: float) -> HestAdapter:
        """The artifact the Engine loads: controller, z padded to the full spectrum, config."""
        ctl = copy.deepcopy(self.ctl).float().eval()
        if self.method.bake_mask:  # a masked path's logit stays NEG, so argmax never picks it
            with torch.no_grad():
                for i, p in enumerate(reg.names()):
                    if p not in self.method.paths:
                        ctl.hest_a[i].zero_()
                        ctl.hest_a0[i] = NEG
        n_layers = self.spec.n_layers
        if self.zmod is not None:
            z = self.zmod.full_z()
        elif self.base_z is not None:  # the merged base's z, so the runtime merges the same
            z = dict(self.base_z)
        else:
            z = {t: torch.zeros(n_layers, n) for t, n in self.sizes.items()}
        cfg = HestConfig(
            base_model=self.spec.name,
            base_model_fingerprint=self.fp,
            n_layers=n_layers,
            hidden=self.spec.hidden,
            k=self.args.k,
            method=self.method.name,
            controller=self.method.controller_key,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            training=self.record(done, wall_s),
            int4_mode="plain" if getattr(self.args, "int4_z", "lowrank") == "plain" else None,
        )
        return HestAdapter(cfg, ctl, z)

    def record(self, done: int, wall_s: float) -> dict:
        """`training` in the artifact's config: the command, data settings, duals, calibration."""
        a, t = self.args, self.table
        return {
            "command": "python -m training.train " + " ".join(sys.argv[1:]),
            "steps": done,
            "seed": a.seed,
            "batch": a.batch,
            "data": str(a.data),
            "max_article_tokens": a.max_article_tokens,
            "max_summary_tokens": a.max_summary_tokens,
            "z_rank": a.z_rank,
            "fix_path": getattr(a, "fix_path", None),
            "int4_z": getattr(a, "int4_z", "lowrank"),
            "base_z": getattr(a, "base_z", None),
            "budgets": self.budgets,
            "budget_tokens": getattr(a, "budget_tokens", 0),
            "energy_floor": getattr(a, "energy_floor", 0.0),
            "cost_jitter": getattr(a, "cost_jitter", 0.0),
            "lambdas": dict(self.duals.lam),
            "wall_s": round(wall_s, 1),
            "calibration": {
                "source": t.source,
                "device": t.device,
                "method": t.method,
                "date": t.date,
            },
        }
