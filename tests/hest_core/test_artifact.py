"""Adapter artifacts: round-trip, mismatch errors, z=0 == base model, parameter counts."""

from __future__ import annotations

import json

import pytest
import torch

from hest_core import (
    AdapterMismatchError,
    Controller,
    Engine,
    GenerationRequest,
    HestAdapter,
    HestError,
    load_adapter,
)
from hest_core.adapter.spectral import SvdCache, spectrum_sizes
from hest_core.exec.loading import fingerprint, load_hf_model, spec_of
from hest_core.exec.weights import merge_delta


@pytest.fixture(scope="module")
def tiny_hf():
    return load_hf_model("tiny:llama")


def _adapter(hf, seed=0) -> HestAdapter:
    ad = HestAdapter.untrained(spec_of(hf), fingerprint(hf), spectrum_sizes(hf), k=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.controller.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    for z in ad.z.values():
        z.copy_(torch.randn(z.shape, generator=g) * 0.05)
    return ad


def test_round_trip(tmp_path, tiny_hf):
    ad = _adapter(tiny_hf)
    ad.save(tmp_path / "a")
    back = load_adapter(tmp_path / "a")
    assert back.config == ad.config
    for (n1, p1), (n2, p2) in zip(
        ad.controller.named_parameters(), back.controller.named_parameters(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2)
    for t in ad.z:
        assert torch.equal(ad.z[t], back.z[t])
    names = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert names["version"] == 1 and names["base_model_fingerprint"] == fingerprint(tiny_hf)


def test_other_base_model_is_refused(tmp_path, tiny_hf):
    _adapter(tiny_hf).save(tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        Engine.from_pretrained("tiny:qwen2", adapter=tmp_path / "a", progress=False)


def test_not_an_adapter_dir(tmp_path):
    with pytest.raises(AdapterMismatchError, match="adapter_config.json"):
        Engine.from_pretrained("tiny:llama", adapter=tmp_path, progress=False)


def test_trained_adapter_loads_and_changes_weights(tmp_path, tiny_hf):
    ad = _adapter(tiny_hf, seed=3)
    ad.save(tmp_path / "a")
    eng = Engine.from_pretrained("tiny:llama", adapter=tmp_path / "a", progress=False)
    base = Engine.from_pretrained("tiny:llama", adapter=None, progress=False)
    assert not torch.equal(eng.lean.layers[0].wqkv, base.lean.layers[0].wqkv)
    # the merged weight is W + U diag(s z) V^T
    u, s, vh = SvdCache(tiny_hf, fingerprint(tiny_hf), progress=False).factors(0, "down_proj")
    w = tiny_hf.model.layers[0].mlp.down_proj.weight.float()
    want = (w + merge_delta(u, s, vh, ad.z["down_proj"][0])).bfloat16()
    torch.testing.assert_close(eng.lean.layers[0].wdown, want)
    res = eng.generate(
        [
            GenerationRequest(
                "A short article about a bus network.", energy_budget_ratio=1.0, max_new_tokens=4
            )
        ]
    )[0]
    assert res.stats.modelled_j <= res.stats.budget_j


def test_controller_parameter_count():
    for d, L, k in [(576, 30, 32), (64, 3, 8), (4096, 32, 32)]:
        c = Controller(d, L, k)
        n = sum(p.numel() for p in c.parameters())
        assert n == d * k + L * k + k + 3 * k + 3 == Controller.n_params(d, L, k)


def test_controller_size_independent_of_sequence_length():
    c = Controller(64, 3, 8)
    n = sum(p.numel() for p in c.parameters())
    for t in (1, 17, 4000):
        out = c(torch.randn(t, 64), 1, torch.zeros(t))
        assert out.shape == (t, 3)
    assert sum(p.numel() for p in c.parameters()) == n


def test_zero_adapter_reproduces_base_model_exactly(tmp_path):
    """On the real default model: an untrained adapter (z = 0, controller always fp16) gives
    the base model's output token for token."""
    hf = load_hf_model("default", progress=False)
    HestAdapter.untrained(spec_of(hf), fingerprint(hf), spectrum_sizes(hf)).save(tmp_path / "zero")
    del hf
    eng = Engine.from_pretrained("default", adapter=tmp_path / "zero", progress=False)
    base = Engine.from_pretrained("default", adapter=None, policy="fp16", progress=False)
    text = (
        "The city council voted on Tuesday to expand the bus network after a year of record "
        "ridership. Officials said new routes would open in the spring and fares would stay flat."
    )
    a = eng.generate([GenerationRequest(text, energy_budget_ratio=1.0, max_new_tokens=24)])[0]
    b = base.generate([GenerationRequest(text, energy_budget_ratio=1.0, max_new_tokens=24)])[0]
    assert a.text == b.text and a.stats.completion_tokens == b.stats.completion_tokens
    assert a.stats.paths["int8"] == a.stats.paths["skip"] == 0


@pytest.mark.parametrize("name", ["read_ratio", "plan_ratio", "plan_from"])
def test_the_adapters_ratios_travel_with_it(tmp_path, tiny_hf, name):
    """An adapter's read_ratio (runtime/reading.py) and plan_ratio (the controller's budget
    plan, runtime/tickets.py) are saved, loaded and served by a HEST engine; artifacts without
    them use the whole budget; values outside (0, 1] are refused."""
    ad = _adapter(tiny_hf)
    assert getattr(ad.config, name) is None
    setattr(ad.config, name, 0.35)
    ad.save(tmp_path / "a")
    assert getattr(load_adapter(tmp_path / "a").config, name) == 0.35
    e = Engine.from_pretrained("tiny:llama", adapter=tmp_path / "a", progress=False)
    assert getattr(e, name) == 0.35 and e.info()[name] == 0.35
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    del raw[name]  # an artifact from before the field
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
    assert getattr(load_adapter(tmp_path / "a").config, name) is None
    for bad in (0, 1.5, "0.4", True):
        raw[name] = bad
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
        with pytest.raises(HestError, match=name):
            load_adapter(tmp_path / "a")


def test_the_adapters_plan_slope_travels_with_it(tmp_path, tiny_hf):
    """plan_slope (reading.plan_budget_q) is saved, loaded, served by a HEST engine and shown
    in its info; artifacts without it plan with the budget below the start; a value that is not
    a finite number > 0 is refused naming the field."""
    ad = _adapter(tiny_hf)
    assert ad.config.plan_slope is None
    ad.config.plan_slope = 4.0
    ad.save(tmp_path / "a")
    assert load_adapter(tmp_path / "a").config.plan_slope == 4.0
    e = Engine.from_pretrained("tiny:llama", adapter=tmp_path / "a", progress=False)
    assert e.plan_slope == 4.0 and e.info()["plan_slope"] == 4.0
    fixed = Engine.from_pretrained(
        "tiny:llama", adapter=tmp_path / "a", policy="fp16", progress=False
    )
    assert fixed.plan_slope is None and fixed.info()["plan_slope"] is None
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    del raw["plan_slope"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
    assert load_adapter(tmp_path / "a").config.plan_slope is None
    for bad in (0, -1.0, "4", True, float("nan"), float("inf")):
        raw["plan_slope"] = bad
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
        with pytest.raises(HestError, match="plan_slope"):
            load_adapter(tmp_path / "a")
