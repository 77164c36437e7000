"""The CSLM vocabulary: a base text tokenizer extended with speech units and control tokens.

Layout (ids): [0, base_size) the base tokenizer; [unit_offset, unit_offset + unit_count) the units
`<0>` ... `<N-1>` (unit_offset == base_size); then `<sosp>`, `<eosp>`, `<eoa>`, `[question]`,
`[answer]`; then padding rows up to a multiple (padded_size) whose logits the model masks.
This metadata travels with every checkpoint and is trimmed away on export.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cslm_jax.errors import CslmError
from cslm_jax.storage import fs

CONTROL_TOKENS = ("<sosp>", "<eosp>", "<eoa>", "[question]", "[answer]")
VOCAB_FORMAT = 1

# Llama-3.1's 256 special tokens, in id order after the 128000 BPE ranks.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A Llama-3.1-style chat template (the system header with its knowledge-cutoff lines, then one
# header + content + <|eot_id|> per message), without the tool-calling branches.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    '{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    '{%- else %}{%- set system_message = "" %}{%- endif %}'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}'
    '{{- "Today Date: " + date_string + "\\n\\n" }}'
    '{{- system_message }}{{- "<|eot_id|>" }}'
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


class VocabError(CslmError):
    """Vocabulary metadata or tokenizer is missing or inconsistent; the message names the source."""


def unit_token(i: int) -> str:
    return f"<{i}>"


@dataclasses.dataclass(frozen=True)
class VocabInfo:
    base_size: int
    unit_count: int
    control_tokens: tuple[str, ...]
    padded_size: int

    @property
    def unit_offset(self) -> int:
        return self.base_size

    @property
    def size(self) -> int:
        """Real (unpadded) vocabulary size: base + units + control tokens."""
        return self.base_size + self.unit_count + len(self.control_tokens)

    def token_id(self, token: str) -> int:
        if token in self.control_tokens:
            return self.base_size + self.unit_count + self.control_tokens.index(token)
        raise VocabError(f"{token!r} is not a CSLM control token of this vocabulary")

    def unit_id(self, unit: int) -> int:
        if not 0 <= unit < self.unit_count:
            raise VocabError(f"unit {unit} is outside the codebook (0..{self.unit_count - 1})")
        return self.unit_offset + unit

    def to_dict(self) -> dict:
        return {
            "format": VOCAB_FORMAT,
            "base_size": self.base_size,
            "unit_offset": self.unit_offset,
            "unit_count": self.unit_count,
            "control_tokens": list(self.control_tokens),
            "size": self.size,
            "padded_size": self.padded_size,
        }

    @classmethod
    def from_dict(cls, data: dict | None, where: str) -> "VocabInfo":
        if not isinstance(data, dict):
            raise VocabError(
                f"{where}: no vocabulary metadata (field 'vocab'); was this checkpoint "
                f"written by `cslm-jax import-hf` or `cslm-jax train`?"
            )
        for field in ("base_size", "unit_count", "control_tokens", "padded_size"):
            if field not in data:
                raise VocabError(f"{where}: vocabulary metadata lacks field 'vocab.{field}'")
        info = cls(
            int(data["base_size"]),
            int(data["unit_count"]),
            tuple(data["control_tokens"]),
            int(data["padded_size"]),
        )
        if "unit_offset" in data and int(data["unit_offset"]) != info.unit_offset:
            raise VocabError(
                f"{where}: field 'vocab.unit_offset' ({data['unit_offset']}) must equal "
                f"base_size ({info.base_size})"
            )
        if info.padded_size < info.size:
            raise VocabError(
                f"{where}: field 'vocab.padded_size' ({info.padded_size}) is smaller than "
                f"the vocabulary ({info.size})"
            )
        return info


# -- tokenizers ------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path):
    """A `transformers` fast tokenizer from a folder (tokenizer.json and its config), local or
    gs:// (downloaded once per process: transformers reads local files)."""
    from transformers import PreTrainedTokenizerFast  # heavy: transformers

    if fs.is_remote(path):
        path = fs.local_dir(fs.path(path), "tokenizer folder")
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise VocabError(
            f"{path}: no tokenizer.json or tokenizer_config.json; the CSLM vocabulary "
            f"is built on the checkpoint's own tokenizer"
        )
    if _generic_fast(path):
        # the class AutoTokenizer picks for these names, loaded without importing its model
        # registry (which imports torch where it is installed: 1-2 s per process)
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        from transformers import AutoTokenizer  # heavy: transformers

        tok = AutoTokenizer.from_pretrained(str(path))
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise VocabError(f"{path}: tokenizer class {type(tok).__name__} is not a fast tokenizer")
    return tok


