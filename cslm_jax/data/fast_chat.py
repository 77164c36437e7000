"""The fast path of chat rendering and tokenization: `FastChat.ids(batch)` gives, per example,
the ids the exact path gives (`ChatRenderer.encode(ChatRenderer.render_text(messages))`), and
`fast_examples` the examples `formats.examples` gives, speech spans kept as unit lists.

What it replaces. The exact path (`Preparer(fast=False)`, cslm_jax/data/prepare.py) renders each
example with the tokenizer's Jinja chat template and tokenizes the whole text. Here the template
is rendered once per role sequence with placeholder contents (`FastChat._plan`), its constant
stretches are tokenized once, each content is tokenized alone (word by word from a cache,
`WordTokens`, else through the tokenizer's batch API, each distinct text once per batch), the
ids of speech spans (`<sosp><12><907><eosp>`) are computed from the unit lists instead
(`SpeechText`, `FastChat._span_ids`), and the loss mask's header positions are read off the
plan (`FastChat._mark`). About 6x the exact path's tokens per second (benchmarks/RESULTS.md).

When it is on. `Preparer(fast=True)`, the default (`prepare-data --no-fast-render` turns it
off), and then only where the equality can be shown for the template and tokenizer at hand: a
role sequence without a plan (`_plan` says why a template is refused), or an example holding
something a plan cannot take, is rendered the exact way (still batched); speech spans are
computed only when `_span_ids` shows no added token can run across their edges. The first
examples of each role sequence and every `verify_every`-th one are also rendered the exact way
and compared: a difference raises DataError.

How it is proven equal. The contents come from the one definition of the examples
(`formats.examples`; `fast_examples` only keeps their unit lists). tests/test_prepare_fast.py:
`fast_examples` == `examples` on every demo task and chain, prompts, chain and loss mask changed
in the data config and a joining rule put in formats' place followed without a change here
(prepared bytes equal to the exact path's), speech spans as ids on
the demo and the true Llama-3.1 tokenizers, verbatim templates, the batch-API route, units the
tokenizer lacks, spans a token could run into, the header positions. tests/test_prepare_data.py:
the Llama-3.1 tokenizer on awkward contents, refused templates, and the prepared caches (Beam and
in-process) against the per-example Jinja path.

When it could be deleted. When the tokenizer library renders and encodes chat templates in
batches at about this speed, or when preparation stops mattering (a corpus prepared once on
enough workers): `Preparer` then keeps the exact path only, and this module goes with its tests.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

from cslm_jax.data.formats import ChatRenderer, examples, joined
from cslm_jax.data.wordtok import WordTokens
from cslm_jax.errors import DataError

# private-use characters around the placeholder contents a template is rendered with
PLACEHOLDER_OPEN, PLACEHOLDER_CLOSE = "\ue000", "\ue001"
CHECK_FIRST = 4  # examples of each role sequence compared with the exact path first


# -- contents that keep their speech spans as unit lists ---------------------------------------------


class SpeechText:
    """A chat content given by its parts [text, units, text, units, ..., text] (as
    `formats.examples` defines it): the content is text + speech(units) + text + ...
    (`str(content)`; it compares equal to that string). The string is built only where it is
    needed (Jinja, the sample checks: `plain`); FastChat turns the parts into ids without it."""

    __slots__ = ("parts",)

    def __init__(self, parts: list):
        self.parts = parts

    def __str__(self) -> str:
        return joined(self.parts)

    def __eq__(self, other) -> bool:
        if isinstance(other, (str, SpeechText)):
            return str(self) == str(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))

    def __repr__(self) -> str:
        return f"SpeechText({str(self)!r})"


def plain(messages: list) -> list:
    """Messages with `SpeechText` contents turned into their strings (for Jinja)."""
    return [
        {**m, "content": str(m["content"])} if m.get("content").__class__ is SpeechText else m
        for m in messages
    ]


# `formats.examples(...)` with each content holding speech spans kept as a `SpeechText` of its
# parts: the same examples, from the same definition, whose spans FastChat turns into ids
# without the tokenizer.
fast_examples = functools.partial(examples, content=SpeechText)


# -- plans: a template rendered once per role sequence ------------------------------------------------


def _placeholder(i: int) -> str:
    return f"{PLACEHOLDER_OPEN}{i}{PLACEHOLDER_CLOSE}"


def _fill(skeleton: str, placeholders: list, contents: list) -> str:
    for s, c in zip(placeholders, contents):
        skeleton = skeleton.replace(s, c)
    return skeleton


@dataclasses.dataclass
class Plan:
    """How to build the ids of one role sequence: ids = prefix + fixed[0] + piece(0) + fixed[1]
    + ... ; piece(i) = heads[i] + transform(content_i) + tails[i], tokenized alone."""

    strip: bool  # the template strips each content (Jinja's `trim`)
    fixed: list  # ids of the constant stretches between variable pieces
    heads: list  # constant text before each content inside its piece
    tails: list  # constant text after each content inside its piece
    marks: tuple | None = None  # (user headers, assistant headers): (fixed piece, offset) each
    headers: int = 0  # header-start ids in the prefix and the fixed pieces


class FastChat:
    """`ids(batch)` == [renderer.encode(renderer.render_text(m)) for m in batch], batched.

    Per role sequence the template is rendered once with placeholder contents. It is used only
    when (a) every placeholder appears once, in order, and the content enters the text either
    verbatim or stripped (Jinja's `trim` is `str.strip`), the same on two different probes;
    (b) the part after the last content survives `render_text`'s trailing-header removal
    unchanged; (c) the tokenizer has no normalizer and the added tokens around each content have
    no lstrip/rstrip/single_word, and no added token can match across a content boundary; then
    the text splits at those added tokens exactly as the whole text would, so each piece is
    tokenized alone. Otherwise that role sequence has no plan and renders with Jinja, tokenizing
    the whole text (still through the batch API). The first `CHECK_FIRST` examples of each role
    sequence and every `verify_every`-th are also rendered the exact way and compared: a
    difference raises.
    """

    CACHE_SIZE = 4096  # texts and their ids kept (then the cache starts again)

    def __init__(self, renderer: ChatRenderer, verify_every: int = 1000):
        self.r = renderer
        self.bt = renderer.tok.backend_tokenizer
        self.special = renderer.adds_special_tokens
        self.verify_every = verify_every
        self.plans: dict[tuple, Plan | None] = {}  # None: that role sequence goes to Jinja
        self.checked: collections.Counter = collections.Counter()
        self.checked_enough: set = set()  # role sequences checked CHECK_FIRST times
        self.count = 0
        self.added = dict(self.bt.get_added_tokens_decoder())
        self.added_texts = sorted({t.content for t in self.added.values()})
        self.header = renderer.user[0] if renderer.user else None
        self.prefix = self._prefix()
        self.cache: dict[str, list[int]] = {}
        self.span_ids = self._span_ids()
        self.words = WordTokens.for_tokenizer(self.bt) if self.prefix is not None else None

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        encode = getattr(self.bt, "encode_batch_fast", self.bt.encode_batch)  # no offsets
        return [e.ids for e in encode(texts, add_special_tokens=special)]

    def _span_ids(self) -> tuple[int, int, list[int]] | None:
        """(id of <sosp>, id of <eosp>, [id of <0>, id of <1>, ...]) when a speech span
        `<sosp><u1><u2>...<eosp>` is provably tokenized as exactly those added tokens wherever
        it stands in a text, so its ids can be computed instead of tokenized; else None.
        Shown here once per tokenizer: each is an added token without lstrip/rstrip/
        single_word (and the tokenizer has no normalizer); no added token extends one of them
        (a longer match at the same start would win); no added token ends with a proper prefix
        of `<sosp>` or contains `<sosp>` after its start (it could start in the text before the
        span and run into it). The text around a span then splits there, as at any added token."""
        if self.bt.normalizer is not None:
            return None
        by_text = {t.content: (i, t) for i, t in self.added.items()}
        names = ["<sosp>", "<eosp>"]
        u = 0
        while f"<{u}>" in by_text:
            names.append(f"<{u}>")
            u += 1
        if "<sosp>" not in by_text or "<eosp>" not in by_text or u == 0:
            return None
        for name in names:
            tok = by_text[name][1]
            if tok.lstrip or tok.rstrip or tok.single_word:
                return None
        span_set = set(names)
        for t in self.added_texts:
            for k in range(1, len(t)):
                if t[:k] in span_set or "<sosp>".startswith(t[k:]) or "<sosp>" in t[k:]:
                    return None
        return by_text["<sosp>"][0], by_text["<eosp>"][0], [by_text[n][0] for n in names[2:]]

    def _prefix(self) -> list[int] | None:
        """The ids the post-processor adds in front (the reference's second <|begin_of_text|>);
        None when it adds anything else (then no plan is made)."""
        if not self.special:
            return []
        prefix = None
        for probe in ("a", "Hello world 12", "<|eot_id|> x"):
            bare = self._encode([probe], False)[0]
            full = self._encode([probe], True)[0]
            if full[len(full) - len(bare) :] != bare:
                return None
            p = full[: len(full) - len(bare)]
            if prefix is not None and p != prefix:
                return None
            prefix = p
        return prefix

    def plan_for(self, roles: tuple) -> Plan | None:
        """The plan of a role sequence, made once; None when it cannot be shown equal."""
        if roles not in self.plans:
            self.plans[roles] = self._plan(roles)
        return self.plans[roles]

    def _plan(self, roles: tuple) -> Plan | None:
        def render(contents):
            return self.r.render_text([{"role": r, "content": c} for r, c in zip(roles, contents)])

        if self.prefix is None or self.bt.normalizer is not None:
            return None
        n = len(roles)
        holders = [_placeholder(i) for i in range(n)]
        skel = render(holders)
        pos = [skel.find(s) for s in holders]
        if any(p < 0 or skel.count(s) != 1 for p, s in zip(pos, holders)) or pos != sorted(pos):
            return None
        # how content enters the text: verbatim or stripped, independent of the content
        padded = [f" \n\t{s}x \n" for s in holders]
        out = render(padded)
        if out == _fill(skel, holders, padded):
            strip = False
        elif out == _fill(skel, holders, [f"{s}x" for s in holders]):
            strip = True
        else:
            return None
        # render_text removes a trailing assistant header: safe when that decision never
        # depends on the content (the template's text after the last content decides it)
        raw = self.r.tok.apply_chat_template(
            [{"role": r, "content": c} for r, c in zip(roles, holders)], tokenize=False
        )
        tail = raw[raw.find(holders[-1]) + len(holders[-1]) :].rstrip()
        header = self.r.assistant_header_text
        if not tail or (len(tail) < len(header) and header.endswith(tail)):
            return None
        # added tokens in the skeleton (offsets are in characters)
        enc = self.bt.encode(skel, add_special_tokens=False)
        spans = [
            (s, e, self.added[i]) for i, (s, e) in zip(enc.ids, enc.offsets) if i in self.added
        ]
        longest = max(map(len, self.added_texts), default=0)
        fixed_bounds, heads, tails = [], [], []
        prev = 0
        for i, (p, s) in enumerate(zip(pos, holders)):
            end = p + len(s)
            left = [sp for sp in spans if sp[1] <= p and sp[0] >= prev]
            right = [sp for sp in spans if sp[0] >= end and (i + 1 == n or sp[1] <= pos[i + 1])]
            if not left or not right:
                return None
            lt, rt = left[-1], right[0]
            for tok in (lt[2], rt[2]):
                if tok.lstrip or tok.rstrip or tok.single_word:
                    return None
            cut_l, cut_r = lt[1], rt[0]
            if (
                PLACEHOLDER_OPEN in skel[max(cut_l - longest, 0) : cut_l]
                or PLACEHOLDER_OPEN in skel[cut_r : cut_r + longest]
            ):
                return None
            before = skel[:cut_l]
            for t in self.added_texts:  # no added token can straddle a cut
                for k in range(1, len(t)):
                    if before.endswith(t[:k]) or skel.startswith(t[k:], cut_r):
                        return None
            fixed_bounds.append((prev, cut_l))
            heads.append(skel[cut_l:p])
            tails.append(skel[end:cut_r])
            prev = cut_r
        fixed_bounds.append((prev, len(skel)))
        fixed = self._encode([skel[a:b] for a, b in fixed_bounds], False)
        plan = Plan(strip, fixed, heads, tails)
        self._mark(plan)
        return plan

    def _mark(self, plan: Plan) -> None:
        """Where the loss mask's header patterns lie in the plan's constant pieces, so that
        `loss_mask` need not search each example (`ids(..., found=)`). Set only when the
        search would find exactly these: the user and assistant patterns start with the same
        id H, which occurs nowhere else in them (so occurrences cannot overlap); every H of a
        piece decides within the piece whether each pattern starts there (none could run into
        the following content, or into an EOS appended after the last piece); and an example
        whose contents hold no H (counted per example: `headers`) has no other occurrence."""
        user, assistant = list(self.r.user), list(self.r.assistant)
        if (
            not user
            or not assistant
            or user[0] != assistant[0]
            or user[0] in user[1:]
            or user[0] in assistant[1:]
            or self.prefix is None
        ):
            return
        h = user[0]
        marks, headers = ([], []), self.prefix.count(h)
        if headers:
            return  # (a BOS is never a header)
        for f, piece in enumerate(plan.fixed):
            for p, i in enumerate(piece):
                if i != h:
                    continue
                headers += 1
                for k, pattern in enumerate((user, assistant)):
                    n = min(len(pattern), len(piece) - p)
                    if piece[p : p + n] == pattern[:n]:
                        if n < len(pattern):
                            return  # decided by what follows the piece
                        marks[k].append((f, p))
        plan.marks, plan.headers = marks, headers

    # -- examples -> ids ---------------------------------------------------------------------------

    def slow(self, messages) -> list[int]:
        """The exact path's ids of one example (Jinja, then the whole text tokenized)."""
        return self.r.encode(self.r.render_text(plain(messages)))

    def _keep(self, text: str, ids: list) -> list:
        if len(self.cache) >= self.CACHE_SIZE:
            self.cache.clear()
        self.cache[text] = ids
        return ids

    def _words(self, text: str) -> list[int] | None:
        """A text's ids word by word (`WordTokens`; then kept in the cache); None when the
        tokenizer has no WordTokens, the text holds a character they refuse or a placeholder."""
        if self.words is None or PLACEHOLDER_OPEN in text:
            return None
        ids = self.words.ids(text)
        if ids is not None:
            self._keep(text, ids)
        return ids

    def ids(
        self, batch: list, found: list | None = None, units_below: int | None = None
    ) -> list[list[int]]:
        """Token ids of each chat example of `batch` (see the class docstring). A content that
        is a `SpeechText` (parts: text, units, text, ...) has its spans' ids computed (see
        `_span_ids`); the text between them, and plain contents, are tokenized word by word
        (`WordTokens`) where the tokenizer allows, else through its batch API, each distinct
        text once. `found`, a list, receives per example the positions of the user and
        assistant header patterns (`_mark`; `loss_mask(..., found=)`), or None where
        `loss_mask` must search. `units_below`: the unit ids of SpeechText contents are known to
        lie in [0, units_below) (validated records); a span is then looked over for a unit the
        tokenizer lacks only when the tokenizer lacks some of those."""
        n = len(batch)
        units_checked = (
            units_below is not None
            and self.span_ids is not None
            and units_below <= len(self.span_ids[2])
        )
        out: list = [None] * n
        marked: list = [None] * n
        roles_of = [tuple([m["role"] for m in messages]) for messages in batch]
        made = {roles: self.plan_for(roles) for roles in set(roles_of)}
        plans = list(map(made.__getitem__, roles_of))
        # 1. every text from the cache or word by word
        build = self._builder(self._words, units_checked)
        rest = []
        for j, plan in enumerate(plans):
            built = None if plan is None else build(batch[j], plan)
            if built is None:
                rest.append(j)
            else:
                out[j], marked[j] = built
        # 2. what is left: the texts neither the cache nor the words give, through the batch API
        # at once; an example no plan can take goes to Jinja (`whole`)
        need: dict[str, list[int] | None] = {}

        def collect(text: str) -> tuple | None:
            if PLACEHOLDER_OPEN in text:
                return None
            need[text] = None
            return ()

        whole, later = [], []
        build = self._builder(collect, units_checked)
        for j in rest:
            fits = plans[j] is not None and build(batch[j], plans[j]) is not None
            (later if fits else whole).append(j)
        if need:
            need = dict(zip(need, self._encode(list(need), False)))
        build = self._builder(need.get, units_checked)  # the cache is as step 2 saw it
        for j in later:
            built = build(batch[j], plans[j])
            if built is None:
                whole.append(j)
            else:
                out[j], marked[j] = built
        for text, ids in need.items():
            self._keep(text, ids)
        # 3. no plan, or a content a plan cannot take: Jinja and the tokenizer
        if whole:
            rendered = [self.r.render_text(plain(batch[j])) for j in whole]
            for j, ids in zip(whole, self._encode(rendered, self.special)):
                out[j], marked[j] = ids, None
        if found is not None:
            found[:] = marked
        self._check(batch, roles_of, out)
        return out

    def _check(self, batch: list, roles_of: list, out: list) -> None:
        """Compare a sample with the exact path: the first `CHECK_FIRST` examples of each role
        sequence, then every `verify_every`-th example; a difference raises DataError."""
        base, self.count = self.count, self.count + len(batch)
        for j, roles in enumerate(roles_of):
            if roles in self.checked_enough and (base + j + 1) % self.verify_every:
                continue
            self.checked[roles] += 1
            if self.checked[roles] >= CHECK_FIRST:
                self.checked_enough.add(roles)
            if out[j] != self.slow(batch[j]):
                raise DataError(
                    f"fast chat rendering differs from the tokenizer's template for "
                    f"roles {roles}; prepare with fast rendering off "
                    f"(--no-fast-render) and report this"
                )

    def _builder(self, tokens, units_checked: bool):
        """build(messages, plan) -> (ids, header positions) of one example from its plan: each
        text's ids from the cache, else `tokens(text)`; the positions of the user and assistant
        headers (`_mark`) when the contents hold no header-start id, else None (the loss mask
        searches). It returns None where it cannot: a message with fields besides role and
        content, a content neither a string nor a SpeechText, a unit the tokenizer lacks
        (looked for unless `units_checked`), a text `tokens` cannot give (None)."""
        spans, cached, prefix, header = self.span_ids, self.cache.get, self.prefix, self.header
        if spans is not None:
            sosp, eosp, unit_ids = spans
            unit, n_units = unit_ids.__getitem__, len(unit_ids)

        def build(messages: list, plan: Plan) -> tuple[list, tuple | None] | None:
            strip = plan.strip
            ids = list(prefix)
            starts = []
            for fixed, m, head, tail in zip(plan.fixed, messages, plan.heads, plan.tails):
                if len(m) != 2:
                    return None
                c = m["content"]
                starts.append(len(ids))
                ids += fixed
                if isinstance(c, str):  # one text
                    text = head + (c.strip() if strip else c) + tail
                elif c.__class__ is SpeechText and spans is not None and len(c.parts) > 1:
                    # a text, then (units, text) pairs (stripped at both ends of the content
                    # when the template strips it; spans start and end with '<'): each text
                    # tokenized, the first after the constant text before the content; each
                    # span's ids computed
                    parts = iter(c.parts)
                    text = head + (next(parts).lstrip() if strip else next(parts))
                    for units, after in zip(parts, parts):
                        if text:
                            got = cached(text) or tokens(text)
                            if got is None:
                                return None
                            ids += got
                        if (
                            not units_checked
                            and units
                            and (min(units) < 0 or max(units) >= n_units)
                        ):
                            return None  # a unit the tokenizer lacks
                        ids.append(sosp)
                        ids += map(unit, units)
                        ids.append(eosp)
                        text = after
                    text = (text.rstrip() if strip else text) + tail
                elif c.__class__ is SpeechText:  # spans not computed: one text
                    text = head + (str(c).strip() if strip else str(c)) + tail
                else:
                    return None
                if text:  # the content's last text
                    got = cached(text) or tokens(text)
                    if got is None:
                        return None
                    ids += got
            starts.append(len(ids))
            ids += plan.fixed[-1]
            marks = plan.marks
            if marks is None or ids.count(header) != plan.headers:
                return ids, None  # a header-start id in the contents: the mask searches
            return ids, ([starts[f] + o for f, o in marks[0]], [starts[f] + o for f, o in marks[1]])

        return build


_FAST_CHATS: dict = {}


def fast_chat_for(renderer: ChatRenderer) -> FastChat:
    """One FastChat per tokenizer object and loss-mask rule, made again when the tokenizer's
    chat template changed (what its plans depend on; not the maximum length), so its plans,
    checks and cache of texts are made once per process (the Preparers of a job's tasks share
    it). The tokenizer object is the key itself (held here: a process prepares with one or two)."""
    key = (renderer.tok, renderer.mask)
    hit = _FAST_CHATS.get(key)
    if hit is None or hit[0] != renderer.tok.chat_template:
        hit = _FAST_CHATS[key] = (renderer.tok.chat_template, FastChat(renderer))
    return hit[1]
