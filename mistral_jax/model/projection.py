"""A weight projection `einsum(spec, x, w)` whose backward pass is written as two plain einsums.

`jax.grad` of an einsum transposes it with `dot_general` dimension numbers that put the contracted
(batch x length) axis of the weight gradient last on one operand; XLA:CPU then writes that operand out
transposed before the dot (for the FFN a (F, B*T) copy per layer and per step, 13-15% of the 57M train
step in BENCHMARKS.md). Here the weight gradient is `merged_einsum("btd,btf->df", x, g)`: x and g as
(B*T, D) and (B*T, F) matrices, one contracted axis, which XLA:CPU multiplies without any copy (the
earlier form, the 4-axis einsum with x first, still copied x: 6.04-6.08 against 6.13-6.41 s per 57M f32 step,
alternating processes on a 2-core Xeon, 2026-12-05; the output head's gradient in `training.loss` too).
Values are those of the plain einsum; the gradients agree up to float32 rounding.

Axis letters in specs are the model's (B batch, T length, D model dim, N/K heads, H head dim, F hidden).
"""

from __future__ import annotations

import functools
import math
from typing import Any

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


def merged_einsum(spec: str, a: jax.Array, b: jax.Array, preferred_element_type: Any = None) -> jax.Array:
    """einsum(spec, a, b) for a two-operand spec, with the contracted axes merged into one.

    XLA:CPU runs a product contracting several axes (the (B, T) of a weight gradient) as a transposed copy of
    one operand and a dot; contracting one merged axis it calls a dot that reads the transposed operand in
    place, 2x faster at the 57M FFN shapes (8 x 512 tokens, 512 x 1536, in a layer scan, 2-core Xeon,
    2026-12-05). Axes in both operands and the output stay batch axes. Values are the einsum's up to
    float32 rounding.
    """
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    summed = [ax for ax in sa if ax in sb and ax not in out]
    if len(summed) < 2:
        return jnp.einsum(spec, a, b, preferred_element_type=preferred_element_type)
    batch = [ax for ax in out if ax in sa and ax in sb]
    ka = [ax for ax in sa if ax not in summed and ax not in batch]
    kb = [ax for ax in sb if ax not in summed and ax not in batch]
    size = {ax: n for axes, x in ((sa, a), (sb, b)) for ax, n in zip(axes, x.shape)}

    def as_matrix(x, axes, kept):
        x = jnp.transpose(x, [axes.index(ax) for ax in batch + summed + kept])
        return x.reshape(*(size[ax] for ax in batch), -1, math.prod(size[ax] for ax in kept))
    nb = len(batch)
    y = jax.lax.dot_general(as_matrix(a, sa, ka), as_matrix(b, sb, kb),
                            (([nb], [nb]), (list(range(nb)), list(range(nb)))),
                            preferred_element_type=preferred_element_type)
    y = y.reshape([size[ax] for ax in batch + ka + kb])
    return jnp.einsum(f"{''.join(batch + ka + kb)}->{out}", y)


def _project_bwd(spec: str, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    dx_spec, dw_spec = backward_specs(spec)
    g = g.astype(x.dtype)
    return jnp.einsum(dx_spec, g, w).astype(x.dtype), merged_einsum(dw_spec, x, g).astype(w.dtype)


project.defvjp(_project_fwd, _project_bwd)
