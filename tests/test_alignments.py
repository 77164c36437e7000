"""Word timings from forced aligners (MFA TextGrid long/short, whisperX JSON in both layouts,
ctc-forced-aligner JSON and text) joined to records by id: parsing, the matching rules, clear
errors for mismatches and missing alignments, atomic output, and joined records that validate
and interleave exactly as records carrying the same timings."""

import dataclasses
import json

import pytest

from conftest import REPO
from cslm_jax.cli.main import main as cli
from cslm_jax.data.alignments import (
    AlignedWord,
    AlignmentError,
    Alignments,
    fill_untimed,
    join_timings,
    mfa_words,
    read_alignment,
    word_times,
)
from cslm_jax.data.formats import RecordError, examples, load_data_config, validate_record

PUNCT = ".,!?;:。，！？；：、…"

LONG = """File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0 
xmax = 1.9 
tiers? <exists> 
size = 2 
item []: 
    item [1]:
        class = "IntervalTier" 
        name = "words" 
        xmin = 0 
        xmax = 1.9 
        intervals: size = 5 
        intervals [1]:
            xmin = 0 
            xmax = 0.25 
            text = "" 
        intervals [2]:
            xmin = 0.25 
            xmax = 0.6 
            text = "the" 
        intervals [3]:
            xmin = 0.6 
            xmax = 1.1 
            text = "cat's" 
        intervals [4]:
            xmin = 1.1 
            xmax = 1.7 
            text = "here" 
        intervals [5]:
            xmin = 1.7 
            xmax = 1.9 
            text = "" 
    item [2]:
        class = "IntervalTier" 
        name = "phones" 
        xmin = 0 
        xmax = 1.9 
        intervals: size = 2 
        intervals [1]:
            xmin = 0 
            xmax = 0.25 
            text = "" 
        intervals [2]:
            xmin = 0.25 
            xmax = 1.9 
            text = "DH" 
"""

SHORT = """File type = "ooTextFile short"
"TextGrid"

0
1.9
<exists>
2
"IntervalTier"
"phones"
0
1.9
1
0
1.9
"DH"
"IntervalTier"
"words"
0
1.9
5
0
0.25
""
0.25
0.6
"the"
0.6
1.1
"cat's"
1.1
1.7
"here"
1.7
1.9
""
"""

EXPECTED = [
    AlignedWord("the", 0.25, 0.6),
    AlignedWord("cat's", 0.6, 1.1),
    AlignedWord("here", 1.1, 1.7),
]


def test_textgrid_long_short_and_utf16_give_the_words_without_silences(tmp_path):
    assert mfa_words(LONG, "long") == EXPECTED
    assert mfa_words(SHORT, "short") == EXPECTED
    (tmp_path / "a.TextGrid").write_bytes(LONG.encode("utf-16"))  # Praat's own non-ASCII choice
    assert read_alignment(tmp_path / "a.TextGrid", "mfa") == EXPECTED
    # a quote inside a label is doubled in Praat files
    assert mfa_words(SHORT.replace('"here"', '"say ""hi"""'), "q")[2].text == 'say "hi"'
    with pytest.raises(AlignmentError, match="not a Praat TextGrid text file"):
        mfa_words('{"segments": []}', "x.TextGrid")


def test_textgrid_speaker_tiers_need_a_choice():
    two = SHORT.replace('"phones"', '"spk2 - words"').replace('"words"', '"spk1 - words"')
    with pytest.raises(AlignmentError, match=r"several words tier\(s\).*pass --tier NAME"):
        mfa_words(two, "two.TextGrid")
    assert mfa_words(two, "two.TextGrid", tier="spk1 - words") == EXPECTED
    with pytest.raises(AlignmentError, match="TextGrid ends early"):
        mfa_words(SHORT[:-20], "cut.TextGrid")


