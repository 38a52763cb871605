"""What a request asks of decoding beyond its budget: stop strings, sampling, log probabilities
and a system instruction. `generation.BatchRunner` calls `choose` where the next token of every row
is picked and `cut_at_stop` where its text is emitted.

* Sampling: temperature 0 (or None) is greedy (argmax). Above 0 a row samples from
  softmax(logits / temperature), restricted to the smallest set of tokens whose probability
  reaches `top_p` (the top token always stays), with its own `torch.Generator` seeded from `seed`
  (no seed: a random one; any integer, taken modulo 2**64). Same seed, same prompt, same batch:
  same text.
* Log probabilities: `log_softmax` of the raw logits the token was chosen from (before temperature
  and top_p), computed only for rows that asked; the chosen token plus the `logprobs` most likely.
* Stop strings: the text ends before the first occurrence of any of them; a suffix that may still
  grow into one is held back from the stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import InvalidInputError

MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
MAX_TEMPERATURE = 2.0
MAX_SYSTEM_TOKENS = 1024  # a system instruction, so prompt + generation stay within positions


@dataclass(frozen=True)
class TokenLogprob:
    """One token and its log probability; `top` holds the most likely alternatives at its
    position (each a TokenLogprob without `top`). `token` is the token's text, with bytes that are
    not whole UTF-8 characters written as \\xNN; `bytes` are its raw UTF-8 bytes."""

    token_id: int
    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TokenLogprob, ...] = ()

    def to_dict(self, top: bool = True) -> dict:
        """OpenAI's shape: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}."""
        d = {"token": self.token, "logprob": self.logprob, "bytes": list(self.bytes)}
        if top:
            d["top_logprobs"] = [t.to_dict(top=False) for t in self.top]
        return d


class TextDelta(str):
    """A streamed text piece (a `str`); `.logprobs` lists the entries of the tokens that produced
    it when its request asked for log probabilities (else it is empty)."""

    logprobs: tuple[TokenLogprob, ...] = ()

    @classmethod
    def of(cls, text: str, logprobs: list[TokenLogprob]) -> TextDelta:
        """A delta carrying `logprobs`."""
        d = cls(text)
        d.logprobs = tuple(logprobs)
        return d


# ---- validation ----------------------------------------------------------------------------------
def check_options(r) -> dict:
    """Validate a GenerationRequest's decoding fields; returns PreparedRequest keyword arguments.
    Raises InvalidInputError naming the field."""
    stop = (r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ())
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise InvalidInputError(
            f"stop={r.stop!r} must be at most {MAX_STOP} non-empty strings",
            param="stop",
            code="invalid_stop",
        )
    lp = r.logprobs
    if lp is not None and (_not_int(lp) or not 0 <= lp <= MAX_TOP_LOGPROBS):
        raise InvalidInputError(
            f"logprobs={lp!r} must be an integer in 0..{MAX_TOP_LOGPROBS} (alternatives per token)",
            param="logprobs",
            code="invalid_logprobs",
        )
    temp = 0.0 if r.temperature is None else r.temperature
    if not _number_in(temp, 0.0, MAX_TEMPERATURE):
        raise InvalidInputError(
            f"temperature={temp!r} must be a number in 0..{MAX_TEMPERATURE:g} (0: greedy)",
            param="temperature",
            code="invalid_temperature",
        )
    top_p = 1.0 if r.top_p is None else r.top_p
    if not _number_in(top_p, 0.0, 1.0):
        raise InvalidInputError(
            f"top_p={top_p!r} must be a number in 0..1", param="top_p", code="invalid_top_p"
        )
    seed = r.seed
    if seed is not None and _not_int(seed):
        raise InvalidInputError(
            f"seed={seed!r} must be an integer", param="seed", code="invalid_seed"
        )
    return {"stop": stop, "logprobs": lp, "temperature": float(temp), "top_p": float(top_p),
            "seed": seed}  # fmt: skip


def check_system(tokenizer, system: str | None, param: str = "system") -> None:
    """A system instruction (or, with `param="instruction"`, the instruction before the text) is
    None or a non-blank string of at most MAX_SYSTEM_TOKENS tokens; else InvalidInputError
    (code `empty_<param>` or `<param>_too_long`)."""
    if system is None:
        return
    what = "system instruction" if param == "system" else param
    if not isinstance(system, str) or not system.strip():
        raise InvalidInputError(
            f"the {what} is empty; send text or leave it out",
            param=param,
            code=f"empty_{param}",
        )
    n = len(tokenizer.encode(system, add_special_tokens=False))
    if n > MAX_SYSTEM_TOKENS:
        raise InvalidInputError(
            f"the {what} has {n} tokens, over the limit of {MAX_SYSTEM_TOKENS}; shorten it",
            param=param,
            code=f"{param}_too_long",
        )


