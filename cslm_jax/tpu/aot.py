"""`cslm-jax compile`: will a run fit a TPU slice? Ahead-of-time compile of the real train step
for a TPU topology, on a CPU host, before anyone books the slice.

    cslm-jax compile --config configs/cslm_pretrain.yaml --model configs/model/llama3_1_8b.yaml \
        --topology v5p:2x2x1 [key=value ...]

The step is the one `cslm-jax train` runs (same mesh rules, shardings, donation, gradient
accumulation, remat policy), lowered for the slice's devices as libtpu describes them
(`jax.experimental.topologies`) and compiled by the TPU compiler; nothing runs and no weights
are read. Reported per chip: XLA's buffer assignment (arguments = train state + batch,
temporaries, outputs not aliased to donated inputs) against the chip's HBM, and the step's
FLOPs from XLA's cost analysis. Needs the `libtpu` package (requirements-dev.txt pins it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from cslm_jax.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    load_model_config,
    load_run_config,
    pad_to_multiple,
)
from cslm_jax.data.formats import load_data_config
from cslm_jax.model.vocab import CONTROL_TOKENS, VocabInfo
from cslm_jax.parallel.sharding import check_batch_split, mesh_sizes
from cslm_jax.storage.checkpoint import read_metadata, resolve_model_dir
from cslm_jax.tpu.chips import CHIPS, GIB, Chip
from cslm_jax.train.metrics import flops_per_token
from cslm_jax.train.setup import Run, abstract_state, make_train_fn, stage_data_config, train_layout


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation as libtpu names it; its datasheet figures come from `chips.CHIPS`."""

    libtpu_name: str  # the prefix libtpu's topology names use
    accelerator: str  # Cloud TPU accelerator-type prefix (v5p-8 counts TensorCores)
    cores_per_chip: int  # in that count
    dims: int  # 2: AxB chips (v5e, v6e); 3: AxBxC (v4, v5p)
    chip_config: str  # "megacore": one JAX device per chip (two TensorCores fused)
    chip: Chip  # HBM and bf16 peak per chip

    @property
    def hbm_gib(self) -> float:
        return self.chip.hbm_gib

    @property
    def peak_bf16(self) -> float:
        return self.chip.peak_bf16


