"""`cslm-jax evaluate` on audio (issue 26): with `--token2wav DIR --voice V`, every answer is
synthesised while it is decoded (each speech chunk as its `<eosp>` closes, as `decode
--speech-out` does) and scored as speech, as the paper scores it:

* TTS tasks: the ASR (`--asr`, `cslm_jax.eval.asr`) transcript of the synthesised speech
  against the input text (WER / CER).
* spoken QA (s2s): the answer's audio transcribed and scored against its own text answer
  (text/speech consistency; it replaces the unit lexicon's read-back when an ASR is given) and
  against the reference answer; the LLM judge (`--judge-url`, `cslm_jax.eval.judge`) rates the
  transcript of the answer audio (the text answer without audio).
* MOS (`--mos`, `cslm_jax.eval.mos`) of each answer's audio.
* Time to first audio (seconds from the start of the answer's decoding batch to its first
  samples ready, compilation left out as `decode` leaves it out), mean and median, for the
  interleaved answer streamed chunk by chunk and for the non-interleaved chain on the same
  questions: the answer decoded again, whole, without synthesis, then its speech synthesised in
  one window (first audio = the answer's decoding time + that synthesis).

The wavs (PCM 16-bit, the token2wav's rate) are kept in a folder beside the result JSON,
`<output stem>_wavs/NNNN.wav`, NNNN the example's index in the result's `examples`; the ASR and
MOS score those files as written.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np

from cslm_jax.eval.asr import load_asr, transcribe, transcript_error_rates
from cslm_jax.eval.judge import Judge, load_prompt, parse_scale
from cslm_jax.eval.metrics import EvaluationError
from cslm_jax.eval.mos import load_mos, predict_mos
from cslm_jax.infer.responses import decode_questions
from cslm_jax.speech.hift import Token2WavError
from cslm_jax.speech.stream import SpeechOut, open_stream
from cslm_jax.storage.outputs import OutputPathError, foreign_entries, read_marker

AUDIO_KINDS = ("s2s", "tts")


class EvaluationSpeechOut(SpeechOut):
    """`SpeechOut` writing evaluate's wav folder (marked as evaluate's, so decode --speech-out
    and evaluate never write over each other's wavs)."""

    TOOL = "evaluate --token2wav"


@dataclasses.dataclass
class AudioScoring:
    """What `evaluate` does with audio: the synthesiser (None: no audio), the scorers."""

    speech_out: EvaluationSpeechOut | None = None
    voice: str | None = None
    speech_rate: float = 1.0
    speech_rate_from: str = ""
    asr: object = None
    asr_spec: str | None = None
    mos: object = None
    judge: object = None

    @property
    def wav_dir(self) -> Path | None:
        return self.speech_out.out_dir if self.speech_out is not None else None


def wav_dir_for(output: Path) -> Path:
    """The wav folder of a result JSON: `<stem>_wavs` beside it."""
    return output.parent / f"{output.stem}_wavs"


