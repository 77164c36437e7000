"""`cslm-jax prepare-data` (Apache Beam) and training from prepared caches: Beam output equals the
in-process preparation (bytes, and examples as the per-example Jinja path makes them), identical
batches, stats, file-level host shards, per-host positions, atomic output (COMPLETED last; a
killed job leaves none and a rerun completes), and the batched renderer equals Jinja on the true
Llama-3.1 tokenizer."""

import collections
import filecmp
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import seqio  # noqa: E402
import yaml

from conftest import REPO
from cslm_jax.data.beam_prepare import prepare_data  # noqa: E402
from cslm_jax.data.fast_chat import FastChat  # noqa: E402
from cslm_jax.data.formats import ChatRenderer, examples, load_data_config, read_jsonl  # noqa: E402
from cslm_jax.data.pipeline import BatchIterator  # noqa: E402
from cslm_jax.data.prepare import CacheError, plan_ranges, prepare_task_local, read_stats  # noqa: E402
from cslm_jax.errors import DataError  # noqa: E402
from cslm_jax.model.vocab import load_tokenizer  # noqa: E402
from cslm_jax.tasks.cslm import register  # noqa: E402

IN_MEMORY = ["--direct_running_mode=in_memory"]  # one process: quick to start, for small tests
STAGES = ("pretrain", "sft")


def read_examples(task_dir, split="train"):
    """(targets, loss_weights) of every example of a prepared split, per shard file in order."""
    import tensorflow as tf

    out = {}
    for f in sorted(Path(task_dir).glob(f"{split}.tfrecord-*")):
        rows = []
        for raw in tf.data.TFRecordDataset(str(f)).as_numpy_iterator():
            feature = tf.train.Example.FromString(raw).features.feature
            rows.append(
                tuple(tuple(feature[k].int64_list.value) for k in ("targets", "loss_weights"))
            )
        out[f.name] = rows
    return out


@pytest.fixture(scope="module")
def prepared(demo, tmp_path_factory):
    """The demo's two stages prepared by Beam (4 shards, byte ranges of 16 KiB so files split
    into several ranges) and in-process with the same shard count."""
    data_dir, tok_dir = demo
    root = tmp_path_factory.mktemp("prepared")
    # a small shuffle buffer keeps the batch tests fast (each task fills its buffer first)
    cfg = load_data_config(data_dir / "data.yaml", ["packing.shuffle_buffer=32"])
    for stage in STAGES:
        result = prepare_data(
            cfg,
            stage,
            tok_dir,
            root / "beam",
            num_shards=4,
            range_bytes=16384,
            pipeline_args=IN_MEMORY,
            log=lambda *_: None,
        )
        assert set(result.values()) == {"prepared"}
        for spec in cfg.tasks(stage):
            prepare_task_local(spec, cfg, tok_dir, root / "local" / spec.name, num_shards=4)
    return cfg, tok_dir, root


def test_ranges_start_at_lines_and_cover_the_file(tmp_path):
    lines = [("x" * random.Random(i).randint(0, 40) + "\n").encode() for i in range(300)]
    f = tmp_path / "f.jsonl"
    f.write_bytes(b"".join(lines) + b"tail without newline")
    data = f.read_bytes()
    for size in (1, 7, 64, 1000, 10**6):
        ranges = plan_ranges(str(f), size)
        assert ranges[0][:1] == (0,) and ranges[-1][1] == len(data)
        for (s, e, line), nxt in zip(ranges, ranges[1:] + [None]):
            assert s == 0 or data[s - 1 : s] == b"\n"  # starts at a line start
            assert line == data[:s].count(b"\n") + 1  # with its line number
            assert nxt is None or nxt[0] == e


