"""SeqIO tasks and mixtures from config: packing with the CSLM mask, determinism, resume,
host shards, mixture rates, skip accounting, and a third language by configuration only."""

import hashlib
import json

import numpy as np
import pytest
import seqio  # noqa: E402
import yaml

from conftest import REPO
from cslm_jax.data.formats import ChatRenderer, RecordError, examples, load_data_config  # noqa: E402
from cslm_jax.data.pipeline import STATS, BatchIterator  # noqa: E402
from cslm_jax.model.vocab import load_tokenizer  # noqa: E402
from cslm_jax.tasks.cslm import register  # noqa: E402


@pytest.fixture(scope="module")
def demo_cfg(demo):
    data_dir, tok_dir = demo
    # a small shuffle buffer keeps the tests fast (each task fills its buffer before the first batch)
    cfg = load_data_config(data_dir / "data.yaml", ["packing.shuffle_buffer=32"])
    register(cfg, tok_dir)
    return cfg, tok_dir


def digest(batch):
    return hashlib.sha256(
        b"".join(np.ascontiguousarray(batch[k]).tobytes() for k in sorted(batch))
    ).hexdigest()


def test_tasks_and_mixtures_are_registered(demo_cfg):
    cfg, _ = demo_cfg
    pre = seqio.get_mixture_or_task("cslm_pretrain")
    assert sorted(t.name for t in pre.tasks) == sorted(
        [
            "cslm_pretrain_asr_en",
            "cslm_pretrain_asr_zh",
            "cslm_pretrain_tts_en",
            "cslm_pretrain_tts_zh",
            "cslm_pretrain_mt",
            "cslm_pretrain_instruct",
        ]
    )
    assert pre.get_rate(seqio.get_mixture_or_task("cslm_pretrain_mt")) == 0.5
    assert "cslm_sft_s2s_en2zh" in [t.name for t in seqio.get_mixture_or_task("cslm_sft").tasks]


def test_packed_batches_carry_the_mask(demo_cfg):
    cfg, tok_dir = demo_cfg
    it = BatchIterator("cslm_pretrain_mt", max_length=1024, batch_size=2, seed=0, shuffle=False)
    b = next(it)
    assert set(b) == {"tokens", "positions", "segment_ids", "targets", "loss_weights", "task_ids"}
    assert all(v.shape == (2, 1024) for v in b.values())
    tok, seg, pos = b["tokens"][0], b["segment_ids"][0], b["positions"][0]
    assert seg.max() >= 2, "several examples packed into one row"
    same = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
    np.testing.assert_array_equal(b["targets"][0][:-1][same], tok[1:][same])
    assert not b["loss_weights"][0][:-1][~same].any()
    starts = np.flatnonzero(np.diff(seg, prepend=0) > 0)
    assert (pos[starts] == 0).all()
    # the first packed document is the file's first record, rendered and masked as the reference
    record = json.loads(open(cfg.tasks("pretrain")[4].train[0]).readline())
    rendered = ChatRenderer(load_tokenizer(tok_dir), cfg.max_length)(
        examples("mt", record, cfg.format, "x")[0]
    )
    n = len(rendered.input_ids)
    np.testing.assert_array_equal(tok[:n], rendered.input_ids)
    np.testing.assert_array_equal(b["loss_weights"][0][: n - 1], rendered.loss_mask[1:])
    mt_index = [t.name for t in cfg.tasks("pretrain")].index("cslm_pretrain_mt")
    assert (b["task_ids"][0][: n - 1] == mt_index).all()  # its index in the stage's mixture


def test_deterministic_for_a_seed_and_resumable(demo_cfg, tmp_path):
    cfg, _ = demo_cfg
    kw = dict(max_length=cfg.max_length, batch_size=4)
    a = BatchIterator("cslm_pretrain", seed=7, **kw)
    b = BatchIterator("cslm_pretrain", seed=7, **kw)
    c = BatchIterator("cslm_pretrain", seed=8, **kw)
    first = [digest(next(a)) for _ in range(4)]
    assert first == [digest(next(b)) for _ in range(4)]
    assert first != [digest(next(c)) for _ in range(4)]
    # save mid-stream, keep going, then resume a fresh pipeline from the saved position
    a.save(tmp_path / "pos")
    expected = [digest(next(a)) for _ in range(5)]
    resumed = BatchIterator("cslm_pretrain", seed=7, **kw)
    resumed.restore(tmp_path / "pos")
    assert resumed.position == 4
    assert [digest(next(resumed)) for _ in range(5)] == expected


