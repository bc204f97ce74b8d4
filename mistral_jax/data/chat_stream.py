"""Encoded conversations -> packed rows -> resumable batches (BATCH_KEYS -> int32 (batch_size, seq_len)).

Packing: conversations go into rows of seq_len tokens, first fit among the last `OPEN_ROWS` open rows;
each conversation is its own segment (ids 1, 2, ... within a row; 0 = padding) with positions from 0, so
conversations never attend to each other. A row without any target token is never emitted.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from mistral_jax.data.chat_files import ChatData, EncodedConversation
from mistral_jax.data.rows import Row, RowStream, check_counters, empty_row
from mistral_jax.errors import ChatDataError

OPEN_ROWS = 16          # rows still open for first-fit packing


def pack_conversations(convs: Iterable[EncodedConversation], seq_len: int,
                       open_rows: int = OPEN_ROWS) -> Iterator[list[int]]:
    """Rows as lists of indices into `convs` (in iteration order): each conversation goes into the first of
    the last `open_rows` open rows with room, else a new row; the oldest row is closed when too many are
    open. Rows come out in the order they are closed; a row never exceeds seq_len tokens."""
    rows: list[tuple[int, list[int]]] = []      # (tokens used, conversation indices)
    for i, c in enumerate(convs):
        n = len(c.tokens)
        if n > seq_len:
            raise ValueError(f"{c.where}: {n} tokens do not fit seq_len={seq_len}; fit conversations first")
        for k, (used, idx) in enumerate(rows):
            if used + n <= seq_len:
                rows[k] = (used + n, idx + [i])
                break
        else:
            rows.append((n, [i]))
            if len(rows) > open_rows:
                yield rows.pop(0)[1]
    for _, idx in rows:
        yield idx


def build_row(convs: Sequence[EncodedConversation], seq_len: int) -> Row:
    """One packed row (BATCH_KEYS -> int32 (seq_len,)): conversation k has segment id k+1 and positions from 0;
    the rest is padding (all zeros)."""
    row = empty_row(seq_len)
    at = 0
    for seg, c in enumerate(convs, 1):
        n = len(c.tokens)
        row["tokens"][at:at + n] = c.tokens
        row["positions"][at:at + n] = np.arange(n)
        row["segment_ids"][at:at + n] = seg
        row["target_mask"][at:at + n] = c.target_mask
        at += n
    return row


class ChatStream(RowStream):
    """Batches of packed conversations: BATCH_KEYS -> int32 (batch_size, seq_len). `state()`/`restore()` resume
    exactly.

    data: the conversations, fitted to the report's seq_len (see `read_chat_data`).
    shuffle=True: endless; each epoch packs the conversations in a fresh order drawn from (seed, epoch).
    shuffle=False: one pass in file order (for held-out evaluation); the last batch is padded with empty rows
    (segment 0, target_mask 0); then StopIteration. Raises ChatDataError when there is no conversation.
    """

    def __init__(self, data: ChatData, batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"ChatStream: batch_size must be >= 1, got {batch_size}")
        if not data.conversations:
            raise ChatDataError(f"chat data: no usable conversations in {', '.join(data.report.files)}: "
                                f"{data.report.counts()}")
        self.conversations = data.conversations
        self.seq_len, self.batch_size, self.seed, self.shuffle = data.report.seq_len, batch_size, seed, shuffle
        crc = 0
        for c in self.conversations:
            crc = zlib.crc32(c.tokens.tobytes(), zlib.crc32(c.target_mask.tobytes(), crc))
        self.fingerprint = crc
        self._epoch, self._row = 0, 0
        self._plan: list[list[int]] | None = None    # rows of the current epoch (conversation indices)

    def _epoch_plan(self) -> list[list[int]]:
        order = np.arange(len(self.conversations))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self._epoch]).permutation(len(order))
        convs = [self.conversations[i] for i in order]
        return [[int(order[j]) for j in idx] for idx in pack_conversations(convs, self.seq_len)
                if any(convs[j].target_mask.any() for j in idx)]

    @property
    def rows_per_epoch(self) -> int:
        """Rows the current epoch emits (rows without a target are left out)."""
        if self._plan is None:
            self._plan = self._epoch_plan()
        return len(self._plan)

    def state(self) -> dict[str, int]:
        """Position of the next row, with what identifies the data: a small JSON-able dict."""
        return {"epoch": self._epoch, "row": self._row, "seed": self.seed,
                "conversations": len(self.conversations), "fingerprint": self.fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`; ValueError naming the field if it does not belong to this data and seed."""
        check_counters(state, ("epoch", "row"), "ChatStream.restore")
        for key, mine, what in (("seed", self.seed, "data.seed"),
                                ("conversations", len(self.conversations), "the number of conversations"),
                                ("fingerprint", self.fingerprint, "the conversations' tokens")):
            if key in state and state[key] != mine:
                raise ValueError(f"ChatStream.restore: state has {key}={state[key]!r}, this stream {mine!r}; "
                                 f"{what} changed since it was saved")
        if self._epoch != state["epoch"]:
            self._plan = None
        self._epoch, self._row = state["epoch"], state["row"]

    def next_row(self) -> Row:
        """The next packed row; StopIteration at the end of a non-shuffled pass."""
        while True:
            if self._plan is None:
                self._plan = self._epoch_plan()
            if self._row < len(self._plan):
                idx = self._plan[self._row]
                self._row += 1
                return build_row([self.conversations[i] for i in idx], self.seq_len)
            if not self.shuffle:
                raise StopIteration
            self._epoch, self._row, self._plan = self._epoch + 1, 0, None
