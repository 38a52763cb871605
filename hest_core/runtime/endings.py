"""Clean endings: a summary never stops mid-sentence because `max_new_tokens` or the energy
budget ran out, and text that starts to repeat itself ends before the repeat.

The runtime knows how many tokens a request can still pay for (its `allowance`: the smaller of
what `max_new_tokens` leaves and what the remaining budget buys at the request's current cost per
token), so it plans the end instead of being cut:

* at each sentence boundary it ends the text when the next sentence would not fit: when the
  allowance is below the expected length of a sentence (the median of this request's sentences so
  far; before the first, `FIRST_SENTENCE_TOKENS`, a little above the 17-token median of the
  CNN/DM highlight sentences in the first 400 training pairs, measured with the default model's
  tokenizer);
* a sentence that repeats an earlier one (same words, case and punctuation aside) ends the text
  at the boundary before it (greedy decoding of a small model loops: "It is a great protector of
  the people living in the Boragaon landfill." three times in one held-out summary);
* if a limit still strikes inside a sentence (a run-on longer than planned), the text ends at the
  last boundary; that fragment was never streamed;
* a sentence that cannot be cut away (part of it was already streamed, or there is no earlier
  boundary to cut to and it has `STEER_MIN_WORDS` words) is steered to an end instead: in its
  last `STEER_TOKENS` tokens the logits of sentence-ending tokens (`.`, `!`, `?`) are raised
  (`steer`), and its last token is one of them. A period is never forced inside an unfinished
  multi-byte character.

A boundary is only counted where it ends a sentence of at least two words. A period after a
number or an abbreviation ("1.", "U.S.", "Mr.", an initial) is ambiguous ("1.4", "the U.S.
military"): it counts once the next token shows a space and then, after an abbreviation, a
capital letter, a digit or a quote; otherwise it was no boundary.

Streaming shows the same text as the response, and nothing streamed is ever taken back: the part
of the text after the last boundary is held back unless it is safe to show, i.e. the allowance
leaves room for twice an expected sentence and its first words do not start an earlier sentence
(so a repeat is caught before any of it is shown).

* the model's own end of text chosen mid-sentence (after a closing quote with no period) waits
  for one sentence-ending token first (`closes_own_end`).

A sentence boundary: the text, trailing spaces aside, ends with `.`, `!` or `?`, optionally
followed by closing quotes or brackets. A text with no boundary at all (a first sentence longer
than the limit) is returned as it is: there is nothing cleaner to return.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

FIRST_SENTENCE_TOKENS = 20
_BOUNDARY = re.compile(r"[.!?][\"'\u201d\u2019)\]\u00bb]*$")
_WORD = re.compile(r"\w+")
_LAST_WORD = re.compile(r"(\S+)\.[\"'\u201d\u2019)\]\u00bb]*$")
# titles come before a name: never the end of a sentence
TITLES = frozenset(
    ("mr", "mrs", "ms", "dr", "st", "prof", "gen", "sen", "rep", "gov", "lt", "col", "sgt")
    + ("capt", "cmdr", "adm", "maj", "rev", "hon", "pres", "supt")
)
# other abbreviations may end a sentence ("... of Acme Inc. The ...")
ABBREVIATIONS = frozenset(
    ("jr", "sr", "inc", "co", "corp", "ltd", "llc", "no", "vs", "etc", "approx", "dept", "est")
    + ("fig", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov")
    + ("dec", "mon", "tue", "wed", "thu", "fri", "sat", "sun")
)
PREFIX_WORDS = 5  # a partial sentence whose first words start an earlier sentence is held back
STEER_TOKENS = 8  # the last tokens in which a sentence that cannot be cut is steered to an end
STEER_BIAS = 4.0  # logit bonus of sentence-ending tokens there, rising to this at the end
STEER_MIN_WORDS = 5  # a first sentence this long is steered to an end rather than returned cut


def _ambiguity(text: str) -> str | None:
    """For a text ending on a boundary: "number", "title" or "abbreviation" when its period may
    belong to a number, a title before a name or an abbreviation ("1.", "Mr.", "U.S.", an
    initial), else None."""
    t = text.rstrip()
    if not t.endswith((".", '."', ".\u201d", ".'", ".\u2019", ".)", ".]")):
        return None  # "!" and "?" are never ambiguous
    m = _LAST_WORD.search(t)
    if m is None:
        return None
    word = m.group(1).lstrip("\"'(\u201c\u2018[")
    if word.isdigit():
        return "number"
    if word.lower() in TITLES:
        return "title"
    if (len(word) == 1 and word.isalpha()) or "." in word or word.lower() in ABBREVIATIONS:
        return "abbreviation"
    return None


def _confirms(kind: str, after: str) -> bool:
    """Whether the text `after` an ambiguous period shows it ended a sentence."""
    if kind == "title" or not after[:1].isspace():
        return False
    nxt = after.lstrip()[:1]
    return kind == "number" or nxt == "" or nxt.isupper() or nxt.isdigit() or nxt in "\"'\u201c"


def ends_sentence(text: str) -> bool:
    """Whether `text` (trailing whitespace aside) ends on a sentence boundary."""
    return bool(_BOUNDARY.search(text.rstrip()))


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.lower() for w in _WORD.findall(text))


@dataclass
class EndingPlan:
    """The clean-ending state of one request (see the module docstring)."""

    enabled: bool = True
    boundary: int = 0  # characters of the text up to and including the last sentence boundary
    boundary_tokens: int = 0  # tokens generated when that boundary was reached
    sentences: list[tuple[str, ...]] = field(default_factory=list)  # words of each sentence
    lengths: list[int] = field(default_factory=list)  # tokens of each completed sentence
    reason: str | None = None  # "planned" | "repetition" | "trimmed": how the plan shaped the end
    shown: int = 0  # characters of the text streamed so far
    pending: tuple[int, int, str] | None = None  # an ambiguous boundary: (end, tokens, kind)

    def expected_sentence(self) -> int:
        """Tokens the next sentence is expected to take."""
        return int(statistics.median(self.lengths)) if self.lengths else FIRST_SENTENCE_TOKENS

    def observe(self, text: str, n_tokens: int) -> str | None:
        """After a token: `text` is all the text so far, `n_tokens` the tokens generated. Returns
        "repeat" when the sentence that just ended repeats an earlier one (end the request; the
        text is `final(text)`), "boundary" when a new sentence ended, else None."""
        if not self.enabled:
            return None
        seen = None
        if self.pending is not None and len(text) > self.pending[0]:
            end, n_at, kind = self.pending
            self.pending = None
            if _confirms(kind, text[end:]):
                seen = self._confirm(text, end, n_at)
                if seen == "repeat":
                    return seen
        if ends_sentence(text):
            end = len(text.rstrip())
            if end > self.boundary and (self.pending is None or self.pending[0] != end):
                kind = _ambiguity(text)
                if kind is None:
                    return self._confirm(text, end, n_tokens) or seen
                self.pending = (end, n_tokens, kind)
        return seen

    def _confirm(self, text: str, end: int, n_tokens: int) -> str | None:
        """A sentence ends at `end`: record it (or report a repeat)."""
        words = _words(text[self.boundary : end])
        if len(words) < 2:
            return None
        if words in self.sentences:
            self.reason = "repetition"
            return "repeat"
        self.sentences.append(words)
        self.lengths.append(n_tokens - self.boundary_tokens)
        self.boundary, self.boundary_tokens = end, n_tokens
        return "boundary"

    def should_end(self, allowance: int) -> bool:
        """At a boundary just observed: whether to end now because the next sentence would not
        fit in `allowance` more tokens."""
        if not self.enabled or self.boundary == 0 or allowance >= self.expected_sentence():
            return False
        self.reason = "planned"
        return True

    def visible(self, text: str, allowance: int) -> str:
        """The part of `text` that may be streamed now."""
        if not self.enabled:
            return text
        partial = text[self.boundary :]
        words = _words(partial)[:PREFIX_WORDS]
        starts_earlier = any(s[: len(words)] == words for s in self.sentences) if words else True
        out = text if allowance >= 2 * self.expected_sentence() and not starts_earlier else None
        out = text[: self.boundary] if out is None else out
        self.shown = max(self.shown, len(out))
        return out

    def steer(self, text: str, left: int, whole_char: bool) -> float:
        """The logit bonus for sentence-ending tokens at the next token, `left` tokens remaining
        after it: 0 when the current sentence can still be cut away at the end; rising over the
        last STEER_TOKENS; `inf` (only they may come) at the last token. `whole_char`: the text
        does not end inside a multi-byte character."""
        if not self.enabled or left >= STEER_TOKENS or ends_sentence(text):
            return 0.0
        streamed = self.shown > self.boundary
        long_first = self.boundary == 0 and len(_words(text)) >= STEER_MIN_WORDS
        if not (streamed or long_first) or not whole_char:
            return 0.0
        if left <= 0:
            return math.inf
        return STEER_BIAS * (STEER_TOKENS - left) / STEER_TOKENS

    def closes_own_end(self, text: str, whole_char: bool) -> bool:
        """Whether the model's own end of text, chosen now, should wait for a sentence-ending
        token first: the text has at least two words and stops mid-sentence (the model would end
        after a closing quote with no period, `... called the attack "extremely powerful"`). The
        caller then lets only sentence-ending tokens come next (`.`, `!`, `?`); after one the
        model may end. Measured on the 300 test pairs (session 11): lora-r8 ended 1-4% of its
        summaries this way, HEST and the fixed paths none."""
        if not self.enabled or not whole_char or ends_sentence(text):
            return False
        return bool(self.sentences) or len(_words(text)) >= 2  # a finished sentence has 2+

    def final(self, text: str, by_limit: bool, by_budget: bool = False) -> str:
        """The text to return when the request ends. `by_limit`: a limit (tokens or budget) or a
        detected repeat ended it, not the model's own end of text; `by_budget`: the energy
        budget was that limit (a first sentence it cut off is dropped: `no_sentence`)."""
        if not self.enabled or self.reason == "steered":
            return text
        if self.boundary == 0:
            # the budget ran out before the first sentence ended: no sentence fitted. Nothing of
            # it was streamed (`visible` holds a first sentence back unless its tokens can finish
            # it), so the answer is empty rather than a fragment. (A max_new_tokens too small for
            # a sentence is the caller's explicit choice: that text is returned as it is.)
            if by_budget and self.shown == 0 and text and not ends_sentence(text):
                self.reason = "no_sentence"
                return ""
            return text
        if self.reason == "repetition":
            return text[: self.boundary]
        if by_limit and not ends_sentence(text):
            self.reason = self.reason or "trimmed"
            return text[: self.boundary]
        return text