GENERATIONS = {
    "v4": Generation("v4", "v4", 2, 3, "megacore", CHIPS["v4"]),
    "v5e": Generation("v5e", "v5litepod", 1, 2, "default", CHIPS["v5e"]),
    "v5p": Generation("v5p", "v5p", 2, 3, "megacore", CHIPS["v5p"]),
    "v6e": Generation("v6e", "v6e", 1, 2, "default", CHIPS["v6e"]),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
EXAMPLES = "v4:2x2x4, v5e:8x8, v5p:4x4x4"


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as libtpu spells it, e.g. "v5p:2x2x1"
    generation: str
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def spec(self) -> Generation:
        return GENERATIONS[self.generation]

    @property
    def hbm_bytes(self) -> int:
        return self.spec.chip.hbm_bytes

    @property
    def accelerator_type(self) -> str:
        """The Cloud TPU name of the slice (`gcloud ... --accelerator-type`), e.g. v5p-8."""
        return f"{self.spec.accelerator}-{self.chips * self.spec.cores_per_chip}"


def parse_topology(name: str) -> Topology:
    """`v5p:4x4x4` -> Topology. Unknown generations and malformed shapes are ConfigErrors that
    list what is accepted (raised before libtpu or any compiler is touched)."""
    m = re.fullmatch(r"\s*([A-Za-z0-9]+)\s*:\s*([0-9x]+)\s*", name or "")
    if not m:
        raise ConfigError(
            f"--topology {name!r}: expected GENERATION:SHAPE, e.g. {EXAMPLES} "
            f"(generations: {', '.join(GENERATIONS)})"
        )
    gen = ALIASES.get(m.group(1).lower(), m.group(1).lower())
    if gen not in GENERATIONS:
        raise ConfigError(
            f"--topology {name!r}: unknown TPU generation {m.group(1)!r}; known: "
            f"{', '.join(GENERATIONS)} (e.g. {EXAMPLES})"
        )
    parts = m.group(2).split("x")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(
            f"--topology {name!r}: the shape must be positive chip counts joined by "
            f"'x', e.g. {EXAMPLES}"
        )
    want = GENERATIONS[gen].dims
    if len(parts) != want:
        raise ConfigError(
            f"--topology {name!r}: {gen} slices have {want}-D shapes "
            f"({'AxBxC' if want == 3 else 'AxB'}), e.g. {EXAMPLES}"
        )
    shape = tuple(int(p) for p in parts)
    return Topology(f"{GENERATIONS[gen].libtpu_name}:{'x'.join(map(str, shape))}", gen, shape)


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def host_bounds(topo: Topology) -> tuple[int, int, int]:
    """Chips per host as libtpu wants them: a TPU VM holds up to 2x2x1 chips (4), and a slice
    smaller than that (one chip: v5e:1x1, v5p:1x1x1; two: v5e:2x1) is all on one host."""
    shape = tuple(topo.shape) + (1,) * (3 - len(topo.shape))
    return tuple(min(s, b) for s, b in zip(shape, (2, 2, 1)))


def topology_devices(topo: Topology) -> list:
    """The slice's devices as the TPU compiler sees them (compile-only: nothing can run on them).
    Raises ConfigError when libtpu is missing or rejects the shape."""
    if not libtpu_available():
        raise ConfigError(
            "cslm-jax compile needs the libtpu package to compile for TPUs on this "
            "host: pip install 'libtpu==0.0.42.*' (the version matching jax 0.10.2; "
            "see requirements-dev.txt)"
        )

    from jax.experimental import topologies  # heavy: libtpu (jax.experimental.topologies)

    # describe the slice to libtpu so that it does not look for TPU VM metadata on this host;
    # compiling opens no TPU, so libtpu's one-process-per-host lock (/tmp/libtpu_lockfile) need
    # not keep two compiles (or a compile next to training) apart
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topo.name,
            chip_config_name=topo.spec.chip_config,
            chips_per_host_bounds=host_bounds(topo),
            num_slices=1,
        )
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"--topology {topo.name}: libtpu does not accept this slice shape: "
            f"{str(e).splitlines()[0]}"
        ) from None
    devices = list(desc.devices)
    if len(devices) != topo.chips:
        raise ConfigError(
            f"--topology {topo.name}: libtpu describes {len(devices)} devices, "
            f"expected one per chip ({topo.chips})"
        )
    return devices


# -- the model the run would train ---------------------------------------------------------------


def compile_model_config(
    cfg: RunConfig, model_path: str | None, speech_units: int | None, pad_vocab_multiple: int
):
    """(ModelConfig, VocabInfo) of what the run would train: `--model` (a base architecture YAML)
    extended with the CSLM vocabulary exactly as `cslm-jax import-hf` would (`speech_units`
    None: the data config's format.unit_count, the codebook the run trains on), else the model
    checkpoint the config's `init_from` names. The run's `model` section applies on top."""
    if model_path:
        if speech_units is None:
            speech_units = load_data_config(cfg.data.config, check_files=False).format.unit_count
        model, vocab = cslm_model_config(model_path, speech_units, pad_vocab_multiple)
    elif cfg.init_from:
        _, model, vocab = read_metadata(resolve_model_dir(cfg.init_from, flag="init_from"))
    else:
        raise ConfigError(
            f"{cfg.path}: init_from is not set, so the model is unknown: pass "
            f"--model (e.g. configs/model/llama3_1_8b.yaml)"
        )
    return model.replace(**cfg.model), vocab


