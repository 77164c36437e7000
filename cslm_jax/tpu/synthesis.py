"""`cslm-jax compile --token2wav`: ahead-of-time compile of speech synthesis (speech units ->
waveform: CosyVoice's flow and HiFT vocoder, `cslm_jax.speech`) for a TPU topology, on a CPU host.

    cslm-jax compile --token2wav v1 --topology v5e:1x1 --batch 8 --seconds 10

The step is what `cslm-jax synthesize` runs for a batch of answers of one padded length: the
flow's encoder and length regulator, the CFM's Euler steps (each one estimator call on the
conditional and unconditional rows, batch 2B) and HiFT (F0 predictor, source, generator, iSTFT),
the batch sharded over a `data` mesh of every chip of the slice and the weights replicated
(flow 105M + HiFT 20M parameters at the official v1 sizes, 113M + 21M for v2: about 0.5 GB in
float32). v1 is `MaskedDiffWithXvec` (50 units/s, 22,050 Hz), v2 CosyVoice 2's causal flow
(`speech.causal_flow`: 25 units/s, 2 mel frames per unit, 24 kHz; finalized, not streamed, each
row's encoder run on its own and the CFM on the batch). It is lowered for
the slice's devices as libtpu describes them and compiled by the TPU compiler; no weights are
read (random-weight shapes of the official sizes, or `flow.NAME=` / `hift.NAME=` overrides).

Reported: per-chip memory from the compiled executable's buffer assignment; FLOPs per second of
audio from XLA's cost analysis (the CFM's steps run in a loop that XLA counts once, so the step
is counted as the step plus `n_timesteps - 1` more estimator calls, each lowered on its own);
and the compute bound in seconds of audio per chip-second at the chip's dense bf16 peak, divided
by the bfloat16 passes a TPU spends per float32 product at the chosen precision.
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
from cslm_jax.speech import causal_flow, flow, hift
from cslm_jax.speech.causal_flow import CausalFlowConfig
from cslm_jax.speech.flow import FlowConfig
from cslm_jax.speech.hift import HiFTConfig, Token2WavError
from cslm_jax.tpu.aot import (
    MemoryFit,
    Topology,
    compile_memory,
    cost_flops,
    parse_topology,
    topology_devices,
)
from cslm_jax.tpu.extraction import TPU_PASSES

VERSIONS = ("v1", "v2")
MAX_SECONDS = 60.0  # one answer's speech chunk is seconds long; 60 s is ample
PRECISIONS = ("highest", "high", "default")


@dataclasses.dataclass
class SynthesisReport(MemoryFit):
    topology: Topology
    version: str
    flow_config: object  # cslm_jax.speech.flow.FlowConfig
    hift_config: object  # cslm_jax.speech.hift.HiFTConfig
    batch: int  # answers, all chips together
    seconds: float  # padded length of every answer
    units: int  # units per answer (the flow's input rate)
    mel_frames: int
    precision: str
    argument_bytes: int  # per chip
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int
    xla_flops: float  # one step, all chips, the CFM's steps all counted
    estimator_flops: float  # one estimator call on the 2B rows
    compile_s: float
    error: str | None = None

    @property
    def audio_seconds(self) -> float:
        return self.batch * self.samples / self.hift_config.sampling_rate

    @property
    def samples(self) -> int:
        return self.mel_frames * self.hift_config.samples_per_frame

    @property
    def flops_per_audio_second(self) -> float:
        return self.xla_flops / self.audio_seconds

    @property
    def passes(self) -> int:
        return TPU_PASSES[self.precision]

    @property
    def audio_seconds_per_chip_second(self) -> float:
        """The compute bound: seconds of audio one chip can synthesise per second at its dense
        bf16 peak, each float32 product costing `passes` bf16 products."""
        return self.topology.spec.peak_bf16 / self.passes / self.flops_per_audio_second

    def lines(self) -> list[str]:
        t, f, h = self.topology, self.flow_config, self.hift_config
        per_chip = self.batch // t.chips
        head = [
            self.data_mesh_line(),
            f"token2wav  {self.version}: flow {f.encoder_blocks} x {f.encoder_size} encoder, "
            f"estimator channels {list(f.channels)} with {f.num_mid_blocks} mid blocks, "
            f"{f.n_timesteps} steps (guidance {f.cfg_rate:g}); HiFT {h.base_channels} "
            f"channels, upsampling {list(h.upsample_rates)}, {h.sampling_rate} Hz; "
            f"precision {self.precision}",
            f"batch      {self.batch} x {self.seconds:g} s ({per_chip} answer(s) per chip): "
            f"{self.units} units -> {self.mel_frames} mel frames -> {self.samples} samples "
            f"each, {self.audio_seconds:.4g} s of audio per step",
            f"compile    {self.compile_s:.1f} s",
        ]
        if self.error is not None:
            return head + [f"compiler   {self.error}", "DOES NOT FIT"]
        mem = self.memory_lines()
        fpas = self.flops_per_audio_second
        est = f.n_timesteps * self.estimator_flops / self.xla_flops
        flops = [
            f"FLOPs      {self.xla_flops:.4g} per step from XLA's cost analysis = "
            f"{fpas:.4g} per second of audio ({est:.0%} in the {f.n_timesteps} estimator "
            f"calls)",
            f"bound      {self.audio_seconds_per_chip_second:,.0f} s of audio per "
            f"chip-second at the chip's bf16 peak ({t.spec.peak_bf16 / 1e12:g} TFLOP/s) / "
            f"{self.passes} bf16 pass(es) per float32 product ({self.precision}); padded "
            f"frames count as audio",
        ]
        return head + mem + flops + ["FITS" if self.fits else "DOES NOT FIT"]


def configs(version: str, overrides: list[str]):
    """(FlowConfig, HiFTConfig) of `version` at the official sizes with `flow.NAME=VALUE` /
    `hift.NAME=VALUE` overrides (integers, tuples as `64,64`; flow.cfg_rate a number); ConfigError for anything else."""
    if version not in VERSIONS:
        raise ConfigError(f"--token2wav {version!r}: compiles {', '.join(VERSIONS)}")
    flow_cls = CausalFlowConfig if version == "v2" else FlowConfig
    sizes = {"flow": {}, "hift": {}}
    defaults = {
        "flow": dataclasses.asdict(flow_cls(version)),
        "hift": dataclasses.asdict(HiFTConfig(version)),
    }
    fields = {
        "flow": {f.name for f in dataclasses.fields(flow_cls)} - {"version"},
        "hift": {f.name for f in dataclasses.fields(HiFTConfig)} - {"version"},
    }
    for item in overrides:
        key, sep, value = item.partition("=")
        part, dot, name = key.partition(".")
        if not sep or not dot or part not in sizes or name not in fields[part]:
            raise ConfigError(
                f"{item!r}: with --token2wav, overrides are model sizes "
                f"flow.NAME=N or hift.NAME=N, e.g. flow.encoder_blocks=1 "
                f"(flow: {', '.join(sorted(fields['flow']))}; hift: "
                f"{', '.join(sorted(fields['hift']))})"
            )
        try:
            if isinstance(defaults[part].get(name), tuple):
                sizes[part][name] = tuple(int(v) for v in value.split(","))
            else:
                sizes[part][name] = float(value) if name == "cfg_rate" else int(value)
        except ValueError:
            raise ConfigError(
                f"{item!r}: {key} must be a number (a tuple: numbers joined by "
                f"commas, e.g. flow.channels=64,64)"
            ) from None
    try:
        return (
            flow_cls(version=version, **sizes["flow"]),
            HiFTConfig(version=version, **sizes["hift"]),
        )
    except (Token2WavError, TypeError) as e:
        raise ConfigError(f"--token2wav {version} overrides: {e}") from None


def synthesis_step(flow_cfg, hift_cfg, mel_len: int, precision: str):
    """The batch's synthesis as one traceable function: (flow params, HiFT params, units [B, N],
    x-vectors [B, 192], flow noise [B, M, 80], HiFT phases [B, H], HiFT noise [B, M * R, H])
    -> waveform [B, M * R]."""

    def step(flow_params, hift_params, units, embedding, noise, phase, source_noise):
        b, n = units.shape
        prec = hift.matmul_precision(precision)
        spks = embedding / jnp.maximum(jnp.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
        spks = (
            jnp.matmul(spks, flow_params["spk_embed_affine_layer.w"], precision=prec)
            + flow_params["spk_embed_affine_layer.b"]
        )
        mask = jnp.ones((b, mel_len), jnp.float32)
        if flow_cfg.version == "v2":

            def one(ids):
                return causal_flow.encode_padded(
                    flow_params, flow_cfg, ids[None], n, 0, precision=precision
                )[0]

            mu = jax.vmap(one)(units)
            mel = causal_flow.cfm(
                flow_params,
                flow_cfg,
                mu,
                mask,
                spks,
                jnp.zeros_like(mu),
                noise,
                precision=precision,
            )
        else:
            mu = flow.encode(
                flow_params, flow_cfg, units, jnp.full((b,), n), mel_len, precision=precision
            )
            mel = flow.cfm(
                flow_params,
                flow_cfg,
                mu,
                mask,
                spks,
                jnp.zeros_like(mu),
                noise,
                precision=precision,
            )
        wave, _, _ = hift.forward(
            hift_params,
            hift_cfg,
            jnp.swapaxes(mel, 1, 2),
            jnp.full((b,), mel_len, jnp.int32),
            noise={"phase": phase, "noise": source_noise},
            precision=precision,
        )
        return wave

    return step


def _abstract(flow_cfg, hift_cfg, batch: int, units: int, mel_len: int, mesh=None):
    rep = bat = None
    if mesh is not None:
        rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def params(shapes):
        return {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=rep) for k, s in shapes.items()}

    h = hift_cfg.nb_harmonics + 1
    samples = mel_len * hift_cfg.samples_per_frame
    flow_module = causal_flow if flow_cfg.version == "v2" else flow
    return (
        params(flow_module.param_shapes(flow_cfg)),
        params(hift.param_shapes(hift_cfg)),
        jax.ShapeDtypeStruct((batch, units), jnp.int32, sharding=bat),
        jax.ShapeDtypeStruct((batch, flow_cfg.spk_embed_dim), jnp.float32, sharding=bat),
        jax.ShapeDtypeStruct((batch, mel_len, flow_cfg.output_size), jnp.float32, sharding=bat),
        jax.ShapeDtypeStruct((batch, h), jnp.float32, sharding=bat),
        jax.ShapeDtypeStruct((batch, samples, h), jnp.float32, sharding=bat),
    )


def xla_flops(
    flow_cfg, hift_cfg, batch: int, units: int, mel_len: int, precision: str
) -> tuple[float, float]:
    """(FLOPs of the whole step, FLOPs of one estimator call on 2 x batch rows) by XLA's HLO
    cost analysis, lowered (not compiled) for one CPU device. XLA counts the CFM's loop body
    once, so the step's count gets `n_timesteps - 1` more estimator calls."""
    args = _abstract(flow_cfg, hift_cfg, batch, units, mel_len)
    step = cost_flops(jax.jit(synthesis_step(flow_cfg, hift_cfg, mel_len, precision)).lower(*args))
    rows = (2 * batch, mel_len, flow_cfg.output_size)
    x = jax.ShapeDtypeStruct(rows, jnp.float32)

    def one_call(params, x, mask, mu, t, spks, cond):
        if flow_cfg.version == "v2":
            return causal_flow.estimator(
                params, flow_cfg, x, mask, mu, t, spks, cond, precision=precision
            )
        return flow.estimator(params, flow_cfg, x, mask, mu, t, spks, cond, precision)

    est = cost_flops(
        jax.jit(one_call).lower(
            args[0],
            x,
            jax.ShapeDtypeStruct(rows[:2], jnp.float32),
            x,
            jax.ShapeDtypeStruct((2 * batch,), jnp.float32),
            jax.ShapeDtypeStruct((2 * batch, flow_cfg.output_size), jnp.float32),
            x,
        )
    )
    return step + (flow_cfg.n_timesteps - 1) * est, est


