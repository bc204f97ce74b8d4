"""Input examples of the offline evaluation tasks: reading them from files and checking the fields each task needs.

Inputs (one JSON object per non-blank line; an optional "id" is copied to the example's output row):
- perplexity: {"text": str}, or plain text files (one document each);
- choice: {"context": str, "choices": [str, ...], "label": int};
- generate: {"prompt": str} or {"messages": [...]}, optional "target" (exact match);
- moderate: {"text": str, "label": "acceptable" | "unacceptable"}.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Sequence

from mistral_jax.errors import EvalError
from mistral_jax.runtime.files import file_identity, jsonl_lines, parse_json_line

TASKS = ("perplexity", "choice", "generate", "moderate")
FEWSHOT_TASKS = ("choice", "generate")
CHAT_TASKS = ("generate", "moderate")
MODERATION_LABELS = ("acceptable", "unacceptable")   # label words; the second is the positive class
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclasses.dataclass
class Example:
    """One input example: key (unique, used for resume), its source location, and the parsed object."""
    key: str                       # "RESOLVED_FILE:LINE" or "RESOLVED_FILE": the same however --data is spelled
    where: str                     # "FILE:LINE" or "FILE", the file as given (for messages)
    line: int | None
    obj: Any = None
    error: str | None = None


def read_examples(paths: Sequence[Path], task: str) -> list[Example]:
    """Examples from JSONL files (one object per non-blank line) or, for perplexity, plain text files (one
    document per file). Keys name the resolved file, messages the file as given. A bad line becomes an
    Example with `error` naming FILE:LINE; an unreadable file, or one given twice, raises EvalError."""
    out: list[Example] = []
    seen: list[tuple[Path, Path]] = []         # (as given, resolved)
    for path in paths:
        resolved = Path(path).resolve()
        for given, other in seen:
            if same_file(resolved, other):
                raise EvalError(f"--data {path}: the same file as --data {given}; give each file once")
        seen.append((Path(path), resolved))
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise EvalError(f"--data {path}: cannot read ({e.strerror or e})") from None
        if task == "perplexity" and Path(path).suffix.lower() not in JSONL_SUFFIXES:
            out.append(_text_document(path, resolved, data))
        else:
            out += _jsonl_examples(path, resolved, data)
    return out


def _text_document(path: Path, resolved: Path, data: bytes) -> Example:
    """A plain text file as one perplexity document; EvalError unless it is UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"--data {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    return Example(str(resolved), str(path), None, {"text": text.removeprefix("\ufeff")})


def _jsonl_examples(path: Path, resolved: Path, data: bytes) -> list[Example]:
    """One Example per non-blank line of a JSONL file; a line that is not a JSON object gets `error`."""
    out = []
    for n, raw in jsonl_lines(data):
        where = f"{path}:{n}"
        obj, why = parse_json_line(raw)
        ex = Example(f"{resolved}:{n}", where, n, obj)
        if why is not None:
            ex.error = f"{where}: {why}"
        elif not isinstance(obj, dict):
            ex.error = f"{where}: expected a JSON object, got {type(obj).__name__}"
        out.append(ex)
    return out


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (relative or absolute, a link, a hard link; see `file_identity`)."""
    return file_identity(a) == file_identity(b)


def file_digest(paths: Sequence[Path]) -> str:
    """sha256 over the data files' bytes (resume refuses changed data)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def _got(o: dict[str, Any], key: str, none: str = "none") -> str:
    """The type name of field `key` of `o`, or `none` when it is missing (for messages)."""
    return type(o[key]).__name__ if key in o else none


def check_text(o: dict[str, Any]) -> str:
    """The 'text' string of a perplexity example; ValueError otherwise."""
    text = o.get("text")
    if not isinstance(text, str):
        raise ValueError(f"'text' must be a string, got {_got(o, 'text', 'no text')}")
    return text


def check_choice(o: dict[str, Any]) -> tuple[str, list[str], int]:
    """(context, choices, label) of a choice example; ValueError naming the bad field."""
    context, choices, label = o.get("context"), o.get("choices"), o.get("label")
    if not isinstance(context, str):
        raise ValueError(f"'context' must be a string, got {_got(o, 'context')}")
    if not isinstance(choices, list) or not choices:
        raise ValueError("'choices' must be a non-empty list of strings" +
                         ("" if isinstance(choices, list) else f", got {type(choices).__name__}"))
    for j, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise ValueError(f"choices[{j}] must be a non-empty string, got {c!r}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"'label' must be an integer in [0, {len(choices)}), got {label!r}")
    return context, choices, label


def check_moderate(o: dict[str, Any]) -> tuple[str, str]:
    """(text, label) of a moderation example; ValueError naming the bad field."""
    text, label = o.get("text"), o.get("label")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'text' must be a non-empty string, got " +
                         (repr(text) if isinstance(text, str) else _got(o, "text")))
    if label not in MODERATION_LABELS:
        raise ValueError(f"'label' must be one of {', '.join(repr(x) for x in MODERATION_LABELS)}, got {label!r}")
    return text, label


def check_prompt_fields(obj: dict[str, Any]) -> None:
    """ValueError unless a generate example has exactly one of a non-empty 'prompt' string or 'messages'."""
    if "prompt" in obj and "messages" in obj:
        raise ValueError("give either 'prompt' or 'messages', not both")
    if "messages" in obj:
        return
    if "prompt" not in obj:
        raise ValueError(f"expected 'prompt' or 'messages', got keys {sorted(obj)[:10]}")
    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"'prompt' must be a non-empty string, got {prompt!r}")


def check_target(obj: dict[str, Any]) -> None:
    """ValueError when a generate example's optional 'target' is not a string."""
    if "target" in obj and not isinstance(obj["target"], str):
        raise ValueError(f"'target' must be a string, got {type(obj['target']).__name__}")
