"""Runtime benchmark: every ratio measured in one run on the default model (medians of repeats).

    python -m hest_core.bench --json results/bench_core.json [--repeats 5] [--new-tokens 64]

Prints a table of ratios against their targets and writes them (with the raw timings) as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapter.controller import Controller
from ..exec import native
from ..exec.kvcache import SeqSlot
from ..exec.model import LeanModel
from ..exec.quant import quantize_rows
from ..exec.routing import const_decider
from ..runtime.budget import MAX_BUDGET_RATIO
from ..runtime.engine import Engine, GenerationRequest

MIX = (0.2, 0.4, 0.4)  # fp16, int8, skip shares of the gated units


def _median_time(fn, repeats: int, inner: int = 1) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t0) / inner)
    return statistics.median(ts)


class MixController(torch.nn.Module):
    """Draws each unit's path at random with fixed shares (a stand-in policy for timing only)."""

    def __init__(self, shares=MIX, seed: int = 0):
        super().__init__()
        self.p = torch.tensor(shares)
        self.g = torch.Generator().manual_seed(seed)

    def forward(self, h, layer, beta):
        n = h.shape[0]
        paths = torch.multinomial(self.p, n, replacement=True, generator=self.g)
        return F.one_hot(paths, 3).float()  # (n, 3) logits whose argmax is the drawn path


def mix_controller(
    lean: LeanModel, prompt: list[int], continuation: list[int], shares=MIX, seed: int = 0
) -> Controller:
    """A real `Controller` (the class the engine runs, so the decode loop timed is the one users
    get) with random weights whose biases are tuned until about `shares` of the units take each
    path, on the hidden states of a continuation of the bench prompt (what decode sees). The
    shares realised at decode are measured and reported beside the timing."""
    s = lean.spec
    g = torch.Generator().manual_seed(seed)
    ctl = Controller(s.hidden, s.n_layers, k=32)
    hs = []

    def record(li, h):
        hs.append(h[len(prompt) :].float())
        return const_decider(0)(li, h)

    ids = torch.tensor(prompt + continuation)
    with torch.inference_mode():
        lean.forward(
            ids,
            torch.arange(len(ids)),
            [SeqSlot(0, len(ids), 0, 0)],
            lean.new_cache(1, len(ids)),
            record,
            False,
            logits_rows=ids[-1:] * 0,
        )
    with torch.no_grad():
        ctl.hest_w_tok.copy_(torch.randn(32, s.hidden, generator=g) * 4 / s.hidden**0.5)
        ctl.hest_w_layer.copy_(torch.randn(s.n_layers, 32, generator=g))
        ctl.hest_a.copy_(torch.randn(3, 32, generator=g) * 4)
        base = torch.cat(
            [ctl(h, li, torch.zeros(h.shape[0])) - ctl.hest_a0 for li, h in enumerate(hs)]
        )
        a0 = torch.zeros(3)
        target = torch.tensor(shares)
        for _ in range(400):
            got = torch.bincount((base + a0).argmax(-1), minlength=3).float() / base.shape[0]
            a0 += 0.5 * (target - got)
        ctl.hest_a0.copy_(a0)
    return ctl


def _mix_decider(seed: int = 0):
    ctl = MixController(seed=seed)

    def decide(li, h):
        paths = ctl(h, li, None).argmax(-1)
        return paths, torch.bincount(paths, minlength=3).tolist()

    return decide


def kernels(lean: LeanModel, repeats: int) -> dict:
    lw, dt, T = lean.layers[0], lean.dtype, 128
    h = torch.randn(T, lean.spec.hidden, dtype=dt)
    r = {}
    with torch.inference_mode():
        r["mlp_fp16_t128_s"] = _median_time(lambda: LeanModel._mlp_dense(h, lw), repeats, 20)
        r["mlp_int8_t128_s"] = _median_time(lambda: LeanModel._mlp_int8(h, lw), repeats, 20)
        r["mlp_skip_t128_s"] = _median_time(lambda: LeanModel._mlp_skip(h, lw), repeats, 20)
        hq, _ = quantize_rows(h)
        mid = torch.randn(T, lean.spec.intermediate, dtype=dt)
        mq, _ = quantize_rows(mid)
        r["matmul_16bit_t128_s"] = _median_time(
            lambda: (F.linear(h, lw.wgu), F.linear(mid, lw.wdown)), repeats, 20
        )
        r["matmul_int_mm_t128_s"] = _median_time(
            lambda: (torch._int_mm(hq, lw.gu8.q.t()), torch._int_mm(mq, lw.down8.q.t())),
            repeats,
            20,
        )
    return r


