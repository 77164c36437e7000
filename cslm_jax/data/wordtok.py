"""Token ids of plain text word by word, from a cache: `WordTokens.ids(text)` ==
`tokenizer.encode(text, add_special_tokens=False).ids` for the byte-level BPE tokenizers of the
Llama-3 family, without the Rust pipeline's per-piece offset bookkeeping (which costs about a
microsecond per word, most of a Llama-3 encode).

Why the two agree. Such a tokenizer has no normalizer, and its pre-tokenizer is
`Sequence[Split(P, Isolated), ByteLevel(use_regex=False)]`: the text is cut into the matches of
the regex P (Llama-3's; every character falls in one alternative, so the matches tile the text),
each match is mapped byte by byte (ByteLevel), and the BPE model turns each mapped piece into ids
on its own. So the ids of a text are the concatenation, over the matches of P, of
`model.tokenize(byte_level(match))`, which is what this class caches per match (calling the
tokenizer's own model and ByteLevel mapping). Two conditions remain, and both are checked:

* added tokens are cut out first, as the tokenizer cuts them before pre-tokenizing: its
  added vocabulary matches them leftmost-longest (Aho-Corasick) on the raw text, and each
  stretch between matches is pre-tokenized on its own. `_with_added` finds the same matches
  (at each position where an added token could start, the longest one there; scanning on past
  each match) when every added token is matched that way: none has lstrip, rstrip or
  single_word, and none is `normalized` (those are matched in a second pass). Otherwise a text
  holding any character an added token starts with goes to the tokenizer;
* Python's `re`, with P written in its terms (`PATTERNS`), cuts the text where the
  tokenizer's regex engine (Oniguruma) cuts it. Either pattern's behaviour on a string depends
  only on which of its classes each character belongs to (`\\p{L}`, `\\p{N}`, `\\s`, the
  literals `\\r \\n`, space and apostrophe, and the letters of the case-insensitive contractions
  's 't 're 've 'm 'll 'd); `re`'s classes are not Unicode's for some characters, and Unicode
  versions and case folding could make the engines disagree on others. Each character met is
  therefore checked once, against the tokenizer itself, on probe strings that put it beside a
  member of each class and inside each contraction (`_probes`): the spans of both engines must
  be equal on every probe. A text holding a character that failed goes to the tokenizer.

Tokenizers of another shape (a normalizer, another pre-tokenizer, BPE dropout, a non-BPE model)
get no `WordTokens` (`for_tokenizer` returns None) and are tokenized by the tokenizer.
"""

from __future__ import annotations

import itertools
import json
import re

# Llama-3's split pattern (tiktoken's cl100k form, digits in runs of up to three), as the
# tokenizer.json of Llama-3.x and of our demo tokenizer write it.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The same pattern for Python's `re` (faster here than the `regex` module), which has no \p{..}:
# letters are [^\W\d_], numbers \d, "neither" [^\s\w]|_. Where these differ from the Unicode
# classes (e.g. "²" is \p{N} but not \d) the character fails its probes (`_char_ok`).
PATTERNS = {
    LLAMA3_PATTERN: (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:[^\r\n\w]|_)?[^\W\d_]+|\d{1,3}|"
        r" ?(?:[^\s\w]|_)+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
}

# A member of each class the pattern tells apart (letters, a contraction letter, digits,
# space, other whitespace, newlines, punctuation, the apostrophe, a CJK letter), and nothing.
_NEIGHBOURS = ("", "a", "s", "1", " ", "  ", "\t", "\n", "\r", "!", "'", "中")


def _probes(c: str) -> list[str]:
    """Strings that show how the pattern treats `c`: beside each neighbour class on either
    side, repeated, and in each position of each contraction."""
    out = [x + c + y for x in _NEIGHBOURS for y in _NEIGHBOURS]
    out += [
        c + c,
        c + c + c,
        c + c + "a",
        c + c + "1",
        " " + c + c,
        c + c + " a",
        "a" + c + c + "!",
        c + "\r\n",
        "\r\n" + c,
        c + "sx",
        c + "rex",
        c + "llx",
        c + "vex",
    ]
    for word in ("s", "t", "re", "ve", "m", "ll", "d"):
        for k in range(len(word)):
            out.append("'" + word[:k] + c + word[k + 1 :] + "x")
    return out


