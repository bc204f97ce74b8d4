"""projection.project: the einsum with a hand-written backward, equal to jax.grad of the plain einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.model.projection import backward_specs, merged_einsum, project

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


def _dots(jaxpr) -> list[tuple[int, int]]:
    """(number of contracted axes, output size) of every dot_general in a jaxpr, nested jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append((len(eqn.params["dimension_numbers"][0][0]), eqn.outvars[0].aval.size))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            out += _dots(sub)
    return out


@pytest.mark.parametrize("spec", ["btd,btf->df", "btnh,btd->nhd", "btd,btnh->dnh", "tbd,btf->fd", "bcd,bcv->dv",
                                  "bnkgqc,bnkgqh->bnkch", "bkgqc,bqkgh->bckh"])
def test_merged_einsum_is_the_einsum_with_one_contracted_axis(spec):
    """A weight gradient's (B, T) contraction runs as one dot over one merged axis (XLA:CPU otherwise writes
    a transposed copy of an operand first), with the einsum's values, axes in any order."""
    sizes = {**SIZES, "c": 12, "v": 20, "g": 2, "q": 6}
    r = np.random.default_rng(2)
    a_axes, b_axes = spec.split("->")[0].split(",")
    a = jnp.asarray(r.normal(size=[sizes[x] for x in a_axes]), jnp.float32)
    b = jnp.asarray(r.normal(size=[sizes[x] for x in b_axes]), jnp.float32)
    np.testing.assert_allclose(merged_einsum(spec, a, b), jnp.einsum(spec, a, b), rtol=1e-5, atol=1e-5)
    assert [n for n, _ in _dots(jax.make_jaxpr(lambda a, b: merged_einsum(spec, a, b))(a, b).jaxpr)] == [1]


@pytest.mark.parametrize("spec", ["btd,df->btf", "btf,fd->btd", "btd,dnh->btnh"])
def test_project_weight_gradient_contracts_one_axis(spec):
    x, w = _operands(spec, jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(project(spec, x, w)), argnums=(0, 1)))(x, w).jaxpr
    # the weight gradient is the one product of w's size (no other operand or output here has it)
    assert [n for n, size in _dots(jaxpr) if size == w.size] == [1], spec