WHISPERX_SEGMENTS = {
    "segments": [
        {
            "start": 0.2,
            "end": 1.0,
            "text": " The cat, in 2014.",
            "words": [
                {"word": "The", "start": 0.2, "end": 0.4, "score": 0.9},
                {"word": "cat,", "start": 0.45, "end": 0.7, "score": 0.8},
                {"word": "in", "start": 0.8, "end": 0.9, "score": 0.7},
                {"word": "2014."},
            ],
        },
        {
            "start": 1.4,
            "end": 2.0,
            "text": " Yes.",
            "words": [{"word": "Yes.", "start": 1.4, "end": 1.8, "score": 0.9}],
        },
    ],
    "language": "en",
}


def test_whisperx_both_layouts_and_untimed_words(tmp_path):
    flat = {"word_segments": [w for s in WHISPERX_SEGMENTS["segments"] for w in s["words"]]}
    (tmp_path / "seg.json").write_text(json.dumps(WHISPERX_SEGMENTS))
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    a = read_alignment(tmp_path / "seg.json", "whisperx")
    assert a == read_alignment(tmp_path / "flat.json", "whisperx")
    assert [w.text for w in a] == ["The", "cat,", "in", "2014.", "Yes."]
    assert a[3].start is None and a[3].end is None
    filled, n = fill_untimed(a, 2.5, "x")
    assert n == 1 and (filled[3].start, filled[3].end) == (0.9, 1.4)  # the gap to "Yes."
    with pytest.raises(AlignmentError, match=r"x: word 4 '2014\.' has no timing"):
        fill_untimed(a, 2.5, "x", untimed="error")
    # untimed at the edges: from 0 / to the utterance's end; a run shares its gap evenly
    edge = [
        AlignedWord("1", None, None),
        AlignedWord("a", 1.0, 1.2),
        AlignedWord("2", None, None),
        AlignedWord("3", None, None),
    ]
    assert [(w.start, w.end) for w in fill_untimed(edge, 2.0, "x")[0]] == [
        (0.0, 1.0),
        (1.0, 1.2),
        (1.2, 1.6),
        (1.6, 2.0),
    ]
    # a segment whisperX could not align keeps its own span, as one piece
    unaligned = {"segments": [{"start": 0.0, "end": 1.0, "text": " Hi there", "words": []}]}
    (tmp_path / "u.json").write_text(json.dumps(unaligned))
    assert read_alignment(tmp_path / "u.json", "whisperx") == [
        AlignedWord(" Hi there", 0.0, 1.0, coarse=True)
    ]
    assert word_times(
        "Hi there", read_alignment(tmp_path / "u.json", "whisperx"), "word", PUNCT, "x"
    ) == [[0.0, 0.2857], [0.2857, 1.0]]  # 2 and 5 characters of 7


def test_ctc_forced_aligner_json_and_text(tmp_path):
    # as ctc-forced-aligner's align.py writes them: json.dump({"text", "segments"}) and
    # f"{start}-{end}: {text}\n" per segment (star tokens already left out)
    segs = [
        {"start": 0.12, "end": 0.5, "text": "This", "score": -0.3},
        {"start": 0.5, "end": 0.74, "text": "is", "score": -0.1},
        {"start": 0.8, "end": 1.46, "text": "audio.", "score": -0.2},
    ]
    (tmp_path / "u1.json").write_text(
        json.dumps({"text": "This is audio.", "segments": segs}, indent=4)
    )
    (tmp_path / "u1.txt").write_text(
        "".join(f"{s['start']}-{s['end']}: {s['text']}\n" for s in segs)
    )
    j = read_alignment(tmp_path / "u1.json", "ctc")
    assert j == read_alignment(tmp_path / "u1.txt", "ctc")
    assert j == [AlignedWord(s["text"], s["start"], s["end"]) for s in segs]
    assert word_times("This is audio.", j, "word", PUNCT, "x") == [
        [0.12, 0.5],
        [0.5, 0.74],
        [0.8, 1.46],
    ]
    # character split of Chinese (split_size char, as it does for 'chi'): spaces and
    # punctuation come as their own segments and carry no timing of ours
    chars = "你好， 世界。"
    lines = "".join(f"{i * 0.2:.1f}-{i * 0.2 + 0.2:.1f}: {c}\n" for i, c in enumerate(chars))
    (tmp_path / "u2.txt").write_text(lines)
    assert word_times(
        "你好，世界。", read_alignment(tmp_path / "u2.txt", "ctc"), "char", PUNCT, "x"
    ) == [[0.0, 0.2], [0.2, 0.4], [0.8, 1.0], [1.0, 1.2]]
    with pytest.raises(AlignmentError, match=r"u3.txt:2: expected 'START-END: TEXT'"):
        (tmp_path / "u3.txt").write_text("0.1-0.2: a\nnot a line\n")
        read_alignment(tmp_path / "u3.txt", "ctc")


