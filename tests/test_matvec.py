"""Fused matrix-vector products of the decode step (matvec.py): exact, and the weights are read in place.

The decode step is bound by reading the weights. These compile (never run) one decode step and check, from
XLA's own analyses, that the program does what that needs: no temp buffer the size of a layer's weights (the
layer scan's dot copied each layer's slice, and XLA:CPU widened bfloat16 weights to a float32 copy), and
bytes accessed per step within 1.15x of the weights and cache it must read.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax import cache as kv_cache
from mistral_jax import decode
from mistral_jax import matvec
from mistral_jax import model
from mistral_jax import packing
from mistral_jax.config import ModelConfig

CFG = ModelConfig(dim=512, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=2048, vocab_size=1024,
                  sliding_window=64, max_seq_len=512)
CACHE_LEN = 64


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("wdtype", ["float32", "packed"])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("in_shape,out_shape", [((64,), (48,)),        # 16-row groups
                                                ((24,), (40,)),        # 8-row groups
                                                ((12,), (8,)),         # no grouping: a plain product
                                                ((4, 16), (32,))])     # two input axes (wo: N, H -> D)
def test_matvec_matches_float64(wdtype, rows, in_shape, out_shape):
    rs = np.random.RandomState(rows)
    x = rs.randn(rows, 1, *in_shape).astype(np.float32)
    w = rs.randn(*in_shape, *out_shape).astype(np.float32)
    if wdtype == "packed":
        w_dev = packing.pack(jnp.asarray(w, jnp.bfloat16))
        assert w_dev.dtype == packing.PACKED
        w = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32)       # the values the bits hold
    else:
        w_dev = jnp.asarray(w)
    n_in = len(in_shape)
    got = jax.jit(lambda x, w: matvec.matvec(x, w, n_in)).lower(x, w_dev).compile(
        compiler_options=matvec.CPU_COMPILER_OPTIONS)(x, w_dev)
    want = np.tensordot(x.astype(np.float64), w.astype(np.float64), axes=n_in)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_matvec_names_mismatched_axes():
    with pytest.raises(ValueError, match=r"last 1 axes \(8,\) do not match the weight's input axes \(6,\)"):
        matvec.matvec(jnp.zeros((1, 8)), jnp.zeros((6, 4)))


def test_row_limits():
    assert matvec.applies(1, jnp.float32) and matvec.applies(4, jnp.float32) and not matvec.applies(5, jnp.float32)
    assert matvec.applies(8, packing.PACKED) and not matvec.applies(9, packing.PACKED)
    assert not matvec.applies(0, jnp.float32) and not matvec.applies(1, jnp.int32)


@pytest.fixture(scope="module")
def params():
    return {d: model.init_params(CFG, jax.random.key(0), param_dtype=d) for d in (jnp.float32, jnp.bfloat16)}


def _layer_weight_bytes(p) -> int:
    return _nbytes(p["layers"]) // CFG.n_layers


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step_reads_stacked_weights_in_place(params, dtype, batch):
    """No temp buffer near one layer's weights: no per-step slice copy, no widened copy (generate's step)."""
    p = params[dtype]
    assert decode.uses_fused_matvec(None)
    temp = decode.compile_step(p, CFG, batch, CACHE_LEN, dtype).memory_analysis().temp_size_in_bytes
    layer = _layer_weight_bytes(p)
    assert temp < 0.25 * layer, f"decode step temp {temp} bytes vs one layer's weights {layer} bytes"


def test_unfused_step_copies_a_layer(params):
    """The bound above catches the copy XLA's dot makes in the layer scan (so it can fail)."""
    p = params[jnp.float32]
    temp = decode.compile_step(p, CFG, 1, CACHE_LEN, jnp.float32, fused=False).memory_analysis().temp_size_in_bytes
    assert temp >= _layer_weight_bytes(p)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_step_bytes_accessed_near_what_it_must_read(params, dtype):
    """Batch 1: bytes accessed (XLA's cost analysis) <= 1.15x the weights read (all but the embedding table,
    plus one row) and the cache. Layers unrolled: the analysis counts a loop body once."""
    p = params[dtype]
    compiled = decode.compile_step(model.unstack_layers(p, CFG.n_layers), CFG, 1, CACHE_LEN, dtype,
                                   scan_layers=False)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    emb = p["tok_embeddings"]
    must = (_nbytes(p) - _nbytes(emb) + CFG.dim * emb.dtype.itemsize
            + _nbytes(jax.eval_shape(lambda: kv_cache.init_cache(CFG, 1, CACHE_LEN, dtype))))
    ratio = cost["bytes accessed"] / must
    assert ratio <= 1.15, f"{jnp.dtype(dtype).name} decode step accesses {ratio:.3f}x the bytes it must read"
