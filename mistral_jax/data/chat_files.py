"""Chat JSONL files -> checked, encoded, fitted conversations, with a report of every line left out.

Files: JSONL, one conversation per line, `{"messages": [...]}` or `{"prompt": str, "completion": str}`.
A bad line gives `FILE:LINE: reason`; on_error="skip" skips and counts it (by reason, in `ChatReport`),
"stop" raises ChatDataError with that message. Blank lines are ignored (counted). Conversations longer
than seq_len follow the over-long rule (see chat_template); truncated and dropped ones are counted and
named in the report.

Held-out split: separate files (`val_files`), else by a hash of each line's bytes (`val_percent`),
independent of line order and file count (`ChatData.split`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np

from mistral_jax.data.chat_template import Message, as_chat_tokenizer, check_messages, encode_prompt, fit_conversation
from mistral_jax.errors import ChatDataError, ChatFormatError
from mistral_jax.runtime.files import file_identity, jsonl_lines, parse_json_line

MAX_MESSAGES = 20       # problem messages kept in a ChatReport (all are counted)

# reason key -> what it means (the keys of ChatReport.skipped)
REASONS = {
    "not_utf8": "line is not UTF-8 text",
    "bad_json": "line is not valid JSON (or nested too deeply to read)",
    "bad_fields": "not an object with 'messages', or with 'prompt' and 'completion'",
    "not_list": "'messages' is not a non-empty list of objects",
    "tool_calls": "a message with 'tool_calls' (tool use is not encoded; the calls would be lost)",
    "unknown_role": "a role other than system, user, assistant",
    "not_string": "a content that is not a string",
    "not_unicode": "a content holding a lone surrogate",
    "empty_content": "an empty (or whitespace-only) content",
    "bad_order": "turns out of order",
    "bad_weight": "an assistant 'weight' other than 0 or 1",
    "no_assistant": "no assistant answer",
    "last_not_assistant": "the last turn is not an assistant answer",
    "last_not_user": "a prompt that does not end with a user turn",
    "no_trainable": "every assistant answer has weight 0",
    "encode_error": "mistral-common could not encode it",
}

Paths = str | os.PathLike | Sequence[str | os.PathLike]


# ----- files -----

def expand_paths(paths: Paths) -> list[Path]:
    """Files named by paths or globs (each glob's matches sorted), in order, each file once however it is
    spelled (the first name is kept; see `file_identity`); ChatDataError for a name that matches no file."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    seen: set[Any] = set()
    for p in paths:
        s = str(p)
        found = sorted(glob.glob(s, recursive=True)) if any(c in s for c in "*?[") else [s]
        found = [f for f in found if Path(f).is_file()]
        if not found:
            raise ChatDataError(f"chat data: no file matches {s!r}")
        for f in found:
            key = file_identity(f)
            if key not in seen:
                seen.add(key)
                out.append(Path(f))
    if not out:
        raise ChatDataError("chat data: no files given")
    return out


def overlap_message(train_files: Sequence[Path], val_files: Sequence[Path]) -> str | None:
    """One line naming the first file that is both a training and a held-out file (None if none is),
    however each list spells it."""
    ids = {file_identity(f): f for f in train_files}
    both = [(ids[k], f) for f in val_files if (k := file_identity(f)) in ids]
    if not both:
        return None
    tr, va = both[0]
    named = "" if str(tr) == str(va) else f" (named {va} among the held-out files)"
    more = f" (and {len(both) - 1} more)" if len(both) > 1 else ""
    return (f"{tr} is both a training and a held-out file{named}{more}; a conversation cannot be trained "
            "on and held out")


def _messages_of(obj: Any) -> list[Message]:
    """The checked training messages of one parsed line: {"messages"} or {"prompt", "completion"}."""
    if not isinstance(obj, dict):
        raise ChatFormatError("bad_fields", f"expected an object with 'messages' (or 'prompt' and 'completion'), "
                                            f"got {type(obj).__name__}")
    if "messages" in obj:
        if "prompt" in obj or "completion" in obj:
            raise ChatFormatError("bad_fields", "give either 'messages' or 'prompt' and 'completion', not both")
        return check_messages(obj["messages"], "assistant")
    if "prompt" in obj or "completion" in obj:
        missing = [k for k in ("prompt", "completion") if k not in obj]
        if missing:
            raise ChatFormatError("bad_fields", f"'{missing[0]}' is missing ('prompt' and 'completion' go together)")
        msgs = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
        try:
            return check_messages(msgs, "assistant")
        except ChatFormatError as e:     # name the field the user wrote, not the message index
            raise ChatFormatError(e.reason, str(e).replace("messages[0]", "'prompt'").replace("messages[1]",
                                                                                              "'completion'")) from None
    raise ChatFormatError("bad_fields", f"expected 'messages' (or 'prompt' and 'completion'), got keys "
                                        f"{sorted(obj)[:10]}")


def parse_line(raw: bytes) -> list[Message]:
    """The checked training messages of one non-blank JSONL line; ChatFormatError otherwise."""
    obj, why = parse_json_line(raw)
    if why is not None:
        raise ChatFormatError("not_utf8" if why.startswith("not UTF-8") else "bad_json", why)
    return _messages_of(obj)


@dataclasses.dataclass
class ChatReport:
    """What reading chat files found: kept, skipped (by reason), truncated and dropped conversations."""
    files: list[str]
    seq_len: int
    lines: int = 0                 # non-blank lines
    blank_lines: int = 0
    conversations: int = 0         # kept (whole or truncated)
    truncated: int = 0             # kept as a prefix (over-long rule)
    dropped: int = 0               # over-long, not even the first answer fits
    tokens: int = 0                # in kept conversations
    trainable_tokens: int = 0      # target tokens in kept conversations
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)   # reason (REASONS key) -> lines
    messages: list[str] = dataclasses.field(default_factory=list)       # first MAX_MESSAGES 'FILE:LINE: ...'

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def counts(self) -> str:
        """One line of what was read, e.g. '3 non-blank line(s), 2 blank; 3 skipped (bad_json: 2,
        tool_calls: 1); 0 dropped as longer than seq_len=64'."""
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return (f"{self.lines} non-blank line(s), {self.blank_lines} blank; {self.n_skipped} skipped"
                + (f" ({reasons})" if reasons else "")
                + f"; {self.dropped} dropped as longer than seq_len={self.seq_len}")

    def note(self, message: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: every field, plus n_skipped."""
        return {**dataclasses.asdict(self), "n_skipped": self.n_skipped}

    @classmethod
    def merged(cls, parts: Sequence[dict[str, Any]]) -> "ChatReport":
        """One report from the `to_dict()`s of reports over disjoint line shares of the same files (counts
        added, skip reasons added, messages kept in part order up to MAX_MESSAGES)."""
        if not parts:
            raise ValueError("ChatReport.merged: no reports")
        files, seq_len = parts[0]["files"], parts[0]["seq_len"]
        for q in parts[1:]:
            if q["files"] != files or q["seq_len"] != seq_len:
                raise ValueError(f"ChatReport.merged: reports of different files or seq_len ({q['files']}, "
                                 f"{q['seq_len']} vs {files}, {seq_len})")
        out = cls(list(files), seq_len)
        for q in parts:
            for name in ("lines", "blank_lines", "conversations", "truncated", "dropped", "tokens",
                         "trainable_tokens"):
                setattr(out, name, getattr(out, name) + int(q[name]))
            for reason, k in q["skipped"].items():
                out.skipped[reason] = out.skipped.get(reason, 0) + int(k)
            for m in q["messages"]:
                out.note(m)
        return out

    def summary(self) -> str:
        """A few printable lines: counts, then the first problem messages."""
        head = (f"chat data: {self.conversations} conversations from {self.lines} lines of {len(self.files)} "
                f"file(s); {self.tokens} tokens, {self.trainable_tokens} trained; {self.n_skipped} line(s) "
                f"skipped")
        if self.skipped:
            head += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")"
        head += (f"; over seq_len={self.seq_len}: {self.truncated} truncated, {self.dropped} dropped"
                 + (f"; {self.blank_lines} blank line(s)" if self.blank_lines else ""))
        shown = self.messages[:MAX_MESSAGES]
        n_problems = self.n_skipped + self.truncated + self.dropped
        more = [f"  ... and {n_problems - len(shown)} more"] if n_problems > len(shown) else []
        return "\n".join([head] + [f"  {m}" for m in shown] + more)


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
    """One kept conversation: int32 ids and bool target mask (L,), its messages, where it came from."""
    tokens: np.ndarray          # int32 (L,)
    target_mask: np.ndarray     # bool (L,)
    messages: list[Message]
    file: str
    line: int
    key: int                    # crc32 of the line's bytes: the held-out split
    index: int = 0              # 0-based position of the line among all lines of all files read

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass
class ChatData:
    """Encoded conversations of some files (in file, line order) and the report of reading them."""
    conversations: list[EncodedConversation]
    report: ChatReport

    def split(self, val_files: Sequence[str | os.PathLike] = (), val_percent: float = 0.0
              ) -> tuple[list[EncodedConversation], list[EncodedConversation]]:
        """(train, held out): held out are the conversations of `val_files` when given (named as they
        were read), else those whose line hash has key % 10000 < val_percent * 100."""
        names = {str(f) for f in val_files}
        train, val = [], []
        for c in self.conversations:
            held = c.file in names if names else c.key % 10_000 < val_percent * 100
            (val if held else train).append(c)
        return train, val


def _read_bytes(f: Path) -> bytes:
    try:
        return f.read_bytes()
    except OSError as e:
        raise ChatDataError(f"chat data: cannot read {f}: {e.strerror or e}") from None


def _line_count(data: bytes) -> int:
    """Lines in `data` as a file reader counts them (a last line without a newline counts too)."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _read_line(file: Path, line: int, raw: bytes, index: int, mt: Any, report: ChatReport,
               on_error: Literal["skip", "stop"]) -> EncodedConversation | None:
    """The conversation of one non-blank line (None when skipped, noted in the report, or dropped)."""
    seq_len, where = report.seq_len, f"{file}:{line}"
    try:
        fit = fit_conversation(parse_line(raw), mt, seq_len)
    except ChatFormatError as e:
        if on_error == "stop":
            raise ChatDataError(f"{where}: {e}") from None
        report.skipped[e.reason] = report.skipped.get(e.reason, 0) + 1
        report.note(f"{where}: {e}")
        return None
    if fit.status == "dropped":
        report.dropped += 1
        report.note(f"{where}: dropped: {fit.n_full} tokens and even the first answer does not fit seq_len={seq_len}")
        return None
    if fit.status == "truncated":
        report.truncated += 1
        report.note(f"{where}: truncated: {fit.n_full} tokens > seq_len={seq_len}; kept the first "
                    f"{len(fit.ids)} ({sum(m['role'] == 'assistant' for m in fit.messages)} answer(s))")
    tokens, mask = np.asarray(fit.ids, np.int32), np.asarray(fit.target_mask, bool)
    report.conversations += 1
    report.tokens += len(tokens)
    report.trainable_tokens += int(mask.sum())
    return EncodedConversation(tokens, mask, fit.messages, str(file), line, zlib.crc32(raw), index)


