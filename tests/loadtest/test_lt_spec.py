"""Budget and prompt specs, arrival schedules: pure functions, no server."""

from __future__ import annotations

import json
import random

import pytest

from loadtest.runner import RunConfig, make_records, schedule
from loadtest.spec import BudgetSpec, LoadtestError, PromptSource


@pytest.mark.parametrize(
    ("text", "kind", "field", "first_three"),
    [
        ("0.6", "ratio", "energy_budget_ratio", [0.6, 0.6, 0.6]),
        ("0.4,0.6,1.0", "ratio", "energy_budget_ratio", [0.4, 0.6, 1.0]),
        ("2.5", "j", "energy_budget_j", [2.5, 2.5, 2.5]),
        (None, "ratio", None, [None, None, None]),
    ],
)
def test_fixed_and_cycled_budgets(text, kind, field, first_three) -> None:
    spec = BudgetSpec.parse(text, kind=kind)
    assert spec.field == field
    rng = random.Random(0)
    assert [spec.draw(i, rng) for i in range(3)] == first_three


@pytest.mark.parametrize("dist", ["uniform", "loguniform"])
def test_distribution_budgets_stay_in_bounds_and_are_seeded(dist) -> None:
    spec = BudgetSpec.parse(f"{dist}:0.4,1.0", kind="ratio")
    draws = [spec.draw(i, random.Random(7)) for i in range(5)]
    assert draws == [spec.draw(i, random.Random(7)) for i in range(5)]
    many = [spec.draw(i, rng) for rng in [random.Random(1)] for i in range(500)]
    assert all(0.4 <= v <= 1.0 for v in many)
    assert spec.group(0.449) == "ratio 0.4"


@pytest.mark.parametrize(
    "text", ["abc", "-1", "0", "normal:0.4,1.0", "uniform:1.0,0.4", "uniform:0.4", "nan"]
)
def test_bad_budget_specs_are_refused_with_the_option_named(text) -> None:
    with pytest.raises(LoadtestError, match="--budget-ratio"):
        BudgetSpec.parse(text, kind="ratio")


def test_prompts_from_jsonl(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    rows = [{"article": f"article {i}", "highlights": "h"} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    source = PromptSource.from_jsonl(path)
    assert source.texts == ["article 0", "article 1", "article 2"]
    assert source.get(4) == "article 1"
    assert PromptSource.from_jsonl(path, limit=2).texts == ["article 0", "article 1"]
    assert source.truncated(4).get(0) == "arti"
    with pytest.raises(LoadtestError, match="--prompt-field"):
        PromptSource.from_jsonl(path, text_field="body")
    with pytest.raises(LoadtestError, match="no such file"):
        PromptSource.from_jsonl(tmp_path / "missing.jsonl")


def test_generated_prompts_are_deterministic() -> None:
    a = PromptSource.generated(words=50, count=4, seed=3)
    assert a.texts == PromptSource.generated(words=50, count=4, seed=3).texts
    assert len(a.texts[0].split()) == 50


@pytest.mark.parametrize("mode", ["poisson", "constant"])
def test_schedule_is_bounded_in_count_and_time(mode) -> None:
    by_count = schedule(RunConfig(mode=mode, rate=10, max_requests=7, duration_s=100))
    assert len(by_count) == 7
    by_time = schedule(RunConfig(mode=mode, rate=10, max_requests=10_000, duration_s=3))
    assert all(t < 3 for t in by_time)
    assert 15 <= len(by_time) <= 45  # ~30 expected
    assert by_time == sorted(by_time)


def test_constant_schedule_spacing_and_poisson_mean() -> None:
    const = schedule(RunConfig(mode="constant", rate=4, max_requests=5, duration_s=10))
    assert const == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    poisson = schedule(RunConfig(mode="poisson", rate=50, max_requests=2000, duration_s=1e9))
    gaps = [b - a for a, b in zip(poisson, poisson[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.1)


def test_same_seed_gives_the_same_requests_for_every_target() -> None:
    config = RunConfig(budget=BudgetSpec.parse("uniform:0.4,1.0", kind="ratio"), seed=5)
    a = [r.budget_sent for r in make_records(config, 10)]
    assert a == [r.budget_sent for r in make_records(config, 10)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "burst"},
        {"mode": "poisson", "rate": 0},
        {"mode": "closed", "concurrency": 0},
        {"max_requests": 0},
        {"duration_s": 0},
    ],
)
def test_bad_run_configs_are_refused(kwargs) -> None:
    with pytest.raises(LoadtestError):
        RunConfig(**kwargs)
