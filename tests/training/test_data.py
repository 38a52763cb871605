"""The data loader: local JSONL, the hub path's error when offline, clear messages."""

from __future__ import annotations

import pytest

from hest_core.exec.loading import load_tokenizer
from training import data
from training.data import DataError, load_pairs, target_text, tokenize


def test_jsonl_loads_and_limits(pairs_file):
    assert [p.id for p in load_pairs(pairs_file)] == ["a", "b", "c"]
    assert len(load_pairs(pairs_file, limit=2)) == 2


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json\n", "not valid JSON"),
        ('{"id": "x", "article": "text"}\n', "highlights"),
        ("[1, 2]\n", "JSON object"),
        ("\n", "no examples"),
    ],
)
def test_bad_jsonl_is_a_clear_error(tmp_path, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=needle):
        load_pairs(p)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist.*hub:abisee/cnn_dailymail"):
        load_pairs(tmp_path / "nope.jsonl")


def test_hub_offline_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load abisee/cnn_dailymail.*3.0.0.*test.*network"):
        load_pairs("hub:abisee/cnn_dailymail:test")
    with pytest.raises(DataError, match="not supported"):
        load_pairs("hub:someone/else:train")
    assert data.HUB_CONFIG == "3.0.0"


def test_tokenize_uses_the_shared_prompt(pairs_file):
    from hest_core.runtime.prompt import build_prompt, end_of_turn_id

    tok = load_tokenizer("tiny:llama", progress=False)
    pair = load_pairs(pairs_file)[0]
    ex = tokenize(tok, pair, max_article_tokens=8, max_summary_tokens=5)
    assert ex.prompt == build_prompt(tok, pair.article, 8)[0]
    assert ex.truncated and len(ex.summary) == 5
    assert ex.summary[-1] == end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    assert target_text("A b .\nC d .") == "A b. C d."


def test_targets_end_on_a_token_the_engine_stops_on(tiny_engine, pairs_file):
    """One definition of the end of a turn (hest_core/runtime/prompt.py) for training and serving."""
    from hest_core.runtime.prompt import end_of_turn_id, stop_token_ids

    tok = tiny_engine.tokenizer
    ex = tokenize(tok, load_pairs(pairs_file)[0], max_article_tokens=16, max_summary_tokens=64)
    assert ex.summary[-1] == end_of_turn_id(tok)
    assert tiny_engine.eos_ids == stop_token_ids(tok)
    assert end_of_turn_id(tok) in tiny_engine.eos_ids
    # the chat template closes an assistant turn with the same token
    turn = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    text = tok.apply_chat_template(turn, tokenize=False)
    assert text.rstrip().endswith(tok.convert_ids_to_tokens(end_of_turn_id(tok)))
