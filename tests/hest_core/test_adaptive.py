"""The budget-adaptive controller (issue 14): its inputs (remaining budget, phase, the device's
relative path costs), its native twin, and the fixed-path "stop" guard of the fair baselines."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hest_core import Engine, GenerationRequest
from hest_core.adapter.artifact import HestAdapter
from hest_core.adapter.controller import AdaptiveController, Controller
from hest_core.adapter.native_controller import NativeController, NativeRows
from hest_core.adapter.spectral import spectrum_sizes
from hest_core.errors import BudgetTooLowError, HestError, NativeArgumentError
from hest_core.exec import native
from hest_core.exec.loading import fingerprint, load_hf_model, spec_of
from hest_core.runtime.guard import BudgetGuard

ARTICLE = (
    "The council voted on Tuesday to extend the bus network to the new estates. Officials "
    "said ridership rose by a fifth last spring. Fares will not change this year. "
) * 3


def _randomize(ctl, seed: int, scale: float):
    """Every parameter of `ctl` drawn from N(0, scale^2), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ctl.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return ctl


def _random_adaptive(hidden: int, n_layers: int, seed: int, scale: float = 1.0):
    return _randomize(AdaptiveController(hidden, n_layers, k=16), seed, scale)


def _costs(n_layers: int, int8: float, skip: float) -> tuple[torch.Tensor, torch.Tensor]:
    one = torch.tensor([[1.0, int8, skip]] * n_layers)
    return one * 0.04, one * 0.3


def test_native_parts_give_the_forward_logits():
    """What the C kernel computes from native_parts (a per-layer lay and additive term) is the
    PyTorch forward at phase 1."""
    ctl = _random_adaptive(24, 4, seed=0)
    ctl.set_costs(*_costs(4, 0.5, 0.1))
    h = torch.randn(3, 24)
    for beta in (-1.5, -0.4, 0.0, 0.3):
        lay, bias = ctl.native_parts(beta, 1)
        for li in range(4):
            tok = torch.sigmoid(h @ ctl.hest_w_tok.t())
            want = ctl(h, li, torch.full((3,), beta), torch.ones(3))
            got = (tok * lay[li]) @ ctl.hest_a.t() + bias[li]
            assert torch.allclose(got, want, atol=1e-5), (beta, li)


@pytest.mark.parametrize("ns", [[7], [3, 1, 5], [1] * 16])
@pytest.mark.parametrize("phase", [0, 1])
def test_for_rows_gives_the_forward_logits(ns, phase):
    """The decider's per-forward form (per-request terms once, `for_rows`) is the forward of
    the same rows: one request's prefill, a round of several, a 16-row decode step."""
    ctl = _random_adaptive(24, 4, seed=1)
    ctl.set_costs(*_costs(4, 0.5, 0.1))
    betas = [-1.2 + 0.4 * g for g in range(len(ns))]
    h = torch.randn(sum(ns), 24).bfloat16()
    beta = torch.cat([torch.full((n,), b) for n, b in zip(ns, betas, strict=True)])
    logits = ctl.for_rows(betas, ns, phase)
    for li in range(4):
        want = ctl(h, li, beta, torch.full_like(beta, float(phase)))
        got = logits(li, h)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert torch.allclose(got, want, atol=1e-5), (ns, phase, li)


def test_dearer_path_is_chosen_less():
    """The same artifact on a device where int8 saves less picks int8 less (never more)."""
    ctl = _random_adaptive(32, 6, seed=1, scale=0.5)
    h = torch.randn(400, 32)
    beta = torch.full((400,), math.log(0.4))
    shares = []
    for int8 in (0.3, 0.6, 0.9):
        ctl.set_costs(*_costs(6, int8, 0.05))
        picks = torch.cat([ctl(h, li, beta, torch.ones(400)).argmax(-1) for li in range(6)])
        shares.append(float((picks == 1).float().mean()))
    assert shares[0] >= shares[1] >= shares[2], shares
    assert shares[0] > shares[2], shares


def test_tighter_budget_raises_the_price():
    """A trained price falls as the remaining ratio rises (m1 < 0 at initialisation too)."""
    ctl = AdaptiveController(16, 2, k=4)
    ctl.init_for_training(seed=0)
    betas = torch.log(torch.tensor([0.2, 0.4, 0.8, 1.6]))
    price = ctl.price(betas, torch.ones(4))
    assert bool((price[:-1] > price[1:]).all()), price