def cslm_model_config(model_path: str, speech_units: int, pad_vocab_multiple: int):
    """(ModelConfig, VocabInfo) of the base architecture YAML `model_path` with the CSLM
    vocabulary added as `cslm-jax import-hf` adds it: `speech_units` units and the control
    tokens (none without units), padded to a multiple of `pad_vocab_multiple` rows."""
    base = load_model_config(model_path)
    controls = CONTROL_TOKENS if speech_units else ()
    size = base.vocab_size + speech_units + len(controls)
    padded = pad_to_multiple(size, pad_vocab_multiple)
    vocab = VocabInfo(base.vocab_size, speech_units, controls, padded)
    return base.replace(vocab_size=padded, unpadded_vocab_size=size), vocab


def stage_shape(cfg: RunConfig) -> tuple[int, int]:
    """(number of tasks in the stage's mixture, packed row length), from the data config
    (its corpus files need not exist here)."""
    data_cfg = stage_data_config(cfg, check_files=False)
    return len(data_cfg.tasks(cfg.data.stage)), data_cfg.max_length


def check_mesh(cfg: RunConfig, topo: Topology) -> dict:
    """The mesh the config asks for on this slice, checked against its chip count and the batch
    (before libtpu or the compiler are involved; the same resolution `cslm-jax train` makes over
    its devices). Returns {axis: size}."""
    sizes = mesh_sizes(cfg.mesh, topo.chips, topo.name)
    check_batch_split(cfg.train.micro_batch_size or cfg.train.global_batch_size, sizes, topo.name)
    return sizes


# -- compile and report ---------------------------------------------------------------------------


class MemoryFit:
    """Per-chip memory of a compiled step (fields argument_bytes ... peak_bytes, `topology`,
    `error` of a report dataclass) and whether it fits the chip's HBM."""

    @property
    def allocated_bytes(self) -> int:
        """Every buffer XLA assigns, as if all were live at once (an upper bound)."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )

    @property
    def used_bytes(self) -> int:
        """Per-chip HBM the step needs: XLA's peak of live buffers (arguments included), which
        is what the TPU compiler checks against the chip's HBM; the upper bound where the
        compiler gives no peak."""
        return self.peak_bytes or self.allocated_bytes

    @property
    def fits(self) -> bool:
        return self.error is None and self.used_bytes <= self.topology.hbm_bytes

    def total_line(self, peak: str) -> str:
        """The report line of the per-chip total against HBM; `peak` says what XLA's peak is."""
        hbm = self.topology.hbm_bytes
        return (
            f"           total {gib(self.used_bytes)} of {gib(hbm)} HBM "
            f"({self.used_bytes / hbm:.0%}): "
            + (peak if self.peak_bytes else "all buffers at once (XLA gave no peak)")
        )

    def data_mesh_line(self) -> str:
        """The topology line of a step whose batch is sharded over a `data` mesh of every chip
        (the speech steps: extraction, synthesis)."""
        t = self.topology
        return (
            f"topology   {t.name} ({t.accelerator_type}): {t.chips} chip(s) "
            f"({t.spec.hbm_gib:g} GiB HBM each), mesh {{'data': {t.chips}}}"
        )

    def memory_lines(self) -> list[str]:
        """The per-chip memory lines of a speech step (weights and batch as its arguments)."""
        return [
            f"memory     per chip: arguments {gib(self.argument_bytes)} (weights + batch), "
            f"temporaries {gib(self.temp_bytes)}, outputs {gib(self.output_bytes)}, code "
            f"{gib(self.code_bytes)}",
            self.total_line("XLA's peak of live buffers"),
        ]


