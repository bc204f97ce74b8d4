"""`mistral-jax SUBCOMMAND [ARGS...]`: the one console script; each subcommand is one of the programs in
`mistral_jax.cli`, run with the rest of the command line."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

PROG = "mistral-jax"
# subcommand -> (module whose main(argv, prog) runs it, one line on what it does)
COMMANDS = {
    "convert": ("mistral_jax.cli.convert", "convert checkpoints between native, Hugging Face and mistral-inference"),
    "generate": ("mistral_jax.cli.generate", "generate completions for a JSONL file of prompts (batched, offline)"),
    "evaluate": ("mistral_jax.cli.evaluate", "evaluate a checkpoint on a task (perplexity, multiple choice, ...)"),
    "lm-eval": ("mistral_jax.cli.lm_eval", "run EleutherAI lm-evaluation-harness tasks on a checkpoint"),
    "pretrain": ("mistral_jax.cli.pretrain", "pretrain on documents from a run config"),
    "finetune": ("mistral_jax.cli.finetune", "fine-tune on conversations (full or LoRA) from a run config"),
    "plan": ("mistral_jax.cli.plan", "print the per-device memory plan of a training layout without running it"),
}
EXIT_STATUS = "exit status: the subcommand's own (see `mistral-jax SUBCOMMAND --help`); 2 for an unknown subcommand"


def usage() -> str:
    """The top-level help: the usage line and one line per subcommand."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} SUBCOMMAND [ARGS...]", "",
             "Mistral 7B in JAX: conversion, generation, evaluation and training.", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join([*lines, "", EXIT_STATUS])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `mistral-jax` on argv (default: sys.argv[1:]) and returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"{PROG}: unknown subcommand {name!r} (choose from {', '.join(COMMANDS)}; "
              f"`{PROG} --help` lists them)", file=sys.stderr)
        return 2
    program = importlib.import_module(COMMANDS[name][0])
    return program.main(rest, prog=f"{PROG} {name}")


if __name__ == "__main__":
    sys.exit(main())
