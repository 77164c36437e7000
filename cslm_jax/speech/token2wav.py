"""Token-to-waveform folders and one-utterance synthesis (issue 25): speech units -> CosyVoice's
flow (v1 `cslm_jax.speech.flow`, v2 `cslm_jax.speech.causal_flow`: units -> 80-bin mel) -> its
HiFT vocoder (`cslm_jax.speech.hift`: mel -> waveform at 22,050 Hz for v1, 24,000 Hz for v2).

A token2wav folder (written by `cslm-jax import-token2wav` or `save_random_token2wav`, atomically)
holds
- `token2wav.json`: format, format version, model version, sample rate, units per second, mel
  frames per second, and the flow's and HiFT's configs (every `FlowConfig` / `CausalFlowConfig`
  / `HiFTConfig` field);
- `flow.safetensors`, `hift.safetensors`: the parameters in our naming (the flat dicts of
  `flow.py` / `hift.py`, float32);
- `voices.npz`: speaker name -> its 192-d x-vector (float32), e.g. from upstream's
  `spk2info.pt`; `save_random_token2wav` stores one random voice named `random`;
- optionally `campplus.onnx`: CosyVoice's CAM++ speaker model (`import-token2wav --campplus`),
  which turns a prompt recording into an x-vector (`voice(t2w, "prompt.wav")`,
  `cslm_jax.speech.campplus`).

No JAX at import: `load_token2wav` reads files only; `synthesize` compiles the models (once per
unit count and mel length).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np

from cslm_jax.speech.hift import Token2WavError

FORMAT = "cslm_jax.token2wav"
FORMAT_VERSION = 1
CONFIG_FILE = "token2wav.json"
FLOW_FILE = "flow.safetensors"
HIFT_FILE = "hift.safetensors"
VOICES_FILE = "voices.npz"
CAMPPLUS_FILE = "campplus.onnx"  # optional: prompt-wav voices
FILES = (CONFIG_FILE, FLOW_FILE, HIFT_FILE, VOICES_FILE)
VERSIONS = ("v1", "v2")
TOOL = "import-token2wav"

# `save_random_token2wav`'s default reduced sizes (tests, the demo); any may be overridden. The
# estimator keeps the official 8 heads (of 4): its head count is not in upstream's tensors, so
# import-token2wav assumes 8, and a random folder exported to flow.pt imports back the same.
SMALL_FLOW = dict(
    input_size=32,
    encoder_size=64,
    encoder_heads=2,
    encoder_linear_units=128,
    encoder_blocks=2,
    channels=(32, 32),
    attention_head_dim=4,
    n_blocks=1,
    num_mid_blocks=2,
    num_heads=8,
)
SMALL_HIFT = dict(base_channels=32, cond_channels=16)
# v2: upstream's encoder hard-codes its width (512), look-ahead, upsampling and 4 blocks after
# it; the rest reduced (8 estimator heads, as for v1).
SMALL_FLOW_V2 = dict(
    encoder_linear_units=64,
    encoder_blocks=1,
    channels=(32,),
    attention_head_dim=4,
    n_blocks=1,
    num_mid_blocks=1,
    num_heads=8,
)


def _flow_api(version: str):
    """(config class, module) of the version's flow: v1 `flow.FlowConfig`, v2
    `causal_flow.CausalFlowConfig`."""
    if version == "v2":
        from cslm_jax.speech import causal_flow as m

        return m.CausalFlowConfig, m
    from cslm_jax.speech import flow as m

    return m.FlowConfig, m


@dataclasses.dataclass
class Token2Wav:
    """A loaded token2wav folder."""

    version: str
    flow_cfg: object  # FlowConfig (v1) or CausalFlowConfig (v2)
    flow_params: dict
    hift_cfg: object  # HiFTConfig
    hift_params: dict
    voices: dict  # name -> [192] float32
    path: Path | None = None
    campplus: Path | None = None  # the folder's campplus.onnx, where it has one

    @property
    def sample_rate(self) -> int:
        return int(self.hift_cfg.sampling_rate)

    @property
    def units_per_second(self) -> int:
        return int(self.flow_cfg.input_frame_rate)

    @property
    def samples_per_frame(self) -> int:
        return int(self.hift_cfg.samples_per_frame)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A zero-shot prompt, as CosyVoice's frontend makes one from a recording
    (`frontend_zero_shot`): its speech units (`units [Np]`, the flow's vocabulary) and its mel
    (`mel [Mp, 80]`, frames first, the flow's own mel: `cslm_jax.speech.prompt`). The flow
    continues from them (the prompt's frames are its condition; only the answer's frames are
    returned). v2 takes 2 frames per unit (`Mp == 2 Np`, as upstream's frontend truncates)."""

    units: np.ndarray
    mel: np.ndarray


