"""The attention mask from query/key positions and segment ids, shared by every attention implementation."""

from __future__ import annotations

import jax


def attention_mask(q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int | None = None,
                   q_seg_BT: jax.Array | None = None, k_seg_BS: jax.Array | None = None) -> jax.Array:
    """Boolean (B, T, S) mask: query at position p sees keys at p-W+1 .. p (all keys <= p without a window).

    Keys with a negative position (empty slots, padding) are never seen. With segment ids, a query
    sees only keys of its own segment.
    """
    q = q_pos_BT[:, :, None]
    k = k_pos_BS[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= (q - k) < window
    if q_seg_BT is not None:
        if k_seg_BS is None:
            raise ValueError("attention_mask: q_seg_BT given without k_seg_BS")
        mask &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    return mask
