"""Preparation of CSLM examples, shared by the in-process path and `cslm-jax prepare-data` (Beam):
JSONL lines -> validate, format, render, tokenize, mask -> serialized tf.train.Examples, written
in the SeqIO cache layout per task:

    <cache>/<task>/{split}.tfrecord-XXXXX-of-NNNNN    examples (features targets, loss_weights)
    <cache>/<task>/info.{split}.json                  features, num_shards, seqio_version, key
    <cache>/<task>/stats.{split}.json                 examples, tokens per feature, truncated,
                                                      skipped (with the first messages)
    <cache>/<task>/COMPLETED                          written last: the cache is whole; the
                                                      settings (`task_key`) and `inputs`, each
                                                      file's size, time and lines (`input_record`)

Both paths call the same `Preparer` and assign each example to the shard `shard_of(file, line)`;
a shard holds its examples in (file, line) order. So the Beam output and the in-process output
are the same bytes, and training reads either with identical batches.

Speed (what is left per example is Python; each shortcut is checked against the exact path, and
tests/test_prepare_fast.py, tests/test_wordtok.py compare them): lines are parsed by orjson
(`fast_parse_line`; json re-reads a record that fails validation). `FastChat` renders a chat
template once per role sequence (with sentinel contents) instead of calling Jinja per example,
and tokenizes its constant parts once. The variable pieces (each delimited by added tokens, so
the tokenizer splits there anyway) are tokenized word by word from a cache (`WordTokens`, for
Llama-3-shaped tokenizers; the tokenizer's batch API otherwise). Speech spans of asr/tts/s2s
contents (`fast_examples` -> `SpeechText`, whose string is built only for Jinja) are turned into
ids arithmetically, and the loss mask's header positions are read off the template's pieces
(`FastChat._mark`). It refuses to apply (falling back to the exact path) whenever that equality
cannot be shown for the template and tokenizer at hand, and re-checks a sample of examples
against Jinja while it runs. Plans, checks and the tokenizer are made once per process (per
tokenizer and loss-mask rule). Records are serialized from a table of varints and written a
batch at a time.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path

import orjson

from cslm_jax.data.formats import (RECORD_KIND_OF_TASK, ChatRenderer, DataConfig, RecordError,
                                   TaskSpec, validated_times, chunk_answer, examples, merge_repeats,
                                   parse_line, speech, timed_count, validate_record)
from cslm_jax.data.wordtok import WordTokens
from cslm_jax.errors import DataError
from cslm_jax.storage import fs

PREPARE_VERSION = 2
FEATURES = ("targets", "loss_weights")
SHARD_STRIDE = 104729            # a prime: consecutive lines of a file go round-robin over shards
MAX_SKIP_MESSAGES = 20


class CacheError(DataError):
    """A prepared cache is missing, incomplete or was prepared for other data; says what to do."""


def shard_of(file_index: int, line_no: int, num_shards: int) -> int:
    """The shard an example of line `line_no` (1-based) of the split's file `file_index` goes to."""
    return (file_index * SHARD_STRIDE + line_no - 1) % num_shards


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}.tfrecord-{shard:05d}-of-{num_shards:05d}"


def splits_of(spec: TaskSpec) -> dict[str, tuple]:
    """{split: files}; a TFDS task's splits have no files (its records come from the dataset)."""
    if spec.tfds is not None:
        from cslm_jax.data.sources import task_splits
        return {s: () for s in task_splits(spec)}
    return {s: files for s, files in (("train", spec.train), ("validation", spec.validation))
            if files}


def _is_url(path) -> bool:
    return "://" in str(path)


_DIGESTS: dict = {}


def _folder_stamp(path: str) -> tuple:
    return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                        for e in os.scandir(path) if e.is_file()))


def tokenizer_digest(tokenizer_dir: str | Path) -> str:
    """A digest of every file of the tokenizer folder (vocabulary, config and the chat template);
    a local folder's is kept while its files' names, sizes and times are unchanged."""
    if _is_url(tokenizer_dir):
        return _tokenizer_digest(tokenizer_dir)
    stamp = _folder_stamp(str(tokenizer_dir))
    hit = _DIGESTS.get(str(tokenizer_dir))
    if hit is None or hit[0] != stamp:
        hit = _DIGESTS[str(tokenizer_dir)] = (stamp, _tokenizer_digest(tokenizer_dir))
    return hit[1]


def _tokenizer_digest(tokenizer_dir: str | Path) -> str:
    h = hashlib.sha256()          # every file: vocabulary, config and the chat template (.jinja)
    if _is_url(tokenizer_dir):    # file:// or gs:// (dot files included, as locally)
        files = fs.glob(f"{str(tokenizer_dir).rstrip('/')}/*")
        local = fs.local_file(tokenizer_dir)
        isdir = os.path.isdir if local is not None else (lambda f: fs.path(f).is_dir())
        opener = fs.open_file
        if local is not None:
            files = [fs.local_file(f) for f in files]
    else:
        files = [os.path.join(str(tokenizer_dir), n) for n in os.listdir(tokenizer_dir)]
        isdir, opener = os.path.isdir, open
    for f in sorted(files):
        if isdir(f):
            continue
        h.update(os.path.basename(f).encode())
        with opener(f, "rb") as g:
            h.update(g.read())
    return h.hexdigest()[:16]


_LOCAL_TOKENIZERS: dict = {}


def local_tokenizer_dir(tokenizer_dir: str | Path) -> str:
    """A tokenizer folder on a URL (gs://...) copied to a local temporary folder, once per
    process (workers of a cluster job); a local folder as it is."""
    if not _is_url(tokenizer_dir):
        return str(tokenizer_dir)
    local = fs.local_file(tokenizer_dir)            # a file:// URL names a local folder
    if local is not None:
        return local
    if str(tokenizer_dir) not in _LOCAL_TOKENIZERS:
        _LOCAL_TOKENIZERS[str(tokenizer_dir)] = str(fs.local_dir(tokenizer_dir, "tokenizer folder"))
    return _LOCAL_TOKENIZERS[str(tokenizer_dir)]


def task_key(spec: TaskSpec, cfg: DataConfig, tokenizer_dir: str | Path, num_shards: int) -> dict:
    """What a task's prepared examples depend on (besides the files' contents): checked when
    training reads a prepared cache, so a cache made with another tokenizer, template, length or
    set of files is refused instead of silently trained on."""
    from cslm_jax.data.sources import tfds_cache_key

    key = {"version": PREPARE_VERSION, "task": spec.name, "kind": spec.kind, "lang": spec.lang,
            "files": {s: [os.path.basename(f) for f in fs] for s, fs in splits_of(spec).items()},
            "format": json.loads(json.dumps(dataclasses.asdict(cfg.format), default=str)),
            "max_length": cfg.max_length, "skip_bad": cfg.skip_bad, "num_shards": num_shards,
            "tokenizer": tokenizer_digest(tokenizer_dir)}
    if spec.tfds is not None:
        key["tfds"] = {s: tfds_cache_key(spec, s) for s in splits_of(spec)}
    return key


