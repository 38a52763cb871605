"""What each path costs in quality: teacher-forced cross-entropy of reference summaries when every
(layer, token) runs a fixed path assignment, on the differentiable twin of the runtime
(training/forward.py, hard gates: equal to `LeanModel.forward` path by path to 0.2%).

    python tools/path_probe.py [--n 12 --skip 1610 --adapter default --json docs/results/x.json]

Assignments: every unit fp16 / int8; the prompt tokens' MLP skipped in all layers, the first,
middle or last ten, the last five, every other layer (generated tokens on int8); the generated
tokens' MLP skipped in the last five or every other layer. By default rows 1610.. of
train.jsonl (the validation split; never the test file), the default adapter's spectral z merged
into the base (as the runtime serves it), articles cut to 384 tokens, references to 64.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from hest_core.artifact import load_adapter
from hest_core.engine import DEFAULT_ADAPTER_DIR
from hest_core.gguf_blocks import quantize_q4_1
from hest_core.loading import fingerprint, load_hf_model, load_tokenizer
from hest_core.model import TARGETS
from hest_core.spectral import SvdCache, make_weight_fn, target_module, z_support
from training.data import load_pairs, tokenize
from training.forward import TrainModel, forward

INT8, SKIP = 1, 2


class FixedPaths(torch.nn.Module):
    """A controller that picks `prompt[l]` for prompt tokens and `gen[l]` for generated ones."""

    def __init__(self, prompt: list[int], gen: list[int]):
        super().__init__()
        self.prompt, self.gen = prompt, gen

    def forward(self, h, layer, beta, phase=None):
        n = h.shape[0]
        out = torch.full((n, 3), -50.0)
        gen = phase.long() if phase is not None else torch.zeros(n, dtype=torch.long)
        pick = torch.where(gen == 1, self.gen[layer], self.prompt[layer])
        out[torch.arange(n), pick] = 50.0
        return out


def assignments(L: int) -> dict[str, tuple[list[int], list[int]]]:
    """name -> (path per layer for prompt tokens, path per layer for generated tokens)."""
    i8 = [INT8] * L

    def skip(layers) -> list[int]:
        return [SKIP if li in layers else INT8 for li in range(L)]

    tenth = L // 3
    return {
        "fp16 everywhere": ([0] * L, [0] * L),
        "int8 everywhere": (i8, i8),
        "prompt: MLP skipped in every layer": (skip(range(L)), i8),
        "prompt: first third skipped": (skip(range(tenth)), i8),
        "prompt: middle third skipped": (skip(range(tenth, 2 * tenth)), i8),
        "prompt: last third skipped": (skip(range(L - tenth, L)), i8),
        "prompt: last 5 skipped": (skip(range(L - 5, L)), i8),
        "prompt: every other layer skipped": (skip(range(1, L, 2)), i8),
        "generated: last 5 skipped": (i8, skip(range(L - 5, L))),
        "generated: every other layer skipped": (i8, skip(range(1, L, 2))),
    }


def merge_z(hf, adapter: str) -> None:
    """Merge an adapter's spectral z into the base weights (the runtime's merge)."""
    ad = load_adapter(DEFAULT_ADAPTER_DIR if adapter == "default" else adapter)
    fp = fingerprint(hf)
    fn = make_weight_fn(ad.z, SvdCache(hf, fp, False, keep=z_support(ad.z)))
    with torch.no_grad():
        for li in range(len(hf.model.layers)):
            for t in ad.z:
                m = target_module(hf, li, t)
                m.weight.copy_(fn(li, t, m.weight.detach().float()).to(m.weight.dtype))


def requantize_q4(hf) -> None:
    """Every target weight -> its Q4_1 blocks, dequantized (what a 4-bit path would compute)."""
    with torch.no_grad():
        for li in range(len(hf.model.layers)):
            for t in TARGETS:
                m = target_module(hf, li, t)
                w = quantize_q4_1(m.weight.detach().float()).dequantize()
                m.weight.copy_(w.to(m.weight.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/cnndm/train.jsonl")
    ap.add_argument("--skip", type=int, default=1610)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--adapter", default="default", help="'default', a directory, or 'none'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--int4",
        action="store_true",
        help="also every unit on 4-bit weights: each weight (the z merged) requantized to Q4_1 "
        "(hest_core.gguf_blocks.quantize_q4_1), 16-bit activations",
    )
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok, hf = load_tokenizer("default", False), load_hf_model("default", False)
    if a.adapter != "none":
        merge_z(hf, a.adapter)
    tm = TrainModel(hf, torch.bfloat16)
    tm4 = None
    if a.int4:
        requantize_q4(hf)
        tm4 = TrainModel(hf, torch.bfloat16)
    pairs = load_pairs(a.data, a.skip + a.n)[a.skip :]
    exs = [tokenize(tok, p, 384, 64) for p in pairs]
    L = tm.spec.n_layers
    zero = torch.zeros(L, 3)
    rows = []
    t0 = time.perf_counter()
    runs = [(name, tm, pre, gen) for name, (pre, gen) in assignments(L).items()]
    if tm4 is not None:
        runs.append(("int4 everywhere (Q4_1 of the served weights)", tm4, [0] * L, [0] * L))
    for name, model, pre, gen in runs:
        ctl = FixedPaths(torch.tensor(pre), torch.tensor(gen))
        with torch.no_grad():
            ces = [
                float(
                    forward(
                        model,
                        ctl,
                        None,
                        ex.prompt,
                        ex.summary,
                        0.0,
                        1.0,
                        torch.zeros(3),
                        (zero, zero),
                        0.0,
                        None,
                    ).ce
                )
                for ex in exs
            ]
        rows.append({"assignment": name, "ce": sum(ces) / len(ces)})
        print(f"| {name} | {rows[-1]['ce']:.3f} |", flush=True)
    out = {
        "rows": rows,
        "n": len(exs),
        "data": a.data,
        "skip": a.skip,
        "adapter": a.adapter,
        "cpu": platform.processor() or platform.machine(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
