"""`cslm-jax demo`: the bundled end-to-end CSLM run on CPU (the README's main job).

demo corpus + tokenizer (Llama-3 special tokens) -> a random `transformers` Llama -> `import-hf`
with speech units (checked against PyTorch) -> stage 1 (`cslm-jax train`, configs/demo.yaml) ->
held-out ASR error rate vs chance -> stage 2 from stage 1's parameters (configs/demo_sft.yaml) ->
`export-hf`, reloaded by `transformers` and checked -> held-out spoken questions decoded with
the KV-cache decoder, streamed as transcript, text chunks and speech chunks. Exit 0 only when
every check holds.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from cslm_jax.config import load_model_config, load_run_config
from cslm_jax.convert.hf import export_hf, import_hf
from cslm_jax.data.formats import load_data_config, merge_repeats, speech
from cslm_jax.demo.corpus import UNIT_COUNT, make_demo_data
from cslm_jax.demo.random_hf import write_random_hf_llama
from cslm_jax.eval.metrics import error_rate
from cslm_jax.infer.decode import (
    GREEDY,
    End,
    EventParser,
    SpeechChunk,
    TextChunk,
    Transcript,
    default_stop_ids,
    generate,
    generate_stream,
    load_for_decoding,
)
from cslm_jax.infer.responses import chat_prompt_ids
from cslm_jax.model.llama import forward
from cslm_jax.model.vocab import load_tokenizer
from cslm_jax.resources import config_path
from cslm_jax.speech.stream import open_stream
from cslm_jax.speech.token2wav import load_token2wav, save_random_token2wav
from cslm_jax.storage.checkpoint import load_params, read_metadata
from cslm_jax.storage.outputs import check_output_dir, clear_output, mark_entries, write_marker
from cslm_jax.train.loop import EXIT_OK, train

ASR_EXAMPLES = 24  # held-out utterances per language
S2S_EXAMPLES = 4  # held-out spoken questions per direction


def _say(msg: str) -> None:
    print(msg, flush=True)


def _read_jsonl(path: Path) -> list[dict]:
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def asr_eval(model_dir: Path, data_dir: Path, data_cfg, n: int = ASR_EXAMPLES) -> dict:
    """Greedy ASR on the first n held-out utterances of each language: {lang: (rate, chance)},
    rate = WER (en) / CER (zh); chance = the rate of answering with another held-out sentence
    of the same language (fluent, unrelated)."""
    cfg, params, tok, vocab = load_for_decoding(model_dir)
    stops = default_stop_ids(tok, vocab)
    out = {}
    for lang in data_cfg.format.languages:
        path = data_dir / f"paired_{lang}.validation.jsonl"
        if not path.is_file():
            continue
        records = _read_jsonl(path)[:n]
        spec = data_cfg.format.languages[lang]
        prompts = [
            chat_prompt_ids(
                tok,
                spec.asr_prompt.format(speech=speech(merge_repeats(r["units"]))),
                str(path),
                data_cfg.format.loss_mask,
            )
            for r in records
        ]
        gen = generate(
            cfg, params, prompts, max_new_tokens=48, stop_ids=stops, sampling=GREEDY, vocab=vocab
        )
        hyps = [
            tok.decode([i for i in g if i not in stops], skip_special_tokens=True).strip()
            for g in gen
        ]
        refs = [r["text"] for r in records]
        unit = "char" if spec.chunk_unit == "char" else "word"
        shuffled = refs[1:] + refs[:1]
        out[lang] = (
            error_rate(refs, hyps, unit),
            error_rate(refs, shuffled, unit),
            unit,
            list(zip(refs, hyps))[:2],
        )
    return out


def s2s_demo(
    model_dir: Path,
    data_dir: Path,
    data_cfg,
    n: int = S2S_EXAMPLES,
    t2w=None,
    speech_dir: Path | None = None,
) -> dict:
    """Decode held-out spoken questions (same-language and cross-lingual), stream the events of
    each answer and compare transcript and answer text with the references. With a token2wav
    (`t2w`), each answer's speech chunks are synthesised as they close (`speech.stream`) and
    the answer's audio goes to `speech_dir/<q>2<a>_<i>.wav`."""
    import soundfile as sf  # heavy: soundfile

    cfg, params, tok, vocab = load_for_decoding(model_dir)
    stops = default_stop_ids(tok, vocab)
    stats = {
        "questions": 0,
        "transcript_exact": 0,
        "answer_exact": 0,
        "speech_chunks": 0,
        "reassembled": 0,
        "wavs": 0,
        "audio_s": 0.0,
        "lengths_ok": 0,
    }
    rate = data_cfg.format.synthesis_rate()[0]
    for q_lang, a_lang in (("en", "en"), ("zh", "zh"), ("en", "zh"), ("zh", "en")):
        path = data_dir / f"s2s_{q_lang}2{a_lang}.validation.jsonl"
        records = _read_jsonl(path)[:n]
        spec = data_cfg.format.languages[a_lang]
        template = spec.s2s_prompt if q_lang == a_lang else spec.s2s_cross_prompt
        prompts = [
            chat_prompt_ids(
                tok,
                template.format(speech=speech(merge_repeats(r["question_units"]))),
                str(path),
                data_cfg.format.loss_mask,
            )
            for r in records
        ]
        parsers = [EventParser(tok, vocab, stops) for _ in records]
        events = [[] for _ in records]
        generated = [[] for _ in records]
        t0 = time.perf_counter()
        first_speech = [None] * len(records)
        speakers = [AnswerAudio(t2w, rate, t0) if t2w is not None else None for _ in records]
        for step_tokens in generate_stream(
            cfg,
            params,
            prompts,
            max_new_tokens=200,
            stop_ids=stops,
            sampling=GREEDY,
            vocab=vocab,
            chunk_size=8,
        ):
            for b, token in enumerate(step_tokens.tolist()):
                if parsers[b].state == "ended":
                    continue
                generated[b].append(token)
                new = parsers[b].feed(token)
                if first_speech[b] is None and any(isinstance(e, SpeechChunk) for e in new):
                    first_speech[b] = time.perf_counter() - t0
                events[b].extend(new)
                if speakers[b] is not None:
                    speakers[b].feed(new)
        for b, r in enumerate(records):
            closing = parsers[b].close()
            events[b].extend(closing)
            if speakers[b] is not None:
                speakers[b].feed(closing)
                wave = speakers[b].finish()
                sf.write(
                    str(speech_dir / f"{q_lang}2{a_lang}_{b}.wav"),
                    wave,
                    t2w.sample_rate,
                    subtype="PCM_16",
                    format="WAV",
                )
                stats["wavs"] += 1
                stats["audio_s"] += wave.size / t2w.sample_rate
                stats["lengths_ok"] += wave.size == speakers[b].stream.expected_samples()
            ids = [i for e in events[b] for i in e.ids]
            stats["questions"] += 1
            stats["reassembled"] += ids == generated[b]
            transcript = next((e.text for e in events[b] if isinstance(e, Transcript)), "")
            answer = "".join(e.text for e in events[b] if isinstance(e, TextChunk))
            chunks = [e for e in events[b] if isinstance(e, SpeechChunk)]
            stats["speech_chunks"] += len(chunks)
            stats["transcript_exact"] += transcript.strip() == r["question_text"].strip()
            stats["answer_exact"] += _squash(answer) == _squash(r["answer_text"])
            if b == 0:
                _say(
                    f"      {q_lang}->{a_lang}: question (speech, {len(r['question_units'])} units), "
                    f"said: {r['question_text']!r}"
                )
                for e in events[b]:
                    if isinstance(e, Transcript):
                        _say(f"        transcript   {e.text!r}")
                    elif isinstance(e, TextChunk):
                        _say(f"        text {e.index}       {e.text!r}")
                    elif isinstance(e, SpeechChunk):
                        shown = "".join(f"<{u}>" for u in e.units[:10])
                        _say(
                            f"        speech {e.index}     {len(e.units)} units {shown}"
                            f"{'...' if len(e.units) > 10 else ''}"
                        )
                _say(
                    f"        reference answer {r['answer_text']!r}; first speech chunk after "
                    f"{first_speech[b] or float('nan'):.2f}s (batch of {len(records)})"
                )
                if speakers[b] is not None:
                    sp = speakers[b]
                    _say(
                        f"        audio        {sp.samples / t2w.sample_rate:.2f} s in "
                        f"{len(sp.stream.windows)} window(s), first samples after "
                        f"{sp.first_s or float('nan'):.2f}s (compiling included) -> "
                        f"{speech_dir.name}/{q_lang}2{a_lang}_{b}.wav"
                    )
    return stats