# -- fast chat rendering + tokenization ------------------------------------------------------------

_S0, _S1 = "\ue000", "\ue001"    # private-use characters around sentinel contents


def _sentinel(i: int) -> str:
    return f"{_S0}{i}{_S1}"


@dataclasses.dataclass
class _Plan:
    """How to build the ids of one role sequence: ids = prefix + fixed[0] + piece(0) + fixed[1]
    + ... ; piece(i) = heads[i] + transform(content_i) + tails[i], tokenized alone."""

    strip: bool
    fixed: list                  # ids of the constant stretches between variable pieces
    heads: list                  # constant text before each content inside its piece
    tails: list                  # constant text after each content inside its piece
    marks: tuple | None = None   # (user headers, assistant headers): (fixed piece, offset) each
    headers: int = 0             # header-start ids in the prefix and the fixed pieces


class FastChat:
    """`ids(batch)` == [renderer.encode(renderer.render_text(m)) for m in batch], batched.

    Per role sequence the template is rendered once with sentinel contents. It is used only when
    (a) every sentinel appears once, in order, and the content enters the text either verbatim
    or stripped (Jinja's `trim` is `str.strip`), the same on two different probes; (b) the part
    after the last content survives `render_text`'s trailing-header removal unchanged; (c) the
    tokenizer has no normalizer and the added tokens around each content have no
    lstrip/rstrip/single_word, and no added token can match across a content boundary; then the
    text splits at those added tokens exactly as the whole text would, so each piece is
    tokenized alone. Otherwise that role sequence renders with Jinja and tokenizes the whole
    text (still through the batch API). The first examples of each role sequence and every
    `verify_every`-th are also rendered the slow way and compared: a difference raises.
    """

    CACHE_SIZE = 4096            # texts and their ids kept (then the cache starts again)

    def __init__(self, renderer: ChatRenderer, verify_every: int = 1000):
        self.r = renderer
        self.bt = renderer.tok.backend_tokenizer
        self.special = renderer.adds_special_tokens
        self.verify_every = verify_every
        self.plans: dict[tuple, _Plan | None] = {}
        self.checked: collections.Counter = collections.Counter()
        self.checked_enough: set = set()             # role sequences checked 4 times
        self.count = 0
        self.added = {i: t for i, t in self.bt.get_added_tokens_decoder().items()}
        self.added_texts = sorted({t.content for t in self.added.values()})
        self.prefix = self._prefix()
        self.cache: dict[str, list[int]] = {}
        self.span_ids = self._span_ids()
        self.words = WordTokens.for_tokenizer(self.bt) if self.prefix is not None else None

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        encode = getattr(self.bt, "encode_batch_fast", self.bt.encode_batch)   # no offsets
        return [e.ids for e in encode(texts, add_special_tokens=special)]

    def _span_ids(self):
        """(id of <sosp>, id of <eosp>, {unit: id of <unit>}) when a speech span
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
        return (by_text["<sosp>"][0], by_text["<eosp>"][0],
                {u: by_text[n][0] for u, n in enumerate(names[2:])})

    def _prefix(self) -> list[int] | None:
        """The ids the post-processor adds in front (the reference's second <|begin_of_text|>);
        None when it adds anything else (then pieces are not used)."""
        if not self.special:
            return []
        prefix = None
        for probe in ("a", "Hello world 12", "<|eot_id|> x"):
            plain = self._encode([probe], False)[0]
            full = self._encode([probe], True)[0]
            if full[len(full) - len(plain):] != plain:
                return None
            p = full[: len(full) - len(plain)]
            if prefix is not None and p != prefix:
                return None
            prefix = p
        return prefix

    def _plan(self, roles: tuple) -> _Plan | None:
        def render(contents):
            return self.r.render_text([{"role": r, "content": c} for r, c in zip(roles, contents)])

        n = len(roles)
        sentinels = [_sentinel(i) for i in range(n)]
        skel = render(sentinels)
        pos = [skel.find(s) for s in sentinels]
        if any(p < 0 or skel.count(s) != 1 for p, s in zip(pos, sentinels)) or pos != sorted(pos):
            return None
        # how content enters the text: verbatim or stripped, independent of the content
        padded = [f" \n\t{s}x \n" for s in sentinels]
        out = render(padded)
        if out == _fill(skel, sentinels, padded):
            strip = False
        elif out == _fill(skel, sentinels, [f"{s}x" for s in sentinels]):
            strip = True
        else:
            return None
        # render_text removes a trailing assistant header: safe when that decision never
        # depends on the content (the template's text after the last content decides it)
        raw = self.r.tok.apply_chat_template([{"role": r, "content": c}
                                              for r, c in zip(roles, sentinels)], tokenize=False)
        tail = raw[raw.find(sentinels[-1]) + len(sentinels[-1]):].rstrip()
        header = self.r.assistant_header_text
        if not tail or (len(tail) < len(header) and header.endswith(tail)):
            return None
        if self.prefix is None or self.bt.normalizer is not None:
            return None
        # added tokens in the skeleton (offsets are in characters)
        enc = self.bt.encode(skel, add_special_tokens=False)
        spans = [(s, e, self.added[i]) for i, (s, e) in zip(enc.ids, enc.offsets) if i in self.added]
        longest = max(map(len, self.added_texts), default=0)
        fixed_bounds, heads, tails = [], [], []
        prev = 0
        for i, (p, s) in enumerate(zip(pos, sentinels)):
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
            if (_S0 in skel[max(cut_l - longest, 0):cut_l]
                    or _S0 in skel[cut_r:cut_r + longest]):
                return None
            before = skel[:cut_l]
            for t in self.added_texts:       # no added token can straddle a cut
                for k in range(1, len(t)):
                    if before.endswith(t[:k]) or skel.startswith(t[k:], cut_r):
                        return None
            fixed_bounds.append((prev, cut_l))
            heads.append(skel[cut_l:p])
            tails.append(skel[end:cut_r])
            prev = cut_r
        fixed_bounds.append((prev, len(skel)))
        fixed = self._encode([skel[a:b] for a, b in fixed_bounds], False)
        plan = _Plan(strip, fixed, heads, tails)
        self._mark(plan)
        return plan

    def _mark(self, plan: _Plan) -> None:
        """Where the loss mask's header patterns lie in the plan's constant pieces, so that
        `loss_mask` need not search each example (`ids(..., found=)`). Set only when the
        search would find exactly these: the user and assistant patterns start with the same
        id H, which occurs nowhere else in them (so occurrences cannot overlap); every H of a
        piece decides within the piece whether each pattern starts there (none could run into
        the following content, or into an EOS appended after the last piece); and an example
        whose contents hold no H (counted per example: `headers`) has no other occurrence."""
        user, assistant = list(self.r.user), list(self.r.assistant)
        if (not user or not assistant or user[0] != assistant[0] or user[0] in user[1:]
                or user[0] in assistant[1:] or self.prefix is None):
            return
        h = user[0]
        marks, headers = ([], []), self.prefix.count(h)
        if headers:
            return                                   # (a BOS is never a header)
        for f, piece in enumerate(plan.fixed):
            for p, i in enumerate(piece):
                if i != h:
                    continue
                headers += 1
                for k, pattern in enumerate((user, assistant)):
                    n = min(len(pattern), len(piece) - p)
                    if piece[p:p + n] == pattern[:n]:
                        if n < len(pattern):
                            return                   # decided by what follows the piece
                        marks[k].append((f, p))
        plan.marks, plan.headers = marks, headers

    def slow(self, messages) -> list[int]:
        return self.r.encode(self.r.render_text(plain(messages)))

    def ids(self, batch: list, found: list | None = None) -> list[list[int]]:
        """Token ids of each chat example of `batch` (see the class docstring). A content that
        is a `SpeechText` (parts: text, units, text, ...) has its spans' ids computed (see
        `_span_ids`); the text between them, and plain contents, are tokenized word by word
        (`WordTokens`) where the tokenizer allows, else through its batch API, each distinct
        text once. `found`, a list, receives per example the positions of the user and
        assistant header patterns (`_mark`; `loss_mask(..., found=)`), or None where
        `loss_mask` must search."""
        n = len(batch)
        out: list = [None] * n
        marked: list = [None] * n
        roles_of = [tuple([m["role"] for m in messages]) for messages in batch]
        words, cache = self.words, self.cache

        def keep(text: str, ids: list) -> list:
            if len(cache) >= self.CACHE_SIZE:
                cache.clear()
            cache[text] = ids
            return ids

        def by_words(text: str) -> list[int]:
            hit = cache.get(text)
            if hit is None:
                hit = words.ids(text) if words is not None and _S0 not in text else None
                if hit is None:
                    raise KeyError(text)
                keep(text, hit)
            return hit

        rest = self._assemble(batch, roles_of, range(n), by_words, out, marked)
        whole = []
        if rest:      # their texts through the batch API: collected, encoded at once, assembled
            need: dict = {}

            def collect(text: str) -> list[int]:
                if _S0 in text:
                    raise KeyError(text)
                hit = cache.get(text)
                if hit is None:
                    need[text] = None
                return hit or []

            whole = self._assemble(batch, roles_of, rest, collect, out, marked)
            for text, ids in zip(need, self._encode(list(need), False) if need else ()):
                need[text] = keep(text, ids)

            def encoded(text: str) -> list[int]:
                hit = cache.get(text)
                return need[text] if hit is None else hit    # (KeyError: the cache was cleared)

            gone = set(whole)
            whole += self._assemble(batch, roles_of, [j for j in rest if j not in gone], encoded,
                                    out, marked)
        if whole:     # no plan, or a unit the tokenizer lacks: Jinja and the tokenizer
            texts = [self.r.render_text(plain(batch[j])) for j in whole]
            for j, ids in zip(whole, self._encode(texts, self.special)):
                out[j], marked[j] = ids, None
        if found is not None:
            found[:] = marked
        base, self.count = self.count, self.count + len(batch)
        for j, roles in enumerate(roles_of):        # sample check against the exact path
            # the first 4 examples of each role sequence, then every verify_every-th example
            if roles in self.checked_enough and (base + j + 1) % self.verify_every:
                continue
            self.checked[roles] += 1
            if self.checked[roles] >= 4:
                self.checked_enough.add(roles)
            if out[j] != self.slow(batch[j]):
                raise DataError(f"fast chat rendering differs from the tokenizer's template for "
                                f"roles {roles}; prepare with fast rendering off "
                                f"(--no-fast-render) and report this")
        return out

    def _assemble(self, batch: list, roles_of: list, which, tokens, out: list,
                  marked: list) -> list[int]:
        """Build the ids of examples `which` of `batch` from their plans into `out` (header
        positions into `marked`), each text's ids from `tokens(text)` (KeyError: it cannot say).
        Returns the examples it could not build: no plan, a content it cannot take, a text
        `tokens` refuses, a unit the tokenizer lacks."""
        plans, cache, spans = self.plans, self.cache, self.span_ids
        header = self.r.user[0] if self.r.user else None
        if spans is not None:
            sosp, eosp, unit_ids = spans
            unit = unit_ids.__getitem__          # KeyError: a unit the tokenizer lacks
        failed = []
        for j in which:
            messages, roles = batch[j], roles_of[j]
            plan = plans.get(roles, ...)
            if plan is ...:
                plan = plans[roles] = self._plan(roles)
            if plan is None or len(messages[0]) != 2:
                failed.append(j)
                continue
            ids = list(self.prefix)
            starts = []
            try:
                for fixed, m, h, t in zip(plan.fixed, messages, plan.heads, plan.tails):
                    c = m["content"]
                    if len(m) != 2:
                        raise KeyError(c)
                    starts.append(len(ids))
                    ids += fixed
                    if c.__class__ is SpeechText and spans is not None:
                        parts = c.parts
                    else:
                        c = str(c) if c.__class__ is SpeechText else c
                        if not isinstance(c, str):
                            raise KeyError(c)
                        c = h + (c.strip() if plan.strip else c) + t
                        ids += cache.get(c) or tokens(c)
                        continue
                    if len(parts) == 3:              # one span: text, units, text
                        a, units, b = parts
                        if plan.strip:
                            a, b = a.lstrip(), b.rstrip()
                        a, b = h + a, b + t
                        if a:
                            ids += cache.get(a) or tokens(a)
                        ids.append(sosp)
                        ids += map(unit, units)
                        ids.append(eosp)
                        if b:
                            ids += cache.get(b) or tokens(b)
                        continue
                    if plan.strip:
                        parts = _strip_parts(parts)
                    last = len(parts) - 1
                    for k, p in enumerate(parts):
                        if k % 2:
                            ids.append(sosp)
                            ids += map(unit, p)
                            ids.append(eosp)
                        else:
                            p = (h + p if k == 0 else p) + (t if k == last else "")
                            if p:
                                ids += tokens(p)
            except KeyError:
                failed.append(j)
                continue
            starts.append(len(ids))
            ids += plan.fixed[-1]
            marks = plan.marks
            if marks is not None and ids.count(header) == plan.headers:
                # no header-start id in the contents: the template's headers are all there are
                marked[j] = ([starts[f] + o for f, o in marks[0]],
                             [starts[f] + o for f, o in marks[1]])
            out[j] = ids
        return failed


class SpeechText:
    """A chat content given by its parts [text, units, text, units, ..., text]: the content is
    text + speech(units) + text + ... (`str(content)`; it compares equal to that string). The
    string is built only where it is needed (Jinja, the exact path, the sample checks: `plain`);
    FastChat turns the parts into ids without it."""

    __slots__ = ("parts",)

    def __init__(self, parts: list):
        self.parts = parts

    def __str__(self) -> str:
        return "".join(p if k % 2 == 0 else speech(p) for k, p in enumerate(self.parts))

    def __eq__(self, other) -> bool:
        if isinstance(other, (str, SpeechText)):
            return str(self) == str(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))

    def __repr__(self) -> str:
        return f"SpeechText({str(self)!r})"


def speech_text(parts: list) -> SpeechText:
    return SpeechText(parts)


def plain(messages: list) -> list:
    """Messages with `SpeechText` contents turned into their strings (for Jinja)."""
    return [{**m, "content": str(m["content"])} if m.get("content").__class__ is SpeechText else m
            for m in messages]


def _strip_parts(parts: list) -> list:
    """The parts of the stripped string (spans start and end with '<': never stripped)."""
    if len(parts) == 1:
        return [parts[0].strip()]
    return [parts[0].lstrip(), *parts[1:-1], parts[-1].rstrip()]


def _fill(skel: str, sentinels: list, contents: list) -> str:
    for s, c in zip(sentinels, contents):
        skel = skel.replace(s, c)
    return skel


# -- records -> serialized examples ----------------------------------------------------------------

def serialize(ids: list[int], mask: list[int]) -> bytes:
    """The tf.train.Example {targets: ids, loss_weights: mask} (int64 lists), serialized as
    `SerializeToString(deterministic=True)` does (map keys sorted): `serialize_batch` builds the
    same bytes without a protobuf object per example."""
    import tensorflow as tf

    feature = {"targets": tf.train.Feature(int64_list=tf.train.Int64List(value=ids)),
               "loss_weights": tf.train.Feature(int64_list=tf.train.Int64List(value=mask))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
        deterministic=True)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _packed_varints(values: list) -> list[bytes]:
    """Per list of non-negative ints (< 2**35): its values as concatenated protobuf varints,
    computed for the whole batch at once with numpy."""
    import numpy as np

    lengths = np.fromiter(map(len, values), np.int64, len(values))
    flat = np.fromiter(itertools.chain.from_iterable(values), np.int64, int(lengths.sum()))
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << 35):
        raise ValueError("token ids must lie in [0, 2**35)")
    nbytes = np.ones_like(flat)
    for k in range(1, 5):
        nbytes += flat >= (1 << (7 * k))
    out = np.zeros((flat.size, 5), np.uint8)
    for k in range(5):
        byte = (flat >> (7 * k)) & 0x7F
        more = nbytes > k + 1
        out[:, k] = byte | (more << 7)
    keep = np.arange(5)[None, :] < nbytes[:, None]
    data = out[keep].tobytes()                  # row-major: each value's bytes in order
    ends = np.cumsum(np.bincount(np.repeat(np.arange(len(values)), lengths), weights=nbytes,
                                 minlength=len(values)).astype(np.int64))
    starts = np.concatenate([[0], ends[:-1]])
    return [data[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


def _int64_feature(payload: bytes) -> bytes:
    int64_list = (b"\x0a" + _varint(len(payload)) + payload) if payload else b""
    return b"\x1a" + _varint(len(int64_list)) + int64_list


def _entry(key: bytes, feature: bytes) -> bytes:
    entry = b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(len(feature)) + feature
    return b"\x0a" + _varint(len(entry)) + entry


_SMALL_VARINTS = [_varint(n) for n in range(1 << 14)]      # lengths below 16 KiB: a table


def _len_varint(n: int) -> bytes:
    return _SMALL_VARINTS[n] if n < 16384 else _varint(n)


# _VARINTS[n] == _varint(n) for n < L, then L Nones: a negative id (which would index from the end)
# meets a None, which b"".join refuses, as it refuses a non-integer; an id >= 2L is an IndexError
_VARINTS: list = []
_VARINT_TABLE_LIMIT = 1 << 21      # larger ids: numpy (_packed_varints)


def _grow_varints(largest: int) -> bool:
    size = max(1 << 14, 1 << largest.bit_length())
    if size > _VARINT_TABLE_LIMIT:
        return False
    have = _VARINTS[: len(_VARINTS) // 2]
    have += [_varint(n) for n in range(len(have), size)]
    _VARINTS[:] = have + [None] * size
    return True


def serialize_batch(ids: list, masks: list) -> list[bytes]:
    """`serialize` of each (ids, mask) pair, byte for byte (tests/test_prepare_data.py)."""
    out = []
    try:
        weights = list(map(bytes, masks))                    # 0/1: one byte each
    except ValueError:                                       # outside 0..255
        weights = None
    if weights is None or b"".join(weights).translate(None, b"\x00\x01"):
        if masks and max(max(m, default=0) for m in masks) > 1:
            raise ValueError("loss weights must be 0 or 1")
        weights = list(map(bytes, masks))                    # negative: bytes() raises
    try:                                                     # each id's varint from a table
        packed = [b"".join(map(_VARINTS.__getitem__, i)) for i in ids]
    except (IndexError, TypeError):
        nonempty = [i for i in ids if i]
        if (all(type(x) is int for i in nonempty for x in i) and min(map(min, nonempty)) >= 0
                and _grow_varints(max(map(max, nonempty)))):
            packed = [b"".join(map(_VARINTS.__getitem__, i)) for i in ids]
        else:
            packed = _packed_varints(ids)                    # (raises for negative ids)
    small, v = _SMALL_VARINTS.__getitem__, _len_varint
    for t, w in zip(packed, weights):
        if len(t) + len(w) < 16000:          # every length below is < 16384: the table itself
            v = small
        else:
            v = _len_varint
        # Features{feature: {"loss_weights": Feature{int64_list{packed w}}, "targets": ...}}
        lw = (b"\x0a" + v(len(w)) + w) if w else b""
        lw = b"\x1a" + v(len(lw)) + lw
        lw = b"\x0a\x0closs_weights\x12" + v(len(lw)) + lw
        tg = (b"\x0a" + v(len(t)) + t) if t else b""
        tg = b"\x1a" + v(len(tg)) + tg
        tg = b"\x0a\x07targets\x12" + v(len(tg)) + tg
        features = b"\x0a" + v(len(lw)) + lw + b"\x0a" + v(len(tg)) + tg
        out.append(b"\x0a" + v(len(features)) + features)
    return out


def new_counts() -> dict:
    return {"records": 0, "examples": 0, "truncated": 0, "skipped": 0, "targets_tokens": 0,
            "targets_max_tokens": 0, "loss_weights_tokens": 0, "loss_weights_max_tokens": 0,
            "trained_tokens": 0, "skipped_messages": []}


def merge_counts(a: dict, b: dict) -> dict:
    """Sum of two counts dicts; skipped messages kept in (file, line) order, the first 20."""
    out = {}
    for k in a:
        if k == "skipped_messages":
            out[k] = sorted(a[k] + b[k])[:MAX_SKIP_MESSAGES]
        elif k.endswith("_max_tokens"):
            out[k] = max(a[k], b[k])
        else:
            out[k] = a[k] + b[k]
    return out


_TOKENIZERS: dict = {}
_FAST_CHATS: dict = {}


def _load_tokenizer(path: str):
    """load_tokenizer(path), once per process while the folder's files are unchanged (the
    Preparers of a job's tasks share it, and with it the FastChat plans)."""
    from cslm_jax.model.vocab import load_tokenizer

    stamp = _folder_stamp(path)
    hit = _TOKENIZERS.get(path)
    if hit is None or hit[0] != stamp:
        hit = _TOKENIZERS[path] = (stamp, load_tokenizer(path))
    return hit[1]


