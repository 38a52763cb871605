"""One-shot summaries: `python -m hest_core summarize FILE --energy-budget-ratio 0.6 [--json]`.

FILE is a text file, a JSONL file (field `article`; use --index to pick a line) or `-` (stdin).
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import HestError


def _read(path: str, index: int) -> str:
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    if path.endswith(".jsonl"):
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not 0 <= index < len(lines):
            raise HestError(
                f"--index {index} is outside {path}'s {len(lines)} lines", param="index"
            )
        return json.loads(lines[index])["article"]
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hest_core", description="HEST runtime commands")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize", help="summarise one article under an energy budget")
    s.add_argument("file", help="text file, JSONL with an 'article' field, or - for stdin")
    s.add_argument("--index", type=int, default=0, help="line of a JSONL file (default 0)")
    b = s.add_mutually_exclusive_group()
    b.add_argument(
        "--energy-budget-ratio",
        type=float,
        default=None,
        help="budget / all-fp16 cost (default: the engine's, DEFAULT_BUDGET_RATIO)",
    )
    b.add_argument(
        "--energy-budget-j", type=float, default=None, help="budget in joules (modelled)"
    )
    s.add_argument("--max-new-tokens", type=int, default=None)
    s.add_argument("--model", default="default")
    s.add_argument("--adapter", default="default", help="adapter dir, 'default' or 'none'")
    s.add_argument("--policy", default="hest", choices=["hest", "fp16", "int8"])
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    from .config import RuntimeConfig
    from .engine import Engine, GenerationRequest

    try:
        text = _read(args.file, args.index)
        eng = Engine.from_pretrained(
            args.model,
            adapter=None if args.adapter == "none" else args.adapter,
            device=args.device,
            policy=args.policy,
            progress=not args.json,
            config=RuntimeConfig.from_env(),  # this command's boundary with the environment
        )
        req = GenerationRequest(
            text, args.energy_budget_j, args.energy_budget_ratio, args.max_new_tokens
        )
        res = eng.generate([req])[0]
    except (HestError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    st = res.stats
    if args.json:
        print(
            json.dumps(
                {"summary": res.text, "finish_reason": res.finish_reason, "stats": st.to_dict()}
            )
        )
        return 0
    print(res.text.strip())
    print()
    m = "measured" if st.measured_j is not None else "no hardware meter"
    print(
        f"energy: {st.modelled_j:.2f} J modelled of a {st.budget_j:.2f} J budget "
        f"(ratio {st.budget_ratio:.2f} of the all-fp16 {st.fp16_cost_j:.2f} J); "
        f"{st.estimated_j:.2f} J estimated (meter: {st.meter}, {m})"
    )
    print(f"paths: {st.paths}  demoted by the guard: {st.demotions}")
    print(
        f"tokens: {st.prompt_tokens} prompt{' (article truncated)' if st.truncated else ''}, "
        f"{st.completion_tokens} generated ({res.finish_reason}); ttft {st.ttft_s:.2f} s, total {st.total_s:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