def test_beam_output_equals_in_process_for_every_demo_task(prepared):
    cfg, tok_dir, root = prepared
    tok = load_tokenizer(tok_dir)
    renderer = ChatRenderer(tok, cfg.max_length, mask=cfg.format.loss_mask)
    for stage in STAGES:
        for spec in cfg.tasks(stage):
            beam, local = root / "beam" / spec.name, root / "local" / spec.name
            assert (beam / "COMPLETED").is_file()
            names = sorted(p.name for p in local.iterdir() if "tfrecord" in p.name)
            assert names == sorted(p.name for p in beam.iterdir() if "tfrecord" in p.name)
            assert len(names) == 4 * (1 + bool(spec.validation))
            for name in names:  # the same bytes: same examples, same shards, same order
                assert filecmp.cmp(beam / name, local / name, shallow=False), (spec.name, name)
            # and the examples are those of the per-example path (Jinja template, one call each)
            for split, files in (("train", spec.train), ("validation", spec.validation)):
                if not files:
                    continue
                expected = collections.Counter()
                for path in files:
                    for where, _, record in read_jsonl(path, None, cfg.format):
                        for messages in examples(spec.kind, record, cfg.format, where):
                            r = renderer(messages)
                            expected[(tuple(r.input_ids), tuple(r.loss_mask))] += 1
                got = collections.Counter(
                    ex for rows in read_examples(beam, split).values() for ex in rows
                )
                assert got == expected, (spec.name, split)


def test_stats_count_tokens(prepared):
    cfg, _, root = prepared
    for spec in cfg.tasks("pretrain"):
        stats = read_stats(root / "beam" / spec.name, "train")
        rows = [ex for rs in read_examples(root / "beam" / spec.name).values() for ex in rs]
        assert stats["examples"] == len(rows) > 0
        assert stats["targets_tokens"] == sum(len(t) for t, _ in rows)
        assert stats["loss_weights_tokens"] == stats["targets_tokens"]
        assert stats["targets_max_tokens"] == max(len(t) for t, _ in rows)
        assert stats["trained_tokens"] == sum(sum(w) for _, w in rows)
        n_lines = sum(len(open(f).readlines()) for f in spec.train)
        assert stats["records"] == n_lines and stats["skipped"] == 0
        assert stats["examples"] == n_lines * (2 if spec.kind == "mt" else 1)
        info = json.loads((root / "beam" / spec.name / "info.train.json").read_text())
        assert info["num_shards"] == 4 and info["features"]["targets"]["dtype"] == "int32"


def test_mixture_reads_identical_batches_from_either_cache(prepared):
    cfg, tok_dir, root = prepared
    kw = dict(max_length=cfg.max_length, batch_size=4, seed=11)
    register(cfg, tok_dir, stages=["pretrain"], cache_dir=root / "beam")
    from_beam = BatchIterator("cslm_pretrain", **kw)
    beam_batches = [next(from_beam) for _ in range(3)]
    register(cfg, tok_dir, stages=["pretrain"], cache_dir=root / "local")
    from_local = BatchIterator("cslm_pretrain", **kw)
    for a in beam_batches:
        b = next(from_local)
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert {
        int(t) for b in beam_batches for t in np.unique(b["task_ids"][b["loss_weights"] > 0])
    } <= set(range(len(cfg.tasks("pretrain"))))
    assert len({int(t) for b in beam_batches for t in np.unique(b["task_ids"])}) > 1


def test_beam_tasks_give_the_in_process_examples_and_task_ids(prepared, demo):
    """Per demo task: (tokens, mask, task id) multisets from the Beam cache equal those of the
    in-process path of a plain registration (its own one-shard cache under the data folder)."""
    cfg, tok_dir, root = prepared

    def served(cache_dir, stage):
        register(cfg, tok_dir, stages=[stage], cache_dir=cache_dir)
        out = {}
        for spec in cfg.tasks(stage):
            ds = seqio.get_mixture_or_task(spec.name).get_dataset(
                None, split="train", shuffle=False, num_epochs=1, use_cached=True
            )
            out[spec.name] = collections.Counter(
                tuple(tuple(ex[k].tolist()) for k in ("targets", "loss_weights", "task_ids"))
                for ex in ds.as_numpy_iterator()
            )
        return out

    for stage in STAGES:
        assert served(root / "beam", stage) == served(None, stage)


