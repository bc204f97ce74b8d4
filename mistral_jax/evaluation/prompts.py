"""Named prompt presets: editable text files in `mistral_jax/evaluation/prompt_presets/` (NAME.txt), loaded by name.

Presets shipped:
- "guardrail": the guardrail system prompt of the Mistral 7B paper (section 5), used by --safe-prompt.
- "moderate": the self-reflection classification prompt of the `moderate` evaluation task; a template
  holding the placeholder {text} exactly once, replaced by the text to classify.
"""

from __future__ import annotations

import re
from pathlib import Path
from mistral_jax.errors import PromptError

PROMPTS_DIR = Path(__file__).resolve().parent / "prompt_presets"  # package data
GUARDRAIL = "guardrail"
MODERATE = "moderate"
TEXT_PLACEHOLDER = "{text}"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def prompt_names() -> list[str]:
    """Names of the presets in PROMPTS_DIR."""
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))


def prompt_path(name: str) -> Path:
    """The file of preset `name` (PROMPTS_DIR/NAME.txt), or `name` itself when it names an existing file."""
    if _NAME.fullmatch(name) and (PROMPTS_DIR / f"{name}.txt").is_file():
        return PROMPTS_DIR / f"{name}.txt"
    if Path(name).is_file():
        return Path(name)
    raise PromptError(f"unknown prompt {name!r}: neither a preset in {PROMPTS_DIR} (known: "
                      f"{', '.join(prompt_names()) or 'none'}) nor an existing file")


def load_prompt(name: str) -> str:
    """Text of a preset or prompt file (see `prompt_path`), surrounding whitespace stripped; PromptError if
    it cannot be read, is not UTF-8 or is empty."""
    path = prompt_path(name)
    try:
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff").strip()
    except OSError as e:
        raise PromptError(f"prompt file {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise PromptError(f"prompt file {path}: not UTF-8 text (byte offset {e.start})") from None
    if not text:
        raise PromptError(f"prompt file {path}: empty")
    return text


def system_prompt(text: str | None = None, safe: bool = False) -> str | None:
    """The system prompt asked for by --system-prompt TEXT / --safe-prompt (the "guardrail" preset); None for
    neither. PromptError when both are given."""
    if safe and text is not None:
        raise PromptError("give --system-prompt or --safe-prompt, not both")
    return load_prompt(GUARDRAIL) if safe else text


def load_template(name: str) -> str:
    """A classification template (preset or file) holding TEXT_PLACEHOLDER exactly once; PromptError otherwise."""
    text = load_prompt(name)
    n = text.count(TEXT_PLACEHOLDER)
    if n != 1:
        raise PromptError(f"prompt {prompt_path(name)}: a template must hold {TEXT_PLACEHOLDER} exactly once, "
                          f"found {n}")
    return text


def fill_template(template: str, text: str) -> str:
    """The template with its placeholder replaced by `text` (no other braces are interpreted)."""
    return template.replace(TEXT_PLACEHOLDER, text, 1)
