"""Grouped-query attention with a mask computed from query/key positions (and segment ids).

One function serves training, chunked prefill and cached decode: keys carry their absolute
positions (-1 marks an empty cache slot or padding), and the mask falls out of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("dense", "blockwise")


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


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Softmax attention (float32 logits and softmax); N query heads share K kv heads. Returns (B, T, N, H).

    A query whose mask is empty (a padding position) gets a finite, meaningless output.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    if N % K:
        raise ValueError(f"attend: {N} query heads not divisible by {K} kv heads")
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * (H ** -0.5)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


def multihead_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_pos_BT: jax.Array,
                        k_pos_BS: jax.Array, window: int | None = None, q_seg_BT: jax.Array | None = None,
                        k_seg_BS: jax.Array | None = None, impl: str = "dense", block: int = 512) -> jax.Array:
    """Attention output (B, T, N, H) under the position/segment mask, by the chosen implementation.

    "dense" materialises the (B, T, S) mask and float32 scores (the test oracle); "blockwise" visits
    only the key blocks each query block can see (O(T * W) with a window). Both give the same output
    for every query that sees at least one key.
    """
    if impl == "dense":
        return attend(q_BTNH, k_BSKH, v_BSKH, attention_mask(q_pos_BT, k_pos_BS, window, q_seg_BT, k_seg_BS))
    if impl == "blockwise":
        from mistral_jax.blockwise import blockwise_attend  # blockwise builds on this module's mask
        return blockwise_attend(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, window, q_seg_BT, k_seg_BS,
                                block_q=block, block_k=block)
    raise ValueError(f"attention implementation must be one of {IMPLS}, got {impl!r}")