def test_host_shards_are_whole_files_disjoint_and_cover(prepared):
    cfg, tok_dir, root = prepared
    register(cfg, tok_dir, stages=["pretrain"], cache_dir=root / "beam")
    task = seqio.get_mixture_or_task("cslm_pretrain_asr_en")
    by_file = read_examples(root / "beam" / "cslm_pretrain_asr_en")
    files = sorted(by_file)

    def host(i, n):
        ds = task.get_dataset(
            None,
            split="train",
            shuffle=False,
            num_epochs=1,
            use_cached=True,
            shard_info=seqio.ShardInfo(index=i, num_shards=n),
        )
        return collections.Counter(
            (tuple(ex["targets"].tolist()), tuple(ex["loss_weights"].tolist()))
            for ex in ds.as_numpy_iterator()
        )

    everything = collections.Counter(ex for rows in by_file.values() for ex in rows)
    h0, h1 = host(0, 2), host(1, 2)
    assert not set(h0) & set(h1)
    assert h0 + h1 == everything
    # each host reads exactly its own files (seqio's file-level sharding: files i, i + n, ...)
    for i, h in enumerate((h0, h1)):
        assert h == collections.Counter(ex for f in files[i::2] for ex in by_file[f])
    # a shard count the files do not divide is refused before anything is read
    with pytest.raises(CacheError, match="cannot be split evenly over 3"):
        BatchIterator(
            "cslm_pretrain", max_length=cfg.max_length, batch_size=2, shard_index=0, num_shards=3
        )


def test_per_host_data_position_restores(prepared, tmp_path):
    from cslm_jax.parallel.distributed import ProcessInput

    cfg, tok_dir, root = prepared
    register(cfg, tok_dir, stages=["pretrain"], cache_dir=root / "beam")

    def host(process_index):
        return ProcessInput(
            lambda shard, rows: BatchIterator(
                "cslm_pretrain_asr_en",
                max_length=cfg.max_length,
                batch_size=rows,
                seed=3,
                shard_index=shard,
                num_shards=2,
            ),
            num_shards=2,
            global_batch=8,
            accumulation=1,
            process_index=process_index,
            process_count=2,
        )

    a = host(1)
    for _ in range(3):
        next(a)
    a.save(tmp_path / "pos")
    assert sorted(p.name for p in (tmp_path / "pos").iterdir()) == ["shard_1"]
    expected = [next(a) for _ in range(3)]
    b = host(1)
    b.restore(tmp_path / "pos")
    assert b.position == 3
    for e in expected:
        got = next(b)
        for k in e:
            np.testing.assert_array_equal(got[k], e[k])
    other = next(host(0))  # the other host's rows differ (its own shard files)
    assert not np.array_equal(other["tokens"], expected[0]["tokens"])


def write_jsonl(path, rows):
    path.write_text(
        "".join(
            (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows
        )
    )
    return path.name


def small_config(tmp_path, stages, skip_bad=False):
    base = yaml.safe_load((REPO / "configs" / "data" / "demo.yaml").read_text())
    base["data_dir"] = str(tmp_path)
    base["stages"] = stages
    base["packing"] = {"max_length": 512, "shuffle_buffer": 64, "skip_bad": skip_bad}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(base, allow_unicode=True))
    return load_data_config(tmp_path / "data.yaml")


