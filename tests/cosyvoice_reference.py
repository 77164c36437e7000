"""Upstream CosyVoice as the reference for cslm_jax's token-to-waveform (the flow model and the
HiFT vocoder), and helpers shared by those tests.

Upstream's code comes from the wheel `cosyvoice-minicpmo==0.1.0`, which holds CosyVoice's
`cosyvoice/` and `matcha/` trees (installed --no-deps: requirements-nodeps.txt, beside diffusers,
conformer and omegaconf). Three stand-ins are put in place before anything of it is imported:

- `torchaudio`: an empty module with a `ModuleSpec` (`cosyvoice.utils.file_utils`, which
  `cosyvoice.cli.model` imports, imports it to read audio files; torchaudio itself would pull a
  second torch build). Without a spec, `importlib.util.find_spec("torchaudio")` (which
  transformers calls while importing) raises ValueError. Nothing of it is ever called (a call
  fails with AttributeError); it leaves sys.modules once the imports are done, and transformers'
  cached answer to "is torchaudio installed" is taken before it exists.
- `matcha.utils`: the package without its `__init__`, which imports hydra and lightning (for
  training); its submodules import from its folder as usual.
- `matcha.utils.pylogger`: `get_pylogger` returning a plain `logging` logger (the original wraps
  the logger with lightning's rank-zero decorator).

Upstream's sources are read, never changed. Its random draws (HiFT's source: initial phases and
noise; the flow's starting noise) are recorded by `recorded_draws` so the same arrays can be
given to cslm_jax.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import logging
import sys
import types

import numpy as np


def _install_stand_ins() -> list[str]:
    added = []
    # transformers caches whether torchaudio is installed on the first ask: ask before the
    # stand-in exists, so that later users of transformers in this process see the truth.
    from transformers.utils.import_utils import is_torchaudio_available

    is_torchaudio_available()
    if "torchaudio" not in sys.modules and importlib.util.find_spec("torchaudio") is None:
        m = types.ModuleType("torchaudio")
        m.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = m
        added.append("torchaudio")
    if "matcha.utils" not in sys.modules:
        spec = importlib.util.find_spec("matcha")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "the package `matcha` (from cosyvoice-minicpmo==0.1.0, installed "
                "with `pip install --no-deps -r requirements-nodeps.txt`) is missing"
            )
        folder = list(spec.submodule_search_locations)[0] + "/utils"
        pkg = types.ModuleType("matcha.utils")
        pkg.__path__ = [folder]
        pkg.__spec__ = importlib.machinery.ModuleSpec("matcha.utils", None, is_package=True)
        pkg.__spec__.submodule_search_locations = [folder]
        sys.modules["matcha.utils"] = pkg
        pylogger = types.ModuleType("matcha.utils.pylogger")
        pylogger.__spec__ = importlib.machinery.ModuleSpec("matcha.utils.pylogger", None)
        pylogger.get_pylogger = lambda name=__name__: logging.getLogger(name)
        pkg.pylogger = pylogger
        sys.modules["matcha.utils.pylogger"] = pylogger
    return added


_ADDED = _install_stand_ins()
# cosyvoice.utils.file_utils calls logging.basicConfig(level=DEBUG) on import: the root logger's
# level and handlers are put back after the imports.
_ROOT = logging.getLogger()
_ROOT_STATE = (_ROOT.level, list(_ROOT.handlers))

import torch  # noqa: E402

# The flow's classes and the streaming driver, for the flow's tests (imported here, while the
# stand-ins are in place: cosyvoice.utils.class_utils imports the LLM, which imports file_utils).
from cosyvoice.cli.model import CosyVoice2Model, CosyVoiceModel  # noqa: E402,F401
from cosyvoice.flow.decoder import CausalConditionalDecoder, ConditionalDecoder  # noqa: E402,F401
from cosyvoice.flow.flow import CausalMaskedDiffWithXvec, MaskedDiffWithXvec  # noqa: E402,F401
from cosyvoice.flow.flow_matching import CausalConditionalCFM, ConditionalCFM  # noqa: E402,F401
from cosyvoice.flow.length_regulator import InterpolateRegulator  # noqa: E402,F401
from cosyvoice.hifigan.f0_predictor import ConvRNNF0Predictor  # noqa: E402
from cosyvoice.hifigan.generator import HiFTGenerator  # noqa: E402
from cosyvoice.transformer.encoder import ConformerEncoder  # noqa: E402,F401
from cosyvoice.transformer.upsample_encoder import UpsampleConformerEncoder  # noqa: E402,F401

for _name in _ADDED:  # the modules that imported it keep their reference to the stand-in
    del sys.modules[_name]
_ROOT.setLevel(_ROOT_STATE[0])
_ROOT.handlers[:] = _ROOT_STATE[1]

# HiFTGenerator's arguments in the official cosyvoice.yaml (v1, CosyVoice-300M) and
# cosyvoice2.yaml (v2, CosyVoice2-0.5B); the F0 predictor is ConvRNNF0Predictor(1, 80, 512).
HIFT_YAML = {
    "v1": dict(
        in_channels=80,
        base_channels=512,
        nb_harmonics=8,
        sampling_rate=22050,
        nsf_alpha=0.1,
        nsf_sigma=0.003,
        nsf_voiced_threshold=10,
        upsample_rates=[8, 8],
        upsample_kernel_sizes=[16, 16],
        istft_params={"n_fft": 16, "hop_len": 4},
        resblock_kernel_sizes=[3, 7, 11],
        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        source_resblock_kernel_sizes=[7, 11],
        source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        lrelu_slope=0.1,
        audio_limit=0.99,
    ),
    "v2": dict(
        in_channels=80,
        base_channels=512,
        nb_harmonics=8,
        sampling_rate=24000,
        nsf_alpha=0.1,
        nsf_sigma=0.003,
        nsf_voiced_threshold=10,
        upsample_rates=[8, 5, 3],
        upsample_kernel_sizes=[16, 11, 7],
        istft_params={"n_fft": 16, "hop_len": 4},
        resblock_kernel_sizes=[3, 7, 11],
        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        source_resblock_kernel_sizes=[7, 7, 11],
        source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        lrelu_slope=0.1,
        audio_limit=0.99,
    ),
}


def hift_reference(cfg, state_dict=None):
    """Upstream's HiFTGenerator (with ConvRNNF0Predictor) of `cfg`'s sizes (a
    `cslm_jax.speech.hift.HiFTConfig`), loaded strictly with `state_dict` (upstream names, numpy
    or torch tensors, any weight-norm layout torch reads), in eval mode."""
    f0 = ConvRNNF0Predictor(
        num_class=1, in_channels=cfg.in_channels, cond_channels=cfg.cond_channels
    )
    model = HiFTGenerator(
        in_channels=cfg.in_channels,
        base_channels=cfg.base_channels,
        nb_harmonics=cfg.nb_harmonics,
        sampling_rate=cfg.sampling_rate,
        nsf_alpha=cfg.nsf_alpha,
        nsf_sigma=cfg.nsf_sigma,
        nsf_voiced_threshold=cfg.nsf_voiced_threshold,
        upsample_rates=list(cfg.upsample_rates),
        upsample_kernel_sizes=list(cfg.upsample_kernel_sizes),
        istft_params={"n_fft": cfg.n_fft, "hop_len": cfg.hop_len},
        resblock_kernel_sizes=list(cfg.resblock_kernel_sizes),
        resblock_dilation_sizes=[list(d) for d in cfg.resblock_dilation_sizes],
        source_resblock_kernel_sizes=list(cfg.source_resblock_kernel_sizes),
        source_resblock_dilation_sizes=[list(d) for d in cfg.source_resblock_dilation_sizes],
        lrelu_slope=cfg.lrelu_slope,
        audio_limit=cfg.audio_limit,
        f0_predictor=f0,
    )
    if state_dict is not None:
        model.load_state_dict(
            {k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}, strict=True
        )
    return model.eval()


@contextlib.contextmanager
def recorded_draws():
    """Record upstream's random draws while the block runs: a list of (what, array) in the
    order drawn, `what` one of `rand`, `randn`, `randn_like`, `uniform` (a
    `torch.distributions.Uniform(...).sample`, which also records the `rand` it makes first).
    HiFT's source draws, per call: v1 `uniform` [B, H, 1] (initial phases; upstream then zeroes
    the fundamental's), `randn_like` [B, H, N] (the noise), `randn_like` [B, N, 1] (unused);
    v2 `rand` [B, H] (rand_ini), `randn_like` [B, N, H], `randn_like` [B, N, 1] (unused)."""
    from torch.distributions.uniform import Uniform

    log = []
    saved = {name: getattr(torch, name) for name in ("rand", "randn", "randn_like")}
    sample = Uniform.sample

    def wrap(name, fn):
        def draw(*args, **kwargs):
            out = fn(*args, **kwargs)
            log.append((name, out.detach().clone().numpy()))
            return out

        return draw

    try:
        for name, fn in saved.items():
            setattr(torch, name, wrap(name, fn))
        Uniform.sample = wrap("uniform", sample)
        yield log
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        Uniform.sample = sample


def hift_noise(cfg, draws) -> dict:
    """cslm_jax's HiFT noise arrays (`{"phase": [B, H], "noise": [B, N, H]}`) from the draws
    `recorded_draws` logged for one `inference` call."""
    if cfg.source_kind == "sine":
        phase = next(a for what, a in draws if what == "uniform")[..., 0]
        noise = [a for what, a in draws if what == "randn_like"][0].transpose(0, 2, 1)
    else:
        phase = next(a for what, a in draws if what == "rand")
        noise = [a for what, a in draws if what == "randn_like"][0]
    return {
        "phase": np.ascontiguousarray(phase, np.float32),
        "noise": np.ascontiguousarray(noise, np.float32),
    }


def run_hift(model, mel, cache_source=None, seed=0):
    """Upstream's `inference(speech_feat=mel)` (one utterance or a batch of equal lengths) with
    torch's generator seeded: (waveform [B, N], source [B, N], the draws it made)."""
    torch.manual_seed(seed)
    with recorded_draws() as draws, torch.inference_mode():
        kw = {} if cache_source is None else {"cache_source": torch.as_tensor(cache_source)}
        wave, s = model.inference(speech_feat=torch.as_tensor(np.asarray(mel, np.float32)), **kw)
    return wave.numpy(), s[:, 0].numpy(), list(draws)


