"""An adapter's path list drives the registry (engine.py `_adapter_paths`): an engine registers
the opt-in paths its adapter was trained with (the shipped default adapter lists int4), whatever
path set HEST_PATHS asks for, and on a host with no table for that path set the first start
measures every registered path. The registry is taken back after each test (tests/conftest.py)."""

from __future__ import annotations

import functools
import json
import logging

import pytest

from hest_core import Engine
from hest_core import paths as reg
from hest_core.adapter.artifact import DEFAULT_ADAPTER_DIR, HestAdapter, load_adapter
from hest_core.adapter.spectral import spectrum_sizes
from hest_core.config import RuntimeConfig
from hest_core.energy import calib_check, calib_measure, calibrate
from hest_core.energy.model import CalibrationTable
from hest_core.exec.loading import DEFAULT_MODEL, fingerprint, load_hf_model, spec_of

FOUR = ("fp16", "int8", "int4", "skip")
ARTICLE = "The council voted on Tuesday to expand the bus network after a year of delays. " * 4


@pytest.fixture(scope="module")
def four_path_adapter(tmp_path_factory):
    """An untrained tiny:llama adapter saved with the four paths (what `--paths` training
    writes), saved and then the registry put back to the built-in three."""
    hf = load_hf_model("tiny:llama", progress=False)
    out = tmp_path_factory.mktemp("adapter4") / "a"
    with reg.restored():
        reg.enable(FOUR)
        HestAdapter.untrained(spec_of(hf), fingerprint(hf), spectrum_sizes(hf), k=8).save(out)
    assert reg.names() == reg.BUILTIN_NAMES
    assert json.loads((out / "adapter_config.json").read_text())["paths"] == list(reg.names()) + [
        "int4"
    ]
    return out


def test_shipped_default_adapter_paths_are_registrable():
    """Whatever path set the shipped adapter lists, every path is one the registry knows, the
    built-ins are among them, the engine registers the optional ones, and it loads under them."""
    listed = json.loads((DEFAULT_ADAPTER_DIR / "adapter_config.json").read_text()).get(
        "paths", list(reg.BUILTIN_NAMES)
    )
    assert reg.check_names(listed)  # raises ValueError for an unknown or incomplete set
    optional = [p for p in listed if p not in reg.BUILTIN_NAMES]
    assert Engine._adapter_paths("default", DEFAULT_MODEL) == optional
    reg.enable(listed)
    ad = load_adapter(DEFAULT_ADAPTER_DIR)
    assert sorted(ad.config.paths) == sorted(listed)
    assert ad.controller.hest_a.shape[0] == reg.n_paths() == len(listed)


@pytest.mark.parametrize("how", ["HEST_PATHS", "paths="])
def test_a_path_set_without_int4_still_registers_the_adapters_paths(
    four_path_adapter, monkeypatch, caplog, how
):
    """The contract (docs/runtime.md, "The int4 path"): the adapter's paths are registered
    beside an explicit three-path set, with a log line that says so; the engine serves int4."""
    three = "fp16,int8,skip"
    kw = {}
    if how == "HEST_PATHS":
        monkeypatch.setenv("HEST_PATHS", three)
    else:
        kw["paths"] = three.split(",")
    with caplog.at_level(logging.INFO, logger="hest.engine"):
        eng = Engine.from_pretrained("tiny:llama", adapter=four_path_adapter, progress=False, **kw)
    assert "int4" in eng.info()["paths"] and reg.find("int4") is not None
    assert any(
        "trained with int4: registering it" in r.getMessage() and three in r.getMessage()
        for r in caplog.records
    ), caplog.text
    assert len(eng.energy.unit["decode"][0]) == 4  # the four-column test table
    res = eng.summarize([ARTICLE], energy_budget_ratio=1.0, max_new_tokens=4)[0]
    assert set(res.stats.paths) == set(FOUR)


def test_first_start_without_a_table_calibrates_the_adapters_paths(
    four_path_adapter, tmp_path, monkeypatch
):
    """A host with no table for this path set (no HEST_CALIBRATION, nothing cached or packaged,
    e.g. an AMD machine) measures at first start: the adapter registers int4 before the model is
    built and calibrated, so the table has an int4 column, and a settled one is cached under the
    four-path name."""
    monkeypatch.delenv("HEST_CALIBRATION", raising=False)
    monkeypatch.setattr(calibrate, "PACKAGED", tmp_path / "packaged")  # none packaged
    monkeypatch.setattr(calib_check, "REPEATS", 2)  # bounded time on a busy machine
    monkeypatch.setattr(calib_check, "MAX_REPEATS", 2)
    monkeypatch.setattr(calib_measure, "WINDOW_SCALE", 0.2)
    batch1 = functools.partial(calibrate.calibrate, rows=(1,))  # no batched-decode rows: faster
    monkeypatch.setattr(calibrate, "calibrate", batch1)
    cfg = RuntimeConfig.from_env(cache_dir=tmp_path / "cache", calibration=None)
    eng = Engine.from_pretrained(
        "tiny:llama", adapter=four_path_adapter, config=cfg, progress=False
    )
    assert reg.names()[-1] == "int4"
    cached = list((tmp_path / "cache" / "calibration").glob("*.json"))
    src = eng.info()["calibration"]["source"]
    for ph in ("prefill", "decode"):
        unit = eng.energy.unit[ph]
        assert all(len(r) == 4 and r[reg.index("int4")] > 0 for r in unit), (ph, unit[0])
    if cached:  # the repeats settled: cached under the four-path name, and it is the one used
        assert [p.name for p in cached] == [p.name for p in cached if p.stem.endswith("-int4")]
        assert src == str(cached[0])
        assert len(CalibrationTable.load(cached[0]).decode.unit[0]) == 4
    else:
        assert "not cached" in src


def test_a_server_loading_the_adapter_lists_its_paths_before_any_request(four_path_adapter):
    """The server's metrics registry is made before the engine loads (and registers int4): the
    loaded engine's paths still get their zeroed series, and /v1/info and a response list them."""
    import asyncio

    import httpx

    from server import Settings, create_app

    settings = Settings(model="tiny:llama", adapter=str(four_path_adapter), warmup=False)

    async def go():
        app = create_app(settings, background_load=False)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                m = (await client.get("/metrics")).text
                info = (await client.get("/v1/info")).json()
                body = {"text": ARTICLE, "energy_budget_ratio": 1.0, "max_new_tokens": 4}
                r = await client.post("/v1/summarize", json=body)
        return m, info, r

    m, info, r = asyncio.run(go())
    assert 'hest_units_total{path="int4"} 0.0' in m, m
    assert 'hest_layer_units_total{layer="0",path="int4"} 0.0' in m
    assert "int4" in str(info)
    assert r.status_code == 200, r.text
    assert set(r.json()["paths"]) == set(FOUR)
