"""AdamW with linear warmup + cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from mistral_jax.training.run_config import OptimSection


def learning_rate_schedule(opt: OptimSection, total_steps: int) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, then cosine down to lr * min_lr_ratio at total_steps."""
    warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=opt.lr * opt.min_lr_ratio)


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (not on norm scales)."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm (skipped when clip_norm <= 0) -> AdamW(schedule), applied to the master params."""
    clip = optax.clip_by_global_norm(opt.clip_norm) if opt.clip_norm > 0 else optax.identity()
    return optax.chain(
        clip,
        optax.adamw(learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                    weight_decay=opt.weight_decay, mask=_decay_mask),
    )