# MaskedDiffWithXvec's arguments in the official cosyvoice.yaml (v1, CosyVoice-300M). The wheel
# ships no yaml; the values are the yaml's (flow: input_size 512, output_size 80, spk_embed_dim
# 192, output_type mel, vocab_size 4096, input_frame_rate 50, only_mask_loss True), and they agree
# with MaskedDiffWithXvec's defaults (decoder_conf, mel_feat_conf) and with issue 25 (6 blocks,
# 512 wide, 8 heads, FFN 2048, relative positions, no conv module; 4 regulator convs; channels
# [256, 256], 12 mid blocks, cosine schedule, guidance 0.7; 104.87M parameters).
FLOW_YAML = {
    "v1": dict(
        flow=dict(
            input_size=512,
            output_size=80,
            spk_embed_dim=192,
            output_type="mel",
            vocab_size=4096,
            input_frame_rate=50,
            only_mask_loss=True,
        ),
        # cosyvoice.transformer.encoder.ConformerEncoder (the yaml's encoder block);
        # activation_type is left at its default (swish), as the yaml does
        encoder=dict(
            output_size=512,
            attention_heads=8,
            linear_units=2048,
            num_blocks=6,
            dropout_rate=0.1,
            positional_dropout_rate=0.1,
            attention_dropout_rate=0.1,
            normalize_before=True,
            input_layer="linear",
            pos_enc_layer_type="rel_pos_espnet",
            selfattention_layer_type="rel_selfattn",
            input_size=512,
            use_cnn_module=False,
            macaron_style=False,
        ),
        # cosyvoice.flow.length_regulator.InterpolateRegulator
        length_regulator=dict(channels=80, sampling_ratios=[1, 1, 1, 1]),
        # cosyvoice.flow.flow_matching.ConditionalCFM (cfm_params as MaskedDiffWithXvec's
        # default decoder_conf)
        decoder=dict(
            in_channels=240,
            n_spks=1,
            spk_emb_dim=80,
            cfm_params=dict(
                sigma_min=1e-06,
                solver="euler",
                t_scheduler="cosine",
                training_cfg_rate=0.2,
                inference_cfg_rate=0.7,
                reg_loss_type="l1",
            ),
        ),
        # cosyvoice.flow.decoder.ConditionalDecoder (decoder_params of the default decoder_conf)
        estimator=dict(
            in_channels=320,
            out_channels=80,
            channels=[256, 256],
            dropout=0.0,
            attention_head_dim=64,
            n_blocks=4,
            num_mid_blocks=12,
            num_heads=8,
            act_fn="gelu",
        ),
    ),
}


