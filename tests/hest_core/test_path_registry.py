"""The path registry (hest_core/paths.py, issue 12 item 2): the built-ins' arithmetic, and a dummy
4th path registered only inside a test ("int8-copy": runs as int8, at its own cost) going through
calibration, generation on the PyTorch loop, the guard, artifacts and the server's response,
while the fused C layer refuses its code loudly."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from hest_core import Engine, GenerationRequest
from hest_core import paths as reg
from hest_core.adapter.artifact import HestAdapter, load_adapter
from hest_core.adapter.controller import NEG_LOGIT
from hest_core.adapter.spectral import spectrum_sizes
from hest_core.energy.calibrate import calibrate
from hest_core.energy.meters import EstimateMeter
from hest_core.energy.model import PJ, CalibrationTable
from hest_core.errors import NativeArgumentError
from hest_core.exec import native
from hest_core.exec.kvcache import SeqSlot
from hest_core.exec.loading import build_lean, fingerprint, load_hf_model
from hest_core.exec.routing import const_decider
from hest_core.runtime.guard import demote
from server import Settings, create_app

COPY = dict(quality=1, proj="int8", mlp="int8", native_code=None, prior=0.0)
ARTICLE = "The council voted on Tuesday to expand the bus network after a year of delays. " * 4


def test_builtin_registry_is_the_three_paths():
    assert reg.names() == ("fp16", "int8", "skip") == reg.BUILTIN_NAMES
    assert (reg.FP16, reg.INT8, reg.SKIP) == (0, 1, 2) and reg.ref() == reg.FP16
    assert reg.with_proj("dense16") == [0] and reg.with_proj("int8") == [1, 2]
    assert reg.with_mlp(None) == [2] == [reg.lightest()]
    assert reg.cost([2, 3, 4], [10, 5, 1]) == 2 * 10 + 3 * 5 + 4
    # the guard's order before the registry: 1st->2nd, 2nd->3rd, 1st->3rd of the device's costs
    assert list(reg.demotion_steps([10, 5, 1])) == [(0, 1), (1, 2), (0, 2)]
    assert list(reg.demotion_steps([3, 9, 1])) == [(1, 0), (0, 2), (1, 2)]  # int8 dearest (GPU)
    assert reg.best_within([3, 9, 1]) == (0, 0, 2)  # int8 dearer than fp16: run fp16
    with pytest.raises(ValueError):
        reg.unregister("skip")


def test_demote_moves_smallest_margins_first():
    paths = torch.tensor([0, 0, 0])
    logits = torch.tensor([[1.0, 0.9, 0.0], [1.0, 0.0, 0.0], [1.0, 0.5, 0.0]])
    new, counts = demote(paths, logits, [3, 0, 0], (10, 5, 1), 26)
    assert counts == [2, 1, 0] and new.tolist() == [1, 0, 0]


@pytest.fixture(scope="module")
def copy_path():
    with reg.registered("int8-copy", **COPY) as p:
        yield p
    assert reg.names() == reg.BUILTIN_NAMES


@pytest.fixture(scope="module")
def table_file(copy_path, tmp_path_factory):
    """The tiny model calibrated with the 4th path measured, then its cost set apart from int8's
    (half the dearer-quality paths' least, so no better path substitutes for it), so what a
    request is charged shows which of the two it ran."""
    import hest_core.energy.calib_measure as cal

    hf = load_hf_model("tiny:llama")
    lean = build_lean(hf, torch.bfloat16, torch.device("cpu"), 512)
    old = cal.WINDOW_SCALE
    cal.WINDOW_SCALE = 0.05
    try:
        table = calibrate(lean, fingerprint(hf), EstimateMeter(30), False, 1, 1, rows=(1,))
    finally:
        cal.WINDOW_SCALE = old
    i, c = reg.INT8, copy_path.index
    for ph in (table.prefill, table.decode):
        assert all(len(r) == reg.n_paths() == 4 and r[c] > 0 for r in ph.unit)
        for r in ph.unit:
            r[c] = min(r[reg.FP16], r[i]) / 2
    path = tmp_path_factory.mktemp("calib") / "tiny-4-paths.json"
    table.save(path)
    assert CalibrationTable.load(path).decode.unit[0][c] == table.decode.unit[0][c]
    return path


def _engine(table_file, policy: str, adapter=None) -> Engine:
    return Engine.from_pretrained(
        "tiny:llama", adapter=adapter, policy=policy, calibration=table_file, progress=False
    )


def test_dummy_path_generates_like_int8_at_its_own_cost(copy_path, table_file):
    c = copy_path.index
    req = GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=8, clean_end=False)
    base = _engine(table_file, "int8")
    assert not base.lean.fused.usable(torch.zeros(1, dtype=torch.long), base.lean.new_cache(1, 4))
    want = base.generate([req])[0]
    hest = _engine(table_file, "hest")
    with torch.no_grad():  # the untrained controller, biased to the 4th path
        hest.controller.hest_a0.copy_(torch.tensor(reg.one_hot(c), dtype=torch.float32) * 10)
    for fixed in (_engine(table_file, "int8-copy"), hest):
        got = fixed.generate([req])[0]
        assert got.text == want.text
        n = sum(got.stats.paths.values())
        assert got.stats.paths == {"fp16": 0, "int8": 0, "skip": 0, "int8-copy": n}
        assert got.stats.paths_per_layer[0]["int8-copy"] == n // hest.lean.spec.n_layers
        # same tokens, same fixed work: the joules differ by exactly the unit costs' difference
        em, L, p = hest.energy, hest.lean.spec.n_layers, got.stats.prompt_tokens
        steps = n // L - p
        d = {ph: em.unit_sum_q[ph][c] - em.unit_sum_q[ph][reg.INT8] for ph in ("prefill", "decode")}
        diff = p * d["prefill"] + steps * d["decode"]
        assert round((got.stats.modelled_j - want.stats.modelled_j) * PJ) == diff < 0
    # with it, in batches past one row, the guard demotes along the device's cost order
    tight = GenerationRequest(ARTICLE, energy_budget_ratio=0.7, max_new_tokens=8)
    r = hest.generate([tight, req])[0]
    assert r.stats.modelled_j <= r.stats.budget_j


def test_fused_layer_refuses_a_path_code_it_does_not_know(copy_path):
    if native.get() is None:
        pytest.skip("native kernels not built here")
    lean = build_lean(load_hf_model("tiny:llama"), torch.bfloat16, torch.device("cpu"), 64)
    d = lean.spec.hidden
    x, h = torch.randn(1, d).bfloat16(), torch.randn(1, d).bfloat16()
    cache = lean.new_cache(1, 16)
    with pytest.raises(NativeArgumentError, match="path code"):
        lean.fused.forward(
            x, h, torch.tensor([3]), [SeqSlot(0, 1, 0, 3)], cache, const_decider(copy_path.index)
        )


def test_three_path_artifact_loads_under_four(copy_path, table_file, tmp_path):
    base = _engine(table_file, "int8")
    reg.unregister(copy_path.name)  # save as a 3-path artifact
    try:
        hf = load_hf_model("tiny:llama")
        art = HestAdapter.untrained(base.lean.spec, fingerprint(hf), spectrum_sizes(hf))
        art.save(tmp_path / "a3")
        assert "paths" not in (tmp_path / "a3" / "adapter_config.json").read_text()
    finally:
        reg.register(copy_path.name, **COPY)
    loaded = load_adapter(tmp_path / "a3")
    a0 = loaded.controller.hest_a0.detach()
    assert a0.tolist() == [1.0, 0.0, 0.0, NEG_LOGIT]  # the unknown path is never chosen
    assert loaded.controller.hest_a.shape[0] == 4 and loaded.config.paths[-1] == "int8-copy"


def test_server_lists_the_dummy_path(copy_path, table_file):
    engine = _engine(table_file, "int8-copy")

    async def go():
        app = create_app(Settings(warmup=False, max_wait_ms=5.0), engine=engine)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                body = {"text": ARTICLE, "energy_budget_ratio": 1.0, "max_new_tokens": 4}
                r = await client.post("/v1/summarize", json=body)
                m = await client.get("/metrics")
        return r, m

    r, m = asyncio.run(go())
    assert r.status_code == 200, r.text
    paths = r.json()["paths"]
    assert set(paths) == {"fp16", "int8", "skip", "int8-copy"} and paths["int8-copy"] > 0
    assert paths["fp16"] == paths["int8"] == paths["skip"] == 0
    assert 'hest_units_total{path="int8-copy"}' in m.text
