"""A global batch built from `data.shards` independent reader streams, spread over the processes.

Shard s reads only its own disjoint part of the corpus and supplies rows [s*b, (s+1)*b) of every
global batch (b = batch_size / shards). Process p runs the shards [p*S/P, (p+1)*S/P) and nothing else,
so each host reads a disjoint share of the data, and the global batch (and thus training) is the same
for any process count P that divides S. The iterator state is one small dict per shard; a checkpoint
holds all of them (gathered from the processes), so resuming on P processes restores exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from mistral_jax.data.rows import Batch, empty_row, stack_rows
from mistral_jax.errors import DataError


def owned_shards(n_shards: int, process_index: int, process_count: int) -> range:
    """The shards process `process_index` of `process_count` runs; DataError unless P divides S."""
    if n_shards % process_count:
        raise DataError(f"data.shards={n_shards} must be a multiple of the number of processes ({process_count}): "
                        "each process reads whole shards")
    per = n_shards // process_count
    return range(process_index * per, (process_index + 1) * per)


def assign(items: Sequence[Any], n_shards: int) -> list[list[Any]]:
    """Items (files, lines) dealt round-robin into n_shards disjoint lists, the same for any process."""
    return [list(items[s::n_shards]) for s in range(n_shards)]


class ShardedStream:
    """This process's rows of each global batch: its shards' batches concatenated in shard order.

    make(s) builds shard s's stream (batch_size = rows per shard). With `endless_padding` (held-out
    passes), a finished shard keeps yielding empty rows, so processes whose shards end at different times
    stay in step; the caller bounds the number of batches.
    """

    def __init__(self, n_shards: int, shards: Sequence[int], make: Callable[[int], Any],
                 endless_padding: bool = False):
        self.n_shards = n_shards
        self.shards = list(shards)
        self.streams = {s: make(s) for s in self.shards}
        self.endless_padding = endless_padding
        self._done: set[int] = set()

    @property
    def files(self) -> list[Any]:
        """The files this process reads (all of its shards')."""
        return [f for s in self.shards for f in getattr(self.streams[s], "files", [])]

    def state(self) -> dict[str, Any]:
        """{'shards': {str(s): shard state}} for this process's shards (merge processes' dicts for all)."""
        return {"shards": {str(s): self.streams[s].state() for s in self.shards}}

    def restore(self, state: dict[str, Any]) -> None:
        """Restores this process's shards from a state holding at least them."""
        saved = state.get("shards")
        if not isinstance(saved, dict):
            raise ValueError(f"data state has no per-shard positions ('shards'), got keys {sorted(state)[:10]}")
        missing = [s for s in self.shards if str(s) not in saved]
        if missing:
            raise ValueError(f"data state holds shards {sorted(saved, key=int)}, this process needs {missing} "
                             f"(data.shards={self.n_shards})")
        for s in self.shards:
            self.streams[s].restore(saved[str(s)])
        self._done.clear()

    def __iter__(self) -> "ShardedStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = []
        for s in self.shards:
            if s not in self._done:
                try:
                    parts.append(next(self.streams[s]))
                    continue
                except StopIteration:
                    if not self.endless_padding:
                        raise
                    self._done.add(s)
            parts.append(self._empty(s))
        keys = [k for k in parts[0] if all(k in p for p in parts)]
        return {k: np.concatenate([p[k] for p in parts]) for k in keys}

    def _empty(self, s: int) -> Batch:
        """A batch of padding rows (every BATCH_KEYS key) in the shape of shard s's batches."""
        st = self.streams[s]
        return stack_rows([empty_row(st.seq_len)] * st.batch_size)


class Exhausted:
    """A shard with no files in a held-out split: it ends at once (ShardedStream pads it with empty rows)."""

    def __init__(self, batch_size: int, seq_len: int):
        self.batch_size, self.seq_len, self.files = batch_size, seq_len, []

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        pass

    def __next__(self) -> dict[str, np.ndarray]:
        raise StopIteration


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One data state holding every shard, from the processes' `ShardedStream.state()` dicts."""
    out: dict[str, Any] = {}
    for st in states:
        out.update(st.get("shards", {}))
    return {"shards": dict(sorted(out.items(), key=lambda kv: int(kv[0])))}


def check_shards(n_shards: int, batch_size: int, grad_accum: int, process_count: int) -> None:
    """DataError naming the numbers unless each shard supplies whole rows to every micro-batch."""
    if n_shards < 1:
        raise DataError(f"data.shards must be >= 1, got {n_shards}")
    owned_shards(n_shards, 0, process_count)
    if batch_size % (n_shards * grad_accum):
        raise DataError(f"data.batch_size={batch_size} must be a multiple of data.shards={n_shards} x "
                        f"optim.grad_accum={grad_accum}: every shard gives each micro-batch the same number of rows")
