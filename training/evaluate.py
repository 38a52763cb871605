"""Evaluate policies on CNN/DM test pairs with the protocol of DESIGN.md.

    python -m training.evaluate --policies lead-3,fp16,int8,hest --data ../shared/data/cnndm/test.jsonl \
        --limit 50 --budget-ratios 0.6 --json results/eval.json

Policies are the names of the registry (training/methods.py; `python -m training.methods` prints
them), and each one's `Evaluation` says how it runs: no model (lead-3), an Engine fixed policy,
an adapter artifact from `--adapters NAME=DIR` (one row per budget ratio, or one row at
`--primary-ratio` with the guard off for a method without a budget input), or a merged model
directory from `--adapters NAME=DIR` (fp16 policy, the base model's calibration).
Per-sample results go to `<json stem>.samples.jsonl` as they are produced; a rerun skips done
(row, sample) pairs. Samples are interleaved across rows so machine noise hits every row alike.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from tqdm import tqdm

from hest_core import Engine, GenerationRequest
from hest_core import paths as reg
from hest_core.errors import BudgetTooLowError
from hest_core.runtime.endings import ends_sentence
from hest_core.runtime.reading import READ_MODES, plan_budget_q, policy_read_budget_q

from .data import Pair, load_pairs
from .lora import lora_params
from .methods import METHODS, enable_paths, require_paths
from .metrics import lead3, rouge
from .report import longest_prompts, markdown, summarise, write_outputs
from .samples import other_samples, read_samples, samples_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--policies", default="lead-3,fp16,int8,hest")
    ap.add_argument("--data", default="../shared/data/cnndm/test.jsonl")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument(
        "--skip",
        type=int,
        default=0,
        help="start at this row of --data (the validation split: train.jsonl --skip 1610)",
    )
    ap.add_argument(
        "--json", required=True, help="summary JSON path (.md, .png, .samples.jsonl beside it)"
    )
    ap.add_argument("--budget-ratios", default="0.2,0.3,0.4,0.6,1.0")
    ap.add_argument(
        "--primary-ratio", type=float, default=0.6, help="tabs' budget, the table's focus"
    )
    ap.add_argument(
        "--adapters", default="", help="name=DIR,... (hest defaults to the committed one)"
    )
    ap.add_argument("--model", default="default")
    ap.add_argument(
        "--paths",
        default=None,
        help="the path set, e.g. fp16,int8,int4,skip for an int4 row (default: HEST_PATHS)",
    )
    ap.add_argument(
        "--max-new-tokens",
        type=int,
        default=96,
        help="tokens per summary at most (a row's own max_new_tokens, as in a digest file, wins)",
    )
    ap.add_argument(
        "--max-article-tokens",
        type=int,
        default=0,
        help="cut articles to this many tokens (0: whole articles, as the server reads them)",
    )
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--no-clean-end",
        action="store_true",
        help="let limits cut summaries mid-sentence (clean endings off, as before session 5)",
    )
    ap.add_argument(
        "--read",
        choices=READ_MODES,
        default="budget",
        help="budget (the server's default): a budget that cannot pay for the whole article and "
        "a summary reads the article's head (hest_core/runtime/reading.py); whole: read every token",
    )
    ap.add_argument(
        "--read-ratio",
        default=None,
        help="HEST rows: plan reads with at most this share of the all-fp16 cost (a number in "
        "(0, 1], or none: read what the budget pays for); default: the adapter's read_ratio",
    )
    ap.add_argument(
        "--plan-ratio",
        default=None,
        help="HEST rows: the controller plans with at most this share of the all-fp16 cost (a "
        "number in (0, 1], or none: the whole budget); default: the adapter's plan_ratio",
    )
    ap.add_argument(
        "--plan-from",
        default=None,
        help="HEST rows: the plan applies to budgets of at least this share of the all-fp16 "
        "cost (a number in (0, 1], or none: the plan ratio); default: the adapter's plan_from",
    )
    ap.add_argument(
        "--plan-slope",
        default=None,
        help="HEST rows: below the plan's start the controller plans with (r / start) ** SLOPE x "
        "start of the all-fp16 cost (a number > 0, or none: the budget, as 1 does); default: the "
        "adapter's plan_slope",
    )
    ap.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="run only pairs I, I+N, I+2N, ... (0-based) into X.samples.shard-I-of-N.jsonl, so N "
        "processes can share the work; run again without --shard to aggregate every shard",
    )
    return _checked(ap, ap.parse_args(argv))


# HEST's ratios an evaluation may override (the adapter's own where a flag is not given); with
# --plan-slope, Engine.PLAN_FIELDS
RATIO_FLAGS = ("read_ratio", "plan_ratio", "plan_from")


def _checked(ap: argparse.ArgumentParser, args):
    """`args` with the ratio flags and --shard parsed (ap.error on a bad value)."""
    for name in RATIO_FLAGS:
        if (raw := getattr(args, name)) is not None:
            try:
                setattr(args, name, None if raw == "none" else float(raw))
                policy_read_budget_q(1, 1, getattr(args, name))  # validates (0, 1]
            except ValueError:
                flag = "--" + name.replace("_", "-")
                ap.error(f"{flag} wants a number in (0, 1] or none, got {raw!r}")
            setattr(args, name + "_set", True)
    if (raw := args.plan_slope) is not None:
        try:
            args.plan_slope = None if raw == "none" else float(raw)
            plan_budget_q(1, 2, 1.0, None, args.plan_slope)  # validates > 0, finite
        except ValueError:
            ap.error(f"--plan-slope wants a number > 0 or none, got {raw!r}")
        args.plan_slope_set = True
    if args.shard is not None:
        m = re.fullmatch(r"(\d+)/(\d+)", args.shard)
        if not m or not 0 <= int(m[1]) < int(m[2]):
            ap.error(f"--shard wants I/N with 0 <= I < N, got {args.shard!r}")
        args.shard = (int(m[1]), int(m[2]))
    return args


def row_names(args) -> list[tuple[str, str, float | None]]:
    """(row name, policy, budget ratio) for every row."""
    ratios = [float(r) for r in args.budget_ratios.split(",") if r]
    rows = []
    for p in [p.strip() for p in args.policies.split(",") if p.strip()]:
        if p not in METHODS:
            raise SystemExit(f"unknown policy {p!r}; known: {', '.join(METHODS)}")
        ev = METHODS[p].evaluation
        if ev.rows == "sweep":
            rows += [(f"{p}@{r:g}", p, r) for r in ratios]
        elif ev.rows == "primary":
            rows.append((f"{p}@{args.primary_ratio:g}", p, args.primary_ratio))
        else:
            rows.append((p, p, None if ev.engine == "extractive" else 1.0))
    return rows


class Engines:
    """One Engine per policy, loaded on first use."""

    def __init__(self, args):
        self.args = args
        self.paths = dict(kv.split("=", 1) for kv in args.adapters.split(",") if "=" in kv)
        self.e: dict[str, object] = {}
        self.calibration = args.calibration

    def get(self, policy: str):
        if policy in self.e:
            return self.e[policy]
        a, ev = self.args, METHODS[policy].evaluation
        kw = dict(
            calibration=self.calibration,
            progress=not a.no_progress,
            threads=a.threads or None,
            paths=reg.names(),  # the set `--paths` registered (from_pretrained re-registers)
        )
        if ev.engine == "policy":
            eng = Engine.from_pretrained(a.model, adapter=None, policy=policy, guard=ev.guard, **kw)
        elif ev.engine == "merged":
            if policy not in self.paths:
                raise SystemExit(f"{policy} needs --adapters {policy}=RUN/merged")
            kw["calibration"] = self.calibration or self.get("fp16").info()["calibration"]["source"]
            eng = Engine.from_pretrained(
                self.paths[policy], adapter=None, policy="fp16", guard=ev.guard, **kw
            )
        else:
            ad = self.paths.get(policy, ev.default_adapter)
            if ad is None:
                raise SystemExit(f"{policy} needs --adapters {policy}=RUN/adapter")
            eng = Engine.from_pretrained(a.model, adapter=ad, policy="hest", guard=ev.guard, **kw)
            for name in Engine.PLAN_FIELDS:  # the flags given win over the adapter's
                if getattr(a, name + "_set", False):
                    setattr(eng, name, getattr(a, name))
        eng.max_article_tokens = a.max_article_tokens or None
        eng.warmup()  # first-call costs stay out of the per-sample timings
        if self.calibration is None:
            self.calibration = eng.info()["calibration"]["source"]
        self.e[policy] = eng
        return eng


def run_one(engines: Engines, policy: str, ratio: float | None, pair: Pair, args) -> dict:
    if METHODS[policy].evaluation.engine == "extractive":
        text = lead3(pair.article)
        return {"text": text, "rouge": rouge(text, pair.highlights)}
    eng = engines.get(policy)
    t0 = time.perf_counter()
    req = GenerationRequest(
        pair.article,
        energy_budget_ratio=ratio,
        max_new_tokens=pair.max_new_tokens or args.max_new_tokens,
        instruction=pair.instruction,
        clean_end=not args.no_clean_end,
        read=args.read,
    )
    try:
        res = eng.generate([req])[0]
    except BudgetTooLowError as err:  # below what a summary costs: a refusal is the answer
        return _refused(err, eng, pair)
    wall = time.perf_counter() - t0
    st = res.stats
    return {
        "text": res.text,
        "finish_reason": res.finish_reason,
        "finish_detail": res.finish_detail,
        "ends_sentence": ends_sentence(res.text),
        "rouge": rouge(res.text, pair.highlights),
        "wall_s": wall,
        "total_s": st.total_s,
        "ttft_s": st.ttft_s,
        "budget_j": st.budget_j,
        "fp16_cost_j": st.fp16_cost_j,
        "modelled_j": st.modelled_j,
        "measured_j": st.measured_j,
        "estimated_j": st.estimated_j,
        "meter": st.meter,
        "prompt_tokens": st.prompt_tokens,
        "article_tokens": st.article_tokens,
        "article_tokens_read": st.article_tokens_read,
        "completion_tokens": st.completion_tokens,
        "paths": st.paths,
        "paths_per_layer": st.paths_per_layer,
        "demotions": st.demotions,
        "controller_params": eng.info().get("controller_params", 0) if eng.policy == "hest" else 0,
    }


def _refused(err: BudgetTooLowError, eng, pair: Pair) -> dict:
    """The sample of a request refused for a budget below its minimum: no text (ROUGE 0),
    nothing spent, the minimum it quoted."""
    n_layers = eng.lean.spec.n_layers
    return {
        "text": "",
        "refused": True,
        "minimum_j": err.minimum_j,
        "finish_reason": "budget_too_low",
        "finish_detail": None,
        "ends_sentence": False,
        "rouge": rouge("", pair.highlights),
        "wall_s": 0.0,
        "total_s": 0.0,
        "ttft_s": 0.0,
        "budget_j": None,
        "fp16_cost_j": None,
        "modelled_j": 0.0,
        "measured_j": None,
        "estimated_j": 0.0,
        "meter": eng.meter.name,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "paths": dict.fromkeys(reg.names(), 0),
        "paths_per_layer": [dict.fromkeys(reg.names(), 0) for _ in range(n_layers)],
        "demotions": 0,
        "controller_params": eng.info().get("controller_params", 0) if eng.policy == "hest" else 0,
    }


def _run_samples(args, pairs: list[Pair], rows, samples: Path, done: dict, engines) -> None:
    """Run every (pair, row) not in `done`, appending each sample to `samples` as it ends."""
    todo = [(p, row) for p in pairs for row in rows if (row[0], p.id) not in done]
    bar = tqdm(todo, disable=args.no_progress, desc="evaluate", dynamic_ncols=True)
    with samples.open("a") as f:
        for pair, (name, policy, ratio) in bar:
            bar.set_postfix(row=name)
            rec = {"row": name, "id": pair.id, **run_one(engines, policy, ratio, pair, args)}
            done[(name, pair.id)] = rec
            f.write(json.dumps(rec) + "\n")
            f.flush()


def evaluate(args: argparse.Namespace) -> dict:
    end = None if args.limit is None else args.skip + args.limit
    pairs = load_pairs(args.data, end)[args.skip :]
    rows = row_names(args)
    js = Path(args.json)
    js.parent.mkdir(parents=True, exist_ok=True)
    samples = samples_file(js, args.shard)
    done = other_samples(js, samples)
    if samples.is_file():
        done.update(read_samples(samples))  # its own file, repaired if a killed run cut it
    enable_paths(args.paths)
    for _, pol, _ in rows:
        require_paths(METHODS[pol])
    engines = Engines(args)
    mine = pairs if args.shard is None else pairs[args.shard[0] :: args.shard[1]]
    _run_samples(args, mine, rows, samples, done, engines)
    ids = [p.id for p in pairs]
    if args.shard is not None:  # the other shards may have finished while this one ran
        done.update(other_samples(js, samples))
    missing = sum((n, i) not in done for n, _, _ in rows for i in ids)
    if missing:
        print(
            f"[evaluate] shard {args.shard[0]}/{args.shard[1]} done; {missing} (row, pair) samples "
            "are still missing from other shards: run the other shards, then the same command "
            "without --shard to aggregate",
            flush=True,
        )
        return {"missing": missing}
    longest = longest_prompts(rows, ids, done)
    summary = [summarise(n, pol, [done[(n, i)] for i in ids], longest) for n, pol, _ in rows]
    for s in summary:
        if METHODS[s["policy"]].evaluation.engine == "merged":  # LoRA's trainable parameters
            s["controller_params"] = lora_params(engines.get("fp16").lean.spec)
    md = markdown(summary, len(ids))
    out = {
        "data": str(args.data),
        "skip": args.skip,
        "n": len(ids),
        "max_new_tokens": args.max_new_tokens,
        "max_article_tokens": args.max_article_tokens,
        "read": args.read,
        "calibration": engines.calibration,
        "engines": {p: e.info() for p, e in engines.e.items()},
        "rows": summary,
    }
    write_outputs(js, out, md)
    print(md)
    return out


def main(argv: list[str] | None = None) -> None:
    evaluate(parse_args(argv))


if __name__ == "__main__":
    main()