def test_matching_rules():
    # case, punctuation (ASCII, Unicode, apostrophes) and spaces are ignored
    a = [AlignedWord("HELLO", 0.0, 0.5), AlignedWord("worlds", 0.5, 1.0)]
    assert word_times("«Hello», world’s!", a, "word", PUNCT, "x") == [[0.0, 0.5], [0.5, 1.0]]
    # one of our words over two aligner words (MFA splits at hyphens), and a lone dash
    a = [AlignedWord("well", 0.0, 0.3), AlignedWord("known", 0.3, 0.8), AlignedWord("ok", 1.0, 1.2)]
    assert word_times("well-known — ok", a, "word", PUNCT, "x") == [
        [0.0, 0.8],
        [0.8, 0.8],
        [1.0, 1.2],
    ]
    # Chinese: aligner words over several of our per-character timings, split by characters
    a = [
        AlignedWord("我们", 0.0, 0.4),
        AlignedWord("学习", 0.5, 0.9),
        AlignedWord("Python", 1.0, 1.6),
    ]
    assert word_times("我们学习 Python。", a, "char", PUNCT, "x") == [
        [0.0, 0.2],
        [0.2, 0.4],
        [0.5, 0.7],
        [0.7, 0.9],
        [1.0, 1.1],
        [1.1, 1.2],
        [1.2, 1.3],
        [1.3, 1.4],
        [1.4, 1.5],
        [1.5, 1.6],
    ]
    # and characters against our words
    a = [AlignedWord(c, i * 0.1, i * 0.1 + 0.1) for i, c in enumerate("okgo")]
    assert word_times("OK go", a, "word", PUNCT, "x") == [[0.0, 0.2], [0.2, 0.4]]
    # <unk> (older MFA's out-of-vocabulary word) stands for one word in word languages only
    a = [AlignedWord("i", 0.0, 0.1), AlignedWord("<unk>", 0.1, 0.5), AlignedWord("it", 0.5, 0.7)]
    assert word_times("I grokked it", a, "word", PUNCT, "x") == [[0.0, 0.1], [0.1, 0.5], [0.5, 0.7]]
    with pytest.raises(AlignmentError, match="cannot be matched in a character language"):
        word_times("我们", [AlignedWord("<unk>", 0.0, 1.0)], "char", PUNCT, "x")


def test_mismatches_name_the_words():
    a = [AlignedWord("the", 0.0, 0.2), AlignedWord("dog", 0.2, 0.5)]
    with pytest.raises(
        AlignmentError,
        match=r"^f.TextGrid: record 'r1': aligner word 2 'dog' "
        r"\(0.200-0.500s\) does not match answer word 2 "
        r"'cat\.'.*'dog' vs 'cat'",
    ):
        word_times("The cat.", a, "word", PUNCT, "f.TextGrid: record 'r1'")
    with pytest.raises(
        AlignmentError,
        match=r"the alignment ends before answer word 3 'sat' "
        r"\(and 1 more\); it has 2 words",
    ):
        word_times("the dog sat down", a, "word", PUNCT, "x")
    with pytest.raises(AlignmentError, match=r"aligner word 2 'dog'.*beyond the end"):
        word_times("the", a, "word", PUNCT, "x")
    with pytest.raises(AlignmentError, match=r"does not match answer character 2 '界'"):
        word_times("世界", [AlignedWord("世上", 0.0, 0.4)], "char", PUNCT, "x")