def flow_yaml_of(cfg) -> dict:
    """FLOW_YAML's structure with the sizes of `cfg` (a `cslm_jax.speech.flow.FlowConfig`)."""
    y = FLOW_YAML[cfg.version]
    return dict(
        flow=dict(
            y["flow"],
            input_size=cfg.input_size,
            output_size=cfg.output_size,
            spk_embed_dim=cfg.spk_embed_dim,
            vocab_size=cfg.vocab_size,
            input_frame_rate=cfg.input_frame_rate,
        ),
        encoder=dict(
            y["encoder"],
            output_size=cfg.encoder_size,
            attention_heads=cfg.encoder_heads,
            linear_units=cfg.encoder_linear_units,
            num_blocks=cfg.encoder_blocks,
            input_size=cfg.input_size,
        ),
        length_regulator=dict(channels=cfg.output_size, sampling_ratios=[1] * cfg.regulator_layers),
        decoder=dict(
            y["decoder"],
            in_channels=3 * cfg.output_size,
            spk_emb_dim=cfg.output_size,
            cfm_params=dict(y["decoder"]["cfm_params"], inference_cfg_rate=cfg.cfg_rate),
        ),
        estimator=dict(
            y["estimator"],
            in_channels=cfg.estimator_in,
            out_channels=cfg.output_size,
            channels=list(cfg.channels),
            attention_head_dim=cfg.attention_head_dim,
            n_blocks=cfg.n_blocks,
            num_mid_blocks=cfg.num_mid_blocks,
            num_heads=cfg.num_heads,
        ),
    )


