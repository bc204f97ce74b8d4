"""Rolling-buffer KV cache: fixed size C per layer, position p stored at slot p mod C.

The model's cache is one dict of layer-stacked arrays {"k": (L, B, C, K, H), "v": (L, B, C, K, H),
"pos": (L, B, C) int32}, scanned alongside the stacked layer params; a layer sees its slice
{"k": (B, C, K, H), "v": ..., "pos": (B, C)} and returns its chunk's keys and values, which
`write_layers` stores for all layers at once after the layer loop (so the loop never copies the cache).
"pos" holds the absolute position stored in each slot (-1 when empty), so the attention mask is computed
from positions like everywhere else and the memory never grows with generated length. (Every layer
writes the same positions; "pos" is kept per layer so a layer's slice is self-contained; it is
1/(2*K*H) of the cache.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mistral_jax.model import packing
from mistral_jax.model.config import ModelConfig

LayerCache = dict[str, jax.Array]   # one layer: k/v (B, C, K, H), pos (B, C)
Cache = dict[str, jax.Array]        # all layers stacked: k/v (L, B, C, K, H), pos (L, B, C)


def cache_size(cfg: ModelConfig, max_len: int) -> int:
    """Slots needed: the window when there is one (never more than max_len), else max_len."""
    if max_len < 1:
        raise ValueError(f"cache_size: max_len must be >= 1, got {max_len}")
    return min(cfg.sliding_window, max_len) if cfg.sliding_window is not None else max_len


def storage_dtype(dtype: Any) -> Any:
    """The dtype k/v are stored in for compute dtype `dtype`: bfloat16 as its uint16 bits on the CPU backend
    (packing.py: XLA:CPU would otherwise widen the whole stacked cache to float32 to slice one layer)."""
    dtype = jnp.dtype(dtype)
    return packing.PACKED if dtype == jnp.bfloat16 and jax.default_backend() == "cpu" else dtype


def init_cache(cfg: ModelConfig, batch: int, size: int, dtype: Any = jnp.float32) -> Cache:
    """An empty cache: layer-stacked k/v (L, B, C, K, H) and slot positions (L, B, C), all -1. k/v are
    stored in `storage_dtype(dtype)` (zero bits are 0.0 either way); read them with `read`."""
    L, K, H = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    dtype = storage_dtype(dtype)
    return {"k": jnp.zeros((L, batch, size, K, H), dtype),
            "v": jnp.zeros((L, batch, size, K, H), dtype),
            "pos": jnp.full((L, batch, size), -1, jnp.int32)}


def cache_logical_axes() -> dict[str, tuple[str, ...]]:
    """Logical axes of the stacked cache's arrays (the layer axis is never sharded)."""
    return {"k": ("layers", "batch", "cache_length", "act_kv_heads", "head_dim"),
            "v": ("layers", "batch", "cache_length", "act_kv_heads", "head_dim"),
            "pos": ("layers", "batch", "cache_length")}


def write(cache: LayerCache, k_BTKH: jax.Array, v_BTKH: jax.Array, pos_BT: jax.Array) -> LayerCache:
    """Stores a chunk at slots pos mod C; tokens with pos < 0 (padding) are not written.

    The valid tokens of a row hold consecutive positions; when a chunk is longer than the cache only
    its last C tokens are written (earlier ones would be overwritten anyway), so slots never collide.
    """
    B, C = cache["pos"].shape
    last_B1 = jnp.max(pos_BT, axis=1, keepdims=True)
    keep_BT = (pos_BT >= 0) & (pos_BT > last_B1 - C)
    slot_BT = jnp.where(keep_BT, pos_BT % C, C)  # slot C is out of range: dropped
    b_B1 = jnp.arange(B)[:, None]
    return {"k": cache["k"].at[b_B1, slot_BT].set(stored(k_BTKH, cache["k"].dtype), mode="drop"),
            "v": cache["v"].at[b_B1, slot_BT].set(stored(v_BTKH, cache["v"].dtype), mode="drop"),
            "pos": cache["pos"].at[b_B1, slot_BT].set(pos_BT.astype(jnp.int32), mode="drop")}


def write_layers(cache: Cache, k_LBTKH: jax.Array, v_LBTKH: jax.Array, pos_BT: jax.Array) -> Cache:
    """`write` for every layer of the stacked cache at once (each layer's chunk of keys and values,
    the same positions); one scatter per array, in place where the cache buffer is donated or carried."""
    return jax.vmap(write, in_axes=(0, 0, 0, None))(cache, k_LBTKH, v_LBTKH, pos_BT)


def stored(x: jax.Array, dtype: Any) -> jax.Array:
    """x as the cache stores it in `dtype` (see `storage_dtype`); x already in dtype is returned as is."""
    if x.dtype == dtype:
        return x
    if dtype == packing.PACKED:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), packing.PACKED)
    return x.astype(dtype)


def read(x: jax.Array, dtype: Any) -> jax.Array:
    """Stored k or v (any leading shape) as `dtype`."""
    return packing.unpack(x).astype(dtype)


def cache_bytes(cache: Any) -> int:
    """Total bytes held by a cache pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
