"""SentencePiece tokenizer (default: Mistral's v1 model shipped in `mistral-common`) and v1 chat encoding."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import sentencepiece as spm


def default_tokenizer_path() -> Path:
    """Path of `tokenizer.model.v1`, shipped as package data of mistral-common."""
    try:
        import mistral_common
    except ImportError as e:
        raise FileNotFoundError("the default tokenizer ships with the 'mistral-common' package; "
                                "pip install mistral-common, or pass a tokenizer path") from e
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common is installed but has no {path}")
    return path


class Tokenizer:
    """Thin wrapper over a SentencePiece model: encode/decode and Mistral v1 instruct chat encoding."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_tokenizer_path()
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Mistral v1 instruct encoding of a dialogue, token-for-token as mistral-common's v1 tokenizer.

        messages: dicts with 'role' in {'system', 'user', 'assistant'} and 'content'. A system message
        (at most one, first) is prefixed to the first user message with a blank line. Turns must
        alternate user/assistant; every finished assistant turn is closed with EOS. If the dialogue
        ends with a user turn the result is a prompt for the next assistant answer.
        """
        msgs = list(messages)
        system = None
        if msgs and msgs[0].get("role") == "system":
            system = msgs.pop(0)["content"]
        ids = [self.bos_id]
        first_user = True
        for i, m in enumerate(msgs):
            role, content = m.get("role"), m.get("content")
            if not isinstance(content, str):
                raise ValueError(f"chat message {i}: 'content' must be a string, got {content!r}")
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"chat message {i}: role {role!r} where {expected!r} was expected "
                                 "(turns alternate user/assistant after an optional first system message)")
            if role == "user":
                if first_user and system:
                    content = system + "\n\n" + content
                first_user = False
                ids += self.sp.encode(f"[INST] {content} [/INST]")
            else:
                ids += self.sp.encode(content) + [self.eos_id]
        return ids
