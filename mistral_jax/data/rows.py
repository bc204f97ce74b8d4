"""Packed rows and the batches made of them: the keys every training batch holds, and the stream base class.

A row is one sequence of `seq_len` int32 values per key: token ids, the position of each token within its
document or conversation, its segment id (1, 2, ... within the row; 0 = padding) and, for conversations,
whether it is a target (1) or context (0). A batch stacks rows into (rows, seq_len) arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

BATCH_KEYS = ("tokens", "positions", "segment_ids", "target_mask")
TEXT_KEYS = BATCH_KEYS[:3]      # pretraining rows: every real token is a target (no target_mask)

Row = dict[str, np.ndarray]     # key -> int32 (T,)
Batch = dict[str, np.ndarray]   # key -> int32 (B, T)


def empty_row(seq_len: int, keys: Sequence[str] = BATCH_KEYS) -> Row:
    """A padding row: every key int32 zeros (seq_len,) (segment 0, no target)."""
    return {k: np.zeros(seq_len, np.int32) for k in keys}


def stack_rows(rows: Sequence[Row]) -> Batch:
    """Rows (all with the same keys) -> key -> int32 (len(rows), T)."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def check_counters(state: dict[str, Any], keys: Sequence[str], who: str) -> None:
    """ValueError naming `who` and the field unless each of `keys` in a stream state is an int >= 0."""
    for key in keys:
        v = state.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{who}: field '{key}' must be a non-negative int, got {v!r}")


class RowStream:
    """Batches of `batch_size` rows from `next_row()`: `row_keys` -> int32 (batch_size, seq_len).

    `next_row()` raises StopIteration at the end of a one-pass stream; the last batch of the pass is then
    filled up with padding rows.
    """
    row_keys: tuple[str, ...] = BATCH_KEYS
    batch_size: int
    seq_len: int

    def next_row(self) -> Row:
        raise NotImplementedError

    def __iter__(self) -> "RowStream":
        return self

    def __next__(self) -> Batch:
        rows = []
        try:
            while len(rows) < self.batch_size:
                rows.append(self.next_row())
        except StopIteration:
            if not rows:
                raise
            rows += [empty_row(self.seq_len, self.row_keys)] * (self.batch_size - len(rows))
        return stack_rows(rows)
