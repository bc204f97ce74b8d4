"""Writing PyTorch checkpoints: Hugging Face folders (config.json, safetensors shards, tokenizer files)
and mistral-inference folders (params.json, consolidated.safetensors, tokenizer.model).

The safetensors writer streams: its header is computed from the config up front, then each tensor
is converted and written in turn, so at most one tensor is held in host memory (the library's
`save_file` needs every tensor of a file in memory at once: 14 GB for a consolidated 7B file).
Folders are built with `atomic.atomic_dir` and appear only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import flax.linen as nn
import ml_dtypes
import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from mistral_jax.checkpoint.atomic import atomic_dir
from mistral_jax.checkpoint.integrity import check_values
from mistral_jax.checkpoint.weights import TensorSpec, check_shape, get_path, param_slice, tensor_specs
from mistral_jax.data.tokenizer import default_tokenizer_path
from mistral_jax.errors import CheckpointError, TokenizerError, WeightError
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.transformer import abstract_params
from mistral_jax.runtime.dtypes import parse_dtype

_ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}
log = logging.getLogger(__name__)

TokenizerArg = str | Path | None | Literal["auto"]


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


def tokenizer_for_vocab(vocab_size: int) -> Path | None:
    """mistral-common's SentencePiece model for a model vocab (v1: 32000, v3: 32768), else None."""
    try:
        return default_tokenizer_path(vocab_size)
    except TokenizerError:
        return None


def _resolve_tokenizer(tokenizer: TokenizerArg, cfg: ModelConfig) -> Path | None:
    """The tokenizer file to ship ("auto": by vocab, with a logged note when none fits), checked against cfg."""
    if tokenizer == "auto":
        path = tokenizer_for_vocab(cfg.vocab_size)
        if path is None:
            log.warning(f"no known tokenizer for vocab {cfg.vocab_size}: no tokenizer files written")
        return path
    if tokenizer is None:
        return None
    path = Path(tokenizer)
    try:
        n = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable SentencePiece model ({e})") from None
    if n > cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {n} pieces, more than the model's vocab of {cfg.vocab_size}")
    return path


def _hf_tokenizer_config(path: Path, cfg: ModelConfig) -> dict[str, Any]:
    """tokenizer_config.json for a SentencePiece model (LlamaTokenizer, BOS added, no EOS)."""
    sp = spm.SentencePieceProcessor(model_file=str(path))
    piece = lambda i: sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None  # noqa: E731
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "add_prefix_space": None, "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
        "model_max_length": cfg.max_seq_len, "sp_model_kwargs": {},
    }


def _write_hf_tokenizer(path: Path, cfg: ModelConfig, folder: Path) -> None:
    """tokenizer.model + tokenizer_config.json, and tokenizer.json when transformers is installed.

    transformers 5 loads a folder whose config.json says model_type 'mistral' through its generic
    tokenizers backend, which converts a bare tokenizer.model without Llama's leading-space rule (so
    "Hello" encodes wrongly); with tokenizer.json present it loads that file as is. tokenizer.json is
    produced by transformers' own LlamaTokenizer from the SentencePiece model.
    """
    shutil.copyfile(path, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(_hf_tokenizer_config(path, cfg), indent=2) + "\n")
    try:
        from transformers import LlamaTokenizer
    except ImportError:
        log.warning("transformers is not installed: tokenizer.json not written; transformers 5 will then "
                    "encode with a converted tokenizer that may differ from SentencePiece")
        return
    with tempfile.TemporaryDirectory(dir=folder) as tok_dir:
        shutil.copyfile(folder / "tokenizer.model", Path(tok_dir) / "tokenizer.model")
        shutil.copyfile(folder / "tokenizer_config.json", Path(tok_dir) / "tokenizer_config.json")
        LlamaTokenizer.from_pretrained(tok_dir, local_files_only=True).save_pretrained(tok_dir)
        if (Path(tok_dir) / "tokenizer.json").is_file():
            shutil.copyfile(Path(tok_dir) / "tokenizer.json", folder / "tokenizer.json")


