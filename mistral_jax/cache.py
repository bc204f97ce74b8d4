"""Rolling-buffer KV cache: fixed size C per layer, position p stored at slot p mod C.

Each layer's cache is a dict {"k": (B, C, K, H), "v": (B, C, K, H), "pos": (B, C) int32}; "pos"
holds the absolute position stored in each slot (-1 when empty), so the attention mask is computed
from positions like everywhere else and the memory never grows with generated length.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mistral_jax.config import ModelConfig

LayerCache = dict[str, jax.Array]


def cache_size(cfg: ModelConfig, max_len: int) -> int:
    """Slots needed: the window when there is one (never more than max_len), else max_len."""
    if max_len < 1:
        raise ValueError(f"cache_size: max_len must be >= 1, got {max_len}")
    return min(cfg.sliding_window, max_len) if cfg.sliding_window is not None else max_len


def init_cache(cfg: ModelConfig, batch: int, size: int, dtype: Any = jnp.float32) -> list[LayerCache]:
    """An empty cache: one dict per layer."""
    def layer() -> LayerCache:
        return {"k": jnp.zeros((batch, size, cfg.n_kv_heads, cfg.head_dim), dtype),
                "v": jnp.zeros((batch, size, cfg.n_kv_heads, cfg.head_dim), dtype),
                "pos": jnp.full((batch, size), -1, jnp.int32)}
    return [layer() for _ in range(cfg.n_layers)]


def cache_logical_axes() -> dict[str, tuple[str, ...]]:
    return {"k": ("batch", "cache_length", "act_kv_heads", "head_dim"),
            "v": ("batch", "cache_length", "act_kv_heads", "head_dim"),
            "pos": ("batch", "cache_length")}


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
    return {"k": cache["k"].at[b_B1, slot_BT].set(k_BTKH.astype(cache["k"].dtype), mode="drop"),
            "v": cache["v"].at[b_B1, slot_BT].set(v_BTKH.astype(cache["v"].dtype), mode="drop"),
            "pos": cache["pos"].at[b_B1, slot_BT].set(pos_BT.astype(jnp.int32), mode="drop")}


def cache_bytes(cache: Any) -> int:
    """Total bytes held by a cache pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
