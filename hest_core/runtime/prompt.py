"""The one prompt format shared by training, evaluation, the CLI and the server: the prompt
(`build_prompt`) and how the assistant's turn ends (`end_of_turn_id`, `stop_token_ids`)."""

from __future__ import annotations

from ..errors import InvalidInputError

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
    max_article_tokens: int | None = DEFAULT_MAX_ARTICLE_TOKENS,
    system: str | None = None,
    instruction: str | None = None,
):
    """Chat-template prompt ids for one article cut to `max_article_tokens` tokens (None: the
    whole article).

    Returns (ids: list[int], truncated: bool). The article is cut on token boundaries before it
    goes into the template, so the instruction and the assistant turn are never cut. `system`, when
    given, is the system turn (it replaces the template's default system prompt, if any);
    `instruction`, when given, replaces INSTRUCTION before the article in the user turn.
    """
    art_ids = tokenizer.encode(article.strip(), add_special_tokens=False)
    truncated = max_article_tokens is not None and len(art_ids) > max_article_tokens
    if truncated:
        article = tokenizer.decode(art_ids[:max_article_tokens])
    head = INSTRUCTION if instruction is None else instruction.strip() + "\n\n"
    messages = [{"role": "user", "content": head + article.strip()}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system.strip()})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids), truncated


def template_tokens(tokenizer, system: str | None = None, instruction: str | None = None) -> int:
    """Prompt tokens around the article: the chat template, the instruction and the system turn
    (`build_prompt` of an empty article; tokenisation at the article's edges may shift it by a
    token)."""
    return len(build_prompt(tokenizer, "", None, system=system, instruction=instruction)[0])


def fit_prompt(
    tokenizer,
    article: str,
    room: int,
    *,
    max_article_tokens: int | None = None,
    system: str | None = None,
    instruction: str | None = None,
    truncate: bool = False,
) -> tuple[list[int], bool]:
    """The prompt of `article` within `room` tokens (the model's context minus the tokens the
    request may generate). Returns (ids, truncated).

    Over the room: raises InvalidInputError (code `context_length_exceeded`) quoting the prompt's
    length, the room and the context, unless `truncate`, which cuts the article (never the
    instruction or the system turn) to fit. Never cuts silently."""
    ids, truncated = build_prompt(
        tokenizer, article, max_article_tokens, system=system, instruction=instruction
    )
    over = len(ids) - room
    if over <= 0:
        return ids, truncated
    if not truncate:
        raise InvalidInputError(
            f"the prompt is {len(ids)} tokens, {over} over the {room} that the model's context "
            "leaves it beside the tokens the request may generate (max_new_tokens): shorten the "
            f"text by about {over} tokens, lower max_new_tokens, or send truncate=true to cut the "
            "article to fit",
            param="text",
            code="context_length_exceeded",
        )
    n_art = len(tokenizer.encode(article.strip(), add_special_tokens=False))
    keep = min(n_art, max_article_tokens or n_art) - over
    if keep <= 0:
        raise InvalidInputError(
            f"the instruction and system turn alone take {len(ids) - n_art} tokens, leaving no room "
            f"for the article within {room} tokens: shorten the system message or the instruction, or lower "
            "max_new_tokens",
            param="text",
            code="context_length_exceeded",
        )
    ids, _ = build_prompt(tokenizer, article, keep, system=system, instruction=instruction)
    while len(ids) > room and keep > 1:  # re-tokenising at the cut can add a token or two
        keep -= max(1, len(ids) - room)
        ids, _ = build_prompt(tokenizer, article, keep, system=system, instruction=instruction)
    return ids, True
