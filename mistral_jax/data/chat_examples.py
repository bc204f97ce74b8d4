"""A small built-in instruction set made from text that ships with Python, for the default fine-tuning run.

Facts come from the standard library's own sources (parsed with `ast`, nothing imported): the public
top-level functions of its top-level modules and the first sentence of their docstrings. Tasks have
short, computable answers so a small model can learn them in a few hundred steps:

  module      Which module is `json.dumps` defined in?            -> json
  function    What is the function name in `json.dumps`?          -> dumps
  parity      Is 417 even or odd?                                 -> odd
  add         What is 3 + 8?                                      -> 11
  first_word  What is the first word of "Serialize obj to a JSON formatted str"?   -> Serialize
  last_word   What is the last word of "Serialize obj to a JSON formatted str"?    -> str
  docstring   What does `json.dumps` do?                          -> Serialize obj to a JSON formatted str.

Conversations have 1-3 turns (each a task above), half of them a system prompt. Held-out conversations
ask about functions whose `module.function` name falls in the held-out share by hash (no training
conversation mentions them) and never repeat a training conversation. The output depends only on the
seed, the counts and the Python version (its standard library).
"""

from __future__ import annotations

import ast
import functools
import json
import random
import sysconfig
import zlib
from pathlib import Path

from mistral_jax.runtime.files import write_atomic

SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer with as few words as possible.",
                  "You know the Python standard library well.", "Reply with the answer only.")
TASK_WEIGHTS = {"module": 20, "function": 15, "parity": 15, "add": 15, "first_word": 15, "last_word": 10,
                "docstring": 10}
VAL_FUNCTION_PERCENT = 15       # share of stdlib functions only asked about in held-out conversations
MAX_SENTENCE_WORDS = 14


@functools.lru_cache(maxsize=1)
def stdlib_functions() -> tuple[tuple[str, str, str], ...]:
    """(module, function, first docstring sentence) of public top-level functions of the standard library's
    top-level modules, sorted; only sentences of 3-MAX_SENTENCE_WORDS plain words starting with a capital."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            para = " ".join(doc.strip().split("\n\n")[0].split())
            sentence = para.split(". ")[0].rstrip(".") + "."
            words = sentence.split()
            if (3 <= len(words) <= MAX_SENTENCE_WORDS and sentence[0].isupper() and sentence.isascii()
                    and not any(c in sentence for c in "`>{}[]\"'\\") and words[0].isalpha()
                    and words[-1].rstrip(".").isalnum()):
                out.append((f.stem, node.name, sentence))
    return tuple(sorted(out))


def _held_out_function(module: str, function: str) -> bool:
    return zlib.crc32(f"{module}.{function}".encode()) % 100 < VAL_FUNCTION_PERCENT


def _turn(rng: random.Random, task: str, funcs: list[tuple[str, str, str]]) -> tuple[str, str]:
    """(question, answer) of one task."""
    mod, fn, sentence = rng.choice(funcs)
    bare = sentence.rstrip(".")
    if task == "module":
        q = rng.choice(["Which module is `{m}.{f}` defined in?", "In `{m}.{f}`, what is the module?",
                        "Name the module of the function `{m}.{f}`."]).format(m=mod, f=fn)
        return q, mod
    if task == "function":
        q = rng.choice(["What is the function name in `{m}.{f}`?", "In `{m}.{f}`, what is the function called?"])
        return q.format(m=mod, f=fn), fn
    if task == "parity":
        n = rng.randrange(1000)
        q = rng.choice(["Is {n} even or odd?", "Is the number {n} odd or even?"]).format(n=n)
        return q, "even" if n % 2 == 0 else "odd"
    if task == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        q = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."]).format(a=a, b=b)
        return q, str(a + b)
    if task == "first_word":
        return rng.choice(['What is the first word of "{s}"?', 'Give the first word of this text: "{s}"']).format(
            s=bare), bare.split()[0]
    if task == "last_word":
        return rng.choice(['What is the last word of "{s}"?', 'Give the last word of this text: "{s}"']).format(
            s=bare), bare.split()[-1]
    if task == "docstring":
        return rng.choice(["What does `{m}.{f}` do?", "Describe the function `{m}.{f}` in one sentence."]).format(
            m=mod, f=fn), sentence
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_WEIGHTS)}")


def make_conversations(n: int, seed: int, split: str = "train", exclude: set[str] | None = None,
                       tasks: tuple[str, ...] | None = None) -> list[dict]:
    """n conversations {"messages": [...], "task": the last turn's task} drawn from (seed, split); split
    "train" or "val" picks the stdlib functions they may mention. Lines (as JSON) in `exclude` are redrawn.
    tasks: the task kinds to draw (default: all of TASK_WEIGHTS)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    unknown = [t for t in (tasks or ()) if t not in TASK_WEIGHTS]
    if unknown or (tasks is not None and not tasks):
        raise ValueError(f"tasks must be a non-empty subset of {list(TASK_WEIGHTS)}, got {list(tasks or ())}")
    funcs = [f for f in stdlib_functions() if _held_out_function(f[0], f[1]) == (split == "val")]
    if not funcs:
        raise ValueError("no standard-library functions with usable docstrings were found")
    rng = random.Random(f"{seed}/{split}")
    chosen = {k: v for k, v in TASK_WEIGHTS.items() if tasks is None or k in tasks}
    tasks, weights = list(chosen), list(chosen.values())
    out, seen = [], set(exclude or ())
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {split} conversations")
        messages: list[dict[str, str]] = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        task = ""
        for _ in range(rng.choice([1, 1, 2, 3])):
            task = rng.choices(tasks, weights)[0]
            q, a = _turn(rng, task, funcs)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        conv = {"messages": messages, "task": task}
        line = json.dumps(conv, ensure_ascii=False)
        if line in seen:
            continue
        seen.add(line)
        out.append(conv)
    return out


def write_examples(out_dir: str | Path, n_train: int, n_val: int, seed: int = 0,
                   tasks: tuple[str, ...] | None = None) -> tuple[Path, Path]:
    """Write train.jsonl and val.jsonl (messages format, one conversation per line) into out_dir; returns
    their paths. No held-out line equals a training line."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = make_conversations(n_train, seed, "train", tasks=tasks)
    train_lines = [json.dumps(c, ensure_ascii=False) for c in train]
    val_lines = [json.dumps(c, ensure_ascii=False) for c in make_conversations(n_val, seed, "val",
                                                                                exclude=set(train_lines),
                                                                                tasks=tasks)]
    paths = out / "train.jsonl", out / "val.jsonl"
    for path, lines in zip(paths, (train_lines, val_lines)):
        write_atomic(path, "".join(x + "\n" for x in lines))
    return paths