def check_wav_dir(wav_dir: Path, output: Path) -> None:
    """The wav folder of `output` must be new, empty or an earlier evaluate's: never write over
    wavs another tool or the user put there (named as --output's, the flag the user gave)."""
    if wav_dir.is_file():
        raise OutputPathError(
            f"--output {output}: its wav folder {wav_dir} is a file; move it or choose another "
            f"--output"
        )
    if not wav_dir.is_dir():
        return
    marker = read_marker(wav_dir)
    if marker is not None and marker.get("tool") != EvaluationSpeechOut.TOOL:
        raise OutputPathError(
            f"--output {output}: its wav folder {wav_dir} was written by {marker.get('tool')}; "
            f"move it or choose another --output"
        )
    foreign = foreign_entries(wav_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputPathError(
            f"--output {output}: its wav folder {wav_dir} holds {shown}, which evaluate did not "
            f"write; move them or choose another --output"
        )


def open_audio_scoring(
    kind: str,
    output: Path,
    fmt,
    *,
    token2wav=None,
    voice=None,
    speech_rate: float | None = None,
    asr: str | None = None,
    mos: str | None = None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    judge_prompt=None,
    judge_scale: str = "1-10",
    judge_concurrency: int = 4,
    judge_cache=None,
    inputs=(),
) -> AudioScoring:
    """The audio flags checked and their tools loaded, before any model loads: named errors
    for a missing partner flag, a task kind without speech answers, a bad folder, voice, spec."""
    if (token2wav is None) != (voice is None):
        raise EvaluationError(
            "--token2wav and --voice go together (the synthesiser and its speaker)"
        )
    audio = token2wav is not None
    if not audio:
        for flag, v in (("--asr", asr), ("--mos", mos), ("--speech-rate", speech_rate)):
            if v is not None:
                raise EvaluationError(
                    f"{flag} is for the answers' audio: give --token2wav DIR --voice V too"
                )
    if audio and kind not in AUDIO_KINDS:
        raise EvaluationError(
            f"--token2wav: {kind} answers have no speech to synthesise (audio is scored for "
            f"{', '.join(AUDIO_KINDS)} tasks)"
        )
    if (judge_url is None) != (judge_model is None):
        raise EvaluationError("--judge-url and --judge-model go together")
    if judge_url is not None and kind != "s2s":
        raise EvaluationError(f"--judge-url: the judge rates spoken-QA answers, not {kind}")
    result = AudioScoring()
    if audio:
        if speech_rate is not None and not (0 < speech_rate < float("inf")):
            raise Token2WavError(f"--speech-rate {speech_rate}: must be a positive number")
        if speech_rate is None:
            result.speech_rate, result.speech_rate_from = fmt.synthesis_rate()
        else:
            result.speech_rate, result.speech_rate_from = float(speech_rate), "--speech-rate"
        check_wav_dir(wav_dir_for(output), output)
        result.speech_out = EvaluationSpeechOut.open(
            wav_dir_for(output), token2wav, voice, result.speech_rate, inputs=inputs
        )
        result.voice = str(voice)
    if asr is not None:
        result.asr, result.asr_spec = load_asr(asr), asr
    if mos is not None:
        result.mos = load_mos(mos)
    if judge_url is not None:
        template, source = load_prompt(judge_prompt)
        cache = (
            Path(judge_cache) if judge_cache else output.parent / f"{output.stem}_judge_cache.jsonl"
        )
        result.judge = Judge(
            judge_url,
            judge_model,
            prompt=template,
            prompt_source=source,
            scale=parse_scale(judge_scale),
            cache=cache,
            concurrency=judge_concurrency,
        )
    return result


# -- decoding with speech out ---------------------------------------------------------------------


def decode_answers(
    cfg, params, tok, vocab, prompts, *, batch_size, max_new_tokens, speech_out=None, log
):
    """Greedy answers (`cslm_jax.infer.responses.Answer`: ids, events, timings) of `prompts`,
    streamed; with `speech_out` each speech chunk synthesised as it closes. The ids are those of
    `generate` (the same compiled loop, one step at a time)."""
    from cslm_jax.infer.decode import GREEDY  # heavy: jax

    answers = []
    t0 = time.perf_counter()
    for batch in decode_questions(
        cfg,
        params,
        tok,
        vocab,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        sampling=GREEDY,
        speech_out=speech_out,
        log=log,
    ):
        answers += batch.answers
        log(f"  decoded {len(answers)}/{len(prompts)} ({time.perf_counter() - t0:.1f}s)")
    return answers


def speech_units(answer) -> list[int]:
    from cslm_jax.infer.decode import SpeechChunk  # heavy: jax

    return [u for ev in answer.events if isinstance(ev, SpeechChunk) for u in ev.units]


def chain_first_audio(
    cfg, params, tok, vocab, prompts, scoring: AudioScoring, *, batch_size, max_new_tokens, log
) -> list[float | None]:
    """Time to first audio of the non-interleaved chain (module doc): each answer decoded again
    without synthesis (its decoding time `total_s`), then all its units synthesised as one
    window, compilation left out. None for an answer without speech."""
    so = scoring.speech_out
    answers = decode_answers(
        cfg,
        params,
        tok,
        vocab,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        log=log,
    )
    out: list[float | None] = []
    for a in answers:
        units = speech_units(a)
        if not units or a.total_s is None:
            out.append(None)
            continue
        stream = open_stream(so.t2w, so.voice, so.noise, so.speech_rate)
        t0 = time.perf_counter()
        wave = stream.push(units)
        if not len(wave):
            wave = stream.finish()
        synth = time.perf_counter() - t0 - stream.compile_s
        out.append(a.total_s + synth if len(wave) else None)
    return out


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf  # heavy: soundfile

    wave, rate = sf.read(str(path), dtype="float32")
    return wave, int(rate)


def mean_median(values) -> dict:
    vals = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "median": statistics.median(vals) if vals else None,
        "answers": len(vals),
    }


