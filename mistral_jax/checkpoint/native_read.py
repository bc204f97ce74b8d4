"""A native checkpoint's params read one storage chunk at a time into one buffer per param.

Orbax restores a param whole: tensorstore reads it into a buffer of its own, which is then copied onto the
device, so loading held two to three transient copies of the largest param on top of the model (7B's stacked
w1 is 3.76 GB in bfloat16: a 20.8 GiB peak for a 13.5 GiB model). Here the same files are read with
tensorstore (orbax's own storage layer) into one 64-byte-aligned host buffer per param that the CPU device
then shares (`weights.aligned_empty`). `save_params` writes each param as one uncompressed chunk (so saving
copies nothing). Raw (uncompressed) chunks, one or many, are read in byte ranges of about READ_BYTES, so a
param is held once plus one range; arrays in any other encoding are read chunk by chunk through tensorstore
(plus one chunk).

Layout read (orbax-checkpoint's default PyTree layout, checked at open): an OCDBT key-value store in the
params folder holding one zarr (v2, or zarr3) array per param, named by its tree path joined with ".".
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mistral_jax.errors import CheckpointError, first_line
from mistral_jax.checkpoint.weights import aligned_empty

READ_BYTES = 64 << 20  # bytes per read of a raw single-chunk array
_DRIVERS = (("zarr", ".zarray"), ("zarr3", "zarr.json"))


def store_error_line(e: BaseException) -> str:
    """The first line of an orbax/tensorstore error, without tensorstore's pointer to its spec."""
    return first_line(e).split(" See full TensorStore details")[0]


class ParamReader:
    """Opens the params folder's key-value store once; `read(name, shape, dtype)` returns one param."""

    def __init__(self, params_dir: Path):
        import tensorstore as ts

        self._ts = ts
        self.params_dir = Path(params_dir).absolute()
        self._kv_spec = {"driver": "ocdbt", "base": f"file://{self.params_dir}/"}
        try:
            self._kv = ts.KvStore.open(self._kv_spec).result()
            self._keys = set(self._kv.list().result())
        except Exception as e:  # tensorstore raises ValueError/RuntimeError subclasses for unreadable stores
            raise CheckpointError(f"{self.params_dir}: cannot open the params store "
                                  f"({type(e).__name__}: {store_error_line(e)})") from None

    def _open(self, name: str) -> Any:
        for driver, meta in _DRIVERS:
            if f"{name}/{meta}".encode() in self._keys:
                spec = {"driver": driver, "kvstore": {**self._kv_spec, "path": f"{name}/"}}
                return self._ts.open(spec, open=True, read=True).result()
        raise CheckpointError(f"{self.params_dir}: no stored array for param '{name}' (an OCDBT store with zarr "
                              "arrays named by tree path, as orbax-checkpoint writes, was expected)")

    def read(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Param `name` (its tree path joined by ".") as a C-contiguous, 64-byte-aligned host array."""
        try:
            store = self._open(name)
            if tuple(store.shape) != tuple(shape) or np.dtype(store.dtype.numpy_dtype) != np.dtype(dtype):
                raise CheckpointError(f"{self.params_dir}: param '{name}' is stored as "
                                      f"{store.dtype.numpy_dtype}{tuple(store.shape)}, expected "
                                      f"{np.dtype(dtype)}{tuple(shape)}")
            out = aligned_empty(tuple(shape), dtype)
            raw = self._raw_chunks(name, out)
            if raw is not None:
                self._read_raw(raw, out)
            else:
                for box in chunk_boxes(tuple(shape), _chunk_shape(store)):
                    out[box] = store[box].read().result()
            return out
        except CheckpointError:
            raise
        except Exception as e:  # truncated or corrupt chunks surface as assorted tensorstore errors
            raise CheckpointError(f"{self.params_dir}: cannot read param '{name}' ({type(e).__name__}: "
                                  f"{store_error_line(e)})") from None


    def _raw_chunks(self, name: str, out: np.ndarray) -> tuple[str, tuple[int, ...], str] | None:
        """(name, chunk shape, key separator) when the array is stored raw (zarr v2 without compressor or
        filters, C order, little-endian or single-byte dtype): each chunk's bytes are then the C-order chunk
        (edge chunks padded to the full chunk shape). Else None."""
        key = f"{name}/.zarray".encode()
        if key not in self._keys:
            return None
        meta = json.loads(self._kv.read(key).result().value)
        dt, chunks = str(meta.get("dtype", "")), meta.get("chunks")
        raw = (isinstance(chunks, list) and len(chunks) == out.ndim and meta.get("compressor") is None
               and not meta.get("filters") and meta.get("order") == "C" and not dt.startswith(">")
               and np.little_endian)
        return (name, tuple(int(c) for c in chunks), meta.get("dimension_separator", ".")) if raw else None

    def _read_raw(self, raw: tuple[str, tuple[int, ...], str], out: np.ndarray) -> None:
        """Fills `out` from raw chunks in byte ranges of about READ_BYTES: runs of whole rows along each chunk's
        leading axis, copied into their place (clipped at the array's edges)."""
        name, chunk, sep = raw
        if out.ndim == 0:
            self._read_range(f"{name}/0".encode(), 0, out.reshape(1).view(np.uint8))
            return
        row_bytes = math.prod(chunk[1:]) * out.itemsize
        rows = max(1, READ_BYTES // max(1, row_bytes))
        for box in chunk_boxes(out.shape, chunk):
            index = sep.join(str(b.start // c) for b, c in zip(box, chunk))
            key = f"{name}/{index}".encode()
            n0 = box[0].stop - box[0].start
            for r in range(0, n0, rows):
                g = min(rows, n0 - r)
                buf = np.empty(g * row_bytes, np.uint8)
                self._read_range(key, r * row_bytes, buf)
                block = buf.view(out.dtype).reshape(g, *chunk[1:])
                inner = tuple(slice(0, b.stop - b.start) for b in box[1:])
                out[(slice(box[0].start + r, box[0].start + r + g), *box[1:])] = block[(slice(None), *inner)]

    def _read_range(self, key: bytes, start: int, dst_u8: np.ndarray) -> None:
        """dst_u8 = bytes [start, start + len) of the value of `key`; CheckpointError if they are missing."""
        got = self._kv.read(key, byte_range=slice(start, start + dst_u8.size)).result()
        if got.state != "value" or len(got.value) != dst_u8.size:
            raise CheckpointError(f"{self.params_dir}: the data of '{key.decode()}' is missing or shorter than "
                                  f"{start + dst_u8.size} bytes")
        dst_u8[:] = np.frombuffer(got.value, np.uint8)


def _chunk_shape(store: Any) -> tuple[int, ...]:
    shape = store.chunk_layout.read_chunk.shape
    return tuple(int(c) if c else int(n) for c, n in zip(shape, store.shape)) if shape is not None else tuple(
        store.shape)


def chunk_boxes(shape: tuple[int, ...], chunk: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """The index boxes of a chunk grid over `shape`, in C order (one box for a 0-d array)."""
    ranges = [range(0, n, max(1, c)) for n, c in zip(shape, chunk)]
    for starts in itertools.product(*ranges):
        yield tuple(slice(s, min(s + max(1, c), n)) for s, c, n in zip(starts, chunk, shape))
