"""Chunked cross-entropy: equal to the unchunked loss in value and gradients, without B x T x V buffers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.training.loss import chunked_nll
from tests.packed import two_documents


def _unchunked_nll(h_BTD, w_DV, targets_BT):
    logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, w_DV, preferred_element_type=jnp.float32)
    return jax.nn.logsumexp(logits_BTV, axis=-1) - jnp.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def inputs():
    r = np.random.default_rng(0)
    B, T, D, V = 2, 300, 32, 4096
    h = jnp.asarray(r.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(r.normal(size=(D, V)) * 0.2, jnp.float32)
    t = jnp.asarray(r.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(r.random((B, T)) < 0.7)
    return h, w, t, mask


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [64, 300, 1000])   # 300 = T; 64 leaves a ragged last chunk
def test_chunked_equals_unchunked(inputs, chunk):
    h, w, t, mask = inputs

    def loss(fn, h, w):
        return jnp.sum(jnp.where(mask, fn(h, w), 0.0)) / jnp.sum(mask)

    ref = lambda h, w: _unchunked_nll(h, w, t)  # noqa: E731
    got = lambda h, w: chunked_nll(h, w, t, chunk=chunk)  # noqa: E731
    np.testing.assert_allclose(np.asarray(got(h, w)), np.asarray(ref(h, w)), rtol=1e-6, atol=1e-5)
    g_ref = jax.grad(lambda h, w: loss(ref, h, w), argnums=(0, 1))(h, w)
    g_got = jax.grad(lambda h, w: loss(got, h, w), argnums=(0, 1))(h, w)
    for a, b in zip(g_ref, g_got):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(a))))


@pytest.mark.as_shipped
def test_no_full_logits_buffer(inputs):
    """The compiled loss+grad allocates less temporary memory than one float32 (B, T, V) array."""
    h, w, t, _ = inputs
    B, T = t.shape
    full = B * T * w.shape[1] * 4
    grad = jax.jit(jax.grad(lambda h, w: jnp.sum(chunked_nll(h, w, t, chunk=32)), argnums=(0, 1)))
    temp = grad.lower(h, w).compile().memory_analysis().temp_size_in_bytes
    assert temp < full / 2, (temp, full)


def test_bad_chunk(inputs):
    h, w, t, _ = inputs
    with pytest.raises(ValueError, match="chunk must be >= 1, got 0"):
        chunked_nll(h, w, t, chunk=0)


@pytest.mark.slow
def test_train_loss_is_the_chunked_loss_of_the_model():
    """train_step.summed_loss (chunked head + loss) equals full logits + token_nll, values and gradients."""
    from mistral_jax.model import transformer as model_lib
    from mistral_jax.training import train_step as ts
    from mistral_jax.model.config import ModelConfig

    cfg = ModelConfig.preset("tiny").replace(vocab_size=1024)
    params = model_lib.init_params(cfg, jax.random.key(1))
    tokens, pos, seg = (jnp.asarray(two_documents(2, 37, 20, 1024, seed=1)[k])
                        for k in ("tokens", "positions", "segment_ids"))

    def reference(params):
        logits = model_lib.Transformer(cfg).apply({"params": params}, tokens, pos, seg)[0]
        mask = ts.loss_mask(seg)
        return jnp.sum(jnp.where(mask, ts.token_nll(logits, tokens), 0.0))

    def chunked(params):
        return ts.summed_loss(params, tokens, pos, seg, cfg=cfg, loss_chunk=8)[0]

    (ref, g_ref), (got, g_got) = (jax.jit(jax.value_and_grad(f))(params) for f in (reference, chunked))
    assert abs(float(ref) - float(got)) <= 1e-5 * abs(float(ref))
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g_ref, g_got)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5


def _small(dtype, seed=2):
    r = np.random.default_rng(seed)
    B, T, D, V = 2, 40, 16, 256
    h = jnp.asarray(r.normal(size=(B, T, D)), dtype)
    w = jnp.asarray(r.normal(size=(D, V)) * 0.3, jnp.float32)
    t = jnp.asarray(r.integers(0, V, (B, T)), jnp.int32)
    g = jnp.asarray(r.random((B, T)), jnp.float32)   # per-token weights: a cotangent that is not all ones
    return h, w, t, g


def test_gradients_of_the_hand_written_backward():
    """chunked_nll's custom backward (softmax - onehot, then two products) equals jax.grad of the unchunked
    loss, with a ragged last chunk and a per-token cotangent."""
    h, w, t, g = _small(jnp.float32)
    loss = lambda fn: lambda h, w: jnp.sum(g * fn(h, w))  # noqa: E731
    got = jax.jit(jax.grad(loss(lambda h, w: chunked_nll(h, w, t, chunk=16)), argnums=(0, 1)))(h, w)
    ref = jax.jit(jax.grad(loss(lambda h, w: _unchunked_nll(h, w, t)), argnums=(0, 1)))(h, w)
    for name, a, b in zip(("dh", "dw"), got, ref):
        assert a.dtype == b.dtype == jnp.float32, name
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))), err_msg=name)


def test_bfloat16_and_packed_heads():
    """bfloat16 hidden states with a float32 head (bf16 compute, f32 master) give a bfloat16 dh and a float32 dw;
    a packed bfloat16 head (LoRA's frozen base) gives the same dh and no head gradient at all."""
    from mistral_jax.model import packing

    h, w, t, g = _small(jnp.bfloat16)
    w_bf16 = w.astype(jnp.bfloat16)
    ref = jax.grad(lambda h, w: jnp.sum(g * _unchunked_nll(h, w, t)), argnums=(0, 1))(
        h.astype(jnp.float32), w_bf16.astype(jnp.float32))

    dh, dw = jax.jit(jax.grad(lambda h, w: jnp.sum(g * chunked_nll(h, w, t, chunk=16)), argnums=(0, 1)))(h, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32, (dh.dtype, dw.dtype)
    for name, a, b in (("dh", dh, ref[0]), ("dw", dw, ref[1])):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0, atol=3e-2 * float(jnp.max(jnp.abs(b))),
                                   err_msg=name)

    packed = jax.lax.bitcast_convert_type(w_bf16, packing.PACKED)
    dh_packed = jax.jit(jax.grad(lambda h: jnp.sum(g * chunked_nll(h, packed, t, chunk=16))))(h)
    np.testing.assert_allclose(np.asarray(dh_packed, np.float32), ref[0], rtol=0,
                               atol=3e-2 * float(jnp.max(jnp.abs(ref[0]))), err_msg="dh, packed head")
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda h: jnp.sum(g * chunked_nll(h, packed, t, chunk=16))))(h))
    assert "bcd,bcv->dv" not in jaxpr and jaxpr.count("dot_general") == 3, jaxpr  # 2 forward logits, 1 dh