# -- joining records ----------------------------------------------------------------------------


def textgrid(words, duration):
    """A long-format MFA TextGrid of (label, start, end), silences between words left empty."""
    intervals, t = [], 0.0
    for label, start, end in words:
        if start > t:
            intervals.append((t, start, ""))
        intervals.append((start, end, label))
        t = end
    if duration > t:
        intervals.append((t, duration, ""))
    body = "".join(
        f"        intervals [{i}]:\n            xmin = {a} \n            xmax = {b} \n"
        f'            text = "{label}" \n'
        for i, (a, b, label) in enumerate(intervals, 1)
    )
    return (
        f'File type = "ooTextFile"\nObject class = "TextGrid"\n\nxmin = 0 \nxmax = {duration} \n'
        f'tiers? <exists> \nsize = 1 \nitem []: \n    item [1]:\n        class = "IntervalTier" \n'
        f'        name = "words" \n        xmin = 0 \n        xmax = {duration} \n'
        f"        intervals: size = {len(intervals)} \n{body}"
    )


def aligner_words(record, cfg):
    """What an aligner would report for a record: its timed tokens (case folded, punctuation
    still attached, as aligners keep it) with the record's own timings."""
    from cslm_jax.data.formats import piece_is_timed, timed_tokens

    lang = cfg.languages[record["answer_lang"]]
    pieces = [
        p.strip()
        for p in timed_tokens(record["answer_text"], lang.chunk_unit, cfg.punctuation)
        if piece_is_timed(p, lang.chunk_unit, cfg.punctuation)
    ]
    return [(p.lower(), a, b) for p, (a, b) in zip(pieces, record["answer_word_times"])]


def write_alignments(folder, fmt, records, cfg):
    folder.mkdir()
    for r in records:
        words = aligner_words(r, cfg)
        duration = len(r["answer_units"]) / cfg.unit_rate
        if fmt == "mfa":
            (folder / "spk").mkdir(exist_ok=True)  # MFA mirrors speaker folders
            (folder / "spk" / f"{r['id']}.TextGrid").write_text(textgrid(words, duration))
        elif fmt == "whisperx":
            (folder / f"{r['id']}.json").write_text(
                json.dumps(
                    {
                        "segments": [
                            {
                                "start": words[0][1],
                                "end": words[-1][2],
                                "text": "",
                                "words": [{"word": w, "start": a, "end": b} for w, a, b in words],
                            }
                        ]
                    },
                    ensure_ascii=False,
                )
            )
        else:
            (folder / f"{r['id']}.json").write_text(
                json.dumps(
                    {
                        "text": r["answer_text"],
                        "segments": [
                            {"start": a, "end": b, "text": w, "score": -0.1} for w, a, b in words
                        ],
                    },
                    ensure_ascii=False,
                )
            )


@pytest.fixture(scope="module")
def s2s_records(demo):
    data_dir, _ = demo
    cfg = load_data_config(data_dir / "data.yaml", check_files=False).format
    # small chunks, so that the demo's short answers interleave in several
    cfg = dataclasses.replace(
        cfg, languages={k: dataclasses.replace(v, chunk_size=3) for k, v in cfg.languages.items()}
    )
    records = []
    for name in (
        "s2s_en2en.validation.jsonl",
        "s2s_zh2zh.validation.jsonl",
        "s2s_en2zh.validation.jsonl",
    ):
        rows = [json.loads(line) for line in (data_dir / name).read_text().splitlines()]
        records += [dict(r, id=f"{name.split('.')[0]}-{i}") for i, r in enumerate(rows[:4])]
    return cfg, records