def flow_reference(cfg, state_dict=None):
    """Upstream's MaskedDiffWithXvec of `cfg`'s sizes, built as cosyvoice.yaml builds it, loaded
    strictly with `state_dict` (upstream names), in eval mode."""
    from omegaconf import DictConfig

    y = flow_yaml_of(cfg)
    estimator = ConditionalDecoder(**y["estimator"])
    cfm = dict(y["decoder"], cfm_params=DictConfig(y["decoder"]["cfm_params"]))
    decoder = ConditionalCFM(**cfm, estimator=estimator)
    model = MaskedDiffWithXvec(
        **y["flow"],
        encoder=ConformerEncoder(**y["encoder"]),
        length_regulator=InterpolateRegulator(**y["length_regulator"]),
        decoder=decoder,
    )
    if state_dict is not None:
        model.load_state_dict(
            {k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}, strict=True
        )
    return model.eval()


def run_flow(model, units, embedding, prompt_units=None, prompt_mel=None, seed=0):
    """Upstream's `inference` for one utterance (units [N], x-vector [192], optional prompt
    units [Np] and mel [Mp, 80]) with torch's generator seeded: (mel [1, 80, M], the starting
    noise in cslm_jax's layout [1, Mp + M, 80], the encoder's projected output [1, Np + N, 80],
    mu [1, Mp + M, 80])."""
    torch.manual_seed(seed)
    tok = torch.as_tensor(np.asarray(units, np.int64))[None]
    pu = (
        torch.zeros((1, 0), dtype=torch.int64)
        if prompt_units is None
        else torch.as_tensor(np.asarray(prompt_units, np.int64))[None]
    )
    pm = (
        torch.zeros((1, 0, 80))
        if prompt_mel is None
        else torch.as_tensor(np.asarray(prompt_mel, np.float32))[None]
    )
    seen = {}
    h1 = model.encoder_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    h2 = model.length_regulator.model.register_forward_hook(
        lambda m, i, o: seen.__setitem__("mu", o)
    )
    try:
        with recorded_draws() as draws, torch.inference_mode():
            mel, _ = model.inference(
                token=tok,
                token_len=torch.tensor([tok.shape[1]]),
                prompt_token=pu,
                prompt_token_len=torch.tensor([pu.shape[1]]),
                prompt_feat=pm,
                prompt_feat_len=torch.tensor([pm.shape[1]]),
                embedding=torch.as_tensor(np.asarray(embedding, np.float32))[None],
                flow_cache=torch.zeros(1, 80, 0, 2),
            )
    finally:
        h1.remove()
        h2.remove()
    z = [a for what, a in draws if what == "randn_like"]
    assert len(z) == 1, [what for what, _ in draws]
    return (
        mel.numpy(),
        z[0].transpose(0, 2, 1).copy(),
        seen["h"].numpy(),
        seen["mu"].transpose(1, 2).numpy(),
    )


