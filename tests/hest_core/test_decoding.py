"""Decoding options of the runtime (issue 11, item 6): stop strings end generation before them and
are never streamed, log probabilities come from the real logits, sampling is seeded, a system
instruction enters the prompt. Expected texts come from a greedy run in the same test, so the
checks hold for any weights and any energy table."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hest_core import Engine, GenerationRequest, InvalidInputError
from hest_core.exec.loading import load_hf_model
from hest_core.runtime.decoding import MAX_SYSTEM_TOKENS, TokenTexts, cut_at_stop, sample
from hest_core.runtime.prompt import INSTRUCTION, template_tokens

TEXT = "The city council voted on Tuesday to expand the bus network after a year of delays."


def run(engine: Engine, **kw):
    """One request at ratio 1.0 (no energy stop); (result, streamed pieces)."""
    pieces: list[str] = []
    req = GenerationRequest(TEXT, energy_budget_ratio=1.0, **({"max_new_tokens": 16} | kw))
    res = engine.generate([req], on_token=lambda i, d: pieces.append(d))[0]
    return res, pieces


# ---- stop strings --------------------------------------------------------------------------------
def test_stop_ends_generation_before_it_and_is_never_streamed(tiny_engine: Engine) -> None:
    greedy, _ = run(tiny_engine)
    text = greedy.text
    assert len(text) >= 4, repr(text)
    checked = 0
    for k in range(0, len(text) - 1, max(1, len(text) // 6)):
        for n in (1, 2, 3, 5):
            stop = text[k : k + n]
            res, pieces = run(tiny_engine, stop=(stop,))
            assert res.text == text[: text.find(stop)], (stop, res.text)
            assert res.finish_reason == "stop"
            assert stop not in res.text
            assert "".join(pieces) == res.text  # nothing of the stop string went out
            # the runtime stopped: no more tokens than it took to complete the stop string
            assert res.stats.completion_tokens <= greedy.stats.completion_tokens
            checked += 1
    assert checked >= 8


def test_stop_that_never_completes_releases_the_held_text(tiny_engine: Engine) -> None:
    """A suffix held back because it could start a stop string is text once the request ends."""
    greedy, _ = run(tiny_engine)
    tail = greedy.text[-2:]
    res, pieces = run(tiny_engine, stop=(tail + "\x00", "\x01"))
    assert res.text == greedy.text
    assert res.finish_reason == greedy.finish_reason
    assert "".join(pieces) == res.text


def test_stop_saves_work(tiny_engine: Engine) -> None:
    greedy, _ = run(tiny_engine, max_new_tokens=24)
    first = greedy.text[:1]
    res, _ = run(tiny_engine, max_new_tokens=24, stop=first)  # a str is one stop string
    assert res.text == "" and res.finish_reason == "stop"
    assert res.stats.completion_tokens < greedy.stats.completion_tokens


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab\n", max_size=30),
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), min_size=1, max_size=4),
)
def test_cut_at_stop_streams_only_safe_prefixes(text: str, stops: list[str]) -> None:
    """Fed one character at a time, what may be streamed is always a prefix of the final text,
    and the text ends before the first stop string to complete (at the earliest start among the
    stop strings the text holds by then)."""
    stop = tuple(stops)
    streamed, full, hit = "", "", False
    for i in range(len(text) + 1):
        full, safe, hit = cut_at_stop(text[:i], stop)
        assert full[:safe].startswith(streamed)
        streamed = full[:safe]
        if hit:
            break
    ends = [text.find(s) + len(s) for s in stop if s in text]
    seen = text[: min(ends)] if ends else text  # the text when the first stop string completes
    starts = [seen.find(s) for s in stop if s in seen]
    assert full == (seen[: min(starts)] if starts else text)
    assert hit == bool(ends)
    assert full.startswith(streamed) and (streamed == full or not hit)


# ---- log probabilities ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_engine() -> Engine:
    return Engine.from_pretrained("tiny:llama", adapter=None, policy="fp16", progress=False)


def test_logprobs_are_the_models(fp16_engine: Engine) -> None:
    """Every entry against log_softmax of the transformers model's logits (fp32) on the same ids:
    the runtime's logits are bf16, so they agree to ~0.01."""
    hf = load_hf_model("tiny:llama")
    p = fp16_engine.check(
        GenerationRequest(TEXT, energy_budget_ratio=1.0, max_new_tokens=4, logprobs=5)
    )
    res = fp16_engine.generate([p])[0]
    assert res.logprobs is not None and len(res.logprobs) == res.stats.completion_tokens
    ids = list(p.ids)
    for entry in res.logprobs:
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)  # (V,)
        assert entry.logprob == pytest.approx(float(ref[entry.token_id]), abs=0.02)
        assert len(entry.top) == 5
        for alt in entry.top:
            assert alt.logprob == pytest.approx(float(ref[alt.token_id]), abs=0.02)
        assert entry.token_id == entry.top[0].token_id  # greedy: the chosen one is the top one
        ids.append(entry.token_id)


def test_logprob_entries_match_the_text(tiny_engine: Engine) -> None:
    res, pieces = run(tiny_engine, logprobs=2)
    entries = res.logprobs
    assert entries is not None and len(entries) == res.stats.completion_tokens
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace").startswith(res.text)
    for e in entries:
        values = [t.logprob for t in e.top]
        assert len(values) == 2 and values == sorted(values, reverse=True)
        assert e.logprob <= 0 and sum(math.exp(v) for v in values) <= 1 + 1e-6
        assert e.to_dict()["top_logprobs"][0] == e.top[0].to_dict(top=False)
    streamed = [e for d in pieces for e in d.logprobs]
    assert streamed == entries[: len(streamed)]  # streamed with the text they produced
    assert run(tiny_engine)[0].logprobs is None  # not asked: none computed