@dataclasses.dataclass
class CompileReport(MemoryFit):
    topology: Topology
    mesh: dict
    hosts: int
    model: ModelConfig
    seq_len: int
    global_batch: int
    micro_batch: int
    accumulation: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int  # XLA's own peak estimate where it gives one (else 0)
    xla_flops: float  # one step, all chips: XLA cost analysis (see xla_step_flops)
    model_flops: float  # one step, 6N + 12LHDhT per token (cslm_jax.train.metrics)
    compile_s: float
    error: str | None = None  # the compiler refused (e.g. out of HBM)

    def lines(self) -> list[str]:
        t, m = self.topology, self.model
        chunk = m.loss_chunk_for(self.seq_len)
        n = m.num_params()
        size = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
        head = [
            f"topology   {t.name} ({t.accelerator_type}): {t.chips} chips "
            f"({t.spec.hbm_gib:g} GiB HBM each), {self.hosts} host(s)",
            f"mesh       {self.mesh}",
            f"model      {size} params, vocab {m.vocab_size}, remat {m.remat_policy}, "
            f"compute {m.compute_dtype}, params {m.param_dtype}",
            f"kernels    attention {'einsum' if m.attention == 'einsum' else 'splash'} "
            f"(on TPU), cross-entropy "
            f"{'full logits' if chunk is None else f'chunked ({chunk} positions)'}",
            f"batch      {self.global_batch} x {self.seq_len} tokens = {self.accumulation} "
            f"micro-batch(es) of {self.micro_batch}",
            f"compile    {self.compile_s:.1f} s",
        ]
        if self.error is not None:
            return head + [f"compiler   {self.error}", "DOES NOT FIT"]
        mem = [
            f"memory     per chip: arguments {gib(self.argument_bytes)} (train state + batch), "
            f"temporaries {gib(self.temp_bytes)} (all allocated over the step; fewer are "
            f"live at once), outputs not aliased to donated inputs "
            f"{gib(self.output_bytes - self.alias_bytes)}, code {gib(self.code_bytes)}",
            self.total_line(
                f"XLA's peak of live buffers (all buffers at once: {gib(self.allocated_bytes)})"
            ),
        ]
        per_chip = self.xla_flops / t.chips
        ratio = self.xla_flops / self.model_flops
        if m.remat_policy == "none" or ratio < 1:  # nothing recomputed: say what differs
            why = (
                f"XLA counts {abs(ratio - 1):.1%} {'more' if ratio >= 1 else 'fewer'} than "
                f"the formula" + ("" if m.remat_policy == "none" else "; no recomputation shows")
            )
        else:
            why = f"recompute {ratio - 1:+.1%}"
        flops = [
            f"FLOPs/step {self.xla_flops:.4g} from XLA's cost analysis ({per_chip:.4g} per "
            f"chip; remat recomputation included); 6N+12LHDhT model FLOPs "
            f"{self.model_flops:.4g} (ratio {ratio:.3f}: {why})",
            f"time/step  >= {per_chip / t.spec.peak_bf16:.3g} s at the chip's bf16 peak "
            f"({t.spec.peak_bf16 / 1e12:g} TFLOP/s)",
        ]
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        return head + mem + flops + [verdict]


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if abs(nbytes) >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


def cost_flops(stage) -> float:
    cost = stage.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _run(cfg: RunConfig, model: ModelConfig, vocab, layout, num_tasks: int, seq_len: int):
    """A `cslm_jax.train.setup.Run` for compiling only: no run folder, no data pipeline."""
    return Run(
        cfg, None, model, vocab, {}, layout, [f"task{i}" for i in range(num_tasks)], "", seq_len
    )


def _abstract_batch(layout, accumulation: int, rows: int, seq_len: int) -> dict:
    return {
        name: jax.ShapeDtypeStruct(
            (accumulation, rows, seq_len), jnp.int32, sharding=layout.batch_sh
        )
        for name in ("tokens", "positions", "segment_ids", "targets", "loss_weights", "task_ids")
    }


