"""Packed test rows: two documents per row, positions restarting at the cut, random token ids."""

import numpy as np


def two_documents(rows: int, T: int, cut: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """{'tokens', 'positions', 'segment_ids'}: int32 (rows, T); document 2 starts at index `cut`."""
    rng = np.random.default_rng(seed)
    pos = np.concatenate([np.arange(cut), np.arange(T - cut)]).astype(np.int32)
    seg = np.concatenate([np.full(cut, 1), np.full(T - cut, 2)]).astype(np.int32)
    return {"tokens": rng.integers(3, vocab, (rows, T)).astype(np.int32),
            "positions": np.tile(pos, (rows, 1)), "segment_ids": np.tile(seg, (rows, 1))}
