"""What a training run reads: its train and held-out batch streams (`make_data` in training/sources.py
chooses them by `data.source`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Protocol


class Stream(Protocol):
    """An endless (train) or one-pass (held-out) iterator of (batch_size, seq_len) int32 batches."""
    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def __next__(self) -> dict[str, Any]: ...
    def state(self) -> dict[str, Any]: ...
    def restore(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class DataSource:
    """A run's data: train stream, held-out stream (or None), a one-line description, a report dict
    (written to the run summary: skipped lines, truncated conversations, ...) and, for fine-tuning,
    held-out (prompt ids, reference answer) pairs for greedy exact-match scoring."""
    train: Stream
    val: Stream | None
    description: str
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    answers: list[tuple[list[int], str]] = dataclasses.field(default_factory=list)
    val_start: dict[str, Any] = dataclasses.field(default_factory=dict)   # val.state() before any batch

    def __post_init__(self) -> None:
        if self.val is not None and not self.val_start:
            self.val_start = self.val.state()

