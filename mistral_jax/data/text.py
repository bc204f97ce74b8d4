"""Text files -> tokenised documents -> packed fixed-length rows with segment ids and per-document positions.

Streaming and resumable: each epoch shuffles the file order with the seed; files are read and
tokenised a shuffle group (`shuffle_files` files) at a time, the group's packed rows are shuffled, and
the iterator's position is the small dict {'epoch', 'group', 'row', 'seed'}. Memory is bounded by one
group, not the corpus.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np

from mistral_jax.data.rows import TEXT_KEYS, Row, RowStream, check_counters
from mistral_jax.data.shards import Exhausted, ShardedStream, assign, owned_shards
from mistral_jax.errors import DataError
from mistral_jax.runtime.files import file_identity, read_jsonl


class TextEncoder(Protocol):
    bos_id: int
    eos_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class CorpusSettings(Protocol):
    """What listing a corpus reads (a run config's [data] section has these fields)."""
    source: str            # "stdlib" (Python's library sources under `pattern`) or "files" (the `paths` globs)
    pattern: str
    paths: Sequence[str]
    exclude: Sequence[str]
    max_bytes: int         # 0: no limit


class TextSettings(CorpusSettings, Protocol):
    """What the pretraining streams read, besides the corpus (a run config's [data] section has these fields)."""
    val_percent: float
    seq_len: int
    batch_size: int        # rows of a global batch, over all shards
    seed: int
    shuffle_files: int
    shards: int


# ----- files -----

@dataclasses.dataclass(frozen=True)
class Corpus:
    """The corpus files (sorted) and what was left out of it."""
    files: list[Path]
    n_large: int  # skipped: larger than data.max_bytes
    n_excluded: int  # skipped: a path part below the corpus root is in data.exclude
    where: str  # the root directory or globs, for messages
    n_duplicates: int = 0  # names of a file already listed (another spelling, a symlink): read once

    def describe(self, max_bytes: int) -> str:
        """One line, e.g. 'data: 1234 files (56 skipped: larger than data.max_bytes=200000; 12 excluded ...)'."""
        notes = []
        if self.n_large:
            notes.append(f"{self.n_large} skipped: larger than data.max_bytes={max_bytes}")
        if self.n_excluded:
            notes.append(f"{self.n_excluded} excluded by data.exclude")
        if self.n_duplicates:
            notes.append(f"{self.n_duplicates} duplicate name(s) of a listed file, read once")
        return f"data: {len(self.files)} files from {self.where}" + (f" ({'; '.join(notes)})" if notes else "")


def glob_base(pattern: str) -> Path:
    """The directory part of a glob before its first wildcard ('data/**/x*.txt' -> 'data')."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if any(c in part for c in "*?["):
            return Path(*fixed) if fixed else Path(".")
        fixed.append(part)
    return Path(*fixed[:-1]) if len(fixed) > 1 else Path(".")  # no wildcard: the file's own directory


def _candidates(data: CorpusSettings) -> Iterator[tuple[Path, Path]]:
    """(file or directory, the corpus root it was found under)."""
    if data.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        for p in root.glob(data.pattern):
            yield p, root
    elif data.source == "files":
        for pattern in data.paths:
            base = glob_base(pattern)
            for p in glob.glob(pattern, recursive=True):
                yield Path(p), base
    else:
        raise DataError(f"data.source must be 'stdlib' or 'files', got {data.source!r}")


def list_files(data: CorpusSettings) -> Corpus:
    """The corpus: Python's standard library sources or the configured globs, less excluded and large files.

    `data.exclude` is matched against the path parts below the corpus root (the stdlib directory, or
    each glob's directory before its first wildcard), so the root's own location does not matter. A file
    named twice (relative and absolute globs, a symlink or hard link) is listed once, under its first name
    in sorted order: it is neither trained on twice nor both trained on and held out.
    """
    excluded = set(data.exclude)
    files, large, skipped = set(), set(), set()
    for p, root in _candidates(data):
        if not p.is_file():
            continue
        rel_parts = tuple(part for part in Path(os.path.relpath(p, root)).parts if part != "..")
        if excluded.intersection(rel_parts):
            skipped.add(p)
        elif data.max_bytes > 0 and p.stat().st_size > data.max_bytes:
            large.add(p)
        else:
            files.add(p)
    unique: dict[Any, Path] = {}
    for p in sorted(files):
        unique.setdefault(file_identity(p), p)
    n_duplicates = len(files) - len(unique)
    files = set(unique.values())
    where = sysconfig.get_paths()["stdlib"] + "/" + data.pattern if data.source == "stdlib" else list(data.paths)
    if not files:
        raise DataError(f"data: no files found for source={data.source!r} ({where})"
                        + (f"; {len(skipped)} excluded by data.exclude={list(data.exclude)}" if skipped else "")
                        + (f"; {len(large)} larger than data.max_bytes={data.max_bytes}" if large else ""))
    return Corpus(sorted(files), len(large), len(skipped), str(where), n_duplicates)


def split_files(files: Sequence[Path], val_percent: float) -> tuple[list[Path], list[Path]]:
    """(train, held-out) by a stable hash of each file name and its parent, independent of the file count."""
    train, val = [], []
    for f in files:
        key = f"{f.parent.name}/{f.name}".encode()
        (val if (zlib.crc32(key) % 10_000) < val_percent * 100 else train).append(f)
    if not train:
        raise DataError(f"data: val_percent={val_percent} left no training files out of {len(files)}")
    return train, val


def _jsonl_texts(path: Path) -> list[str]:
    """The "text" field of each line of a JSONL file (blank lines skipped); DataError naming file:line."""
    out = []
    for n, rec, why in read_jsonl(path):
        if why is not None:
            raise DataError(f"{path}:{n}: {why}")
        text = rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{n}: expected an object with a string \"text\" field, got "
                            f"{type(text).__name__ if isinstance(rec, dict) else type(rec).__name__}")
        out.append(text)
    return out


def read_documents(files: Sequence[Path], tokenizer: TextEncoder) -> list[list[int]]:
    """Each file is one document (a .jsonl file: each line's "text" is one): BOS + tokens + EOS; empty
    documents are skipped."""
    texts: list[str] = []
    for f in files:
        if Path(f).suffix == ".jsonl":
            texts += _jsonl_texts(Path(f))
        else:
            texts.append(Path(f).read_text(encoding="utf-8", errors="replace"))
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


# ----- the resumable stream -----

class PackedStream(RowStream):
    """Batches of packed rows: TEXT_KEYS -> int32 (batch_size, seq_len). `state()` / `restore()` give exact
    resumption.

    shuffle=True: endless, file order reshuffled each epoch and rows shuffled within each shuffle group
    of `shuffle_files` consecutive files. shuffle=False: files in order, one pass (for held-out evaluation);
    the last batch is padded with empty rows.
    """
    row_keys = TEXT_KEYS

    def __init__(self, files: Sequence[Path], tokenizer: TextEncoder, seq_len: int, batch_size: int,
                 seed: int = 0, shuffle_files: int = 64, shuffle: bool = True):
        if not files:
            raise DataError("PackedStream: no files")
        self.files = list(files)
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.group_size, self.shuffle = seed, shuffle_files, shuffle
        self._epoch, self._group, self._row = 0, 0, 0
        self._rows: list[Row] | None = None  # rows of the current group, in emission order
        self._empty_groups = 0  # consecutive groups without rows (all files empty)

    @property
    def n_groups(self) -> int:
        return -(-len(self.files) // self.group_size)

    def state(self) -> dict[str, int]:
        """Position of the next row: a small JSON-able dict."""
        return {"epoch": self._epoch, "group": self._group, "row": self._row, "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a position returned by `state()` (the seed must match)."""
        check_counters(state, ("epoch", "group", "row"), "PackedStream.restore")
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"PackedStream.restore: state was saved with seed {state['seed']}, "
                             f"this stream has seed {self.seed} (data.seed)")
        self._epoch, self._group, self._row = state["epoch"], state["group"], state["row"]
        self._rows = None

    def _load_group(self) -> list[Row]:
        order = np.arange(len(self.files))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self._epoch]).permutation(len(self.files))
        idx = order[self._group * self.group_size:(self._group + 1) * self.group_size]
        rows = list(pack_documents(read_documents([self.files[i] for i in idx], self.tokenizer), self.seq_len))
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self._epoch, self._group, 1]).permutation(len(rows))
            rows = [rows[i] for i in perm]
        return rows

    def next_row(self) -> Row:
        """The next row; raises StopIteration at the end of a non-shuffled pass."""
        if not self.shuffle and self._group >= self.n_groups:
            raise StopIteration
        while True:
            if self._rows is None:
                self._rows = self._load_group()
            if self._row < len(self._rows):
                row = self._rows[self._row]
                self._row += 1
                self._empty_groups = 0
                return row
            self._empty_groups = self._empty_groups + 1 if not self._rows else 0
            if self._empty_groups > self.n_groups:
                raise DataError(f"data: none of the {len(self.files)} files has any text")
            self._rows, self._row = None, 0
            self._group += 1
            if self._group >= self.n_groups:
                if not self.shuffle:
                    self._group = self.n_groups
                    raise StopIteration
                self._group, self._epoch = 0, self._epoch + 1


