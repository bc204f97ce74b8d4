"""Per-tensor checksums and value checks (NaN/inf, float16 overflow) for checkpoints read or written."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import ml_dtypes
import numpy as np

from mistral_jax.errors import CheckpointError

ALGORITHM = "sha256"
ALLOW_HINT = "pass --allow-nonfinite (allow_nonfinite=True) to accept it"
log = logging.getLogger(__name__)

# Exponent-field masks: a float is NaN or inf exactly when all its exponent bits are set.
_EXP_MASKS: dict[np.dtype, tuple[type, int]] = {
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
    np.dtype(np.float16): (np.uint16, 0x7C00),
}


def tensor_digest(x: np.ndarray) -> str:
    """sha256 hex digest of the tensor's bytes in C order (its dtype as stored)."""
    return hashlib.sha256(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data).hexdigest()


def count_nonfinite(x: np.ndarray) -> int:
    """Number of NaN/inf entries of a float array (0 for other dtypes)."""
    mask = _EXP_MASKS.get(x.dtype)
    if mask is not None:  # same-size view: no copy, even of a transposed array
        bits = x.view(mask[0])
        return int(np.count_nonzero(np.bitwise_and(bits, mask[1]) == mask[1]))
    if x.dtype.kind != "f":
        return 0
    return int(x.size - np.count_nonzero(np.isfinite(x)))


def check_values(y: np.ndarray, name: str, source: str, allow_nonfinite: bool = False,
                 before: np.ndarray | None = None) -> None:
    """Refuses (CheckpointError naming `name`) a tensor holding NaN/inf unless `allow_nonfinite` (then warns).

    `before` is the tensor before a dtype cast to `y`: if it was finite, the cast overflowed and the
    message gives its max |value| and the target dtype's range.
    """
    n = count_nonfinite(y)
    if n == 0:
        return
    if before is not None and count_nonfinite(before) == 0:
        peak = float(np.max(np.abs(before.astype(np.float32))))
        msg = (f"{source}: tensor '{name}' has max |value| {peak:.6g}, beyond {y.dtype}'s range "
               f"({float(np.finfo(y.dtype).max):.6g}); casting writes {n} inf value(s): choose another dtype or "
               f"{ALLOW_HINT}")
    else:
        msg = f"{source}: tensor '{name}' holds {n} non-finite value(s) (NaN/inf) of {y.size}; {ALLOW_HINT}"
    if not allow_nonfinite:
        raise CheckpointError(msg)
    log.warning(msg.split("; ")[0] + " (allowed)")


def checkpoint_identity(path: str | Path) -> str:
    """A short digest that changes when the checkpoint folder's model changes: for a native folder, its
    config.json and checksums.json bytes; for other layouts, their JSON files' bytes and each weight file's
    name, size and modification time (hashing the weights themselves would read the whole model)."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        files = sorted(p for p in path.iterdir() if p.is_file())
        for p in files:
            h.update(p.name.encode() + b"\0")
            if p.suffix == ".json":
                h.update(p.read_bytes())
            else:
                st = p.stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(b"\0")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint folder ({e})") from None
    return h.hexdigest()[:16]