def test_two_host_shards_are_disjoint_and_cover(demo_cfg):
    cfg, _ = demo_cfg
    task = seqio.get_mixture_or_task("cslm_pretrain_mt")

    def examples_of(shard):
        info = None if shard is None else seqio.ShardInfo(index=shard, num_shards=2)
        ds = task.get_dataset(None, split="train", shuffle=False, num_epochs=1, shard_info=info)
        return [tuple(ex["targets"].tolist()) for ex in ds.as_numpy_iterator()]

    everything, s0, s1 = examples_of(None), examples_of(0), examples_of(1)
    assert len(s0) > 0 and len(s1) > 0
    assert not set(s0) & set(s1)
    assert sorted(s0 + s1) == sorted(everything)
    assert len(everything) == 2 * len(open(cfg.tasks("pretrain")[4].train[0]).readlines())


def write_jsonl(path, rows):
    path.write_text(
        "".join(
            (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows
        )
    )
    return path.name


def small_config(tmp_path, stages, languages=None, skip_bad=False):
    base = yaml.safe_load((REPO / "configs" / "data" / "demo.yaml").read_text())
    base["data_dir"] = str(tmp_path)
    base["stages"] = stages
    base["packing"] = {"max_length": 512, "shuffle_buffer": 64, "skip_bad": skip_bad}
    if languages:
        base["languages"].update(languages)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(base, allow_unicode=True))
    return load_data_config(tmp_path / "data.yaml")


def test_mixture_rates(tmp_path, demo):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "response": "x"} for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "response": "y"} for i in range(50)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"c{i}", "response": "z"} for i in range(50)])
    cfg = small_config(
        tmp_path,
        {
            "rates": [
                {"kind": "instruct", "name": "rate_a", "rate": 3.0, "train": [a]},
                {"kind": "instruct", "name": "rate_b", "rate": 1.0, "train": [b]},
                {"kind": "instruct", "name": "rate_c", "rate": 0.5, "train": [c]},
            ]
        },
    )
    register(cfg, demo[1])
    ds = seqio.get_mixture_or_task("cslm_rates").get_dataset(
        {"targets": 512, "loss_weights": 512, "task_ids": 512},
        split="train",
        shuffle=True,
        seed=3,
        num_epochs=None,
    )
    n = 3000
    counts = np.bincount(
        [int(ex["task_ids"][0]) for ex in ds.take(n).as_numpy_iterator()], minlength=3
    )
    for k, p in enumerate(np.array([3.0, 1.0, 0.5]) / 4.5):
        sigma = np.sqrt(n * p * (1 - p))
        assert abs(counts[k] - n * p) < 4 * sigma, (counts, p)


def test_strict_pipeline_error_names_the_record(tmp_path, demo):
    good = {"lang": "en", "text": "hi", "units": [1, 2]}
    f = write_jsonl(tmp_path / "p.jsonl", [good, good, dict(good, units=[1, 4000]), good])
    cfg = small_config(tmp_path, {"strict": [{"kind": "asr", "lang": "en", "train": [f]}]})
    register(cfg, demo[1])
    # records are prepared before the pipeline runs: the error comes before any batch
    with pytest.raises(RecordError, match=r"p\.jsonl:3: field 'units\[1\]'"):
        BatchIterator(
            "cslm_strict", max_length=512, batch_size=1, seed=0, shuffle=False, num_epochs=1
        )
    assert not list((tmp_path / ".cslm_cache").glob("*")), "no half-prepared cache is left"


def test_skip_bad_counts_match(tmp_path, demo):
    good = {"lang": "en", "text": "hi", "units": [1, 2]}
    rows = [good, "{broken", dict(good, lang="xx"), good, dict(good, text=""), good]
    f = write_jsonl(tmp_path / "q.jsonl", rows)
    cfg = small_config(
        tmp_path, {"skipping": [{"kind": "asr", "lang": "en", "train": [f]}]}, skip_bad=True
    )
    register(cfg, demo[1])
    ds = seqio.get_mixture_or_task("cslm_skipping_asr_en").get_dataset(
        None, split="train", shuffle=False, num_epochs=1
    )
    assert len(list(ds.as_numpy_iterator())) == 3
    counts = STATS.report()["cslm_skipping_asr_en:train"]
    assert counts["skipped"] == 3 and counts["records"] == 3 and counts["examples"] == 3
    messages = STATS.skip_examples["cslm_skipping_asr_en:train"]
    assert [m.split(": field")[0].rsplit(":", 1)[1] for m in messages] == ["2", "3", "5"]