def make_streams(data: TextSettings, tokenizer: TextEncoder, process_index: int = 0, process_count: int = 1
                 ) -> tuple[ShardedStream, ShardedStream | None, Corpus]:
    """(train stream, held-out stream or None, the corpus listing) for a run's data settings.

    The train and held-out files are dealt into `data.shards` disjoint shards; this process reads only
    its own shards (see shards.py). The held-out stream pads finished shards with empty rows.
    """
    corpus = list_files(data)
    train_files, val_files = split_files(corpus.files, data.val_percent)
    n = data.shards
    mine = owned_shards(n, process_index, process_count)
    per = data.batch_size // n
    tr, va = assign(train_files, n), assign(val_files, n)
    empty = [s for s in range(n) if not tr[s]]
    if empty:
        raise DataError(f"data.shards={n} but only {len(train_files)} training files: shard(s) {empty} would "
                        "have none")
    train = ShardedStream(n, mine, lambda s: PackedStream(tr[s], tokenizer, data.seq_len, per, data.seed,
                                                          data.shuffle_files))
    val = None
    if val_files:
        val = ShardedStream(n, mine, lambda s: (
            PackedStream(va[s], tokenizer, data.seq_len, per, data.seed, data.shuffle_files, shuffle=False)
            if va[s] else Exhausted(per, data.seq_len)), endless_padding=True)
    return train, val, corpus
