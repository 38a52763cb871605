"""The read plan (hest_core/runtime/reading.py): where the budget cannot pay for the whole article and a
summary, a request reads the article's head that leaves the summary paid for; never silently."""

from __future__ import annotations

import math

import pytest

from hest_core import BudgetTooLowError, Engine, GenerationRequest, InvalidInputError
from hest_core import paths as reg
from hest_core.runtime.reading import (
    MIN_READ_TOKENS,
    SUMMARY_TOKENS,
    plan_paths,
    plan_read,
    policy_read_budget_q,
    summary_cost_q,
)

ARTICLE = (
    "The council met on Tuesday to discuss the new bus network. Residents asked for later "
    "services on weekends and for more stops near the hospital. "
) * 40


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained("tiny:llama", adapter=None, progress=False)


def test_the_whole_article_when_the_budget_pays_for_it_and_a_summary(engine):
    em = engine.energy
    pre, dec = plan_paths(em, None)
    need = summary_cost_q(em, 40 + 900, SUMMARY_TOKENS, pre, dec)
    assert plan_read(em, need, 40, 900, 96).read == 900
    assert plan_read(em, need - 1, 40, 900, 96).read < 900


def test_the_read_is_the_longest_head_that_leaves_the_summary_paid_for(engine):
    em = engine.energy
    pre, dec = plan_paths(em, None)
    whole = summary_cost_q(em, 40 + 900, SUMMARY_TOKENS, pre, dec)
    last = 0
    for frac in (0.3, 0.5, 0.7, 0.9, 0.99):
        plan = plan_read(em, int(whole * frac), 40, 900, 96)
        assert plan.read >= last  # more budget never reads less
        last = plan.read
        if plan.read > MIN_READ_TOKENS:
            assert summary_cost_q(em, 40 + plan.read, SUMMARY_TOKENS, pre, dec) <= whole * frac
            assert summary_cost_q(em, 41 + plan.read, SUMMARY_TOKENS, pre, dec) > whole * frac


def test_the_floor_and_a_short_article(engine):
    em = engine.energy
    assert plan_read(em, 1, 40, 900, 96).read == MIN_READ_TOKENS  # nothing fits: the floor
    assert plan_read(em, 1, 40, 50, 96).read == 50  # an article under the floor is read whole
    with pytest.raises(ValueError):
        plan_read(em, 1, -1, 50, 96)


def test_plan_paths_skip_is_never_the_summary_path(engine):
    pre, dec = plan_paths(engine.energy, None)
    assert reg.get(pre).mlp is not None and reg.get(dec).mlp is not None
    assert plan_paths(engine.energy, reg.INT8) == (reg.INT8, reg.INT8)


def test_a_tight_budget_reads_the_head_and_says_so(engine):
    tight = engine.check(GenerationRequest(ARTICLE, energy_budget_ratio=0.3, max_new_tokens=96))
    whole = engine.check(
        GenerationRequest(ARTICLE, energy_budget_ratio=0.3, max_new_tokens=96, read="whole")
    )
    assert tight.truncated and tight.truncated_by == "budget"
    assert tight.article_read < tight.article_tokens == whole.article_tokens == whole.article_read
    assert len(tight.ids) < len(whole.ids)
    assert not whole.truncated and whole.truncated_by is None
    # the ratio still refers to the whole prompt: the same budget either way
    assert tight.budget_q == whole.budget_q and tight.fp16_q == whole.fp16_q
    loose = engine.check(GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=96))
    assert loose.article_read == loose.article_tokens and not loose.truncated
    res = engine.generate([tight])[0]
    assert res.stats.truncated_by == "budget"
    assert res.stats.article_tokens_read == tight.article_read
    assert res.stats.modelled_j <= tight.budget_j


def test_read_must_be_a_known_mode(engine):
    for bad in ("all", None, 1):
        with pytest.raises(InvalidInputError) as err:
            engine.check(GenerationRequest(ARTICLE, read=bad))
        assert err.value.param == "read"