def test_strict_error_leaves_no_completed_and_a_rerun_completes(tmp_path, demo):
    good = {"lang": "en", "text": "hi there", "units": [1, 2, 3]}
    rows = [dict(good, text=f"hi {i}") for i in range(200)]
    rows[150] = dict(good, units=[1, 4000])
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    g = write_jsonl(tmp_path / "q.jsonl", [good] * 30)
    cfg = small_config(
        tmp_path,
        {
            "s": [
                {"kind": "asr", "lang": "en", "train": [f]},
                {"kind": "tts", "lang": "en", "name": "other", "train": [g]},
            ]
        },
    )
    out = tmp_path / "cache"
    with pytest.raises(DataError, match=r"p\.jsonl:151: field 'units\[1\]'"):
        prepare_data(
            cfg,
            "s",
            demo[1],
            out,
            num_shards=3,
            range_bytes=1024,
            pipeline_args=IN_MEMORY,
            log=lambda *_: None,
        )
    assert not list(out.glob("*/COMPLETED")), "a failed job must not look finished"
    assert not list(out.glob(".prepare-tmp-*"))
    with pytest.raises(CacheError, match="COMPLETED missing"):
        register(cfg, demo[1], cache_dir=out)
    rows[150] = good
    write_jsonl(tmp_path / "p.jsonl", rows)
    logs = []
    assert prepare_data(
        cfg,
        "s",
        demo[1],
        out,
        num_shards=3,
        range_bytes=1024,
        pipeline_args=IN_MEMORY,
        log=logs.append,
    ) == {"cslm_s_asr_en": "prepared", "other": "prepared"}
    assert read_stats(out / "cslm_s_asr_en", "train")["examples"] == 200
    # run again: complete tasks are kept, not redone
    assert set(
        prepare_data(
            cfg, "s", demo[1], out, num_shards=3, pipeline_args=IN_MEMORY, log=logs.append
        ).values()
    ) == {"kept"}
    # training refuses a cache made for other settings
    other = small_config(
        tmp_path, {"s": [{"kind": "asr", "lang": "en", "train": [f]}]}, skip_bad=True
    )
    with pytest.raises(CacheError, match="skip_bad"):
        register(other, demo[1], cache_dir=out)


def test_urls_are_read_and_written_through_gfile(tmp_path, demo):
    """Inputs, tokenizer and output given as URLs (file:// here, gs:// on a cluster) go through
    tf.io.gfile: the same bytes as local paths."""
    rows = [
        {"src_lang": "en", "tgt_lang": "zh", "src": f"the cat {i}", "tgt": f"猫 {i}"}
        for i in range(40)
    ]
    f = write_jsonl(tmp_path / "mt.jsonl", rows)
    cfg = small_config(tmp_path, {"u": [{"kind": "mt", "train": [f"file://{tmp_path / f}"]}]})
    logged = []
    prepare_data(
        cfg,
        "u",
        f"file://{demo[1]}",
        f"file://{tmp_path / 'c'}",
        num_shards=2,
        range_bytes=512,
        pipeline_args=IN_MEMORY,
        log=logged.append,
    )
    assert (tmp_path / "c" / "cslm_u_mt" / "COMPLETED").is_file()
    # remote files are planned by the workers (several ranges of this file), not here
    assert any("ranges planned by the workers" in m for m in logged), logged
    assert os.path.getsize(tmp_path / f) > 3 * 512
    local = small_config(tmp_path, {"u": [{"kind": "mt", "train": [f]}]})
    prepare_task_local(local.tasks("u")[0], local, demo[1], tmp_path / "l", num_shards=2)
    for name in ("train.tfrecord-00000-of-00002", "train.tfrecord-00001-of-00002"):
        assert filecmp.cmp(
            tmp_path / "l" / name, tmp_path / "c" / "cslm_u_mt" / name, shallow=False
        )


def test_serialize_batch_is_tensorflows_deterministic_encoding():
    from cslm_jax.data.fast_serialize import serialize_batch
    from cslm_jax.data.prepare import serialize

    rng = random.Random(0)
    ids = [
        [
            rng.choice(
                [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 132356, rng.randrange(200000)]
            )
            for _ in range(rng.randrange(1, 300))
        ]
        for _ in range(300)
    ]
    masks = [[rng.randrange(2) for _ in x] for x in ids]
    assert serialize_batch(ids, masks) == [serialize(i, m) for i, m in zip(ids, masks)]
    # below 2**21 each id's varint comes from a table (above: numpy); empty examples too
    small = [[i for i in x if i < 2**21] for x in ids] + [[], [132356] * 7000]  # (> 16 KiB)
    masks = [[rng.randrange(2) for _ in x] for x in small]
    assert serialize_batch(small, masks) == [serialize(i, m) for i, m in zip(small, masks)]
    # ids known to be a tokenizer's (below its vocabulary size): the table without a look over
    assert serialize_batch(small, masks, vocab_size=2**21) == [
        serialize(i, m) for i, m in zip(small, masks)
    ]
    for bad in ([[1, -1]], [[1, 2**35]]):
        with pytest.raises(ValueError):
            serialize_batch(bad, [[1, 1]])