@pytest.mark.parametrize("fmt", ["mfa", "whisperx", "ctc"])
def test_joined_records_validate_and_interleave_as_the_originals(tmp_path, s2s_records, fmt):
    cfg, records = s2s_records
    write_alignments(tmp_path / "align", fmt, records, cfg)
    bare = tmp_path / "records.jsonl"
    bare.write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if k != "answer_word_times"}, ensure_ascii=False)
            + "\n"
            for r in records
        )
    )
    counts = join_timings(
        bare, tmp_path / "align", fmt, tmp_path / "out.jsonl", cfg, log=lambda *_: None
    )
    assert (counts["joined"], counts["missing"], counts["unused_alignments"]) == (
        len(records),
        0,
        0,
    )
    joined = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in joined] == [r["id"] for r in records]
    for new, old in zip(joined, records):
        validate_record("spoken_instruction", new, cfg, new["id"])
        assert sum(new["answer_word_times"], []) == pytest.approx(
            sum(old["answer_word_times"], []), abs=1e-4
        )
        # the interleaved chain (text chunks and the units that speak them) is the original's
        assert examples("s2s", new, cfg, "new") == examples("s2s", old, cfg, "old")
    chunks = [examples("s2s", r, cfg, "x")[0][1]["content"].count("<sosp>") for r in joined]
    assert min(chunks) >= 2, "every answer is interleaved in several chunks"


def test_join_errors_missing_and_atomic_output(tmp_path, s2s_records, capsys):
    cfg, records = s2s_records
    records = records[:3]
    write_alignments(tmp_path / "align", "ctc", records[:2], cfg)
    bare = tmp_path / "records.jsonl"
    bare.write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if k != "answer_word_times"}, ensure_ascii=False)
            + "\n"
            for r in records
        )
    )
    out = tmp_path / "out.jsonl"
    # strict: the record without an alignment stops the join, and no output appears
    with pytest.raises(
        AlignmentError,
        match=rf"records.jsonl:3: record '{records[2]['id']}' has no "
        rf"alignment.*--allow-missing",
    ):
        join_timings(bare, tmp_path / "align", "ctc", out, cfg, log=lambda *_: None)
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.tmp-*"))
    counts = join_timings(bare, tmp_path / "align", "ctc", out, cfg, allow_missing=True, log=print)
    assert (counts["joined"], counts["missing"], counts["missing_ids"]) == (
        2,
        1,
        [records[2]["id"]],
    )
    assert len(out.read_text().splitlines()) == 2
    assert f"no alignment: {records[2]['id']}" in capsys.readouterr().out
    with pytest.raises(Exception, match="exists; pass --force"):
        join_timings(bare, tmp_path / "align", "ctc", out, cfg, allow_missing=True)
    # a word that does not match: the error names the alignment file, record id and words
    bad = tmp_path / "align" / f"{records[0]['id']}.json"
    data = json.loads(bad.read_text())
    data["segments"][1]["text"] = "zebra"
    bad.write_text(json.dumps(data, ensure_ascii=False))
    before = out.read_text()
    with pytest.raises(
        AlignmentError,
        match=rf"{bad}: record '{records[0]['id']}' \(.*records.jsonl:1\): "
        rf"aligner word 2 'zebra' .* does not match answer",
    ):
        join_timings(bare, tmp_path / "align", "ctc", out, cfg, allow_missing=True, force=True)
    assert out.read_text() == before, "a failed join leaves the earlier output as it was"
    counts = join_timings(
        bare,
        tmp_path / "align",
        "ctc",
        out,
        cfg,
        allow_missing=True,
        skip_bad=True,
        force=True,
        log=lambda *_: None,
    )
    assert (counts["joined"], counts["bad"], counts["missing"]) == (1, 1, 1)
    # timings that do not fit the units are a record error, as validate-data reports them
    data["segments"][1]["text"] = aligner_words(records[0], cfg)[1][0]
    data["segments"][-1]["end"] = 999.0
    bad.write_text(json.dumps(data, ensure_ascii=False))
    with pytest.raises(
        RecordError,
        match=r"records.jsonl:1: field 'answer_word_times\[\d+\]': end "
        r"999.0s lies beyond the utterance",
    ):
        join_timings(bare, tmp_path / "align", "ctc", out, cfg, allow_missing=True, force=True)


