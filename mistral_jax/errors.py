"""Every error type the library raises for bad input or a failed run (each message is one line naming the file,
field, flag or value at fault), and their one-line rendering for the programs."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ConfigError(ValueError):
    """A model configuration is malformed or inconsistent; the message names the field.

    `field` is the ModelConfig field at fault when the error comes from ModelConfig's own checks (the
    file readers use it to name the file's field instead).
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class DtypeError(ValueError):
    """A dtype name is unknown or not one this library computes or stores in; the message names it."""


class WeightError(ValueError):
    """A checkpoint tensor is missing, unexpected or of the wrong shape; the message names it."""


class CheckpointError(ValueError):
    """A checkpoint file or folder is unreadable, unsafe, truncated or ambiguous; the message names it."""


class DistributedError(RuntimeError):
    """The process group cannot start as asked; the message names the flag or variable and the value."""


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable, or does not fit the model; the message names it."""


class DataError(ValueError):
    """The corpus is unusable (no files, no text, nothing left for training); the message says which."""


class ChatFormatError(ValueError):
    """A conversation breaks the rules; `reason` is a key of `data.chat_files.REASONS`, the message is one line."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ChatDataError(DataError):
    """Chat data is unusable (bad line under on_error='stop', no file, no conversation); one-line message."""


class PromptError(ValueError):
    """An unknown preset, an unreadable prompt file or a template without its placeholder (one line)."""


class EvalError(ValueError):
    """Bad data, settings or output folder; the message is one line naming the file, line or field."""


class RunConfigError(ValueError):
    """A run configuration is malformed; the message names the file, section and field (one line per error)."""


class RunError(ValueError):
    """A run cannot start as asked (mesh, tokenizer, --init-from, an incompatible checkpoint); one line."""


class TrainingDiverged(RuntimeError):
    """The loss, gradient norm or updated params became NaN/inf; the message names the step, which of them,
    and the last good checkpoint."""
