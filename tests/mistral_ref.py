"""mistral-inference (the official PyTorch implementation) as a CPU oracle for tests.

xformers' `memory_efficient_attention` is CUDA-only, so `load_mi` replaces the name
`mistral_inference.transformer_layers.memory_efficient_attention` (once per process; idempotent) with
plain softmax attention over the attention bias's `materialize()`d mask. Everything else (rotary,
masks, BufferCache) is mistral-inference's own code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_PATCHED = False


def _plain_attention(q, k, v, attn_bias=None, p: float = 0.0, scale: float | None = None, **_):
    """softmax(q k^T * scale + mask) v for (1, S, H, D) tensors, mask from `attn_bias.materialize`."""
    import torch
    if p:
        raise ValueError("_plain_attention: dropout is not supported")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if attn_bias is not None:
        mask = attn_bias if isinstance(attn_bias, torch.Tensor) else attn_bias.materialize(
            (q.shape[1], k.shape[1]), dtype=torch.float32, device=q.device)
        scores = scores + mask
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v.float())
    return out.to(q.dtype).contiguous()


def _patch() -> None:
    global _PATCHED
    if not _PATCHED:
        from mistral_inference import transformer_layers
        transformer_layers.memory_efficient_attention = _plain_attention
        _PATCHED = True


def load_mi(folder: str | Path, max_batch_size: int = 8):
    """A mistral-inference `Transformer` from `folder`, on CPU in float32, with CPU-capable attention."""
    import torch
    _patch()
    from mistral_inference.transformer import Transformer
    return Transformer.from_folder(Path(folder), max_batch_size=max_batch_size, device="cpu",
                                   dtype=torch.float32).eval()


def mi_logits(model, token_lists: list[list[int]], chunk_size: int | None = None) -> list[np.ndarray]:
    """Per prompt, the (len, vocab) float32 logits of every position, run through a BufferCache.

    Without `chunk_size` all prompts go in one prefill; with it, each step feeds the next `chunk_size`
    tokens of every prompt (mistral-inference needs a non-empty chunk for every prompt at every step, so
    the prompts must then run out together: equal lengths, or lengths in the same last chunk).
    """
    import torch
    from mistral_inference.cache import BufferCache
    _patch()
    lens = [len(t) for t in token_lists]
    if not lens or min(lens) < 1:
        raise ValueError(f"mi_logits: every prompt needs at least one token, got lengths {lens}")
    step = chunk_size or max(lens)
    if -(-min(lens) // step) != -(-max(lens) // step):
        raise ValueError(f"mi_logits: prompt lengths {lens} need different chunk counts at chunk_size={step}")
    args = model.args
    cache = BufferCache(args.n_layers, len(lens), max(lens), args.n_kv_heads, args.head_dim,
                        args.sliding_window)
    for i in range(args.n_layers):  # torch.empty may hold NaNs, and 0 * NaN would leak through the mask
        cache.cache_k[i].zero_()
        cache.cache_v[i].zero_()
    cache.to(device=model.device, dtype=model.dtype)
    cache.reset()
    outs: list[list[np.ndarray]] = [[] for _ in lens]
    with torch.no_grad():
        for s in range(0, max(lens), step):
            chunks = [list(t[s:s + step]) for t in token_lists]
            seqlens = [len(c) for c in chunks]
            logits = model.forward(torch.tensor(sum(chunks, []), dtype=torch.long), seqlens=seqlens, cache=cache)
            for i, part in enumerate(torch.split(logits.float(), seqlens)):
                outs[i].append(part.numpy())
    return [np.concatenate(o) for o in outs]
