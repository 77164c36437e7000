"""Causal self-attention through Pallas splash attention (`jax.experimental.pallas.ops.tpu`).

`splash_attend(q, k, v, segment_ids)` computes what `cslm_jax.model.layers.causal_attend`
computes under `attention_mask(segment_ids)` (causal by index within a row, never across packed
segments), grouped-query heads included, without materialising [B, H, T, T] scores: the kernel
walks blocks of queries and keys, skips the blocks the causal mask empties, and has its own
backward pass. On TPU it runs as a Mosaic kernel; anywhere else it runs in Pallas interpret mode
(slow, for correctness tests on CPU).

Block sizes are chosen per sequence length (the largest of 512, 256, 128 that divides the
length); a length that is not a multiple of 128 is padded to one with its own segment (padding
queries see only padding keys, so no row of the mask is empty) and the padding is cut off again.

A Mosaic kernel cannot be partitioned by XLA's SPMD partitioner, so under a mesh the call runs
inside `shard_map`: the batch axis split over the mesh's `data` x `fsdp` axes, the heads over
`tensor` (when they divide), each device running the kernel on its own rows and heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

BLOCKS = (512, 256, 128)


def block_size(length: int) -> int:
    """The kernel's query/key block for rows of `length` (a multiple of 128)."""
    for b in BLOCKS:
        if length % b == 0:
            return b
    raise ValueError(f"splash attention needs a length that is a multiple of 128, got {length}")


def _kernel(heads: int, length: int, interpret: bool):
    """A splash kernel for causal attention over `heads` heads of `length` tokens. Built anew in
    each trace (cheap: the block tables come from numpy): the kernel holds them as arrays of the
    trace it was built in, so a kernel kept across traces would leak them."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b = block_size(length)
    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
    sizes = sk.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    return sk.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _attend_local(q, k, v, segment_ids, interpret: bool):
    """q [B, T, H, Dh], k, v [B, T, K, Dh], segment_ids [B, T] on one device's rows."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, t, h, dh = q.shape
    pad = (-t) % 128
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
        # padding gets a segment id no real token has
        segment_ids = jnp.pad(
            segment_ids, ((0, 0), (0, pad)), constant_values=np.iinfo(np.int32).min
        )
    kernel = _kernel(h, t + pad, interpret)
    scale = dh**-0.5
    qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [B, H, T, Dh]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, Dh]

    def one(qb, kb, vb, sb):
        return kernel(qb, kb, vb, segment_ids=SegmentIds(q=sb, kv=sb))

    out = jax.vmap(one)(qh, kh, vh, segment_ids.astype(jnp.int32))  # [B, H, T, Dh]
    return out.transpose(0, 2, 1, 3)[:, :t]


def target_platform() -> str:
    """The platform the computation being traced runs on: the current mesh's devices (an ahead-
    of-time compile for a TPU slice traces on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def splash_attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    interpret: bool | None = None,
) -> jax.Array:
    """q [B, T, H, Dh], k, v [B, T, K, Dh] (H a multiple of K), segment_ids [B, T] int ->
    [B, T, H, Dh]: causal attention within segments, as `causal_attend` with
    `attention_mask(segment_ids)`. `interpret` defaults to True unless the target is a TPU."""
    if interpret is None:
        interpret = target_platform() != "tpu"
    mesh = jax.sharding.get_abstract_mesh()
    fn = functools.partial(_attend_local, interpret=interpret)
    if mesh is None or mesh.empty or not {"data", "fsdp", "tensor"} <= set(mesh.axis_names):
        return fn(q, k, v, segment_ids)
    from jax.sharding import PartitionSpec as P

    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
    heads = (
        "tensor"
        if (
            mesh.shape["tensor"] > 1
            and q.shape[2] % mesh.shape["tensor"] == 0
            and k.shape[2] % mesh.shape["tensor"] == 0
        )
        else None
    )
    qkv_spec = P(batch_axes, None, heads, None)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch_axes, None)),
        out_specs=qkv_spec,
        check_vma=False,
    )(q, k, v, segment_ids)