def test_below_the_floor_is_refused_with_the_floor_minimum(engine):
    """The read plan serves budgets below the whole article's minimum by reading its head, down
    to MIN_READ_TOKENS; below that head's minimum the request is refused quoting it."""
    whole = engine.check(
        GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=8, read="whole")
    )
    served = engine.check(
        GenerationRequest(ARTICLE, energy_budget_j=whole.min_j * 0.9, max_new_tokens=8)
    )
    assert served.article_read < served.article_tokens and served.truncated_by == "budget"
    with pytest.raises(BudgetTooLowError) as err:
        engine.check(GenerationRequest(ARTICLE, energy_budget_j=1e-9, max_new_tokens=8))
    floor = engine.check(
        GenerationRequest(ARTICLE, energy_budget_j=err.value.minimum_j, max_new_tokens=8)
    )
    assert floor.article_read == MIN_READ_TOKENS and floor.budget_q == floor.min_q
    res = engine.generate([floor])[0]
    assert res.stats.modelled_j <= floor.budget_j and res.stats.completion_tokens >= 1


def test_policy_read_budget_is_the_smaller_of_the_budget_and_the_ratio():
    assert policy_read_budget_q(1000, 5000, None) == 1000
    assert policy_read_budget_q(1000, 5000, 0.1) == 500
    assert policy_read_budget_q(1000, 5000, 0.3) == 1000  # the budget binds first
    assert policy_read_budget_q(1000, 3333, 0.1) == 334  # rounded up: never below the ratio
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError):
            policy_read_budget_q(1000, 5000, bad)


@pytest.fixture()
def reading_engine(engine):
    """The module's engine with a read ratio of 0.4, put back afterwards."""
    engine.read_ratio = 0.4
    yield engine
    engine.read_ratio = None


def test_the_adapters_read_ratio_reads_less_than_the_budget_pays_for(reading_engine):
    """An adapter with read_ratio 0.4 plans its read with 0.4 x the all-fp16 cost at r = 1: it
    reads the head the plan gives for that budget, says "policy", and keeps its whole budget for
    generating; read: whole turns it off."""
    e = reading_engine
    own = e.check(GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=96))
    whole = e.check(
        GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=96, read="whole")
    )
    assert not whole.truncated and whole.article_read == whole.article_tokens
    assert own.truncated and own.truncated_by == "policy"
    template = len(whole.ids) - whole.article_tokens
    want = plan_read(e.energy, math.ceil(0.4 * own.fp16_q), template, own.article_tokens, 96)
    assert own.article_read == want.read < own.article_tokens
    assert own.budget_q == own.fp16_q == whole.budget_q  # the budget is not cut, only the read
    res = e.generate([own])[0]
    assert res.stats.truncated_by == "policy" and res.stats.article_tokens_read == own.article_read


def test_where_the_budget_binds_harder_it_is_the_budgets_plan(reading_engine, engine):
    """Below the read ratio the budget decides the read, exactly as without one ("budget")."""
    e = reading_engine
    tight = e.check(GenerationRequest(ARTICLE, energy_budget_ratio=0.3, max_new_tokens=96))
    e.read_ratio = None
    plain = e.check(GenerationRequest(ARTICLE, energy_budget_ratio=0.3, max_new_tokens=96))
    assert tight.truncated_by == plain.truncated_by == "budget"
    assert tight.article_read == plain.article_read and tight.ids == plain.ids


def test_a_fixed_policy_has_no_read_ratio():
    e = Engine.from_pretrained(
        "tiny:llama", adapter=None, policy="int8", guard="stop", progress=False
    )
    assert e.read_ratio is None
    e2 = Engine(
        tokenizer=e.tokenizer,
        lean=e.lean,
        controller=e.controller,
        energy=e.energy,
        meter=e.meter,
        policy="int8",
        guard_mode="stop",
        info={},
        read_ratio=0.4,
    )
    assert e2.read_ratio is None  # only HEST reads by its own plan