def test_set_costs_refuses_bad_tables():
    ctl = AdaptiveController(16, 3, k=4)
    with pytest.raises(ValueError, match="costs must be"):
        ctl.set_costs(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="fp16 cost"):
        ctl.set_costs(torch.zeros(3, 3), torch.ones(3, 3))


@pytest.fixture(scope="module")
def adaptive_engine() -> Engine:
    hf = load_hf_model("tiny:llama", False)
    spec = spec_of(hf)
    ad = HestAdapter.untrained(spec, fingerprint(hf), spectrum_sizes(hf), k=16)
    ad.config.controller = "adaptive"
    ad.controller = _random_adaptive(spec.hidden, spec.n_layers, seed=2)
    return Engine.from_pretrained("tiny:llama", adapter=ad, progress=False)


def test_engine_gives_the_controller_its_own_costs(adaptive_engine: Engine):
    e = adaptive_engine
    rc = e.controller.rc
    for k, ph in enumerate(("prefill", "decode")):
        unit = torch.tensor(e.energy.unit[ph])
        assert torch.allclose(rc[k], unit / unit[:, :1], rtol=1e-5)


def test_remaining_ratio_follows_the_spend(adaptive_engine: Engine):
    em = adaptive_engine.energy
    P, new = 40, 8
    fp16 = em.request_cost_q(P, new, 0)
    g = BudgetGuard(em, fp16 // 2, P, new, "hard")
    assert g.remaining_ratio() == pytest.approx(0.5, rel=1e-6)
    g.start_prefill()
    cheap = [0, 0, P]  # the first layer's units all skipped: less than planned
    g.commit(0, cheap)
    assert g.remaining_ratio() > 0.5
    g.spent = g.budget
    assert g.remaining_ratio() == 0.0


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ratio=st.floats(min_value=0.05, max_value=1.5),
    max_new=st.integers(min_value=1, max_value=20),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["paced", "hard"]),
)
def test_adaptive_controller_keeps_the_budget(adaptive_engine: Engine, ratio, max_new, seed, mode):
    e = adaptive_engine
    _randomize(e.controller, seed, 2.0)
    e.guard_mode = mode
    probe = e.check(GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=max_new))
    budget = max(probe.min_j * (1 + 1e-9), ratio * probe.fp16_cost_j)
    res = e.generate([GenerationRequest(ARTICLE, energy_budget_j=budget, max_new_tokens=max_new)])
    e.guard_mode = "hard"
    assert res[0].error is None
    assert res[0].stats.modelled_j <= res[0].stats.budget_j


@pytest.fixture(scope="module")
def int8_stop() -> Engine:
    return Engine.from_pretrained("tiny:llama", adapter=None, policy="int8", guard="stop")


def test_fixed_path_stops_within_its_budget(int8_stop: Engine):
    """A fixed path under guard "stop" runs its own path only (no demotion) and ends, cleanly
    where it can, when its budget runs out."""
    e = int8_stop
    full = e.generate([GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=24)])[0]
    assert full.stats.paths["fp16"] == full.stats.paths["skip"] == 0
    for ratio in (0.35, 0.5, 0.7):
        res = e.generate(
            [GenerationRequest(ARTICLE, energy_budget_ratio=ratio, max_new_tokens=24)]
        )[0]
        s = res.stats
        assert s.modelled_j <= s.budget_j
        assert s.demotions == 0 and s.paths["fp16"] == s.paths["skip"] == 0
        assert s.completion_tokens <= full.stats.completion_tokens
        if s.completion_tokens < full.stats.completion_tokens:
            assert res.finish_reason == "energy_budget"


def test_fixed_path_minimum_is_its_own_path(int8_stop: Engine):
    """Below the prompt plus one token on int8 the request is refused, quoting that minimum
    (not the all-skipped one a demoting guard could reach)."""
    e = int8_stop
    probe = e.check(GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=24))
    em = e.energy
    want = em.min_feasible_q(len(probe.ids), 24, 1)
    assert want > em.min_feasible_q(len(probe.ids), 24)
    with pytest.raises(BudgetTooLowError, match="on int8") as err:
        e.check(GenerationRequest(ARTICLE, energy_budget_j=want / 1e12 * 0.99, max_new_tokens=24))
    assert err.value.minimum_j >= want / 1e12 * 0.999


