"""`python -m server.bench --json PATH`: what the HTTP server costs and what batching gains.

Measured in one run on one model (default: the real default model), medians over repeats:
* HTTP overhead: median latency of one request through `python -m server` (concurrency 1,
  non-streaming) / median latency of the same request as a direct `engine.generate` call in this
  process. The two are interleaved, request by request. Target <= 1.05.
* Batching gain: requests/s with 8 clients in a closed loop against a server with
  HEST_MAX_BATCH_SIZE=8 / the same against a server with HEST_MAX_BATCH_SIZE=1. Rounds alternate
  between the two servers. Target >= 1.5.
Both servers run with brownout disabled (a huge SLO) so both do the same work per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CNNDM = ROOT.parent / "shared" / "data" / "cnndm" / "test.jsonl"
FALLBACK = (
    "The city council voted on Tuesday to expand the bus network after a year of delays. "
    "Officials said the new routes would serve twelve neighbourhoods and cut commute times. "
) * 8


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def texts(n: int, max_chars: int) -> list[str]:
    if CNNDM.is_file():
        with CNNDM.open() as fh:
            lines = [line for _, line in zip(range(n), fh, strict=False)]
        return [json.loads(line)["article"][:max_chars] for line in lines]
    return [f"{i}. {FALLBACK}"[:max_chars] for i in range(n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `python -m server` subprocess."""

    def __init__(self, model: str, batch: int, log_dir: Path, threads: int | None):
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEST_")}
        env |= {
            "HEST_HOST": "127.0.0.1",
            "HEST_PORT": self.url.rsplit(":", 1)[1],
            "HEST_MODEL": model,
            "HEST_MAX_BATCH_SIZE": str(batch),
            "HEST_SLO_S": "1000000",
            "HEST_QUEUE_SIZE": "256",
            "HEST_ACCESS_LOG": "false",
            "HEST_LOG_LEVEL": "warning",
        }
        if threads:
            env["HEST_THREADS"] = str(threads)
        self.log = log_dir / f"server-batch{batch}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server"], cwd=ROOT, env=env, stdout=out, stderr=out
            )

    def wait_ready(self, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=3).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"server not ready after {timeout_s} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def body(text: str, args) -> dict:
    return {"text": text, "max_new_tokens": args.max_new_tokens, "energy_budget_ratio": args.ratio}


def overhead(engine, server: Server, prompts: list[str], args) -> dict:
    from hest_core import GenerationRequest

    direct, http, mismatched = [], [], 0
    paired, extra = [], []  # per HTTP request: latency / engine time, latency - engine time
    with httpx.Client(base_url=server.url, timeout=600) as client:
        for rep in range(args.repeats):
            for i, text in enumerate(prompts):
                order = ("direct", "http") if (rep + i) % 2 == 0 else ("http", "direct")
                tokens = {}
                for kind in order:
                    t0 = time.perf_counter()
                    if kind == "direct":
                        req = GenerationRequest(
                            text,
                            energy_budget_ratio=args.ratio,
                            max_new_tokens=args.max_new_tokens,
                        )
                        (res,) = engine.generate([req])
                        direct.append(time.perf_counter() - t0)
                        tokens[kind] = res.stats.completion_tokens
                    else:
                        r = client.post("/v1/summarize", json=body(text, args))
                        http.append(time.perf_counter() - t0)
                        r.raise_for_status()
                        tokens[kind] = r.json()["usage"]["completion_tokens"]
                        t = r.json()["timings"]
                        engine_s = t["total_s"] - t["queue_s"]  # incl. validation, as direct
                        paired.append(http[-1] / engine_s)
                        extra.append(http[-1] - engine_s)
                mismatched += tokens["direct"] != tokens["http"]
            say(
                f"overhead repeat {rep + 1}/{args.repeats}: direct median "
                f"{statistics.median(direct):.3f} s, http {statistics.median(http):.3f} s"
            )
    d, h = statistics.median(direct), statistics.median(http)
    return {
        "direct_median_s": d,
        "http_median_s": h,
        "ratio": h / d,
        "samples": len(direct),
        # the same request's client latency against the engine time the server reports: free of
        # run-to-run engine noise (queue wait incl. HEST_MAX_WAIT_MS counts as overhead)
        "paired_ratio_median": statistics.median(paired),
        "paired_overhead_ms_median": 1000 * statistics.median(extra),
        "token_count_mismatches": mismatched,
        "target": "<= 1.05",
    }