def check_prompt(t2w: Token2Wav, prompt) -> Prompt | None:
    """`prompt` (a `Prompt`, a (units, mel) pair, or None) checked against the folder's flow."""
    from cslm_jax.speech.flow import check_utterance

    if prompt is None:
        return None
    if not isinstance(prompt, Prompt):
        try:
            units, mel = prompt
        except (TypeError, ValueError):
            raise Token2WavError(
                "zero-shot prompt: give a Prompt or a (units, mel [frames, 80]) pair"
            ) from None
        prompt = Prompt(units, mel)
    dim = t2w.flow_cfg.spk_embed_dim
    try:
        _, pu, pm, _ = check_utterance(
            t2w.flow_cfg, [0], np.zeros(dim, np.float32), prompt.units, prompt.mel
        )
    except Token2WavError as e:
        msg = str(e)
        raise Token2WavError(
            msg if msg.startswith("zero-shot prompt") else f"zero-shot prompt: {msg}"
        ) from None
    if not len(pu):
        raise Token2WavError("zero-shot prompt: no units (give None for no prompt)")
    if t2w.version == "v2" and len(pm) != 2 * len(pu):
        raise Token2WavError(
            f"zero-shot prompt: {len(pu)} units and {len(pm)} mel frames; v2's flow takes 2 "
            f"frames per unit (upstream's frontend cuts both to fit)"
        )
    return Prompt(pu.astype(np.int32), pm)


def _check_version(version: str, where: str = "version") -> None:
    if version not in VERSIONS:
        raise Token2WavError(
            f"{where}: token2wav version {version!r} is not supported; ported: "
            f"{', '.join(VERSIONS)}"
        )


def _check_voice(name, vec, dim: int, where: str) -> np.ndarray:
    v = np.asarray(vec, np.float32)
    if v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    if v.shape != (dim,):
        raise Token2WavError(
            f"{where}: voice {name!r} has shape {tuple(np.shape(vec))}, expected a {dim}-d x-vector"
        )
    if not np.isfinite(v).all():
        raise Token2WavError(f"{where}: voice {name!r} holds non-finite values")
    return v