def xla_step_flops(
    cfg: RunConfig, model: ModelConfig, vocab, num_tasks: int, seq_len: int
) -> float:
    """FLOPs of one whole step (all chips together) by XLA's HLO cost analysis.

    XLA counts a loop body once whatever its trip count, so the compiled step (a scan over
    layers inside a scan over micro-batches, the chunked loss's loop) would be undercounted, and it gives no count for a
    program lowered for compile-only TPU devices. So the same step is lowered, not compiled, for
    one CPU device with the layers unrolled and the global batch as one micro-batch (the same
    FLOPs: every matmul is linear in rows), and its HLO is counted. Remat recomputation is in the
    HLO (JAX emits it), so it is counted too."""
    t = cfg.train
    flat_cfg = dataclasses.replace(
        cfg,
        mesh={"data": 1, "fsdp": 1, "tensor": 1},
        train=dataclasses.replace(t, micro_batch_size=t.global_batch_size, num_devices=None),
    )
    # einsum attention: XLA cannot see inside the splash kernel (it counts ~nothing for it);
    # full logits: the chunked loss is a loop (counted once), so the head is counted unchunked
    # and the chunked loss's one recomputation of the logits (its backward) added by hand
    flat_model = model.replace(scan_layers=False, attention="einsum", cross_entropy="full")
    head_recompute = 0.0
    if model.loss_chunk_for(seq_len) is not None:
        head_recompute = 2.0 * model.vocab_size * model.hidden_size * t.global_batch_size * seq_len
    layout = train_layout(flat_cfg, flat_model, jax.devices("cpu")[:1], 1)
    run = _run(flat_cfg, flat_model, vocab, layout, num_tasks, seq_len)
    with jax.set_mesh(layout.mesh):
        lowered = make_train_fn(run).lower(
            abstract_state(run), _abstract_batch(layout, 1, t.global_batch_size, seq_len)
        )
    return cost_flops(lowered) + head_recompute


def compile_train_step(
    cfg: RunConfig,
    topo: Topology,
    model: ModelConfig,
    vocab,
    num_tasks: int,
    seq_len: int,
    log=print,
) -> CompileReport:
    """Lower and compile `cslm_jax.train.setup`'s step for the topology; memory and FLOPs per chip.
    Mesh and batch errors (ConfigError) come before anything is compiled."""
    devices = topology_devices(topo)
    hosts = len({d.process_index for d in devices})
    layout = train_layout(cfg, model, devices, hosts)
    t = cfg.train
    micro = t.micro_batch_size or t.global_batch_size
    run = _run(cfg, model, vocab, layout, num_tasks, seq_len)
    mesh = dict(layout.mesh.shape)
    log(
        f"compile: {topo.name}, mesh {mesh}, batch {t.global_batch_size} x {seq_len} "
        f"({t.accumulation} x {micro}), remat {model.remat_policy}: compiling..."
    )
    batch = _abstract_batch(layout, t.accumulation, micro, seq_len)
    start = time.perf_counter()
    with jax.set_mesh(layout.mesh):
        memory, error = compile_memory(make_train_fn(run).lower(abstract_state(run), batch))
    elapsed = time.perf_counter() - start
    xla_flops = xla_step_flops(cfg, model, vocab, num_tasks, seq_len)
    model_flops = flops_per_token(model, seq_len) * t.global_batch_size * seq_len
    return CompileReport(
        topo,
        mesh,
        hosts,
        model,
        seq_len,
        t.global_batch_size,
        micro,
        t.accumulation,
        *memory,
        xla_flops,
        model_flops,
        elapsed,
        error,
    )


MEMORY_STATS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
    "peak_memory_in_bytes",
)


def compile_memory(lowered) -> tuple[list[int], str | None]:
    """Compile `lowered`: the per-chip memory figures of the executable (MEMORY_STATS, in that
    order: the reports' argument / output / alias / temp / code / peak bytes) and None; or zeros
    and the compiler's message where it refused for memory (anything else raises)."""
    try:
        stats = lowered.compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "memory" not in msg.lower():
            raise
        return [0] * len(MEMORY_STATS), " ".join(msg.split())[:600]
    return [
        int(getattr(stats, name, 0) or 0) if stats is not None else 0 for name in MEMORY_STATS
    ], None


