"""Builds the two example evaluation data sets in this folder from text that ships with Python.

    python -m mistral_jax.evaluation.tasks.build_tasks

- zen_choice.jsonl (multiple choice, task `zen_choice`): the 19 aphorisms of "The Zen of Python" (the
  standard library's `this` module, rot13-decoded). Each aphorism is cut after its first half of words:
  the first half is the context, the true second half is one choice, and the second halves of three other
  aphorisms (drawn with random.Random(0)) are the distractors; the label's position is drawn too.
- stdlib_docs.jsonl (rolling perplexity, task `stdlib_docs`): the docstrings of 12 standard-library
  modules, stripped of surrounding whitespace.

Docstrings change a little between Python versions, so rebuilding may change stdlib_docs.jsonl; the
shipped files were built with CPython 3.11.
"""

from __future__ import annotations

import codecs
import importlib
import json
import random
import sys
from pathlib import Path

from mistral_jax.runtime.files import write_atomic

HERE = Path(__file__).resolve().parent
DOC_MODULES = ("json", "string", "textwrap", "csv", "heapq", "bisect", "fractions", "difflib", "shlex",
               "fnmatch", "colorsys", "calendar")


def zen_lines() -> list[str]:
    """The aphorisms of the Zen of Python, read from `this` without running it (importing it prints)."""
    spec = importlib.util.find_spec("this")
    src = Path(spec.origin).read_text()
    encoded = src.split('s = """', 1)[1].split('"""', 1)[0]
    text = codecs.decode(encoded, "rot13")
    return [ln.strip() for ln in text.splitlines()[2:] if ln.strip()]


def zen_choice(rng: random.Random) -> list[dict]:
    lines = zen_lines()
    halves = []
    for ln in lines:
        words = ln.split()
        k = max(1, min(len(words) - 1, len(words) // 2))
        halves.append((" ".join(words[:k]), " ".join(words[k:])))
    rows = []
    for i, (ctx, end) in enumerate(halves):
        others = [j for j in range(len(halves)) if j != i and halves[j][1] != end]
        choices = [halves[j][1] for j in rng.sample(others, 3)]
        label = rng.randrange(4)
        choices.insert(label, end)
        rows.append({"id": f"zen-{i}", "context": f"The Zen of Python: {ctx}", "choices": choices, "label": label})
    return rows


def stdlib_docs() -> list[dict]:
    return [{"id": name, "text": importlib.import_module(name).__doc__.strip()} for name in DOC_MODULES]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {path}", file=sys.stderr)


if __name__ == "__main__":
    write_jsonl(HERE / "zen_choice.jsonl", zen_choice(random.Random(0)))
    write_jsonl(HERE / "stdlib_docs.jsonl", stdlib_docs())