def save_token2wav(
    out,
    flow_cfg,
    flow_params: dict,
    hift_cfg,
    hift_params: dict,
    voices: dict,
    force: bool = False,
    campplus=None,
) -> Path:
    """Write a token2wav folder atomically (a temporary sibling renamed into place); refuses a
    non-empty `out` unless `force` and it is an earlier import-token2wav output. `campplus`: a
    CAM++ speaker model (CosyVoice's `campplus.onnx`) to copy in, checked
    (`campplus.check_campplus`), for prompt-wav voices."""
    from safetensors.numpy import save_file

    from cslm_jax.speech import hift as _hift
    from cslm_jax.storage.checkpoint import atomic_dir

    _check_version(flow_cfg.version, "flow")
    if hift_cfg.version != flow_cfg.version:
        raise Token2WavError(
            f"flow is {flow_cfg.version}, HiFT is {hift_cfg.version}; give "
            f"the two models of one version"
        )
    _flow_api(flow_cfg.version)[1].check_params(flow_cfg, flow_params, "flow")
    _hift.check_params(hift_cfg, hift_params, "HiFT")
    if not voices:
        raise Token2WavError("no voices: a token2wav folder needs at least one x-vector")
    vs = {str(k): _check_voice(k, v, flow_cfg.spk_embed_dim, "voices") for k, v in voices.items()}
    if campplus is not None:
        from cslm_jax.speech.campplus import check_campplus

        if not Path(campplus).is_file():
            raise Token2WavError(f"{campplus}: no such speaker model (campplus.onnx)")
        check_campplus(campplus, flow_cfg.spk_embed_dim)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": flow_cfg.version,
        "sample_rate": int(hift_cfg.sampling_rate),
        "units_per_second": int(flow_cfg.input_frame_rate),
        "samples_per_frame": int(hift_cfg.samples_per_frame),
        "flow": dataclasses.asdict(flow_cfg),
        "hift": dataclasses.asdict(hift_cfg),
        "voices": sorted(vs),
    }

    def arrays(params):
        return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in params.items()}

    out = Path(out)
    with atomic_dir(out, force=force, tool=TOOL) as tmp:
        save_file(arrays(flow_params), str(tmp / FLOW_FILE), metadata={"format": FORMAT})
        save_file(arrays(hift_params), str(tmp / HIFT_FILE), metadata={"format": FORMAT})
        with open(tmp / VOICES_FILE, "wb") as f:
            np.savez(f, **vs)
        if campplus is not None:
            (tmp / CAMPPLUS_FILE).write_bytes(Path(campplus).read_bytes())
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def save_random_token2wav(
    out, version: str = "v1", seed: int = 0, force: bool = False, campplus: bool = False, **sizes
) -> Path:
    """A random-weight token2wav folder (tests, the demo) at reduced sizes (`SMALL_FLOW`,
    `SMALL_HIFT`; v2 `SMALL_FLOW_V2`); `sizes` override fields of the flow's config or
    `HiFTConfig` (each name goes to the config that has it), plus one random voice named
    `random`; with `campplus`, a random ONNX graph of CAM++'s interface as its speaker model
    (`campplus.save_random_campplus`). Random weights give noise, not speech."""
    from cslm_jax.speech import hift as _hift

    _check_version(version)
    flow_config, _flow = _flow_api(version)
    flow_fields = {f.name for f in dataclasses.fields(flow_config)} - {"version"}
    hift_fields = {f.name for f in dataclasses.fields(_hift.HiFTConfig)} - {"version"}
    fs, hs = dict(SMALL_FLOW_V2 if version == "v2" else SMALL_FLOW), dict(SMALL_HIFT)
    for k, v in sizes.items():
        if k in flow_fields:
            fs[k] = v
        elif k in hift_fields:
            hs[k] = v
        else:
            raise Token2WavError(f"unknown size {k!r}: neither a FlowConfig nor a HiFTConfig field")
    fcfg, fparams = _flow.init_random(version, seed, **fs)
    hcfg, hparams = _hift.init_random(version, seed + 1, **hs)
    rng = np.random.default_rng(seed + 2)
    voices = {"random": rng.standard_normal(fcfg.spk_embed_dim).astype(np.float32)}
    if not campplus:
        return save_token2wav(out, fcfg, fparams, hcfg, hparams, voices, force=force)
    import tempfile

    from cslm_jax.speech.campplus import save_random_campplus

    with tempfile.TemporaryDirectory() as d:
        model = save_random_campplus(Path(d) / CAMPPLUS_FILE, seed + 3)
        return save_token2wav(
            out, fcfg, fparams, hcfg, hparams, voices, force=force, campplus=model
        )


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as e:
        raise Token2WavError(f"{path}: not a safetensors file ({e})") from None


