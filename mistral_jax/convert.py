"""Streaming readers and writers for PyTorch checkpoints in the Hugging Face and mistral-inference layouts.

Readers go tensor by tensor: safetensors files are read at the byte offsets of their header (validated
first; numpy's `safe_open` cannot return bfloat16, so the bytes are read into an ml_dtypes array), and
.pth/.bin files are opened with `torch.load(weights_only=True, mmap=True)`, which refuses any pickle
that is not plain tensors. Writers stream too: the safetensors header is computed from the config, then
each tensor is converted and written in turn. Output folders are built in a temp dir beside the
destination and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from tqdm import tqdm

from mistral_jax.config import ModelConfig
from mistral_jax.weights import WeightError, check_keys, check_shape, get_path, set_path, tensor_specs

FORMATS = ("native", "hf", "mistral")
NATIVE_MARKER = "mistral_jax_format"

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class CheckpointError(ValueError):
    """A checkpoint file or folder is unreadable, unsafe, truncated or ambiguous; the message names it."""


def parse_dtype(name: Any) -> np.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a numpy/jax dtype) -> numpy dtype."""
    try:
        dt = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
    except TypeError:
        raise CheckpointError(f"unknown dtype {name!r}; use float32, bfloat16 or float16") from None
    if dt not in (np.float32, np.float16, ml_dtypes.bfloat16):
        raise CheckpointError(f"unsupported parameter dtype {dt}; use float32, bfloat16 or float16")
    return dt


def parse_size(size: int | str) -> int:
    """'5GB', '200KB', '2MiB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise CheckpointError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB or a byte count")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


# ----------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------

class SafetensorsFile:
    """One .safetensors file: validated header, tensors read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: file is truncated (shorter than a safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{self.path}: header length {n} does not fit in the file's {size} bytes "
                                      "(truncated or not a safetensors file)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for key, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor '{key}' has a corrupt or unsupported header entry "
                                      f"{info!r}") from None
            if end - start != math.prod(shape) * dtype.itemsize:
                raise CheckpointError(f"{self.path}: tensor '{key}' header offsets {start}..{end} do not match "
                                      f"its shape {shape} and dtype {info['dtype']} (corrupt file)")
            if self.data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor '{key}' ends at byte {self.data_start + end} but the "
                                      f"file has only {size} bytes (truncated file?)")
            self.entries[key] = (dtype, shape, self.data_start + start)
        self._validate_with_library()
        self._f = open(self.path, "rb")

    def _validate_with_library(self) -> None:
        """Lets the safetensors library check what we did not (overlaps, gaps, ordering)."""
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(self.path), framework="numpy") as f:
                keys = set(f.keys())
        except SafetensorError as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors file ({e})") from None
        if keys != set(self.entries):
            raise CheckpointError(f"{self.path}: safetensors header is inconsistent (corrupt file)")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self.entries[key][0]

    def read(self, key: str) -> np.ndarray:
        dtype, shape, offset = self.entries[key]
        count = math.prod(shape)
        self._f.seek(offset)
        arr = np.fromfile(self._f, dtype=dtype, count=count)
        if arr.size != count:
            raise CheckpointError(f"{self.path}: tensor '{key}' could not be read in full (truncated file?)")
        return arr.reshape(shape)

    def close(self) -> None:
        self._f.close()


class TorchFile:
    """One .pth/.bin file opened with `torch.load(weights_only=True, mmap=True)` (no arbitrary pickles)."""

    def __init__(self, path: Path):
        import pickle

        import torch
        self.path = Path(path)
        try:
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                    raise
                sd = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{self.path}: refused to load: the pickle holds objects other than tensors and may run code; "
                f"it was not executed ({detail})") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: cannot read PyTorch file (truncated or corrupt?): {detail}") from None
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{self.path}: expected a dict of tensors, got {type(sd).__name__}")
        for key, value in sd.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{self.path}: entry '{key}' is a {type(value).__name__}, not a tensor")
        self._sd = sd

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> np.dtype:
        import torch
        t = self._sd[key]
        return np.dtype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else np.dtype(
            str(t.dtype).removeprefix("torch."))

    def read(self, key: str) -> np.ndarray:
        import torch
        t = self._sd[key]
        try:
            if t.dtype == torch.bfloat16:
                return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return t.numpy()
        except RuntimeError as e:
            raise CheckpointError(f"{self.path}: tensor '{key}' cannot be read ({e})") from None

    def close(self) -> None:
        self._sd = {}


