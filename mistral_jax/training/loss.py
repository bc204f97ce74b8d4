"""Next-token cross-entropy computed from final hidden states in sequence chunks.

The output head and the loss run one chunk of the sequence at a time, so neither pass holds float32
(B, T, V) logits: the forward keeps one (B, chunk, V) block alive, and the backward recomputes each
chunk's logits from its hidden states. The chunk's backward is written by hand (`_chunk_nll`'s custom
VJP): d(logits) = softmax - onehot, then d(h) and d(w) as plain einsums, which XLA:CPU runs without the
transposed (V, B*c) copy and the second logits product that `jax.grad` of the forward produced (the loss
took 30% of the 57M train step before, BENCHMARKS.md).

Axis letters: B rows, T sequence, c chunk, D model dim, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mistral_jax.inference.head import chunk_head, chunk_logits, from_chunks, to_chunks
from mistral_jax.model import packing
from mistral_jax.model.projection import merged_einsum


def _onehot(targets_Bc: jax.Array, V: int) -> jax.Array:
    # a one-hot comparison, not a gather: elementwise in both passes, and it partitions cleanly when the
    # vocab axis is sharded
    return targets_Bc[..., None] == jnp.arange(V, dtype=targets_Bc.dtype)


def _nll_and_lse(h_BcD: jax.Array, w_DV: jax.Array, targets_Bc: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits_BcV = chunk_logits(h_BcD, w_DV)
    lse_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
    target_Bc = jnp.sum(jnp.where(_onehot(targets_Bc, logits_BcV.shape[-1]), logits_BcV, 0.0), axis=-1)
    return lse_Bc - target_Bc, lse_Bc


@jax.custom_vjp
def _chunk_nll(h_BcD: jax.Array, w_DV: jax.Array, targets_Bc: jax.Array) -> jax.Array:
    """Float32 NLL (B, c) of the targets under logits h @ w (w in any float dtype, cast to h's, or packed)."""
    return _nll_and_lse(h_BcD, w_DV, targets_Bc)[0]


def _chunk_nll_fwd(h_BcD, w_DV, targets_Bc):
    nll_Bc, lse_Bc = _nll_and_lse(h_BcD, w_DV, targets_Bc)
    # w as given (the caller's array, not a per-chunk cast of it), and no logits: they are recomputed
    return nll_Bc, (h_BcD, w_DV, targets_Bc, lse_Bc)


def _chunk_nll_bwd(res, g_Bc):
    h_BcD, w_given_DV, targets_Bc, lse_Bc = res
    w_DV = chunk_head(w_given_DV, h_BcD)
    logits_BcV = chunk_logits(h_BcD, w_DV)
    onehot_BcV = _onehot(targets_Bc, logits_BcV.shape[-1])
    dlogits_BcV = (g_Bc[..., None] * (jnp.exp(logits_BcV - lse_Bc[..., None]) - onehot_BcV)).astype(h_BcD.dtype)
    dh_BcD = jnp.einsum("bcv,dv->bcd", dlogits_BcV, w_DV, preferred_element_type=jnp.float32)
    if w_given_DV.dtype == packing.PACKED:  # a packed head is frozen (packing.py): no gradient
        return dh_BcD.astype(h_BcD.dtype), None, None
    dw_DV = merged_einsum("bcd,bcv->dv", h_BcD, dlogits_BcV, preferred_element_type=jnp.float32)
    return dh_BcD.astype(h_BcD.dtype), dw_DV.astype(w_given_DV.dtype), None


_chunk_nll.defvjp(_chunk_nll_fwd, _chunk_nll_bwd)


def chunked_nll(h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, chunk: int = 512) -> jax.Array:
    """Float32 NLL (B, T) of `targets_BT` under logits `h_BTD @ w_DV`, computed `chunk` positions at a time.

    h_BTD: final hidden states (after the last norm), in the compute dtype; w_DV: output head (cast to the
    compute dtype chunk by chunk; a packed head, see `packing`, is unpacked chunk by chunk).
    Equal to the unchunked computation (values and gradients) up to float32 rounding.
    """
    if chunk < 1:
        raise ValueError(f"chunked_nll: chunk must be >= 1, got {chunk}")
    nll_nBc = jax.lax.map(lambda xs: _chunk_nll(xs[0], w_DV, xs[1]),
                          (to_chunks(h_BTD, chunk), to_chunks(targets_BT, chunk)))
    return from_chunks(nll_nBc, h_BTD.shape[1])
