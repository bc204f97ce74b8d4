"""Safe checkpoint output folders: which destinations may be written or replaced, and a folder that appears
only when complete (`runtime.files.replace_dir`, the same mechanism as single files' `atomic_file`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from mistral_jax.checkpoint.formats import checkpoint_kind
from mistral_jax.errors import CheckpointError
from mistral_jax.runtime.files import replace_dir


def check_dst(dst: str | Path, force: bool = False, src: str | Path | None = None) -> Path:
    """The real (symlink-resolved, absolute) folder to write for `dst`, after refusing unsafe destinations.

    Refused: a destination that is a file; one that contains `src` or lies inside it; an existing
    non-empty folder unless `force`; and, even with `force`, a non-empty folder that is not itself a
    checkpoint (native, Hugging Face or mistral-inference), so that a wrong path cannot delete other data.
    """
    real = Path(os.path.realpath(dst))
    if real.exists() and not real.is_dir():
        raise CheckpointError(f"{dst}: destination exists and is not a folder")
    if src is not None:
        src_real = Path(os.path.realpath(src))
        if src_real == real or src_real.is_relative_to(real):
            raise CheckpointError(f"{dst}: destination contains the source {src}; choose another folder")
        if real.is_relative_to(src_real):
            raise CheckpointError(f"{dst}: destination lies inside the source {src}; choose another folder")
    if real.is_dir() and any(real.iterdir()):
        if not force:
            raise CheckpointError(f"{dst}: destination exists and is not empty; use --force (force=True) to "
                                  "overwrite it")
        if checkpoint_kind(real) is None:
            raise CheckpointError(f"{dst}: destination is not empty and is not a checkpoint folder; refusing to "
                                  "replace it even with --force")
    return real


@contextlib.contextmanager
def atomic_dir(dst: str | Path, force: bool = False, src: str | Path | None = None) -> Iterator[Path]:
    """Yields a temp folder beside `dst` that replaces `dst` only if the block succeeds.

    `dst` is checked with `check_dst`; a symlink is written through (its target is replaced). The new
    folder gets mode 0o777 & ~umask. On any exception, KeyboardInterrupt included, and whatever the
    step it arrives in, the temp folder and any set-aside old folder are removed, and an old `dst`
    already moved aside is put back.
    """
    with replace_dir(check_dst(dst, force, src)) as tmp:
        yield tmp
