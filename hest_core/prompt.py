"""The one prompt format shared by training, evaluation, the CLI and the server: the prompt
(`build_prompt`) and how the assistant's turn ends (`end_of_turn_id`, `stop_token_ids`)."""

from __future__ import annotations

INSTRUCTION = "Summarize the following news article in 3 sentences.\n\n"
DEFAULT_MAX_ARTICLE_TOKENS = 512
# Tokens that close an assistant turn in the chat templates of the supported families, in order
# of preference: ChatML (SmolLM2, Qwen) `<|im_end|>`, Llama-3 `<|eot_id|>`.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>")
# Also ends generation where the tokenizer has it as a real token (GPT-2-style end of text).
END_OF_TEXT = "<|endoftext|>"


def _token_id(tokenizer, name: str) -> int | None:
    """The id of a special token, or None where the tokenizer lacks it (maps it to unk)."""
    tid = tokenizer.convert_tokens_to_ids(name)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id:
        return tid
    return None


def end_of_turn_id(tokenizer) -> int:
    """The token that ends the assistant's turn: what training appends to every target summary.

    The first of END_OF_TURN the tokenizer has, else its `eos_token_id`. Always one of
    `stop_token_ids(tokenizer)`, so what the adapter learns to end on is what generation stops on.
    """
    for name in END_OF_TURN:
        if (tid := _token_id(tokenizer, name)) is not None:
            return tid
    return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer) -> set[int]:
    """Every token that ends generated text: the end of turn, `eos_token_id`, END_OF_TURN and
    END_OF_TEXT where the tokenizer has them."""
    ids = {tokenizer.eos_token_id} | {_token_id(tokenizer, n) for n in (*END_OF_TURN, END_OF_TEXT)}
    return {t for t in ids if t is not None}  # holds end_of_turn_id(tokenizer) by construction


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
