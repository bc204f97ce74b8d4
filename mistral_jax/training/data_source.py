"""What a training run reads: its train and held-out batch streams, chosen by `data.source`.

Pretraining (`stdlib`, `files`) packs whole documents and trains on every token; fine-tuning (`chat`,
`chat-examples`) packs conversations and trains on the assistant answers only (a per-token target mask).
The training loop is the same for both; only this choice differs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Protocol

from mistral_jax.data import text as data_lib
from mistral_jax.training.run_config import CHAT_SOURCES, RunConfig
from mistral_jax.data.tokenizer import Tokenizer


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


def is_chat(rc: RunConfig) -> bool:
    return rc.data.source in CHAT_SOURCES


def make_data(rc: RunConfig, tokenizer: Tokenizer, run_dir: Path) -> DataSource:
    """The DataSource for rc.data (chat data is read with the model vocab's instruct template)."""
    if is_chat(rc):
        from mistral_jax.training import chat_source
        return chat_source.make_chat_data(rc, tokenizer, run_dir)
    import jax
    train, val, corpus = data_lib.make_streams(rc.data, tokenizer, jax.process_index(), jax.process_count())
    desc = (corpus.describe(rc.data.max_bytes)
            + f"; {len(train.files)} train, {len(val.files) if val else 0} held out")
    return DataSource(train, val, desc)
