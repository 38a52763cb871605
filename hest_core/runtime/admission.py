"""Admission: what `Engine.check` makes of a `GenerationRequest` before it runs: its fields
validated once, its prompt built within the context, its budget in picojoules, and the read
plan (reading.py) applied where the budget cannot pay for the whole article and a summary."""

from __future__ import annotations

from ..errors import InvalidInputError
from .budget import budget_q_of, requested_budget
from .decoding import check_options, check_system
from .prompt import build_prompt, fit_prompt, template_tokens
from .reading import READ_MODES, plan_read, policy_read_budget_q
from .request import GenerationRequest, PreparedRequest


def _flag(v, name: str) -> bool:
    """A request's boolean field `name`: true or false, else InvalidInputError."""
    if not isinstance(v, bool):
        raise InvalidInputError(
            f"{name}={v!r} must be true or false", param=name, code=f"invalid_{name}"
        )
    return v


def _read_mode(v) -> str:
    """A request's `read` field: one of reading.READ_MODES, else InvalidInputError."""
    if v not in READ_MODES:
        raise InvalidInputError(
            f"read={v!r} must be one of {', '.join(READ_MODES)}", param="read", code="invalid_read"
        )
    return v


def _check_text(engine, text) -> None:
    """The article: a non-empty string within the engine's character limit."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError(
            "text is empty; send the article to summarise", param="text", code="empty_text"
        )
    if len(text) > engine.max_input_chars:
        raise InvalidInputError(
            f"text has {len(text)} characters, over the limit of {engine.max_input_chars}; "
            f"send at most {engine.max_input_chars} (the model reads {engine.context_tokens} "
            "tokens at most)",
            param="text",
            code="text_too_long",
        )


def _max_new(engine, r: GenerationRequest) -> int:
    """The request's max_new_tokens (the engine's default where unset), checked."""
    max_new = engine.default_max_new_tokens if r.max_new_tokens is None else r.max_new_tokens
    if (
        isinstance(max_new, bool)
        or not isinstance(max_new, int)
        or not 1 <= max_new <= engine.max_new_tokens_limit
    ):
        raise InvalidInputError(
            f"max_new_tokens={max_new!r} must be an integer in 1..{engine.max_new_tokens_limit}",
            param="max_new_tokens",
            code="invalid_max_new_tokens",
        )
    return max_new


def _fit(engine, r: GenerationRequest, max_new: int) -> tuple[list[int], bool, int]:
    """The prompt's token ids within the context that leaves room for max_new tokens: (ids,
    whether the article was truncated, tokens of the template around the article)."""
    with engine.tokenizer_lock:  # HF fast tokenizers are not safe across threads
        check_system(engine.tokenizer, r.system)
        check_system(engine.tokenizer, r.instruction, param="instruction")
        ids, truncated = fit_prompt(
            engine.tokenizer,
            r.text,
            engine.context_tokens - max_new,
            max_article_tokens=engine.max_article_tokens,
            system=r.system,
            instruction=r.instruction,
            truncate=_flag(r.truncate, "truncate"),
        )
        template = template_tokens(engine.tokenizer, r.system, r.instruction)
    return ids, truncated, template


def _plan(engine, budget_q: int, fp16_q: int, template: int, article: int, max_new: int):
    """(the read plan, what cut it: "budget" or "policy"): the budget's plan, or HEST's own with
    at most the engine's `read_ratio` x fp16_q planned (reading.policy_read_budget_q) where the
    adapter has one; "policy" where the budget alone would have read more."""
    em, path = engine.energy, engine.stop_path
    plan = plan_read(em, budget_q, template, article, max_new, path=path)
    own_q = policy_read_budget_q(budget_q, fp16_q, engine.read_ratio)
    if own_q < budget_q:
        own = plan_read(em, own_q, template, article, max_new, path=path)
        if own.read < plan.read:
            return own, "policy"
    return plan, "budget"


def admit(engine, r: GenerationRequest) -> PreparedRequest:
    """The checked request of `r` on `engine` (an Engine: its tokenizer, energy model, limits
    and policy). Raises InvalidInputError (a bad field: its `param`), BudgetTooLowError (a budget
    below the request's minimum, quoted)."""
    _check_text(engine, r.text)
    max_new = _max_new(engine, r)
    budget_param, budget_val = requested_budget(
        r.energy_budget_j, r.energy_budget_ratio, engine.default_budget_ratio
    )
    options = check_options(r)
    clean_end = _flag(r.clean_end, "clean_end")
    read = _read_mode(r.read)
    ids, truncated, template = _fit(engine, r, max_new)
    article = max(0, len(ids) - template)  # the article's tokens in the prompt
    fp16_q = engine.energy.reference_cost_q(len(ids), max_new)  # the ratio's reference
    budget_q = budget_q_of(budget_param, budget_val, fp16_q)
    read_n, truncated_by = article, "context" if truncated else None
    if read == "budget" and engine.guard_mode != "off" and article:
        plan, by = _plan(engine, budget_q, fp16_q, template, article, max_new)
        if plan.cut:
            with engine.tokenizer_lock:
                ids, _ = build_prompt(
                    engine.tokenizer, r.text, plan.read, system=r.system, instruction=r.instruction
                )
            read_n, truncated, truncated_by = plan.read, True, by
    return PreparedRequest(  # raises BudgetTooLowError below the minimum (guarded)
        ids=ids,
        max_new=max_new,
        budget_q=budget_q,
        fp16_q=fp16_q,
        min_q=engine.energy.min_feasible_q(len(ids), max_new, engine.stop_path),
        min_path=engine.policy if engine.stop_path is not None else None,
        truncated=truncated,
        article_tokens=article,
        article_read=read_n,
        truncated_by=truncated_by,
        cancelled=r.cancelled,
        budget_param=budget_param,
        guarded=engine.guard_mode != "off",
        clean_end=clean_end,
        **options,
    )