# -- scoring the audio ----------------------------------------------------------------------------


def score_audio(
    kind: str,
    items: list[dict],
    rows: list[dict],
    metrics: dict,
    answers,
    scoring: AudioScoring,
    chain: list | None,
    log,
) -> None:
    """Adds the audio measures to `metrics` and each row (module doc); `answers` are the
    decoded answers with their speech timings in `scoring.speech_out`."""
    so = scoring.speech_out
    waves, rate = [], so.t2w.sample_rate
    first_audio = []
    for i, (row, a) in enumerate(zip(rows, answers)):
        t = so.timing(a.index)
        wav = so.out_dir / so.wav_name(a.index)
        wave, rate = read_wav(wav)
        waves.append(wave)
        first_audio.append(t["time_to_first_audio_s"])
        row.update(
            wav=str(wav.relative_to(so.out_dir.parent)),
            audio_s=len(wave) / rate,
            time_to_first_audio_s=t["time_to_first_audio_s"],
            chain_time_to_first_audio_s=chain[i] if chain else None,
            speech_rtf=t["speech_rtf"],
        )
    metrics["audio"] = {
        "wav_dir": str(so.out_dir),
        "sample_rate": rate,
        "voice": scoring.voice,
        "speech_rate": scoring.speech_rate,
        "speech_rate_from": scoring.speech_rate_from,
        "answers_with_audio": sum(len(w) > 0 for w in waves),
        "audio_s": mean_median([len(w) / rate for w in waves]),
    }
    t = metrics["time_to_first_audio_s"] = {
        "interleaved": mean_median(first_audio),
        "chain": mean_median(chain) if chain else None,
    }
    # how many times sooner the interleaved answer is heard (chain / interleaved, medians)
    t["chain_over_interleaved"] = (
        t["chain"]["median"] / t["interleaved"]["median"]
        if t["chain"] and t["chain"]["median"] and t["interleaved"]["median"]
        else None
    )
    if scoring.asr is not None:
        hyps = [""] * len(items)
        for lang in sorted({it["lang"] for it in items}):
            idx = [i for i, it in enumerate(items) if it["lang"] == lang]
            for i, h in zip(idx, transcribe(scoring.asr, [waves[i] for i in idx], rate, lang)):
                hyps[i] = h
        log(f"evaluate: transcribed {len(hyps)} answer(s) with {scoring.asr_spec}")
        units = [it["unit"] for it in items]
        langs = [it["lang"] for it in items]
        metrics["asr"] = scoring.asr_spec
        if kind == "tts":
            r = transcript_error_rates(
                [it["reference"] for it in items], hyps, units, langs, scoring.asr
            )
            metrics["asr_error_rate"] = r["error_rate"]
            metrics["asr_error_rate_metric"] = r["metric"]
            metrics["asr_normalizers"] = r["normalizers"]
            for row, h, e in zip(rows, hyps, r["per_example"]):
                row.update(audio_transcript=h, asr_error_rate=e)
        else:
            own = transcript_error_rates(
                [row["answer"] for row in rows], hyps, units, langs, scoring.asr
            )
            ref = transcript_error_rates(
                [it["reference"] for it in items], hyps, units, langs, scoring.asr
            )
            metrics["consistency_error_rate"] = own["error_rate"]
            metrics["consistency_source"] = f"ASR {scoring.asr_spec}"
            metrics["speech_answer_error_rate"] = ref["error_rate"]
            metrics["asr_error_rate_metric"] = own["metric"]
            metrics["asr_normalizers"] = own["normalizers"]
            for row, h, e1, e2 in zip(rows, hyps, own["per_example"], ref["per_example"]):
                row.update(
                    audio_transcript=h, consistency_error_rate=e1, speech_answer_error_rate=e2
                )
    if scoring.mos is not None:
        m = predict_mos(scoring.mos, waves, rate)
        metrics["mos"] = {"mean": m["mean"], "predictor": m["predictor"]}
        for row, s in zip(rows, m["scores"]):
            row["mos"] = s


