"""Token embedding lookup: rows of the (vocab, embed) table for a batch of token ids.

Under a mesh whose "batch" rule and the table's "embed" rule share an axis (data-parallel rows over
(data, fsdp), table columns over fsdp: the recommended multi-host layout), the partitioner left to itself
gathers each row's fsdp slice for the rows of the data shard, keeping them split over fsdp, then cannot turn
that into rows split over (data, fsdp): it warned "Involuntary full rematerialization" and replicated the
global batch of rows on every device, forward and (for the table's gradient, a scatter-add) backward: a
(global batch, T, D) float32 array per device. `lookup` pins the gathered rows to (batch over the axes it
does not share with embed, -, embed), so the step to (batch, -, -) is one all-to-all over the shared axes
and its transpose takes the cotangent back the same way into the scatter-add on each device's table shard.
The values are those of the plain take (the gradient's sums only regroup across devices).

Chosen by `memory_analysis()` of the Mistral-7B train step (bf16 params, remat full, seq 512) on 8 simulated
devices against gathering the table over fsdp before the take (the (V/tensor, D) table and its gradient
whole on each device: more temp) and a one-hot matmul for the table's gradient (2*B*T*V*D more FLOPs, a
(V/tensor, D) float32 product per device, and the forward still needed the pin).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from jax.sharding import PartitionSpec

from mistral_jax.model import packing


def _mesh_axes(logical: str) -> tuple[str, ...]:
    """The mesh axes the current logical rules give `logical` (alone), as a tuple (empty: unsharded)."""
    spec = nn.logical_to_mesh_axes((logical,))
    axes = None if spec is None else spec[0]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _entry(axes: tuple[str, ...]) -> Any:
    """A PartitionSpec entry for `axes`: None, one name, or the tuple."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


def layout() -> tuple[str, PartitionSpec] | None:
    """How `lookup` places its work under the current rules and mesh: ("rows", spec) pins the (B, T, D) rows
    to spec, batch over the "batch" axes less those shared with "embed", D over "embed"'s (one all-to-all
    from the batch layout); ("table", spec) takes from the table gathered over the shared axes, when they are
    not the minor end of "batch" (no single all-to-all reaches the batch layout from there); None outside a
    mesh with rules or when "batch" and "embed" share no axis (nothing to do)."""
    if not nn.get_logical_axis_rules() or not meta.global_mesh_defined():
        return None
    batch, embed = _mesh_axes("batch"), _mesh_axes("embed")
    shared = tuple(a for a in embed if a in batch)
    if not shared:
        return None
    n = len(batch) - len(shared)
    if batch[n:] == shared:
        return "rows", PartitionSpec(_entry(batch[:n]), None, _entry(embed))
    return "table", PartitionSpec(_entry(_mesh_axes("vocab")), None)


def lookup(emb_VD: jax.Array, tokens_BT: jax.Array, dtype: Any) -> jax.Array:
    """Embedding rows (B, T, D) in `dtype` of token ids (B, T); emb_VD may be packed (packing.pack):
    the rows are gathered as bits and only they are unpacked. Under a mesh (sharding.with_rules) the rows are
    laid out so that neither they nor the table's gradient are replicated over the batch (module doc)."""
    how = layout()
    if how is not None and how[0] == "table":
        emb_VD = jax.lax.with_sharding_constraint(emb_VD, how[1])
    rows_BTD = jnp.take(emb_VD, tokens_BT, axis=0)
    if how is not None and how[0] == "rows":
        rows_BTD = jax.lax.with_sharding_constraint(rows_BTD, how[1])
    return packing.unpack(rows_BTD).astype(dtype)
