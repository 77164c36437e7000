"""`cslm-jax evaluate`: decode a task's validation records and score them (cslm_jax.eval.run)."""

# Path arguments that must be local (cslm_jax.cli.main.refuse_urls)
LOCAL_PATHS = ("output", "token2wav", "judge_cache")


def add_parser(sub):
    s = sub.add_parser(
        "evaluate",
        help="decode a SeqIO task's validation records greedily and "
        "score them (ASR WER/CER, MT BLEU/chrF, spoken QA transcript and answer "
        "error rates, off-target ratio, text/speech consistency, TTS unit error "
        "rate); writes JSON and prints a table",
    )
    s.add_argument(
        "--config",
        required=True,
        help="run config (its data.config), a train run folder (its config.yaml) or a data config",
    )
    s.add_argument(
        "--task",
        required=True,
        help="task name, e.g. cslm_pretrain_asr_en, "
        "cslm_sft_s2s_en2zh (as registered by tasks/cslm.py)",
    )
    s.add_argument(
        "--ckpt",
        default=None,
        help="model checkpoint, train run folder (its "
        "model/) or Hugging Face folder (export-hf output); default: the run's model/ "
        "when --config is a train run folder or its config.yaml",
    )
    s.add_argument("--split", default="validation", choices=("validation", "train"))
    s.add_argument(
        "--max-examples",
        type=int,
        default=None,
        help="first N examples (MT: each direction of a pair is one example)",
    )
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default: twice the longest reference answer in tokens + 16, at most 2048",
    )
    s.add_argument("--output", default=None, help="JSON file (default: eval_TASK_SPLIT.json)")
    s.add_argument("--force", action="store_true", help="replace --output if it exists")
    s.add_argument(
        "--unit-lexicon",
        default="auto",
        help="unit -> text mapper for text/speech "
        "consistency and TTS read-back: auto (the demo table where it reads the "
        "task's reference units back exactly), demo, none, or a JSON file "
        '{"silence": [0], "table": {"cat": [17], ...}}',
    )
    s.add_argument(
        "--language-id",
        default="script",
        help="off-target language identifier "
        "(cslm_jax.eval.metrics.LANGUAGE_IDS; default: script-based zh/en)",
    )
    a = s.add_argument_group(
        "audio (s2s and tts tasks: the answers synthesised as they are decoded and scored as "
        "speech; see README 'Evaluating speech')"
    )
    a.add_argument(
        "--token2wav",
        default=None,
        help="token2wav folder (import-token2wav output): synthesise every answer, keep the "
        "wavs in <output stem>_wavs/, measure time to first audio (interleaved and chain)",
    )
    a.add_argument(
        "--voice",
        default=None,
        help="with --token2wav: a voice of its voices.npz, or a .npy x-vector (192 floats)",
    )
    a.add_argument(
        "--speech-rate",
        type=float,
        default=None,
        help="with --token2wav: mean run length of merged units (default: the data config's "
        "format.speech_rate; 1.0 where its units are not merged)",
    )
    a.add_argument(
        "--asr",
        default=None,
        help="ASR of the audio: whisper:DIR (a Hugging Face Whisper folder, e.g. "
        "whisper-large-v3; needs torch + transformers) or module:callable[=ARG] (a factory "
        "returning an object with transcribe(waves, rate, language)); TTS: WER/CER vs the "
        "input text; s2s: consistency with the text answer and error vs the reference",
    )
    a.add_argument(
        "--mos",
        default=None,
        help="MOS predictor module:function, a callable on (wave, rate) -> float (e.g. "
        "UTMOS22; see cslm_jax/eval/mos.py)",
    )
    j = s.add_argument_group("LLM judge (s2s tasks)")
    j.add_argument(
        "--judge-url",
        default=None,
        help="OpenAI-compatible chat endpoint (root, /v1 or /v1/chat/completions); the key, "
        "if any, from $CSLM_JUDGE_API_KEY",
    )
    j.add_argument("--judge-model", default=None, help="model name the endpoint serves")
    j.add_argument(
        "--judge-prompt",
        default=None,
        help="prompt template file with {question} {answer} {reference} {lo} {hi} "
        "(default: cslm_jax.eval.judge.DEFAULT_PROMPT)",
    )
    j.add_argument("--judge-scale", default="1-10", help="score scale LO-HI (default 1-10)")
    j.add_argument(
        "--judge-concurrency", type=int, default=4, help="requests in flight at most (default 4)"
    )
    j.add_argument(
        "--judge-cache",
        default=None,
        help="JSON-lines cache of scored prompts (default: <output stem>_judge_cache.jsonl); "
        "a rerun sends no request for a prompt it holds",
    )
    s.add_argument(
        "--tensor",
        type=int,
        default=None,
        metavar="N",
        help="split the weights and the KV cache over N devices of this host (as decode --tensor)",
    )
    s.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. data.config=runs/demo_data/data.yaml",
    )
    return s


def run(args) -> int:
    from cslm_jax.eval.run import evaluate_task

    evaluate_task(
        config=args.config,
        task=args.task,
        ckpt=args.ckpt,
        split=args.split,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        output=args.output,
        unit_lexicon=args.unit_lexicon,
        language_id_name=args.language_id,
        overrides=args.overrides,
        force=args.force,
        tensor=args.tensor,
        token2wav=args.token2wav,
        voice=args.voice,
        speech_rate=args.speech_rate,
        asr=args.asr,
        mos=args.mos,
        judge_url=args.judge_url,
        judge_model=args.judge_model,
        judge_prompt=args.judge_prompt,
        judge_scale=args.judge_scale,
        judge_concurrency=args.judge_concurrency,
        judge_cache=args.judge_cache,
        log=lambda msg: print(msg, flush=True),
    )
    return 0
