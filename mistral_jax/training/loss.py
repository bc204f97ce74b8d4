"""Next-token cross-entropy computed from final hidden states in sequence chunks.

The output head and the loss run one chunk of the sequence at a time under `jax.checkpoint`, so
neither pass holds float32 (B, T, V) logits: the forward keeps one (B, chunk, V) block alive, and
the backward recomputes each chunk's logits from its hidden states.

Axis letters: B rows, T sequence, c chunk, D model dim, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mistral_jax.inference.head import chunk_logits, from_chunks, to_chunks


def _chunk_nll(h_BcD: jax.Array, w_DV: jax.Array, targets_Bc: jax.Array) -> jax.Array:
    """Float32 NLL (B, c) of the targets under logits h @ w (w in any float dtype, or packed)."""
    logits_BcV = chunk_logits(h_BcD, w_DV)
    lse_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
    # a one-hot contraction, not a gather: its gradient is elementwise rather than a scatter, and it
    # partitions cleanly when the vocab axis is sharded.
    onehot_BcV = targets_Bc[..., None] == jnp.arange(logits_BcV.shape[-1], dtype=targets_Bc.dtype)
    return lse_Bc - jnp.sum(jnp.where(onehot_BcV, logits_BcV, 0.0), axis=-1)


def chunked_nll(h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, chunk: int = 512) -> jax.Array:
    """Float32 NLL (B, T) of `targets_BT` under logits `h_BTD @ w_DV`, computed `chunk` positions at a time.

    h_BTD: final hidden states (after the last norm), in the compute dtype; w_DV: output head (cast to the
    compute dtype chunk by chunk; a packed head, see `packing`, is unpacked chunk by chunk).
    Equal to the unchunked computation (values and gradients) up to float32 rounding.
    """
    if chunk < 1:
        raise ValueError(f"chunked_nll: chunk must be >= 1, got {chunk}")
    body = jax.checkpoint(lambda h, t: _chunk_nll(h, w_DV, t))
    nll_nBc = jax.lax.map(lambda xs: body(*xs), (to_chunks(h_BTD, chunk), to_chunks(targets_BT, chunk)))
    return from_chunks(nll_nBc, h_BTD.shape[1])
