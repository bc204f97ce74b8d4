"""Rotary position embeddings, rotate-half convention, computed in float32 on absolute positions.

Weights in this library use the rotate-half layout (as Hugging Face stores them): rotary pairs are
(x[i], x[i + head_dim/2]). mistral-inference pairs (x[2i], x[2i+1]) instead; `weights.py` reorders
the q/k rows when converting between the two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    """theta^(-2i/head_dim) for i < head_dim/2, float32, shape (head_dim/2,)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotates x at the given absolute positions; returns the same shape and dtype."""
    head_dim = x_BTNH.shape[-1]
    angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inverse_frequencies(head_dim, theta)
    cos_BT1F = jnp.cos(angles_BTF)[:, :, None, :]
    sin_BT1F = jnp.sin(angles_BTF)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
    return out.astype(x_BTNH.dtype)
