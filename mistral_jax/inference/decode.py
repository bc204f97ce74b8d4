"""Cached inference: chunked prefill into a rolling-buffer cache and a jitted batch decoder.

Prompts in a batch are right-padded; padding carries position -1, so it is neither written to the
cache nor seen by any query. The whole generation (prefill scan + decode while-loop) is one jit
program per (batch size, static shapes, settings); the static shapes (padded prompt length, prefill
chunk, cache length, output length) are rounded up to a few length buckets (`decode_shapes`), so a
job over prompts of many lengths compiles a handful of programs (`compiled_programs` counts them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mistral_jax.model import cache as kv_cache
from mistral_jax.runtime import distributed
from mistral_jax.inference.buckets import bucket_for, length_buckets
from mistral_jax.inference.head import transposed_head, uses_transposed_head
from mistral_jax.model import matvec
from mistral_jax.model import transformer as model_lib
from mistral_jax.model import packing
from mistral_jax.model import sharding
from mistral_jax.model.config import ModelConfig

Dtype = Any


MAX_SEED = 2**32 - 1     # jax.random.key keeps only 32 bits of a seed without x64: larger seeds would collide
MAX_ROW_ID = 2**32 - 1   # jax.random.fold_in takes uint32 data
SMALLEST_BUCKET = 64     # default smallest length bucket of decode_shapes


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters.

    Sampling draws from softmax(logits / temperature) restricted to the top_k most likely tokens (exactly
    k; ties at the k-th value go to the lower token id), renormalised, then restricted to the smallest
    prefix of those, in descending order, whose mass reaches top_p, renormalised again.
    """
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def row_keys(seed: int, row_ids: jax.Array) -> jax.Array:
    """Per-row sampling keys (B,): fold_in(key(seed), row_id); a row's draws depend only on (seed, row id)."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(row_ids)


def first_argmax(logits_BV: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` as int32 (B,): the first maximum, or the first NaN. Written as a max and a
    masked min over the ids, two plain reductions: XLA:CPU's (value, index) reduction was about 2x slower
    at the (8, 32000) logits of a decode step (485 vs 327 us; 3.2 vs 1.5 ms at batch 64)."""
    m_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
    ids_BV = jax.lax.broadcasted_iota(jnp.int32, logits_BV.shape, logits_BV.ndim - 1)
    hit_BV = (logits_BV == m_B1) | jnp.isnan(logits_BV)
    return jnp.min(jnp.where(hit_BV, ids_BV, logits_BV.shape[-1]), axis=-1)