def load_token2wav(path) -> Token2Wav:
    """A token2wav folder, checked: every file present, the JSON's format and version, every
    tensor present with its shape, every voice a x-vector of the flow's size."""
    from cslm_jax.speech import hift as _hift

    path = Path(path)
    hint = "make one with cslm-jax import-token2wav"
    if not path.is_dir():
        raise Token2WavError(f"{path}: no such token2wav folder ({hint})")
    for name in FILES:
        if not (path / name).is_file():
            raise Token2WavError(f"{path}: missing {name}; not a token2wav folder ({hint})")
    cfile = path / CONFIG_FILE
    try:
        meta = json.loads(cfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Token2WavError(f"{cfile}: not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise Token2WavError(f"{cfile}: field format is {got!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise Token2WavError(
            f"{cfile}: format_version {meta.get('format_version')!r}, this "
            f"cslm_jax reads {FORMAT_VERSION}"
        )
    version = meta.get("version")
    _check_version(version, str(cfile))
    flow_config, _flow = _flow_api(version)
    try:
        fcfg = flow_config(**{**meta["flow"], "version": version})
        hcfg = _hift.HiFTConfig(**{**meta["hift"], "version": version})
    except KeyError as e:
        raise Token2WavError(f"{cfile}: missing field {e.args[0]}") from None
    except TypeError as e:
        raise Token2WavError(f"{cfile}: a config field is not this cslm_jax's ({e})") from None
    except Token2WavError as e:
        raise Token2WavError(f"{cfile}: {e}") from None
    for field, want in (
        ("sample_rate", hcfg.sampling_rate),
        ("units_per_second", fcfg.input_frame_rate),
    ):
        if meta.get(field) != want:
            raise Token2WavError(
                f"{cfile}: field {field} is {meta.get(field)!r}, its configs give {want}"
            )
    fparams = _read_safetensors(path / FLOW_FILE)
    _flow.check_params(fcfg, fparams, str(path / FLOW_FILE))
    hparams = _read_safetensors(path / HIFT_FILE)
    _hift.check_params(hcfg, hparams, str(path / HIFT_FILE))
    vfile = path / VOICES_FILE
    try:
        with np.load(vfile, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise Token2WavError(f"{vfile}: not a voices .npz ({e})") from None
    if not raw:
        raise Token2WavError(f"{vfile}: holds no voices")
    voices = {k: _check_voice(k, v, fcfg.spk_embed_dim, str(vfile)) for k, v in raw.items()}
    cp = path / CAMPPLUS_FILE
    return Token2Wav(
        version, fcfg, fparams, hcfg, hparams, voices, path, cp if cp.is_file() else None
    )


def prompt_voice(t2w: Token2Wav, audio) -> np.ndarray:
    """The x-vector of a prompt recording (`audio`: a path `data.audio.load_audio` reads) by the
    folder's CAM++ speaker model, as CosyVoice's frontend computes a zero-shot speaker
    (`campplus.prompt_xvector`)."""
    from cslm_jax.speech.campplus import prompt_xvector

    if t2w.campplus is None:
        raise Token2WavError(
            f"voice {audio}: a prompt-wav voice needs CosyVoice's speaker model in the "
            f"token2wav folder {t2w.path or ''}: import it with import-token2wav --campplus "
            f"campplus.onnx (or give a voice name or a .npy x-vector)"
        )
    return _check_voice(
        str(audio),
        prompt_xvector(t2w.campplus, audio, t2w.flow_cfg.spk_embed_dim),
        t2w.flow_cfg.spk_embed_dim,
        f"voice {audio}",
    )


def voice(t2w: Token2Wav, v) -> np.ndarray:
    """The x-vector `[192]` for `v`: a voice name in the folder's voices.npz, a `.npy` file of
    192 floats (or [1, 192]), a prompt recording (any other existing file: a wav, flac, ...;
    its x-vector by the folder's campplus.onnx, `prompt_voice`), or an array."""
    dim = t2w.flow_cfg.spk_embed_dim
    if not isinstance(v, (str, Path)):
        return _check_voice("(array)", v, dim, "voice")
    s = str(v)
    if s in t2w.voices:
        return t2w.voices[s]
    if not s.endswith(".npy") and Path(s).is_file():
        return prompt_voice(t2w, s)
    if s.endswith(".npy"):
        p = Path(s)
        if not p.is_file():
            raise Token2WavError(f"voice {s}: no such file")
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise Token2WavError(f"voice {s}: not a .npy array ({e})") from None
        if np.shape(arr) not in ((dim,), (1, dim)):
            raise Token2WavError(
                f"voice {s}: holds an array of shape {tuple(np.shape(arr))}; a "
                f"voice is a {dim}-d x-vector ({dim} floats)"
            )
        return _check_voice(s, arr, dim, f"voice {s}")
    names = sorted(t2w.voices)
    shown = ", ".join(names[:20]) + (f" (and {len(names) - 20} more)" if len(names) > 20 else "")
    raise Token2WavError(
        f"voice {s!r}: not a voice of {t2w.path or 'this token2wav'} ({shown}), a .npy "
        f"file nor a prompt recording"
    )


def configured_rate(given: float | None, data_config) -> tuple[float, str]:
    """(speech rate, where it comes from): `given` (`--speech-rate`) where not None, else the
    data config's (`FormatConfig.synthesis_rate`: its `format.speech_rate`, or 1.0 with a
    warning). `synthesize`, `decode --speech-out` and `serve` take it from here."""
    from cslm_jax.data.formats import load_data_config  # cycle: data.formats -> speech

    if given is not None:
        return float(given), "--speech-rate"
    rate, why = load_data_config(data_config, check_files=False).format.synthesis_rate()
    return rate, f"{data_config}: {why}"


def mel_frames(n_units: int, speech_rate: float = 1.0, units_per_second: int = 50) -> int:
    """Mel frames for `n_units` units: upstream's `int(n / 50 * 22050 / 256)` with the count
    scaled by `speech_rate` (for merged units: the corpus's mean run length)."""
    return int(n_units * speech_rate / units_per_second * 22050 / 256)


def check_request(t2w: Token2Wav, units, speech_rate: float = 1.0) -> tuple[np.ndarray, int]:
    """(units as int32, mel frames), checked: ids in the flow's vocabulary, a usable length. v2's
    flow gives 2 frames per unit; `speech_rate` then resamples them (upstream's speed change,
    speed = 1 / speech_rate): `int(2 * n * speech_rate)` frames."""
    from cslm_jax.speech import flow as _flow

    if not (speech_rate > 0 and np.isfinite(speech_rate)):
        raise Token2WavError(f"speech rate {speech_rate}: must be a positive number")
    u = _flow.check_units(t2w.flow_cfg, np.asarray(units, np.int64))
    if t2w.version == "v2":
        m = int(t2w.flow_cfg.mel_len(len(u)) * speech_rate)
        if len(u) < 1 or m < 1:
            raise Token2WavError(
                f"{len(u)} units at speech rate {speech_rate}: no mel frames to synthesise"
            )
        return u, m
    m = mel_frames(len(u), speech_rate, t2w.units_per_second)
    _flow.check_lengths(t2w.flow_cfg, len(u), m)
    return u, m


def synthesize(
    t2w: Token2Wav,
    units,
    voice_vec,
    noise="zero",
    speech_rate: float = 1.0,
    precision: str = "highest",
    prompt=None,
) -> np.ndarray:
    """One utterance: `units` (ids) -> float32 waveform at `t2w.sample_rate`, of
    (mel frames, `check_request`) x `samples_per_frame` samples. `voice_vec`: an x-vector (see
    `voice`, which also takes names). `noise`: "zero" (deterministic) or a PRNG key (split
    between the flow's Gaussian start - v2: its noise buffer - and HiFT's source). `prompt`: an
    optional zero-shot `Prompt` (its units and mel condition the flow, as upstream's
    `inference_zero_shot`; the audio is the answer's alone)."""
    from cslm_jax.speech import causal_flow
    from cslm_jax.speech.flow import flow_inference
    from cslm_jax.speech.hift import vocode

    u, m = check_request(t2w, units, speech_rate)
    pr = check_prompt(t2w, prompt)
    pu, pm = (None, None) if pr is None else (pr.units, pr.mel)
    emb = (
        voice(t2w, voice_vec)
        if isinstance(voice_vec, (str, Path))
        else _check_voice("(array)", voice_vec, t2w.flow_cfg.spk_embed_dim, "voice")
    )
    if isinstance(noise, str):
        if noise != "zero":
            raise Token2WavError(f"noise {noise!r}: give 'zero' or a PRNG key")
        k_flow = k_hift = "zero"
    else:
        import jax

        k_flow, k_hift = jax.random.split(noise)
    if t2w.version == "v2":
        mel = causal_flow.causal_flow_inference(
            t2w.flow_params, t2w.flow_cfg, u, emb, pu, pm, noise=k_flow, precision=precision
        )
        if mel.shape[2] != m:
            mel = causal_flow.stretch(mel, m)
    else:
        mel = flow_inference(
            t2w.flow_params,
            t2w.flow_cfg,
            u,
            emb,
            pu,
            pm,
            noise=k_flow,
            mel_len=m,
            precision=precision,
        )  # [1, 80, M]
    wave, wave_len = vocode(
        t2w.hift_params, t2w.hift_cfg, mel, noise=k_hift, precision=precision
    )  # [1, M * R]
    return np.asarray(wave[0, : int(wave_len[0])], np.float32)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _jitted_row_draws(cfg, n: int):
    """HiFT's draws for a batch with one PRNG key per row: row i what `vocode` draws for a
    one-row mel with `keys[i]` (`hift.draw_noise(key, cfg, 1, n_i)`), drawn over the padded
    `n` samples (JAX's partitionable threefry: the row's own draws are the first samples)."""
    import jax

    from cslm_jax.speech.hift import draw_noise

    def run(keys):
        d = jax.vmap(lambda k: draw_noise(k, cfg, 1, n))(keys)
        return {"phase": d["phase"][:, 0], "noise": d["noise"][:, 0]}

    return jax.jit(run)


def _causal_flow_rows(
    t2w: Token2Wav, units, embs, noise, mel_lens, rows: int, precision: str, prompts=None
):
    """v2's flow for one batch (`causal_flow.causal_flow_batch`, not streamed, as `synthesize`
    runs it alone): each row's mel resampled to its frames (`mel_lens`, the speech rate's:
    `causal_flow.stretch`), padded to a multiple of `flow.FRAME_BUCKET` frames, so that HiFT's
    batches of nearby lengths share a program. Returns (mel [b, 80, F], mel_len [b])."""
    from cslm_jax.speech import causal_flow
    from cslm_jax.speech.flow import FRAME_BUCKET

    prompts = prompts or [None] * len(units)
    mel, lens = causal_flow.causal_flow_batch(
        t2w.flow_params,
        t2w.flow_cfg,
        units,
        embs,
        [None if p is None else p.units for p in prompts],
        [None if p is None else p.mel for p in prompts],
        noise=noise,
        rows=rows,
        precision=precision,
    )
    mel_lens = np.asarray(mel_lens, np.int32)
    width = -(-int(mel_lens.max()) // FRAME_BUCKET) * FRAME_BUCKET
    out = np.zeros((len(units), mel.shape[1], width), np.float32)
    for i, (got, want) in enumerate(zip(lens, mel_lens)):
        row = mel[i : i + 1, :, :got]
        out[i, :, :want] = row[0] if got == want else causal_flow.stretch(row, int(want))[0]
    return out, mel_lens


def synthesize_batch(
    t2w: Token2Wav,
    units_list,
    voice_vec,
    noise="zero",
    speech_rate=1.0,
    max_batch: int = 8,
    precision: str = "highest",
    prompt=None,
) -> list:
    """Many utterances -> a list of float32 waveforms (in the order given), row i what
    `synthesize(t2w, units_list[i], voice_i, noise_i, rate_i)` gives (float32 rounding aside):
    the flow batched (rows padded to buckets of units and frames, each row masked to its own
    length), then HiFT batched with each row's mel length. `voice_vec`: one
    voice (a name, a .npy, an x-vector) for every row, or a list with one per row;
    `speech_rate`: a number or a list. `noise`: "zero"; a PRNG key, row i then drawing from
    `jax.random.fold_in(key, i)` (so `synthesize_batch(t2w, us, v, key)[i] ==
    synthesize(t2w, us[i], v, jax.random.fold_in(key, i))`: a row's audio depends on neither its
    batch-mates nor the batch size; row 0 is not `synthesize(..., key)` itself); or a list of
    keys, one per row (`synthesize(..., keys[i])`). `prompt`: None, one zero-shot `Prompt` for
    every row, or a list (None entries for rows without one). Rows are sorted by length and cut into
    batches of at most `max_batch` (a smaller last batch padded to a power of two), so that
    little padding is computed and few programs compile. Errors name the row. v1's flow batched
    by `flow.flow_batch`, v2's causal flow by `causal_flow.causal_flow_batch` (each row then
    resampled to its speech rate's frames)."""
    import jax

    from cslm_jax.speech.flow import flow_batch
    from cslm_jax.speech.hift import vocode

    units_list = list(units_list)
    n = len(units_list)
    if max_batch < 1:
        raise Token2WavError(f"max_batch {max_batch}: must be >= 1")
    dim = t2w.flow_cfg.spk_embed_dim

    def per_row(x, what, listed):
        if not listed:
            return [x] * n
        if len(x) != n:
            raise Token2WavError(
                f"{what}: {len(x)} entries for {n} utterances; give one, or one per utterance"
            )
        return list(x)

    # a list of voices (names, files, x-vectors), not one x-vector given as a list of floats
    voices = per_row(
        voice_vec,
        "voices",
        isinstance(voice_vec, (list, tuple))
        and (not voice_vec or isinstance(voice_vec[0], (str, Path)) or np.ndim(voice_vec[0]) > 0),
    )
    rates = per_row(speech_rate, "speech rates", isinstance(speech_rate, (list, tuple)))
    prompts = per_row(prompt, "prompts", isinstance(prompt, list))
    if isinstance(noise, str):
        if noise != "zero":
            raise Token2WavError(f"noise {noise!r}: give 'zero', a PRNG key or one key per row")
        keys = [None] * n
    elif isinstance(noise, (list, tuple)):
        keys = per_row(noise, "noise keys", True)
        if any(k is None or isinstance(k, str) for k in keys):
            raise Token2WavError("noise keys: give a PRNG key for every row (or 'zero' for all)")
    else:
        keys = [jax.random.fold_in(noise, i) for i in range(n)]
    rows, named = [], {}  # named: each voice name / file resolved once (a recording's x-vector)
    for i in range(n):
        try:
            u, m = check_request(t2w, units_list[i], rates[i])
            prompts[i] = check_prompt(t2w, prompts[i])
            v = voices[i]
            if isinstance(v, (str, Path)):
                if str(v) not in named:
                    named[str(v)] = voice(t2w, v)
                emb = named[str(v)]
            else:
                emb = _check_voice("(array)", v, dim, "voice")
        except Token2WavError as e:
            raise Token2WavError(f"row {i}: {e}") from None
        rows.append((u, m, emb))
    order = sorted(range(n), key=lambda i: rows[i][1])
    out = [None] * n
    for start in range(0, n, max_batch):
        idx = order[start : start + max_batch]
        r = min(max_batch, _next_pow2(len(idx)))
        if keys[idx[0]] is None:
            k_flow, k_hift = "zero", None
        else:
            split = [jax.random.split(keys[i]) for i in idx]
            k_flow, k_hift = [s[0] for s in split], [s[1] for s in split]
        us, embs = [rows[i][0] for i in idx], np.stack([rows[i][2] for i in idx])
        mlens, prs = [rows[i][1] for i in idx], [prompts[i] for i in idx]
        if t2w.version == "v2":
            mel, mel_len = _causal_flow_rows(t2w, us, embs, k_flow, mlens, r, precision, prs)
        else:
            mel, mel_len = flow_batch(
                t2w.flow_params,
                t2w.flow_cfg,
                us,
                embs,
                [None if p is None else p.units for p in prs],
                [None if p is None else p.mel for p in prs],
                noise=k_flow,
                mel_lens=mlens,
                rows=r,
                precision=precision,
            )  # [b, 80, F], each from 0
        pad = r - len(idx)  # HiFT's rows: as the flow's
        mel = np.concatenate([mel, np.repeat(mel[:1], pad, 0)])
        mel_len = np.concatenate([mel_len, np.repeat(mel_len[:1], pad)])
        hift_noise = "zero"
        if k_hift is not None:
            import jax.numpy as jnp

            hift_noise = _jitted_row_draws(t2w.hift_cfg, mel.shape[2] * t2w.samples_per_frame)(
                jnp.stack([jnp.asarray(k) for k in k_hift + k_hift[:1] * pad])
            )
        wave, wave_len = vocode(
            t2w.hift_params, t2w.hift_cfg, mel, mel_len, noise=hift_noise, precision=precision
        )
        for j, i in enumerate(idx):
            out[i] = np.asarray(wave[j, : int(wave_len[j])], np.float32)
    return out


__all__ = [
    "FILES",
    "FORMAT",
    "VERSIONS",
    "Prompt",
    "Token2Wav",
    "check_prompt",
    "check_request",
    "load_token2wav",
    "mel_frames",
    "prompt_voice",
    "save_random_token2wav",
    "save_token2wav",
    "synthesize",
    "synthesize_batch",
    "voice",
]