def test_record_writer_writes_tensorflows_tfrecord_bytes(tmp_path):
    import tensorflow as tf

    from cslm_jax.data.prepare import RecordWriter

    records = [os.urandom(random.Random(i).randrange(0, 3000)) for i in range(50)]
    ours = RecordWriter(str(tmp_path / "ours"))
    many = RecordWriter(str(tmp_path / "many"))
    with tf.io.TFRecordWriter(str(tmp_path / "tf")) as theirs:
        for r in records:
            ours.write(r)
            theirs.write(r)
    many.write_many(records[:20])
    many.write_many(records[20:])
    ours.close()
    many.close()
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "tf").read_bytes()
    assert (tmp_path / "many").read_bytes() == (tmp_path / "tf").read_bytes()
    assert list(tf.data.TFRecordDataset(str(tmp_path / "ours")).as_numpy_iterator()) == records


def test_skip_bad_counts_in_stats(tmp_path, demo):
    good = {"lang": "en", "text": "hi", "units": [1, 2]}
    rows = [good, "{broken", dict(good, lang="xx"), good, dict(good, text=""), good] * 3
    f = write_jsonl(tmp_path / "q.jsonl", rows)
    cfg = small_config(
        tmp_path, {"k": [{"kind": "asr", "lang": "en", "train": [f]}]}, skip_bad=True
    )
    prepare_data(
        cfg,
        "k",
        demo[1],
        tmp_path / "c",
        num_shards=2,
        range_bytes=64,
        pipeline_args=IN_MEMORY,
        log=lambda *_: None,
    )
    stats = read_stats(tmp_path / "c" / "cslm_k_asr_en", "train")
    assert (stats["records"], stats["examples"], stats["skipped"]) == (9, 9, 9)
    lines = [m.split(": field")[0].rsplit(":", 1)[1] for m in stats["skipped_messages"]]
    assert lines == ["2", "3", "5", "8", "9", "11", "14", "15", "17"]  # file order


# -- the batched renderer equals Jinja --------------------------------------------------------------

CONTENTS = [
    "Hello world!",
    "  padded with spaces and\nnewlines \n\n",
    "直接回答用户语音中的问题。",
    "<sosp><1><2><3><eosp> speech first",
    "ends with a unit <sosp><7><eosp>",
    "jinja-looking {{ x }} {% if %} text",
    "<|eot_id|> in the middle <|eot_id|>",
    "Ünïcödé — emoji 🎉 and mixed 中文English",
    "[question] q [answer] a <sosp><9><eosp> <eoa>",
    "'s 've numbers 1234567",
    "\t",
    "x" * 300,
    "<|start_header_id|>assistant<|end_header_id|>",
]


def conversations(rng, n):
    out = []
    for _ in range(n):
        turns = rng.choice([2, 2, 4])
        msgs = [
            {
                "role": ("user", "assistant")[i % 2],
                "content": rng.choice(CONTENTS) + rng.choice(["", " ", "!", " tail"]),
            }
            for i in range(turns)
        ]
        if rng.random() < 0.2:
            msgs.insert(0, {"role": "system", "content": rng.choice(CONTENTS)})
        out.append(msgs)
    return out


@pytest.mark.parametrize("mask", ["reference", "assistant_only"])
def test_fast_chat_equals_jinja_on_the_true_llama31_tokenizer(mask):
    from cslm_jax.model.vocab import extend_tokenizer, llama3_tokenizer

    tok = llama3_tokenizer()
    extend_tokenizer(tok, 16, base_size=128256)
    renderer = ChatRenderer(tok, 4096, mask=mask)
    fast = FastChat(renderer, verify_every=10**9)
    batch = conversations(random.Random(0), 300)
    got = fast.ids(batch)
    assert {k: v is not None for k, v in fast.plans.items()} == {k: True for k in fast.plans}
    assert len(fast.plans) >= 3  # 1 and 2 turns, with a system message
    for messages, ids in zip(batch, got):
        assert ids == renderer.encode(renderer.render_text(messages)), messages