def read_chat_data(paths: Paths, chat_tokenizer: Any, seq_len: int, on_error: Literal["skip", "stop"] = "skip",
                   select: Callable[[int], bool] | None = None) -> ChatData:
    """Read, check, encode and fit to seq_len every conversation line of the files (paths or globs).

    on_error="skip": bad lines are counted by reason in the report (the first MAX_MESSAGES messages kept);
    "stop": the first bad line raises ChatDataError('FILE:LINE: reason'). Over-long conversations follow
    the over-long rule under both policies. select(i): whether to read the line at 0-based position i
    among all lines of all files (blank ones included); lines not selected are neither parsed nor counted
    (another process reads them).
    """
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    files = expand_paths(paths)
    mt = as_chat_tokenizer(chat_tokenizer)
    report = ChatReport([str(f) for f in files], seq_len)
    convs: list[EncodedConversation] = []
    first = 0                                   # index of the file's first line among all lines
    for f in files:
        data = _read_bytes(f)
        lines = dict(jsonl_lines(data))         # line number -> raw bytes, non-blank lines only
        for n in range(1, _line_count(data) + 1):
            index = first + n - 1
            if select is not None and not select(index):
                continue
            if n not in lines:
                report.blank_lines += 1
                continue
            report.lines += 1
            conv = _read_line(f, n, lines[n].rstrip(b"\r"), index, mt, report, on_error)
            if conv is not None:
                convs.append(conv)
        first += _line_count(data)
    return ChatData(convs, report)


def answer_prompts(conversations: Iterable[EncodedConversation], chat_tokenizer: Any,
                   limit: int | None = None) -> list[tuple[list[int], str]]:
    """(prompt ids, reference answer) per conversation: the prompt is everything before its last assistant
    answer (encoded as for generation), the reference that answer's content."""
    out = []
    for c in conversations:
        if limit is not None and len(out) >= limit:
            break
        out.append((encode_prompt(c.messages[:-1], chat_tokenizer), c.messages[-1]["content"]))
    return out
