"""Engine behaviour: bad input, budgets, energy accounting, batching, cancellation."""

from __future__ import annotations

import math
import threading

import pytest

from hest_core import BudgetTooLowError, Engine, GenerationRequest, HestError, InvalidInputError

ARTICLE = (
    "The city council voted on Tuesday to expand the bus network after a year of record "
    "ridership. Officials said new routes would open in the spring and fares would stay flat. "
) * 6


@pytest.mark.parametrize(
    "req, code, param",
    [
        (GenerationRequest(""), "empty_text", "text"),
        (GenerationRequest("   \n"), "empty_text", "text"),
        (
            GenerationRequest(ARTICLE, energy_budget_ratio=float("nan")),
            "invalid_budget",
            "energy_budget_ratio",
        ),
        (
            GenerationRequest(ARTICLE, energy_budget_ratio=-0.5),
            "invalid_budget",
            "energy_budget_ratio",
        ),
        (
            GenerationRequest(ARTICLE, energy_budget_ratio=math.inf),
            "invalid_budget",
            "energy_budget_ratio",
        ),
        (GenerationRequest(ARTICLE, energy_budget_j=0.0), "invalid_budget", "energy_budget_j"),
        (
            GenerationRequest(ARTICLE, energy_budget_j=-math.inf),
            "invalid_budget",
            "energy_budget_j",
        ),
        (
            GenerationRequest(ARTICLE, energy_budget_j=1.0, energy_budget_ratio=0.5),
            "conflicting_budget",
            "energy_budget_j",
        ),
        (GenerationRequest(ARTICLE, max_new_tokens=0), "invalid_max_new_tokens", "max_new_tokens"),
        (
            GenerationRequest(ARTICLE, max_new_tokens=10**6),
            "invalid_max_new_tokens",
            "max_new_tokens",
        ),
        (GenerationRequest("x" * 200_001), "text_too_long", "text"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_engine: Engine, req, code, param):
    with pytest.raises(InvalidInputError) as ei:
        tiny_engine.generate([req])
    assert ei.value.code == code and ei.value.param == param
    assert isinstance(ei.value, HestError)


def test_budget_below_minimum_quotes_it(tiny_engine: Engine):
    """Reading the whole article (read: whole); the read plan's floor is test_reading's."""
    p = tiny_engine.check(
        GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=8, read="whole")
    )
    with pytest.raises(BudgetTooLowError) as ei:
        tiny_engine.check(
            GenerationRequest(
                ARTICLE, energy_budget_j=p.min_j * 0.99, max_new_tokens=8, read="whole"
            )
        )
    assert ei.value.minimum_j == pytest.approx(p.min_j)
    assert f"{p.min_j:.6g}" in str(ei.value)
    # exactly the minimum is accepted and runs
    res = tiny_engine.generate(
        [GenerationRequest(ARTICLE, energy_budget_j=p.min_j, max_new_tokens=8, read="whole")]
    )[0]
    assert res.stats.modelled_j <= p.min_j
    assert res.stats.completion_tokens >= 1


def test_whole_documents_up_to_the_context_never_cut_silently(tiny_engine: Engine):
    """Issue 16: the prompt may use the model's context minus the requested output (the tiny
    model reads 2,048 positions); beyond it a request is refused with the numbers, or cut to fit
    when it asks for that, and then flagged."""
    ctx = tiny_engine.context_tokens
    assert ctx == 2048 and tiny_engine.info()["max_context_tokens"] == ctx
    long = tiny_engine.check(GenerationRequest(ARTICLE * 8, max_new_tokens=8, read="whole"))
    assert not long.truncated and 1000 < len(long.ids) <= ctx - 8
    with pytest.raises(InvalidInputError, match=r"the prompt is \d+ tokens") as err:
        tiny_engine.check(GenerationRequest(ARTICLE * 40, max_new_tokens=8))
    assert err.value.code == "context_length_exceeded" and err.value.param == "text"
    cut = tiny_engine.check(
        GenerationRequest(ARTICLE * 40, max_new_tokens=8, truncate=True, read="whole")
    )
    assert cut.truncated and ctx - 8 - 4 <= len(cut.ids) <= ctx - 8
    res = tiny_engine.generate([cut])[0]
    assert res.stats.truncated and res.stats.completion_tokens <= 8
    with pytest.raises(InvalidInputError, match="truncate=true must be true or false|truncate"):
        tiny_engine.check(GenerationRequest(ARTICLE, truncate="yes"))


def test_fp16_energy_adds_up():
    """Running every unit fp16 for every allowed token costs exactly the modelled fp16 cost."""
    eng = Engine.from_pretrained("tiny:llama", adapter=None, policy="fp16", progress=False)
    eng.eos_ids = set()  # never stop early: every token is generated
    res = eng.generate([GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=6)])[0]
    st = res.stats
    assert res.finish_reason == "length" and st.completion_tokens == 6
    assert st.modelled_j == st.fp16_cost_j  # exact: the ledger is integer picojoules
    n_units = st.prompt_tokens + st.completion_tokens - 1  # the last token needs no forward pass
    assert st.paths == {"fp16": n_units * eng.lean.spec.n_layers, "int8": 0, "skip": 0}


def test_low_budget_demotes_then_stops(tiny_engine: Engine):
    tiny_engine.eos_ids, saved = set(), tiny_engine.eos_ids
    try:
        p = tiny_engine.check(
            GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=40)
        )
        res = tiny_engine.generate(
            [GenerationRequest(ARTICLE, energy_budget_j=p.min_j * 1.02, max_new_tokens=40)]
        )[0]
    finally:
        tiny_engine.eos_ids = saved
    assert res.finish_reason == "energy_budget"
    assert res.stats.modelled_j <= res.stats.budget_j
    assert res.stats.demotions > 0  # (on tiny shapes skip is not always the cheapest path)


