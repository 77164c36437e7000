"""The bundled demo corpus: small, bilingual (en, zh), generated, learnable on CPU.

Speech units derive from text through a pronunciation-like mapping: every word (en) or
character (zh) has a fixed unit; each unit lasts a random 1-3 frames; words are separated by
silence (unit 0). Word timings come from the construction (at `UNIT_RATE` units/s,
before merging). So ASR and TTS are learnable, spoken questions have real timings to chunk by,
and a model can be checked for far-below-chance transcription error after stage 1.

Contents (train / validation JSONL under the output folder, plus `data.yaml` and `tokenizer/`):
paired speech/text per language, en<->zh translation pairs, text instructions (single and
multi-turn), spoken instructions same-language and cross-lingual.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

from cslm_jax.model.vocab import train_bpe_tokenizer
from cslm_jax.storage.outputs import check_output_dir, clear_output, mark_entries, write_marker

UNIT_COUNT = 256
UNIT_RATE = 50.0
SILENCE = 0
PUNCT = ".,!?;:。，！？；："

ANIMALS = [
    ("cat", "猫"),
    ("dog", "狗"),
    ("bird", "鸟"),
    ("fish", "鱼"),
    ("horse", "马"),
    ("cow", "牛"),
    ("sheep", "羊"),
    ("duck", "鸭子"),
    ("frog", "青蛙"),
    ("bear", "熊"),
    ("lion", "狮子"),
    ("tiger", "老虎"),
    ("rabbit", "兔子"),
    ("mouse", "老鼠"),
    ("goat", "山羊"),
    ("pig", "猪"),
]
COLORS = [
    ("red", "红色"),
    ("blue", "蓝色"),
    ("green", "绿色"),
    ("yellow", "黄色"),
    ("black", "黑色"),
    ("white", "白色"),
    ("brown", "棕色"),
    ("gray", "灰色"),
]
VERBS = [
    ("run", "跑步"),
    ("swim", "游泳"),
    ("sleep", "睡觉"),
    ("eat", "吃饭"),
    ("sing", "唱歌"),
    ("jump", "跳舞"),
]
PLACES = [
    ("park", "公园"),
    ("river", "河边"),
    ("farm", "农场"),
    ("forest", "森林"),
    ("house", "房子"),
    ("garden", "花园"),
]
EN_FILLER = [
    "the",
    "a",
    "big",
    "small",
    "happy",
    "old",
    "young",
    "sees",
    "likes",
    "near",
    "in",
    "and",
    "with",
    "today",
    "very",
    "my",
    "your",
    "two",
    "three",
    "good",
    "day",
]
ZH_FILLER = list("我你他她们的很大小在和看见今天有一只两三个好")


def color_of(i: int) -> int:
    return (3 * i + 1) % len(COLORS)


def verb_of(i: int) -> int:
    return (5 * i + 2) % len(VERBS)


def place_of(i: int) -> int:
    return (7 * i + 3) % len(PLACES)


def _known_symbols() -> tuple[list[str], list[str]]:
    """Every English word and Chinese character the corpus can say, in a fixed order."""
    en_texts, zh_texts = list(EN_FILLER), list(ZH_FILLER)
    for i in range(len(ANIMALS)):
        for kind in facts(i).values():
            en_texts.extend(kind["en"])
            zh_texts.extend(kind["zh"])
    for group in (ANIMALS, COLORS, VERBS, PLACES):
        en_texts.extend(e for e, _ in group)
        zh_texts.extend(z for _, z in group)
    en = sorted({w.strip(PUNCT).lower() for t in en_texts for w in t.split()} - {""})
    zh = sorted({c for t in zh_texts for c in t if not (c.isspace() or c in PUNCT)})
    return en, zh


class Pronouncer:
    """A fixed word (en) / character (zh) -> speech-unit table; `say` synthesises units with
    timings. Each English word is one unit from the lower half of the codebook, each Chinese
    character one from the upper half, held for 1-3 frames (repeats merge away), with silence
    (unit 0) between words. A toy "speech" whose ASR a few-million-parameter model learns in
    minutes on a CPU: the demo checks the pipeline, not acoustics."""

    def __init__(self, seed: int = 1234):
        self.rng_seed = seed
        en, zh = _known_symbols()
        rng = random.Random(seed)
        en_codes = rng.sample(range(1, UNIT_COUNT // 2), len(en))
        zh_codes = rng.sample(range(UNIT_COUNT // 2, UNIT_COUNT), len(zh))
        self.table: dict[str, list[int]] = {w: [c] for w, c in zip(en, en_codes)}
        self.table.update({ch: [c] for ch, c in zip(zh, zh_codes)})

    def pattern(self, piece: str) -> list[int]:
        key = piece.strip(PUNCT).lower()
        if not key:
            return []  # punctuation is silent
        if key not in self.table:  # a word outside the demo's vocabulary
            h = random.Random(f"{self.rng_seed}:{key}")
            lo, hi = (1, UNIT_COUNT // 2) if key.isascii() else (UNIT_COUNT // 2, UNIT_COUNT)
            self.table[key] = [h.randrange(lo, hi)]
        return self.table[key]

    def say(self, pieces: list[str], rng: random.Random) -> tuple[list[int], list[list[float]]]:
        """Units (unmerged) for the timed pieces, and [start, end] seconds per piece."""
        units: list[int] = [SILENCE] * rng.randint(2, 4)
        times = []
        for piece in pieces:
            start = len(units)
            for u in self.pattern(piece):
                units.extend([u] * rng.randint(1, 3))
            times.append([round(start / UNIT_RATE, 4), round(len(units) / UNIT_RATE, 4)])
            units.extend([SILENCE] * rng.randint(1, 3))
        units.extend([SILENCE] * rng.randint(1, 3))
        return units, times


def timed_pieces(text: str, lang: str) -> list[str]:
    """The timed tokens of a text: words (en) or characters without punctuation (zh)."""
    if lang == "en":
        return text.split()
    return [c for c in text if not (c.isspace() or c in PUNCT)]


def _en_sentence(rng) -> str:
    words = [rng.choice(EN_FILLER) for _ in range(rng.randint(2, 4))]
    words.insert(rng.randrange(len(words) + 1), rng.choice(ANIMALS)[0])
    words.insert(rng.randrange(len(words) + 1), rng.choice(COLORS)[0])
    if rng.random() < 0.5:
        words.append(rng.choice(PLACES)[0])
    return " ".join(words)


def _zh_sentence(rng) -> str:
    chars = [rng.choice(ZH_FILLER) for _ in range(rng.randint(2, 5))]
    chars.insert(rng.randrange(len(chars) + 1), rng.choice(ANIMALS)[1])
    chars.insert(rng.randrange(len(chars) + 1), rng.choice(COLORS)[1])
    return "".join(chars) + ("。" if rng.random() < 0.5 else "")


def facts(i: int) -> dict:
    """Question/answer pairs about animal i in both languages."""
    (an, az), (cn, cz), (vn, vz), (pn, pz) = (
        ANIMALS[i],
        COLORS[color_of(i)],
        VERBS[verb_of(i)],
        PLACES[place_of(i)],
    )
    return {
        "color": {
            "en": (f"what color is the {an}?", f"the {an} is {cn}."),
            "zh": (f"{az}是什么颜色？", f"{az}是{cz}的。"),
        },
        "verb": {
            "en": (
                f"what does the {an} like to do?",
                f"the {an} likes to {vn}, and it lives near the {pn}.",
            ),
            "zh": (f"{az}喜欢做什么？", f"{az}喜欢{vz}，它住在{pz}附近。"),
        },
    }


def build_corpus(seed: int = 0, scale: int = 1) -> dict[str, list[dict]]:
    """All records by file stem (e.g. 'paired_en.train')."""
    rng = random.Random(seed)
    voice = Pronouncer()
    out: dict[str, list[dict]] = {}

    def paired(lang: str, text: str) -> dict:
        units, times = voice.say(timed_pieces(text, lang), rng)
        return {"lang": lang, "text": text, "units": units, "word_times": times}

    for lang, make in (("en", _en_sentence), ("zh", _zh_sentence)):
        out[f"paired_{lang}.train"] = [paired(lang, make(rng)) for _ in range(500 * scale)]
        out[f"paired_{lang}.validation"] = [paired(lang, make(rng)) for _ in range(40)]

    mt = []
    for i, (an, az) in enumerate(ANIMALS):
        for kind in facts(i).values():
            mt.append(
                {"src_lang": "en", "tgt_lang": "zh", "src": kind["en"][1], "tgt": kind["zh"][1]}
            )
            mt.append(
                {"src_lang": "zh", "tgt_lang": "en", "src": kind["zh"][0], "tgt": kind["en"][0]}
            )
        for cn, cz in COLORS:
            mt.append(
                {
                    "src_lang": "en",
                    "tgt_lang": "zh",
                    "src": f"i see a {cn} {an}.",
                    "tgt": f"我看见一只{cz}的{az}。",
                }
            )
    rng.shuffle(mt)
    out["mt.train"], out["mt.validation"] = mt[:-20], mt[-20:]

    instruct = []
    for i in range(len(ANIMALS)):
        f = facts(i)
        for lang in ("en", "zh"):
            for kind in f.values():
                instruct.append({"prompt": kind[lang][0], "response": kind[lang][1]})
            instruct.append(
                {
                    "prompt": [f["color"][lang][0], f["verb"][lang][0]],
                    "response": [f["color"][lang][1], f["verb"][lang][1]],
                }
            )
    out["instruct.train"] = instruct * max(1, scale)

    for q_lang, a_lang in (("en", "en"), ("zh", "zh"), ("en", "zh"), ("zh", "en")):
        rows = []
        for i in range(len(ANIMALS)):
            for kind in facts(i).values():
                for _ in range(4 * scale if q_lang == a_lang else 2 * scale):
                    q_text, a_text = kind[q_lang][0], kind[a_lang][1]
                    q_units, _ = voice.say(timed_pieces(q_text, q_lang), rng)
                    a_units, a_times = voice.say(timed_pieces(a_text, a_lang), rng)
                    rows.append(
                        {
                            "question_units": q_units,
                            "question_text": q_text,
                            "question_lang": q_lang,
                            "answer_text": a_text,
                            "answer_units": a_units,
                            "answer_word_times": a_times,
                            "answer_lang": a_lang,
                        }
                    )
        rng.shuffle(rows)
        out[f"s2s_{q_lang}2{a_lang}.train"], out[f"s2s_{q_lang}2{a_lang}.validation"] = (
            rows[:-8],
            rows[-8:],
        )
    return out


def corpus_texts(corpus: dict[str, list[dict]], data_config: dict) -> list[str]:
    """Every text a demo tokenizer should know: the corpus and the configured prompts."""
    texts = []
    for rows in corpus.values():
        for r in rows:
            for k in ("text", "src", "tgt", "question_text", "answer_text"):
                if k in r:
                    texts.append(r[k])
            for k in ("prompt", "response"):
                if k in r:
                    texts.extend(r[k] if isinstance(r[k], list) else [r[k]])
    # Every training example renders the chat template's system block, its role headers and one
    # task prompt. Weight them as often as training renders them, so that BPE merges them into a
    # few tokens (as Llama-3's own tokenizer does) instead of spelling them byte by byte: at
    # equal weight an ASR example was 136 tokens for a 5-word answer, and 256-token rows held
    # one example each.
    templates = [
        "[question]",
        "[answer]",
        "Cutting Knowledge Date: December 2023",
        "Today Date: 26 Jul 2024",
        "system",
        "user",
        "assistant",
    ]
    for spec in data_config["languages"].values():
        for k, v in spec.items():
            if k.endswith("prompt"):
                templates.extend(p for p in re.split(r"\{\w+\}", str(v)) if p.strip())
    examples = sum(len(rows) for rows in corpus.values())
    texts.extend(templates * max(1, examples // len(templates)))
    return texts


def make_demo_data(
    out: str | Path,
    config_template: str | Path,
    seed: int = 0,
    scale: int = 1,
    vocab_size: int = 1000,
    force: bool = False,
    log=print,
) -> Path:
    """Write the demo corpus, its tokenizer (BPE with Llama-3 special tokens, not yet extended
    with units: `import-hf` does that) and `data.yaml` into `out`."""
    out = Path(out)
    check_output_dir(out, force, tool="make-demo-data")
    if out.exists():
        clear_output(out)
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "make-demo-data")
    template = yaml.safe_load(Path(config_template).read_text())
    corpus = build_corpus(seed, scale)
    for stem, rows in corpus.items():
        with open(out / f"{stem}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    template["data_dir"] = "."
    (out / "data.yaml").write_text(yaml.safe_dump(template, allow_unicode=True, sort_keys=False))
    tok = train_bpe_tokenizer(corpus_texts(corpus, template), vocab_size=vocab_size)
    tok.save_pretrained(str(out / "tokenizer"))
    mark_entries(out, "make-demo-data")
    n = sum(len(r) for r in corpus.values())
    log(
        f"make-demo-data: {n} records in {len(corpus)} files, tokenizer of {len(tok)} tokens -> {out}"
    )
    return out
