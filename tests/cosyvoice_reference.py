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
            raise ImportError("the package `matcha` (from cosyvoice-minicpmo==0.1.0, installed "
                              "with `pip install --no-deps -r requirements-nodeps.txt`) is missing")
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
from cosyvoice.hifigan.f0_predictor import ConvRNNF0Predictor  # noqa: E402
from cosyvoice.hifigan.generator import HiFTGenerator  # noqa: E402

# The flow's classes and the streaming driver, for the flow's tests (imported here, while the
# stand-ins are in place: cosyvoice.utils.class_utils imports the LLM, which imports file_utils).
from cosyvoice.cli.model import CosyVoice2Model, CosyVoiceModel  # noqa: E402,F401
from cosyvoice.flow.decoder import CausalConditionalDecoder, ConditionalDecoder  # noqa: E402,F401
from cosyvoice.flow.flow import CausalMaskedDiffWithXvec, MaskedDiffWithXvec  # noqa: E402,F401
from cosyvoice.flow.flow_matching import CausalConditionalCFM, ConditionalCFM  # noqa: E402,F401
from cosyvoice.flow.length_regulator import InterpolateRegulator  # noqa: E402,F401
from cosyvoice.transformer.encoder import ConformerEncoder  # noqa: E402,F401
from cosyvoice.transformer.upsample_encoder import UpsampleConformerEncoder  # noqa: E402,F401

for _name in _ADDED:     # the modules that imported it keep their reference to the stand-in
    del sys.modules[_name]
_ROOT.setLevel(_ROOT_STATE[0])
_ROOT.handlers[:] = _ROOT_STATE[1]

# HiFTGenerator's arguments in the official cosyvoice.yaml (v1, CosyVoice-300M) and
# cosyvoice2.yaml (v2, CosyVoice2-0.5B); the F0 predictor is ConvRNNF0Predictor(1, 80, 512).
HIFT_YAML = {
    "v1": dict(in_channels=80, base_channels=512, nb_harmonics=8, sampling_rate=22050,
               nsf_alpha=0.1, nsf_sigma=0.003, nsf_voiced_threshold=10,
               upsample_rates=[8, 8], upsample_kernel_sizes=[16, 16],
               istft_params={"n_fft": 16, "hop_len": 4},
               resblock_kernel_sizes=[3, 7, 11],
               resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
               source_resblock_kernel_sizes=[7, 11],
               source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
               lrelu_slope=0.1, audio_limit=0.99),
    "v2": dict(in_channels=80, base_channels=512, nb_harmonics=8, sampling_rate=24000,
               nsf_alpha=0.1, nsf_sigma=0.003, nsf_voiced_threshold=10,
               upsample_rates=[8, 5, 3], upsample_kernel_sizes=[16, 11, 7],
               istft_params={"n_fft": 16, "hop_len": 4},
               resblock_kernel_sizes=[3, 7, 11],
               resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
               source_resblock_kernel_sizes=[7, 7, 11],
               source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
               lrelu_slope=0.1, audio_limit=0.99),
}


def hift_reference(cfg, state_dict=None):
    """Upstream's HiFTGenerator (with ConvRNNF0Predictor) of `cfg`'s sizes (a
    `cslm_jax.speech.hift.HiFTConfig`), loaded strictly with `state_dict` (upstream names, numpy
    or torch tensors, any weight-norm layout torch reads), in eval mode."""
    f0 = ConvRNNF0Predictor(num_class=1, in_channels=cfg.in_channels,
                            cond_channels=cfg.cond_channels)
    model = HiFTGenerator(
        in_channels=cfg.in_channels, base_channels=cfg.base_channels,
        nb_harmonics=cfg.nb_harmonics, sampling_rate=cfg.sampling_rate,
        nsf_alpha=cfg.nsf_alpha, nsf_sigma=cfg.nsf_sigma,
        nsf_voiced_threshold=cfg.nsf_voiced_threshold,
        upsample_rates=list(cfg.upsample_rates),
        upsample_kernel_sizes=list(cfg.upsample_kernel_sizes),
        istft_params={"n_fft": cfg.n_fft, "hop_len": cfg.hop_len},
        resblock_kernel_sizes=list(cfg.resblock_kernel_sizes),
        resblock_dilation_sizes=[list(d) for d in cfg.resblock_dilation_sizes],
        source_resblock_kernel_sizes=list(cfg.source_resblock_kernel_sizes),
        source_resblock_dilation_sizes=[list(d) for d in cfg.source_resblock_dilation_sizes],
        lrelu_slope=cfg.lrelu_slope, audio_limit=cfg.audio_limit, f0_predictor=f0)
    if state_dict is not None:
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()},
                              strict=True)
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
    return {"phase": np.ascontiguousarray(phase, np.float32),
            "noise": np.ascontiguousarray(noise, np.float32)}


def run_hift(model, mel, cache_source=None, seed=0):
    """Upstream's `inference(speech_feat=mel)` (one utterance or a batch of equal lengths) with
    torch's generator seeded: (waveform [B, N], source [B, N], the draws it made)."""
    torch.manual_seed(seed)
    with recorded_draws() as draws, torch.inference_mode():
        kw = {} if cache_source is None else {"cache_source": torch.as_tensor(cache_source)}
        wave, s = model.inference(speech_feat=torch.as_tensor(np.asarray(mel, np.float32)), **kw)
    return wave.numpy(), s[:, 0].numpy(), list(draws)
