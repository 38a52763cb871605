"""Long prompts against the energy model and the clock (issue 16): for prompts of about 512, 2k,
4k and 7.5k tokens, per policy, modelled joules against the estimate meter (wall time x nominal
watts), prefill seconds per prompt token, and the attention-over-context share of the modelled
prefill; optionally the peak resident memory of a real server process with the longest prompt.

    python tools/long_context.py --lengths 512,2048,4096,7680 --policies fp16,int8 --repeats 3 \
        --json docs/results/long_context.json [--server-memory]

Prompts are consecutive training articles (train.jsonl from row --skip; never the test file)
joined and cut to the length at a token boundary, read whole, at budget ratio --budget-ratio.
Every figure is the median of --repeats runs of the same request; the runs of every length and
policy interleave. Run it on a quiet machine: it times things.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hest_core import Engine, GenerationRequest  # noqa: E402


def prompt_of(tok, articles: list[str], n_tokens: int) -> str:
    """Consecutive articles joined until n_tokens, cut there (str)."""
    ids: list[int] = []
    for a in articles:
        ids += tok(a + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    return tok.decode(ids[:n_tokens])


def engine_of(policy: str, args) -> Engine:
    """A warmed engine of the default model on `policy` (the default adapter for hest)."""
    eng = Engine.from_pretrained(
        "default",
        adapter="default" if policy == "hest" else None,
        policy=policy,
        progress=False,
        threads=args.threads,
        calibration=args.calibration,
    )
    eng.warmup()
    return eng


def run_once(eng: Engine, text: str, args):
    """The stats of one request of `text` read whole at --budget-ratio."""
    # read whole at r = 1 (--budget-ratio): under the default r = 0.6 the read plan would
    # read a long prompt's head, and a whole long prompt with few new tokens costs more
    # than 0.6; a HEST prefill whose layers split between paths can cost more than 1
    req = GenerationRequest(
        text,
        energy_budget_ratio=args.budget_ratio,
        max_new_tokens=args.max_new,
        clean_end=False,
        read="whole",
    )
    return eng.generate([req])[0].stats


def row_of(eng: Engine, policy: str, n: int, runs: list) -> dict:
    """One table row (length, policy, medians over `runs`)."""
    em = eng.energy
    p = runs[0].prompt_tokens
    pre = em.ph["prefill"]
    attn = pre.attn_ctx * p * (p + 1) / 2
    return {
        "length": n,
        "policy": policy,
        "prompt_tokens": p,
        "modelled_j": statistics.median(s.modelled_j for s in runs),
        "estimated_j": statistics.median(s.estimated_j for s in runs),
        "modelled_over_estimate": statistics.median(s.modelled_j / s.estimated_j for s in runs),
        "prefill_s_per_token": statistics.median(s.prefill_s / p for s in runs),
        # of the modelled all-fp16 prefill: fixed work + attention + gated units
        "attention_share_modelled": attn
        / (em.plain.prefill_fixed(p) + p * em.unit_sum["prefill"][em.ref]),
    }


def measure(policies: list[str], texts: dict[int, str], args) -> list[dict]:
    """Rows (length, policy, medians) for every policy and length. Every policy's engine is
    built first and the runs interleave (each repeat runs every length on every policy in turn),
    so a drift of the host's speed hits every row alike instead of the last ones."""
    engines = {pol: engine_of(pol, args) for pol in policies}
    runs: dict[tuple[str, int], list] = {}
    for _ in range(args.repeats):
        for n, text in texts.items():
            for pol, eng in engines.items():
                runs.setdefault((pol, n), []).append(run_once(eng, text, args))
    rows = []
    for pol, eng in engines.items():
        for n in texts:
            r = row_of(eng, pol, n, runs[(pol, n)])
            rows.append(r)
            print(
                f"{pol:5s} {r['prompt_tokens']:5d} tokens: modelled {r['modelled_j']:.1f} J, "
                f"estimate {r['estimated_j']:.1f} J, ratio {r['modelled_over_estimate']:.3f}, "
                f"prefill {1e3 * r['prefill_s_per_token']:.2f} ms/token",
                flush=True,
            )
    return rows


def _status_kb(pid: int, key: str) -> int:
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith(key + ":"):
            return int(ln.split()[1])
    raise KeyError(key)


def server_memory(text: str, port: int, max_new: int) -> dict:
    """Idle resident memory (VmRSS, once ready) of a real server process, and its peak (VmHWM,
    reset after the idle reading) while it serves `text`, in MiB."""
    env = dict(os.environ, HEST_PORT=str(port), HEST_HOST="127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/readyz", timeout=2)
                break
            except OSError:
                time.sleep(1)
        time.sleep(2)
        idle = _status_kb(proc.pid, "VmRSS")
        # reset the high-water mark (Linux: "5" > clear_refs), so the peak is this request's and
        # not the load's or the warm-up's
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        body = {
            "text": text,
            "max_new_tokens": max_new,
            "read": "whole",
            "energy_budget_ratio": 1.0,
        }
        body = json.dumps(body).encode()
        req = urllib.request.Request(
            url + "/v1/summarize", body, {"Content-Type": "application/json"}
        )
        out = json.loads(urllib.request.urlopen(req, timeout=1200).read())
        return {
            "idle_rss_mib": idle / 1024,
            "peak_rss_mib": _status_kb(proc.pid, "VmHWM") / 1024,
            "prompt_tokens": out.get("usage", {}).get("prompt_tokens"),
        }
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="512,2048,4096,7680")
    ap.add_argument("--policies", default="fp16,int8,hest")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=8)
    ap.add_argument(
        "--budget-ratio",
        type=float,
        default=1.0,
        help="budget ratio of every request (default 1: the all-fp16 cost; fixed policies run "
        "unguarded); above 1 where HEST's mixed-path prefill would hit it",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cnndm/train.jsonl"))
    ap.add_argument("--skip", type=int, default=100)
    ap.add_argument("--server-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the server's memory")
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--calibration", default=None, help="table file (default: the packaged one of this CPU)"
    )
    args = ap.parse_args()
    from hest_core.exec.loading import load_tokenizer

    tok = load_tokenizer("default", progress=False)
    lines = Path(args.data).read_text().splitlines()[args.skip : args.skip + 60]
    articles = [json.loads(ln)["article"] for ln in lines]
    lengths = [int(x) for x in args.lengths.split(",")]
    texts = {n: prompt_of(tok, articles, n) for n in lengths}
    policies = [] if args.memory_only else args.policies.split(",")
    rows = measure(policies, texts, args) if policies else []
    out: dict = {
        "lengths": lengths,
        "rows": rows,
        "cpu": _cpu(),
        "load_at_start": os.getloadavg(),
        "calibration": args.calibration or "packaged",
        "budget_ratio": args.budget_ratio,
    }
    if args.server_memory or args.memory_only:
        out["server_memory"] = server_memory(texts[max(lengths)], args.port, args.max_new)
        print(out["server_memory"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def _cpu() -> str:
    for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if ln.startswith("Model name"):
            return ln.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
