"""`cslm-jax compile --decode`: ahead-of-time compile of one decoding step (the serving engine's
step: every KV-cache slot advances by one token) for a TPU topology, on a CPU host.

    cslm-jax compile --decode --topology v5e:2x2 --slots 8 --max-length 4096 [--tensor 4]

The step is `Llama.decode_step` on the decoding layout (`cslm_jax.model.llama.decoding_params`)
with a per-row cache index, for `slots` rows and a cache of `max_length` positions per row, the
cache donated (updated in place) as the engine and `generate` do. The mesh is {data: chips /
tensor, fsdp: 1, tensor} over the slice's chips: weights and cache split over `tensor` by the
training rules (`decoding_shardings`, `kv_cache_sharding`: heads, kv heads, MLP and vocabulary),
rows over `data` (the weights replicated there). It is lowered for the slice's devices as libtpu
describes them and compiled by the TPU compiler; no weights are read (the shapes of a base
architecture YAML extended with the CSLM vocabulary as import-hf does).

Reported per chip: the compiled executable's memory (arguments = the chip's shards of the
weights and the cache, temporaries, code) against the chip's HBM. And the step's bound in
tokens per second: a step reads each chip's shard of every weight and of the whole cache
(attention reads all `max_length` positions of a row, masked) once, so it is memory-bound, at
(weight + cache bytes per chip) / the chip's HBM bandwidth; the FLOPs from XLA's cost analysis
(the step lowered for one CPU device) at the chip's bf16 peak give the compute bound, shown for
comparison. Each step yields one token per slot: tokens/s = slots / step time.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cslm_jax.config import ConfigError
from cslm_jax.model.llama import (
    KVCache,
    bind,
    decoding_shapes,
    decoding_shardings,
    kv_cache_sharding,
)
from cslm_jax.parallel.sharding import MESH_AXES
from cslm_jax.resources import config_path
from cslm_jax.tpu.aot import (
    MemoryFit,
    Topology,
    compile_memory,
    cost_flops,
    cslm_model_config,
    gib,
    parse_topology,
    topology_devices,
)

MAX_SLOTS = 4096


@dataclasses.dataclass
class DecodeReport(MemoryFit):
    topology: Topology
    mesh: dict
    model: object  # ModelConfig
    slots: int  # rows, all chips together
    max_length: int  # cache positions per row
    weight_bytes: int  # per chip: its shards of every weight
    cache_bytes: int  # per chip: its shard of the KV cache
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int
    xla_flops: float  # one step, all chips
    compile_s: float
    error: str | None = None

    @property
    def read_bytes(self) -> int:
        """Bytes one chip reads from HBM per step: its weight shards and its cache shard."""
        return self.weight_bytes + self.cache_bytes

    @property
    def memory_step_s(self) -> float:
        return self.read_bytes / self.topology.spec.chip.hbm_bandwidth

    @property
    def compute_step_s(self) -> float:
        return self.xla_flops / self.topology.chips / self.topology.spec.peak_bf16

    @property
    def tokens_per_s(self) -> float:
        """The bound: slots / the longer of the memory and the compute time of a step."""
        return self.slots / max(self.memory_step_s, self.compute_step_s)

    def lines(self) -> list[str]:
        t, m = self.topology, self.model
        n = m.num_params()
        head = [
            f"topology   {t.name} ({t.accelerator_type}): {t.chips} chip(s) "
            f"({t.spec.hbm_gib:g} GiB HBM, {t.spec.chip.hbm_bandwidth / 1e9:g} GB/s each), "
            f"mesh {self.mesh}",
            f"model      {f'{n / 1e9:.2f}B' if n >= 1e8 else f'{n / 1e6:.2f}M'} params, {m.num_layers} layers, {m.num_heads} heads / "
            f"{m.num_kv_heads} kv heads, vocab {m.vocab_size}, decoding in {m.compute_dtype}",
            f"decode     {self.slots} slot(s) x {self.max_length} cache positions "
            f"({self.slots // self.mesh['data']} per data shard), one token per slot per step",
            f"compile    {self.compile_s:.1f} s",
        ]
        shards = (
            f"memory     per chip: weights {gib(self.weight_bytes)} + KV cache "
            f"{gib(self.cache_bytes)}"
        )
        if self.error is not None:
            return head + [shards, f"compiler   {self.error}", "DOES NOT FIT"]
        mem = [
            f"{shards} (arguments {gib(self.argument_bytes)}), temporaries "
            f"{gib(self.temp_bytes)}, outputs not aliased to the donated cache "
            f"{gib(self.output_bytes - self.alias_bytes)}, code {gib(self.code_bytes)}",
            self.total_line("XLA's peak of live buffers"),
        ]
        mem_rate, flop_rate = self.slots / self.memory_step_s, self.slots / self.compute_step_s
        bound = [
            f"step       reads {gib(self.read_bytes)} per chip (weights + whole cache) = "
            f"{self.memory_step_s * 1e3:.3g} ms at HBM bandwidth; {self.xla_flops:.4g} FLOPs "
            f"from XLA's cost analysis = {self.compute_step_s * 1e3:.3g} ms at the chip's "
            f"bf16 peak ({t.spec.peak_bf16 / 1e12:g} TFLOP/s)",
            f"bound      {self.tokens_per_s:,.0f} tokens/s for the slice "
            f"({'memory' if mem_rate <= flop_rate else 'compute'}-bound; memory "
            f"{mem_rate:,.0f}, compute {flop_rate:,.0f})",
        ]
        return head + mem + bound + ["FITS" if self.fits else "DOES NOT FIT"]


def decode_mesh_sizes(topo: Topology, tensor: int | None, slots: int, cfg) -> dict:
    """{data, fsdp, tensor} for decoding on the slice: `tensor` (default: every chip) ways on
    weights and cache, the remaining chips on `data` (rows). ConfigErrors before any compile."""
    tensor = topo.chips if tensor is None else tensor
    if tensor < 1 or topo.chips % tensor:
        raise ConfigError(
            f"--tensor {tensor}: must divide the {topo.chips} chip(s) of {topo.name} (the "
            f"other chips hold copies of the weights for more slots)"
        )
    if cfg.num_kv_heads % tensor or cfg.num_heads % tensor:
        raise ConfigError(
            f"--tensor {tensor}: does not divide the model's {cfg.num_kv_heads} kv heads / "
            f"{cfg.num_heads} heads; each chip needs whole heads"
        )
    data = topo.chips // tensor
    if slots < 1 or slots % data or slots > MAX_SLOTS:
        raise ConfigError(
            f"--slots {slots}: must be a positive multiple (at most {MAX_SLOTS}) of the mesh's "
            f"data size {data} ({topo.chips} chips / --tensor {tensor}): each chip needs "
            f"whole rows"
        )
    return {"data": data, "fsdp": 1, "tensor": tensor}


def decode_step_fn(cfg):
    """The step: (params in the decoding layout, KVCache, token [B], index [B], pad [B]) ->
    (logits [B, V] float32, the updated KVCache)."""

    def step(params, cache, token, index, pad):
        return bind(cfg, params).decode_step(cache, token, index, pad)

    return step


def abstract_args(cfg, slots: int, max_length: int, mesh=None):
    """ShapeDtypeStructs of the step's arguments, in their shardings on `mesh` (if given)."""
    shapes = decoding_shapes(cfg)
    cache_sh = rows = None
    if mesh is not None:
        shardings = decoding_shardings(cfg, mesh)
        shapes = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )
        cache_sh = kv_cache_sharding(cfg, mesh, slots=slots)
        rows = NamedSharding(mesh, P(("data", "fsdp")))
    one = jax.ShapeDtypeStruct(
        (slots, cfg.num_kv_heads, max_length, cfg.head_dim),
        jnp.dtype(cfg.compute_dtype),
        sharding=cache_sh,
    )
    cache = KVCache((one,) * cfg.num_layers, (one,) * cfg.num_layers)
    vec = jax.ShapeDtypeStruct((slots,), jnp.int32, sharding=rows)
    return shapes, cache, vec, vec, vec


