"""Matrix-vector products for decoding on XLA:CPU: each weight read once, widened in registers.

A decode step multiplies one token (or a few) by every weight, so it is bound by reading the weights.
XLA:CPU's dot does not get near that bound there: a bfloat16 dot is rewritten to convert(weight) -> float32
dot (the weight is read, written widened, read again), and in the layer scan the dot copies each layer's
slice of the stacked weights first (float32 included). `matvec` writes the product as two reductions
instead: stage 1 multiplies GROUP input rows of the weight by x and sums them inside one loop fusion,
which reads the (sliced, packed) weight in place and widens it in registers; stage 2 sums the Din/GROUP
partials. Measured at Mistral-7B layer shapes on a 2-core AVX-512 Xeon (BENCHMARKS.md): the dot reaches
10-25% of the memory-bandwidth roofline at batch 1, this form 60-90%.

It depends on the program being compiled with `CPU_COMPILER_OPTIONS` (YNNPACK keeps the dots but not the
reductions, which it would otherwise take and feed with a widened copy of the weight), on both stages
staying at most 32 wide apart from the partials' sum (XLA:CPU splits wider reductions through a
materialised product), on an optimization barrier between them, and on more than 32 partials (with 32 or
fewer XLA fuses both stages into one loop anyway, 5-10x slower). It is for inference only: its gradient
has no dot and materialises (rows, Din, Dout).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mistral_jax.model import packing

# Per-program XLA options for programs that use `matvec` on the CPU backend (see the module docstring). The
# vector width lets the loop fusions (both matvec stages, norms, softmax) use 512-bit registers where the CPU
# has them (LLVM picks 256 by default there; a CPU without them keeps its own width): whole 57M float32
# generate calls 5-7% faster at batch 1 and 8 on a 2-core AVX-512 Xeon, the same tokens (BENCHMARKS.md).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
                        "xla_cpu_prefer_vector_width": 512}
GROUP = 16  # input rows summed per stage-1 step: 16 keeps x's broadcasts in vector registers
MIN_PARTIALS = 33  # fewer stage-1 partials and XLA fuses the two stages back into one slow loop
# Largest number of rows (batch x tokens) that use `matvec` instead of the dot, by weight dtype. Packed
# bfloat16 beat the dot up to ~32 rows per 4096x14336 projection inside the layer scan; it stops at 8 so that
# the (Din/16, rows, Dout) float32 partials stay small. float32 at 8 rows, whole scanned decode step on a
# 2-core AMD EPYC (BENCHMARKS.md, 2026-12-04): 34-39 ms against 46-52 ms for the dot at the 57M shapes, 0.66 s
# against 1.1 s at two Mistral-7B-shaped layers. The dot there first copies each layer's weight slice out of
# the stacked arrays. An earlier "float32 stops at 4" reading on an Intel Xeon predates `group`'s
# MIN_PARTIALS, when XLA merged the two stages at 512-wide inputs.
MAX_ROWS = {jnp.dtype(packing.PACKED): 8, jnp.dtype(jnp.bfloat16): 8, jnp.dtype(jnp.float32): 8}


def compiler_options(enabled: bool) -> dict[str, str | int] | None:
    """The compiler options a program using `matvec` needs on the default backend (None when not needed)."""
    return CPU_COMPILER_OPTIONS if enabled and jax.default_backend() == "cpu" else None


def applies(rows: int, w_dtype: Any) -> bool:
    """Whether `matvec` is the faster product for `rows` rows against a weight of dtype w_dtype."""
    return 1 <= rows <= MAX_ROWS.get(jnp.dtype(w_dtype), 0)


def group(d_in: int) -> int:
    """Input rows summed per stage-1 step for an input dim d_in: GROUP, else 8 or 4, the largest that divides
    d_in and leaves at least MIN_PARTIALS partials; 0 when none does (then a plain product is used)."""
    return next((g for g in (GROUP, 8, 4) if d_in % g == 0 and d_in // g >= MIN_PARTIALS), 0)


def _widen(w: jax.Array) -> jax.Array:
    """float32 values of w; packed bfloat16 bits are widened with integer ops (u32 << 16, bitcast), which
    fuse into the consumer and are never rewritten by XLA's bfloat16 normalisation."""
    if w.dtype == packing.PACKED:
        return jax.lax.bitcast_convert_type(w.astype(jnp.uint32) << 16, jnp.float32)
    return w.astype(jnp.float32)


def matvec(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x (..., *in) times w (*in, *out), contracting x's last n_in axes with w's first n_in; float32 result
    (..., *out) accumulated in float32. w: float32, bfloat16 or packed bfloat16 (packing.pack)."""
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    if tuple(x.shape[x.ndim - n_in:]) != tuple(in_shape):
        raise ValueError(f"matvec: x's last {n_in} axes {x.shape[x.ndim - n_in:]} do not match the weight's "
                         f"input axes {in_shape}")
    lead = x.shape[:x.ndim - n_in]
    d_in, d_out, rows = math.prod(in_shape), math.prod(out_shape), math.prod(lead)
    x_MI = x.reshape(rows, d_in).astype(jnp.float32)
    w_IO = _widen(w.reshape(d_in, d_out))
    g = group(d_in)
    if g == 0:  # no grouping fits Din (small): a plain float32 product
        y_MO = jnp.dot(x_MI, w_IO, preferred_element_type=jnp.float32)
    else:
        # stage 1: (Din/g, g) rows of w times x, summed over g -> partials (Din/g, M, Dout)
        p_JMO = jnp.sum(x_MI.T.reshape(d_in // g, g, rows, 1) * w_IO.reshape(d_in // g, g, 1, d_out), axis=1)
        # stage 2 behind a barrier, which keeps the simplifier from merging the sums into one Din-wide reduce
        y_MO = jnp.sum(jax.lax.optimization_barrier(p_JMO), axis=0)
    return y_MO.reshape(*lead, *out_shape)