async def closed_loop(url: str, prompts: list[str], args) -> float:
    """requests/s: `args.requests` requests, `args.concurrency` clients."""
    queue = list(prompts)
    async with httpx.AsyncClient(base_url=url, timeout=1200) as client:

        async def worker() -> None:
            while queue:
                r = await client.post("/v1/summarize", json=body(queue.pop(), args))
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return len(prompts) / (time.perf_counter() - t0)


def batching(batched: Server, single: Server, prompts: list[str], args) -> dict:
    rps: dict[str, list[float]] = {"batched": [], "batch1": []}
    for rep in range(args.repeats):
        pair = [("batched", batched), ("batch1", single)]
        for name, server in pair if rep % 2 == 0 else pair[::-1]:
            rps[name].append(asyncio.run(closed_loop(server.url, prompts, args)))
        say(
            f"batching repeat {rep + 1}/{args.repeats}: batched {rps['batched'][-1]:.3f} req/s, "
            f"batch1 {rps['batch1'][-1]:.3f} req/s"
        )
    b, s = statistics.median(rps["batched"]), statistics.median(rps["batch1"])
    return {
        "batched_rps_median": b,
        "batch1_rps_median": s,
        "gain": b / s,
        "rounds": args.repeats,
        "requests_per_round": len(prompts),
        "concurrency": args.concurrency,
        "target": ">= 1.5",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of each measurement")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.6, help="energy_budget_ratio of every request")
    ap.add_argument("--max-chars", type=int, default=1200, help="article characters per request")
    ap.add_argument("--overhead-prompts", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16, help="requests per batching round")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads of every engine (default: torch's)"
    )
    return ap.parse_args(argv)


def measure(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """(the server's /v1/info, the HTTP overhead, the batching gain): two servers (max batch 8
    and 1) and an engine in this process for the direct calls."""
    with tempfile.TemporaryDirectory(prefix="hest-bench-") as tmp:
        say("starting two servers (max batch 8 and 1) and loading the engine in-process")
        batched = Server(args.model, 8, Path(tmp), args.threads)
        single = Server(args.model, 1, Path(tmp), args.threads)
        try:
            from hest_core import Engine

            engine = Engine.from_pretrained(args.model, threads=args.threads)
            engine.warmup()
            batched.wait_ready()
            single.wait_ready()
            info = httpx.get(f"{batched.url}/v1/info").json()
            prompts = texts(max(args.requests, args.overhead_prompts), args.max_chars)
            say("HTTP overhead (concurrency 1) ...")
            over = overhead(engine, batched, prompts[: args.overhead_prompts], args)
            del engine
            say("batching gain (concurrency 8) ...")
            gain = batching(batched, single, prompts[: args.requests], args)
        finally:
            batched.stop()
            single.stop()
    return info, over, gain


def table(over: dict, gain: dict, concurrency: int) -> str:
    """The results as a markdown table."""
    return (
        f"| measure | server | baseline | ratio | target |\n| --- | --- | --- | --- | --- |\n"
        f"| HTTP overhead, median latency (s), concurrency 1 | {over['http_median_s']:.3f} | "
        f"{over['direct_median_s']:.3f} (direct engine call) | {over['ratio']:.3f} | <= 1.05 |\n"
        f"| same, paired: client latency / engine time of that request | "
        f"+{over['paired_overhead_ms_median']:.1f} ms | | {over['paired_ratio_median']:.3f} | |\n"
        f"| batching gain, requests/s at concurrency {concurrency} | "
        f"{gain['batched_rps_median']:.3f} (max batch 8) | {gain['batch1_rps_median']:.3f} "
        f"(max batch 1) | {gain['gain']:.2f} | >= 1.5 |"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m server.bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    t_start = time.time()
    load_before = os.getloadavg()
    info, over, gain = measure(args)
    result = {
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "duration_s": round(time.time() - t_start, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": args.threads or "default",
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "model": info.get("model"),
        "adapter": info.get("adapter"),
        "device": info.get("device"),
        "policy": info.get("policy"),
        "request": {
            "max_new_tokens": args.max_new_tokens,
            "energy_budget_ratio": args.ratio,
            "max_chars": args.max_chars,
        },
        "http_overhead": over,
        "batching_gain": gain,
    }
    print(table(over, gain, args.concurrency))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
