"""SentencePiece tokenizer (default: Mistral's v1 or v3 model shipped in `mistral-common`) and chat encoding.

Chat prompts are encoded by mistral-common's instruct tokenizers (v1: `[INST]` is plain text; v3:
`[INST]`/`[/INST]` are control tokens 3 and 4), chosen from the tokenizer file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import mistral_common
import sentencepiece as spm
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_jax.data.chat_template import check_text, encode_prompt
from mistral_jax.errors import TokenizerError, first_line

# Model vocab size -> mistral-common package data file of the matching tokenizer.
DEFAULT_FILES = {32000: "tokenizer.model.v1", 32768: "mistral_instruct_tokenizer_240323.model.v3"}


def default_tokenizer_path(vocab_size: int = 32000) -> Path:
    """Path of the Mistral tokenizer with `vocab_size` pieces (v1: 32000, v3: 32768) in mistral-common's data."""
    if vocab_size not in DEFAULT_FILES:
        raise TokenizerError(f"no default tokenizer for a model vocab of {vocab_size} (known: "
                             f"{', '.join(f'{n} -> {f}' for n, f in DEFAULT_FILES.items())}); pass a tokenizer path")
    path = Path(mistral_common.__file__).parent / "data" / DEFAULT_FILES[vocab_size]
    if not path.is_file():
        raise TokenizerError(f"mistral-common is installed but has no {path}")
    return path


class Tokenizer:
    """Thin wrapper over a SentencePiece model: encode/decode and Mistral instruct chat encoding."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_tokenizer_path()
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer model not found: {self.path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError, ValueError) as e:
            raise TokenizerError(f"tokenizer {self.path}: not a readable SentencePiece model "
                                 f"({first_line(e)})") from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        self._chat: Any = None

    @classmethod
    def for_vocab(cls, vocab_size: int) -> "Tokenizer":
        """The Mistral tokenizer whose piece count equals a model's vocab (32000 -> v1, 32768 -> v3)."""
        return cls(default_tokenizer_path(vocab_size))

    def check_model_vocab(self, vocab_size: int) -> None:
        """Raises TokenizerError unless the tokenizer has exactly `vocab_size` pieces (the model's vocab)."""
        if self.vocab_size != vocab_size:
            raise TokenizerError(f"tokenizer {self.path} has {self.vocab_size} pieces but the model's vocab_size is "
                                 f"{vocab_size}; they must be equal")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally with BOS / EOS. Raises ValueError for text that is not valid Unicode."""
        check_text(text, "text")
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def chat_tokenizer(self) -> Any:
        """mistral-common's MistralTokenizer for this file (v1/v3 by name); TokenizerError if it has none."""
        if self._chat is None:
            try:
                mt = MistralTokenizer.from_file(str(self.path))
            except Exception as e:  # noqa: BLE001 - mistral-common raises several types for unknown files
                raise TokenizerError(f"tokenizer {self.path}: chat encoding needs a Mistral instruct tokenizer file "
                                     f"(e.g. tokenizer.model.v1 or *.model.v3); mistral-common could not load it "
                                     f"({first_line(e)})") from None
            n = mt.instruct_tokenizer.tokenizer.n_words
            if n != self.vocab_size:
                raise TokenizerError(f"tokenizer {self.path}: mistral-common reads {n} pieces, SentencePiece "
                                     f"{self.vocab_size}")
            # mistral-common takes the version from the file name (v1 when it has none): check it fits the pieces
            version = getattr(mt.instruct_tokenizer.tokenizer.version, "value", "?")
            control = self.vocab_size > 4 and self.sp.id_to_piece(3) == "[INST]" and self.sp.is_control(3)
            if (version == "v1") == control:
                raise TokenizerError(f"tokenizer {self.path}: mistral-common reads it as {version} but [INST] is "
                                     f"{'a control token' if control else 'plain text'} in it; name the file "
                                     f"*.model.v3 (control tokens) or *.model.v1 (plain text)")
            self._chat = mt
        return self._chat

    def encode_chat(self, messages: Any) -> list[int]:
        """Prompt ids for the next assistant answer of a dialogue, as mistral-common encodes it.

        messages: a list of {'role': 'system'|'user'|'assistant', 'content': str}: an optional first system
        message, then turns alternating user, assistant, ..., ending with a user turn. The same encoder as
        fine-tuning's (`chat_template.encode_prompt`), so prompts and training data cannot disagree. Raises
        ValueError with a one-line reason otherwise.
        """
        return encode_prompt(messages, self.chat_tokenizer())

