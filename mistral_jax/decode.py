"""Cached inference: chunked prefill into a rolling-buffer cache and a jitted batch decoder.

Prompts in a batch are right-padded; padding carries position -1, so it is neither written to the
cache nor seen by any query. The whole generation (prefill scan + decode while-loop) is one jit
program per (batch shape, settings).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mistral_jax import cache as kv_cache
from mistral_jax import model as model_lib
from mistral_jax import sharding
from mistral_jax.config import ModelConfig

Dtype = Any


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits_BV: jax.Array, key: jax.Array, s: SamplingConfig) -> jax.Array:
    """Next token ids (B,) from float32 logits under the sampling settings."""
    if s.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / s.temperature
    neg = jnp.finfo(jnp.float32).min
    if s.top_k:
        kth_B1 = jax.lax.top_k(logits_BV, min(s.top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, neg, logits_BV)
    if s.top_p < 1:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV     # mass strictly above each token
        cutoff_B1 = jnp.min(jnp.where(before_BV < s.top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, neg, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _apply(params, cfg: ModelConfig, dtype: Dtype, tokens_BT, pos_BT, cache, logit_index_B=None):
    return model_lib.Transformer(cfg, dtype=dtype).apply(
        {"params": params}, tokens_BT, pos_BT, cache=cache, logit_index_B=logit_index_B)


def _new_cache(cfg: ModelConfig, batch: int, size: int, dtype: Dtype) -> list[kv_cache.LayerCache]:
    axes = kv_cache.cache_logical_axes()
    return [{k: nn.with_logical_constraint(v, axes[k]) for k, v in layer.items()}
            for layer in kv_cache.init_cache(cfg, batch, size, dtype)]


def _prefill(params, cfg: ModelConfig, dtype: Dtype, tokens_BL, lengths_B, cache, chunk: int,
             all_logits: bool):
    """Runs right-padded prompts through the cache in chunks (L must be a multiple of chunk).

    Returns (logits, cache): all logits (B, L, V) if all_logits, else each row's last-token logits (B, V).
    """
    B, L = tokens_BL.shape
    n = L // chunk
    idx_L = jnp.arange(L, dtype=jnp.int32)
    pos_BL = jnp.where(idx_L[None] < lengths_B[:, None], idx_L[None], -1)
    xs = (tokens_BL.reshape(B, n, chunk).swapaxes(0, 1), pos_BL.reshape(B, n, chunk).swapaxes(0, 1),
          jnp.arange(n, dtype=jnp.int32))

    def body(carry, x):
        cache, last_BV = carry
        tok_Bc, pos_Bc, j = x
        if all_logits:
            logits_BcV, cache = _apply(params, cfg, dtype, tok_Bc, pos_Bc, cache)
            return (cache, last_BV), logits_BcV
        rel_B = lengths_B - 1 - j * chunk
        logits_B1V, cache = _apply(params, cfg, dtype, tok_Bc, pos_Bc, cache, jnp.clip(rel_B, 0, chunk - 1))
        inside_B = (rel_B >= 0) & (rel_B < chunk)
        return (cache, jnp.where(inside_B[:, None], logits_B1V[:, 0], last_BV)), None

    last0 = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    (cache, last_BV), logits_nBcV = jax.lax.scan(body, (cache, last0), xs)
    if all_logits:
        return logits_nBcV.swapaxes(0, 1).reshape(B, L, cfg.vocab_size), cache
    return last_BV, cache


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "chunk", "cache_len"))
def forward_cached(params, tokens_BT: jax.Array, *, cfg: ModelConfig, chunk: int, cache_len: int | None = None,
                   dtype: Dtype = jnp.float32) -> jax.Array:
    """Logits (B, T, V) of full sequences computed through the rolling cache, `chunk` tokens at a time.

    chunk=1 is step-by-step cached decoding. T is padded up to a multiple of chunk internally.
    """
    B, T = tokens_BT.shape
    L = -(-T // chunk) * chunk
    tokens_BL = jnp.pad(tokens_BT, ((0, 0), (0, L - T)))
    size = cache_len or kv_cache.cache_size(cfg, T)
    with sharding.with_rules():
        logits, _ = _prefill(params, cfg, dtype, tokens_BL, jnp.full((B,), T, jnp.int32),
                             _new_cache(cfg, B, size, dtype), chunk, all_logits=True)
    return logits[:, :T]


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "chunk", "cache_len", "max_new", "sampling",
                                             "eos_id"))
def _generate(params, tokens_BL, lengths_B, key, *, cfg: ModelConfig, dtype: Dtype, chunk: int,
              cache_len: int, max_new: int, sampling: SamplingConfig, eos_id: int):
    B = tokens_BL.shape[0]
    with sharding.with_rules():
        cache = _new_cache(cfg, B, cache_len, dtype)
        last_BV, cache = _prefill(params, cfg, dtype, tokens_BL, lengths_B, cache, chunk, all_logits=False)
        tok_B = sample(last_BV, jax.random.fold_in(key, 0), sampling)
        out_BN = jnp.full((B, max_new), -1, jnp.int32).at[:, 0].set(tok_B)
        done_B = tok_B == eos_id

        def cond(state):
            t, _, _, done_B, _ = state
            return (t < max_new) & ~jnp.all(done_B)

        def step(state):
            t, tok_B, cache, done_B, out_BN = state
            pos_B = lengths_B + t - 1
            logits_B1V, cache = _apply(params, cfg, dtype, tok_B[:, None], pos_B[:, None], cache)
            nxt_B = sample(logits_B1V[:, 0], jax.random.fold_in(key, t), sampling)
            out_BN = jax.lax.dynamic_update_slice(out_BN, jnp.where(done_B, -1, nxt_B)[:, None], (0, t))
            return t + 1, nxt_B, cache, done_B | (nxt_B == eos_id), out_BN

        _, _, cache, _, out_BN = jax.lax.while_loop(cond, step, (jnp.int32(1), tok_B, cache, done_B, out_BN))
    return out_BN, cache


@dataclasses.dataclass
class Generation:
    """Completion ids per prompt (EOS excluded) and whether each stopped on EOS."""
    tokens: list[list[int]]
    stopped_on_eos: list[bool]
    cache_bytes: int


def generate(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             mesh: Mesh | None = None, dtype: Dtype = jnp.float32, prefill_chunk: int | None = None,
             eos_id: int | None = None, return_info: bool = False) -> list[list[int]] | Generation:
    """Generates up to max_new_tokens per prompt; returns completion ids (EOS excluded) per prompt.

    Prompts may differ in length. The prompt goes through the cache in chunks of `prefill_chunk`
    tokens (default: the sliding window, or the whole prompt without one). With a mesh, params and
    the batch are placed on it (batch over data x fsdp, padded to a multiple of that).
    """
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("generate: no prompts given")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    for i, p in enumerate(prompts):
        check_prompt(p, cfg, max_new_tokens, index=i)
    sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
    eos = cfg.eos_id if eos_id is None else eos_id
    n_real = len(prompts)
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        prompts += [[cfg.bos_id]] * (-len(prompts) % shards)
    lengths = np.array([len(p) for p in prompts], np.int32)
    total = int(lengths.max()) + max_new_tokens
    cache_len = kv_cache.cache_size(cfg, total)
    chunk = prefill_chunk or (cfg.sliding_window or int(lengths.max()))
    if chunk < 1:
        raise ValueError(f"generate: prefill_chunk must be >= 1, got {prefill_chunk}")
    chunk = min(chunk, int(lengths.max()))
    L = -(-int(lengths.max()) // chunk) * chunk
    tokens = np.zeros((len(prompts), L), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    if mesh is not None:
        params = jax.device_put(params, model_lib.param_shardings(cfg, mesh))
        tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
        lengths = jax.device_put(lengths, sharding.batch_sharding(mesh, 1))
    out, cache = _generate(params, tokens, lengths, jax.random.key(seed), cfg=cfg, dtype=dtype, chunk=chunk,
                           cache_len=cache_len, max_new=max_new_tokens, sampling=sampling, eos_id=eos)
    out = np.asarray(out)[:n_real]
    completions, stopped = [], []
    for row in out:
        row = row[row >= 0].tolist()
        hit = eos in row
        completions.append(row[:row.index(eos)] if hit else row)
        stopped.append(hit)
    if return_info:
        return Generation(completions, stopped, kv_cache.cache_bytes(cache))
    return completions


def check_prompt(prompt: Sequence[int], cfg: ModelConfig, max_new_tokens: int, index: int = 0) -> None:
    """Raises ValueError naming the prompt when it is empty, too long or has out-of-vocab ids."""
    if len(prompt) == 0:
        raise ValueError(f"prompt {index}: empty prompt")
    if len(prompt) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt {index}: {len(prompt)} tokens + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's max_seq_len {cfg.max_seq_len}")
    bad = [t for t in prompt if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise ValueError(f"prompt {index}: token id(s) {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
