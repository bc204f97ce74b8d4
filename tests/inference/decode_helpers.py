"""Test helpers of decode: logits of whole sequences through its rolling KV cache a chunk at a time (a
reference for the cached path: chunk=1 is step-by-step cached decoding), and forgetting compiled programs."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mistral_jax.inference import decode
from mistral_jax.inference.decode import Dtype, _new_cache, _prefill
from mistral_jax.model import cache as kv_cache
from mistral_jax.model import packing, sharding
from mistral_jax.model.config import ModelConfig


def forward_cached(params: Any, tokens_BT: jax.Array, *, cfg: ModelConfig, chunk: int,
                   cache_len: int | None = None, dtype: Dtype = jnp.float32) -> jax.Array:
    """Logits (B, T, V) of full sequences computed through the rolling cache, `chunk` tokens at a time.

    chunk=1 is step-by-step cached decoding. T is padded up to a multiple of chunk internally.
    cache_len (default: the window, or T without one) may not be smaller than that: a shorter cache
    would drop keys that queries must see.
    """
    T = tokens_BT.shape[1]
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"forward_cached: chunk must be an integer >= 1, got {chunk!r}")
    need = kv_cache.cache_size(cfg, T)
    if cache_len is not None and cache_len < need:
        window = f"the window {cfg.sliding_window}" if cfg.sliding_window is not None else "no window"
        raise ValueError(f"forward_cached: cache_len {cache_len} is smaller than the {need} slots required for "
                         f"{T} tokens with {window}")
    return _forward_cached(packing.pack(params), tokens_BT, cfg=cfg, chunk=chunk, cache_len=cache_len or need,
                           dtype=dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "chunk", "cache_len"))
def _forward_cached(params, tokens_BT, *, cfg: ModelConfig, chunk: int, cache_len: int, dtype: Dtype):
    B, T = tokens_BT.shape
    L = -(-T // chunk) * chunk
    tokens_BL = jnp.pad(tokens_BT, ((0, 0), (0, L - T)))
    with sharding.with_rules():
        logits, _ = _prefill(params, cfg, dtype, tokens_BL, jnp.full((B,), T, jnp.int32),
                             _new_cache(cfg, B, cache_len, dtype), chunk, all_logits=True)
    return logits[:, :T]


def clear_programs() -> None:
    """Drops every compiled generate program (the fused and the plain jit), so `decode.compiled_programs`
    counts from zero."""
    decode._generate.clear_cache()
    decode._generate_fused.clear_cache()