# CausalMaskedDiffWithXvec's arguments in the official cosyvoice2.yaml (v2, CosyVoice2-0.5B). The
# wheel ships no yaml; these are the yaml's values (globals token_frame_rate 25, token_mel_ratio 2,
# chunk_size 25, num_decoding_left_chunks -1, spk_embed_dim 192), as recalled and cross-checked
# against a public port's table of that yaml's values; they agree with the classes' defaults
# where the yaml leaves them (CausalMaskedDiffWithXvec: token_mel_ratio 2, pre_lookahead_len 3)
# and with the constants UpsampleConformerEncoder hard-codes (512 channels, a 3-unit look-ahead,
# x2 upsampling, 4 blocks after it).
FLOW_V2_YAML = {
    "v2": dict(
        flow=dict(
            input_size=512,
            output_size=80,
            spk_embed_dim=192,
            output_type="mel",
            vocab_size=6561,
            input_frame_rate=25,
            only_mask_loss=True,
            token_mel_ratio=2,
            pre_lookahead_len=3,
        ),
        # cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        encoder=dict(
            output_size=512,
            attention_heads=8,
            linear_units=2048,
            num_blocks=6,
            dropout_rate=0.1,
            positional_dropout_rate=0.1,
            attention_dropout_rate=0.1,
            normalize_before=True,
            input_layer="linear",
            pos_enc_layer_type="rel_pos_espnet",
            selfattention_layer_type="rel_selfattn",
            input_size=512,
            use_cnn_module=False,
            macaron_style=False,
            static_chunk_size=25,
        ),
        # cosyvoice.flow.flow_matching.CausalConditionalCFM
        decoder=dict(
            in_channels=240,
            n_spks=1,
            spk_emb_dim=80,
            cfm_params=dict(
                sigma_min=1e-06,
                solver="euler",
                t_scheduler="cosine",
                training_cfg_rate=0.2,
                inference_cfg_rate=0.7,
                reg_loss_type="l1",
            ),
        ),
        # cosyvoice.flow.decoder.CausalConditionalDecoder (static_chunk_size: chunk_size *
        # token_mel_ratio)
        estimator=dict(
            in_channels=320,
            out_channels=80,
            channels=[256],
            dropout=0.0,
            attention_head_dim=64,
            n_blocks=4,
            num_mid_blocks=12,
            num_heads=8,
            act_fn="gelu",
            static_chunk_size=50,
            num_decoding_left_chunks=-1,
        ),
    ),
}


