"""server/requests.py: the one mapping of a validated HTTP body, native or chat, to the runtime's
GenerationRequest, and of a runtime error's field back to the chat field. Pure: no engine."""

from __future__ import annotations

import pytest

from hest_core import GenerationRequest, InvalidInputError
from server.openai_protocol import ChatCompletionRequest
from server.protocol import SummarizeRequest
from server.requests import chat_param, runtime_request

USER = {"role": "user", "content": "Summarize this.\n\nThe council voted."}
CASES = [  # (body, the runtime request it maps to)
    (
        SummarizeRequest(text="The council voted.", energy_budget_j=2.5, max_new_tokens=8),
        GenerationRequest("The council voted.", energy_budget_j=2.5, max_new_tokens=8),
    ),
    (
        SummarizeRequest(text="t", energy_budget_ratio=0.4, clean_end=False, stream=True),
        GenerationRequest("t", energy_budget_ratio=0.4, clean_end=False),
    ),
    (  # a digest's own instruction replaces the default one
        SummarizeRequest(text="t", instruction="Summarize each article in one sentence."),
        GenerationRequest("t", instruction="Summarize each article in one sentence."),
    ),
    (  # the leading "Summarize ..." paragraph goes (the server's prompt has the instruction)
        ChatCompletionRequest(model="m", messages=[USER]),
        GenerationRequest("The council voted."),
    ),
    (
        ChatCompletionRequest.model_validate(
            {
                "model": "m",
                "messages": [{"role": "system", "content": "In French."}, USER],
                "max_tokens": 9,
                "max_completion_tokens": 7,
                "stop": "\n",
                "logprobs": True,
                "top_logprobs": 2,
                "temperature": 0.5,
                "top_p": 0.9,
                "seed": 3,
                "energy_budget_ratio": 0.6,
                "clean_end": False,
            }
        ),
        GenerationRequest(
            "The council voted.",
            energy_budget_ratio=0.6,
            max_new_tokens=7,
            stop=("\n",),
            logprobs=2,
            temperature=0.5,
            top_p=0.9,
            seed=3,
            system="In French.",
            clean_end=False,
        ),
    ),
]


@pytest.mark.parametrize(("body", "expected"), CASES)
def test_runtime_request(body, expected) -> None:
    assert runtime_request(body) == expected


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"messages": [USER, USER]}, "messages"),
        ({"messages": [USER, {"role": "system", "content": "x"}]}, "messages"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_tokens": 513}, "max_tokens"),
    ],
)
def test_chat_rules_the_schema_cannot_state(extra, param) -> None:
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [USER]} | extra)
    with pytest.raises(InvalidInputError) as err:
        runtime_request(body)
    assert err.value.param == param


def test_chat_param_names_the_chat_field() -> None:
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [USER], "max_tokens": 5})
    assert chat_param("max_new_tokens", body) == "max_tokens"
    assert chat_param("system", body) == "messages"
    assert chat_param("logprobs", body) == "top_logprobs"
    assert chat_param("seed", body) == "seed"