def check_fit(
    config: str,
    topology: str,
    overrides: list[str],
    model_path: str | None = None,
    speech_units: int | None = None,
    pad_vocab_multiple: int = 128,
    log=print,
) -> CompileReport:
    """Will the run config's train step fit the TPU slice? Input errors (topology, mesh, batch,
    files) are ConfigErrors raised before anything is compiled. `report.fits` says."""
    topo = parse_topology(topology)  # bad names fail before anything else
    cfg = load_run_config(config, overrides)
    check_mesh(cfg, topo)
    if not Path(cfg.data.config).is_file():
        raise ConfigError(f"{config}: data.config {cfg.data.config} does not exist")
    model, vocab = compile_model_config(cfg, model_path, speech_units, pad_vocab_multiple)
    num_tasks, seq_len = stage_shape(cfg)
    # compiling for a topology needs no local accelerator; never start one (or libtpu's TPU
    # search) on this host
    jax.config.update("jax_platforms", "cpu")
    return compile_train_step(cfg, topo, model, vocab, num_tasks, seq_len, log)


# -- searching for the lightest setting that fits ---------------------------------------------------

# Remat policies from the least recomputation to the most: none recomputes nothing; dots keeps
# every matmul result; dots_no_batch recomputes attention's batched products; qkv_proj keeps only
# q/k/v and the two block outputs; full recomputes the whole forward.
REMAT_ORDER = ("none", "dots", "dots_no_batch", "qkv_proj", "full")


def micro_batch_candidates(global_batch: int, ways: int) -> list[int]:
    """Micro-batches that divide the global batch and give every data x fsdp shard whole rows,
    largest first."""
    return [m for m in range(global_batch, 0, -1) if global_batch % m == 0 and m % ways == 0]


@dataclasses.dataclass
class SearchResult:
    best: CompileReport | None  # the lightest remat, then the largest micro-batch
    attempts: list  # (remat, micro-batch, CompileReport) in order


def search_fit(
    config: str,
    topology: str,
    overrides: list[str],
    model_path: str | None = None,
    speech_units: int | None = None,
    pad_vocab_multiple: int = 128,
    policies: tuple[str, ...] = REMAT_ORDER,
    log=print,
    fit=None,
) -> SearchResult:
    """The lightest remat policy (`REMAT_ORDER`) with which some micro-batch fits the slice, and
    the largest micro-batch that fits with it: per policy, the smallest micro-batch first (if
    even that does not fit, the next policy), then a binary search over the larger ones (memory
    grows with the micro-batch). `fit(overrides) -> CompileReport` compiles one setting
    (default: `check_fit` with these arguments)."""
    topo = parse_topology(topology)
    cfg = load_run_config(config, overrides)
    sizes = check_mesh(cfg, topo)
    candidates = micro_batch_candidates(cfg.train.global_batch_size, sizes["data"] * sizes["fsdp"])
    if not candidates:
        raise ConfigError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) has no divisor "
            f"that is a multiple of the mesh's data x fsdp size on {topo.name}"
        )
    fit = fit or (
        lambda extra: check_fit(
            config,
            topology,
            list(overrides) + extra,
            model_path,
            speech_units,
            pad_vocab_multiple,
            log=lambda *_: None,
        )
    )
    attempts: list = []

    def attempt(policy: str, micro: int) -> CompileReport:
        report = fit([f"model.remat_policy={policy}", f"train.micro_batch_size={micro}"])
        attempts.append((policy, micro, report))
        log(
            f"search: remat {policy:<13} micro-batch {micro:>5}: "
            f"{'fits' if report.fits else 'does not fit'}"
            + (
                f" (compiler: {report.error[:300]})"
                if report.error
                else f" ({gib(report.used_bytes)} of {gib(topo.hbm_bytes)})"
            )
        )
        return report

    for policy in policies:
        smallest = attempt(policy, candidates[-1])
        if not smallest.fits:
            continue
        best, lo, hi = smallest, 0, len(candidates) - 1  # candidates[hi] fits
        while lo < hi:  # largest fitting: smallest index
            mid = (lo + hi) // 2
            report = attempt(policy, candidates[mid])
            if report.fits:
                best, hi = report, mid
            else:
                lo = mid + 1
        return SearchResult(best, attempts)
    return SearchResult(None, attempts)
