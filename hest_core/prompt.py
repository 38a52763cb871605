"""The one prompt format shared by training, evaluation, the CLI and the server."""

from __future__ import annotations

INSTRUCTION = "Summarize the following news article in 3 sentences.\n\n"
DEFAULT_MAX_ARTICLE_TOKENS = 512


def build_prompt(
    tokenizer,
    article: str,
    max_article_tokens: int = DEFAULT_MAX_ARTICLE_TOKENS,
    system: str | None = None,
):
    """Chat-template prompt ids for one article cut to `max_article_tokens` tokens.

    Returns (ids: list[int], truncated: bool). The article is cut on token boundaries before it
    goes into the template, so the instruction and the assistant turn are never cut. `system`, when
    given, is the system turn (it replaces the template's default system prompt, if any).
    """
    art_ids = tokenizer.encode(article.strip(), add_special_tokens=False)
    truncated = len(art_ids) > max_article_tokens
    if truncated:
        article = tokenizer.decode(art_ids[:max_article_tokens])
    messages = [{"role": "user", "content": INSTRUCTION + article.strip()}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system.strip()})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids), truncated