def test_alignment_index_by_path_stem_and_jsonl(tmp_path):
    (tmp_path / "a" / "s1").mkdir(parents=True)
    (tmp_path / "a" / "s2").mkdir()
    for s in ("s1", "s2"):
        (tmp_path / "a" / s / "u.TextGrid").write_text(LONG)
    (tmp_path / "a" / "s1" / "v.TextGrid").write_text(SHORT)
    index = Alignments(tmp_path / "a", "mfa")
    assert index.get("s2/u")[1] == EXPECTED and index.get("v")[1] == EXPECTED
    assert index.get("w") is None and index.unused() == 1
    with pytest.raises(AlignmentError, match="matches several alignment files"):
        index.get("u")
    lines = tmp_path / "wx.jsonl"
    lines.write_text(
        json.dumps(dict(WHISPERX_SEGMENTS, id="r1"))
        + "\n"
        + json.dumps({"id": "r2", "word_segments": [{"word": "hi", "start": 0, "end": 1}]})
        + "\n"
    )
    index = Alignments(lines, "whisperx")
    assert index.get("r2") == (f"{lines}:2", [AlignedWord("hi", 0.0, 1.0)]) and index.unused() == 1


def test_cli_join_timings(tmp_path, s2s_records, capsys):
    cfg, records = s2s_records
    write_alignments(tmp_path / "align", "mfa", records[:2], cfg)
    bare = tmp_path / "records.jsonl"
    bare.write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if k != "answer_word_times"}, ensure_ascii=False)
            + "\n"
            for r in records[:2]
        )
    )
    args = [
        "join-timings",
        "--records",
        str(bare),
        "--alignments",
        str(tmp_path / "align"),
        "--format",
        "mfa",
        "--out",
        str(tmp_path / "out.jsonl"),
        "--data-config",
        str(REPO / "configs" / "data" / "demo.yaml"),
    ]
    assert cli(args) == 0
    assert "join-timings: 2 of 2 record(s) joined to mfa timings" in capsys.readouterr().out
    assert cli(args) == 2
    assert capsys.readouterr().err == (
        f"cslm-jax join-timings: error: --out "
        f"{tmp_path / 'out.jsonl'}: exists; pass --force to "
        f"replace it\n"
    )


def test_paired_records_get_word_times_from_an_alignments_jsonl(tmp_path, demo):
    data_dir, _ = demo
    cfg = load_data_config(data_dir / "data.yaml", check_files=False).format
    rows = [
        json.loads(line)
        for line in (data_dir / "paired_zh.validation.jsonl").read_text().splitlines()
    ][:3]
    rows = [dict(r, id=f"zh{i}") for i, r in enumerate(rows)]
    lines = []
    for r in rows:  # ctc-forced-aligner results, one per line, with the record id
        chars = [c for c in r["text"] if c.strip() and c not in cfg.punctuation]
        lines.append(
            json.dumps(
                {
                    "id": r["id"],
                    "text": r["text"],
                    "segments": [
                        {"start": a, "end": b, "text": c}
                        for c, (a, b) in zip(chars, r["word_times"])
                    ],
                },
                ensure_ascii=False,
            )
        )
    (tmp_path / "ctc.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "paired.jsonl").write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if k != "word_times"}, ensure_ascii=False) + "\n"
            for r in rows
        )
    )
    counts = join_timings(
        tmp_path / "paired.jsonl",
        tmp_path / "ctc.jsonl",
        "ctc",
        tmp_path / "out.jsonl",
        cfg,
        log=lambda *_: None,
    )
    assert counts["joined"] == 3
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for new, old in zip(out, rows):
        validate_record("paired", new, cfg, new["id"])
        assert sum(new["word_times"], []) == pytest.approx(sum(old["word_times"], []), abs=1e-4)