def _fast_chat(renderer: ChatRenderer) -> "FastChat":
    """One FastChat per tokenizer object and loss-mask rule (what its plans depend on; not the
    maximum length): its plans, checks and cache of constant texts are made once per process."""
    key = (id(renderer.tok), renderer.mask)
    hit = _FAST_CHATS.get(key)
    if hit is None or hit[0] is not renderer.tok:
        hit = _FAST_CHATS[key] = (renderer.tok, FastChat(renderer))
    return hit[1]


def _template_around(template: str, field: str):
    """(before, after) when `template.format(**{field: x}) == before + x + after` for every
    string x: the template's only replacement field is `field`, once, without conversion or
    format spec (literal text as str.format unescapes it); else None."""
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return None
    fields = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
    if fields != [(field, "", None)]:
        return None
    before, after, seen = [], [], False
    for literal, name, _, _ in parsed:
        (after if seen else before).append(literal)
        if name is not None:
            seen = True
    return "".join(before), "".join(after)


_TEMPLATES: dict = {}


def _around(template: str, field: str):
    key = (template, field)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = _template_around(template, field)
    return _TEMPLATES[key]


def fast_examples(task_kind: str, record: dict, cfg, where: str) -> list:
    """`examples(...)` with the speech spans of asr, tts and s2s contents kept as unit lists
    (`SpeechText`): the same strings (tests/test_prepare_data.py), whose spans FastChat turns
    into ids without the tokenizer. Other kinds, and templates `_template_around` cannot split,
    are `examples` itself."""
    if task_kind in ("asr", "tts"):
        lang = cfg.lang(record["lang"], where, "lang")
        units = record["units"]
        units = merge_repeats(units) if cfg.merge_repeats else list(units)
        text = record["text"].strip()
        if task_kind == "asr":
            around = _around(lang.asr_prompt, "speech")
            if around is None:
                return examples(task_kind, record, cfg, where)
            return [[{"role": "user", "content": SpeechText([around[0], units, around[1]])},
                     {"role": "assistant", "content": text}]]
        return [[{"role": "user", "content": lang.tts_prompt.format(text=text)},
                 {"role": "assistant", "content": SpeechText(["", units, ""])}]]
    if task_kind == "s2s":
        q_lang = record["question_lang"]
        lang = cfg.lang(record["answer_lang"], where, "answer_lang")
        template = lang.s2s_prompt if q_lang == record["answer_lang"] else lang.s2s_cross_prompt
        around = _around(template, "speech")
        if around is None:
            return examples(task_kind, record, cfg, where)

        def units_of(field):
            u = record[field]
            return merge_repeats(u) if cfg.merge_repeats else list(u)

        prompt = SpeechText([around[0], units_of("question_units"), around[1]])
        times = validated_times(record, "answer_word_times", where,
                       timed_count(record["answer_text"], lang, cfg), len(record["answer_units"]), cfg)
        if cfg.chain == "sequential":
            items = ["[question]", record["question_text"].strip(), "[answer]",
                     record["answer_text"].strip(), units_of("answer_units"), "<eoa>"]
        else:
            items = ["[question]", record["question_text"].strip(), "[answer]"]
            for text, units in chunk_answer(record["answer_text"], times, record["answer_units"],
                                            lang, cfg):
                items += [text.strip(), list(units)]
            items.append("<eoa>")
        keep_empty = cfg.chain == "sequential"  # sequential_response joins all its items,
        parts, cur, first = [], "", True        # interleaved_response the non-empty ones
        for item in items:
            if isinstance(item, list):
                parts += [cur if first else cur + " ", item]
                cur, first = "", False
            elif item or keep_empty:
                cur += item if first else " " + item
                first = False
        parts.append(cur)
        return [[{"role": "user", "content": prompt},
                 {"role": "assistant", "content": SpeechText(parts)}]]
    return examples(task_kind, record, cfg, where)