class AnswerAudio:
    """One demo answer's speech, each chunk synthesised as it closes (`speech.stream`): `feed`
    takes the answer's decode events as they complete, `finish` returns the whole waveform."""

    def __init__(self, t2w, speech_rate: float, t0: float):
        self.stream = open_stream(t2w, "random", speech_rate=speech_rate)
        self.t0 = t0  # the batch's start (time.perf_counter())
        self.chunks: list[np.ndarray] = []
        self.first_s: float | None = None  # first samples ready, seconds after t0

    @property
    def samples(self) -> int:
        return sum(a.size for a in self.chunks)

    def feed(self, events) -> None:
        for e in events:
            if isinstance(e, SpeechChunk):
                self.chunks.append(self.stream.push(e.units))
            elif isinstance(e, End):
                self.chunks.append(self.stream.finish())
            if self.first_s is None and self.samples:
                self.first_s = time.perf_counter() - self.t0

    def finish(self) -> np.ndarray:
        self.chunks.append(self.stream.finish())
        return np.concatenate(self.chunks)


def _squash(text: str) -> str:
    return "".join(text.split())


def run_demo(out: str | Path, force: bool = False) -> int:
    try:
        import torch  # optional: torch (a dev requirement), the demo's reference model
        from transformers import LlamaForCausalLM  # heavy: transformers
    except ImportError as e:
        raise SystemExit(
            f"the demo needs PyTorch (CPU) for its reference model: "
            f"pip install -r requirements-dev.txt ({e})"
        ) from None

    out = Path(out)
    check_output_dir(out, force, tool="demo")
    if force and out.exists():
        clear_output(out)
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "demo")  # all of it the demo's until it lists what it wrote
    t0 = time.time()
    checks: dict[str, bool] = {}
    shape = load_model_config(config_path("model", "demo.yaml"))

    _say("[1/8] demo corpus (en, zh) and its BPE tokenizer with Llama-3's special tokens")
    make_demo_data(
        out / "data", config_path("data", "demo.yaml"), force=True, log=lambda m: _say("      " + m)
    )
    tok = load_tokenizer(out / "data" / "tokenizer")
    data_cfg = load_data_config(out / "data" / "data.yaml")

    _say(
        f"[2/8] a random-weight transformers LlamaForCausalLM (configs/model/demo.yaml: "
        f"{shape.num_layers} layers x {shape.hidden_size}, {shape.num_heads}/{shape.num_kv_heads} heads)"
    )
    model = write_random_hf_llama(
        out / "hf_base",
        tok,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        rope_scaling=shape.rope_scaling,
        rope_theta=shape.rope_theta,
        max_position_embeddings=shape.max_position_embeddings,
        weight_std=0.02,
    )

    _say(f"[3/8] import-hf with {UNIT_COUNT} speech units; our forward vs PyTorch")
    # new rows drawn like the random base rows: `mean` (HF's resize default, for pretrained
    # models) would start all 256 units as one identical vector, which a random tiny model
    # takes far longer to pull apart than the demo trains
    ckpt = import_hf(
        out / "hf_base",
        out / "ckpt",
        speech_units=UNIT_COUNT,
        new_rows="normal",
        log=lambda m: _say("      " + m),
    )
    _, cfg, vocab = read_metadata(ckpt)
    params = load_params(ckpt)
    ids = np.random.default_rng(0).integers(0, vocab.base_size, size=(2, 160))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(forward(cfg.replace(compute_dtype="float32"), params, jnp.asarray(ids)))
    diff = float(np.abs(ours[..., : vocab.base_size] - ref).max())
    checks["import parity"] = diff < 1e-4
    _say(f"      max |logit difference| = {diff:.2e} over {ids.size} tokens")

    data_override = f"data.config={out / 'data' / 'data.yaml'}"
    _say("[4/8] stage 1, continual pre-training: cslm-jax train --config configs/demo.yaml")
    stage1 = out / "stage1"
    cfg1 = load_run_config(
        config_path("demo.yaml"), [f"init_from={ckpt}", data_override, "train.progress_bar=false"]
    )
    checks["stage 1 ran"] = train(cfg1, stage1, log=lambda m: _say("      " + m)) == EXIT_OK
    fell1 = _loss_fell(stage1, "stage 1")
    checks["stage 1 loss fell"] = fell1

    _say("[5/8] held-out ASR after stage 1 (greedy; chance = answering another held-out sentence)")
    asr = asr_eval(stage1 / "model", out / "data", data_cfg)
    for lang, (rate, chance, unit, examples) in asr.items():
        name = "WER" if unit == "word" else "CER"
        _say(
            f"      {lang}: {name} {rate:.1%} vs chance {chance:.1%} over {ASR_EXAMPLES} utterances"
        )
        for ref_text, hyp in examples:
            _say(f"        ref {ref_text!r}  ->  hyp {hyp!r}")
        far_below = rate < 0.5 * chance
        checks[f"ASR {lang} far below chance"] = far_below
        _say(
            f"      {lang}: {'far below chance' if far_below else 'NOT far below chance'} "
            f"(the check: under half of chance)"
        )

    _say(
        "[6/8] stage 2, interleaved instruction tuning from stage 1's parameters: "
        "cslm-jax train --config configs/demo_sft.yaml --init-from RUN_DIR_1"
    )
    stage2 = out / "stage2"
    cfg2 = load_run_config(
        config_path("demo_sft.yaml"), [data_override, "train.progress_bar=false"]
    )
    checks["stage 2 ran"] = (
        train(cfg2, stage2, init_from=stage1, log=lambda m: _say("      " + m)) == EXIT_OK
    )
    checks["stage 2 loss fell"] = _loss_fell(stage2, "stage 2")

    _say("[7/8] export-hf; reload with transformers; logits of the trained model vs ours")
    export = export_hf(
        stage2 / "model", out / "hf_export", dtype="float32", log=lambda m: _say("      " + m)
    )
    back = LlamaForCausalLM.from_pretrained(str(export), attn_implementation="eager").eval()
    _, cfg2m, vocab2 = read_metadata(stage2 / "model")
    trained = load_params(stage2 / "model")
    etok = load_tokenizer(export)
    pids = chat_prompt_ids(
        etok,
        "Please directly answer the questions in the user's speech. "
        "This is input: <sosp><12><207><33><eosp>.",
        str(export),
    )
    with torch.no_grad():
        exported = back(torch.tensor([pids])).logits.numpy()
    ours = np.asarray(forward(cfg2m.replace(compute_dtype="float32"), trained, jnp.asarray([pids])))
    diff2 = float(np.abs(ours[..., : vocab2.size] - exported).max())
    checks["export parity"] = diff2 < 1e-4
    _say(
        f"      exported vocabulary {back.config.vocab_size} = {vocab2.base_size} text + "
        f"{vocab2.unit_count} units + {len(vocab2.control_tokens)} control tokens; "
        f"max |logit difference| vs transformers = {diff2:.2e}"
    )

    _say(
        "[8/8] decode held-out spoken questions from the exported folder (KV cache, greedy), "
        "streaming transcript / text chunks / speech chunks, each speech chunk synthesised "
        "as it closes"
    )
    t2w_dir = save_random_token2wav(out / "token2wav", "v1", seed=0)
    t2w = load_token2wav(t2w_dir)
    (out / "speech").mkdir()
    _say(
        f"      speech out: each speech chunk synthesised as it closes by a RANDOM-WEIGHT "
        f"token2wav ({t2w_dir}: CosyVoice's v1 flow + HiFT at reduced sizes): it gives noise, "
        f"not speech; import the official flow.pt / hift.pt with import-token2wav for speech"
    )
    stats = s2s_demo(export, out / "data", data_cfg, t2w=t2w, speech_dir=out / "speech")
    checks["events reassemble"] = stats["reassembled"] == stats["questions"]
    checks["speech chunks produced"] = stats["speech_chunks"] >= stats["questions"]
    checks["speech synthesised"] = (
        stats["wavs"] == stats["questions"] and stats["lengths_ok"] == stats["questions"]
    )
    _say(
        f"      {stats['questions']} questions: transcript exact {stats['transcript_exact']}, "
        f"answer text exact {stats['answer_exact']}, {stats['speech_chunks']} speech chunks; "
        f"{stats['wavs']} wavs ({stats['audio_s']:.1f} s of audio at {t2w.sample_rate} Hz) in "
        f"{out / 'speech'}"
    )

    mark_entries(out, "demo")
    failed = [k for k, ok in checks.items() if not ok]
    _say(
        f"demo {'OK' if not failed else 'FAILED: ' + ', '.join(failed)} in {time.time() - t0:.0f}s; "
        f"outputs in {out}"
    )
    _say(f"talk to the stage-2 model: {serve_command(out)}")
    _say(
        f'      questions as units ({{"type": "units", "units": "<12><207>..."}} on '
        f"ws://127.0.0.1:8000/v1/s2s): the demo has no speech tokenizer for its {UNIT_COUNT} "
        f"synthetic units; its token2wav has random weights, so the answers' audio is noise"
    )
    return 0 if not failed else 1


def serve_command(out: str | Path) -> str:
    """The `cslm-jax serve` command line for a demo folder's stage-2 model: its data config
    (prompts, merging, speech rate), its random token2wav with the random voice."""
    out = Path(out)
    return shlex.join(
        ["cslm-jax", "serve", "--ckpt", str(out / "stage2"),
         "--data-config", str(out / "data" / "data.yaml"),
         "--token2wav", str(out / "token2wav"), "--voice", "random"]
    )  # fmt: skip


def _loss_fell(run_dir: Path, name: str) -> bool:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    _say(
        f"      {name}: loss {first:.3f} at step {rows[0]['step']} -> {last:.3f} at step "
        f"{rows[-1]['step']} (text {rows[-1]['text_loss']:.3f}, units {rows[-1]['unit_loss']:.3f})"
    )
    return last < 0.6 * first