def test_join_counts_untimed_words_and_unaligned_segments(tmp_path, s2s_records):
    cfg, records = s2s_records
    a, b = records[0], records[1]  # English answers
    (tmp_path / "align").mkdir()
    words = aligner_words(a, cfg)
    (tmp_path / "align" / f"{a['id']}.json").write_text(
        json.dumps(
            {
                "segments": [
                    {"start": words[0][1], "end": words[-1][2], "text": " " + a["answer_text"]}
                ]
            }
        )
    )
    words = aligner_words(b, cfg)
    (tmp_path / "align" / f"{b['id']}.json").write_text(
        json.dumps(
            {
                "word_segments": [
                    {"word": w} if i == 1 else {"word": w, "start": s, "end": e}
                    for i, (w, s, e) in enumerate(words)
                ]
            }
        )
    )
    bare = tmp_path / "records.jsonl"
    bare.write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if k != "answer_word_times"}) + "\n"
            for r in (a, b)
        )
    )
    lines = []
    counts = join_timings(
        bare, tmp_path / "align", "whisperx", tmp_path / "out.jsonl", cfg, log=lines.append
    )
    assert (counts["joined"], counts["untimed_words"], counts["coarse_segments"]) == (2, 1, 1)
    assert "1 untimed word(s) interpolated, 1 segment(s) without word timings" in lines[0]
    new_a, new_b = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    # the unaligned segment is spread over the answer's characters: first start, last end kept
    assert new_a["answer_word_times"][0][0] == a["answer_word_times"][0][0]
    assert new_a["answer_word_times"][-1][1] == pytest.approx(a["answer_word_times"][-1][1])
    # the untimed word fills the gap between its neighbours
    assert new_b["answer_word_times"][1] == [
        b["answer_word_times"][0][1],
        b["answer_word_times"][2][0],
    ]
    assert new_b["answer_word_times"][2:] == b["answer_word_times"][2:]
    with pytest.raises(AlignmentError, match=r"word 2 .* has no timing"):
        join_timings(
            bare, tmp_path / "align", "whisperx", tmp_path / "out2.jsonl", cfg, untimed="error"
        )


# -- another format's file, reversed intervals (issue 29, items 3 and 4) --------------------------


def bare_records(path, records):
    path.write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if k != "answer_word_times"}, ensure_ascii=False)
            + "\n"
            for r in records
        )
    )
    return path


def join_cli(tmp_path, records, alignments, fmt):
    return cli(
        [
            "join-timings",
            "--records",
            str(records),
            "--alignments",
            str(alignments),
            "--format",
            fmt,
            "--out",
            str(tmp_path / "out.jsonl"),
            "--data-config",
            str(REPO / "configs" / "data" / "demo.yaml"),
        ]
    )