def test_token_texts_give_raw_bytes(tiny_engine: Engine) -> None:
    texts = TokenTexts(tiny_engine.tokenizer)
    ids = tiny_engine.tokenizer.encode("héllo 😀", add_special_tokens=False)
    raw = b"".join(bytes(texts(i)[1]) for i in ids)
    assert raw == "héllo 😀".encode()


# ---- sampling ------------------------------------------------------------------------------------
def test_same_seed_same_text_and_greedy_without_temperature(tiny_engine: Engine) -> None:
    greedy = run(tiny_engine)[0].text
    a = run(tiny_engine, temperature=1.0, seed=7)[0].text
    b = run(tiny_engine, temperature=1.0, seed=7)[0].text
    c = run(tiny_engine, temperature=1.0, seed=8)[0].text
    assert a == b
    assert a != c  # 16 tokens from ~49k near-uniform choices
    assert run(tiny_engine, temperature=0.0, seed=7)[0].text == greedy
    assert run(tiny_engine, temperature=1.0, top_p=0.0, seed=7)[0].text == greedy  # nucleus of 1
    assert run(tiny_engine, temperature=1e-300, seed=3)[0].text == greedy  # no inf/nan


def test_sample_follows_temperature_and_top_p() -> None:
    gen = torch.Generator().manual_seed(0)
    row = torch.tensor([0.0, math.log(3.0), -1e9])  # p = 0.25, 0.75, 0
    n = 4000
    draws = [sample(row, 1.0, 1.0, gen) for _ in range(n)]
    assert 2 not in draws
    assert abs(draws.count(1) / n - 0.75) < 0.03  # ~4.4 standard deviations
    hot = [sample(row, 2.0, 1.0, gen) for _ in range(n)]  # p ∝ sqrt: 0.366, 0.634
    assert abs(hot.count(1) / n - math.sqrt(3) / (1 + math.sqrt(3))) < 0.03
    assert {sample(row, 1.0, 0.7, gen) for _ in range(200)} == {1}  # 0.75 alone reaches 0.7
    assert {sample(row, 1.0, 0.8, gen) for _ in range(200)} == {0, 1}


# ---- system instruction and validation -----------------------------------------------------------
def test_system_instruction_enters_the_prompt(tiny_engine: Engine) -> None:
    plain = tiny_engine.check(GenerationRequest(TEXT))
    system = "Answer in French, in one sentence."
    p = tiny_engine.check(GenerationRequest(TEXT, system=system))
    prompt = tiny_engine.tokenizer.decode(p.ids)
    assert system in prompt and system not in tiny_engine.tokenizer.decode(plain.ids)
    assert p.fp16_cost_j != plain.fp16_cost_j  # the budget is priced on the prompt as sent


def test_an_instruction_replaces_the_default_one(tiny_engine: Engine) -> None:
    """`instruction` replaces "Summarize the following news article in 3 sentences." in the user
    turn (a digest's "Summarize each of ..."); the read plan's template count includes it."""
    plain = tiny_engine.check(GenerationRequest(TEXT))
    mine = "Summarize each of the following news articles in one or two sentences."
    p = tiny_engine.check(GenerationRequest(TEXT, instruction=mine))
    prompt, default = tiny_engine.tokenizer.decode(p.ids), tiny_engine.tokenizer.decode(plain.ids)
    assert mine in prompt and mine not in default
    assert INSTRUCTION.strip() in default and INSTRUCTION.strip() not in prompt
    # the article is counted without it (tokenisation at its edge may move a token)
    assert abs(p.article_tokens - plain.article_tokens) <= 1
    assert template_tokens(tiny_engine.tokenizer, None, mine) > template_tokens(
        tiny_engine.tokenizer
    )


@pytest.mark.parametrize(
    ("kw", "param", "code"),
    [
        ({"stop": ("a", "b", "c", "d", "e")}, "stop", "invalid_stop"),
        ({"stop": ("",)}, "stop", "invalid_stop"),
        ({"logprobs": 21}, "logprobs", "invalid_logprobs"),
        ({"logprobs": True}, "logprobs", "invalid_logprobs"),
        ({"temperature": 2.5}, "temperature", "invalid_temperature"),
        ({"temperature": float("nan")}, "temperature", "invalid_temperature"),
        ({"top_p": 1.5}, "top_p", "invalid_top_p"),
        ({"seed": "7"}, "seed", "invalid_seed"),
        ({"system": "  "}, "system", "empty_system"),
        ({"system": "word " * (MAX_SYSTEM_TOKENS + 1)}, "system", "system_too_long"),
        ({"instruction": " \n"}, "instruction", "empty_instruction"),
        ({"instruction": 7}, "instruction", "empty_instruction"),
        ({"instruction": "word " * (MAX_SYSTEM_TOKENS + 1)}, "instruction", "instruction_too_long"),
    ],
)
def test_bad_decoding_options_are_clear_errors(tiny_engine: Engine, kw, param, code) -> None:
    with pytest.raises(InvalidInputError) as info:
        tiny_engine.check(GenerationRequest(TEXT, **kw))
    assert (info.value.param, info.value.code) == (param, code)