def compile_synthesis_step(
    version: str,
    topology: str,
    batch: int,
    seconds: float,
    precision: str = "highest",
    overrides: list[str] = (),
    log=print,
) -> SynthesisReport:
    """Lower and compile the synthesis step for the topology; memory per chip and FLOPs. Input
    errors (version, topology, batch, length, precision, sizes) are ConfigErrors raised before
    libtpu or the compiler are touched."""
    topo = parse_topology(topology)
    flow_cfg, hift_cfg = configs(version, list(overrides))
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if batch < 1 or batch % topo.chips:
        raise ConfigError(
            f"--batch {batch}: must be a positive multiple of the {topo.chips} "
            f"chip(s) of {topo.name} (each chip gets whole answers)"
        )
    if not 0.5 <= seconds <= MAX_SECONDS:
        raise ConfigError(
            f"--seconds {seconds:g}: give 0.5 to {MAX_SECONDS:g} s of speech per answer"
        )
    units = int(round(seconds * flow_cfg.input_frame_rate))
    mel_len = flow_cfg.mel_len(units)
    jax.config.update("jax_platforms", "cpu")  # never open (or look for) a local accelerator
    devices = topology_devices(topo)
    mesh = Mesh(np.array(devices), ("data",))
    log(
        f"compile: token2wav {version} synthesis step, {topo.name}, batch {batch} x {seconds:g} "
        f"s, precision {precision}: compiling..."
    )
    args = _abstract(flow_cfg, hift_cfg, batch, units, mel_len, mesh)
    step = jax.jit(
        synthesis_step(flow_cfg, hift_cfg, mel_len, precision),
        out_shardings=NamedSharding(mesh, P("data")),
    )
    start = time.perf_counter()
    memory, error = compile_memory(step.lower(*args))
    elapsed = time.perf_counter() - start
    flops, est = xla_flops(flow_cfg, hift_cfg, batch, units, mel_len, precision)
    return SynthesisReport(
        topo,
        version,
        flow_cfg,
        hift_cfg,
        batch,
        seconds,
        units,
        mel_len,
        precision,
        *memory,
        flops,
        est,
        elapsed,
        error,
    )


__all__ = ["SynthesisReport", "compile_synthesis_step", "configs", "synthesis_step", "xla_flops"]
