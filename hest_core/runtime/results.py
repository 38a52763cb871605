"""A finished request's `GenerationResult` and its `RequestStats`, from its run state."""

from __future__ import annotations

from ..energy.model import PJ
from ..errors import HestError
from .generation import RequestState
from .request import GenerationResult, PreparedRequest, RequestStats


def result_of(engine, st: RequestState, measured_j: float, estimated_j: float) -> GenerationResult:
    """The result of a request that ran. `measured_j` (its share of the meter's windows) is
    reported only when the engine's meter measures; times count from its `submit`."""
    mj = st.guard.spent_j
    names = st.guard.em.paths  # the registry the engine was built under
    per_layer = [dict(zip(names, c, strict=True)) for c in st.layer_counts]
    paths = {p: sum(c[i] for c in st.layer_counts) for i, p in enumerate(names)}
    meter = engine.meter.name
    done = st.done_s
    stats = RequestStats(
        budget_j=st.req.budget_j,
        budget_ratio=st.req.budget_ratio,
        fp16_cost_j=st.req.fp16_cost_j,
        modelled_j=mj,
        measured_j=measured_j if meter != "estimate" else None,
        prefill_j=st.prefill_q / PJ,
        decode_j=mj - st.prefill_q / PJ,
        estimated_j=estimated_j,
        meter=meter,
        prompt_tokens=len(st.req.ids),
        completion_tokens=len(st.out_ids),
        paths=paths,
        paths_per_layer=per_layer,
        demotions=st.guard.demotions,
        truncated=st.req.truncated,
        article_tokens=st.req.article_tokens,
        article_tokens_read=st.req.article_read,
        truncated_by=st.req.truncated_by,
        ttft_s=st.ttft_s,
        prefill_s=st.prefill_s,
        decode_s=max(0.0, done - st.prefill_s),
        total_s=done,
    )
    lps = st.dec.logprobs if st.req.logprobs is not None else None
    return GenerationResult(st.text, st.finish or "length", stats, lps, st.error, st.plan.reason)


def failed_result(engine, p: PreparedRequest, err: HestError) -> GenerationResult:
    """The result of a request that did not run: no text, no energy spent."""
    n_layers = engine.lean.spec.n_layers
    stats = RequestStats(
        budget_j=p.budget_j,
        budget_ratio=p.budget_ratio,
        fp16_cost_j=p.fp16_cost_j,
        modelled_j=0.0,
        measured_j=None,
        prefill_j=0.0,
        decode_j=0.0,
        estimated_j=0.0,
        meter=engine.meter.name,
        prompt_tokens=len(p.ids),
        completion_tokens=0,
        paths=dict.fromkeys(engine.energy.paths, 0),
        paths_per_layer=[dict.fromkeys(engine.energy.paths, 0) for _ in range(n_layers)],
        demotions=0,
        truncated=p.truncated,
        article_tokens=p.article_tokens,
        article_tokens_read=p.article_read,
        truncated_by=p.truncated_by,
    )
    return GenerationResult("", "error", stats, None, err)