def flow_v2_yaml_of(cfg) -> dict:
    """FLOW_V2_YAML's structure with the sizes of `cfg` (a
    `cslm_jax.speech.causal_flow.CausalFlowConfig`); upstream's encoder takes only the sizes it
    does not hard-code."""
    y = FLOW_V2_YAML[cfg.version]
    fixed = dict(
        encoder_size=512, input_size=512, pre_lookahead_len=3, token_mel_ratio=2, up_blocks=4
    )
    for k, v in fixed.items():
        if getattr(cfg, k) != v:
            raise ValueError(
                f"upstream's UpsampleConformerEncoder hard-codes {k} {v}; "
                f"{k} {getattr(cfg, k)} has no reference"
            )
    return dict(
        flow=dict(
            y["flow"],
            spk_embed_dim=cfg.spk_embed_dim,
            vocab_size=cfg.vocab_size,
            input_frame_rate=cfg.input_frame_rate,
        ),
        encoder=dict(
            y["encoder"],
            attention_heads=cfg.encoder_heads,
            linear_units=cfg.encoder_linear_units,
            num_blocks=cfg.encoder_blocks,
            static_chunk_size=cfg.encoder_chunk,
        ),
        decoder=dict(
            y["decoder"],
            cfm_params=dict(y["decoder"]["cfm_params"], inference_cfg_rate=cfg.cfg_rate),
        ),
        estimator=dict(
            y["estimator"],
            channels=list(cfg.channels),
            attention_head_dim=cfg.attention_head_dim,
            n_blocks=cfg.n_blocks,
            num_mid_blocks=cfg.num_mid_blocks,
            num_heads=cfg.num_heads,
            static_chunk_size=cfg.decoder_chunk,
        ),
    )


def flow_v2_reference(cfg, state_dict=None):
    """Upstream's CausalMaskedDiffWithXvec of `cfg`'s sizes, built as cosyvoice2.yaml builds it,
    loaded strictly with `state_dict` (upstream names), in eval mode. Its fixed noise buffer is
    `model.decoder.rand_noise` ([1, 80, 15000]); building it reseeds torch's generator (0)."""
    from omegaconf import DictConfig

    y = flow_v2_yaml_of(cfg)
    estimator = CausalConditionalDecoder(**y["estimator"])
    cfm = dict(y["decoder"], cfm_params=DictConfig(y["decoder"]["cfm_params"]))
    decoder = CausalConditionalCFM(**cfm, estimator=estimator)
    model = CausalMaskedDiffWithXvec(
        **y["flow"], encoder=UpsampleConformerEncoder(**y["encoder"]), decoder=decoder
    )
    if state_dict is not None:
        model.load_state_dict(
            {k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}, strict=True
        )
    return model.eval()


def run_flow_v2(
    model, units, embedding, prompt_units=None, prompt_mel=None, streaming=False, finalize=True
):
    """Upstream's `inference(..., streaming, finalize)` for one utterance (units [N], x-vector
    [192], optional prompt units [Np] and mel [Mp, 80]): (mel [1, 80, M], the starting noise it
    used in cslm_jax's layout [1, Mp + M, 80], the encoder's projected output [1, Mp + M, 80])."""
    tok = torch.as_tensor(np.asarray(units, np.int64))[None]
    pu = (
        torch.zeros((1, 0), dtype=torch.int64)
        if prompt_units is None
        else torch.as_tensor(np.asarray(prompt_units, np.int64))[None]
    )
    pm = (
        torch.zeros((1, 0, 80))
        if prompt_mel is None
        else torch.as_tensor(np.asarray(prompt_mel, np.float32))[None]
    )
    seen = {}
    hook = model.encoder_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    try:
        with torch.inference_mode():
            mel, _ = model.inference(
                token=tok,
                token_len=torch.tensor([tok.shape[1]]),
                prompt_token=pu,
                prompt_token_len=torch.tensor([pu.shape[1]]),
                prompt_feat=pm,
                prompt_feat_len=torch.tensor([pm.shape[1]]),
                embedding=torch.as_tensor(np.asarray(embedding, np.float32))[None],
                streaming=streaming,
                finalize=finalize,
            )
    finally:
        hook.remove()
    h = seen["h"].numpy()
    z = model.decoder.rand_noise[:, :, : h.shape[1]].numpy().transpose(0, 2, 1).copy()
    return mel.numpy(), z, h


