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

from mistral_jax.model import cache as kv_cache
from mistral_jax.inference import decode
from mistral_jax.model import matvec
from mistral_jax.model import transformer as model
from mistral_jax.model import packing
from mistral_jax.model.config import ModelConfig

pytestmark = pytest.mark.as_shipped   # reads compiled programs' memory, work or text (tests/conftest.py)

# Mistral-7B layer shapes, 2 layers: compiled from abstract shapes, nothing allocated
CFG = ModelConfig(dim=4096, n_layers=2, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=32000,
                  sliding_window=4096, max_seq_len=4096)
CACHE_LEN = 64


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("wdtype", ["float32", "packed"])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("in_shape,out_shape", [((528,), (48,)),       # 16-row groups (33 partials)
                                                ((264,), (40,)),       # 8-row groups
                                                ((132,), (24,)),       # 4-row groups
                                                ((12,), (8,)),         # no grouping: a plain product
                                                ((4, 144), (32,))])    # two input axes (wo: N, H -> D)
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


@pytest.mark.parametrize("d_in,d_out", [(512, 1536), (1536, 512), (4096, 64)])
def test_stages_stay_apart(d_in, d_out):
    """Stage 1's partials are a buffer of their own: with 32 or fewer XLA fused both stages into one loop (the
    57M model's 512-wide inputs ran 5-10x slower than the dot)."""
    g = matvec.group(d_in)
    assert g and d_in // g >= matvec.MIN_PARTIALS
    x, w = jnp.zeros((1, d_in)), jnp.zeros((d_in, d_out))
    hlo = jax.jit(matvec.matvec).lower(x, w).compile(compiler_options=matvec.CPU_COMPILER_OPTIONS).as_text()
    entry = hlo[hlo.index("ENTRY"):]
    assert f"f32[{d_in // g},1,{d_out}]" in entry, entry


def test_row_limits():
    assert matvec.applies(1, jnp.float32) and matvec.applies(8, jnp.float32) and not matvec.applies(9, jnp.float32)
    assert matvec.applies(8, packing.PACKED) and not matvec.applies(9, packing.PACKED)
    assert not matvec.applies(0, jnp.float32) and not matvec.applies(1, jnp.int32)


def _abstract(dtype, scan_layers: bool = True):
    """Shapes of CFG's params as a decode program receives them (bfloat16 packed), allocating nothing."""
    p = jax.eval_shape(lambda: model.init_params(CFG, jax.random.key(0), param_dtype=dtype))
    if not scan_layers:
        p = jax.eval_shape(lambda p: model.unstack_layers(p, CFG.n_layers), p)
    packed = lambda s: jax.ShapeDtypeStruct(s.shape, packing.PACKED) if s.dtype == jnp.bfloat16 else s  # noqa: E731
    return jax.tree_util.tree_map(packed, p)


def _layer_weight_bytes(p) -> int:
    return _nbytes(p["layers"]) // CFG.n_layers


def _partials_bytes(dtype, rows: int = 1) -> int:
    """Bytes of stage 1's float32 partials written and read once per step by every fused product."""
    c = CFG
    qh, kh = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    layer = [(c.dim, qh), (c.dim, kh), (c.dim, kh), (qh, c.dim), (c.dim, c.hidden_dim), (c.dim, c.hidden_dim),
             (c.hidden_dim, c.dim)]
    prods = layer * c.n_layers + ([(c.dim, c.vocab_size)] if dtype == jnp.bfloat16 else [])  # head: packed only
    return sum(2 * 4 * (d_in // matvec.group(d_in)) * rows * d_out for d_in, d_out in prods)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,batch", [(jnp.float32, 1), (jnp.float32, 8), (jnp.bfloat16, 1), (jnp.bfloat16, 4)])
def test_decode_step_reads_stacked_weights_in_place(dtype, batch):
    """No temp buffer near one layer's weights: no per-step slice copy, no widened copy (generate's step).
    float32 at 8 rows is matvec.MAX_ROWS' top (bfloat16's 8-row float32 partials alone reach half a bf16
    layer, so its bound is checked at 4)."""
    p = _abstract(dtype)
    assert decode.uses_fused_matvec(None)
    temp = decode.compile_step(p, CFG, batch, CACHE_LEN, dtype).memory_analysis().temp_size_in_bytes
    layer = _layer_weight_bytes(p)
    assert temp < 0.5 * layer, f"decode step temp {temp} bytes vs one layer's weights {layer} bytes"


def test_unfused_step_copies_a_layer():
    """The bound above catches the copy XLA's dot makes in the layer scan (so it can fail)."""
    p = _abstract(jnp.float32)
    temp = decode.compile_step(p, CFG, 1, CACHE_LEN, jnp.float32, fused=False).memory_analysis().temp_size_in_bytes
    assert temp >= _layer_weight_bytes(p)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_step_bytes_accessed_near_what_it_must_read(dtype):
    """Batch 1: bytes accessed (XLA's cost analysis) <= 1.15x the weights read (all but the embedding table,
    plus one row) and the cache, besides the fused products' float32 partials (1/16 of a float32 weight's
    bytes, written and read once). Layers unrolled: the analysis counts a loop body once."""
    p = _abstract(dtype, scan_layers=False)
    compiled = decode.compile_step(p, CFG, 1, CACHE_LEN, dtype, scan_layers=False)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    emb = p["tok_embeddings"]
    must = (_nbytes(p) - _nbytes(emb) + CFG.dim * emb.dtype.itemsize
            + _nbytes(jax.eval_shape(lambda: kv_cache.init_cache(CFG, 1, CACHE_LEN, dtype))))
    extra = cost["bytes accessed"] - _partials_bytes(dtype) - must
    assert extra <= 0.15 * must, (f"{jnp.dtype(dtype).name} decode step accesses {cost['bytes accessed']} bytes: "
                                  f"{must} it must read, {_partials_bytes(dtype)} of partials and {extra} more")