def judge_answers(items, rows, metrics, judge, log) -> None:
    """The judge's scores of the s2s answers: of the answer audio's transcript where there is
    one, else of the text answer."""
    spoken = all("audio_transcript" in r for r in rows)
    got = judge.score(
        [
            {
                "question": it["question"],
                "answer": r["audio_transcript"] if spoken else r["answer"],
                "reference": it["reference"],
            }
            for it, r in zip(items, rows)
        ]
    )
    log(
        f"evaluate: judge {got['model']} scored {got['scored']}, failed {got['failed']} "
        f"({got['requests']} request(s), {got['cached']} from the cache)"
    )
    metrics["judge"] = {
        k: got[k]
        for k in (
            "mean",
            "scored",
            "failed",
            "requests",
            "cached",
            "model",
            "url",
            "prompt",
            "scale",
        )
    }
    metrics["judge"]["judged"] = "answer audio transcripts" if spoken else "text answers"
    for r, s, reply in zip(rows, got["scores"], got["replies"]):
        r.update(judge_score=s, judge_reply=reply)


def audio_table_rows(m: dict) -> list[tuple[str, str]]:
    """The table's lines for the audio measures and the judge (none when they were not asked)."""

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def secs(d):
        if not d or d["mean"] is None:
            return "-"
        return f"{d['mean']:.3f} s / {d['median']:.3f} s  ({d['answers']} answers)"

    rows: list[tuple[str, str]] = []
    if "audio" in m:
        a, t = m["audio"], m["time_to_first_audio_s"]
        rows += [
            ("answers with audio", f"{a['answers_with_audio']}/{m['examples']}"),
            ("time to first audio, interleaved (mean / median)", secs(t["interleaved"])),
            ("time to first audio, chain (mean / median)", secs(t["chain"])),
            (
                "chain / interleaved (medians)",
                "-"
                if t["chain_over_interleaved"] is None
                else f"{t['chain_over_interleaved']:.2f}x",
            ),
        ]
        if "asr" in m:
            name = {"wer": "WER", "cer": "CER"}.get(m["asr_error_rate_metric"], "WER/CER")
            if "asr_error_rate" in m:
                rows.append((f"ASR of the speech vs input text, {name}", pct(m["asr_error_rate"])))
            else:
                rows.append(
                    (
                        f"ASR of the answer audio vs reference, {name}",
                        pct(m["speech_answer_error_rate"]),
                    )
                )
        if "mos" in m:
            rows.append((f"MOS ({m['mos']['predictor']})", f"{m['mos']['mean']:.3f}"))
    if "judge" in m:
        j = m["judge"]
        score = "-" if j["mean"] is None else f"{j['mean']:.2f}"
        rows.append(
            (
                f"judge score ({j['model']}, {j['scale'][0]}-{j['scale'][1]})",
                f"{score}  ({j['scored']} scored, {j['failed']} failed)",
            )
        )
    return rows
