"""Mistral 7B in JAX/Flax: the model, checkpoints (native, Hugging Face, mistral-inference), generation,
scoring and training.

The names below are the library's public surface. The error types are imported with the package (they need
nothing but the standard library); everything else is imported on first use, so `import mistral_jax` (and
importing any light submodule, such as `mistral_jax.runtime.files`) does not load JAX.

    from mistral_jax import ModelConfig, load_params, generate, Tokenizer
    cfg, params = load_params("path/to/checkpoint")
"""

from __future__ import annotations

import importlib
from typing import Any

from mistral_jax.errors import (ChatDataError, ChatFormatError, CheckpointError, ConfigError, DataError,
                                DistributedError, DtypeError, EvalError, PromptError, RunConfigError, RunError,
                                TokenizerError, TrainingDiverged, WeightError)

__version__ = "0.1.0"

# public name -> the module that defines it (imported by `__getattr__` when the name is first used)
_LAZY = {
    "ModelConfig": "mistral_jax.model.config",
    "Transformer": "mistral_jax.model.transformer",
    "init_params": "mistral_jax.model.transformer",
    "make_mesh": "mistral_jax.model.sharding",
    "load_params": "mistral_jax.checkpoint.native",
    "save_params": "mistral_jax.checkpoint.native",
    "Tokenizer": "mistral_jax.data.tokenizer",
    "generate": "mistral_jax.inference.decode",
    "Scorer": "mistral_jax.inference.scoring",
}

__all__ = [
    "__version__", *_LAZY,
    "ChatDataError", "ChatFormatError", "CheckpointError", "ConfigError", "DataError", "DistributedError",
    "DtypeError", "EvalError", "PromptError", "RunConfigError", "RunError", "TokenizerError", "TrainingDiverged",
    "WeightError",
]


def __getattr__(name: str) -> Any:
    """The lazily imported public names (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'mistral_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