def run_token2wav_stream(flow_model, hift_model, windows, embedding, seed=0):
    """Upstream's v1 streaming path (`CosyVoiceModel.token2wav` with its per-utterance caches,
    as `tts(stream=True)` drives it) on `windows`: a list of (units [n], finalize) in order, the
    x-vector [192], no prompt, torch's generator seeded once. Returns (the audio each call
    released [N_k], the draws each call made: the flow's `randn_like` [1, 80, M] first, then
    HiFT's)."""
    import warnings

    model = CosyVoiceModel(None, flow_model, hift_model)
    uid = "stream"
    model.mel_overlap_dict[uid] = torch.zeros(1, 80, 0)
    model.flow_cache_dict[uid] = torch.zeros(1, 80, 0, 2)
    model.hift_cache_dict[uid] = None
    emb = torch.as_tensor(np.asarray(embedding, np.float32))[None]
    torch.manual_seed(seed)
    audio, draws = [], []
    # one thread: at these sizes torch's second thread only waits, and on a busy machine the
    # calls take 20x longer with two
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for units, finalize in windows:
            with recorded_draws() as log, torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp.autocast
                out = model.token2wav(
                    token=torch.as_tensor(np.asarray(units, np.int64))[None],
                    prompt_token=torch.zeros(1, 0, dtype=torch.int64),
                    prompt_feat=torch.zeros(1, 0, 80),
                    embedding=emb,
                    uuid=uid,
                    finalize=finalize,
                )
            audio.append(out.numpy()[0].copy())
            draws.append(list(log))
    finally:
        torch.set_num_threads(threads)
    return audio, draws


def run_token2wav_stream_v2(flow_model, hift_model, calls, embedding, seed=0):
    """Upstream's v2 streaming path (`CosyVoice2Model.token2wav` with its per-utterance HiFT
    cache, as `tts(stream=True)` drives it) on `calls`: a list of (units so far [n],
    token_offset, finalize) in order, streamed (`stream=True`) unless finalized (upstream's last
    call is not), the x-vector [192], no prompt, torch's generator seeded once. The flow's noise
    is its fixed buffer (`flow_model.decoder.rand_noise`). Returns (the audio each call released
    [N_k], HiFT's draws of each call)."""
    import warnings

    model = CosyVoice2Model(None, flow_model, hift_model)
    uid = "stream"
    model.hift_cache_dict[uid] = None
    emb = torch.as_tensor(np.asarray(embedding, np.float32))[None]
    torch.manual_seed(seed)
    audio, draws = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_token2wav_stream: faster at these sizes
    try:
        for units, offset, finalize in calls:
            with recorded_draws() as log, torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp.autocast
                out = model.token2wav(
                    token=torch.as_tensor(np.asarray(units, np.int64))[None],
                    prompt_token=torch.zeros(1, 0, dtype=torch.int64),
                    prompt_feat=torch.zeros(1, 0, 80),
                    embedding=emb,
                    token_offset=offset,
                    uuid=uid,
                    stream=not finalize,
                    finalize=finalize,
                )
            audio.append(out.numpy()[0].copy())
            draws.append(list(log))
    finally:
        torch.set_num_threads(threads)
    return audio, draws
