"""bfloat16 weights carried as their uint16 bits into XLA:CPU programs, so no program widens them.

XLA:CPU has no bfloat16 arithmetic: before compiling, it rewrites every bfloat16 op (dot, but also the
dynamic-slice that picks one layer out of the stacked weights, a gather, a reshape) to float32 with converts
around it. For the layer scan that means `convert(all layers' weights)`, which loop-invariant code motion
then hoists out of the scan and out of the decode loop: one float32 copy of the whole model per loop (the
7B generate program asked for two, 58 GB). Integer ops are left alone, so a program that receives each
bfloat16 weight as a uint16 array of the same bits slices it as integers and turns only the slice it uses
back into bfloat16 (`unpack`, a free bitcast) right where the model reads it.

`pack` makes those uint16 views without copying (on the CPU backend they share the bfloat16 buffers);
other backends compute in bfloat16 natively and get the tree back unchanged. Packed leaves cannot be
differentiated: pack only what a program reads (inference params, LoRA's frozen base), never what it trains.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

PACKED = jnp.uint16  # the dtype of a packed bfloat16 weight


def on_cpu(devices: Iterable[jax.Device]) -> bool:
    """Whether every one of `devices` is a CPU device (where bfloat16 weights are packed)."""
    return all(d.platform == "cpu" for d in devices)


def _pack_leaf(x: Any) -> Any:
    if not isinstance(x, jax.Array) or x.dtype != jnp.bfloat16 or not on_cpu(x.sharding.device_set):
        return x
    if isinstance(x, jax.core.Tracer):  # inside a trace there is no buffer to share
        return jax.lax.bitcast_convert_type(x, PACKED)
    # each shard's host buffer viewed as uint16 and placed back on its device: no bytes are copied
    shards = [jax.device_put(np.asarray(s.data).view(np.uint16), s.device) for s in x.addressable_shards]
    return jax.make_array_from_single_device_arrays(x.shape, x.sharding, shards)


def pack(tree: Any) -> Any:
    """`tree` with each bfloat16 array on the CPU backend replaced by a uint16 array sharing its memory (same
    shape and sharding); every other leaf, and every leaf on other backends, as it is."""
    return jax.tree_util.tree_map(_pack_leaf, tree)


def unpack(w: jax.Array) -> jax.Array:
    """A packed weight back as bfloat16 (a bitcast); any other array unchanged. For use inside programs."""
    return jax.lax.bitcast_convert_type(w, jnp.bfloat16) if w.dtype == PACKED else w


def unpack_after(w: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(unpack(w), x), where a packed w is unpacked only once x exists: a packed weight read inside a loop
    whose other inputs are loop-invariant (the output head in the decode loop) would otherwise have its
    float32 widening hoisted out of the loop and kept for the whole program. Other arrays: (w, x)."""
    if w.dtype != PACKED:
        return w, x
    w, x = jax.lax.optimization_barrier((w, x))
    return unpack(w), x
