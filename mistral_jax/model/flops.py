"""Model FLOPs per token (GQA projections, SwiGLU, sliding-window attention span), MFU, and the FLOPs XLA
counts in a compiled program.

Model FLOPs are the standard definition: 2 per token per weight that takes part in a matmul (the
q/k/v/o and w1/w2/w3 projections and the output head; not the embedding lookup) plus QK^T and PV over
the keys each query attends to (causal, within the sliding window), for the forward pass; training
is three times that (forward + backward). Not counted: norms, activations, softmax, the loss, the
optimizer, masked-out attention scores and any recomputation (remat, attention's backward). The
compiled program's own count (`compiled_flops`) includes all of those, so its ratio to the model
FLOPs is the work the implementation adds.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from mistral_jax.model.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: q/k/v/o, w1/w2/w3 of every layer, and the output head.

    The token embedding is a lookup, not a matmul; norms are elementwise.
    """
    D, N, K, H, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
    attn = D * N * H + 2 * D * K * H + N * H * D  # wq, wk + wv (K kv heads), wo
    ffn = 3 * D * F  # w1, w3, w2
    return cfg.n_layers * (attn + ffn) + D * cfg.vocab_size


def mean_attention_span(seq_len: int, window: int | None) -> float:
    """Keys a query attends to, averaged over positions 0..T-1 of a causal row: mean of min(p + 1, W)."""
    if seq_len < 1:
        raise ValueError(f"mean_attention_span: seq_len must be >= 1, got {seq_len}")
    w = seq_len if window is None else min(window, seq_len)
    # positions 0..w-1 see p+1 keys; positions w..T-1 see w keys.
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token: 2 per matmul weight, plus QK^T and PV over the attended span."""
    attn = cfg.n_layers * 2 * 2 * cfg.n_heads * cfg.head_dim * mean_attention_span(seq_len, cfg.sliding_window)
    return 2.0 * matmul_params(cfg) + attn


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: forward + backward (twice the forward). Rematerialisation is not counted."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def compiled_flops(compiled: Any) -> float:
    """FLOPs of a compiled program (`jax.jit(f).lower(...).compile()`) by XLA's cost analysis.

    The analysis counts a while loop's body once, whatever its trip count (a lax.scan of 10 matmuls
    reports one), and a conditional's costliest branch; so this is the program's work only when it has
    no loop that runs more than once: e.g. the train step with one scanned layer (or scan_layers=False),
    one micro-batch, and a row no longer than an attention block and a loss chunk.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0]
    return float(analysis["flops"])


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the stated peak."""
    if peak_flops <= 0:
        raise ValueError(f"mfu: peak_flops must be > 0, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops


def measure_peak_flops(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """Best observed FLOP/s of an n x n x n matmul on the default device (a stand-in for the peak)."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best