def _generic_fast(path: Path) -> bool:
    """Whether the folder names the generic fast tokenizer class (`PreTrainedTokenizerFast`,
    transformers 5's `TokenizersBackend`), as our folders and Llama-3's do."""
    config = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() or not config.is_file():
        return False
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (ValueError, OSError, AttributeError):
        return False
    return name in ("PreTrainedTokenizerFast", "TokenizersBackend")


def _wrap_llama3_style(tokenizer_object, chat_template: str):
    """A PreTrainedTokenizerFast with Llama-3's special-token roles, BOS prepended on encode."""
    from tokenizers import processors  # heavy: tokenizers
    from transformers import PreTrainedTokenizerFast  # heavy: transformers

    bos = "<|begin_of_text|>"
    bos_id = tokenizer_object.token_to_id(bos)
    tokenizer_object.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )


def llama3_tokenizer():
    """The true Llama-3.1 tokenizer (128000 BPE ranks + 256 special tokens), built offline from
    the `llama-models` package's tiktoken file."""
    import llama_models  # heavy: llama_models
    from transformers.convert_slow_tokenizer import TikTokenConverter  # heavy: transformers

    model_file = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not model_file.is_file():
        raise VocabError(f"{model_file} not found: install the PyPI package 'llama-models'")
    converter = TikTokenConverter(
        vocab_file=str(model_file),
        pattern=LLAMA3_PATTERN,
        extra_special_tokens=LLAMA3_SPECIAL_TOKENS,
    )
    return _wrap_llama3_style(converter.converted(), LLAMA31_CHAT_TEMPLATE)


def train_bpe_tokenizer(texts, vocab_size: int = 512):
    """A small byte-level BPE tokenizer trained on `texts`, with Llama-3's pre-tokenizer, its 256
    special tokens after the BPE ranks, and a Llama-3.1-style chat template."""
    # heavy: tokenizers, only where a tokenizer is built
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens(LLAMA3_SPECIAL_TOKENS)
    return _wrap_llama3_style(tok, LLAMA31_CHAT_TEMPLATE)


def cslm_tokens(unit_count: int) -> list[str]:
    return [unit_token(i) for i in range(unit_count)] + list(CONTROL_TOKENS)


def existing_layout(tokenizer, where: str) -> VocabInfo | None:
    """The CSLM layout of a tokenizer that already carries the CSLM tokens (e.g. one we exported),
    or None when it carries none of them."""
    vocab = tokenizer.get_vocab()
    if "<sosp>" not in vocab and unit_token(0) not in vocab:
        return None
    if unit_token(0) not in vocab:
        base, count = vocab["<sosp>"], 0
    else:
        base = vocab[unit_token(0)]
        count = 0
        while vocab.get(unit_token(count)) == base + count:
            count += 1
    expect = base + count
    for j, name in enumerate(CONTROL_TOKENS):
        if vocab.get(name) != expect + j:
            raise VocabError(
                f"{where}: tokenizer has CSLM tokens but {name!r} is at id "
                f"{vocab.get(name)}, expected {expect + j} (units <0>..<{count - 1}> at "
                f"{base}..{expect - 1}); the vocabulary layout is not contiguous"
            )
    return VocabInfo(base, count, CONTROL_TOKENS, base + count + len(CONTROL_TOKENS))


