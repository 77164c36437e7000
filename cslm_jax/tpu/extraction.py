"""`cslm-jax compile --speech-tokenizer`: ahead-of-time compile of the speech-unit extraction step
for a TPU topology, on a CPU host.

    cslm-jax compile --speech-tokenizer v1 --topology v5p:1x1x1 --batch 32 --seconds 30

The step is the one `cslm-jax extract-units` runs (`cslm_jax.speech.tokenizer.extraction_step`:
Whisper log-mel front end + S3 encoder + quantizer on a padded `[batch, seconds * 16000]`
waveform batch, weights replicated, the batch sharded over a `data` mesh of every chip of the
slice), lowered for the slice's devices as libtpu describes them and compiled by the TPU
compiler; no weights are read (random-weight shapes of the official sizes, or `n_state=...`
overrides). Reported: per-chip memory from the compiled executable's buffer assignment; FLOPs
per second of audio from XLA's cost analysis of the same step with the blocks unrolled
(XLA counts a loop body once), checked against the matrix products counted by hand; and the
throughput bound in hours of audio per chip-hour at the chip's dense bf16 peak, divided by the
bfloat16 passes a TPU spends per float32 product at the chosen precision.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cslm_jax.config import ConfigError
from cslm_jax.speech.s3 import PRECISIONS, S3Config, SpeechTokenizerError, param_shapes
from cslm_jax.speech.tokenizer import extraction_step, jit_step
from cslm_jax.tpu.aot import (
    MemoryFit,
    Topology,
    compile_memory,
    cost_flops,
    parse_topology,
    topology_devices,
)

# bfloat16 MXU passes per float32 product at each precision: XLA:TPU computes HIGHEST as six
# bf16 products of the operands' hi/lo parts (bf16_6x), HIGH as three (bf16_3x), DEFAULT as one.
TPU_PASSES = {"highest": 6, "high": 3, "default": 1, "bfloat16": 1}
SAMPLE_RATE = 16000
HOP = 160
MAX_SECONDS = 30.0  # the step serves utterances <= 30 s (longer ones go in 30 s windows)


def hand_flops(cfg, batch: int, samples: int) -> float:
    """FLOPs of the step's matrix products for a padded `[batch, samples]` batch, counted by hand
    (2 per multiply-add): mel filterbank, the two k3 convs, per block q/k/v/o projections, the
    two attention products and the 4x MLP, and the quantizer (v1: distances to every codeword;
    v2: the 8 FSQ projections; v2's FSMN adds a depthwise k31 conv per block). The FFT and the
    elementwise work (softmax, GELU, LayerNorm) are not counted."""
    d, m, layers = cfg.n_state, cfg.n_mels, cfg.n_layer
    t = samples // HOP
    t1 = (t - 1) // cfg.stride + 1
    t2 = (t1 - 1) // 2 + 1
    mel = 2 * t * 201 * m
    convs = 2 * t1 * 3 * m * d + 2 * t2 * 3 * d * d
    block = 2 * t2 * (4 * d * d + 2 * d * 4 * d) + 2 * 2 * t2 * t2 * d
    if cfg.arch == "v2":
        block += 2 * t2 * 31 * d
        quant = 2 * t2 * d * 8
    else:
        quant = 2 * t2 * d * cfg.codebook_size
    return float(batch * (mel + convs + layers * block + quant))


@dataclasses.dataclass
class ExtractionReport(MemoryFit):
    topology: Topology
    config: object  # cslm_jax.speech.s3.S3Config
    batch: int  # rows, all chips together
    seconds: float  # padded length of every row
    precision: str
    argument_bytes: int  # per chip
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int  # XLA's peak of live buffers where it gives one (else 0)
    xla_flops: float  # one step, all chips (XLA cost analysis, blocks unrolled)
    hand_flops: float  # the same step's matrix products counted by hand
    compile_s: float
    error: str | None = None

    @property
    def audio_seconds(self) -> float:
        return self.batch * self.seconds

    @property
    def flops_per_audio_second(self) -> float:
        return self.xla_flops / self.audio_seconds

    @property
    def passes(self) -> int:
        return TPU_PASSES[self.precision]

    @property
    def audio_hours_per_chip_hour(self) -> float:
        """The compute bound: seconds of audio one chip can tokenize per second (= hours per
        hour) at its dense bf16 peak, each float32 product costing `passes` bf16 products."""
        return self.topology.spec.peak_bf16 / self.passes / self.flops_per_audio_second

    def lines(self) -> list[str]:
        t, c = self.topology, self.config
        per_chip = self.batch // t.chips
        head = [
            self.data_mesh_line(),
            f"tokenizer  {c.spec.name} ({c.version}): {c.n_layer} x {c.n_state}, {c.n_head} "
            f"heads, {c.codebook_size} codes, {c.units_per_second} units/s; precision "
            f"{self.precision}",
            f"batch      {self.batch} x {self.seconds:g} s ({per_chip} row(s) per chip): "
            f"{self.audio_seconds:g} s of audio per step, log-mel + encoder + quantizer",
            f"compile    {self.compile_s:.1f} s",
        ]
        if self.error is not None:
            return head + [f"compiler   {self.error}", "DOES NOT FIT"]
        mem = self.memory_lines()
        fpas = self.flops_per_audio_second
        flops = [
            f"FLOPs      {self.xla_flops:.4g} per step from XLA's cost analysis = "
            f"{fpas:.4g} per second of audio; matrix products by hand "
            f"{self.hand_flops / self.audio_seconds:.4g} (XLA / hand "
            f"{self.xla_flops / self.hand_flops:.3f})",
            f"bound      {self.audio_hours_per_chip_hour:,.0f} h of audio per chip-hour at "
            f"the chip's bf16 peak ({t.spec.peak_bf16 / 1e12:g} TFLOP/s) / {self.passes} "
            f"bf16 pass(es) per float32 product ({self.precision}); padded rows and frames "
            f"count as audio",
        ]
        return head + mem + flops + ["FITS" if self.fits else "DOES NOT FIT"]


def speech_config(version: str, overrides: list[str]):
    """S3Config of `version` with `key=value` size overrides (n_state, n_head, n_layer, n_mels,
    n_ctx); ConfigError for anything else."""
    sizes = {}
    fields = {f.name for f in dataclasses.fields(S3Config)} - {"version"}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(
                f"{item!r}: with --speech-tokenizer, overrides are tokenizer sizes "
                f"({', '.join(sorted(fields))}), e.g. n_layer=2"
            )
        try:
            sizes[key] = int(value)
        except ValueError:
            raise ConfigError(f"{item!r}: {key} must be an integer") from None
    try:
        return S3Config(version=version, **sizes)
    except SpeechTokenizerError as e:
        raise ConfigError(str(e)) from None


def _abstract(cfg, batch: int, samples: int, mesh=None):
    rep = bat = None
    if mesh is not None:
        rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=rep),
        param_shapes(cfg),
        is_leaf=lambda x: isinstance(x, tuple),
    )
    return (
        params,
        jax.ShapeDtypeStruct((batch, samples), jnp.float32, sharding=bat),
        jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=bat),
    )


def xla_flops(cfg, batch: int, samples: int, precision: str) -> float:
    """FLOPs of the whole step by XLA's HLO cost analysis: the same step lowered (not compiled)
    for one CPU device with the blocks unrolled, since XLA counts a loop body once."""
    step = jax.jit(extraction_step(cfg, precision, unroll=True))
    return cost_flops(step.lower(*_abstract(cfg, batch, samples)))


def compile_extraction_step(
    version: str,
    topology: str,
    batch: int,
    seconds: float,
    precision: str = "highest",
    overrides: list[str] = (),
    log=print,
) -> ExtractionReport:
    """Lower and compile the extraction step for the topology; memory per chip and FLOPs.
    Input errors (topology, batch, length, precision, sizes) are ConfigErrors raised before
    libtpu or the compiler are touched."""
    topo = parse_topology(topology)
    cfg = speech_config(version, list(overrides))
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if batch < 1 or batch % topo.chips:
        raise ConfigError(
            f"--batch {batch}: must be a positive multiple of the {topo.chips} "
            f"chip(s) of {topo.name} (each chip gets whole rows)"
        )
    if not 0.1 <= seconds <= MAX_SECONDS:
        raise ConfigError(
            f"--seconds {seconds:g}: the extraction step takes rows of 0.1 to "
            f"{MAX_SECONDS:g} s (longer audio is cut into 30 s windows)"
        )
    samples = int(round(seconds * SAMPLE_RATE))
    jax.config.update("jax_platforms", "cpu")  # never open (or look for) a local accelerator
    devices = topology_devices(topo)
    mesh = Mesh(np.array(devices), ("data",))
    log(
        f"compile: {cfg.spec.name} extraction step, {topo.name}, batch {batch} x {seconds:g} s, "
        f"precision {precision}: compiling..."
    )
    step = jit_step(extraction_step(cfg, precision), mesh, "data")
    start = time.perf_counter()
    memory, error = compile_memory(step.lower(*_abstract(cfg, batch, samples, mesh)))
    elapsed = time.perf_counter() - start
    return ExtractionReport(
        topo,
        cfg,
        batch,
        samples / SAMPLE_RATE,
        precision,
        *memory,
        xla_flops(cfg, batch, samples, precision),
        hand_flops(cfg, batch, samples),
        elapsed,
        error,
    )
