"""The opt-in int4 path (issue 13): configuration, Q4_1 weights, execution on the PyTorch loop,
calibration and the budget invariant with four paths. The path is registered only inside this
module (`int4` fixture), so every other test keeps the built-in three."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hest_core.energy.calibrate as cal
from hest_core import Engine, GenerationRequest
from hest_core import paths as reg
from hest_core.config import ConfigError, RuntimeConfig
from hest_core.energy.meters import EstimateMeter
from hest_core.errors import CalibrationError
from hest_core.exec import native, q4
from hest_core.exec.gguf_blocks import quantize_q4_1
from hest_core.exec.int4 import LowRank, attach
from hest_core.exec.kvcache import SeqSlot
from hest_core.exec.loading import build_lean, fingerprint, load_hf_model
from hest_core.exec.routing import Routing, const_decider
from tests.hest_core.decode_steps import assert_agree, decode, prompts_for, row_decider

FOUR = ("fp16", "int8", "int4", "skip")
ARTICLE = "The council voted on Tuesday to expand the bus network after a year of delays. " * 4


def test_paths_config_is_validated():
    assert RuntimeConfig().paths == reg.BUILTIN_NAMES  # int4 is opt-in
    cfg = RuntimeConfig.from_env({"HEST_PATHS": "fp16, INT8,int4,skip"})
    assert cfg.paths == ("fp16", "int8", "skip", "int4")  # registry order
    for bad in ("fp16,int8", "fp16,int8,skip,int3", "fp16,int8,skip,int4,int4"):
        with pytest.raises(ConfigError, match="HEST_PATHS"):
            RuntimeConfig.from_env({"HEST_PATHS": bad})
    assert "int4" not in reg.names()


@pytest.fixture(scope="module")
def int4():
    with reg.registered("int4", **reg.OPTIONAL["int4"]) as p:
        yield p
    assert reg.names() == reg.BUILTIN_NAMES


@pytest.fixture(scope="module")
def hf():
    return load_hf_model("tiny:llama", progress=False)


@pytest.fixture(scope="module")
def lean4(int4, hf):
    lean = build_lean(hf, torch.bfloat16, torch.device("cpu"), 512)
    attach(lean, hf)
    return lean


def _engine(tables, policy: str, **kw) -> Engine:
    return Engine.from_pretrained(
        "tiny:llama",
        adapter=None,
        policy=policy,
        calibration=tables,
        progress=False,
        paths=FOUR,
        **kw,
    )


def test_tables_by_path_set_and_a_three_column_one_is_refused(int4, hf, tmp_path):
    """A directory of tables holds one per path set (`<fingerprint>-int4.json` beside
    `<fingerprint>.json`, tests/conftest.py): the four-path engine takes the four-column one;
    given only the three-column table it refuses it."""
    fp = fingerprint(hf)
    e = Engine.from_pretrained("tiny:llama", adapter=None, progress=False, paths=FOUR)
    assert e.info()["calibration"]["source"].endswith(f"{fp}-int4.json")
    (tmp_path / f"{fp}.json").write_text(
        (Path(os.environ["HEST_CALIBRATION"]) / f"{fp}.json").read_text()
    )
    with pytest.raises(CalibrationError, match="recalibrate"):
        Engine.from_pretrained(
            "tiny:llama", adapter=None, progress=False, paths=FOUR, calibration=tmp_path
        )


def test_int4_linear_matches_its_dequantized_weights(hf, lean4):
    """Kernel rows (1..16, int16 activations) and the bf16 fallback (more rows) against the
    fp32 product of the exact Q4_1 weights: within bf16 output rounding plus the activation step."""
    m4 = lean4.layers[0].gu4
    mlp = hf.model.layers[0].mlp
    w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()  # fp32, as loaded
    assert torch.equal(m4.w.dequantized(), quantize_q4_1(w).dequantize())
    g = torch.Generator().manual_seed(0)
    for m in (1, 4, 16, 40):
        x = torch.randn(m, m4.w.k, generator=g).bfloat16()
        got, want = m4(x).float(), m4.reference(x)
        err = (got - want).abs().max() / want.abs().max()
        assert err < 1e-2, (m, float(err))
    if q4.get() is None:
        pytest.skip(f"q4 kernel off here ({q4.status()}): only the fallback was checked")


def _decode_logits(lean, path: int, ids: torch.Tensor) -> torch.Tensor:
    """Prefill `ids` then one decode step, every unit on `path`: (1, vocab) fp32."""
    n = ids.shape[0]
    cache = lean.new_cache(1, n + 1)
    dec = const_decider(path)
    with torch.inference_mode():
        lean.forward(ids, torch.arange(n), [SeqSlot(0, n, 0, 0)], cache, dec, False)
        nxt = torch.tensor([5])
        return lean.forward(nxt, torch.tensor([n]), [SeqSlot(0, 1, 0, n)], cache, dec, True)


def test_int4_decode_equals_a_dequantized_bf16_model(int4, hf, lean4):
    """The int4 path against the fp16 path of a model whose weights are the Q4_1 values."""
    ref = build_lean(
        hf,
        torch.bfloat16,
        torch.device("cpu"),
        512,
        weight_fn=lambda li, t, w: quantize_q4_1(w).dequantize(),
    )
    ids = torch.tensor([1, 17, 99, 512, 7, 3000, 42, 8])
    got = _decode_logits(lean4, int4.index, ids)
    want = _decode_logits(ref, reg.FP16, ids)
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert got.argmax() == want.argmax()


def test_mixed_rows_equal_each_row_on_its_own_path(int4, lean4):
    lw = lean4.layers[1]
    h = torch.randn(8, lean4.spec.hidden).bfloat16()
    paths = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    counts = [int((paths == p).sum()) for p in range(4)]
    r = Routing.of(paths, counts)
    mixed = lean4._mlp(h, r, lw), lean4._proj(h, r, lw, "qkv")
    for i, p in enumerate(paths.tolist()):
        one = Routing.of(paths[i : i + 1], reg.one_hot(p))
        y = lean4._mlp(h[i : i + 1], one, lw)
        y = torch.zeros_like(h[:1]) if y is None else y
        assert torch.allclose(mixed[0][i : i + 1].float(), y.float(), atol=2e-2), p
        qkv = lean4._proj(h[i : i + 1], one, lw, "qkv")
        assert torch.allclose(mixed[1][i : i + 1].float(), qkv.float(), atol=2e-2), p


def test_generation_on_int4_and_on_mixed_paths(int4, int4_tables):
    req = GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=8, clean_end=False)
    e = _engine(int4_tables, "int4")
    assert e.info()["paths"] == list(FOUR[:2]) + ["skip", "int4"]
    assert "quantized at load" in e.info()["int4"]["weights"]
    usable = e.lean.fused.usable(torch.zeros(1, dtype=torch.long), e.lean.new_cache(1, 4))
    assert usable == (native.get() is not None)  # int4 runs in the fused layer too
    r = e.generate([req])[0]
    n = sum(r.stats.paths.values())
    assert r.text and r.stats.paths["int4"] == n > 0
    assert r.stats.modelled_j <= r.stats.budget_j
    hest = _engine(int4_tables, "hest")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random controller weights: a mix of paths per token and layer
        for p in hest.controller.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)
        hest.controller.hest_a0[int4.index] += 12.0  # int4 the likeliest
    tight = GenerationRequest(ARTICLE, energy_budget_ratio=0.7, max_new_tokens=8)
    used = {}
    for got in hest.generate([req, tight]):
        # 8 tokens of a tiny model may end no sentence: an empty, clean answer (no_sentence)
        assert got.text or got.finish_detail == "no_sentence"
        assert got.stats.completion_tokens > 0 and got.stats.modelled_j <= got.stats.budget_j
        for p, v in got.stats.paths.items():
            used[p] = used.get(p, 0) + v
    # int4 at decode; at prefill its units run on fp16 (the same GEMM, `paths.prefill_floor`)
    assert hest.energy.substitutions()["prefill"]["int4"] == "fp16"
    assert used["int4"] > 0 and used["fp16"] > 0 and sum(v > 0 for v in used.values()) >= 3, used


def test_calibration_measures_an_int4_column(int4, hf, lean4):
    from hest_core.energy import calib_measure

    old = calib_measure.WINDOW_SCALE
    calib_measure.WINDOW_SCALE = 0.05
    try:
        table = cal.calibrate(lean4, fingerprint(hf), EstimateMeter(30), False, 1, 1)
    finally:
        calib_measure.WINDOW_SCALE = old
    for ph in (table.prefill, table.decode):
        assert all(len(r) == 4 and r[int4.index] > 0 for r in ph.unit)
    assert len(table.decode.shared[0]) == 4  # the batched-decode shares have an int4 column
    # what the measured model's int4 units carried beside their blocks (none here), which an
    # engine serving another adapter rescales from (`energy.calib_lowrank.rescale_table`)
    assert set(table.kernels["int4_lowrank"]["decode"]) == {1.0}
    assert cal.table_name("fp", lean4).endswith("-int4.json")  # apart from 3-path tables


@pytest.fixture(scope="module")
def hest4(int4, int4_tables) -> Engine:
    e = _engine(int4_tables, "hest")
    e.max_article_tokens = 64
    return e


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ratio=st.floats(min_value=0.3, max_value=1.2),
    max_new=st.integers(min_value=1, max_value=10),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["paced", "hard"]),
)
def test_budget_invariant_with_four_paths(hest4: Engine, ratio, max_new, seed, mode):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hest4.controller.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)
    hest4.guard_mode = mode
    req = GenerationRequest(ARTICLE, energy_budget_ratio=ratio, max_new_tokens=max_new)
    try:
        prepared = hest4.check(req)
    except Exception as err:  # a budget below this prompt's minimum is refused up front
        assert "minimum" in str(err)
        return
    r = hest4.generate([prepared, hest4.check(GenerationRequest(ARTICLE, max_new_tokens=3))])
    for got in r:
        assert got.stats.modelled_j <= got.stats.budget_j + 1e-12
        assert len(got.stats.paths) == 4


@pytest.mark.slow
def test_default_model_on_its_own_q4_blocks(int4, int4_tables):
    """The real default model, no adapter: every int4 weight is the GGUF's own Q4_1 block (so
    the int4 copies share the 16-bit copy's memory: those are the same blocks, dequantized), and
    a fixed int4 policy writes text. 5-36 s on this shared machine: marked slow."""
    e = Engine.from_pretrained(
        "default", adapter=None, policy="int4", calibration=int4_tables, progress=False, paths=FOUR
    )
    assert e.info()["int4"]["weights"].startswith("210 of 210 from the model's Q4_1 blocks")
    lw = e.lean.layers[0]
    assert lw.gu4.dense is lw.wgu  # exact: nothing dequantized twice
    req = GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=16, clean_end=False)
    r = e.generate([req])[0]
    assert len(r.text.split()) >= 3 and r.stats.paths["int4"] == sum(r.stats.paths.values())


# ---- the fused decode layer on int4 (kernels/layer.c, path code 3) ---------------------------------
def _with_low_rank(lean, rank: int, seed: int) -> None:
    """A random low-rank term (x a^T) b^T of `rank` beside every int4 copy of `lean` (as
    `int4.attach` builds from an adapter's z in the "lowrank" mode: each target of a fused
    projection its own rows of b and its own columns), big enough to show."""
    g = torch.Generator().manual_seed(seed)
    for lw in lean.layers:
        for m in (lw.qkv4, lw.o4, lw.gu4, lw.down4):
            k, n = m.w.k, m.w.n
            a = torch.randn(rank, k, generator=g) / k**0.5
            b = torch.randn(n, rank, generator=g) * (0.3 / rank**0.5)
            h = rank // 2  # two "targets", as a fused projection's: rows of b apart, columns apart
            b[: n // 3, h:] = 0
            b[n // 3 :, :h] = 0
            m.low = LowRank(a.bfloat16().contiguous(), b.bfloat16().contiguous())


@pytest.fixture(scope="module")
def lean4_fused(int4, hf):
    """Two leans with int4 copies (weight-only int8 at every row count, as the fused layer):
    without and with a rank-16 low-rank term beside every Q4_1 product."""
    out = {}
    for rank in (0, 16):
        lean = build_lean(hf, torch.bfloat16, torch.device("cpu"), 512)
        attach(lean, hf)
        for lw in lean.layers:
            for m in lw.int8_linears():
                m.woq_max_rows = 16
        if rank:
            _with_low_rank(lean, rank, seed=rank)
        out[rank] = lean
    return out


@pytest.mark.skipif(native.get() is None, reason=f"native kernels {native.status()}")
@pytest.mark.parametrize("rows", [1, 4, 8, 16])
@pytest.mark.parametrize("rank", [0, 16])
def test_fused_layer_runs_int4_like_the_pytorch_loop(int4, lean4_fused, rows, rank):
    """All rows on int4, and the four paths mixed row by row: the fused layer (Q4_1 products
    plus the low-rank term, in C) equals the PyTorch loop (Int4Linear) within the fused tests'
    tolerance."""
    lean = lean4_fused[rank]
    assert reg.native_codes() == list(range(reg.n_paths()))  # the registry's rule accepts int4
    prompts = prompts_for(rows)
    mixed = [(int4.index + i) % reg.n_paths() for i in range(rows)]  # int4 first, then the rest
    for dec in (const_decider(int4.index), row_decider(mixed)):
        a = decode(lean, prompts, 2, dec, fused=True)
        b = decode(lean, prompts, 2, dec, fused=False)
        assert_agree(a, b, (rows, rank))


@pytest.mark.skipif(
    native.get() is None or not native.get().amx, reason="no AMX tiles here (or no native kernels)"
)
@pytest.mark.parametrize("rank", [0, 16])
def test_fused_int4_on_the_tiles_at_many_rows(int4, lean4_fused, rank):
    """From AMX_MIN_ROWS_Q4 rows the fused layer's Q4_1 products run on the AMX tiles
    (`hest_gemv_q4_amx`: weights dequantised to bf16 once per step): at 16 rows on int4 the
    logits agree with the PyTorch loop with the tiles and without them (q4.c's vpdpwssd loop),
    and the two differ (other roundings), so the tiles did run."""
    nat = native.get()
    lean = lean4_fused[rank]
    prompts = prompts_for(16)
    dec = const_decider(int4.index)
    loop = decode(lean, prompts, 2, dec, fused=False)
    tiles = decode(lean, prompts, 2, dec, fused=True)
    assert nat.set_amx(False) is False
    try:
        plain = decode(lean, prompts, 2, dec, fused=True)
    finally:
        assert nat.set_amx(True) is True
    assert_agree(tiles, loop, ("tiles", rank))
    assert_agree(plain, loop, ("vpdpwssd", rank))
    assert not torch.equal(tiles, plain)


@pytest.mark.skipif(native.get() is None, reason=f"native kernels {native.status()}")
def test_fused_low_rank_term_is_not_ignored(int4, lean4_fused):
    """The same step with and without the term differs (so the tolerance above is not what hides
    a missing term), and the fused layer follows the term."""
    prompts = prompts_for(2)
    dec = const_decider(int4.index)
    plain = decode(lean4_fused[0], prompts, 1, dec, fused=True)
    low = decode(lean4_fused[16], prompts, 1, dec, fused=True)
    low_loop = decode(lean4_fused[16], prompts, 1, dec, fused=False)
    assert (low - plain).abs().max() > 5 * (low - low_loop).abs().max()


def test_low_rank_term_raises_the_int4_costs_by_its_work(int4, hf, lean4_fused, int4_tables):
    """`lowrank_factors`: 1.0 on every layer without a term; with a rank-16 term, decode by the
    term's bytes over the Q4_1 bytes and prefill by its multiply-adds over N K (layer 0 checked
    by hand). `rescale_table` raises only the int4 column of a table measured without a term:
    prefill by the multiply-add model, decode by the measured joules the terms add to a step
    (spread by their bytes; the terms are back on afterwards) or, without a meter, by the bytes
    model; a table measured with the same terms, or for a model without any, is used as it is."""
    from hest_core.energy import calib_measure
    from hest_core.energy.calib_lowrank import rescale_table
    from hest_core.energy.model import CalibrationTable
    from hest_core.exec.int4 import lowrank_factors

    plain, low = lowrank_factors(lean4_fused[0]), lowrank_factors(lean4_fused[16])
    assert set(plain["decode"]) == {1.0} and set(plain["prefill"]) == {1.0}
    mods = [lean4_fused[16].layers[0].__dict__[n] for n in ("qkv4", "o4", "gu4", "down4")]
    nz = sum(m.low.a.numel() + int((m.low.b != 0).sum()) for m in mods)
    q4b = sum(m.w.nbytes for m in mods)
    assert low["decode"][0] == pytest.approx(1 + 2 * nz / q4b)
    assert low["prefill"][0] == pytest.approx(1 + nz / sum(m.w.n * m.w.k for m in mods))
    assert all(f > 1.0 for f in low["decode"] + low["prefill"])

    fp = fingerprint(hf)
    path = next(p for p in int4_tables.glob("*.json") if fp in p.name and "int4" in p.name)
    t = CalibrationTable.load(path)
    assert rescale_table(t, lean4_fused[0], EstimateMeter(30)) is t
    i, others = int4.index, [j for j in range(reg.n_paths()) if j != int4.index]
    old = calib_measure.WINDOW_SCALE
    calib_measure.WINDOW_SCALE = 0.05
    try:
        measured = rescale_table(t, lean4_fused[16], EstimateMeter(30))
    finally:
        calib_measure.WINDOW_SCALE = old
    assert all(m.low is not None for m in mods)  # the terms are back on
    modelled = rescale_table(t, lean4_fused[16])
    rec = measured.kernels["int4_lowrank_rescaled"]
    assert rec["decode"] == "measured" and rec["delta_j"] >= 0
    assert modelled.kernels["int4_lowrank_rescaled"]["decode"] == "bytes model"
    extra = sum(f - 1 for f in low["decode"])
    for li in range(t.n_layers):
        for s in (measured, modelled):
            for ph in ("prefill", "decode"):
                a, b = getattr(t, ph).unit[li], getattr(s, ph).unit[li]
                assert [b[j] for j in others] == [a[j] for j in others]
            assert s.prefill.unit[li][i] == pytest.approx(
                t.prefill.unit[li][i] * low["prefill"][li]
            )
        added = measured.decode.unit[li][i] - t.decode.unit[li][i]
        assert added == pytest.approx(rec["delta_j"] * (low["decode"][li] - 1) / extra)
        assert modelled.decode.unit[li][i] == pytest.approx(
            t.decode.unit[li][i] * low["decode"][li]
        )
    t.kernels["int4_lowrank"] = low  # measured with these very terms: used as it is
    assert rescale_table(t, lean4_fused[16]) is t


def test_plain_int4_mode_serves_the_base_blocks_beside_a_z(int4, hf, tmp_path, int4_tables):
    """int4 mode "plain": the int4 copies are the base's blocks alone (no low-rank term, outputs
    equal to a model without the adapter) while the 16-bit copies carry z; an adapter's
    `int4_mode` chooses it in the engine; an unknown mode is refused by the config."""
    from hest_core.adapter.artifact import HestAdapter, HestConfig
    from hest_core.adapter.spectral import SvdCache, spectrum_sizes
    from hest_core.errors import HestError
    from hest_core.exec.loading import spec_of

    fp = fingerprint(hf)
    ad = HestAdapter.untrained(spec_of(hf), fp, spectrum_sizes(hf))
    g = torch.Generator().manual_seed(0)
    for z in ad.z.values():
        z[:, :4] = torch.randn(z.shape[0], 4, generator=g) * 0.3
    ad.config.paths = list(reg.names())
    ad.config.int4_mode = "plain"
    ad.save(tmp_path / "plain")
    eng = Engine.from_pretrained(
        "tiny:llama", adapter=tmp_path / "plain", dtype="bf16", calibration=int4_tables,
        progress=False,
    )  # fmt: skip
    assert eng.info()["int4"]["adapter"] == "none" and eng.info()["int4"]["lowrank_rows"] == 0
    lw = eng.lean.layers[0]
    assert lw.qkv4.low is None
    assert not torch.equal(lw.qkv4.dense, lw.wqkv)  # the 16-bit copy has z merged, int4 not
    base = build_lean(hf, torch.bfloat16, torch.device("cpu"), 512)
    attach(base, hf)
    assert torch.equal(base.layers[0].qkv4.dense, lw.qkv4.dense)
    lowrank = attach(build_lean(hf, torch.bfloat16, torch.device("cpu"), 512), hf, None, ad.z,
                     SvdCache(hf, fp, False, keep=4))  # fmt: skip
    assert lowrank["lowrank_rows"] > 0
    with pytest.raises(HestError, match="int4_mode"):
        HestConfig("m", "f", 2, 8, int4_mode="tiles")


PACKAGED4 = (
    Path(cal.__file__).parent
    / "calibration"
    / "491473d3fa8f25ad-intel-r-xeon-r-processor-bf16-2t-amx-native-int4.json"
)


def test_int4_prefill_costs_no_less_than_fp16_and_runs_on_it(int4):
    """int4's prefill is fp16's GEMM on the dequantized blocks (`paths.prefill_floor`): the
    packaged table's int4 prefill (0.974 of fp16, timing noise) is raised to fp16's, so the
    energy model runs fp16 for prefill units put on int4 (one weight pass, not two); decode
    costs and decode choices are the table's."""
    from hest_core.energy.model import CalibrationTable, EnergyModel

    t = CalibrationTable.load(PACKAGED4)
    fp, i4 = reg.index("fp16"), int4.index
    assert all(r[i4] < r[fp] for r in t.prefill.unit)  # as measured
    em = EnergyModel(t)
    assert all(r[i4] == r[fp] for r in em.unit["prefill"])
    assert em.unit["decode"] == [tuple(r) for r in t.decode.unit]
    assert em.unit["prefill"][0][reg.index("skip")] == t.prefill.unit[0][reg.index("skip")]
    assert em.substitutions()["prefill"]["int4"] == "fp16"
    assert "int4" not in em.substitutions().get("decode", {})
    assert all(row[i4] == fp for row in em.sub["prefill"])
    # a dearer int4 prefill (its low-rank term, say) keeps its own cost
    t.prefill.unit = [[*r[:i4], r[fp] * 1.1, *r[i4 + 1 :]] for r in t.prefill.unit]
    em = EnergyModel(t)
    assert em.unit["prefill"][3][i4] == pytest.approx(t.prefill.unit[3][fp] * 1.1)
