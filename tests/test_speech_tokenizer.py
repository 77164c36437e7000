"""cslm_jax.speech against the `s3tokenizer` package (0.3.0) with random weights (a random
codebook: the package's is zeros until weights are loaded): the log-mel front end, the encoder
output, code lengths and codes, for v1, v1_25hz and v2_25hz, batched and one by one, and > 30 s
audio through the package's windows. See tests/s3_reference.py for the package import."""

import functools

import jax
import numpy as np
import pytest
import torch

from cslm_jax.speech import SpeechTokenizerError, random_speech_tokenizer
from cslm_jax.speech.mel import log_mel_jit, mel_filters
from cslm_jax.speech.s3 import code_lengths, encoder, merge_windows, window_starts
from cslm_jax.speech.weights import to_state_dict
from s3_reference import (
    TINY,
    near_ties,
    package_mels,
    package_model,
    s3tokenizer,
    speechlike,
    with_data_codebook,
)

VERSIONS = ("v1", "v1_25hz", "v2_25hz")
# Different lengths, one of exactly the minimum (201 samples), some not multiples of the hop.
LENGTHS = [16000, 12345, 201, 27361, 4003]
TIE_TOL = 1e-4


@pytest.fixture(scope="module")
def waves():
    return speechlike(LENGTHS)


def test_mel_filters_equal_the_packages_asset():
    """Computed here (librosa's Slaney mel, Slaney norm) = the package's assets/mel_filters.npz,
    bit for bit."""
    import os

    path = os.path.join(os.path.dirname(s3tokenizer.__file__), "assets", "mel_filters.npz")
    with np.load(path) as f:
        for n in (80, 128):
            assert mel_filters(n).dtype == np.float32
            np.testing.assert_array_equal(mel_filters(n), f[f"mel_{n}"])


def _float64_log_mel(w):
    """The package's front end in float64: the exact value both float32 versions approximate."""
    x = torch.from_numpy(np.array(w, np.float64))
    st = torch.stft(
        x, 400, 160, window=torch.hann_window(400, dtype=torch.float64), return_complex=True
    )
    ms = torch.from_numpy(mel_filters().astype(np.float64)) @ (st[..., :-1].abs() ** 2)
    ls = torch.clamp(ms, min=1e-10).log10()
    ls = torch.maximum(ls, ls.max() - 8.0)
    return ((ls + 4.0) / 4.0).numpy().T


