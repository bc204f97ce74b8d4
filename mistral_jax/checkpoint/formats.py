"""Which checkpoint layout a folder holds: native (this library), Hugging Face or mistral-inference."""

from __future__ import annotations

import json
from pathlib import Path
from mistral_jax.errors import CheckpointError

FORMATS = ("native", "hf", "mistral")
NATIVE_MARKER = "mistral_jax_format"
HF_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                   "pytorch_model.bin")
MISTRAL_WEIGHT_FILES = ("consolidated.safetensors", "consolidated.00.pth")


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def detect_format(path: str | Path) -> str:
    """'native', 'hf' or 'mistral' from the files in the folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (does not exist or is a file)")
    if (path / "config.json").is_file():
        d = _read_json(path / "config.json")
        return "native" if isinstance(d, dict) and NATIVE_MARKER in d else "hf"
    if (path / "params.json").is_file():
        return "mistral"
    raise CheckpointError(f"{path}: no config.json (native or Hugging Face) or params.json (mistral-inference)")


def checkpoint_kind(path: str | Path) -> str | None:
    """The format of a folder that holds a whole checkpoint (config and weights), else None.

    Never raises: a folder with an unreadable config.json is simply not a checkpoint.
    """
    path = Path(path)
    try:
        fmt = detect_format(path)
    except CheckpointError:
        return None
    if fmt == "native":
        return fmt if (path / "params").is_dir() else None
    names = HF_WEIGHT_FILES if fmt == "hf" else MISTRAL_WEIGHT_FILES
    return fmt if any((path / n).is_file() for n in names) else None
