"""LoRA's configuration: rank, alpha and targeted projections, and the rank bound each model config sets.

Kept apart from `lora` (the params-tree operations) so that the model and run configs can name it
without importing the model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from mistral_jax.model.config import ModelConfig

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# LoRA adapter params sit beside their weight in the same module: "<weight>_lora_a", "<weight>_lora_b".
LORA_A_SUFFIX = "_lora_a"
LORA_B_SUFFIX = "_lora_b"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapter rank, scaling numerator alpha (updates are scaled by alpha / rank) and the targeted
    projections (default: all seven, attention and MLP). Hashable: usable as a static jit argument."""
    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig: field 'rank' must be an integer >= 1, got {self.rank!r}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ValueError(f"LoraConfig: field 'alpha' must be a finite number > 0, got {self.alpha!r}")
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, (tuple, list)):
            raise ValueError(f"LoraConfig: field 'targets' must be a tuple of names from {TARGETS}, got {targets!r}")
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets or len(set(targets)) != len(targets):
            raise ValueError(f"LoraConfig: field 'targets' must be a non-empty subset of {TARGETS} without "
                             f"repeats, got {tuple(targets)!r}" + (f" (unknown: {bad})" if bad else ""))
        object.__setattr__(self, "targets", tuple(targets))

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on (x A) B."""
        return self.alpha / self.rank


def lora_projection_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(input features, output features) of each LoRA-targetable projection of a layer of `cfg` (heads
    flattened: wq maps dim -> n_heads * head_dim)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"wq": (cfg.dim, q), "wk": (cfg.dim, kv), "wv": (cfg.dim, kv), "wo": (q, cfg.dim),
            "w1": (cfg.dim, cfg.hidden_dim), "w2": (cfg.hidden_dim, cfg.dim), "w3": (cfg.dim, cfg.hidden_dim)}


def lora_rank_error(rank: int, targets: Sequence[str], cfg: ModelConfig) -> str | None:
    """Why `rank` is too large for the targeted projections of `cfg` (None when it is not): a rank above
    min(in, out) of a projection adds parameters but no expressiveness, and an absurd one would allocate
    rank x dim adapters before failing."""
    dims = lora_projection_dims(cfg)
    name = min(targets, key=lambda t: min(dims[t]))
    limit = min(dims[name])
    if rank <= limit:
        return None
    return (f"{rank} exceeds {limit}, the smaller dimension of the targeted projection {name} "
            f"({dims[name][0]} x {dims[name][1]} in this model); lora.rank must be <= min(in, out) of every target")


def check_rank(cfg: ModelConfig, lcfg: LoraConfig, who: str = "lora") -> None:
    """Raises a ValueError naming the field when lcfg.rank exceeds min(in, out) of a targeted projection
    of cfg (such a rank adds nothing; a huge one would try to allocate rank x dim adapters)."""
    error = lora_rank_error(lcfg.rank, lcfg.targets, cfg)
    if error:
        raise ValueError(f"{who}: field 'rank': {error}")
