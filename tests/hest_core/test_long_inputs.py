"""Chunked prefill (issue 16): a long prompt runs in chunks that attend to the cache before them
and causally within themselves, and gives what one whole-prompt forward gives."""

from __future__ import annotations

import pytest
import torch

from hest_core import Engine, GenerationRequest
from hest_core.exec.kvcache import SeqSlot
from hest_core.exec.loading import build_lean, load_hf_model
from hest_core.exec.routing import const_decider
from hest_core.paths import FP16, INT8
from hest_core.runtime import generation


@pytest.mark.parametrize("path", [FP16, INT8])
@pytest.mark.parametrize("cuts", [[300], [128, 172], [1, 99, 200], [150, 150]])
def test_chunks_equal_one_forward(path, cuts):
    torch.manual_seed(0)
    lean = build_lean(load_hf_model("tiny:llama"), torch.float32, torch.device("cpu"), 512)
    ids = torch.randint(0, 49152, (300,))
    whole = lean.new_cache(1, 301)
    with torch.inference_mode():
        ref = lean.forward(
            ids,
            torch.arange(300),
            [SeqSlot(0, 300, 0, 0)],
            whole,
            const_decider(path),
            False,
            torch.tensor([299]),
        )
        cache, p0 = lean.new_cache(1, 301), 0
        for n in cuts:
            out = lean.forward(
                ids[p0 : p0 + n],
                torch.arange(p0, p0 + n),
                [SeqSlot(0, n, 0, p0)],
                cache,
                const_decider(path),
                False,
                torch.tensor([n - 1]),
            )
            p0 += n
    assert torch.allclose(out, ref, atol=2e-4, rtol=1e-4), (out - ref).abs().max()
    for a, b in zip(cache.k, whole.k, strict=True):
        assert torch.allclose(a[:, :, :300], b[:, :, :300], atol=2e-4, rtol=1e-4)


def test_generation_is_the_same_whatever_the_chunk(monkeypatch):
    """A 1,400-token prompt in one round and in eleven rounds of 128: same text, same energy."""
    engine = Engine.from_pretrained("tiny:llama", adapter=None, dtype="fp32", progress=False)
    text = "The council met again to discuss the bus network and its many new routes. " * 90
    reqs = [GenerationRequest(text, energy_budget_ratio=1.0, max_new_tokens=6, clean_end=False)]
    reqs.append(GenerationRequest("A short one about the museum.", max_new_tokens=6))
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 4096)
    one = engine.generate(reqs)
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 128)
    many = engine.generate(reqs)
    assert one[0].stats.prompt_tokens > 1300
    for a, b in zip(one, many, strict=True):
        assert a.text == b.text
        assert a.stats.modelled_j == pytest.approx(b.stats.modelled_j, rel=1e-12)
