"""Shared fixtures: a temp JSONL of CNN/DM-shaped pairs and a tiny-model training run."""

from __future__ import annotations

import json

import pytest

ARTICLES = [
    (
        "a",
        "The cat sat on the mat. It was a sunny day in London. People walked by and smiled. "
        "A dog barked twice.",
        "Cat sat on mat .\nSunny day in London .",
    ),
    (
        "b",
        "Stocks fell sharply on Monday. Investors worried about inflation. The central bank "
        "will meet next week. Oil prices rose.",
        "Stocks fell .\nInflation worries investors .",
    ),
    (
        "c",
        "A new bridge opened in the city. Officials said traffic would improve. Residents "
        "were cautious. Work took three years.",
        "New bridge opens .\nTraffic should improve .",
    ),
]


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    p.write_text(
        "".join(json.dumps({"id": i, "article": a, "highlights": h}) + "\n" for i, a, h in ARTICLES)
    )
    return p


def train_argv(pairs_file, out, steps: int, method: str = "hest", *extra: str) -> list[str]:
    return [
        "--model",
        "tiny:llama",
        "--data",
        str(pairs_file),
        "--method",
        method,
        "--steps",
        str(steps),
        "--batch",
        "2",
        "--out",
        str(out),
        "--dtype",
        "fp32",
        "--max-article-tokens",
        "32",
        "--max-summary-tokens",
        "8",
        "--z-rank",
        "8",
        "--ckpt-every",
        "2",
        "--lr",
        "0.05",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="session")
def trained(pairs_file, tmp_path_factory):
    """A 4-step uninterrupted HEST run on the tiny model: its output directory."""
    from training.train import main

    out = tmp_path_factory.mktemp("run_full")
    main(train_argv(pairs_file, out, 4))
    return out