class TensorSource:
    """The tensors of a checkpoint folder, possibly spread over several files."""

    def __init__(self, files: list[SafetensorsFile | TorchFile], name: str):
        self.files, self.name = files, name
        self._where: dict[str, SafetensorsFile | TorchFile] = {}
        for f in files:
            for key in f.keys():
                if key in self._where:
                    raise CheckpointError(f"{name}: tensor '{key}' appears in both {self._where[key].path.name} "
                                          f"and {f.path.name}")
                self._where[key] = f

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._where[key].dtype(key)

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _open_files(paths: list[Path]) -> list[SafetensorsFile | TorchFile]:
    files: list[SafetensorsFile | TorchFile] = []
    try:
        for p in paths:
            files.append(SafetensorsFile(p) if p.suffix == ".safetensors" else TorchFile(p))
    except BaseException:
        for f in files:
            f.close()
        raise
    return files


def _index_files(index: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: corrupt index file ({type(e).__name__}: {e})") from None
    names = sorted(set(weight_map.values()))
    for n in names:
        if not (index.parent / n).is_file():
            raise CheckpointError(f"{index}: lists shard '{n}' which does not exist")
    return [index.parent / n for n in names], weight_map


def open_source(folder: str | Path, fmt: str) -> TensorSource:
    """Opens the weight files of an 'hf' or 'mistral' folder (headers only; data is read per tensor)."""
    folder = Path(folder)
    weight_map: dict[str, str] | None = None
    if fmt == "hf":
        if (folder / "model.safetensors.index.json").is_file():
            paths, weight_map = _index_files(folder / "model.safetensors.index.json")
        elif (folder / "model.safetensors").is_file():
            paths = [folder / "model.safetensors"]
        elif (folder / "pytorch_model.bin.index.json").is_file():
            paths, weight_map = _index_files(folder / "pytorch_model.bin.index.json")
        elif (folder / "pytorch_model.bin").is_file():
            paths = [folder / "pytorch_model.bin"]
        else:
            raise CheckpointError(f"{folder}: no Hugging Face weights (model.safetensors[.index.json] or "
                                  "pytorch_model.bin[.index.json])")
    elif fmt == "mistral":
        st, pth = folder / "consolidated.safetensors", folder / "consolidated.00.pth"
        if st.is_file() and pth.is_file():
            raise CheckpointError(f"{folder}: both consolidated.safetensors and consolidated.00.pth exist; "
                                  "remove one")
        if (folder / "consolidated.01.pth").exists():
            raise CheckpointError(f"{folder}: model-parallel shards (consolidated.01.pth ...) are not supported")
        if not (st.is_file() or pth.is_file()):
            raise CheckpointError(f"{folder}: no consolidated.safetensors or consolidated.00.pth")
        paths = [st if st.is_file() else pth]
    else:
        raise CheckpointError(f"open_source: format {fmt!r} has no PyTorch weight files; expected 'hf' or 'mistral'")
    source = TensorSource(_open_files(paths), str(folder))
    if weight_map is not None:
        for key, fname in weight_map.items():
            f = source._where.get(key)
            if f is None or f.path.name != fname:
                source.close()
                raise CheckpointError(f"{folder}: index says tensor '{key}' is in '{fname}' but it is not there")
    return source


def detect_format(path: str | Path) -> str:
    """'native', 'hf' or 'mistral' from the files in the folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (does not exist or is a file)")
    if (path / "config.json").is_file():
        try:
            d = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
        if isinstance(d, dict) and NATIVE_MARKER in d:
            return "native"
        return "hf"
    if (path / "params.json").is_file():
        return "mistral"
    raise CheckpointError(f"{path}: no config.json (native or Hugging Face) or params.json (mistral-inference)")


def read_config(folder: str | Path, fmt: str, rope_theta: float | None = None) -> tuple[ModelConfig, list[str]]:
    """The model config of an 'hf' or 'mistral' folder, plus notes about inferred or overridden values."""
    folder = Path(folder)
    if fmt == "mistral":
        return ModelConfig.from_params_json(folder / "params.json", rope_theta=rope_theta)
    cfg = ModelConfig.from_hf_config(folder / "config.json")
    notes: list[str] = []
    if rope_theta is not None and float(rope_theta) != cfg.rope_theta:
        notes.append(f"rope_theta overridden: file says {cfg.rope_theta}, using {rope_theta}")
        cfg = cfg.replace(rope_theta=float(rope_theta))
    return cfg, notes


def load_tensors(source: TensorSource, cfg: ModelConfig, layout: str, dtype: Any = None,
                 shardings: Any = None, progress: bool = True) -> dict:
    """Reads every tensor into our params tree of jax arrays, one tensor at a time.

    All keys and shapes are checked before any data is read. Each tensor is converted to our layout and
    `dtype` (None: the checkpoint's own float dtype) and put onto its sharding (from `shardings`, a tree
    matching the params) or the default device.
    """
    specs = tensor_specs(cfg, layout)
    check_keys(source.keys(), specs, source.name)
    for spec in specs:
        check_shape(spec, source.shape(spec.key), source.name)
        if source.dtype(spec.key).kind != "f" and source.dtype(spec.key) != ml_dtypes.bfloat16:
            raise WeightError(f"{source.name}: tensor '{spec.key}' has dtype {source.dtype(spec.key)}, "
                              "expected a floating-point type")
    if dtype is None:
        dtype = source.dtype(specs[0].key)
        dtype = np.float32 if dtype == np.float64 else dtype
    dtype = parse_dtype(dtype)
    params: dict = {}
    for spec in tqdm(specs, desc=f"reading {Path(source.name).name}", unit="tensor", disable=not progress):
        x = spec.to_ours(source.read(spec.key)).astype(dtype, copy=False)
        sharding = get_path(shardings, spec.path) if shardings is not None else None
        arr = jax.device_put(x, sharding)
        arr.block_until_ready()  # bounds host memory: at most one tensor in flight
        set_path(params, spec.path, arr)
        del x
    return params


# ----------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------

def check_dst(dst: str | Path, force: bool = False) -> Path:
    """Refuses an existing non-empty destination unless `force`."""
    dst = Path(dst)
    if dst.exists():
        if not dst.is_dir():
            raise CheckpointError(f"{dst}: destination exists and is not a folder")
        if any(dst.iterdir()) and not force:
            raise CheckpointError(f"{dst}: destination exists and is not empty; use --force (force=True) to "
                                  "overwrite it")
    return dst


@contextlib.contextmanager
def atomic_dir(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yields a temp folder beside `dst` that replaces `dst` only if the block succeeds; else it is removed."""
    dst = check_dst(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / "x")
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], np.dtype]],
                      tensor: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None,
                      bar: tqdm | None = None) -> None:
    """Writes a safetensors file whose header is known up front; tensors are fetched and written one by one."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for key, shape, dtype in entries:
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype in entries:
            arr = np.ascontiguousarray(tensor(key), dtype=dtype)
            if arr.shape != tuple(shape):
                raise WeightError(f"{path}: tensor '{key}' has shape {arr.shape}, expected {tuple(shape)}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            if bar is not None:
                bar.update()


def _export_plan(cfg: ModelConfig, params: Mapping, layout: str, dtype: Any):
    from flax import linen as nn

    from mistral_jax.model import abstract_params
    abstract = nn.unbox(abstract_params(cfg))
    specs = tensor_specs(cfg, layout)
    by_key = {s.key: s for s in specs}
    for s in specs:
        try:
            leaf = get_path(params, s.path)
        except (KeyError, TypeError):
            raise WeightError(f"params: missing '{'/'.join(s.path)}' for tensor '{s.key}'") from None
        ours = tuple(get_path(abstract, s.path).shape)
        if tuple(leaf.shape) != ours:
            raise WeightError(f"params: '{'/'.join(s.path)}' has shape {tuple(leaf.shape)}, the config expects {ours}")
    out_dtype = parse_dtype(dtype if dtype is not None else get_path(params, specs[0].path).dtype)

    def tensor(key: str) -> np.ndarray:
        s = by_key[key]
        return s.from_ours(np.asarray(get_path(params, s.path))).astype(out_dtype, copy=False)

    return specs, out_dtype, tensor


def write_hf(dst: str | Path, cfg: ModelConfig, params: Mapping, dtype: Any = None,
             max_shard_size: int | str = "5GB", force: bool = False, progress: bool = True) -> Path:
    """Writes a Hugging Face folder: config.json + model.safetensors, or shards with an index json."""
    specs, out_dtype, tensor = _export_plan(cfg, params, "hf", dtype)
    limit = parse_size(max_shard_size)
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for s in specs:
        n = math.prod(s.shape) * out_dtype.itemsize
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((s.key, s.shape, out_dtype))
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with atomic_dir(dst, force) as tmp, tqdm(total=len(specs), desc="writing hf", unit="tensor",
                                             disable=not progress) as bar:
        hf_cfg = cfg.to_hf_config() | {"dtype": str(out_dtype)}
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        for name, entries in zip(names, shards):
            write_safetensors(tmp / name, entries, tensor, bar=bar)
        if len(shards) > 1:
            total = sum(math.prod(s.shape) for s in specs) * out_dtype.itemsize
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: name for name, entries in zip(names, shards) for k, _, _ in entries}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return Path(dst)


def write_mistral(dst: str | Path, cfg: ModelConfig, params: Mapping, dtype: Any = None,
                  force: bool = False, progress: bool = True) -> Path:
    """Writes a mistral-inference folder: params.json (rope_theta always written) + consolidated.safetensors."""
    specs, out_dtype, tensor = _export_plan(cfg, params, "mistral", dtype)
    with atomic_dir(dst, force) as tmp, tqdm(total=len(specs), desc="writing mistral", unit="tensor",
                                             disable=not progress) as bar:
        (tmp / "params.json").write_text(json.dumps(cfg.to_params_json(), indent=2) + "\n")
        write_safetensors(tmp / "consolidated.safetensors", [(s.key, s.shape, out_dtype) for s in specs],
                          tensor, bar=bar)
    return Path(dst)
