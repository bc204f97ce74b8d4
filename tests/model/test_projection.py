"""projection.project: the einsum with a hand-written backward, equal to jax.grad of the plain einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.model.projection import backward_specs, project

SIZES = {"b": 2, "t": 24, "d": 16, "f": 40, "n": 4, "k": 2, "h": 8}
SPECS = ["btd,df->btf", "btf,fd->btd", "btd,dnh->btnh", "btd,dkh->btkh", "btnh,nhd->btd"]


def _operands(spec, dtype, seed=0):
    r = np.random.default_rng(seed)
    x_axes, w_axes = spec.split("->")[0].split(",")
    x = r.normal(size=[SIZES[a] for a in x_axes])
    w = r.normal(size=[SIZES[a] for a in w_axes]) / np.sqrt(x.size / SIZES["b"] / SIZES["t"])
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def _grads(fn, spec, x, w):
    # a loss with a position-dependent cotangent, so a transposed or misplaced gradient cannot pass
    y_axes = spec.split("->")[1]
    c = jnp.asarray(np.random.default_rng(1).normal(size=[SIZES[a] for a in y_axes]), jnp.float32)
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w).astype(jnp.float32)) * c), argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("spec", SPECS)
def test_value_and_gradients_equal_the_plain_einsum(spec):
    x, w = _operands(spec, jnp.float32)
    np.testing.assert_allclose(project(spec, x, w), jnp.einsum(spec, x, w), rtol=1e-6, atol=1e-6)
    got = _grads(lambda x, w: project(spec, x, w), spec, x, w)
    ref = _grads(lambda x, w: jnp.einsum(spec, x, w), spec, x, w)
    for name, a, b in zip("xw", got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape)
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale, err_msg=f"d{name} of {spec}")


@pytest.mark.parametrize("spec", ["btd,df->btf", "btd,dkh->btkh"])
def test_bfloat16_gradients(spec):
    """bfloat16 operands (the bf16-compute train step): bfloat16 gradients, within bfloat16 rounding of the
    float32 gradients of the same values."""
    x, w = _operands(spec, jnp.bfloat16)
    got = _grads(lambda x, w: project(spec, x, w), spec, x, w)
    ref = _grads(lambda x, w: jnp.einsum(spec, x, w), spec, x.astype(jnp.float32), w.astype(jnp.float32))
    for name, a, b in zip("xw", got, ref):
        assert a.dtype == jnp.bfloat16, (name, a.dtype)
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0, atol=3e-2 * scale, err_msg=f"d{name} of {spec}")


def test_backward_specs():
    assert backward_specs("btd,df->btf") == ("btf,df->btd", "btd,btf->df")
    with pytest.raises(ValueError, match=r"axis 't' of 'btd,df->bf' must appear in exactly two operands"):
        backward_specs("btd,df->bf")
