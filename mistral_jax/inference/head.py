"""The output head: over a sequence in chunks, so that no more than one chunk's float32 logits exist at once
(shared by scoring, `scoring.chunked_logprob_greedy`, and the training loss, `training.loss.chunked_nll`); and
transposed for decoding (`transposed_head`).

Axis letters: B rows, T positions, n chunks, c chunk, D model dim, V vocab.
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
import jax.numpy as jnp

from mistral_jax.model import packing


def to_chunks(x_BT: jax.Array, chunk: int) -> jax.Array:
    """x (B, T, ...) as (n, B, c, ...) chunks along T, c = min(chunk, T), the last one zero-padded."""
    B, T = x_BT.shape[:2]
    c = min(chunk, T)
    n = -(-T // c)
    x_BT = jnp.pad(x_BT, [(0, 0), (0, n * c - T)] + [(0, 0)] * (x_BT.ndim - 2))
    return x_BT.reshape(B, n, c, *x_BT.shape[2:]).swapaxes(0, 1)


def from_chunks(x_nBc: jax.Array, T: int) -> jax.Array:
    """The inverse of `to_chunks`: (n, B, c, ...) chunks back to (B, T, ...), the padding dropped."""
    n, B, c = x_nBc.shape[:3]
    return x_nBc.swapaxes(0, 1).reshape(B, n * c, *x_nBc.shape[3:])[:, :T]


def chunk_head(w_DV: jax.Array, h_BcD: jax.Array) -> jax.Array:
    """The head w as one chunk's product reads it: in h's dtype; a packed w (see `packing`) unpacked only
    once h exists, so it is widened per chunk, never whole."""
    w_DV, h_BcD = packing.unpack_after(w_DV, h_BcD)
    return w_DV.astype(h_BcD.dtype)


def chunk_logits(h_BcD: jax.Array, w_DV: jax.Array) -> jax.Array:
    """Float32 logits (B, c, V) = h @ w for one chunk; w in any float dtype (cast to h's), or packed."""
    return jnp.einsum("bcd,dv->bcv", h_BcD, chunk_head(w_DV, h_BcD), preferred_element_type=jnp.float32)


def uses_transposed_head(params: Any, batch: int, fused: bool) -> bool:
    """Whether a generate program of `batch` rows takes the head transposed to (V, D) (`transposed_head`):
    with the fused CPU products, 4 or more rows and a float (unpacked) head.

    XLA:CPU's dot reads the (V, D) head faster at a few rows: the 57M float32 decode step took 17.1 against
    19.3 ms at batch 8, 1.02-1.16x less at batch 4 and 16, the same at 1, 2 and 64 (2-core Xeon,
    BENCHMARKS.md). A packed head at up to matvec.MAX_ROWS rows goes through `matvec` instead.
    """
    return fused and batch >= 4 and params["output"].dtype != packing.PACKED


_transpose = jax.jit(jnp.transpose)
_last_head: list[tuple[weakref.ref, jax.Array]] = []   # the last (jax.Array head, its transpose)


def transposed_head(w_DV: Any) -> jax.Array:
    """The head w (D, V) as a (V, D) array. For a jax.Array (immutable) the result is kept while w lives, so
    repeated generate calls with the same params transpose it once (27 ms for 57M float32 on a 2-core Xeon;
    numpy heads, which may change in place, are transposed on every call). The kept copy costs V x D more
    floats of memory while the head lives."""
    if _last_head and _last_head[0][0]() is w_DV:
        return _last_head[0][1]
    w_VD = _transpose(w_DV)
    if isinstance(w_DV, jax.Array):
        _last_head[:] = [(weakref.ref(w_DV, _forget), w_VD)]
    return w_VD


def _forget(ref: weakref.ref) -> None:
    """Drops the kept transpose once its head is gone."""
    if _last_head and _last_head[0][0] is ref:
        _last_head.clear()
