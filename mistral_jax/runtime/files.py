"""Files the library writes and reads: atomic replacement of files and folders, file identity, JSON files and
JSON Lines with line numbers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

BOM = b"\xef\xbb\xbf"


def umask() -> int:
    """The process umask (read from /proc where possible, so no other thread sees it change)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """A file opened on a temp name beside `path` that replaces `path` only when the block succeeds.

    The temp file is removed on any exception (KeyboardInterrupt included); the new file gets mode
    0o666 & ~umask, as a plain `open` would give it. `mode` is "w" (text) or "wb".
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    tmp = Path(name)
    try:
        os.chmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replace_dir(real: Path) -> Iterator[Path]:
    """A temp folder beside the folder `real` (checked by the caller) that replaces it only if the block
    succeeds. On any exception, KeyboardInterrupt included, the temp folder and any set-aside old folder are
    removed and an old `real` already moved aside is put back. The new folder gets mode 0o777 & ~umask."""
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-", dir=real.parent))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        if real.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{real.name}.old-", dir=real.parent))
            os.replace(real, old / "x")
            try:
                os.replace(tmp, real)
            except BaseException:
                os.replace(old / "x", real)
                raise
        else:
            os.replace(tmp, real)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: str | Path, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Writes `data` to `path` through a temp file and a rename: readers see the old file or the new one."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w", encoding) as f:
        f.write(data)
    return Path(path)


def file_identity(path: str | os.PathLike) -> tuple[int, int] | str:
    """What makes two names the same file: (device, inode), so relative and absolute spellings, symlinks
    and hard links agree; the resolved path where the file cannot be stat'ed."""
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        try:
            return str(Path(path).resolve())
        except (OSError, RuntimeError):   # a symlink loop
            return str(Path(path).absolute())


def jsonl_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for each line of JSON Lines `data` that is not blank (ASCII
    whitespace only); a UTF-8 byte order mark before the first line is dropped."""
    for n, raw in enumerate(data.split(b"\n"), 1):
        if n == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        if raw.strip():
            yield n, raw


def parse_json_line(raw: bytes) -> tuple[Any, str | None]:
    """(value, None) for one JSON line, or (None, why) where `why` says what is wrong in one phrase:
    "not UTF-8 text (byte 0x.. at byte N of the line)", "not valid JSON (...)" or "not valid JSON
    (nested too deeply to read)"."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start} of the line)"
    try:
        return json.loads(text), None
    except RecursionError:                 # e.g. 100,000 nested '[': the parser recurses per level
        return None, "not valid JSON (nested too deeply to read)"
    except ValueError as e:
        return None, f"not valid JSON ({str(e)[:200]})"


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, value, None) or (line number, None, why) for each non-blank line of a JSONL file."""
    for n, raw in jsonl_lines(Path(path).read_bytes()):
        yield (n, *parse_json_line(raw))


def read_json_object(path: str | Path, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in a file; `error` with one line naming the file when it cannot be read, is not JSON or
    holds something else."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
