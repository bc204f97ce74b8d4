"""One conversation -> Mistral instruct token ids with an answer-only target mask, through mistral-common.

Encoding: mistral-common's instruct tokenizers (v1: `[INST]` is plain text and the system prompt joins
the first user message; v2/v3: `[INST]`=3 / `[/INST]`=4 are control tokens and the system prompt joins
the last user message). The sequence is BOS + each message as mistral-common's `encode_user_message` /
`encode_assistant_message` encode it inside `encode_instruct`, so a conversation ending on a user turn
gives exactly `encode_chat_completion`'s prompt ids (what `Tokenizer.encode_chat` and `infer.generate
--chat` use). The target mask is True on assistant content tokens and the EOS closing each assistant
turn (mistral-finetune's rule), False on BOS, system, user and `[INST]`/`[/INST]` tokens.

Conversation rules: an optional first system message, then turns alternating user, assistant, user, ...;
every content a non-empty string; a training conversation ends with an assistant answer (a trailing user
turn is an error, not silently cut); an assistant message may carry mistral-finetune's `"weight": 0|1`
(0: context only). A message with `tool_calls` is refused (reason "tool_calls"): tool use is not encoded,
and dropping the calls would train on half a turn.

Over-long rule: a conversation longer than seq_len keeps its longest prefix of whole turns that ends with
an assistant answer and fits (re-encoded, so a v3 system prompt moves onto the prefix's last user turn);
if even the first answer does not fit, it is dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import InstructRequest

from mistral_jax.errors import ChatFormatError, first_line

ROLES = ("system", "user", "assistant")
SUPPORTED_VERSIONS = ("v1", "v2", "v3")   # SentencePiece instruct tokenizers (Mistral 7B v0.1-v0.3)

Message = dict[str, Any]              # {'role', 'content'} (+ 'weight' on assistant messages)


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


def check_text(text: Any, what: str) -> None:
    """Raises ValueError naming `what` if text is not a str or holds a lone surrogate (not encodable as UTF-8)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds a lone surrogate {text[e.start]!r} at character {e.start}; "
                         "not valid Unicode text") from None


# ----- conversation checks -----

def _check_message(i: int, m: Any) -> Message:
    """messages[i] as a plain {'role', 'content'(, 'weight')} dict; ChatFormatError naming the index."""
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
        check_text(content, f"messages[{i}].content")
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
    return msg


def _check_order(msgs: Sequence[Message]) -> None:
    """ChatFormatError unless: an optional system message, then user, assistant, user, ... alternating."""
    start = 1 if msgs[0]["role"] == "system" else 0
    if start == len(msgs) or msgs[start]["role"] != "user":
        got = f", got {msgs[start]['role']!r} at messages[{start}]" if start < len(msgs) else ", got none"
        raise ChatFormatError("bad_order", "a dialogue must have a user message first (after an optional system "
                                           "message)" + got)
    for i in range(start + 1, len(msgs)):
        role, prev = msgs[i]["role"], msgs[i - 1]["role"]
        if role == "system":
            raise ChatFormatError("bad_order", f"messages[{i}]: a system message may only come first, got one "
                                               f"after {prev!r}")
        if role == prev:
            raise ChatFormatError("bad_order", f"messages[{i}]: {role!r} follows {prev!r}; turns must alternate "
                                               f"user, assistant, user, ...")


def _check_end(msgs: Sequence[Message], end: Literal["user", "assistant", "any"], tail: str) -> None:
    """ChatFormatError unless the conversation ends as `end` asks (see check_messages)."""
    last = msgs[-1]["role"]
    if end == "user" and last != "user":
        raise ChatFormatError("last_not_user", f"the last message is {last!r}" + tail)
    if end == "assistant":
        answers = [m for m in msgs if m["role"] == "assistant"]
        if not answers:
            raise ChatFormatError("no_assistant", "no assistant message" + tail)
        if last != "assistant":
            raise ChatFormatError("last_not_assistant", f"the last message is {last!r}" + tail)
        if all(m.get("weight", 1) == 0 for m in answers):
            raise ChatFormatError("no_trainable", "every assistant message has weight 0; nothing to train on")


def check_messages(messages: Any, end: Literal["user", "assistant", "any"] = "any") -> list[Message]:
    """The messages as plain {'role', 'content'(, 'weight')} dicts, after checking the conversation rules.

    end: "user" for a prompt (the next turn is the model's), "assistant" for a training conversation
    (at least one answer, the last turn an answer, not every answer weight 0), "any" for either.
    Raises ChatFormatError with a one-line message naming the message index.
    """
    tail = {"user": "; a dialogue must end with a user message",
            "assistant": "; a training conversation must end with an assistant answer", "any": ""}[end]
    if not isinstance(messages, list):
        raise ChatFormatError("not_list", f"'messages' must be a list of {{'role', 'content'}} objects, got "
                                          f"{type(messages).__name__}")
    if not messages:
        raise ChatFormatError("not_list", "'messages' is empty" + tail)
    out = [_check_message(i, m) for i, m in enumerate(messages)]
    _check_order(out)
    _check_end(out, end, tail)
    return out


# ----- encoding -----

def _encode(messages: Sequence[Message], mt: Any) -> tuple[list[int], list[bool], list[int]]:
    """(ids, target mask, end index in ids of each non-system message) for checked messages."""
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
