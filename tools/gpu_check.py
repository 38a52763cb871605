"""Check the CUDA path and NVML metering on a GPU machine with the real default model.

    python tools/gpu_check.py --data PAIRS.jsonl --limit 8 --json OUT.json [--table-out T.json]

What it does, in one process, and writes as JSON (and prints):
1. the GPU, the torch build, and how often the GPU's energy counter moves (NVML);
2. builds the default model on CUDA, which calibrates it on first use with the NVML meter (the
   table is copied to --table-out);
3. summarises `--limit` articles with the `fp16` policy and with the default HEST adapter at
   budget ratios 0.6 and 1.0; per request: modelled J (the table), measured J (NVML, the GPU's
   own counter), wall time, tokens, finish reason, the budget invariant;
4. the medians: measured / modelled J per policy, HEST@0.6 against fp16 in measured J and wall
   time.

Use training pairs (or any JSONL with `article`): this is a hardware check, not an evaluation.
The JSON holds the generated summaries, which can quote the articles: keep it out of the
repository (docs/results/gpu/ holds copies with the texts removed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hest_core import Engine, GenerationRequest  # noqa: E402
from hest_core.energy.meters import NvmlMeter  # noqa: E402


def nvml_probe(seconds: float = 1.0) -> dict:
    m = NvmlMeter()
    w = m.begin()
    time.sleep(seconds)
    idle = m.end(w)
    return {
        "describe": m.describe(),
        "update_s": m.update_s,
        "min_window_s": m.min_window_s,
        "idle_w": idle.energy_j / idle.elapsed_s,
    }


def run_policy(eng: Engine, arts: list[str], ratio: float, max_new: int) -> list[dict]:
    out = []
    for a in arts:
        res = eng.generate(
            [GenerationRequest(a, energy_budget_ratio=ratio, max_new_tokens=max_new)]
        )[0]
        st = res.stats
        out.append(
            {
                "text": res.text,
                "finish_reason": res.finish_reason,
                "prompt_tokens": st.prompt_tokens,
                "completion_tokens": st.completion_tokens,
                "budget_j": st.budget_j,
                "modelled_j": st.modelled_j,
                "measured_j": st.measured_j,
                "meter": st.meter,
                "wall_s": st.total_s,
                "paths": st.paths,
                "within_budget": st.modelled_j <= st.budget_j * (1 + 1e-9),
            }
        )
    return out


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--json", required=True)
    ap.add_argument("--table-out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu only to dry-run this script")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    rep: dict = {
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nvml": nvml_probe() if gpu else None,
    }
    print(json.dumps(rep, indent=1), flush=True)
    arts = [json.loads(ln)["article"] for ln in open(args.data) if ln.strip()][: args.limit]
    t0 = time.perf_counter()
    hest = Engine.from_pretrained("default", device=args.device, progress=True)
    rep["load_and_calibrate_s"] = round(time.perf_counter() - t0, 1)
    info = hest.info()
    rep["engine"] = info
    cal = info["calibration"]["source"]
    if args.table_out:
        shutil.copy(cal, args.table_out)
    fp16 = Engine.from_pretrained(
        "default", adapter=None, policy="fp16", device=args.device, calibration=cal, progress=False
    )
    for e in (hest, fp16):
        e.warmup()
    rows = {
        "fp16": run_policy(fp16, arts, 1.0, args.max_new_tokens),
        "hest@0.6": run_policy(hest, arts, 0.6, args.max_new_tokens),
        "hest@1.0": run_policy(hest, arts, 1.0, args.max_new_tokens),
    }
    summary = {}
    for name, rs in rows.items():
        summary[name] = {
            "n": len(rs),
            "violations": sum(not r["within_budget"] for r in rs),
            "modelled_j": med([r["modelled_j"] for r in rs]),
            "measured_j": med([r["measured_j"] for r in rs]),
            "measured_over_modelled": med(
                [r["measured_j"] / r["modelled_j"] for r in rs if r["measured_j"] is not None]
            ),
            "wall_s": med([r["wall_s"] for r in rs]),
            "tokens": med([r["completion_tokens"] for r in rs]),
            "ms_per_token": med([1e3 * r["wall_s"] / r["completion_tokens"] for r in rs]),
        }
    f, h = summary["fp16"], summary["hest@0.6"]
    if f["measured_j"] and h["measured_j"]:
        summary["hest0.6_vs_fp16_measured_j"] = h["measured_j"] / f["measured_j"]
    summary["hest0.6_vs_fp16_modelled_j"] = h["modelled_j"] / f["modelled_j"]
    summary["hest0.6_vs_fp16_wall"] = h["wall_s"] / f["wall_s"]
    rep["summary"] = summary
    rep["samples"] = rows
    Path(args.json).write_text(json.dumps(rep, indent=1, default=str))
    print(json.dumps(summary, indent=1), flush=True)
    for name in rows:
        print(f"--- {name}: {rows[name][0]['text'][:300]!r}", flush=True)
    return rep


if __name__ == "__main__":
    main()
