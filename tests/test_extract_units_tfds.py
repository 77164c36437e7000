"""extract-units reads a TFDS audio dataset instead of a manifest. The dataset is the real
`librispeech` builder's (its features: int16 audio at 16 kHz, text, id, speaker and chapter; its
example generator over a LibriSpeech folder layout), prepared from a small LibriSpeech-layout
folder of FLAC files written here: nothing is downloaded."""

import json

import numpy as np
import pytest
import soundfile as sf
import yaml

from conftest import REPO
from cslm_jax.cli.main import main as cli

SR = 16000
LIBRI = "librispeech:2.1.1"


def speechlike(seconds, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return (x + 0.02 * rng.standard_normal(len(t))).clip(-1, 1)


@pytest.fixture(scope="module")
def libri(tmp_path_factory):
    """(TFDS data dir, LibriSpeech-layout folder, {id: (flac path, text)}): 7 utterances of
    train-clean-100 and 2 of dev-clean, prepared by the real builder."""
    import tensorflow_datasets as tfds
    from etils import epath
    from tensorflow_datasets.datasets.librispeech import librispeech_dataset_builder as lb

    root = tmp_path_factory.mktemp("libri")
    utts = {}
    for subset, speakers in (("train-clean-100", (19, 26)), ("dev-clean", (84,))):
        for spk in speakers:
            chapter = 100 + spk
            folder = root / "LibriSpeech" / subset / str(spk) / str(chapter)
            folder.mkdir(parents=True)
            n = 4 if spk == 19 else 3 if spk == 26 else 2
            lines = []
            for u in range(n):
                key = f"{spk}-{chapter}-{u:04d}"
                seed = len(utts)
                sf.write(
                    folder / f"{key}.flac",
                    speechlike(0.5 + 0.45 * seed, seed),
                    SR,
                    subtype="PCM_16",
                )
                text = f"UTTERANCE {seed} OF SPEAKER {spk}"
                lines.append(f"{key} {text}\n")
                utts[key] = (folder / f"{key}.flac", text)
            (folder / f"{spk}-{chapter}.trans.txt").write_text("".join(lines))

    class LocalLibrispeech(lb.Builder, skip_registration=True):
        name = "librispeech"
        pkg_dir_path = epath.Path(lb.__file__).parent  # the real builder's metadata

        def _split_generators(self, dl_manager):
            return {
                "train_clean100": self.examples(root / "tc"),
                "dev_clean": self.examples(root / "dc"),
            }

        def examples(self, directory):
            # the builder's own generator; it hands the Audio feature FLAC paths, which TFDS
            # decodes with pydub + ffmpeg (not installed): decode them to int16 here instead
            for key, example in self._generate_examples(directory):
                samples, rate = sf.read(example["speech"], dtype="int16")
                assert rate == SR
                yield key, {**example, "speech": samples}

    # the builder globs DIR/LibriSpeech/*/*/*/*.txt: one folder per split
    for split, subset in (("tc", "train-clean-100"), ("dc", "dev-clean")):
        (root / split / "LibriSpeech").mkdir(parents=True)
        (root / split / "LibriSpeech" / subset).symlink_to(root / "LibriSpeech" / subset)
    data_dir = root / "tfds"
    LocalLibrispeech(data_dir=str(data_dir), config="default").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return data_dir, root, utts


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    from cslm_jax.speech import save_random_tokenizer

    path = tmp_path_factory.mktemp("speech_tokenizer") / "v1"
    save_random_tokenizer(path, "v1", seed=0, n_state=64, n_head=2, n_layer=1)
    return path


def read_out(out):
    done = json.loads((out / "COMPLETE.json").read_text())
    return [json.loads(line) for s in done["shards"] for line in (out / s).read_text().splitlines()]


def test_librispeech_from_tfds_equals_the_same_files_from_a_manifest(
    libri, tokdir, tmp_path, capsys
):
    import tensorflow_datasets as tfds

    data_dir, root, utts = libri
    out = tmp_path / "tfds_units"
    args = [
        "extract-units",
        "--tfds",
        LIBRI,
        "--tfds-data-dir",
        str(data_dir),
        "--tfds-split",
        "train_clean100",
        "--tokenizer",
        str(tokdir),
        "--out",
        str(out),
        "--lang",
        "en",
        "--shard-size",
        "3",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    assert cli(args) == 0
    records = read_out(out)
    # every example once, in the dataset's own order, its features copied, units added
    order = [
        ex["id"].decode()
        for ex in tfds.as_numpy(
            tfds.load(LIBRI, split="train_clean100", data_dir=str(data_dir), shuffle_files=False)
        )
    ]
    assert [r["id"] for r in records] == order and len(order) == 7
    for n, r in enumerate(records):
        spk, chapter, _ = r["id"].split("-")
        assert r["text"] == utts[r["id"]][1] and r["lang"] == "en"
        assert (r["speaker_id"], r["chapter_id"]) == (int(spk), int(chapter))
        assert r["audio"] == f"tfds:{LIBRI}:train_clean100[{n}]/speech"
    # the same FLAC files through a manifest: the same units (int16 scaled as libsndfile does)
    (tmp_path / "m.jsonl").write_text(
        "".join(
            json.dumps({"id": k, "audio": str(p), "text": t, "lang": "en"}) + "\n"
            for k, (p, t) in utts.items()
            if k.startswith(("19-", "26-"))
        )
    )
    assert (
        cli(
            [
                "extract-units",
                "--manifest",
                str(tmp_path / "m.jsonl"),
                "--tokenizer",
                str(tokdir),
                "--out",
                str(tmp_path / "file_units"),
                "--no-progress",
            ]
        )
        == 0
    )
    by_file = {r["id"]: r["units"] for r in read_out(tmp_path / "file_units")}
    assert {r["id"]: r["units"] for r in records} == by_file
    assert all(len(u) > 10 for u in by_file.values())
    # the records validate against a data config that takes its units from the tokenizer
    cfg = yaml.safe_load((REPO / "configs" / "data" / "demo.yaml").read_text())
    cfg["format"] = {k: v for k, v in cfg["format"].items() if k not in ("unit_count", "unit_rate")}
    cfg["format"]["speech_tokenizer"] = str(tokdir)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    shards = json.loads((out / "COMPLETE.json").read_text())["shards"]
    assert (
        cli(
            [
                "validate-data",
                *[str(out / s) for s in shards],
                "--data-config",
                str(tmp_path / "cfg.yaml"),
            ]
        )
        == 0
    )
    # resumable like a manifest: the same command finds it complete
    capsys.readouterr()
    assert cli(args) == 0
    assert "already complete" in capsys.readouterr().out


def test_a_slice_of_a_split_and_a_mapping_of_fields(libri, tokdir, tmp_path):
    import tensorflow_datasets as tfds

    data_dir, _, _ = libri
    out = tmp_path / "slice"
    assert (
        cli(
            [
                "extract-units",
                "--tfds",
                LIBRI,
                "--tfds-data-dir",
                str(data_dir),
                "--tfds-split",
                "train_clean100[2:6]",
                "--tfds-fields",
                "audio=speech,text=text,utt=id",
                "--tokenizer",
                str(tokdir),
                "--out",
                str(out),
                "--lang",
                "en",
                "--shard-size",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    records = read_out(out)
    ids = [
        ex["id"].decode()
        for ex in tfds.as_numpy(
            tfds.load(
                LIBRI, split="train_clean100[2:6]", data_dir=str(data_dir), shuffle_files=False
            )
        )
    ]
    assert [r["utt"] for r in records] == ids and len(ids) == 4
    assert set(records[0]) == {"audio", "text", "utt", "lang", "units"}
    assert records[0]["audio"] == f"tfds:{LIBRI}:train_clean100[2]/speech"


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--tfds", "librispeech:2.1.1", "--tfds-split", "train_clean360"],
            "--tfds-split 'train_clean360': .*splits of librispeech:2.1.1: \\['dev_clean', 'train_clean100'\\]",
        ),
        (
            [
                "--tfds",
                "librispeech:2.1.1",
                "--tfds-split",
                "dev_clean",
                "--tfds-fields",
                "audio=text",
            ],
            "--tfds-fields audio=text: 'text' is not an Audio feature \\(Audio: \\['speech'\\]\\)",
        ),
        (
            [
                "--tfds",
                "librispeech:2.1.1",
                "--tfds-split",
                "dev_clean",
                "--tfds-fields",
                "audio=voice",
            ],
            "--tfds-fields audio=voice: no feature 'voice'",
        ),
        (
            [
                "--tfds",
                "librispeech:2.1.1",
                "--tfds-split",
                "dev_clean",
                "--tfds-fields",
                "text=text",
            ],
            "maps no audio field",
        ),
        (["--tfds", "librispeech"], "give name\\[/config\\]:version"),
        (["--tfds", "librispeech:2.1.1", "--tfds-fields", "audio"], "expected FIELD=FEATURE"),
    ],
)
def test_bad_tfds_arguments_are_named(libri, tokdir, tmp_path, capsys, extra, message):
    import re

    data_dir, _, _ = libri
    assert (
        cli(
            [
                "extract-units",
                *extra,
                "--tfds-data-dir",
                str(data_dir),
                "--tokenizer",
                str(tokdir),
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "o" / "COMPLETE.json").exists()


def test_a_dataset_that_was_not_prepared_is_not_downloaded(tokdir, tmp_path, capsys):
    assert (
        cli(
            [
                "extract-units",
                "--tfds",
                LIBRI,
                "--tfds-data-dir",
                str(tmp_path / "empty"),
                "--tokenizer",
                str(tokdir),
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "not prepared in" in err and "tfds build librispeech" in err
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").rglob("*.tfrecord*"))
    assert (
        cli(
            [
                "extract-units",
                "--manifest",
                str(tmp_path / "m.jsonl"),
                "--tfds-split",
                "x",
                "--tokenizer",
                str(tokdir),
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "go with --tfds" in capsys.readouterr().err


def test_audio_held_in_memory_reads_as_the_same_file_would(tmp_path):
    """TFDS gives samples (int16 / float, mono or [N, channels]) or, with lazy decoding, the
    encoded file's bytes: each becomes what `load_audio` makes of the same file."""
    import io

    from cslm_jax.data.audio import AudioError, array_audio, array_seconds, load_audio

    x = (speechlike(0.7, 3) * 32767).astype(np.int16)
    stereo = np.stack([x, x // 2], 1)
    for data, subtype in ((x, "PCM_16"), (stereo, "PCM_16")):
        sf.write(tmp_path / "a.wav", data, 22050, subtype=subtype)
        want = load_audio(tmp_path / "a.wav")
        np.testing.assert_array_equal(array_audio(data, 22050, "ex[0]"), want)
        flac = io.BytesIO()
        sf.write(flac, data, 22050, format="FLAC")
        np.testing.assert_array_equal(array_audio(flac.getvalue(), 0, "ex[0]"), want)
        assert (
            array_seconds(flac.getvalue(), 0, "ex[0]")
            == array_seconds(data, 22050, "x")
            == pytest.approx(len(x) / 22050)
        )
    f = speechlike(0.3, 4).astype(np.float32)
    np.testing.assert_array_equal(array_audio(f, SR, "ex"), f)
    u8 = np.array([0, 128, 255], np.uint8)
    np.testing.assert_allclose(array_audio(u8, SR, "ex"), [-1.0, 0.0, 127 / 128])
    for bad, reason in (
        (np.zeros(0, np.int16), "empty"),
        (np.array([0.1, np.nan], np.float32), "non-finite samples \\(1 NaN/inf"),
        (b"not audio", "undecodable audio bytes"),
        (np.zeros((2, 2, 2), np.int16), "audio of shape \\(2, 2, 2\\)"),
    ):
        with pytest.raises(AudioError, match=f"tfds:x\\[7\\]/speech: {reason}"):
            array_audio(bad, SR, "tfds:x[7]/speech")