def test_log_mel_matches_the_package_batched(waves):
    """One padded batch of different lengths = the package utterance by utterance: within 1e-5
    of the package on 99.9% of values and 2e-5 everywhere, frame counts N // 160, padded frames
    zero. A 1e-5 bound everywhere is below float32's reach: on this audio the package's own
    float32 STFT is up to ~1.9e-5 off the float64 value of the same formula (ours ~1.4e-5);
    we require ours to be no further from it than the package is."""
    n = max(LENGTHS) + 777
    batch = np.zeros((len(waves), n), np.float32)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    for i, w in enumerate(waves):
        batch[i, len(w) :] = 0.5
    mel, mel_len = (np.asarray(a) for a in log_mel_jit(batch, np.array(LENGTHS)))
    assert mel.shape == (len(waves), n // 160, 128)
    diffs, ours_err, package_err = [], [], []
    for i, w in enumerate(waves):
        ref = s3tokenizer.log_mel_spectrogram(torch.from_numpy(w)).numpy().T
        assert mel_len[i] == ref.shape[0] == LENGTHS[i] // 160
        diffs.append(np.abs(mel[i, : mel_len[i]] - ref).ravel())
        exact = _float64_log_mel(w)
        ours_err.append(np.abs(mel[i, : mel_len[i]] - exact).max())
        package_err.append(np.abs(ref - exact).max())
        assert (mel[i, mel_len[i] :] == 0).all()
    assert max(ours_err) <= max(package_err) and max(ours_err) < 2e-5
    diffs = np.concatenate(diffs)
    assert diffs.max() < 2e-5
    assert np.quantile(diffs, 0.999) < 1e-5


def _compare(tok, waves, ours, check_hidden=True):
    """Our codes (and encoder output) against the package's batched model on the same weights;
    returns (mismatched codes, codes)."""
    cfg = tok.config
    model = package_model(cfg, to_state_dict(cfg, tok.params))
    mels, mel, mel_len = package_mels(waves)
    with torch.inference_mode():
        hidden, hidden_len = model.encoder(mel, mel_len)
        codes, code_len = model.quantize(mel, mel_len)
    if check_hidden:
        our_mel, our_len = tok.log_mel(waves)
        np.testing.assert_array_equal(our_len, mel_len.numpy())
        our_h, our_hlen = tok.hidden(our_mel[:, : mel.shape[2]], our_len)
        np.testing.assert_array_equal(our_hlen, hidden_len.numpy())
        # the packed layout (dense layers on the valid frames only) within the same bound
        rows = -(-int(hidden_len.sum()) // 256) * 256
        packed = jax.jit(functools.partial(encoder, cfg=cfg, packed=rows))
        packed_h = np.asarray(
            packed(tok.params, mel=our_mel[:, : mel.shape[2]], mel_len=our_len)[0]
        )
    bad = total = 0
    for i in range(len(waves)):
        n = int(code_len[i])
        assert len(ours[i]) == n == tok.code_lengths(len(waves[i]))
        ref = codes[i, :n].numpy()
        if check_hidden:
            err = np.abs(our_h[i, :n] - hidden[i, :n].numpy()).max()
            assert err < 1e-4, (i, err)
            err = np.abs(packed_h[i, :n] - hidden[i, :n].numpy()).max()
            assert err < 1e-4, (i, err)
        ties = near_ties(cfg, tok.params, hidden[i, :n].numpy(), TIE_TOL)
        differ = ours[i] != ref
        assert not (differ & ~ties).any(), f"utterance {i}: codes differ away from a near tie"
        bad += int(differ.sum())
        total += n
    assert bad <= 0.005 * total
    return bad, total


@pytest.mark.parametrize("version", VERSIONS)
def test_codes_match_the_package(version, waves):
    """Encoder output within 1e-4 on valid frames, code lengths identical, codes identical but
    at near ties (at most 0.5%), for a batch of different lengths; batched = one by one."""
    tok = with_data_codebook(random_speech_tokenizer(version, seed=3, **TINY))
    ours = tok.encode(waves)
    assert [len(c) for c in ours] == [
        int(x) for x in code_lengths(np.array(LENGTHS) // 160, tok.config.stride)
    ]
    assert all(c.dtype == np.int32 for c in ours)
    assert all(((c >= 0) & (c < tok.codebook_size)).all() for c in ours)
    assert len(set(np.concatenate(ours).tolist())) > 15  # varied codes
    _compare(tok, waves, ours)
    alone = [tok.encode([w])[0] for w in waves]
    for a, b in zip(alone, ours):
        np.testing.assert_array_equal(a, b)
    # a padded array with lengths, wider than needed: the same codes
    padded = np.zeros((len(waves), 40000), np.float32)
    for i, w in enumerate(waves):
        padded[i, : len(w)] = w
    for a, b in zip(tok.encode(padded, np.array(LENGTHS)), ours):
        np.testing.assert_array_equal(a, b)


def test_packed_frames_give_the_same_codes():
    """A list of 21 utterances of 0.2-10 s: the encoder's dense layers run on the valid frames
    packed into rows (a multiple of 256), not on the padded batch: codes equal to the padded
    layout's; a padded array is not packed unless asked; a batch without padding is not packed."""
    from cslm_jax.speech.tokenizer import PACK_MULTIPLE

    rng = np.random.default_rng(4)
    lengths = rng.integers(3200, 160000, 21).tolist()
    waves = speechlike(lengths, seed=9)
    tok = random_speech_tokenizer("v1", seed=2, **TINY)
    rows = tok._packed_rows(np.array(lengths), 160000)
    valid = int(tok.code_lengths(np.array(lengths)).sum())
    assert rows % PACK_MULTIPLE == 0 and valid <= rows < valid + PACK_MULTIPLE
    assert rows < 0.85 * 21 * 500
    whole = tok.encode(waves, pack=False)
    assert not hasattr(tok, "_packed_steps")
    for a, b in zip(tok.encode(waves), whole):
        np.testing.assert_array_equal(a, b)
    assert list(tok._packed_steps) == [rows]
    assert tok._packed_rows(np.full(21, 40000), 48000) == 0  # little padding: not packed


def test_bfloat16_precision_rounds_the_products_only(waves):
    """precision="bfloat16" (what a TPU computes at "default", on any backend): the encoder's
    products take bfloat16 operands, so its output moves by about bfloat16's rounding (not 0,
    not more), and most codes stay those of "highest"."""
    from cslm_jax.speech import SpeechTokenizer

    ref = with_data_codebook(random_speech_tokenizer("v1", seed=3, **TINY))
    bf16 = SpeechTokenizer(ref.config, ref.params, precision="bfloat16")
    mel, mel_len = ref.log_mel(waves)
    h1, n = ref.hidden(mel, mel_len)
    h2, _ = bf16.hidden(mel, mel_len)
    rel = max(
        np.abs(h1[i, : n[i]] - h2[i, : n[i]]).max() / np.abs(h1[i, : n[i]]).max()
        for i in range(len(n))
    )
    assert 1e-4 < rel < 5e-2, rel
    a, b = ref.encode(waves), bf16.encode(waves)
    same = sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(len(x) for x in a)
    assert same > 0.8, same
    with pytest.raises(
        SpeechTokenizerError, match="choose one of highest, high, default, bfloat16"
    ):
        SpeechTokenizer(ref.config, ref.params, precision="fp8")


def test_sharded_over_a_mesh_equals_one_device(waves):
    """The batch axis sharded over 4 (fake CPU) devices, the batch padded from 5 to 8 rows:
    the same codes as on one device."""
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    one = random_speech_tokenizer("v1", seed=5, **TINY)
    sharded = random_speech_tokenizer("v1", seed=5, mesh=mesh, **TINY)
    for a, b in zip(one.encode(waves), sharded.encode(waves)):
        np.testing.assert_array_equal(a, b)


def test_each_device_packs_its_own_share_of_a_padded_batch():
    """A padded [16, N] batch over a mesh of 2 (fake CPU) devices with `pack=True` (what
    extract-units asks for on CPUs): each device packs the valid frames of its own 8 rows
    (rows sized by the fuller share, never the whole batch's), and the codes equal one device's
    padded layout."""
    import jax
    from jax.sharding import Mesh

    from cslm_jax.speech.tokenizer import PACK_MULTIPLE

    rng = np.random.default_rng(7)
    lengths = np.concatenate([rng.integers(5000, 16000, 8), rng.integers(8000, 96000, 8)])
    batch = np.zeros((16, 96000), np.float32)
    for i, w in enumerate(speechlike(lengths.tolist(), seed=11)):
        batch[i, : len(w)] = w
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    one = random_speech_tokenizer("v1", seed=6, **TINY)
    sharded = random_speech_tokenizer("v1", seed=6, mesh=mesh, **TINY)
    frames = sharded.code_lengths(lengths)
    rows = sharded._packed_rows(lengths, batch.shape[1])
    fuller = int(max(frames[:8].sum(), frames[8:].sum()))
    assert rows == -(-fuller // PACK_MULTIPLE) * PACK_MULTIPLE and rows <= 0.85 * 8 * 300
    packed = sharded.encode(batch, lengths, pack=True)
    assert list(sharded._packed_steps) == [rows]
    for a, b in zip(one.encode(batch, lengths, pack=False), packed):
        np.testing.assert_array_equal(a, b)


def test_windows_and_stitching_follow_the_package():
    """The package's loop: windows every 2600 frames while inside; ours stops once one reaches
    the end. Stitching drops 2 s at inner seams."""
    assert window_starts(3500, "window_package") == [(0, 3000), (2600, 3500)]
    assert window_starts(3500, "window") == [(0, 3000), (2600, 3500)]
    assert window_starts(5300, "window_package") == [(0, 3000), (2600, 5300), (5200, 5300)]
    assert window_starts(5300, "window") == [(0, 3000), (2600, 5300)]
    segs = [list(range(0, 1500)), list(range(1300, 2800)), list(range(2600, 2700))]
    pkg = s3tokenizer.merge_tokenized_segments(segs, overlap=4, token_rate=50)
    np.testing.assert_array_equal(merge_windows(segs, 50), pkg)
    short_last = [list(range(100)), list(range(80)), list(range(30))]
    np.testing.assert_array_equal(
        merge_windows(short_last, 25), s3tokenizer.merge_tokenized_segments(short_last, 4, 25)
    )


@pytest.mark.parametrize("version", ["v1", "v2_25hz"])
def test_long_audio_windows_match_the_package(version):
    """Utterances over 30 s in one batch with a short one: `window_package` = the package's
    `quantize` (windows of the whole utterance's log-mel, stitched); `window` = the same where
    the package keeps every frame (35 s) and, where the package's last window is <= 4 s (53 s),
    one code per code-frame of the whole utterance: no lost tail."""
    lengths = [35 * 16000 + 123, 53 * 16000 + 40, 3 * 16000]
    waves = speechlike(lengths, seed=7)
    tok = with_data_codebook(random_speech_tokenizer(version, seed=11, **TINY))
    model = package_model(tok.config, to_state_dict(tok.config, tok.params))
    _, mel, mel_len = package_mels(waves)
    with torch.inference_mode():
        codes, code_len = model.quantize(mel, mel_len)
    pkg = [codes[i, : int(code_len[i])].numpy() for i in range(len(waves))]
    exact = tok.encode(waves, long_audio="window_package")
    fixed = tok.encode(waves, long_audio="window")
    full = [int(x) for x in code_lengths(np.array(lengths) // 160, tok.config.stride)]
    for i in range(len(waves)):
        assert len(exact[i]) == len(pkg[i])
        assert (exact[i] != pkg[i]).mean() <= 0.005
    assert len(fixed[0]) == len(pkg[0]) == full[0]
    np.testing.assert_array_equal(fixed[0], exact[0])
    np.testing.assert_array_equal(fixed[2], exact[2])
    assert len(pkg[1]) < full[1] == len(fixed[1])  # the package loses 2 s; we do not
    ups = tok.units_per_second
    np.testing.assert_array_equal(
        fixed[1][: len(fixed[1]) - 2 * ups], exact[1][: len(fixed[1]) - 2 * ups]
    )
    with pytest.raises(SpeechTokenizerError, match=r"utterance 0: 35\.01 s, over"):
        tok.encode(waves, long_audio="refuse")


def test_bad_audio_is_refused_naming_the_utterance():
    tok = random_speech_tokenizer("v1", seed=0, **TINY)
    good = speechlike([4000])[0]
    with pytest.raises(SpeechTokenizerError, match="utterance 1: 200 samples"):
        tok.encode([good, good[:200]])
    bad = good.copy()
    bad[17] = np.nan
    with pytest.raises(SpeechTokenizerError, match="utterance 0: non-finite"):
        tok.encode([bad])
    with pytest.raises(SpeechTokenizerError, match="needs `lengths`"):
        tok.encode(np.zeros((2, 4000), np.float32))
    with pytest.raises(SpeechTokenizerError, match="long_audio"):
        tok.encode([good], long_audio="drop")


@pytest.mark.slow  # 11-26 s here (130M random weights, two models); tiny v1 runs by default
def test_full_size_v1_matches_the_package():
    """The official v1 sizes (6 blocks of 1280, 20 heads, 4096 codes), random weights."""
    tok = with_data_codebook(random_speech_tokenizer("v1", seed=1))
    assert (tok.config.n_state, tok.config.n_head, tok.config.n_layer) == (1280, 20, 6)
    waves = speechlike([32000, 21111], seed=2)
    bad, total = _compare(tok, waves, tok.encode(waves))
    assert total == 100 + 66
