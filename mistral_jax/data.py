"""Text files -> tokenised documents -> packed fixed-length rows with segment ids and per-document positions.

Streaming and resumable: each epoch shuffles the file order with the seed; files are read and
tokenised a window at a time, the window's packed rows are shuffled, and the iterator's position
is the small dict {'epoch', 'window', 'row'}. Memory is bounded by one window, not the corpus.
"""

from __future__ import annotations

import glob
import sysconfig
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

from mistral_jax.run_config import DataSection

Row = dict[str, np.ndarray]  # 'tokens', 'positions', 'segment_ids': int32 (T,); segment 0 = padding


class TextEncoder(Protocol):
    bos_id: int
    eos_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


# ----- files -----

def list_files(data: DataSection) -> list[Path]:
    """The corpus files, sorted: Python's standard library sources or the configured globs."""
    if data.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        candidates = root.glob(data.pattern)
    elif data.source == "files":
        candidates = (Path(p) for pattern in data.paths for p in glob.glob(pattern, recursive=True))
    else:
        raise ValueError(f"data.source must be 'stdlib' or 'files', got {data.source!r}")
    excluded = set(data.exclude)
    files = sorted({p for p in candidates
                    if p.is_file() and not excluded.intersection(p.parts)
                    and (data.max_bytes <= 0 or p.stat().st_size <= data.max_bytes)})
    if not files:
        where = data.pattern if data.source == "stdlib" else list(data.paths)
        raise FileNotFoundError(f"data: no files found for source={data.source!r} ({where})")
    return files


def split_files(files: Sequence[Path], val_percent: float) -> tuple[list[Path], list[Path]]:
    """(train, held-out) by a stable hash of each file name and its parent, independent of the file count."""
    train, val = [], []
    for f in files:
        key = f"{f.parent.name}/{f.name}".encode()
        (val if (zlib.crc32(key) % 10_000) < val_percent * 100 else train).append(f)
    if not train:
        raise ValueError(f"data: val_percent={val_percent} left no training files out of {len(files)}")
    return train, val


def read_documents(files: Sequence[Path], tokenizer: TextEncoder) -> list[list[int]]:
    """Each file is one document: BOS + tokens + EOS (empty files are skipped)."""
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    texts = [t for t in texts if t.strip()]
    return [[tokenizer.bos_id] + ids + [tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]


# ----- packing -----

def pack_documents(docs: Iterable[Sequence[int]], seq_len: int) -> Iterator[Row]:
    """Greedy packing into rows of seq_len tokens. A document that does not fit is continued in the next
    row (positions continue); segment ids count from 1 within a row; the last row is padded (segment 0)."""
    tokens = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
    segments = np.zeros(seq_len, np.int32)
    fill, seg = 0, 0
    for doc in docs:
        doc = np.asarray(doc, np.int32)
        start = 0
        while start < len(doc):
            n = min(seq_len - fill, len(doc) - start)
            seg += 1
            tokens[fill:fill + n] = doc[start:start + n]
            positions[fill:fill + n] = np.arange(start, start + n)
            segments[fill:fill + n] = seg
            fill += n
            start += n
            if fill == seq_len:
                yield {"tokens": tokens.copy(), "positions": positions.copy(), "segment_ids": segments.copy()}
                tokens[:], positions[:], segments[:] = 0, 0, 0
                fill, seg = 0, 0
    if fill:
        yield {"tokens": tokens, "positions": positions, "segment_ids": segments}


def stack_rows(rows: Sequence[Row]) -> dict[str, np.ndarray]:
    """Rows -> (N, T) arrays."""
    return {k: np.stack([r[k] for r in rows]) for k in ("tokens", "positions", "segment_ids")}


# ----- the resumable stream -----

class PackedStream:
    """Batches of packed rows, (batch_size, seq_len) each. `state()` / `restore()` give exact resumption.

    shuffle=True: endless, file order reshuffled each epoch and rows shuffled within each window of
    `shuffle_files` files. shuffle=False: files in order, one pass (for held-out evaluation).
    """

    def __init__(self, files: Sequence[Path], tokenizer: TextEncoder, seq_len: int, batch_size: int,
                 seed: int = 0, shuffle_files: int = 64, shuffle: bool = True):
        if not files:
            raise ValueError("PackedStream: no files")
        self.files = list(files)
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.window_size, self.shuffle = seed, shuffle_files, shuffle
        self._epoch, self._window, self._row = 0, 0, 0
        self._rows: list[Row] | None = None  # rows of the current window, in emission order
        self._empty_windows = 0  # consecutive windows without rows (all files empty)

    @property
    def n_windows(self) -> int:
        return -(-len(self.files) // self.window_size)

    def state(self) -> dict[str, int]:
        """Position of the next row: a small JSON-able dict."""
        return {"epoch": self._epoch, "window": self._window, "row": self._row, "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a position returned by `state()` (the seed must match)."""
        for key in ("epoch", "window", "row"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise ValueError(f"PackedStream.restore: field '{key}' must be a non-negative int, got {state.get(key)!r}")
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"PackedStream.restore: state was saved with seed {state['seed']}, "
                             f"this stream has seed {self.seed} (data.seed)")
        self._epoch, self._window, self._row = state["epoch"], state["window"], state["row"]
        self._rows = None

    def _load_window(self) -> list[Row]:
        order = np.arange(len(self.files))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self._epoch]).permutation(len(self.files))
        idx = order[self._window * self.window_size:(self._window + 1) * self.window_size]
        rows = list(pack_documents(read_documents([self.files[i] for i in idx], self.tokenizer), self.seq_len))
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self._epoch, self._window, 1]).permutation(len(rows))
            rows = [rows[i] for i in perm]
        return rows

    def next_row(self) -> Row:
        """The next row; raises StopIteration at the end of a non-shuffled pass."""
        if not self.shuffle and self._window >= self.n_windows:
            raise StopIteration
        while True:
            if self._rows is None:
                self._rows = self._load_window()
            if self._row < len(self._rows):
                row = self._rows[self._row]
                self._row += 1
                self._empty_windows = 0
                return row
            self._empty_windows = self._empty_windows + 1 if not self._rows else 0
            if self._empty_windows > self.n_windows:
                raise ValueError(f"PackedStream: none of the {len(self.files)} files has any text")
            self._rows, self._row = None, 0
            self._window += 1
            if self._window >= self.n_windows:
                if not self.shuffle:
                    self._window = self.n_windows
                    raise StopIteration
                self._window, self._epoch = 0, self._epoch + 1

    def __iter__(self) -> "PackedStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """A (batch_size, seq_len) batch; the last batch of a non-shuffled pass is padded with empty rows."""
        rows = []
        try:
            while len(rows) < self.batch_size:
                rows.append(self.next_row())
        except StopIteration:
            if not rows:
                raise
            empty = {k: np.zeros(self.seq_len, np.int32) for k in ("tokens", "positions", "segment_ids")}
            rows += [empty] * (self.batch_size - len(rows))
        return stack_rows(rows)


def make_streams(data: DataSection, tokenizer: TextEncoder) -> tuple[PackedStream, PackedStream | None]:
    """(train stream, held-out stream or None) for a run's data section."""
    train_files, val_files = split_files(list_files(data), data.val_percent)
    train = PackedStream(train_files, tokenizer, data.seq_len, data.batch_size, data.seed, data.shuffle_files)
    val = (PackedStream(val_files, tokenizer, data.seq_len, data.batch_size, data.seed, data.shuffle_files,
                        shuffle=False) if val_files else None)
    return train, val