def test_fast_chat_refuses_what_it_cannot_show_equal(demo):
    tok = load_tokenizer(demo[1])
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>{{ m['content'] | upper }}<|eot_id|>{% endfor %}"
    )
    renderer = ChatRenderer(tok, 512)
    fast = FastChat(renderer)
    batch = conversations(random.Random(1), 40)
    assert fast.ids(batch) == [renderer.encode(renderer.render_text(m)) for m in batch]
    assert set(fast.plans.values()) == {None}  # content transformed: no skeleton used


# -- interrupted jobs and scale (real subprocesses) ------------------------------------------------


def cli(*args):
    return [sys.executable, "-m", "cslm_jax.cli.main", "prepare-data", *map(str, args)]


def big_corpus(tmp_path, demo, lines):
    src = (demo[0] / "paired_en.train.jsonl").read_text().splitlines(keepends=True)
    f = tmp_path / "big.jsonl"
    with open(f, "w") as out:
        for i in range(lines):
            out.write(src[i % len(src)])
    cfg = small_config(tmp_path, {"big": [{"kind": "asr", "lang": "en", "train": [f.name]}]})
    return cfg, tmp_path / "data.yaml"


def tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its descendants."""
    procs = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                rss = int((d / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                continue
            procs[int(d.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), rss)
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += procs.get(p, (0, 0))[1]
        todo += [c for c, (pp, _) in procs.items() if pp == p]
    return total


@pytest.mark.slow
def test_killed_job_leaves_no_completed_and_rerun_completes(tmp_path, demo):
    cfg, data_yaml = big_corpus(tmp_path, demo, 60000)
    out = tmp_path / "cache"
    args = cli(
        "--data-config",
        data_yaml,
        "--stage",
        "big",
        "--tokenizer",
        demo[1],
        "--out",
        out,
        "--num-shards",
        8,
        "--num-workers",
        2,
        "--range-mb",
        2,
    )
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob(".prepare-tmp-*/*/*/*.s0*")):
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: driver and worker processes
    proc.wait()
    assert not list(out.glob("**/COMPLETED"))
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "cslm_big_asr_en" / "COMPLETED").is_file()
    assert not list(out.glob(".prepare-tmp-*")), "the killed job's pieces are removed"
    local = tmp_path / "local"
    prepare_task_local(cfg.tasks("big")[0], cfg, demo[1], local, num_shards=8)
    for f in sorted(local.glob("train.tfrecord-*")):
        assert filecmp.cmp(f, out / "cslm_big_asr_en" / f.name, shallow=False)


@pytest.mark.slow
def test_50m_tokens_prepare_in_bounded_memory(tmp_path, demo):
    """>= 50M tokens through DirectRunner with 2 worker processes. Peak resident memory of the
    whole job (driver + workers, sampled every 0.5 s) is printed for it and for a corpus 10x
    smaller: it must not grow with the corpus (examples stream through files, never through
    memory; only their shard assignments are grouped)."""
    peaks = {}
    for lines in (76000, 760000):
        root = tmp_path / str(lines)
        root.mkdir()
        cfg, data_yaml = big_corpus(root, demo, lines)
        size = (root / "big.jsonl").stat().st_size
        out = root / "cache"
        args = cli(
            "--data-config",
            data_yaml,
            "--stage",
            "big",
            "--tokenizer",
            demo[1],
            "--out",
            out,
            "--num-shards",
            64,
            "--num-workers",
            2,
        )
        t0 = time.time()
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.5)
        log = proc.stdout.read().decode(errors="replace")
        assert proc.returncode == 0, log[-3000:]
        stats = read_stats(out / "cslm_big_asr_en", "train")
        peaks[lines] = peak
        print(
            f"\nprepare-data, 2 workers: {stats['targets_tokens'] / 1e6:.1f}M tokens, "
            f"{stats['examples']} examples from {size / 2**20:.0f} MiB JSONL in "
            f"{time.time() - t0:.0f} s; peak RSS of the job (sum over processes) "
            f"{peak / 2**30:.2f} GiB; load {os.getloadavg()}"
        )
        assert stats["examples"] == lines
    assert stats["targets_tokens"] >= 50_000_000
    assert peaks[760000] < 1.25 * peaks[76000] + 2**28, peaks


# -- training from a prepared cache, end to end ----------------------------------------------------

from test_train import losses, run_cfg  # noqa: E402  (helpers)


@pytest.mark.slow
def test_train_from_a_prepared_cache_equals_in_process(demo, base_ckpt, tmp_path):  # noqa: F811
    """`train --data-cache` on a Beam cache with one shard per split trains on exactly the batches
    of the in-process path: the same losses, step by step."""
    from cslm_jax.train.loop import EXIT_OK, train

    cfg = run_cfg(demo, base_ckpt, "train.steps=3", "train.num_devices=1")
    data_cfg = load_data_config(demo[0] / "data.yaml", ["packing.max_length=128"])
    prepare_data(
        data_cfg,
        "pretrain",
        base_ckpt / "tokenizer",
        tmp_path / "cache",
        num_shards=1,
        pipeline_args=IN_MEMORY,
        log=lambda *_: None,
    )
    assert train(cfg, tmp_path / "in_process", log=lambda *_: None) == EXIT_OK
    logged = []
    assert (
        train(cfg, tmp_path / "cached", log=logged.append, data_cache=str(tmp_path / "cache"))
        == EXIT_OK
    )
    assert (
        f"train: reading the prepared cache {tmp_path / 'cache'} (stage pretrain: "
        f"{len(data_cfg.tasks('pretrain'))} task(s), max_length 128;"
    ) in "\n".join(logged)
    steps, a = losses(tmp_path / "in_process")
    assert steps == [1, 2, 3]
    np.testing.assert_array_equal(a, losses(tmp_path / "cached")[1])
    # a cache prepared with another tokenizer (here: another chat template) is refused
    import shutil

    shutil.copytree(base_ckpt / "tokenizer", tmp_path / "tok2")
    template = tmp_path / "tok2" / "chat_template.jinja"
    template.write_text("{{ bos_token }}" + template.read_text())
    prepare_data(
        data_cfg,
        "pretrain",
        tmp_path / "tok2",
        tmp_path / "other_cache",
        num_shards=1,
        pipeline_args=IN_MEMORY,
        log=lambda *_: None,
    )
    with pytest.raises(CacheError, match="different tokenizer"):
        train(
            cfg, tmp_path / "other", log=lambda *_: None, data_cache=str(tmp_path / "other_cache")
        )
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_concurrent_in_process_preparations_never_share_a_file(tmp_path, demo):
    """Two processes preparing the same task at once (hosts of one job without a prepared cache)
    each write into a folder of their own and rename it into place: one wins, the other's copy
    is dropped, and the cache is whole; no temporary folder is left."""
    rows = [{"lang": "en", "text": f"hello {i}", "units": [1, 2, 3]} for i in range(3000)]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    small_config(tmp_path, {"c": [{"kind": "asr", "lang": "en", "train": [f]}]})
    code = (
        "import sys; from cslm_jax.data.formats import load_data_config; "
        "from cslm_jax.data.prepare import prepare_task_local; "
        "cfg = load_data_config(sys.argv[1]); "
        "prepare_task_local(cfg.tasks('c')[0], cfg, sys.argv[2], sys.argv[3], num_shards=2)"
    )
    target = tmp_path / "cache" / "cslm_c_asr_en"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "data.yaml"), str(demo[1]), str(target)],
            cwd=REPO,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["cslm_c_asr_en"]
    assert (target / "COMPLETED").is_file()
    assert read_stats(target, "train")["examples"] == 3000
    assert sum(len(r) for r in read_examples(target).values()) == 3000