def extend_tokenizer(
    tokenizer, unit_count: int, base_size: int, where: str = "tokenizer"
) -> VocabInfo:
    """Add the units `<0>`..`<N-1>` and the control tokens right after the base vocabulary.

    `base_size` is the number of embedding rows of the base model; the tokenizer must have exactly
    that many tokens so the new ids are contiguous after it. Returns the layout (unpadded).
    """
    from tokenizers import AddedToken  # heavy: tokenizers

    if unit_count < 0:
        raise VocabError(f"speech unit count must be >= 0, got {unit_count}")
    if unit_count == 0:
        return VocabInfo(base_size, 0, (), base_size)
    if len(tokenizer) != base_size:
        raise VocabError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model has "
            f"{base_size} embedding rows (config.json field 'vocab_size'); the speech "
            f"tokens must follow the base vocabulary contiguously"
        )
    new = [
        AddedToken(
            t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=False
        )
        for t in cslm_tokens(unit_count)
    ]
    added = tokenizer.add_tokens(new)
    if added != len(new):
        raise VocabError(
            f"{where}: {len(new) - added} CSLM token(s) already existed in the tokenizer"
        )
    info = VocabInfo(base_size, unit_count, CONTROL_TOKENS, base_size + len(new))
    check_layout(tokenizer, info, where)
    return info


def require_cslm_tokens(
    tokenizer, where: str, unit_count: int | None = None, unit_source: str | None = None
) -> None:
    """Refuse a tokenizer that lacks the CSLM tokens (the control tokens and the units
    `<0>`..`<unit_count - 1>`, each one token): with it `<sosp>` and `<12>` would be split into
    characters and the data or prompts silently mean something else. VocabError names them;
    `unit_source` says where `unit_count` came from (a data config's format.unit_count)."""
    vocab = tokenizer.get_vocab()
    wanted = list(CONTROL_TOKENS) + [unit_token(0)]
    if unit_count:
        wanted.append(unit_token(unit_count - 1))
    missing = [t for t in wanted if t not in vocab]
    if unit_count and missing == [unit_token(unit_count - 1)]:
        have = sum(1 for i in range(unit_count) if unit_token(i) in vocab)
        raise VocabError(
            f"{where}: the tokenizer has {have} speech units but "
            f"{unit_source or 'the data config'} says {unit_count} (it lacks "
            f"{missing[0]}); import the model with `--speech-units {unit_count}` "
            f"or give the data config of the units this model was built for"
        )
    if missing:
        text_only = " (no speech units: a text-only tokenizer)" if unit_token(0) in missing else ""
        raise VocabError(
            f"{where}: the tokenizer lacks the CSLM token(s) {' '.join(missing)}"
            f"{text_only}; "
            f"give the CSLM-extended tokenizer (a checkpoint's tokenizer/, written by "
            f"`cslm-jax import-hf`, or an export-hf folder)"
        )


def require_model_cslm_tokens(model_dir: str | Path, unit_count: int | None = None) -> None:
    """`require_cslm_tokens` on a model folder's tokenizer (a checkpoint's tokenizer/, or a
    Hugging Face folder itself), before its weights are loaded."""
    model_dir = fs.path(model_dir)
    is_checkpoint = (model_dir / "cslm_checkpoint.json").is_file()
    tok_dir = model_dir / "tokenizer" if is_checkpoint else model_dir
    require_cslm_tokens(load_tokenizer(tok_dir), str(tok_dir), unit_count)


def check_layout(tokenizer, info: VocabInfo, where: str) -> None:
    """The tokenizer's ids agree with the layout: units and control tokens where it says."""
    vocab = tokenizer.get_vocab()
    for name, want in (
        [
            (unit_token(0), info.unit_offset),
            (unit_token(info.unit_count - 1), info.unit_offset + info.unit_count - 1),
        ]
        if info.unit_count
        else []
    ):
        if vocab.get(name) != want:
            raise VocabError(f"{where}: token {name!r} has id {vocab.get(name)}, expected {want}")
    for name in info.control_tokens:
        if vocab.get(name) != info.token_id(name):
            raise VocabError(
                f"{where}: token {name!r} has id {vocab.get(name)}, expected {info.token_id(name)}"
            )