def fast_parse_line(line: str, where: str) -> dict:
    """`parse_line(line, where)` (json) through orjson, several times faster; what orjson rejects
    (NaN/Infinity and lone surrogates, which json accepts; bad JSON, for json's message) and
    non-object records go to `parse_line`. Floats are read to the same correctly rounded values
    and duplicate keys keep the last, as json does. The one value orjson reads differently is an
    integer beyond 64 bits (a float, json an int), which makes a record invalid either way
    (unit ids must be integers below the codebook size, times are read through float(), the
    other checked fields are strings): `Preparer` re-reads a record that fails validation with
    `parse_line`, so its error and the decision are json's."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return parse_line(line, where)
    if type(record) is not dict:
        return parse_line(line, where)
    return record


class Preparer:
    """Lines of a task's JSONL file -> (shard, serialized example), as `read_jsonl` +
    `examples` + `ChatRenderer` do, with the per-example work batched. Strict: the first bad
    record raises RecordError (file, line, field); with `cfg.skip_bad` bad records are counted
    in `counts` (and the first messages kept) instead. `fast=False` renders every example with
    the tokenizer's Jinja template (the exact path; same output)."""

    def __init__(self, spec: TaskSpec, cfg: DataConfig, tokenizer_dir: str | Path,
                 fast: bool = True, batch_size: int = 64, tokenizer=None):
        self.spec, self.cfg = spec, cfg
        tok = tokenizer if tokenizer is not None else _load_tokenizer(local_tokenizer_dir(tokenizer_dir))
        self.renderer = ChatRenderer(tok, cfg.max_length, mask=cfg.format.loss_mask)
        self.chat = _fast_chat(self.renderer)
        self.fast = fast
        self.batch_size = batch_size
        self.record_kind = RECORD_KIND_OF_TASK[spec.kind]
        self.counts = new_counts()

    def _skip(self, counts: dict, file_index: int, line_no: int, err: Exception) -> None:
        if not self.cfg.skip_bad:
            raise err
        counts["skipped"] += 1
        if len(counts["skipped_messages"]) < MAX_SKIP_MESSAGES:
            counts["skipped_messages"].append((file_index, line_no, str(err)))

    def line_batches(self, path: str, file_index: int, numbered, num_shards: int,
                     counts: dict | None = None):
        """Lists of (shard, serialized example) for the examples of `numbered` ((line number,
        raw bytes) of `path`, the split's file number `file_index`), in line order; counted in
        `counts` (default: `self.counts`; several threads may share a Preparer, each with its
        counts)."""
        counts = self.counts if counts is None else counts
        pending = []                  # (line number, messages)
        spec, fmt = self.spec, self.cfg.format
        parse = fast_parse_line if self.fast else parse_line
        for n, raw in numbered:
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                                f"line); JSONL corpora must be UTF-8") from None
            if not line or line.isspace():
                self._skip(counts, file_index, n, RecordError(where, "<json>", "empty line"))
                continue
            try:
                try:
                    record = parse(line, where)
                    validate_record(self.record_kind, record, fmt, where)
                except RecordError:
                    if parse is parse_line:
                        raise
                    record = parse_line(line, where)    # json's reading decides, in its words
                    validate_record(self.record_kind, record, fmt, where)
            except RecordError as e:
                self._skip(counts, file_index, n, e)
                continue
            if spec.kind in ("asr", "tts") and record["lang"] != spec.lang:
                self._skip(counts, file_index, n, RecordError(where, "lang", f"is {record['lang']!r} but "
                                                                     f"task {spec.name} is for "
                                                                     f"{spec.lang!r}"))
                continue
            counts["records"] += 1
            for messages in (fast_examples if self.fast else examples)(spec.kind, record, fmt, where):
                pending.append((n, messages))
            if len(pending) >= self.batch_size:
                yield self._flush(pending, file_index, num_shards, counts)
                pending = []
        if pending:
            yield self._flush(pending, file_index, num_shards, counts)

    def tfds_batches(self, split: str, num_shards: int, counts: dict | None = None):
        """Lists of (shard, serialized example) for a TFDS task's split: its examples
        (`sources`), mapped to records and validated as JSONL lines are, then prepared as
        `line_batches` prepares them (example i takes the place of line i of file 0)."""
        from cslm_jax.data.sources import task_records

        counts = self.counts if counts is None else counts
        spec, fmt = self.spec, self.cfg.format
        skipped: list = []
        pending = []
        n = 0
        for n, (where, record) in enumerate(task_records(spec, split, fmt, self.cfg.skip_bad,
                                                          skipped), start=1):
            for err in skipped:
                self._skip(counts, 0, n, err)
            skipped.clear()
            counts["records"] += 1
            for messages in (fast_examples if self.fast else examples)(spec.kind, record, fmt, where):
                pending.append((n, messages))
            if len(pending) >= self.batch_size:
                yield self._flush(pending, 0, num_shards, counts)
                pending = []
        for err in skipped:
            self._skip(counts, 0, n + 1, err)
        if pending:
            yield self._flush(pending, 0, num_shards, counts)

    def _flush(self, pending, file_index: int, num_shards: int, c: dict) -> list:
        msgs = [m for _, m in pending]
        found: list = [None] * len(msgs)
        all_ids = self.chat.ids(msgs, found) if self.fast else [self.chat.slow(m) for m in msgs]
        done_ids, done_masks, truncated = zip(*map(self.renderer.finish_ids, all_ids, found))
        lengths, mask_lengths = list(map(len, done_ids)), list(map(len, done_masks))
        c["examples"] += len(done_ids)
        c["truncated"] += sum(truncated)
        c["targets_tokens"] += sum(lengths)
        c["loss_weights_tokens"] += sum(mask_lengths)
        c["targets_max_tokens"] = max(c["targets_max_tokens"], *lengths)
        c["loss_weights_max_tokens"] = max(c["loss_weights_max_tokens"], *mask_lengths)
        c["trained_tokens"] += sum(map(sum, done_masks))
        data = (serialize_batch(done_ids, done_masks) if self.fast else
                [serialize(i, m) for i, m in zip(done_ids, done_masks)])
        return [(shard_of(file_index, n, num_shards), example)
                for (n, _), example in zip(pending, data)]


