"""What each path costs in quality: teacher-forced cross-entropy of reference summaries when every
(layer, token) runs a fixed path assignment, on the differentiable twin of the runtime
(training/forward.py, hard gates: equal to `LeanModel.forward` path by path to 0.2%).

    python tools/path_probe.py [--n 12 --skip 1610 --adapter default --json docs/results/x.json]
    python tools/path_probe.py --int4 both --int4-only   # issue 13: the two ways z meets int4

Assignments: every unit fp16 / int8; the prompt tokens' MLP skipped in all layers, the first,
middle or last ten, the last five, every other layer (generated tokens on int8); the generated
tokens' MLP skipped in the last five or every other layer. By default rows 1610.. of
train.jsonl (the validation split; never the test file), the default adapter's spectral z merged
into the base (as the runtime serves it), articles cut to 384 tokens, references to 64.

`--int4` adds every unit on the opt-in int4 path (registered here; the twin's Q4_1 fake
quantisation, 16-bit activations), with the adapter's z either way the runtime can serve it
(hest_core/exec/int4.py): "merged" = W' = W + U diag(s z) V^T requantized to Q4_1; "lowrank" = the
base weight's Q4_1 blocks (the GGUF's own, for the default model) plus x V diag(s z) U^T beside.
`--int4-only` runs only those rows and fp16 (the reference).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from hest_core import paths as reg
from hest_core.adapter.artifact import DEFAULT_ADAPTER_DIR, load_adapter
from hest_core.adapter.spectral import SvdCache, merge_into, spectrum_sizes, z_support
from hest_core.exec.loading import fingerprint, load_hf_model, load_tokenizer
from training.data import load_pairs, tokenize
from training.forward import SpectralZ, TrainModel, forward

INT8, SKIP = 1, 2


class FixedPaths(torch.nn.Module):
    """A controller that picks `prompt[l]` for prompt tokens and `gen[l]` for generated ones."""

    def __init__(self, prompt: list[int], gen: list[int]):
        super().__init__()
        self.prompt, self.gen = prompt, gen

    def forward(self, h, layer, beta, phase=None):
        n = h.shape[0]
        out = torch.full((n, reg.n_paths()), -50.0)
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


def adapter_z(adapter: str) -> dict[str, torch.Tensor]:
    """An adapter's spectral z: target -> (L, r)."""
    return load_adapter(DEFAULT_ADAPTER_DIR if adapter == "default" else adapter).z


def zmod_of(hf, z: dict[str, torch.Tensor]) -> SpectralZ:
    """The twin's z module over the unmerged base `hf`, holding z (its support's directions)."""
    r = z_support(z)
    svd = SvdCache(hf, fingerprint(hf), False, keep=r)
    zm = SpectralZ(svd, len(hf.model.layers), spectrum_sizes(hf), r, torch.bfloat16)
    with torch.no_grad():
        for t, p in zm.z.items():
            p.copy_(z[t][:, : p.shape[1]])
    return zm


def merge_z(hf, adapter: str) -> None:
    """Merge an adapter's spectral z into the base weights (the runtime's merge)."""
    ad = load_adapter(DEFAULT_ADAPTER_DIR if adapter == "default" else adapter)
    merge_into(hf, ad.z, SvdCache(hf, fingerprint(hf), False, keep=z_support(ad.z)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/cnndm/train.jsonl")
    ap.add_argument("--skip", type=int, default=1610)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--adapter", default="default", help="'default', a directory, or 'none'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--int4",
        choices=["merged", "lowrank", "both"],
        default=None,
        help="also every unit on int4 (Q4_1 weights, 16-bit activations), the adapter's z "
        "merged and requantized, or beside the base blocks as a low-rank term (see above)",
    )
    ap.add_argument("--int4-only", action="store_true", help="only fp16 and the int4 rows")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok, hf = load_tokenizer("default", False), load_hf_model("default", False)
    if a.int4:
        reg.enable((*reg.BUILTIN_NAMES, "int4"))  # the twins below get Q4_1 copies
    z = adapter_z(a.adapter) if a.adapter != "none" else None
    tm_low = zm = None
    if a.int4 in ("lowrank", "both"):
        tm_low = TrainModel(hf, torch.bfloat16)  # base weights: their Q4_1 = the GGUF blocks
        zm = zmod_of(hf, z) if z is not None else None
    if a.adapter != "none":
        merge_z(hf, a.adapter)
    tm = TrainModel(hf, torch.bfloat16)  # merged W'; its int4 copy is Q4_1(W'): "merged"
    pairs = load_pairs(a.data, a.skip + a.n)[a.skip :]
    exs = [tokenize(tok, p, 384, 64) for p in pairs]
    L, P = tm.spec.n_layers, reg.n_paths()
    zero = torch.zeros(L, P)
    rows = []
    t0 = time.perf_counter()
    runs = [(name, tm, None, pre, gen) for name, (pre, gen) in assignments(L).items()]
    if a.int4_only:
        runs = runs[:1]
    i4 = [reg.find("int4")] * L
    if a.int4 in ("merged", "both"):
        runs.append(("int4 everywhere, z merged, requantized to Q4_1", tm, None, i4, i4))
    if tm_low is not None:
        runs.append(("int4 everywhere, base Q4_1 + z low-rank beside", tm_low, zm, i4, i4))
    for name, model, zmod, pre, gen in runs:
        ctl = FixedPaths(torch.tensor(pre), torch.tensor(gen))
        with torch.no_grad():
            ces = [
                float(
                    forward(
                        model,
                        ctl,
                        zmod,
                        ex.prompt,
                        ex.summary,
                        0.0,
                        1.0,
                        torch.zeros(P),
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
        "int4": a.int4,
        "cpu": platform.processor() or platform.machine(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
