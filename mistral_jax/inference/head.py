"""The output head over a sequence in chunks: no more than one chunk's float32 logits exist at once.

Shared by scoring (`scoring.chunked_logprob_greedy`) and the training loss (`training.loss.chunked_nll`).
Axis letters: B rows, T positions, n chunks, c chunk, D model dim, V vocab.
"""

from __future__ import annotations

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
