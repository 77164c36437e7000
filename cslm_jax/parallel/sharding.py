"""Device meshes and sharding by logical axis names.

Every parameter and key activation carries logical axis names (`embed`, `heads`, `vocab`, ...).
One rules table maps each logical name to zero or more mesh axes (`data`, `fsdp`, `tensor`);
changing parallelism is a config edit. The table below is the project's default; run configs may
replace it (`sharding.logical_axis_rules`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cslm_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def normalize_rules(rules: Mapping[str, object] | None) -> dict[str, tuple[str, ...]]:
    """Rules as {logical: (mesh axes...)}, validated against MESH_AXES."""
    rules = DEFAULT_RULES if rules is None else rules
    out: dict[str, tuple[str, ...]] = {}
    for logical, target in rules.items():
        if target is None:
            axes: tuple[str, ...] = ()
        elif isinstance(target, str):
            axes = (target,)
        elif isinstance(target, (list, tuple)):
            axes = tuple(target)
        else:
            raise ConfigError(
                f"sharding rule for '{logical}': expected a mesh axis, a list of "
                f"mesh axes or null, got {target!r}"
            )
        for axis in axes:
            if axis not in MESH_AXES:
                raise ConfigError(
                    f"sharding rule for '{logical}' names mesh axis {axis!r}; "
                    f"mesh axes are {MESH_AXES}"
                )
        out[logical] = axes
    return out


def mesh_sizes(
    shape: Mapping[str, int] | None, count: int, slice_name: str | None = None
) -> dict[str, int]:
    """{axis: size} of the mesh that `shape` (a config's `mesh`; one size may be -1: it takes the
    remaining devices) asks for over `count` devices: this host's (`slice_name` None) or the chips
    of a TPU slice (`cslm-jax compile`; messages then name the slice). The one resolution behind
    `make_mesh` and `cslm_jax.tpu.aot.check_mesh`; raises ConfigError when it does not fit."""
    shape = dict({"data": 1, "fsdp": -1, "tensor": 1} if shape is None else shape)
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh: unknown axis name(s) {unknown}; mesh axes are {MESH_AXES}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    values = list(sizes.values())
    if values.count(-1) > 1:
        raise ConfigError(f"mesh {shape}: at most one axis may be -1")
    if any(v == 0 or v < -1 for v in values):
        raise ConfigError(f"mesh {shape}: sizes must be positive (or -1 for the rest)")
    known = math.prod(v for v in values if v != -1)
    if -1 in values:
        if count % known:
            raise ConfigError(
                f"mesh {shape}: {count} devices are not divisible by {known}"
                if slice_name is None
                else f"mesh {shape}: the fixed axes ({known} ways) do not divide the {count} chips "
                f"of {slice_name}"
            )
        return {axis: count // known if v == -1 else v for axis, v in sizes.items()}
    if known != count:
        raise ConfigError(
            f"mesh {sizes} needs {known} devices, but {count} are available"
            if slice_name is None
            else f"mesh {sizes} needs {known} devices, but {slice_name} has {count} chips; make "
            f"the sizes multiply to {count} (or set one to -1)"
        )
    return sizes


def check_batch_split(
    micro_batch: int, sizes: Mapping[str, int], slice_name: str | None = None
) -> None:
    """Every data x fsdp shard of the mesh `sizes` needs whole rows of each micro-batch."""
    ways = sizes["data"] * sizes["fsdp"]
    if micro_batch % ways:
        where, unit = ("", "device") if slice_name is None else (f" on {slice_name}", "chip")
        raise ConfigError(
            f"train.micro_batch_size ({micro_batch}) must be a multiple of the mesh's "
            f"data x fsdp size ({ways}){where}: each {unit} needs whole rows; move "
            f"ways to mesh.tensor or change the batch"
        )


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over ('data', 'fsdp', 'tensor') with the sizes `mesh_sizes` resolves (default: all
    devices on fsdp)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(shape, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(
        tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=auto, devices=devices
    )


def logical_to_spec(
    names: Sequence[str | None],
    rules: Mapping[str, object] | None = None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    what: str = "array",
) -> PartitionSpec:
    """PartitionSpec for an array whose dims carry `names`.

    A mesh axis is used at most once per array (first dim wins); axes of size 1 are dropped.
    With `shape` and `mesh`, a dim that the chosen axes do not divide is an error naming `what`.
    """
    table = normalize_rules(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ConfigError(
                f"{what}: logical axis '{name}' has no sharding rule; add it to "
                f"sharding.logical_axis_rules"
            )
        axes = tuple(
            a for a in table[name] if a not in used and (mesh is None or mesh.shape[a] > 1)
        )
        if shape is not None and mesh is not None and axes:
            ways = int(np.prod([mesh.shape[a] for a in axes]))
            if shape[dim] % ways:
                raise ConfigError(
                    f"{what}: dim {dim} ('{name}', size {shape[dim]}) is not divisible "
                    f"by mesh axes {axes} ({ways} ways); change the mesh or the rule"
                )
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names, rules=None, shape=None, what="array") -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules, shape, mesh, what))


def constrain(x: jax.Array, names: Sequence[str | None], rules=None) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current mesh (`jax.set_mesh`);
    the identity when no mesh is set, so single-device code pays nothing."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or set(mesh.axis_names) != set(MESH_AXES):
        return x
    spec = logical_to_spec(names, rules, x.shape, mesh, what="activation")
    return jax.lax.with_sharding_constraint(x, spec)