def prefill(lean: LeanModel, ids: torch.Tensor, repeats: int) -> dict:
    n = ids.shape[0]
    pos = torch.arange(n)
    slots = [SeqSlot(0, n, 0, 0)]
    last = torch.tensor([n - 1])
    cache = lean.new_cache(1, n + 1)
    r = {}
    with torch.inference_mode():
        for name, dec in (
            ("fp16", const_decider(0)),
            ("int8", const_decider(1)),
            ("skip", const_decider(2)),
        ):
            r[f"prefill_{name}_s"] = _median_time(
                lambda dec=dec: lean.forward(ids, pos, slots, cache, dec, False, last), repeats
            )
        r["prefill_mix_s"] = _median_time(
            lambda: lean.forward(ids, pos, slots, cache, _mix_decider(), False, last), repeats
        )
        from ..adapter.controller import Controller

        ctl = Controller(lean.spec.hidden, lean.spec.n_layers)
        h = torch.randn(n, lean.spec.hidden, dtype=lean.dtype)
        beta = torch.zeros(n)
        r["controller_prefill_s"] = _median_time(
            lambda: [ctl(h, li, beta).argmax(-1) for li in range(lean.spec.n_layers)], repeats
        )
    r["prefill_ideal_mix_s"] = sum(
        s * r[f"prefill_{p}_s"] for s, p in zip(MIX, ("fp16", "int8", "skip"), strict=True)
    )
    return r


def decode(
    eng_by_policy: dict[str, Engine], text: str, new_tokens: int, batch: int, repeats: int
) -> dict:
    """ms per generated token of the decode phase through the real engine (controller + guard
    included); at batch B one step makes B tokens."""
    r = {}
    for name, eng in eng_by_policy.items():
        saved = eng.eos_ids
        eng.eos_ids = set()  # fixed token count
        reqs = [
            GenerationRequest(
                text,
                energy_budget_ratio=MAX_BUDGET_RATIO if name == "mix" else 1.0,
                max_new_tokens=new_tokens,
            )
        ] * batch
        try:
            vals = []
            for _ in range(repeats):
                st = eng.generate(reqs)[0].stats
                vals.append(
                    st.decode_s / (st.completion_tokens - 1) / batch
                )  # per token, not per step
        finally:
            eng.eos_ids = saved
        r[f"decode_{name}_b{batch}_ms"] = statistics.median(vals) * 1e3
        if name == "mix" and batch == 1:
            r["decode_mix_b1_shares"] = _decode_shares(eng, text, new_tokens)
    return r


def _decode_shares(eng: Engine, text: str, new_tokens: int) -> list[float]:
    """Shares of the decode-phase units on each path: a full run minus a prefill-only run."""
    full, pre = (
        eng.generate(
            [GenerationRequest(text, energy_budget_ratio=MAX_BUDGET_RATIO, max_new_tokens=n)]
        )[0].stats.paths
        for n in (new_tokens, 1)
    )
    dec = [full[p] - pre[p] for p in ("fp16", "int8", "skip")]
    return [c / sum(dec) for c in dec]


def decode_unfused(eng: Engine, text: str, new_tokens: int, repeats: int) -> dict:
    """All-fp16 decode at batch 1 with the fused layer off (the PyTorch loop around the same
    native products): what fusing is worth."""
    eng.lean.fused.enabled = False
    try:
        r = decode({"fp16": eng}, text, new_tokens, 1, repeats)
    finally:
        eng.lean.fused.enabled = True
    return {"decode_fp16_unfused_b1_ms": r["decode_fp16_b1_ms"]}


def decode_pytorch_kernels(eng: Engine, text: str, new_tokens: int, repeats: int) -> dict:
    """All-fp16 decode at batch 1 with the native kernels off (oneDNN): what they are worth."""
    with native.disabled():
        r = decode({"fp16": eng}, text, new_tokens, 1, repeats)
    return {"decode_fp16_pytorch_kernels_b1_ms": r["decode_fp16_b1_ms"]}


