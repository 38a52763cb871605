"""The read plan (hest_core/runtime/reading.py): where the budget cannot pay for the whole article and a
summary, a request reads the article's head that leaves the summary paid for; never silently."""

from __future__ import annotations

import pytest

from hest_core import BudgetTooLowError, Engine, GenerationRequest, InvalidInputError
from hest_core import paths as reg
from hest_core.runtime.reading import (
    MIN_READ_TOKENS,
    SUMMARY_TOKENS,
    plan_paths,
    plan_read,
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
