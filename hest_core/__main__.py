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


def _parser() -> argparse.ArgumentParser:
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
    s.add_argument(
        "--policy",
        default="hest",
        help="hest, or a fixed path: fp16, int8, skip, and int4 when registered (HEST_PATHS, or an "
        "adapter trained with it, as the default one is)",
    )
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def _report(res) -> None:
    """The human-readable answer: the summary, then its energy, paths and tokens."""
    st = res.stats
    print(res.text.strip())
    print()
    m = "measured" if st.measured_j is not None else "no hardware meter"
    print(
        f"energy: {st.modelled_j:.2f} J modelled of a {st.budget_j:.2f} J budget "
        f"(ratio {st.budget_ratio:.2f} of the all-fp16 {st.fp16_cost_j:.2f} J); "
        f"{st.estimated_j:.2f} J estimated (meter: {st.meter}, {m})"
    )
    print(f"paths: {st.paths}  demoted by the guard: {st.demotions}")
    cut = " (article truncated)" if st.truncated else ""
    print(
        f"tokens: {st.prompt_tokens} prompt{cut}, {st.completion_tokens} generated "
        f"({res.finish_reason}); ttft {st.ttft_s:.2f} s, total {st.total_s:.2f} s"
    )


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2: a request or configuration error, printed)."""
    args = _parser().parse_args(argv)
    from .config import RuntimeConfig
    from .runtime.engine import Engine, GenerationRequest

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
    if args.json:
        out = {"summary": res.text, "finish_reason": res.finish_reason}
        print(json.dumps(out | {"stats": res.stats.to_dict()}))
    else:
        _report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
