"""Params-tree helpers only tests use: per-layer <-> scanned trees, logical partition specs, packed leaves."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.model.config import ModelConfig
from mistral_jax.model.lora_config import LoraConfig
from mistral_jax.model.packing import PACKED
from mistral_jax.model.transformer import abstract_params


def stack_layers(params: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    """Per-layer tree ("layers_0", ...) -> scanned tree ("layers" with a leading layer axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(n_layers)])
    return out


def param_logical_specs(cfg: ModelConfig, lora: LoraConfig | None = None) -> Any:
    """Tree of PartitionSpecs in logical axis names, matching the unboxed params tree (with `lora`,
    adapters included)."""
    return nn.get_partition_spec(abstract_params(cfg, lora=lora))


def is_packed(tree: Any) -> bool:
    """Whether any leaf of `tree` is a packed weight (`packing.pack`)."""
    return any(getattr(x, "dtype", None) == PACKED for x in jax.tree_util.tree_leaves(tree))
