"""Conversations -> Mistral instruct token ids with an answer-only target mask -> packed, resumable batches.

Encoding: mistral-common's instruct tokenizers (v1: `[INST]` is plain text and the system prompt joins
the first user message; v2/v3: `[INST]`=3 / `[/INST]`=4 are control tokens and the system prompt joins
the last user message). The sequence is BOS + each message as mistral-common's `encode_user_message` /
`encode_assistant_message` encode it inside `encode_instruct`, so a conversation ending on a user turn
gives exactly `encode_chat_completion`'s prompt ids (what `Tokenizer.encode_chat` and `infer.generate
--chat` use). The target mask is True on assistant content tokens and the EOS closing each assistant
turn (mistral-finetune's rule), False on BOS, system, user and `[INST]`/`[/INST]` tokens.

Conversation rules (one message in `CONVERSATION_RULES`): an optional first system message, then turns
alternating user, assistant, user, ...; every content a non-empty string; a training conversation ends
with an assistant answer (a trailing user turn is an error, not silently cut); an assistant message may
carry mistral-finetune's `"weight": 0|1` (0: context only). A message with `tool_calls` is refused
(reason "tool_calls"): tool use is not encoded, and dropping the calls would train on half a turn.

Files: JSONL, one conversation per line, `{"messages": [...]}` or `{"prompt": str, "completion": str}`.
A bad line gives `FILE:LINE: reason`; on_error="skip" skips and counts it (by reason, in `ChatReport`),
"stop" raises ChatDataError with that message. Blank lines are ignored (counted).

Over-long rule: a conversation longer than seq_len keeps its longest prefix of whole turns that ends with
an assistant answer and fits (re-encoded, so a v3 system prompt moves onto the prefix's last user turn);
if even the first answer does not fit, it is dropped. Both are counted and named in the report.

Packing: conversations go into rows of seq_len tokens, first fit among the last `OPEN_ROWS` open rows;
each conversation is its own segment (ids 1, 2, ... within a row; 0 = padding) with positions from 0, so
conversations never attend to each other. A row without any target token is never emitted.

Held-out split: by a hash of each line's bytes (`val_percent`), independent of line order and file
count, or separate files (`make_chat_streams(val_paths=...)`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np

from mistral_jax.data.text import file_identity
from mistral_jax.errors import first_line
from mistral_jax.errors import ChatDataError, ChatFormatError

ROLES = ("system", "user", "assistant")
CONVERSATION_RULES = ("an optional first system message, then turns alternating user, assistant, ...; "
                      "non-empty string contents")
BATCH_KEYS = ("tokens", "positions", "segment_ids", "target_mask")
OPEN_ROWS = 16          # rows still open for first-fit packing
MAX_MESSAGES = 20       # problem messages kept in a ChatReport (all are counted)
SUPPORTED_VERSIONS = ("v1", "v2", "v3")   # SentencePiece instruct tokenizers (Mistral 7B v0.1-v0.3)

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

Row = dict[str, np.ndarray]           # BATCH_KEYS -> int32 (T,)
Batch = dict[str, np.ndarray]         # BATCH_KEYS -> int32 (B, T)
Message = dict[str, Any]              # {'role', 'content'} (+ 'weight' on assistant messages)


# ----- tokenizer -----

def as_chat_tokenizer(tok: Any) -> Any:
    """mistral-common's MistralTokenizer from itself or from a mistral_jax Tokenizer (its `chat_tokenizer()`);
    ValueError for a version this module does not encode (tekken / v7+ place system prompts differently)."""
    mt = tok.chat_tokenizer() if hasattr(tok, "chat_tokenizer") else tok
    if not hasattr(mt, "instruct_tokenizer"):
        raise TypeError(f"expected a mistral-common MistralTokenizer or a mistral_jax Tokenizer, got "
                        f"{type(tok).__name__}")
    version = getattr(mt.instruct_tokenizer.tokenizer.version, "value", str(mt.instruct_tokenizer.tokenizer.version))
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"chat encoding supports the SentencePiece instruct tokenizers "
                         f"{', '.join(SUPPORTED_VERSIONS)}; this one is {version}")
    return mt


def chat_tokenizer_for_vocab(vocab_size: int) -> Any:
    """Mistral's instruct tokenizer for a model vocab (32000 -> v1, 32768 -> v3), from mistral-common's data."""
    from mistral_jax.data.tokenizer import Tokenizer
    return Tokenizer.for_vocab(vocab_size).chat_tokenizer()


# ----- conversation checks -----

def check_messages(messages: Any, end: Literal["user", "assistant", "any"] = "any") -> list[Message]:
    """The messages as plain {'role', 'content'(, 'weight')} dicts, after checking the conversation rules.

    end: "user" for a prompt (the next turn is the model's), "assistant" for a training conversation
    (at least one answer, the last turn an answer, not every answer weight 0), "any" for either.
    Raises ChatFormatError with a one-line message naming the message index.
    """
    from mistral_jax.data.tokenizer import _check_text

    tail = {"user": "; a dialogue must end with a user message",
            "assistant": "; a training conversation must end with an assistant answer", "any": ""}[end]
    if not isinstance(messages, list):
        raise ChatFormatError("not_list", f"'messages' must be a list of {{'role', 'content'}} objects, got "
                                          f"{type(messages).__name__}")
    if not messages:
        raise ChatFormatError("not_list", "'messages' is empty" + tail)
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError("not_list", f"messages[{i}]: expected an object with 'role' and 'content', "
                                              f"got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if m.get("tool_calls"):          # null or [] (OpenAI-style exports) carry no call
            raise ChatFormatError("tool_calls", f"messages[{i}]: a {role!r} message with 'tool_calls'; tool calls "
                                                "are not supported (they would be dropped), so the conversation "
                                                "is skipped")
        if role not in ROLES:
            raise ChatFormatError("unknown_role", f"messages[{i}]: 'role' must be one of {', '.join(ROLES)}, "
                                                  f"got {role!r}")
        if not isinstance(content, str):
            raise ChatFormatError("not_string", f"messages[{i}]: 'content' must be a string, got "
                                                f"{type(content).__name__}")
        try:
            _check_text(content, f"messages[{i}].content")
        except ValueError as e:
            raise ChatFormatError("not_unicode", str(e)) from None
        if not content.strip():
            raise ChatFormatError("empty_content", f"messages[{i}]: empty 'content' in a {role} message")
        msg: Message = {"role": role, "content": content}
        if "weight" in m:
            w = m["weight"]
            if role != "assistant":
                raise ChatFormatError("bad_weight", f"messages[{i}]: 'weight' is only allowed on assistant "
                                                    f"messages, got one on a {role} message")
            if isinstance(w, bool) or w not in (0, 1):
                raise ChatFormatError("bad_weight", f"messages[{i}]: 'weight' must be 0 or 1, got {w!r}")
            msg["weight"] = int(w)
        out.append(msg)
    start = 1 if out[0]["role"] == "system" else 0
    if start == len(out) or out[start]["role"] != "user":
        got = f", got {out[start]['role']!r} at messages[{start}]" if start < len(out) else ", got none"
        raise ChatFormatError("bad_order", "a dialogue must have a user message first (after an optional system "
                                           "message)" + got)
    for i in range(start + 1, len(out)):
        role, prev = out[i]["role"], out[i - 1]["role"]
        if role == "system":
            raise ChatFormatError("bad_order", f"messages[{i}]: a system message may only come first, got one "
                                               f"after {prev!r}")
        if role == prev:
            raise ChatFormatError("bad_order", f"messages[{i}]: {role!r} follows {prev!r}; turns must alternate "
                                               f"user, assistant, user, ...")
    last = out[-1]["role"]
    if end == "user" and last != "user":
        raise ChatFormatError("last_not_user", f"the last message is {last!r}" + tail)
    if end == "assistant":
        answers = [m for m in out if m["role"] == "assistant"]
        if not answers:
            raise ChatFormatError("no_assistant", "no assistant message" + tail)
        if last != "assistant":
            raise ChatFormatError("last_not_assistant", f"the last message is {last!r}" + tail)
        if all(m.get("weight", 1) == 0 for m in answers):
            raise ChatFormatError("no_trainable", "every assistant message has weight 0; nothing to train on")
    return out


# ----- encoding -----

def _encode(messages: Sequence[Message], mt: Any) -> tuple[list[int], list[bool], list[int]]:
    """(ids, target mask, end index in ids of each non-system message) for checked messages."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest

    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = [m for m in messages if m["role"] != "system"]
    request = InstructRequest(
        messages=[UserMessage(content=m["content"]) if m["role"] == "user" else AssistantMessage(content=m["content"])
                  for m in turns],
        system_prompt=system)
    it = mt.instruct_tokenizer
    first_user, last_user = it.find_first_last_user(request)
    ids = list(it.start())
    mask = [False] * len(ids)
    ends = []
    for i, (msg, plain) in enumerate(zip(request.messages, turns)):
        if isinstance(msg, UserMessage):
            toks, _, _ = it.encode_user_message(msg, None, i == last_user, i == first_user,
                                                system_prompt=request.system_prompt, force_img_first=True)
            mask += [False] * len(toks)
        else:
            toks = it.encode_assistant_message(msg, is_before_last_user_message=i < last_user)
            mask += [bool(plain.get("weight", 1))] * len(toks)
        ids += toks
        ends.append(len(ids))
    return ids, mask, ends


def _encode_checked(msgs: list[Message], chat_tokenizer: Any) -> tuple[list[int], list[bool], list[int]]:
    """_encode with mistral-common's own refusals turned into ChatFormatError('encode_error')."""
    from mistral_common.exceptions import MistralCommonException

    mt = as_chat_tokenizer(chat_tokenizer)
    try:
        return _encode(msgs, mt)
    except (MistralCommonException, ValueError, AssertionError) as e:
        raise ChatFormatError("encode_error", f"invalid dialogue: {first_line(e)}") from None


def encode_conversation(messages: Any, chat_tokenizer: Any) -> tuple[list[int], list[bool]]:
    """(ids, target_mask) of a conversation, as mistral-common's instruct tokenizer encodes it.

    target_mask[i] is True exactly on assistant content tokens and the EOS closing each assistant turn
    (False for an assistant message with "weight": 0). A conversation ending on a user turn gives
    `encode_chat_completion`'s prompt ids (mask all False). chat_tokenizer: a MistralTokenizer (v1-v3) or a
    mistral_jax Tokenizer. Raises ChatFormatError (a ValueError) with a one-line reason.
    """
    ids, mask, _ = _encode_checked(check_messages(messages, "any"), chat_tokenizer)
    return ids, mask


def encode_prompt(messages: Any, chat_tokenizer: Any) -> list[int]:
    """Prompt ids for the next assistant answer (the conversation must end with a user turn); this is
    `Tokenizer.encode_chat`. Raises ChatFormatError (a ValueError) with a one-line reason."""
    return _encode_checked(check_messages(messages, "user"), chat_tokenizer)[0]


@dataclasses.dataclass(frozen=True)
class Fitted:
    """A training conversation cut to seq_len. status: "ok" | "truncated" | "dropped" (then ids are empty)."""
    ids: list[int]
    target_mask: list[bool]
    messages: list[Message]     # the messages kept
    status: str
    n_full: int                 # token count before the cut


def fit_conversation(messages: Any, chat_tokenizer: Any, seq_len: int) -> Fitted:
    """A training conversation within seq_len tokens by the over-long rule: whole, else its longest prefix of
    whole turns ending with an assistant answer (weight 1) that fits, else dropped. ChatFormatError if bad."""
    msgs = check_messages(messages, "assistant")
    ids, mask, ends = _encode_checked(msgs, chat_tokenizer)
    if len(ids) <= seq_len:
        return Fitted(ids, mask, msgs, "ok", len(ids))
    off = 1 if msgs[0]["role"] == "system" else 0
    # Candidate cuts: after assistant turn j (index into the non-system turns), longest first. Re-encoding a
    # prefix is never shorter than its span in the full encoding, so start where that span fits.
    for j in range(len(ends) - 2, -1, -1):
        sub = msgs[:off + j + 1]
        if sub[-1]["role"] != "assistant" or ends[j] > seq_len or sub[-1].get("weight", 1) == 0:
            continue
        s_ids, s_mask, _ = _encode_checked(sub, chat_tokenizer)
        if len(s_ids) <= seq_len:
            return Fitted(s_ids, s_mask, sub, "truncated", len(ids))
    return Fitted([], [], msgs, "dropped", len(ids))


# ----- files -----

def shared_files(first: Sequence[Path], second: Sequence[Path]) -> list[tuple[Path, Path]]:
    """(name in `first`, name in `second`) of each file that both lists name, however spelled."""
    ids = {file_identity(f): f for f in first}
    return [(ids[k], f) for f in second if (k := file_identity(f)) in ids]


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
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
    """One line naming the first file that is both a training and a held-out file (None if none is)."""
    both = shared_files(train_files, val_files)
    if not both:
        return None
    tr, va = both[0]
    named = "" if str(tr) == str(va) else f" (named {va} among the held-out files)"
    more = f" (and {len(both) - 1} more)" if len(both) > 1 else ""
    return (f"{tr} is both a training and a held-out file{named}{more}; a conversation cannot be trained "
            "on and held out")


def parse_line(raw: bytes) -> list[Message] | None:
    """The checked training messages of one JSONL line (None for a blank line: ASCII whitespace only);
    ChatFormatError otherwise."""
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChatFormatError("not_utf8", f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") \
            from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatFormatError("bad_json", f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:               # e.g. 100,000 nested '[': Python's parser recurses per level
        raise ChatFormatError("bad_json", "not valid JSON (nested too deeply to read)") from None
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

    def held_out(self, val_percent: float) -> tuple[list[EncodedConversation], list[EncodedConversation]]:
        """(train, held out): a conversation is held out when key % 10000 < val_percent * 100."""
        train, val = [], []
        for c in self.conversations:
            (val if c.key % 10_000 < val_percent * 100 else train).append(c)
        return train, val


def read_chat_data(paths: str | os.PathLike | Sequence[str | os.PathLike], chat_tokenizer: Any, seq_len: int,
                   on_error: Literal["skip", "stop"] = "skip",
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
    index = -1
    for f in files:
        try:
            fh = open(f, "rb")
        except OSError as e:
            raise ChatDataError(f"chat data: cannot read {f}: {e.strerror or e}") from None
        with fh:
            for n, raw in enumerate(fh, 1):
                index += 1
                if select is not None and not select(index):
                    continue
                raw = raw.rstrip(b"\r\n")
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    report.blank_lines += 1
                    continue
                report.lines += 1
                try:
                    msgs = parse_line(raw)
                    assert msgs is not None
                    fit = fit_conversation(msgs, mt, seq_len)
                except ChatFormatError as e:
                    message = f"{f}:{n}: {e}"
                    if on_error == "stop":
                        raise ChatDataError(message) from None
                    report.skipped[e.reason] = report.skipped.get(e.reason, 0) + 1
                    report.note(message)
                    continue
                if fit.status == "dropped":
                    report.dropped += 1
                    report.note(f"{f}:{n}: dropped: {fit.n_full} tokens and even the first answer does not fit "
                                f"seq_len={seq_len}")
                    continue
                if fit.status == "truncated":
                    report.truncated += 1
                    report.note(f"{f}:{n}: truncated: {fit.n_full} tokens > seq_len={seq_len}; kept the first "
                                f"{len(fit.ids)} ({sum(m['role'] == 'assistant' for m in fit.messages)} answer(s))")
                tokens, mask = np.asarray(fit.ids, np.int32), np.asarray(fit.target_mask, bool)
                report.conversations += 1
                report.tokens += len(tokens)
                report.trainable_tokens += int(mask.sum())
                convs.append(EncodedConversation(tokens, mask, fit.messages, str(f), n, zlib.crc32(raw), index))
    return ChatData(convs, report)


# ----- packing -----

def pack_conversations(convs: Iterable[EncodedConversation], seq_len: int,
                       open_rows: int = OPEN_ROWS) -> Iterator[list[int]]:
    """Rows as lists of indices into `convs` (in iteration order): each conversation goes into the first of
    the last `open_rows` open rows with room, else a new row; the oldest row is closed when too many are
    open. Rows come out in the order they are closed; a row never exceeds seq_len tokens."""
    rows: list[tuple[int, list[int]]] = []      # (tokens used, conversation indices)
    for i, c in enumerate(convs):
        n = len(c.tokens)
        if n > seq_len:
            raise ValueError(f"{c.where}: {n} tokens do not fit seq_len={seq_len}; fit conversations first")
        for k, (used, idx) in enumerate(rows):
            if used + n <= seq_len:
                rows[k] = (used + n, idx + [i])
                break
        else:
            rows.append((n, [i]))
            if len(rows) > open_rows:
                yield rows.pop(0)[1]
    for _, idx in rows:
        yield idx


def build_row(convs: Sequence[EncodedConversation], seq_len: int) -> Row:
    """One packed row (BATCH_KEYS -> int32 (seq_len,)): conversation k has segment id k+1 and positions from 0;
    the rest is padding (all zeros)."""
    row = {k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS}
    at = 0
    for seg, c in enumerate(convs, 1):
        n = len(c.tokens)
        row["tokens"][at:at + n] = c.tokens
        row["positions"][at:at + n] = np.arange(n)
        row["segment_ids"][at:at + n] = seg
        row["target_mask"][at:at + n] = c.target_mask
        at += n
    return row


def empty_row(seq_len: int) -> Row:
    return {k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS}


def stack_rows(rows: Sequence[Row]) -> Batch:
    """Rows -> BATCH_KEYS -> int32 (N, T)."""
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


# ----- the resumable stream -----

class ChatStream:
    """Batches of packed conversations: BATCH_KEYS -> int32 (batch_size, seq_len). `state()`/`restore()` resume
    exactly.

    source: JSONL paths/globs (read with chat_tokenizer, seq_len and on_error), or a ChatData already read.
    split: "all" | "train" | "val" chooses the conversations by `ChatData.held_out(val_percent)`.
    shuffle=True: endless; each epoch packs the conversations in a fresh order drawn from (seed, epoch).
    shuffle=False: one pass in file order (for held-out evaluation); the last batch is padded with empty rows
    (segment 0, target_mask 0); then StopIteration. Raises ChatDataError when no conversation is left.
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike] | ChatData, chat_tokenizer: Any,
                 seq_len: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 on_error: Literal["skip", "stop"] = "skip", split: Literal["all", "train", "val"] = "all",
                 val_percent: float = 0.0):
        if batch_size < 1:
            raise ValueError(f"ChatStream: batch_size must be >= 1, got {batch_size}")
        data = source if isinstance(source, ChatData) else read_chat_data(source, chat_tokenizer, seq_len, on_error)
        if data.report.seq_len != seq_len:
            raise ValueError(f"ChatStream: the data was fitted to seq_len={data.report.seq_len}, not {seq_len}")
        if split == "all":
            convs = data.conversations
        elif split in ("train", "val"):
            convs = data.held_out(val_percent)[split == "val"]
        else:
            raise ValueError(f"ChatStream: split must be 'all', 'train' or 'val', got {split!r}")
        if not convs:
            which = "" if split == "all" else f"{split} (val_percent={val_percent}) "
            raise ChatDataError(f"chat data: no usable {which}conversations in {', '.join(data.report.files)}: "
                                f"{data.report.counts()}")
        self.data, self.conversations = data, convs
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.n_tokens = int(sum(len(c.tokens) for c in convs))
        self.trainable_tokens = int(sum(int(c.target_mask.sum()) for c in convs))
        crc = 0
        for c in convs:
            crc = zlib.crc32(c.tokens.tobytes(), zlib.crc32(c.target_mask.tobytes(), crc))
        self.fingerprint = crc
        self._epoch, self._row = 0, 0
        self._plan: list[list[int]] | None = None    # rows of the current epoch (conversation indices)

    @property
    def report(self) -> ChatReport:
        return self.data.report

    @property
    def n_conversations(self) -> int:
        return len(self.conversations)

    def _epoch_plan(self) -> list[list[int]]:
        order = np.arange(len(self.conversations))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self._epoch]).permutation(len(order))
        convs = [self.conversations[i] for i in order]
        return [[int(order[j]) for j in idx] for idx in pack_conversations(convs, self.seq_len)
                if any(convs[j].target_mask.any() for j in idx)]

    @property
    def rows_per_epoch(self) -> int:
        if self._plan is None:
            self._plan = self._epoch_plan()
        return len(self._plan)

    def state(self) -> dict[str, int]:
        """Position of the next row, with what identifies the data: a small JSON-able dict."""
        return {"epoch": self._epoch, "row": self._row, "seed": self.seed,
                "conversations": len(self.conversations), "fingerprint": self.fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`; ValueError naming the field if it does not belong to this data and seed."""
        for key in ("epoch", "row"):
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"ChatStream.restore: field '{key}' must be a non-negative int, got {v!r}")
        for key, mine, what in (("seed", self.seed, "data.seed"),
                                ("conversations", len(self.conversations), "the number of conversations"),
                                ("fingerprint", self.fingerprint, "the conversations' tokens")):
            if key in state and state[key] != mine:
                raise ValueError(f"ChatStream.restore: state has {key}={state[key]!r}, this stream {mine!r}; "
                                 f"{what} changed since it was saved")
        if self._epoch != state["epoch"]:
            self._plan = None
        self._epoch, self._row = state["epoch"], state["row"]

    def next_row(self) -> Row:
        """The next packed row; StopIteration at the end of a non-shuffled pass."""
        while True:
            if self._plan is None:
                self._plan = self._epoch_plan()
            if self._row < len(self._plan):
                idx = self._plan[self._row]
                self._row += 1
                return build_row([self.conversations[i] for i in idx], self.seq_len)
            if not self.shuffle:
                raise StopIteration
            self._epoch, self._row, self._plan = self._epoch + 1, 0, None

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> Batch:
        """BATCH_KEYS -> int32 (batch_size, seq_len)."""
        rows = []
        try:
            while len(rows) < self.batch_size:
                rows.append(self.next_row())
        except StopIteration:
            if not rows:
                raise
            rows += [empty_row(self.seq_len)] * (self.batch_size - len(rows))
        return stack_rows(rows)


def make_chat_streams(paths: str | os.PathLike | Sequence[str | os.PathLike], chat_tokenizer: Any, seq_len: int,
                      batch_size: int, seed: int = 0, *, val_paths: Sequence[str | os.PathLike] = (),
                      val_percent: float = 0.0, on_error: Literal["skip", "stop"] = "skip",
                      val_batch_size: int | None = None) -> tuple[ChatStream, ChatStream | None, ChatReport]:
    """(train stream, held-out stream or None, report of reading every file).

    Held out: the conversations of `val_paths` when given (then every line of `paths` trains), else the
    `val_percent` share of `paths`' lines by line hash; None when that leaves no conversation.
    """
    train_files = expand_paths(paths)
    val_files = expand_paths(val_paths) if val_paths else []
    overlap = overlap_message(train_files, val_files)
    if overlap:
        raise ChatDataError(f"chat data: {overlap}")
    data = read_chat_data(train_files + val_files, chat_tokenizer, seq_len, on_error)
    if val_files:
        names = {str(f) for f in val_files}
        train_c = [c for c in data.conversations if c.file not in names]
        val_c = [c for c in data.conversations if c.file in names]
    else:
        train_c, val_c = data.held_out(val_percent)
    train = ChatStream(ChatData(train_c, data.report), None, seq_len, batch_size, seed, shuffle=True)
    val = (ChatStream(ChatData(val_c, data.report), None, seq_len, val_batch_size or batch_size, seed,
                      shuffle=False) if val_c else None)
    return train, val, data.report


# ----- greedy-answer scoring -----

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


def exact_match(answer: str, reference: str) -> bool:
    """Whether a generated answer equals the reference, ignoring surrounding whitespace (the v2/v3 encoders
    drop an answer's trailing spaces)."""
    return answer.strip() == reference.strip()
