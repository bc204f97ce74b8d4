"""Our params as a torch-layout state dict, one tensor at a time (for loading into reference models)."""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from mistral_jax.checkpoint.weights import contiguous, param_slice, tensor_specs
from mistral_jax.model.config import ModelConfig


def params_to_state_dict(params: Mapping, cfg: ModelConfig, layout: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, C-contiguous numpy tensor in torch layout, possibly read-only) one tensor at a time."""
    for spec in tensor_specs(cfg, layout):
        w = np.asarray(param_slice(params, spec))
        yield spec.key, contiguous(spec.from_ours(w))
