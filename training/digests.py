"""Long-input evaluation sets (issue 16): digests of consecutive CNN/DM articles at about 2k, 4k
and 7k tokens, summarised article by article.

    python -m training.digests --data ../shared/data/cnndm/test.jsonl --lengths 2048,4096,7168 \
        --per-length 5 --out runs/digests
    python -m training.evaluate --data runs/digests/digests_4096.jsonl --policies fp16,int4,hest ...

Each digest is the next articles of the file, in order, joined as "Article 1:\\n...\\n\\nArticle
2:\\n..." while the joined text stays within the length (tokens of the default model's
tokenizer; an article that alone passes the length is passed over), at most `MAX_ARTICLES` of
them. Its row holds the instruction "Summarize each of the following news articles in one or two
sentences." (the request's `instruction`, which replaces the default one), the articles'
highlights joined as the reference, and `max_new_tokens` = 48 per article. Digests of one length
never share an article; different lengths start again from the file's first row.
`training.evaluate` reads `instruction` and `max_new_tokens` from each row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .data import Pair, load_pairs

INSTRUCTION = "Summarize each of the following news articles in one or two sentences."
TOKENS_PER_ARTICLE = 48
# 48 tokens x 10 articles = 480 <= the engine's max_new_tokens limit (512), and a 7k-token digest
# plus its summary stays within the default model's 8,192 positions
MAX_ARTICLES = 10


def build(pairs: list[Pair], count_tokens, length: int, n: int) -> list[dict]:
    """Up to `n` digests of about `length` tokens from `pairs` in order (rows for a JSONL file).
    `count_tokens(text) -> int`."""
    out: list[dict] = []
    i = 0
    while len(out) < n and i < len(pairs):
        parts: list[Pair] = []
        text = ""
        while i < len(pairs) and len(parts) < MAX_ARTICLES:
            candidate = _join(parts + [pairs[i]])
            if count_tokens(candidate) > length:
                if not parts:  # alone over the length: passed over
                    i += 1
                    continue
                break
            parts.append(pairs[i])
            text = candidate
            i += 1
        if not parts:
            break
        out.append(
            {
                "id": f"digest{length}-{len(out):03d}",
                "article": text,
                "highlights": "\n".join(p.highlights.strip() for p in parts),
                "instruction": INSTRUCTION,
                "max_new_tokens": TOKENS_PER_ARTICLE * len(parts),
                "articles": [p.id for p in parts],
                "tokens": count_tokens(text),
            }
        )
    return out


def _join(parts: list[Pair]) -> str:
    return "\n\n".join(f"Article {k + 1}:\n{p.article.strip()}" for k, p in enumerate(parts))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/cnndm/test.jsonl")
    ap.add_argument("--lengths", default="2048,4096,7168", help="target tokens per digest")
    ap.add_argument("--per-length", type=int, default=5, help="digests per length")
    ap.add_argument("--out", default="runs/digests", help="folder for digests_<length>.jsonl")
    args = ap.parse_args(argv)
    from hest_core.exec.loading import load_tokenizer

    tok = load_tokenizer("default", progress=False)

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    pairs = load_pairs(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for length in (int(v) for v in args.lengths.split(",") if v.strip()):
        rows = build(pairs, count, length, args.per_length)
        path = out / f"digests_{length}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sizes = ", ".join(f"{r['tokens']} ({len(r['articles'])} articles)" for r in rows)
        print(f"wrote {path}: {len(rows)} digests: {sizes}")


if __name__ == "__main__":
    main()
