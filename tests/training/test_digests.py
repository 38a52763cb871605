"""Digests for the long-input evaluation (issue 16): consecutive articles within a token length,
the issue's instruction, the highlights joined as the reference, 48 tokens per article; and the
loader and evaluation reading a row's own instruction and token limit."""

from __future__ import annotations

import json

import pytest

from training import digests
from training.data import DataError, Pair, load_pairs


def words(text: str) -> int:
    return len(text.split())


PAIRS = [
    Pair(f"p{i}", " ".join(["w"] * n), f"Highlight {i}.")
    for i, n in enumerate([30, 40, 500, 20, 25])
]


def test_digests_join_consecutive_articles_within_the_length() -> None:
    rows = digests.build(PAIRS, words, 100, 5)
    # p0 + p1 fit (74 words with the headers); p2 alone is over 100: passed over; p3 + p4 fit
    assert [r["articles"] for r in rows] == [["p0", "p1"], ["p3", "p4"]]
    first = rows[0]
    assert first["article"].startswith("Article 1:\n") and "\n\nArticle 2:\n" in first["article"]
    assert first["highlights"] == "Highlight 0.\nHighlight 1."
    assert first["instruction"] == digests.INSTRUCTION
    assert first["max_new_tokens"] == 2 * digests.TOKENS_PER_ARTICLE
    assert all(r["tokens"] == words(r["article"]) <= 100 for r in rows)
    assert digests.build(PAIRS, words, 100, 1) == rows[:1]  # at most n


def test_a_digest_holds_at_most_max_articles() -> None:
    many = [Pair(f"q{i}", "w", "h.") for i in range(25)]
    rows = digests.build(many, words, 10_000, 3)
    assert [len(r["articles"]) for r in rows] == [digests.MAX_ARTICLES] * 2 + [5]
    assert max(r["max_new_tokens"] for r in rows) <= 512  # the engine's limit


def test_rows_carry_their_instruction_and_token_limit(tmp_path) -> None:
    rows = digests.build(PAIRS, words, 100, 5)
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_pairs(p)
    assert [(x.instruction, x.max_new_tokens) for x in loaded] == [
        (digests.INSTRUCTION, 2 * digests.TOKENS_PER_ARTICLE)
    ] * 2
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"id": "a", "article": "x", "highlights": "y"}) + "\n")
    assert load_pairs(plain)[0].instruction is None and load_pairs(plain)[0].max_new_tokens is None


@pytest.mark.parametrize(
    "extra", [{"instruction": "  "}, {"instruction": 3}, {"max_new_tokens": "48"}]
)
def test_bad_digest_fields_are_clear_errors(tmp_path, extra) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"id": "a", "article": "x", "highlights": "y"} | extra) + "\n")
    with pytest.raises(DataError, match="instruction|max_new_tokens"):
        load_pairs(p)
