"""A weight projection `einsum(spec, x, w)` whose backward pass is written as two plain einsums.

`jax.grad` of an einsum transposes it with `dot_general` dimension numbers that put the contracted
(batch x length) axis of the weight gradient last on one operand; XLA:CPU then writes that operand out
transposed before the dot (for the FFN a (F, B*T) copy per layer and per step, 13-15% of the 57M train
step in BENCHMARKS.md). Written as `einsum("btd,btf->df", x, g)` the copy XLA:CPU makes is of x, the saved
input, which the FFN's w1/w3 and the q/k/v projections share, so one copy serves two or three weight
gradients. (Putting whichever of x and g is smaller first measured slower on the 57M step: 12.9 vs 10.7
s/step.) Values are those of the plain einsum; the gradients agree up to float32 rounding.

Axis letters in specs are the model's (B batch, T length, D model dim, N/K heads, H head dim, F hidden).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def backward_specs(spec: str) -> tuple[str, str]:
    """(spec of dx, spec of dw) for the forward einsum `spec` = "x,w->y": "y,w->x" and "x,y->w".

    Every axis must appear in two of the three operands (no summed-away or broadcast axis), which holds
    for projections: raises ValueError naming the spec otherwise."""
    ins, y = spec.split("->")
    x, w = ins.split(",")
    for axis in set(x + w + y):
        if (axis in x) + (axis in w) + (axis in y) != 2:
            raise ValueError(f"projection: axis {axis!r} of {spec!r} must appear in exactly two operands")
    return f"{y},{w}->{x}", f"{x},{y}->{w}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def project(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x, w), x and w of one dtype; e.g. ("btd,df->btf", x_BTD, w_DF) -> y_BTF."""
    return jnp.einsum(spec, x, w)


def _project_fwd(spec: str, x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return jnp.einsum(spec, x, w), (x, w)


def _project_bwd(spec: str, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    dx_spec, dw_spec = backward_specs(spec)
    g = g.astype(x.dtype)
    return jnp.einsum(dx_spec, g, w).astype(x.dtype), jnp.einsum(dw_spec, x, g).astype(w.dtype)


project.defvjp(_project_fwd, _project_bwd)