def _mistral_tokenizer_name(path: Path) -> str:
    """'tokenizer.model' or 'tokenizer.model.vN' (mistral-common reads the version from the suffix)."""
    m = re.search(r"\.model\.(v\d+\w*)$", path.name)
    return "tokenizer.model" if m is None or m.group(1) == "v1" else f"tokenizer.model.{m.group(1)}"


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], np.dtype]],
                      tensor: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None,
                      bar: tqdm | None = None) -> None:
    """Writes a safetensors file whose header is known up front; tensors are fetched and written one by one."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for key, shape, dtype in entries:
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype in entries:
            arr = np.ascontiguousarray(tensor(key), dtype=dtype)
            check_shape(str(path), key, arr.shape, shape)
            f.write(arr.reshape(-1).view(np.uint8).data)
            if bar is not None:
                bar.update()


def _export_plan(cfg: ModelConfig, params: Mapping, layout: str, dtype: Any, allow_nonfinite: bool
                 ) -> tuple[list[TensorSpec], np.dtype, Callable[[str], np.ndarray]]:
    """(specs, output dtype, key -> tensor in the torch layout); every param's shape is checked first."""
    abstract = nn.unbox(abstract_params(cfg))
    specs = tensor_specs(cfg, layout)
    by_key = {s.key: s for s in specs}
    for s in specs:
        if s.layer not in (None, 0):  # one shape check per (stacked) param
            continue
        try:
            leaf = get_path(params, s.path)
        except (KeyError, TypeError):
            raise WeightError(f"params: missing '{'/'.join(s.path)}' for tensor '{s.key}'") from None
        check_shape("params", "/".join(s.path), leaf.shape, get_path(abstract, s.path).shape, what="param")
    out_dtype = parse_dtype(dtype if dtype is not None else get_path(params, specs[0].path).dtype, "dtype")

    def tensor(key: str) -> np.ndarray:
        s = by_key[key]
        ours = np.asarray(param_slice(params, s))   # one layer's slice of a stacked param
        with np.errstate(over="ignore"):  # overflow is reported by check_values, naming the tensor
            y = s.from_ours(ours).astype(out_dtype, copy=False)
        check_values(y, key, "export", allow_nonfinite, before=ours)
        return y

    return specs, out_dtype, tensor


def write_hf(dst: str | Path, cfg: ModelConfig, params: Mapping, dtype: Any = None,
             max_shard_size: int | str = "5GB", force: bool = False, progress: bool = True,
             tokenizer: TokenizerArg = "auto", allow_nonfinite: bool = False) -> Path:
    """Writes a Hugging Face folder: config.json + model.safetensors (or shards with an index json), and
    tokenizer.model + tokenizer_config.json (+ tokenizer.json, with transformers installed) when a
    tokenizer is given or ("auto") known for the vocab.

    NaN/inf in the params, or values past the output dtype's range, are refused unless `allow_nonfinite`.
    """
    specs, out_dtype, tensor = _export_plan(cfg, params, "hf", dtype, allow_nonfinite)
    tok = _resolve_tokenizer(tokenizer, cfg)
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
        # transformers 5 reads `dtype`, 4.x reads `torch_dtype`: write both.
        hf_cfg = cfg.to_hf_config() | {"dtype": out_dtype.name, "torch_dtype": out_dtype.name}
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        if tok is not None:
            _write_hf_tokenizer(tok, cfg, tmp)
        for name, entries in zip(names, shards):
            write_safetensors(tmp / name, entries, tensor, bar=bar)
        if len(shards) > 1:
            total = sum(math.prod(s.shape) for s in specs) * out_dtype.itemsize
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: name for name, entries in zip(names, shards) for k, _, _ in entries}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return Path(dst)


def write_mistral(dst: str | Path, cfg: ModelConfig, params: Mapping, dtype: Any = None,
                  force: bool = False, progress: bool = True, tokenizer: TokenizerArg = "auto",
                  allow_nonfinite: bool = False) -> Path:
    """Writes a mistral-inference folder: params.json (rope_theta always written) + consolidated.safetensors,
    and the tokenizer as tokenizer.model[.vN] when given or ("auto") known for the vocab.

    NaN/inf in the params, or values past the output dtype's range, are refused unless `allow_nonfinite`.
    """
    specs, out_dtype, tensor = _export_plan(cfg, params, "mistral", dtype, allow_nonfinite)
    tok = _resolve_tokenizer(tokenizer, cfg)
    with atomic_dir(dst, force) as tmp, tqdm(total=len(specs), desc="writing mistral", unit="tensor",
                                             disable=not progress) as bar:
        (tmp / "params.json").write_text(json.dumps(cfg.to_params_json(), indent=2) + "\n")
        if tok is not None:
            shutil.copyfile(tok, tmp / _mistral_tokenizer_name(tok))
        write_safetensors(tmp / "consolidated.safetensors", [(s.key, s.shape, out_dtype) for s in specs],
                          tensor, bar=bar)
    return Path(dst)