def test_stop_guard_needs_a_fixed_policy():
    with pytest.raises(HestError, match="fixed policy"):
        Engine.from_pretrained("tiny:llama", adapter=None, policy="hest", guard="stop")


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ratio=st.floats(min_value=0.0, max_value=1.2),
    chunk=st.integers(min_value=3, max_value=40),
    seed=st.integers(0, 2**16),
)
def test_budget_holds_across_prefill_rounds(adaptive_engine: Engine, ratio, chunk, seed):
    """The named case (session 6, 30 validation articles): prompts over PREFILL_CHUNK tokens
    overspent at r = 0.3 and 0.4 (12 of 60 requests, up to 1.047x), because a round's limit
    reserved nothing for the prompt's later rounds. Here every prompt runs in several rounds."""
    from hest_core.runtime import generation

    e = adaptive_engine
    _randomize(e.controller, seed, 2.0)
    old = generation.PREFILL_CHUNK
    generation.PREFILL_CHUNK = chunk
    try:
        probe = e.check(GenerationRequest(ARTICLE, energy_budget_ratio=1.0, max_new_tokens=8))
        assert len(probe.ids) > 2 * chunk
        span = probe.fp16_cost_j - probe.min_j
        budget = probe.min_j * (1 + 1e-9) + ratio * span
        res = e.generate([GenerationRequest(ARTICLE, energy_budget_j=budget, max_new_tokens=8)])[0]
    finally:
        generation.PREFILL_CHUNK = old
    assert res.error is None
    assert res.stats.modelled_j <= res.stats.budget_j


@pytest.fixture(scope="module")
def priced_engine() -> Engine:
    """A HEST engine whose controller's choice follows the budget it reads and nothing else:
    path scores by quality rank, a price that rises steeply as the remaining ratio falls."""
    hf = load_hf_model("tiny:llama", False)
    spec = spec_of(hf)
    ad = HestAdapter.untrained(spec, fingerprint(hf), spectrum_sizes(hf), k=16)
    ad.config.controller = "adaptive"
    ctl = AdaptiveController(spec.hidden, spec.n_layers, k=16)
    ctl.init_for_training(seed=0, std=0.0)
    with torch.no_grad():
        ctl.hest_m.copy_(torch.tensor([0.0, -4.0, 0.0]))
    ad.controller = ctl
    ad.config.plan_ratio = 0.3
    return Engine.from_pretrained("tiny:llama", adapter=ad, progress=False)