def sample(logits_BV: jax.Array, key: jax.Array, s: SamplingConfig) -> jax.Array:
    """Next token ids (B,) from logits (B, V) under the sampling settings (see SamplingConfig).

    key: one key (rows get independent draws from it) or one key per row, shape (B,).
    """
    if s.temperature == 0:
        return first_argmax(logits_BV)
    logits_BV = logits_BV.astype(jnp.float32) / s.temperature
    V = logits_BV.shape[-1]
    if key.ndim == 0:
        draw = lambda lg: jax.random.categorical(key, lg, axis=-1)  # noqa: E731
    else:
        draw = lambda lg: jax.vmap(jax.random.categorical)(key, lg)  # noqa: E731
    if not s.top_k and s.top_p >= 1:
        return draw(logits_BV).astype(jnp.int32)
    # Candidates in descending order (lax.top_k: exactly k, ties broken towards the lower id).
    vals_BK, idx_BK = jax.lax.top_k(logits_BV, min(s.top_k or V, V))
    if s.top_p < 1:
        probs_BK = jax.nn.softmax(vals_BK, axis=-1)
        before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK      # mass strictly before each candidate
        vals_BK = jnp.where(before_BK < s.top_p, vals_BK, -jnp.inf)  # the first candidate always stays
    j_B = draw(vals_BK)
    return jnp.take_along_axis(idx_BK, j_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _apply(params, cfg: ModelConfig, dtype: Dtype, tokens_BT, pos_BT, cache, logit_index_B=None, fused=False,
           scan_layers=True, head_VD=None):
    return model_lib.Transformer(cfg, dtype=dtype, fused_matvec=fused, scan_layers=scan_layers).apply(
        {"params": params}, tokens_BT, pos_BT, cache=cache, logit_index_B=logit_index_B, head_VD=head_VD)


def _new_cache(cfg: ModelConfig, batch: int, size: int, dtype: Dtype) -> kv_cache.Cache:
    axes = kv_cache.cache_logical_axes()
    return {k: nn.with_logical_constraint(v, axes[k]) for k, v in kv_cache.init_cache(cfg, batch, size, dtype).items()}


def _prefill(params, cfg: ModelConfig, dtype: Dtype, tokens_BL, lengths_B, cache, chunk: int,
             all_logits: bool, head_VD=None):
    """Runs right-padded prompts through the cache in chunks (L must be a multiple of chunk).

    Returns (logits, cache): all logits (B, L, V) if all_logits, else each row's last-token logits (B, V)
    (computed with head_VD when given).
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

        def run(cache):
            logits_B1V, cache = _apply(params, cfg, dtype, tok_Bc, pos_Bc, cache, jnp.clip(rel_B, 0, chunk - 1),
                                       head_VD=head_VD)
            inside_B = (rel_B >= 0) & (rel_B < chunk)
            return cache, jnp.where(inside_B[:, None], logits_B1V[:, 0], last_BV)

        # a chunk that is padding in every row (prompts padded up to a length bucket) does no work
        return jax.lax.cond(jnp.any(pos_Bc >= 0), run, lambda cache: (cache, last_BV), cache), None

    last0 = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    (cache, last_BV), logits_nBcV = jax.lax.scan(body, (cache, last0), xs)
    if all_logits:
        return logits_nBcV.swapaxes(0, 1).reshape(B, L, cfg.vocab_size), cache
    return last_BV, cache


@dataclasses.dataclass(frozen=True)
class DecodeShapes:
    """The static shapes of one generate program.

    prompt_len: padded prompt length (a multiple of chunk); chunk: prefill chunk; cache_len: cache
    slots; out_len: length of the output buffer (>= max_new_tokens; the loop stops at max_new_tokens).
    """
    prompt_len: int
    chunk: int
    cache_len: int
    out_len: int


def decode_shapes(cfg: ModelConfig, max_prompt_len: int, max_new_tokens: int, prefill_chunk: int | None = None,
                  bucket_smallest: int | None = SMALLEST_BUCKET) -> DecodeShapes:
    """Static shapes for a batch whose longest prompt has max_prompt_len tokens.

    With bucket_smallest (the default), the padded prompt length and the output length are each rounded
    up to a bucket of `length_buckets(cfg.max_seq_len, bucket_smallest)` (bucket_smallest * 2^k, and
    max_seq_len), so prompts of many lengths share a few programs: one per prompt bucket for a given
    max_new_tokens. The cache holds the two bucketed lengths' sum, or the window when that is smaller
    (a rolling buffer). The prefill chunk defaults to the window, or the whole padded prompt without
    one. None disables bucketing (exact lengths: one program per length).
    """
    for name, v in (("max_prompt_len", max_prompt_len), ("max_new_tokens", max_new_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"decode_shapes: {name} must be an integer >= 1, got {v!r}")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"decode_shapes: prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
    if bucket_smallest is None:
        prompt_b, out_b = max_prompt_len, max_new_tokens
    else:
        buckets = length_buckets(max(cfg.max_seq_len, max_prompt_len, max_new_tokens), bucket_smallest)
        prompt_b, out_b = bucket_for(max_prompt_len, buckets), bucket_for(max_new_tokens, buckets)
    chunk = min(prefill_chunk or cfg.sliding_window or prompt_b, prompt_b)
    # the cache follows from the two bucketed lengths, so it adds no programs of its own
    return DecodeShapes(prompt_len=-(-prompt_b // chunk) * chunk, chunk=chunk,
                        cache_len=kv_cache.cache_size(cfg, prompt_b + out_b), out_len=out_b)


def _generate_program(params, tokens_BL, lengths_B, keys_B, live_B, n_new, head_VD=None, *, cfg: ModelConfig,
                      dtype: Dtype, chunk: int, cache_len: int, max_new: int, sampling: SamplingConfig,
                      eos_id: jax.Array, mesh: Mesh | None = None, fused: bool = False):
    """(tokens (B, max_new) with -1 after a row stops, cache, decode-loop iterations run).

    Rows with live_B False (batch filler) start finished: their output is all -1 and they never keep the
    loop running. The loop stops after n_new (<= max_new, a traced scalar) tokens or when every row is done.
    fused: decode steps use the fused matrix-vector products (matvec.py); the program must then be compiled
    with matvec.CPU_COMPILER_OPTIONS. head_VD: params['output'] transposed, used in its place, or None.
    """
    B = tokens_BL.shape[0]
    keys_B = jax.random.wrap_key_data(keys_B)      # (B, key words) uint32 -> (B,) keys
    with sharding.with_rules(mesh):
        cache = _new_cache(cfg, B, cache_len, dtype)
        last_BV, cache = _prefill(params, cfg, dtype, tokens_BL, lengths_B, cache, chunk, all_logits=False,
                                  head_VD=head_VD)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))   # (B,) keys, step t -> (B,) keys
        tok_B = sample(last_BV, step_keys(keys_B, 0), sampling)
        out_BN = jnp.full((B, max_new), -1, jnp.int32).at[:, 0].set(jnp.where(live_B, tok_B, -1))
        done_B = (tok_B == eos_id) | ~live_B

        def cond(state):
            t, _, _, done_B, _ = state
            return (t < n_new) & ~jnp.all(done_B)

        def step(state):
            t, tok_B, cache, done_B, out_BN = state
            pos_B = lengths_B + t - 1
            logits_B1V, cache = _apply(params, cfg, dtype, tok_B[:, None], pos_B[:, None], cache, fused=fused,
                                       head_VD=head_VD)
            nxt_B = sample(logits_B1V[:, 0], step_keys(keys_B, t), sampling)
            out_BN = jax.lax.dynamic_update_slice(out_BN, jnp.where(done_B, -1, nxt_B)[:, None], (0, t))
            return t + 1, nxt_B, cache, done_B | (nxt_B == eos_id), out_BN

        t, _, cache, _, out_BN = jax.lax.while_loop(cond, step, (jnp.int32(1), tok_B, cache, done_B, out_BN))
    return out_BN, cache, t - 1


_STATIC = ("cfg", "dtype", "chunk", "cache_len", "max_new", "sampling", "mesh", "fused")
_generate = jax.jit(_generate_program, static_argnames=_STATIC)
_generate_fused = jax.jit(_generate_program, static_argnames=_STATIC, compiler_options=matvec.CPU_COMPILER_OPTIONS)


def uses_fused_matvec(mesh: Mesh | None) -> bool:
    """Whether generate's decode steps use matvec.py's fused products: on the CPU backend without a mesh."""
    return mesh is None and jax.default_backend() == "cpu"


def compile_step(params: Any, cfg: ModelConfig, batch: int, cache_len: int, dtype: Dtype = jnp.float32,
                 fused: bool | None = None, scan_layers: bool = True) -> Any:
    """The compiled program of one decode step as generate's loop runs it (`batch` tokens against a cache of
    cache_len slots, the cache donated as the loop carries it), for its memory_analysis() and cost_analysis().
    fused defaults to what generate uses without a mesh; with scan_layers=False, params are the per-layer tree
    (model.unstack_layers)."""
    fused = uses_fused_matvec(None) if fused is None else fused
    dtype = jnp.dtype(dtype)
    params = packing.pack(params)
    # generate passes the head transposed (once per head, outside its steps): here an argument like the params
    head_VD = (jax.eval_shape(jnp.transpose, params["output"])
               if uses_transposed_head(params, batch, fused) else None)

    def step(params, tok_B, pos_B, cache, head_VD):
        with sharding.with_rules():
            logits_B1V, cache = _apply(params, cfg, dtype, tok_B[:, None], pos_B[:, None], cache, fused=fused,
                                       scan_layers=scan_layers, head_VD=head_VD)
        return logits_B1V[:, 0], cache

    cache = jax.eval_shape(lambda: kv_cache.init_cache(cfg, batch, cache_len, dtype))
    tok_B = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return jax.jit(step, donate_argnums=3).lower(params, tok_B, tok_B, cache, head_VD).compile(
        compiler_options=matvec.compiler_options(fused))


def compiled_programs() -> int:
    """How many generate programs have been compiled in this process (one per batch size, shapes, settings)."""
    return _generate._cache_size() + _generate_fused._cache_size()


@dataclasses.dataclass
class Generation:
    """Completion ids per prompt (EOS excluded) and whether each stopped on EOS."""
    tokens: list[list[int]]
    stopped_on_eos: list[bool]
    cache_bytes: int
    decode_steps: int = 0       # decode-loop iterations run (after the first token, which prefill yields)
    shapes: DecodeShapes | None = None


def generate(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             row_ids: Sequence[int] | None = None, mesh: Mesh | None = None, dtype: Dtype = jnp.float32,
             prefill_chunk: int | None = None, eos_id: int | None = None,
             bucket_smallest: int | None = SMALLEST_BUCKET, pad_batch_to: int | None = None,
             return_info: bool = False) -> list[list[int]] | Generation:
    """Generates up to max_new_tokens per prompt; returns completion ids (EOS excluded) per prompt.

    Prompts may differ in length. The prompt goes through the cache in chunks of `prefill_chunk`
    tokens (default: the sliding window, or the whole prompt without one). With a mesh, params and
    the batch are placed on it (batch over data x fsdp, padded to a multiple of that). Static lengths
    are rounded up to buckets (see decode_shapes; bucket_smallest None disables it). pad_batch_to pads the
    batch with filler rows up to that many (one batch shape for a job's last, smaller batch). Filler
    rows start finished: they cost no decode steps and their outputs are dropped.
    Sampling: prompt i draws with key fold_in(key(seed), row_ids[i]) (row_ids default 0, 1, ...), so
    its completion depends only on (seed, row id, prompt, settings), not on the batch it shares.
    eos_id -1 never stops; default cfg.eos_id.
    """
    prompts = [list(p) for p in prompts]
    rows = _check_generate(cfg, prompts, max_new_tokens, seed, row_ids, prefill_chunk, bucket_smallest, pad_batch_to)
    sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
    dtype = jnp.dtype(dtype)      # one canonical static value: jnp.float32 and np.dtype("float32") share a compile
    eos = cfg.eos_id if eos_id is None else eos_id
    if isinstance(eos, bool) or not isinstance(eos, (int, np.integer)) or not -1 <= eos < cfg.vocab_size:
        raise ValueError(f"generate: eos_id must be -1 (never stop) or an id in [0, {cfg.vocab_size}), got {eos!r}")
    n_real = len(prompts)
    n_rows = max(n_real, pad_batch_to or 0)
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        n_rows += -n_rows % shards
    prompts += [[cfg.bos_id]] * (n_rows - n_real)         # filler rows: one token, finished from the start
    rows += [0] * (n_rows - n_real)
    lengths = np.array([len(p) for p in prompts], np.int32)
    shapes = decode_shapes(cfg, int(lengths.max()), max_new_tokens, prefill_chunk, bucket_smallest)
    tokens = np.zeros((len(prompts), shapes.prompt_len), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    live = np.arange(n_rows) < n_real
    keys = np.asarray(jax.random.key_data(row_keys(int(seed), jnp.asarray(np.array(rows, np.uint32)))))
    if mesh is None:
        tokens, lengths, live, keys = jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(live), jnp.asarray(keys)
    else:
        # every process holds the whole batch on the host and places its own devices' rows
        params = jax.device_put(params, model_lib.param_shardings(cfg, mesh))
        tokens, lengths, live, keys = (distributed.global_array(x, sharding.batch_sharding(mesh, x.ndim))
                                       for x in (tokens, lengths, live, keys))
    fused = uses_fused_matvec(mesh)
    program = _generate_fused if fused else _generate
    params = packing.pack(params)
    head_VD = transposed_head(params["output"]) if uses_transposed_head(params, n_rows, fused) else None
    out, cache, steps = program(params, tokens, lengths, keys, live, jnp.int32(max_new_tokens), head_VD, cfg=cfg,
                                dtype=dtype, chunk=shapes.chunk, cache_len=shapes.cache_len, max_new=shapes.out_len,
                                sampling=sampling, eos_id=jnp.int32(eos), mesh=mesh, fused=fused)
    out = distributed.to_host(out)[:n_real, :max_new_tokens]
    completions, stopped = [], []
    for row in out:
        row = row[row >= 0].tolist()
        hit = eos in row
        completions.append(row[:row.index(eos)] if hit else row)
        stopped.append(hit)
    if return_info:
        return Generation(completions, stopped, kv_cache.cache_bytes(cache), int(steps), shapes)
    return completions


def _is_count(v: Any) -> bool:
    """Whether v is an integer >= 1 (not a bool)."""
    return not isinstance(v, bool) and isinstance(v, int) and v >= 1


def _check_generate(cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int, seed: int,
                    row_ids: Sequence[int] | None, prefill_chunk: int | None, bucket_smallest: int | None,
                    pad_batch_to: int | None) -> list[int]:
    """The row ids of `generate`'s prompts once its arguments are checked; ValueError naming the bad one."""
    if not prompts:
        raise ValueError("generate: no prompts given")
    if not _is_count(max_new_tokens):
        raise ValueError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    for i, p in enumerate(prompts):
        try:
            check_prompt(p, cfg, max_new_tokens)
        except ValueError as e:
            raise ValueError(f"generate: prompts[{i}]: {e}") from None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"generate: seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    rows = list(range(len(prompts))) if row_ids is None else [int(r) for r in row_ids]
    if len(rows) != len(prompts) or not all(0 <= r <= MAX_ROW_ID for r in rows):
        raise ValueError(f"generate: row_ids must be {len(prompts)} integers in [0, {MAX_ROW_ID}], got {row_ids!r}")
    if prefill_chunk is not None and not _is_count(prefill_chunk):
        raise ValueError(f"generate: prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
    if pad_batch_to is not None:
        if not _is_count(pad_batch_to):
            raise ValueError(f"generate: pad_batch_to must be an integer >= 1, got {pad_batch_to!r}")
        if pad_batch_to < len(prompts):
            raise ValueError(f"generate: pad_batch_to {pad_batch_to} is smaller than the {len(prompts)} prompts given")
    if bucket_smallest is not None and not _is_count(bucket_smallest):
        raise ValueError(f"generate: bucket_smallest must be an integer >= 1 or None, got {bucket_smallest!r}")
    return rows


def check_prompt(prompt: Sequence[int], cfg: ModelConfig, max_new_tokens: int) -> None:
    """Raises ValueError when a prompt is empty, too long or has out-of-vocab ids (the caller names it)."""
    if len(prompt) == 0:
        raise ValueError("empty prompt")
    if len(prompt) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"{len(prompt)} prompt tokens + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's max_seq_len {cfg.max_seq_len}")
    bad = [t for t in prompt if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise ValueError(f"token id(s) {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