def _not_int(v) -> bool:
    return isinstance(v, bool) or not isinstance(v, int)


def _number_in(v, lo: float, hi: float) -> bool:
    return (
        not isinstance(v, bool)
        and isinstance(v, int | float)
        and math.isfinite(v)
        and lo <= v <= hi
    )


# ---- stop strings --------------------------------------------------------------------------------
def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, int, bool]:
    """(text cut before the first stop string, how much of it is safe to stream, whether one was
    found). Not safe: the longest suffix that is the start of a stop string (it may complete)."""
    if not stop:
        return text, len(text), False
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        cut = text[: min(hits)]
        return cut, len(cut), True
    held = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return text, len(text) - held, False


# ---- choosing the next token ---------------------------------------------------------------------
@dataclass
class RowDecoding:
    """A row's sampling generator and its log-probability entries so far."""

    generator: torch.Generator | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    streamed: int = 0  # entries already sent with a TextDelta


class TokenTexts:
    """Token id -> (text, raw bytes), cached. Byte-level BPE tokens are mapped back through the
    byte alphabet; SentencePiece byte tokens (<0xNN>) and '▁' are handled; else decode()."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}
        alphabet = _byte_alphabet()
        self._byte_level = _is_byte_level(tokenizer)
        self._special = set(tokenizer.all_special_ids)
        self._bytes_of = {ch: b for b, ch in alphabet.items()}

    def __call__(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        """(text, bytes) of one token id."""
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._raw(token_id)
            hit = self._cache[token_id] = (raw.decode("utf-8", "backslashreplace"), tuple(raw))
        return hit

    def _raw(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        if self._byte_level and token_id not in self._special:
            b = self._bytes_of
            return b"".join(bytes([b[c]]) if c in b else c.encode() for c in piece)
        if piece.startswith("\u2581") or "\u2581" in piece:
            return piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token_id]).encode()


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.decoder)


def sample(row: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token from softmax(row / temperature) restricted to the top_p nucleus."""
    row = row.double()  # float32 would round a tiny temperature to 0 (0/0: nan)
    # shifted so the top logit is 0: a tiny temperature sends the rest to -inf, never to inf/nan
    probs = torch.softmax((row - row.max()) / temperature, -1)  # (V,)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=gen))
    sp, si = probs.sort(descending=True)  # (V,), (V,)
    keep = (sp.cumsum(0) - sp) < top_p  # the mass before a token is below top_p
    keep[0] = True  # the top token always stays (top_p=0 is greedy)
    sp, si = sp[keep], si[keep]
    return int(si[torch.multinomial(sp, 1, generator=gen)])


def choose(
    logits: torch.Tensor,
    reqs: list,
    rows: list[RowDecoding],
    texts: TokenTexts,
    greedy: list[int] | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """The next token of every row of `logits` (N, V) and, for rows whose request asked, its log
    probability entry. `reqs[j]` is row j's PreparedRequest, `rows[j]` its decoding state;
    `greedy`: every row's argmax of these logits where the caller has it (one pass over N x V
    fp32 logits is ~0.6 ms at 16 rows on the 2-core Xeon), else taken here."""
    tokens = list(greedy) if greedy is not None else logits.argmax(-1).tolist()  # (N,) greedy
    for j, (r, d) in enumerate(zip(reqs, rows, strict=True)):
        if r.temperature > 0:
            if d.generator is None:
                d.generator = torch.Generator(device=logits.device)
                if r.seed is None:
                    d.generator.seed()
                else:
                    d.generator.manual_seed(r.seed % 2**64)
            tokens[j] = sample(logits[j], r.temperature, r.top_p, d.generator)
    entries: list[TokenLogprob | None] = [None] * len(reqs)
    asked = [j for j, r in enumerate(reqs) if r.logprobs is not None]
    if not asked:
        return tokens, entries
    lp = torch.log_softmax(logits[asked].float(), -1)  # (R, V)
    chosen = lp[torch.arange(len(asked)), torch.tensor([tokens[j] for j in asked])].tolist()
    k = max(reqs[j].logprobs for j in asked)
    top_v, top_i = lp.topk(k, -1) if k else (lp[:, :0], lp[:, :0].long())  # (R, k)
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for a, j in enumerate(asked):
        n = reqs[j].logprobs
        top = tuple(_entry(texts, i, v) for i, v in zip(top_i[a][:n], top_v[a][:n], strict=True))
        entries[j] = _entry(texts, tokens[j], chosen[a], top)
    return tokens, entries


def _entry(texts: TokenTexts, token_id: int, logprob: float, top=()) -> TokenLogprob:
    text, raw = texts(token_id)
    return TokenLogprob(token_id, text, logprob, raw, top)