def hf_generate(text_ids: list[int], new_tokens: int, repeats: int) -> dict:
    from ..exec.loading import load_hf_model

    hf = load_hf_model("default", progress=False).to(torch.bfloat16)
    ids = torch.tensor([text_ids])
    kw = dict(do_sample=False, pad_token_id=2, eos_token_id=None)

    def gen(n):
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    t_full = _median_time(lambda: gen(new_tokens), repeats)
    t_one = _median_time(lambda: gen(1), repeats)
    return {
        "hf_generate_decode_ms": (t_full - t_one) / (new_tokens - 1) * 1e3,
        "hf_generate_prefill_s": t_one,
    }


def bandwidth(repeats: int) -> float:
    """Read-only bandwidth in bytes/s: a sum over 1 GiB."""
    x = torch.ones(2**28, dtype=torch.float32)  # 1 GiB
    t = _median_time(lambda: x.sum(), repeats)
    return x.numel() * 4 / t


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m hest_core.bench", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--json", default="results/bench_core.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--article",
        default="../shared/data/cnndm/test.jsonl",
        help="JSONL; the first article is the prompt",
    )
    return ap


def load_engines(text: str, new_tokens: int) -> tuple[dict[str, Engine], list[int]]:
    """One engine per fixed path and "mix" (a controller that reproduces a fixed mix of paths on
    this text's fp16 continuation); returns them with the prompt's token ids."""
    print("[bench] loading engines (fp16, int8, skip and a fixed-mix policy)", flush=True)
    engines = {
        "fp16": Engine.from_pretrained("default", adapter=None, policy="fp16", progress=False),
        "int8": Engine.from_pretrained("default", adapter=None, policy="int8", progress=False),
        "skip": Engine.from_pretrained("default", adapter=None, policy="skip", progress=False),
    }
    mix = Engine.from_pretrained("default", adapter=None, policy="hest", progress=False)
    prompt = engines["fp16"].check(GenerationRequest(text, max_new_tokens=new_tokens)).ids
    req = GenerationRequest(text, energy_budget_ratio=1.0, max_new_tokens=new_tokens)
    fp16_text = engines["fp16"].generate([req])[0].text
    cont = engines["fp16"].tokenizer(fp16_text, add_special_tokens=False)["input_ids"]
    mix.controller = mix_controller(mix.lean, prompt, cont)
    engines["mix"] = mix
    return engines, prompt