def per_chip_bytes(args) -> int:
    """Bytes of one chip's shards of the ShapeDtypeStructs `args` (in their shardings)."""
    total = 0
    for a in jax.tree.leaves(args):
        shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += math.prod(shard) * a.dtype.itemsize
    return total


def compile_decode_step(
    topology: str,
    slots: int,
    max_length: int,
    tensor: int | None = None,
    model_path: str | None = None,
    speech_units: int = 4096,
    pad_vocab_multiple: int = 128,
    log=print,
) -> DecodeReport:
    """Lower and compile the decoding step for the topology; memory per chip and the tokens/s
    bound. Input errors (topology, tensor, slots, length, model) are ConfigErrors raised before
    libtpu or the compiler are touched. model_path: a base architecture YAML (default: Llama
    3.1 8B, configs/model/llama3_1_8b.yaml, the CSLM 8B's base)."""
    topo = parse_topology(topology)
    model_path = model_path or str(config_path("model", "llama3_1_8b.yaml"))
    cfg, _ = cslm_model_config(model_path, speech_units, pad_vocab_multiple)
    if not 1 <= max_length <= cfg.max_position_embeddings:
        raise ConfigError(
            f"--max-length {max_length}: give 1 to the model's max_position_embeddings "
            f"({cfg.max_position_embeddings}) cache positions per slot"
        )
    sizes = decode_mesh_sizes(topo, tensor, slots, cfg)
    jax.config.update("jax_platforms", "cpu")  # never open (or look for) a local accelerator
    devices = topology_devices(topo)
    mesh = Mesh(np.array(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)
    args = abstract_args(cfg, slots, max_length, mesh)
    weight_bytes = per_chip_bytes(args[0])
    cache_bytes = per_chip_bytes(args[1])
    log(
        f"compile: decoding step, {topo.name}, mesh {sizes}, {slots} slot(s) x {max_length} "
        f"positions: compiling..."
    )
    step = jax.jit(
        decode_step_fn(cfg),
        out_shardings=(None, jax.tree.map(lambda a: a.sharding, args[1])),
        donate_argnums=(1,),
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        memory, error = compile_memory(step.lower(*args))
    elapsed = time.perf_counter() - start
    flops = 0.0
    if error is None:  # one CPU device, unsharded: the whole step's count
        one = abstract_args(cfg, slots, max_length)
        flops = cost_flops(jax.jit(decode_step_fn(cfg)).lower(*one))
    return DecodeReport(
        topo,
        sizes,
        cfg,
        slots,
        max_length,
        weight_bytes,
        cache_bytes,
        *memory,
        flops,
        elapsed,
        error,
    )


__all__ = ["DecodeReport", "compile_decode_step", "decode_mesh_sizes", "decode_step_fn"]