_RECORD_HEADS: dict = {}           # record length -> its 8 bytes and their masked CRC-32C


class RecordWriter:
    """A TFRecord file written without TensorFlow (the bytes tf.io.TFRecordWriter writes:
    length, masked CRC-32C of the length, data, masked CRC-32C of the data), so Beam workers
    need not import TensorFlow. Local paths on `open`; URLs (file://, gs://) through
    cslm_jax.storage.fs."""

    def __init__(self, path: str):
        import google_crc32c

        self._crc = google_crc32c.value
        self._f = fs.open_file(path, "wb") if _is_url(path) else open(path, "wb")

    def _masked(self, data: bytes) -> bytes:
        crc = self._crc(data)
        return ((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF).to_bytes(4, "little")

    def write(self, data: bytes) -> None:
        self.write_many((data,))

    def write_many(self, records) -> None:
        """`write` each of `records`, in one write (the length and its CRC from a table)."""
        masked, heads = self._masked, _RECORD_HEADS
        out = []
        for data in records:
            n = len(data)
            head = heads.get(n)
            if head is None:
                length = n.to_bytes(8, "little")
                head = length + masked(length)
                if n < 1 << 16:
                    heads[n] = head
            out += (head, data, masked(data))
        self._f.write(b"".join(out))

    def close(self) -> None:
        self._f.close()


def write_batch(writers, batch: list, open_writer=None) -> None:
    """Write a batch of (shard, record) to `writers` (a list or dict by shard; a missing one is
    `open_writer(shard)`), each shard's records in one write where the writer can."""
    by_shard: dict = {}
    for shard, data in batch:
        by_shard.setdefault(shard, []).append(data)
    for shard, records in by_shard.items():
        w = writers[shard] if open_writer is None or shard in writers else None
        if w is None:
            w = writers[shard] = open_writer(shard)
        many = getattr(w, "write_many", None)
        if many is not None:
            many(records)
        else:
            for data in records:
                w.write(data)


def record_writer(path: str):
    return RecordWriter(path)


def numbered_lines(path: str, start: int = 0, end: int | None = None, first_line: int = 1,
                   tally: dict | None = None):
    """(line number, raw bytes) of the lines of `path` that start in [start, end) (`start` is a
    line start, `first_line` its number), as iterating the file in binary mode gives them.
    `tally`: given, its "lines" is set to the number of lines read once they are all read (what
    the cache records of each input, `input_record`)."""
    opener = fs.open_file if _is_url(path) else open    # gs:// through the one GCS client
    try:
        f = opener(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        f.seek(start)
        pos, n = start, first_line
        while end is None or pos < end:
            raw = f.readline()
            if not raw:
                break
            yield n, raw
            pos += len(raw)
            n += 1
    if tally is not None:
        tally["lines"] = n - first_line


def plan_ranges(path: str, range_bytes: int) -> list[tuple[int, int, int]]:
    """(start byte, end byte, number of the first line) of ranges of about `range_bytes`, each
    starting at a line start: one sequential pass counting newlines."""
    opener = open
    if _is_url(path):
        size, opener = fs.file_size(path), fs.open_file
    else:
        size = os.path.getsize(path)
    starts = [(0, 1)]
    if size > range_bytes:
        with opener(path, "rb") as f:
            pos, lines, want = 0, 0, range_bytes
            while True:
                chunk = f.read(1 << 23)
                if not chunk:
                    break
                while want <= pos + len(chunk):
                    i = chunk.find(b"\n", max(want - 1 - pos, 0))
                    if i < 0:
                        break
                    start = pos + i + 1
                    if start >= size:
                        want = size + 1
                        break
                    starts.append((start, 1 + lines + chunk.count(b"\n", 0, i + 1)))
                    want = start + range_bytes
                lines += chunk.count(b"\n")
                pos += len(chunk)
    return [(s, starts[k + 1][0] if k + 1 < len(starts) else size, line)
            for k, (s, line) in enumerate(starts)]


# -- the cache layout --------------------------------------------------------------------------------

def seqio_version() -> str:
    """seqio.__version__, without importing seqio (and TensorFlow) where it is not imported yet:
    the installed distribution's version (tests/test_prepare_data.py checks they agree)."""
    import sys

    if "seqio" in sys.modules:
        return sys.modules["seqio"].__version__
    if "seqio" not in _SEQIO_VERSION:
        from importlib.metadata import version
        _SEQIO_VERSION["seqio"] = version("seqio")
    return _SEQIO_VERSION["seqio"]


_SEQIO_VERSION: dict = {}


def info_json(num_shards: int, key: dict) -> dict:
    return {"features": {f: {"dtype": "int32", "shape": [None]} for f in FEATURES},
            "num_shards": num_shards, "seqio_version": seqio_version(), "cslm": key}


def stats_json(counts: dict) -> dict:
    out = {k: v for k, v in counts.items() if k != "skipped_messages"}
    out["skipped_messages"] = [m for _, _, m in sorted(counts["skipped_messages"])]
    return out


def write_json(path: str, data: dict) -> None:
    """Whole or absent (`fs.write_text_atomic`: a synced temporary file renamed into place; one
    object upload on gs://)."""
    fs.write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=1))