def measure(engines: dict[str, Engine], text: str, prompt: list[int], args) -> dict:
    """Every timing of the run: kernels, prefill, decode at batch 1 and 8 (and with the native
    kernels or the fused layer off), transformers' generate, the bandwidth floor."""
    lean = engines["fp16"].lean
    r: dict = {
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "native_kernels": native.status(),
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
    }
    print("[bench] kernels at 128 tokens", flush=True)
    r.update(kernels(lean, args.repeats))
    print("[bench] 512-token prefill per path", flush=True)
    r.update(prefill(lean, torch.tensor(prompt[:512]), args.repeats))
    for b in (1, 8):
        print(f"[bench] decode at batch {b}", flush=True)
        r.update(
            decode(engines, text, args.new_tokens, b, max(1, args.repeats // (2 if b > 1 else 1)))
        )
    if native.get() is not None:
        print("[bench] decode at batch 1 with PyTorch's kernels (native off)", flush=True)
        r.update(decode_pytorch_kernels(engines["fp16"], text, args.new_tokens, args.repeats))
        print("[bench] decode at batch 1 with the fused layer off", flush=True)
        r.update(decode_unfused(engines["fp16"], text, args.new_tokens, args.repeats))
    print("[bench] transformers generate (bf16)", flush=True)
    r.update(hf_generate(prompt, args.new_tokens, max(2, args.repeats // 2)))
    print("[bench] memory bandwidth", flush=True)
    bw = bandwidth(args.repeats)
    pb = lean.param_bytes()
    bytes_fp16 = pb["dense_16bit"] + pb["lm_head"]
    r["bandwidth_gb_s"] = bw / 1e9
    r["fp16_bytes_per_token"] = bytes_fp16
    r["bandwidth_floor_fp16_ms"] = bytes_fp16 / bw * 1e3
    r["decode_ideal_mix_b1_ms"] = sum(  # with the shares the controller realised at decode
        s * r[f"decode_{p}_b1_ms"]
        for s, p in zip(r["decode_mix_b1_shares"], ("fp16", "int8", "skip"), strict=True)
    )
    return r


def ratios_of(r: dict) -> dict[str, tuple[float, str]]:
    """name -> (ratio, target) of the measurements `r`."""
    ratios = {
        "int8_vs_fp16_mlp_t128": (r["mlp_int8_t128_s"] / r["mlp_fp16_t128_s"], "<= 0.6"),
        "int8_kernel_floor_t128": (r["matmul_int_mm_t128_s"] / r["matmul_16bit_t128_s"], "(floor)"),
        "skip_vs_fp16_mlp_t128": (r["mlp_skip_t128_s"] / r["mlp_fp16_t128_s"], "<= 0.05"),
        "mixed_vs_fp16_prefill": (r["prefill_mix_s"] / r["prefill_fp16_s"], "(report)"),
        "mixed_vs_ideal_prefill": (r["prefill_mix_s"] / r["prefill_ideal_mix_s"], "<= 1.10"),
        "controller_overhead": (r["controller_prefill_s"] / r["prefill_fp16_s"], "<= 0.05"),
        "int8_vs_fp16_decode_b1": (r["decode_int8_b1_ms"] / r["decode_fp16_b1_ms"], "<= 0.75"),
        "fp16_engine_vs_hf_generate_decode": (
            r["decode_fp16_b1_ms"] / r["hf_generate_decode_ms"],
            "<= 0.35",
        ),
        "decode_vs_bandwidth_floor": (
            r["decode_fp16_b1_ms"] / r["bandwidth_floor_fp16_ms"],
            "<= 1.8",
        ),
    }
    ratios["mixed_vs_ideal_decode_b1"] = (
        r["decode_mix_b1_ms"] / r["decode_ideal_mix_b1_ms"],
        "<= 1.15",
    )
    if "decode_fp16_unfused_b1_ms" in r:
        ratios["fused_vs_unfused_decode_b1"] = (
            r["decode_fp16_b1_ms"] / r["decode_fp16_unfused_b1_ms"],
            "(report)",
        )
    if "decode_fp16_pytorch_kernels_b1_ms" in r:
        ratios["native_vs_pytorch_kernels_decode_b1"] = (
            r["decode_fp16_b1_ms"] / r["decode_fp16_pytorch_kernels_b1_ms"],
            "(report)",
        )
    return ratios


def report(r: dict, ratios: dict[str, tuple[float, str]], out: Path) -> None:
    """The table of ratios against their targets, then the decode times."""
    print(f"\n{'ratio':36s} {'value':>8s}  target")
    for k, (v, t) in ratios.items():
        print(f"{k:36s} {v:8.3f}  {t}")
    print()
    for k in sorted(r):
        if k.startswith("decode_") and k.endswith("_ms"):
            print(f"{k:36s} {r[k]:8.2f} ms/token")
    sh = r["decode_mix_b1_shares"]
    print(
        f"{'mix shares realised at decode':36s} fp16 {sh[0]:.2f} / int8 {sh[1]:.2f} / skip {sh[2]:.2f}"
    )
    print(f"{'hf_generate_decode_ms':36s} {r['hf_generate_decode_ms']:8.2f} ms/token")
    print(
        f"{'bandwidth_floor_fp16_ms':36s} {r['bandwidth_floor_fp16_ms']:8.2f} ms/token ({r['bandwidth_gb_s']:.1f} GB/s)"
    )
    print(f"\nwrote {out} in {r['bench_s']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    text = json.loads(Path(args.article).read_text().splitlines()[0])["article"]
    engines, prompt = load_engines(text, args.new_tokens)
    r = measure(engines, text, prompt, args)
    ratios = ratios_of(r)
    r["ratios"] = {k: v for k, (v, _) in ratios.items()}
    r["targets"] = {k: t for k, (_, t) in ratios.items()}
    r["bench_s"] = time.perf_counter() - t_start
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1))
    report(r, ratios, out)
