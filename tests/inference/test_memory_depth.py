"""Compiled bfloat16 inference programs hold no float32 copy of the weights: temp memory flat in depth.

XLA:CPU widens every bfloat16 op to float32; unpacked, the layer scan's slice of the stacked weights became
a float32 copy of all layers (hoisted out of the loops), so temp memory grew by one float32 layer per layer.
These compile (never run) the decode program and the scoring program at 2 and 8 layers and bound the growth
of `memory_analysis().temp_size_in_bytes` by what the extra layers legitimately add (their KV cache), far
below one float32 copy of their weights. The packing itself is also checked to share memory (no copy).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.model import cache as kv_cache
from mistral_jax.inference import decode
from mistral_jax.model import transformer as model
from mistral_jax.model import packing
from mistral_jax.inference import scoring
from mistral_jax.model.config import ModelConfig
from tests.model.trees import is_packed

pytestmark = pytest.mark.as_shipped   # reads compiled programs' memory, work or text (tests/conftest.py)

DEPTHS = (2, 8)
BASE = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=1024, vocab_size=512,
                   sliding_window=64, max_seq_len=512)
SLACK = 64 << 10   # bytes per layer for loop bookkeeping (index scalars, tuple buffers)


def _cfg(n_layers: int) -> ModelConfig:
    return BASE.replace(n_layers=n_layers)


def _layer_weight_bytes(cfg: ModelConfig, itemsize: int) -> int:
    p = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    return sum(x.size for x in jax.tree_util.tree_leaves(p["layers"])) // cfg.n_layers * itemsize


@pytest.fixture(scope="module")
def packed_params():
    return {L: packing.pack(model.init_params(_cfg(L), jax.random.key(0), param_dtype=jnp.bfloat16))
            for L in DEPTHS}


def _decode_temp(params, cfg: ModelConfig, batch: int) -> tuple[int, int]:
    """(temp bytes, per-layer cache bytes) of the compiled bf16 generate program."""
    sh = decode.decode_shapes(cfg, 16, 16)
    args = (params, jnp.zeros((batch, sh.prompt_len), jnp.int32), jnp.full((batch,), 16, jnp.int32),
            jnp.zeros((batch, 2), jnp.uint32), jnp.ones((batch,), bool), jnp.int32(16))
    fused = decode.uses_fused_matvec(None)        # the program generate runs
    program = decode._generate_fused if fused else decode._generate
    compiled = program.lower(*args, cfg=cfg, dtype=jnp.bfloat16, chunk=sh.chunk, cache_len=sh.cache_len,
                             max_new=sh.out_len, sampling=decode.SamplingConfig(), eos_id=jnp.int32(cfg.eos_id),
                             fused=fused).compile()
    cache = jax.eval_shape(lambda: kv_cache.init_cache(cfg, batch, sh.cache_len, jnp.bfloat16))
    per_layer = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache)) // cfg.n_layers
    return compiled.memory_analysis().temp_size_in_bytes, per_layer


def _score_temp(params, cfg: ModelConfig) -> int:
    B, T = 2, 128
    z = jnp.zeros((B, T), jnp.int32)
    o = jnp.arange(B * T, dtype=jnp.int32)[None]
    compiled = scoring._score_batch.lower(params, z, z, z + 1, o, o, jnp.ones((1, B * T), bool), cfg=cfg,
                                          dtype=jnp.bfloat16, chunk=64, attn_block=64, mesh=None).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _check_growth(name: str, temps: dict[int, int], allowed_per_layer: int) -> None:
    extra = DEPTHS[1] - DEPTHS[0]
    grown = temps[DEPTHS[1]] - temps[DEPTHS[0]]
    f32_layers = extra * _layer_weight_bytes(BASE, 4)
    assert allowed_per_layer * 4 < _layer_weight_bytes(BASE, 4), "the bound must be able to catch a copy"
    assert grown <= extra * allowed_per_layer, (
        f"{name}: temp grows by {grown} bytes from {DEPTHS[0]} to {DEPTHS[1]} layers (temps {temps}); allowed "
        f"{extra * allowed_per_layer}; one float32 copy of the extra layers' weights is {f32_layers}")


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_temp_flat_in_depth(packed_params, batch):
    temps, cache = {}, 0
    for L in DEPTHS:
        temps[L], cache = _decode_temp(packed_params[L], _cfg(L), batch)
    # the updated cache may be double-buffered in the loops, and read widened to float32 (2x its bytes)
    _check_growth(f"decode batch {batch}", temps, 4 * cache + SLACK)


@pytest.mark.slow   # one of the everyday subset's longest (issue 20, point 7)
def test_score_temp_flat_in_depth(packed_params):
    temps = {L: _score_temp(packed_params[L], _cfg(L)) for L in DEPTHS}
    _check_growth("scoring", temps, SLACK)


def test_scorer_and_generate_pack_what_they_are_given():
    """The public entry points pack bf16 params themselves (callers hold plain bf16 trees)."""
    cfg = _cfg(2)
    params = model.init_params(cfg, jax.random.key(0), param_dtype=jnp.bfloat16)
    assert is_packed(scoring.Scorer(params, cfg, dtype=jnp.bfloat16).params)
    # and packing shares the bf16 buffers on the CPU backend: no bytes copied
    packed = packing.pack(params)
    w, p = params["layers"]["feed_forward"]["w1"], packed["layers"]["feed_forward"]["w1"]
    assert p.dtype == jnp.uint16 and p.shape == w.shape and p.sharding == w.sharding
    assert p.unsafe_buffer_pointer() == w.unsafe_buffer_pointer()
    np.testing.assert_array_equal(np.asarray(jax.jit(packing.unpack)(p)).view(np.uint16),
                                  np.asarray(w).view(np.uint16))
    assert not is_packed(packing.pack(model.init_params(cfg, jax.random.key(0))))  # float32 stays


@pytest.mark.slow
def test_packed_generate_matches_unpacked_program():
    """Same tokens from packed and unpacked bf16 params through the same decode program."""
    cfg = _cfg(2)
    params = model.init_params(cfg, jax.random.key(1), param_dtype=jnp.bfloat16)
    prompts = [[1, 5, 9, 200, 3], [1, 7]]
    got = decode.generate(params, cfg, prompts, 12, dtype=jnp.bfloat16, eos_id=-1)
    sh = decode.decode_shapes(cfg, 5, 12)
    tokens = np.zeros((2, sh.prompt_len), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    keys = np.asarray(jax.random.key_data(decode.row_keys(0, jnp.arange(2, dtype=jnp.uint32))))
    out, _, _ = decode._generate(params, jnp.asarray(tokens), jnp.asarray([5, 2], jnp.int32), jnp.asarray(keys),
                                 jnp.ones((2,), bool), jnp.int32(12), cfg=cfg, dtype=jnp.bfloat16, chunk=sh.chunk,
                                 cache_len=sh.cache_len, max_new=sh.out_len, sampling=decode.SamplingConfig(),
                                 eos_id=jnp.int32(-1))
    assert got == np.asarray(out)[:, :12].tolist()
