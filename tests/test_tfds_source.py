"""TFDS sources: a stage entry naming a TFDS dataset (read through seqio.TfdsDataSource) gives the
same rendered, masked examples as a JSONL file holding the same records. TFDS is mocked with
`tfds.testing.mock_data` over the real `wmt17_translate/zh-en` builder: nothing is downloaded."""

import json

import pytest
import yaml

from conftest import REPO
from cslm_jax.config import ConfigError
from cslm_jax.data.formats import RecordError, load_data_config

WMT = "wmt17_translate/zh-en:1.0.0"


def write_config(tmp_path, stages):
    base = yaml.safe_load((REPO / "configs" / "data" / "demo.yaml").read_text())
    base["data_dir"] = str(tmp_path)
    base["tokenizer"] = None
    base["packing"]["shuffle_buffer"] = 8
    base["stages"] = stages
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(base, allow_unicode=True))
    return tmp_path / "data.yaml"


def mocked_wmt(pairs_by_split):
    """TFDS mocked: each split of the (real) wmt17 zh-en builder yields the given (zh, en) pairs."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    asked = []

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        asked.append(str(split))
        pairs = pairs_by_split[str(split)]
        return tf.data.Dataset.from_tensor_slices(
            {"zh": [z for z, _ in pairs], "en": [e for _, e in pairs]}
        )

    return tfds.testing.mock_data(as_dataset_fn=as_dataset), asked


def test_tfds_mt_task_renders_and_masks_as_the_jsonl_path(tmp_path, demo):
    import seqio

    from cslm_jax.tasks.cslm import register

    data_dir, tok_dir = demo
    rows = [json.loads(line) for line in (data_dir / "mt.train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["src_lang"] == "zh"][:12]
    assert len(rows) == 12
    (tmp_path / "mt.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    pairs = [(r["src"], r["tgt"]) for r in rows]
    cfg_path = write_config(
        tmp_path,
        {
            "pretrain": [
                {"kind": "mt", "name": "mt_jsonl", "train": ["mt.jsonl"]},
                {
                    "kind": "mt",
                    "name": "mt_tfds",
                    "tfds": WMT,
                    "tfds_data_dir": "tfds",
                    "splits": {"train": "train[:12]", "validation": "validation"},
                    "fields": {"src": "zh", "tgt": "en"},
                    "constants": {"src_lang": "zh", "tgt_lang": "en"},
                },
            ]
        },
    )
    cfg = load_data_config(cfg_path)
    spec = cfg.tasks("pretrain")[1]
    assert spec.tfds.data_dir == str(tmp_path / "tfds")
    register(cfg, tok_dir)
    mock, asked = mocked_wmt({"train[:12]": pairs, "validation": pairs[:2]})

    def served(task, split="train"):
        ds = seqio.get_mixture_or_task(task).get_dataset(
            None, split=split, shuffle=False, num_epochs=1
        )
        return [
            (ex["targets"].tolist(), ex["loss_weights"].tolist()) for ex in ds.as_numpy_iterator()
        ]

    with mock:
        from_tfds = served("mt_tfds")
        validation = served("mt_tfds", "validation")
    from_jsonl = served("mt_jsonl")
    assert asked == ["train[:12]", "validation"], "read through TFDS with the mapped split names"
    assert len(from_jsonl) == 24  # both directions of each pair
    assert from_tfds == from_jsonl  # token ids and loss masks, in order
    assert validation == from_jsonl[:4]
    assert all(0 in m and 1 in m for _, m in from_tfds), "masks hold trained and masked tokens"
    # the prepared task is cached like a file task's (SeqIO layout), keyed by the dataset
    [cache] = [p for p in (tmp_path / ".cslm_cache").iterdir() if p.name.startswith("mt_tfds.")]
    assert (cache / "COMPLETED").is_file()
    assert {p.name.split("-")[0] for p in cache.glob("*.tfrecord-*")} == {
        "train.tfrecord",
        "validation.tfrecord",
    }
    completed = json.loads((cache / "COMPLETED").read_text())
    assert completed["tfds"]["train"]["split"] == "train[:12]"


def test_a_bad_tfds_example_is_named_and_skip_bad_counts_it(tmp_path, demo):
    from cslm_jax.data.prepare import prepare_task_local

    _, tok_dir = demo
    entry = {
        "kind": "mt",
        "name": "mt_tfds",
        "tfds": WMT,
        "fields": {"src": "zh", "tgt": "en"},
        "constants": {"src_lang": "zh", "tgt_lang": "en"},
    }
    cfg = load_data_config(write_config(tmp_path, {"pretrain": [entry]}))
    pairs = [("你好。", "Hello."), ("   ", "Nothing."), ("谢谢。", "Thanks.")]
    mock, _ = mocked_wmt({"train": pairs})
    with (
        mock,
        pytest.raises(
            RecordError,
            match=r"tfds:wmt17_translate/zh-en:1.0.0:train\[1\]: "
            r"field 'src': is empty",
        ),
    ):
        prepare_task_local(cfg.tasks("pretrain")[0], cfg, str(tok_dir), tmp_path / "cache" / "t")
    assert not list((tmp_path / "cache").glob("*")), "no half-prepared cache is left"
    cfg = load_data_config(write_config(tmp_path, {"pretrain": [entry]}), ["packing.skip_bad=true"])
    with mocked_wmt({"train": pairs})[0]:
        counts = prepare_task_local(
            cfg.tasks("pretrain")[0], cfg, str(tok_dir), tmp_path / "cache" / "t"
        )["train"]
    assert (counts["records"], counts["examples"], counts["skipped"]) == (2, 4, 1)
    assert "field 'src': is empty" in counts["skipped_messages"][0][2]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"tfds": "wmt17_translate/zh-en"}, "give name\\[/config\\]:version"),
        (
            {"tfds": WMT, "train": ["x.jsonl"]},
            "files \\(train/validation\\) or a tfds dataset, not both",
        ),
        (
            {
                "tfds": WMT,
                "fields": {"src": "zh"},
                "constants": {"src_lang": "zh", "tgt_lang": "en"},
            },
            "map \\['tgt'\\]",
        ),
        (
            {
                "tfds": WMT,
                "fields": {"src": "zh", "tgt": "en"},
                "constants": {"src_lang": "zh", "tgt_lang": "fr"},
            },
            "constants.tgt_lang' is 'fr'",
        ),
        (
            {
                "tfds": WMT,
                "splits": {"test": "test"},
                "fields": {"src": "zh", "tgt": "en"},
                "constants": {"src_lang": "zh", "tgt_lang": "en"},
            },
            "unknown split",
        ),
        ({"splits": {"train": "train"}, "train": ["x.jsonl"]}, "need a 'tfds' dataset name"),
    ],
)
def test_tfds_entry_errors_name_the_field(tmp_path, entry, message):
    (tmp_path / "x.jsonl").write_text("")
    path = write_config(tmp_path, {"pretrain": [dict(kind="mt", **entry)]})
    with pytest.raises(ConfigError, match=message):
        load_data_config(path)


def test_a_dataset_not_prepared_is_an_error_not_a_download(tmp_path):
    from cslm_jax.data.sources import task_records
    from cslm_jax.errors import DataError

    entry = {
        "kind": "mt",
        "tfds": WMT,
        "tfds_data_dir": "empty",
        "fields": {"src": "zh", "tgt": "en"},
        "constants": {"src_lang": "zh", "tgt_lang": "en"},
    }
    cfg = load_data_config(write_config(tmp_path, {"pretrain": [entry]}))
    with pytest.raises(
        DataError,
        match=r"TFDS dataset wmt17_translate/zh-en:1.0.0 split 'train' "
        r"\(data dir .*empty\) cannot be read: .*could not find data"
        r".*tfds build wmt17_translate/zh-en",
    ):
        next(task_records(cfg.tasks("pretrain")[0], "train", cfg.format, False, []))
    assert not (tmp_path / "empty").exists(), "nothing was downloaded or prepared"
