"""HTTP request -> the runtime's request: `runtime_request` is the one place a validated body of
either API (native summarize or OpenAI chat) becomes a `hest_core.GenerationRequest`, and
`chat_param` maps a runtime error's field back to the chat field it came from. Pure functions:
no I/O, no engine; the server's defaults (budget ratio, max_new_tokens) are filled in by
`Serving.submit` from the settings."""

from __future__ import annotations

import re
from typing import Any

from hest_core import GenerationRequest, InvalidInputError

from .openai_protocol import ChatCompletionRequest, SystemMessage, UserMessage
from .protocol import MAX_NEW_TOKENS, SummarizeRequest

# a leading instruction paragraph such as "Summarize the following news article in 3 sentences."
_INSTRUCTION = re.compile(r"^\s*summari[sz]e\b[^\n]*\n\s*\n", re.IGNORECASE)
MESSAGES_RULE = (
    "messages must be one user message (the text to summarise), optionally after one system or "
    "developer message (instructions for the model); earlier turns and several instructions are "
    "not supported: send the text to summarise as one user message"
)


def runtime_request(body: SummarizeRequest | ChatCompletionRequest) -> GenerationRequest:
    """The runtime request of a validated HTTP body. Both APIs carry the budget fields and
    `clean_end` under the same names; the text, the token limit and the decoding options are each
    API's own. Raises InvalidInputError for what the schema cannot check (chat_fields)."""
    fields = chat_fields(body) if isinstance(body, ChatCompletionRequest) else native_fields(body)
    return GenerationRequest(
        energy_budget_j=body.energy_budget_j,
        energy_budget_ratio=body.energy_budget_ratio,
        clean_end=body.clean_end,
        truncate=body.truncate,
        read=body.read,
        **fields,
    )


def native_fields(body: SummarizeRequest) -> dict[str, Any]:
    """`POST /v1/summarize`: the text as it is, under the request's instruction if it gives one;
    decoding is greedy."""
    return {
        "text": body.text,
        "max_new_tokens": body.max_new_tokens,
        "instruction": body.instruction,
    }


def _text(msg: SystemMessage | UserMessage) -> str:
    if isinstance(msg.content, list):  # text parts only (the schema refuses other parts)
        return "\n".join(p.text for p in msg.content)
    return msg.content


def _check_chat(body: ChatCompletionRequest) -> None:
    """InvalidInputError for what pydantic does not check: the order of messages, top_logprobs
    without logprobs, the max_tokens limits."""
    msgs = body.messages
    if len(msgs) > 2 or msgs[-1].role != "user" or (len(msgs) == 2 and msgs[0].role == "user"):
        raise InvalidInputError(MESSAGES_RULE, param="messages", code="invalid_messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidInputError(
            f"top_logprobs={body.top_logprobs} needs logprobs: true",
            param="top_logprobs",
            code="invalid_logprobs",
        )
    for name in ("max_completion_tokens", "max_tokens"):  # each is a bound; both: the smaller
        n = getattr(body, name)
        if n is not None and n > MAX_NEW_TOKENS:
            raise InvalidInputError(
                f"{name}={n} must be an integer in 1..{MAX_NEW_TOKENS}",
                param=name,
                code="invalid_max_new_tokens",
            )


def chat_fields(body: ChatCompletionRequest) -> dict[str, Any]:
    """`POST /v1/chat/completions`: the user message (without a leading "Summarize ..."
    paragraph: the server's prompt adds the instruction), the system/developer message, the
    smaller token limit, and OpenAI's decoding options."""
    _check_chat(body)
    msgs = body.messages
    limits = [n for n in (body.max_completion_tokens, body.max_tokens) if n is not None]
    return {
        "text": _INSTRUCTION.sub("", _text(msgs[-1]), count=1),
        "system": _text(msgs[0]) if len(msgs) == 2 else None,
        "max_new_tokens": min(limits) if limits else None,
        "stop": (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        "logprobs": (body.top_logprobs or 0) if body.logprobs else None,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
    }


def chat_param(param: str | None, body: ChatCompletionRequest) -> str | None:
    """The chat field behind a runtime error's param."""
    if param == "max_new_tokens":
        return "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    return {"text": "messages", "system": "messages", "logprobs": "top_logprobs"}.get(
        param or "", param
    )