class WordTokens:
    """See the module docstring. `ids(text)` returns the ids, or None when the text must go to
    the tokenizer (a character failed its check, or an added token could start in it and the
    added tokens are not all matched plainly)."""

    MAX_WORDS = 1 << 20  # cached matches kept (then the cache starts again)

    def __init__(self, backend, pattern: str):
        import tokenizers  # heavy: tokenizers

        self.model = backend.model
        self.pre = backend.pre_tokenizer
        self.byte_level = tokenizers.pre_tokenizers.ByteLevel(
            add_prefix_space=False, use_regex=False
        )
        rx = re.compile(PATTERNS[pattern])
        self.findall, self.finditer = rx.findall, rx.finditer
        self.words: dict[str, list[int]] = {}
        added = [t for t in backend.get_added_tokens_decoder().items() if t[1].content]
        # the added tokens by content, when all are matched plainly (see the module docstring)
        self.added = {t.content: i for i, t in added}
        if any(t.lstrip or t.rstrip or t.single_word or t.normalized for _, t in added):
            self.added = None
        self.lengths = sorted({len(c) for c in self.added or ()}, reverse=True)
        starts = {t.content[0] for _, t in added}  # where an added token can begin
        self.starts = frozenset(starts)
        self.find_start = (
            re.compile(f"[{re.escape(''.join(sorted(starts)))}]").search if starts else None
        )
        self.bad: set[str] = set()  # failed their probes
        self.good: set[str] = set()
        # ASCII is checked up front, so an ASCII text needs one search for its failed characters
        ascii_bad = "".join(chr(i) for i in range(128) if not self._char_ok(chr(i)))
        self.ascii_bad = re.compile(f"[{re.escape(ascii_bad)}]").search if ascii_bad else None

    @classmethod
    def for_tokenizer(cls, backend) -> "WordTokens | None":
        """A WordTokens when the tokenizer has the shape the module docstring needs."""
        spec = json.loads(backend.to_str())
        pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
        if spec.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout"):
            return None
        steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
        if not steps or len(steps) != 2:
            return None
        split, byte_level = steps
        pattern = (split.get("pattern") or {}).get("Regex")
        if (
            split.get("type") != "Split"
            or pattern not in PATTERNS
            or split.get("behavior") != "Isolated"
            or split.get("invert")
            or byte_level.get("type") != "ByteLevel"
            or byte_level.get("add_prefix_space")
            or byte_level.get("use_regex")
        ):
            return None
        return cls(backend, pattern)

    def _char_ok(self, c: str) -> bool:
        if c in self.bad:
            return False
        for probe in _probes(c):
            ours = [m.span() for m in self.finditer(probe)]
            if ours != [span for _, span in self.pre.pre_tokenize_str(probe)]:
                self.bad.add(c)
                return False
        self.good.add(c)
        return True

    def _word(self, word: str) -> list[int]:
        mapped = self.byte_level.pre_tokenize_str(word)[0][0]
        ids = [t.id for t in self.model.tokenize(mapped)]
        if len(self.words) >= self.MAX_WORDS:
            self.words.clear()
        self.words[word] = ids
        return ids

    def ids(self, text: str) -> list[int] | None:
        if text.isascii():
            if self.ascii_bad is not None and self.ascii_bad(text):
                return None
        else:
            chars = set(text)
            if not chars <= self.good:
                if not chars.isdisjoint(self.bad) or not all(map(self._char_ok, chars - self.good)):
                    return None
        if self.find_start is not None and self.find_start(text):
            return self._with_added(text) if self.added is not None else None
        return self._plain(text)

    def _plain(self, text: str) -> list[int]:
        """The ids of a text without added tokens, its characters checked."""
        words = self.findall(text)
        try:
            return list(itertools.chain.from_iterable(map(self.words.__getitem__, words)))
        except KeyError:
            get = self.words.get
            return [i for w in words for i in (get(w) or self._word(w))]

    def _with_added(self, text: str) -> list[int]:
        """The ids of a text that may hold added tokens: matched leftmost-longest, the stretches
        between them tokenized on their own (see the module docstring)."""
        added, lengths, find = self.added, self.lengths, self.find_start
        out: list[int] = []
        done = i = 0  # text[:done] is in `out`; search on from i
        while (m := find(text, i)) is not None:
            i = m.start()
            for n in lengths:
                piece = text[i : i + n]
                token = added.get(piece) if len(piece) == n else None
                if token is not None:
                    if done < i:
                        out += self._plain(text[done:i])
                    out.append(token)
                    i = done = i + n
                    break
            else:
                i += 1
        if done < len(text):
            out += self._plain(text[done:])
        return out