def test_third_language_by_configuration_only(tmp_path, demo):
    """German, added through the data config alone: templates, chunking, files."""
    de = {
        "name": "German",
        "chunk_unit": "word",
        "chunk_size": 5,
        "asr_prompt": "Transkribiere die folgende deutsche Sprache: {speech}",
        "tts_prompt": "Lies den folgenden deutschen Text vor: {text}",
        "mt_prompt": "Übersetze den folgenden Text ins Deutsche: {text}",
        "s2s_prompt": "Beantworte direkt die Fragen in der Sprache des Nutzers. Eingabe: {speech}.",
        "s2s_cross_prompt": "Beantworte die Fragen in der Sprache des Nutzers auf Deutsch. Eingabe: {speech}.",
    }
    paired = write_jsonl(
        tmp_path / "de.jsonl",
        [
            {
                "lang": "de",
                "text": "der hund ist braun",
                "units": [1, 1, 2, 3, 4, 4, 5, 6],
                "word_times": [[0.0, 0.04], [0.04, 0.08], [0.08, 0.12], [0.12, 0.16]],
            }
        ]
        * 4,
    )
    mt = write_jsonl(
        tmp_path / "mt.jsonl",
        [
            {
                "src_lang": "en",
                "tgt_lang": "de",
                "src": "the dog is brown",
                "tgt": "der hund ist braun",
            }
        ],
    )
    s2s = write_jsonl(
        tmp_path / "s2s.jsonl",
        [
            {
                "question_units": [7, 8, 9],
                "question_text": "what color is the dog?",
                "question_lang": "en",
                "answer_text": "der hund ist braun, sagt man.",
                "answer_units": [1, 1, 2, 3, 4, 4, 5, 6, 7, 8],
                "answer_word_times": [
                    [0.0, 0.04],
                    [0.04, 0.08],
                    [0.08, 0.12],
                    [0.12, 0.14],
                    [0.14, 0.16],
                    [0.16, 0.2],
                ],
                "answer_lang": "de",
            }
        ],
    )
    cfg = small_config(
        tmp_path,
        {
            "german": [
                {"kind": "asr", "lang": "de", "train": [paired]},
                {"kind": "tts", "lang": "de", "train": [paired]},
                {"kind": "mt", "train": [mt]},
                {"kind": "s2s", "lang": "en2de", "train": [s2s]},
            ]
        },
        languages={"de": de},
    )
    assert register(cfg, demo[1], stages=["german"]) == ["cslm_german"]
    tok = load_tokenizer(demo[1])
    texts = []
    for name in (
        "cslm_german_asr_de",
        "cslm_german_tts_de",
        "cslm_german_mt",
        "cslm_german_s2s_en2de",
    ):
        ds = seqio.get_mixture_or_task(name).get_dataset(
            None, split="train", shuffle=False, num_epochs=1
        )
        texts += [tok.decode(ex["targets"]) for ex in ds.as_numpy_iterator()]
    joined = "\n".join(texts)
    assert "Transkribiere die folgende deutsche Sprache: <sosp><1><2><3><4><5><6><eosp>" in joined
    assert "Übersetze den folgenden Text ins Deutsche: the dog is brown" in joined
    assert "Beantworte die Fragen in der Sprache des Nutzers auf Deutsch." in joined
    assert "[answer] der hund ist braun, <sosp>" in joined  # chunk cut at the comma
    batch = next(BatchIterator("cslm_german", max_length=512, batch_size=2, seed=0))
    assert batch["loss_weights"].sum() > 0


def test_seqio_vocabulary_over_the_extended_tokenizer(demo):
    import tensorflow as tf

    from cslm_jax.data.pipeline import HFVocabulary

    vocab = HFVocabulary(demo[1])
    tok = load_tokenizer(demo[1])
    text = "the red cat <sosp><12><207><eosp> 猫是红色的。"
    ids = vocab.encode(text)
    assert ids == tok.encode(text, add_special_tokens=False)
    span = [tok.convert_tokens_to_ids(t) for t in ("<sosp>", "<12>", "<207>", "<eosp>")]
    start = ids.index(span[0])
    assert ids[start : start + 4] == span  # each speech token is one id
    assert vocab.decode(ids) == text
    assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids
    assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == text
    assert vocab.vocab_size == len(tok) and vocab.eos_id == tok.convert_tokens_to_ids("<|eot_id|>")
