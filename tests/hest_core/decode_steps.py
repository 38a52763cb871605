"""Shared by test_fused.py and test_int4.py: teacher-forced decode steps of several rows, on the
fused layer or the PyTorch loop, and the check that the two agree."""

from __future__ import annotations

import torch

from hest_core import paths as reg
from hest_core.exec.kvcache import SeqSlot
from hest_core.exec.routing import const_decider


def row_decider(paths: list[int]):
    """Each row of a step on its own path (path indices, one per row)."""
    p = torch.tensor(paths)

    def decide(li, h):
        q = p[: h.shape[0]]
        return q, torch.bincount(q, minlength=reg.n_paths()).tolist()

    return decide


def prompts_for(rows: int) -> list[list[int]]:
    """`rows` prompts of different lengths (so the rows sit at different positions)."""
    return [list(range(5 + 7 * i, 9 + 7 * i + (5 * i) % 23)) for i in range(rows)]


def decode(lean, prompts: list[list[int]], steps: int, decide, fused: bool) -> torch.Tensor:
    """Prefill each prompt alone (fp16), then `steps` teacher-forced decode steps of all rows
    together on `decide`'s paths; returns the decode logits (steps, rows, vocab) fp32."""
    lean.fused.enabled = fused
    b = len(prompts)
    cache = lean.new_cache(b, max(map(len, prompts)) + steps)
    out = []
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            one = lean.new_cache(1, cache.max_len)
            lean.forward(
                torch.tensor(p),
                torch.arange(len(p)),
                [SeqSlot(0, len(p), 0, 0)],
                one,
                const_decider(reg.FP16),
                False,
            )
            for li in range(lean.spec.n_layers):
                cache.k[li][i] = one.k[li][0]
                cache.v[li][i] = one.v[li][0]
        for t in range(steps):
            pos = [len(p) + t for p in prompts]
            ids = torch.tensor([(7 * i + 3 * t + 11) % 500 for i in range(b)])
            slots = [SeqSlot(i, 1, i, pos[i]) for i in range(b)]
            assert lean.fused.usable(ids, cache) == fused
            out.append(lean.forward(ids, torch.tensor(pos), slots, cache, decide, True))
    lean.fused.enabled = True
    return torch.stack(out)


def assert_agree(a: torch.Tensor, b: torch.Tensor, what) -> None:
    """Fused and PyTorch-loop logits agree to bf16 rounding noise (the existing tolerances)."""
    assert torch.isfinite(a).all(), what
    cos = torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1))
    assert (cos > 0.9995).all(), (what, float(cos.min()))
    assert (a - b).abs().max() < 0.05 * b.abs().max(), (what, float((a - b).abs().max()))