def completed_key(task_dir: str | Path) -> dict | None:
    """The key a complete cache was prepared with; None when the cache is not complete."""
    path = os.path.join(str(task_dir), "COMPLETED")
    if _is_url(path):
        if not fs.exists(path):
            return None
        with fs.open_file(path, "r") as f:
            text = f.read()
    else:
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


def key_differences(found: dict, key: dict, ignore=()) -> list[tuple[str, str]]:
    """(field, "X in the cache, Y here") for each setting of `key` a cache's record `found`
    differs in (`inputs` and `ignore` left out); a mapping's differing entries are named one by
    one (format.loss_mask, files.train)."""
    def show(v):
        if isinstance(v, str):
            return repr(v)
        return "(none)" if v is None else json.dumps(v, ensure_ascii=False)

    out = []
    for k in sorted(set(key) | set(found)):
        if k in ignore or k == "inputs" or found.get(k) == key.get(k):
            continue
        a, b = found.get(k), key.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            parts = [f"{k}.{sub} {show(a.get(sub))} in the cache, {show(b.get(sub))} here"
                     for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
        elif k == "tokenizer":
            parts = [f"tokenizer files digest {a} in the cache, {b} here"]
        else:
            parts = [f"{k} {show(a)} in the cache, {show(b)} here"]
        out.append((k, "; ".join(parts)))
    return out


def input_stamp(path: str) -> dict:
    """What tells a changed input file without reading it: its size and modification time (ns);
    a gs:// object's generation and md5 (or crc32c) from its metadata instead of the time."""
    s = str(path)
    if s.startswith("gs://"):
        import fsspec

        fs.path(s)                                  # the one GCS set-up (emulator, caches)
        info = fsspec.filesystem("gs").info(s)
        out = {"size": int(info["size"])}
        for field, name in (("generation", "generation"), ("md5Hash", "md5"), ("crc32c", "crc32c")):
            if info.get(field):
                out[name] = str(info[field])
        return out
    if _is_url(s):                  # file://: a local file, its time in whole seconds as
        st = os.stat(fs.local_file(s))      # tf.io.gfile.stat gave it (caches prepared before)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns // 10**9 * 10**9}
    st = os.stat(s)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def input_record(files, stamps, lines) -> list[dict]:
    """A split's entry of COMPLETED's `inputs`: per file its name, `input_stamp` (taken before
    it was read) and line count."""
    return [{"file": os.path.basename(str(f)), **st, "lines": int(n)}
            for f, st, n in zip(files, stamps, lines)]


COUNT_LINES_UP_TO = 256 << 20     # an input's lines are counted again for a message up to this size


def _time(ns: int, other: int) -> str:
    import datetime

    def fmt(v, spec):
        return datetime.datetime.fromtimestamp(v / 1e9).isoformat(" ", spec)

    a, b = fmt(ns, "seconds"), fmt(other, "seconds")
    return a if a != b else fmt(ns, "microseconds") if fmt(ns, "microseconds") != fmt(
        other, "microseconds") else f"{ns} ns"


def _stamp_difference(path: str, then: dict, now: dict) -> str | None:
    """How an input changed since `then` ("120 lines (5,000 bytes), now 30 lines (1,250
    bytes)"), or None. A content hash both sides have decides alone; else the object generation,
    else the modification time."""
    if then.get("size") != now["size"]:
        lines = None
        if not _is_url(path) and now["size"] <= COUNT_LINES_UP_TO:
            with open(path, "rb") as f:
                data = f.read()
            lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        if "lines" in then and lines is not None:
            return (f"{then['lines']} lines ({then.get('size'):,} bytes), now {lines} lines "
                    f"({now['size']:,} bytes)")
        was = f"{then['lines']} lines, " if "lines" in then else ""
        return f"{was}{then.get('size'):,} bytes, now {now['size']:,} bytes"
    for name in ("md5", "crc32c"):
        if name in then and name in now:
            return (None if then[name] == now[name] else
                    f"{name} {then[name]}, now {now[name]} (same size, {now['size']:,} bytes)")
    if "generation" in then and "generation" in now:
        return (None if then["generation"] == now["generation"] else
                f"object generation {then['generation']}, now {now['generation']} (same size)")
    if "mtime_ns" in then and "mtime_ns" in now and then["mtime_ns"] != now["mtime_ns"]:
        return (f"modified {_time(then['mtime_ns'], now['mtime_ns'])}, now "
                f"{_time(now['mtime_ns'], then['mtime_ns'])} (same size, {now['size']:,} bytes)")
    return None


def inputs_changed(found: dict, spec: TaskSpec) -> str | None:
    """Why a cache's record `found` no longer matches the task's input files ("prepared from an
    older x.jsonl: 120 lines (...), now 30 lines (...)"), or None. A file absent here (training
    hosts need not hold the corpus) is not checked."""
    if "inputs" not in found:
        return ("prepared by an older cslm-jax, which did not record its input files' sizes and "
                "times (a changed corpus cannot be told)")
    for split, files in splits_of(spec).items():
        for path, then in zip(files, found["inputs"].get(split, [])):
            try:
                now = input_stamp(path)
            except Exception as e:            # noqa: BLE001 - only a missing file is skipped
                if isinstance(e, FileNotFoundError) or type(e).__name__ == "NotFoundError":
                    continue
                raise
            what = _stamp_difference(str(path), then, now)
            if what is not None:
                name = then.get("file", os.path.basename(str(path)))
                return f"prepared from an older {name}: {what}"
    return None


def check_cache(task_dir: str | Path, key: dict, spec: TaskSpec | None = None) -> None:
    """Raise CacheError unless `task_dir` holds a complete cache prepared with `key` (the shard
    count excepted: any prepared count is read) and, given `spec`, from its input files as they
    are now (`inputs_changed`)."""
    found = completed_key(task_dir)
    if found is None:
        raise CacheError(f"{task_dir}: no prepared cache (COMPLETED missing); prepare it with "
                         f"`cslm-jax prepare-data --out {os.path.dirname(str(task_dir))} ...` (an "
                         f"interrupted preparation is completed by running it again)")
    diff = key_differences(found, key, ignore=("num_shards",))
    if diff:
        raise CacheError(f"{task_dir}: prepared with different {', '.join(k for k, _ in diff)} "
                         f"than this data config and tokenizer ({'; '.join(d for _, d in diff)}); "
                         f"prepare again into a new --out (or the same with --force)")
    why = inputs_changed(found, spec) if spec is not None else None
    if why is not None:
        raise CacheError(f"{task_dir}: {why}; prepare it again: `cslm-jax prepare-data --out "
                         f"{os.path.dirname(str(task_dir))} --force ...`")


def prepare_task_local(spec: TaskSpec, cfg: DataConfig, tokenizer_dir: str | Path,
                       task_dir: str | Path, num_shards: int = 1, fast: bool = True,
                       tokenizer=None) -> dict:
    """Prepare every split of a task in this process into `task_dir` (the SeqIO cache layout,
    the same bytes `cslm-jax prepare-data` writes for the same shard count). Written in a
    folder of its own (unique per process) and renamed into place whole, COMPLETED inside; a
    failure leaves nothing. `tokenizer`: the tokenizer of `tokenizer_dir`, already loaded.
    Returns {split: counts}."""
    import shutil
    import uuid

    task_dir = Path(task_dir)
    key = task_key(spec, cfg, tokenizer_dir, num_shards)
    tmp = task_dir.with_name(task_dir.name + f".tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    out, inputs = {}, {}
    try:
        prep = Preparer(spec, cfg, tokenizer_dir, fast=fast, tokenizer=tokenizer)
        for split, files in splits_of(spec).items():
            prep.counts = new_counts()
            writers = [record_writer(str(tmp / shard_name(split, s, num_shards)))
                       for s in range(num_shards)]
            stamps = [input_stamp(f) for f in files]
            tallies = [{} for _ in files]
            try:
                if spec.tfds is not None:
                    for batch in prep.tfds_batches(split, num_shards):
                        write_batch(writers, batch)
                for file_index, path in enumerate(files):
                    for batch in prep.line_batches(path, file_index,
                                                   numbered_lines(path, tally=tallies[file_index]),
                                                   num_shards):
                        write_batch(writers, batch)
            finally:
                for w in writers:
                    w.close()
            out[split] = prep.counts
            inputs[split] = input_record(files, stamps, [t["lines"] for t in tallies])
            (tmp / f"info.{split}.json").write_text(json.dumps(info_json(num_shards, key), indent=1))
            (tmp / f"stats.{split}.json").write_text(json.dumps(stats_json(prep.counts),
                                                                ensure_ascii=False, indent=1))
        (tmp / "COMPLETED").write_text(json.dumps(dict(key, inputs=inputs), indent=1))
        try:
            os.rename(tmp, task_dir)
        except OSError:           # another process prepared it first: the same content
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_stats(task_dir: str | Path, split: str) -> dict:
    with fs.open_file(os.path.join(str(task_dir), f"stats.{split}.json"), "r") as f:
        return json.load(f)