def test_guard_plan_changes_only_what_the_controller_reads(adaptive_engine: Engine):
    """plan_q is what the controller's remaining ratio reads, below or above the budget; the
    guard's checks keep the real budget."""
    em = adaptive_engine.energy
    P, new = 40, 8
    fp16 = em.request_cost_q(P, new, 0)
    g = BudgetGuard(em, fp16, P, new, "hard", plan_q=fp16 * 3 // 10)
    assert g.remaining_ratio() == pytest.approx(0.3, rel=1e-6)
    assert g.budget == fp16
    g.spent = fp16 // 2  # past the plan, inside the budget
    assert g.remaining_ratio() == 0.0
    g.phase = "decode"
    assert g.limit(0, 1) == fp16 - fp16 // 2 - em.min_after_q["decode"][1]  # the budget's
    high = BudgetGuard(em, fp16 // 2, P, new, "hard", plan_q=fp16)
    assert high.remaining_ratio() == pytest.approx(1.0, rel=1e-6)
    high.spent = fp16 // 2  # the budget is spent: the plan does not let it go on
    assert not high.try_start_decode(P)


def test_plan_budget_q():
    """reading.plan_budget_q: a cap (plan_from = plan_ratio), a floor from plan_from up, and
    the real budget below it or without a plan; ratios outside (0, 1] refused."""
    from hest_core.runtime.reading import plan_budget_q

    fp16 = 1000
    assert plan_budget_q(600, fp16, None) == 600
    assert plan_budget_q(600, fp16, 0.3) == 300  # capped
    assert plan_budget_q(200, fp16, 0.3) == 200  # below the cap: the budget
    assert plan_budget_q(300, fp16, 1.0, 0.3) == 1000  # from 0.3 up, planned as 1.0
    assert plan_budget_q(299, fp16, 1.0, 0.3) == 299
    for bad in ((0.0, None), (1.5, None), (0.5, 0.0), (0.5, 2.0)):
        with pytest.raises(ValueError):
            plan_budget_q(500, fp16, *bad)


def test_plan_slope_lowers_the_plan_below_its_start():
    """Below the plan's start the plan is start x fp16 x (r / start) ** slope, rounded: the
    shipped slope 4 plans r = 0.2 as 0.0593 (300 x (2/3)^4 = 59.3: 59 of 1000); slope None or 1 plans
    with the budget; at and above the start the cap is untouched; it falls monotonically with
    the budget; a slope that is not a finite number > 0 is refused."""
    from hest_core.runtime.reading import plan_budget_q

    fp16 = 1000
    assert plan_budget_q(200, fp16, 0.3, None, 4.0) == 59
    assert plan_budget_q(200, fp16, 0.3, None, None) == 200
    assert plan_budget_q(200, fp16, 0.3, None, 1.0) == 200
    assert plan_budget_q(300, fp16, 0.3, None, 4.0) == 300  # the start: the cap
    assert plan_budget_q(900, fp16, 0.3, None, 4.0) == 300
    assert plan_budget_q(200, fp16, None, None, 4.0) == 200  # no plan: the budget
    assert plan_budget_q(200, fp16, 1.0, 0.25, 2.0) == 160  # a floor's start: 250 (0.8)^2
    plans = [plan_budget_q(b, fp16, 0.3, None, 4.0) for b in range(1, 301)]
    assert plans == sorted(plans) and plans[-1] == 300 and plans[-2] <= 299
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="plan_slope"):
            plan_budget_q(200, fp16, 0.3, None, bad)


def test_plan_slope_buys_cheaper_paths_where_the_budget_binds(priced_engine: Engine):
    """A budget below the plan's start (here r = 0.7 under a 0.9 cap, where this controller's
    price still lets fp16 win) planned with slope 4 reads a lower remaining ratio, so the priced
    controller puts fewer units on fp16 than with the budget as its plan; both stay inside the
    budget; above the start the slope changes nothing."""
    e = priced_engine

    def run(ratio, slope):
        e.plan_ratio, e.plan_slope = 0.9, slope
        req = GenerationRequest(ARTICLE, energy_budget_ratio=ratio, max_new_tokens=12)
        try:
            res = e.generate([req])[0]
        finally:
            e.plan_ratio, e.plan_slope = 0.3, None
        assert res.error is None and res.stats.modelled_j <= res.stats.budget_j
        return res

    flat, steep = run(0.7, None), run(0.7, 4.0)
    assert steep.stats.paths["fp16"] < flat.stats.paths["fp16"]
    assert e.info()["plan_slope"] is None and e.info()["plan_ratio"] == 0.3
    a, b = run(0.95, None), run(0.95, 4.0)
    assert a.text == b.text and a.stats.paths == b.stats.paths


def test_plan_ratio_makes_spending_flat_above_it(priced_engine: Engine):
    """With the adapter's plan_ratio 0.3, r = 0.8 and r = 1.0 run the same paths and text (the
    controller plans with the same 0.3 x fp16 either way; neither budget binds), cheaper than
    r = 1.0 without the plan, and every run stays within its budget."""
    e = priced_engine
    assert e.plan_ratio == 0.3 and e.info()["plan_ratio"] == 0.3

    def run(ratio):
        req = GenerationRequest(ARTICLE, energy_budget_ratio=ratio, max_new_tokens=12)
        res = e.generate([req])[0]
        assert res.error is None and res.stats.modelled_j <= res.stats.budget_j
        return res

    a, b = run(0.8), run(1.0)
    assert a.text == b.text and a.stats.paths == b.stats.paths
    assert a.stats.modelled_j == pytest.approx(b.stats.modelled_j, rel=1e-9)
    e.plan_ratio = None
    try:
        free = run(1.0)
    finally:
        e.plan_ratio = 0.3
    assert free.stats.paths["fp16"] > b.stats.paths["fp16"]
    assert free.stats.modelled_j > b.stats.modelled_j


# ---- a decode step's rows in C (NativeRows, `hest_ctl_rows`) ------------------------------------
needs_native = pytest.mark.skipif(native.get() is None, reason=f"native kernels {native.status()}")


@needs_native
@pytest.mark.parametrize("n", [2, 7, 16])
def test_native_rows_are_each_row_alone(n):
    """A decode step of n requests, one row each, each with its own beta: the C logits of every
    row are what `NativeController` gives that request alone and what the PyTorch forward gives,
    within float rounding; each row's path is the first largest logit, then the layer's
    substitution."""
    ctl = _random_adaptive(96, 5, seed=n)
    ctl.set_costs(torch.rand(5, 3) + 0.1, torch.rand(5, 3) + 0.1)
    g = torch.Generator().manual_seed(n)
    betas = (torch.rand(n, generator=g) * 4 - 3).tolist()
    sub = [[0, 1, 2], [0, 0, 2], [0, 1, 0], [0, 1, 2], [2, 2, 2]]  # per layer: path -> path run
    rows = NativeRows.of(ctl, betas, sub)
    plain = NativeRows.of(ctl, betas, None)
    assert rows is not None and plain is not None
    for li in range(5):
        h = torch.randn(n, 96, generator=g).bfloat16()
        paths = rows.paths(li, h).tolist()
        first = plain.paths(li, h).tolist()
        got = rows.out.clone()
        for m, beta in enumerate(betas):
            alone = NativeController.of(ctl, beta)
            assert alone is not None
            one = torch.tensor(alone.logits(li, h[m : m + 1]))
            assert torch.allclose(one, got[m], atol=1e-5, rtol=1e-5), (li, m)
            ref = ctl(h[m : m + 1], li, torch.tensor([beta]), torch.ones(1))[0]
            assert torch.allclose(got[m], ref, atol=1e-4, rtol=1e-4), (li, m)
            best = max(range(3), key=got[m].__getitem__)  # the first largest
            assert first[m] == best and paths[m] == sub[li][best]


@needs_native
def test_native_rows_refuse_what_they_cannot_take():
    ctl = _random_adaptive(96, 5, seed=0)
    rows = NativeRows.of(ctl, [0.0, -1.0], None)
    assert rows is not None
    with pytest.raises(NativeArgumentError):
        rows.paths(0, torch.zeros(3, 96, dtype=torch.bfloat16))  # three rows for two requests
    with pytest.raises(NativeArgumentError):
        rows.paths(5, torch.zeros(2, 96, dtype=torch.bfloat16))  # no layer 5
    with pytest.raises(NativeArgumentError):
        rows.paths(0, torch.zeros(2, 96))  # fp32
    assert NativeRows.of(ctl, [0.0] * (native.LIMIT_ROWS + 1), None) is None
    assert NativeRows.of(Controller(96, 5, k=16), [0.0, 0.0], None) is None  # PyTorch's
    with native.disabled():
        assert NativeRows.of(ctl, [0.0, 0.0], None) is None


@needs_native
def test_batched_decode_with_native_rows_writes_what_pytorch_does(
    adaptive_engine: Engine, monkeypatch
):
    """Requests decoded together (one row each per step) with the rows' paths from C: the same
    text, paths and joules as with the PyTorch controller (NativeRows switched off), and C ran."""
    e = adaptive_engine
    reqs = [
        GenerationRequest(ARTICLE[: 80 + 40 * i], energy_budget_ratio=r, max_new_tokens=10)
        for i, r in enumerate((0.3, 0.6, 1.0, 2.0))
    ]
    calls = []
    real = NativeRows.paths

    def counted(self, li, h):
        calls.append(h.shape[0])
        return real(self, li, h)

    monkeypatch.setattr(NativeRows, "paths", counted)
    with_c = e.generate(reqs)
    assert calls and max(calls) == len(reqs)
    monkeypatch.setattr(NativeRows, "of", classmethod(lambda cls, *a: None))
    calls.clear()
    without = e.generate(reqs)
    assert not calls
    for a, b in zip(with_c, without, strict=True):
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
        assert a.stats.paths == b.stats.paths
        assert a.stats.modelled_j == pytest.approx(b.stats.modelled_j, rel=1e-12)
