"""Token embedding lookup: rows of the (vocab, embed) table for a batch of token ids."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mistral_jax import packing


def lookup(emb_VD: jax.Array, tokens_BT: jax.Array, dtype: Any) -> jax.Array:
    """Embedding rows (B, T, D) in `dtype` of token ids (B, T); emb_VD may be packed (packing.pack):
    the rows are gathered as bits and only they are unpacked."""
    return packing.unpack(jnp.take(emb_VD, tokens_BT, axis=0)).astype(dtype)