def test_whisperx_json_given_as_ctc_is_refused(tmp_path, s2s_records, capsys):
    """whisperX's JSON as its CLI writes it (segments with their words, word_segments, language;
    no top-level text) whose segment texts match the record: read as ctc, each segment would pass
    for one timed word and its time be spread over the characters. Refused, naming the file and
    the format it looks like."""
    cfg, records = s2s_records
    r = records[0]
    words = aligner_words(r, cfg)
    half = len(words) // 2
    segments = [
        {
            "start": ws[0][1],
            "end": ws[-1][2],
            "text": " " + " ".join(w for w, _, _ in ws),
            "words": [{"word": w, "start": a, "end": b, "score": 0.9} for w, a, b in ws],
        }
        for ws in (words[:half], words[half:])
    ]
    wx = tmp_path / "align" / f"{r['id']}.json"
    wx.parent.mkdir()
    wx.write_text(
        json.dumps(
            {
                "segments": segments,
                "word_segments": [w for s in segments for w in s["words"]],
                "language": "en",
            }
        )
    )
    records_file = bare_records(tmp_path / "records.jsonl", [r])
    assert join_cli(tmp_path, records_file, tmp_path / "align", "whisperx") == 0  # its format
    assert sum(
        json.loads((tmp_path / "out.jsonl").read_text())["answer_word_times"], []
    ) == pytest.approx(sum(r["answer_word_times"], []), abs=1e-4)
    (tmp_path / "out.jsonl").unlink()
    capsys.readouterr()
    assert join_cli(tmp_path, records_file, tmp_path / "align", "ctc") == 2
    assert capsys.readouterr().err == (
        f"cslm-jax join-timings: error: {wx}: looks like whisperX output (segments[0] has "
        f"'words'), not a ctc-forced-aligner result (a top-level 'text' and segments of start, "
        f"end, text); pass --format whisperx\n"
    )
    assert not (tmp_path / "out.jsonl").exists()
    # whisperX without word timings (segments only) has no top-level text either
    wx.write_text(
        json.dumps(
            {
                "segments": [{k: v for k, v in s.items() if k != "words"} for s in segments],
                "language": "en",
            }
        )
    )
    assert join_cli(tmp_path, records_file, tmp_path / "align", "ctc") == 2
    assert "it has no top-level 'text'" in capsys.readouterr().err
    # a TextGrid read as JSON is named as one
    tg = tmp_path / "tg.json"
    tg.write_text(LONG)
    with pytest.raises(
        AlignmentError,
        match=rf"^{tg}: a Praat TextGrid, not ctc output; pass "
        rf"--format mfa$",
    ):
        read_alignment(tg, "ctc")


def test_reversed_textgrid_intervals_are_refused_naming_the_interval(tmp_path, s2s_records, capsys):
    cfg, records = s2s_records
    r = records[0]
    words = aligner_words(r, cfg)
    duration = len(r["answer_units"]) / cfg.unit_rate
    folder = tmp_path / "align"
    folder.mkdir()
    grid = folder / f"{r['id']}.TextGrid"
    text = textgrid(words, duration)
    grid.write_text(text)
    records_file = bare_records(tmp_path / "records.jsonl", [r])
    assert join_cli(tmp_path, records_file, folder, "mfa") == 0
    (tmp_path / "out.jsonl").unlink()
    capsys.readouterr()
    # the second word's interval with its xmin and xmax swapped
    w, a, b = words[1]
    block = f'xmin = {a} \n            xmax = {b} \n            text = "{w}"'
    assert text.count(block) == 1
    grid.write_text(
        text.replace(block, f'xmin = {b} \n            xmax = {a} \n            text = "{w}"')
    )
    n = [label for _, _, label in mfa_intervals(grid.read_text())].index(w) + 1
    assert join_cli(tmp_path, records_file, folder, "mfa") == 2
    assert capsys.readouterr().err == (
        f"cslm-jax join-timings: error: {grid}: tier 'words' interval {n} ({w!r}): xmax {a:g} lies "
        f"before xmin {b:g} (a reversed interval); fix or realign the TextGrid\n"
    )
    assert not (tmp_path / "out.jsonl").exists()
    # a reversed silence is as broken a file
    with pytest.raises(
        AlignmentError,
        match=r"^s.TextGrid: tier 'words' interval 5 \(''\): xmax "
        r"1.7 lies before xmin 1.9",
    ):
        mfa_words(
            LONG.replace(
                "xmin = 1.7 \n            xmax = 1.9", "xmin = 1.9 \n            xmax = 1.7"
            ),
            "s.TextGrid",
        )


def mfa_intervals(text):
    from cslm_jax.data.alignments import parse_textgrid

    return parse_textgrid(text, "x")["words"]