def test_batch_with_mixed_budgets(tiny_engine: Engine):
    reqs = []
    for i, frac in enumerate([1.0, 0.7, 0.2, 0.9]):  # between the minimum and the fp16 cost
        text, n = ARTICLE[: 100 + 50 * i], 5 + i
        p = tiny_engine.check(GenerationRequest(text, energy_budget_ratio=1.0, max_new_tokens=n))
        budget = p.min_j + frac * (p.fp16_cost_j - p.min_j)
        reqs.append(GenerationRequest(text, energy_budget_j=budget, max_new_tokens=n))
    batch = tiny_engine.generate(reqs)
    for req, res in zip(reqs, batch, strict=True):
        assert res.stats.modelled_j <= res.stats.budget_j
        alone = tiny_engine.generate([req])[0]
        # batching changes grouping, not the work each request pays for
        assert res.stats.prompt_tokens == alone.stats.prompt_tokens


def test_streaming_deltas_rebuild_the_text(tiny_engine: Engine):
    got: dict[int, str] = {}
    res = tiny_engine.generate(
        [
            GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=12),
            GenerationRequest(ARTICLE[:200], energy_budget_ratio=1.0, max_new_tokens=7),
        ],
        on_token=lambda i, d: got.__setitem__(i, got.get(i, "") + d),
    )
    for i, r in enumerate(res):
        assert got.get(i, "") == r.text


def test_cancellation_stops_a_request(tiny_engine: Engine):
    ev = threading.Event()
    seen = []

    def on_token(i, d):
        seen.append(i)
        if len(seen) == 3:
            ev.set()

    tiny_engine.eos_ids, saved = set(), tiny_engine.eos_ids
    try:
        res = tiny_engine.generate(
            [
                GenerationRequest(
                    ARTICLE,
                    energy_budget_ratio=1.0,
                    max_new_tokens=50,
                    cancelled=ev,
                    clean_end=False,  # stream every token (the random model writes no sentences)
                )
            ],
            on_token=on_token,
        )[0]
    finally:
        tiny_engine.eos_ids = saved
    assert res.finish_reason == "cancelled"
    assert res.stats.completion_tokens < 10


def test_info_names_meter_and_calibration(tiny_engine: Engine):
    info = tiny_engine.info()
    assert info["meter"] in ("estimate", "rapl", "nvml")
    assert info["calibration"]["date"] and info["calibration"]["method"]
    assert info["dtype"] == "bf16" and info["device"] == "cpu"


def test_bad_engine_options():
    with pytest.raises(HestError):
        Engine.from_pretrained("tiny:llama", adapter=None, policy="turbo", progress=False)
    with pytest.raises(HestError):
        Engine.from_pretrained("no/such-model-dir-here", adapter=None, progress=False)


def test_ratio_one_pays_for_every_unit_on_fp16():
    """A budget of exactly the all-fp16 cost never demotes and never stops early (hest policy
    with the untrained, always-fp16 controller)."""
    eng = Engine.from_pretrained("tiny:llama", adapter=None, policy="hest", progress=False)
    eng.eos_ids = set()
    for guard in ("paced", "hard"):
        eng.guard_mode = guard
        res = eng.generate(
            [GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=16)]
        )[0]
        st = res.stats
        assert res.finish_reason == "length" and st.completion_tokens == 16
        assert st.demotions == 0 and st.paths["int8"] == st.paths["skip"] == 0
        assert st.modelled_j == st.budget_j == st.fp16_cost_j


def test_paths_dearer_than_fp16_on_this_device_run_as_fp16(tiny_engine: Engine, tmp_path):
    """A GPU at batch 1 measured int8 dearer than fp16 (H100, docs/gpu.md): a controller that
    picks int8 must then run fp16, which is better and cheaper, not spend the budget on int8 and
    stop early."""
    import torch

    from hest_core.energy.model import CalibrationTable

    t = CalibrationTable.load(tiny_engine.info()["calibration"]["source"])
    f = t.decode.unit[0][0]
    t.decode.unit = [[f, 3 * f, 1.2 * f] for _ in t.decode.unit]  # int8 and skip dearer
    g = t.prefill.unit[0][0]
    t.prefill.unit = [[g, 0.5 * g, 0.2 * g] for _ in t.prefill.unit]  # the usual order
    path = tmp_path / "inverted.json"
    t.save(path)
    eng = Engine.from_pretrained(
        "tiny:llama", adapter=None, policy="hest", calibration=path, progress=False
    )
    assert eng.info()["path_substitutions"] == {"decode": {"int8": "fp16", "skip": "fp16"}}
    with torch.no_grad():
        eng.controller.hest_a0.copy_(torch.tensor([0.0, 1.0, 0.0]))  # always picks int8
    L = eng.lean.spec.n_layers

    def run(batch: int):
        reqs = [GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=12)] * batch
        return eng.generate(reqs)

    for batch in (1, 2):  # batch 1 decodes through the C controller, 2 through PyTorch's
        for r in run(batch):
            st = r.stats
            assert st.paths["int8"] == st.prompt_tokens * L  # prefill: int8 is cheaper there
            assert st.paths["fp16"] == (st.completion_tokens - 1) * L  # decode: substituted
            assert r.finish_reason != "energy_budget"
            assert st.modelled_j <= st.budget_j
    eng.path_sub = {}  # without the substitution: int8 at 3x fp16 runs the budget dry
    assert all(r.finish_reason == "energy_budget" for r in run(1))
