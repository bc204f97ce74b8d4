"""Instruction fine-tuning entry point:
`python -m train.finetune --config configs/finetune-default.toml [--init-from CKPT] [--set k=v ...]`.

Trains on JSONL conversations (`{"messages": [...]}` or `{"prompt", "completion"}` lines) encoded with
Mistral's own instruct templates (mistral-common, v1 or v3 by the model's vocab), with the loss on the
assistant answers only, fully or with LoRA adapters (lora.rank > 0; lora.init_from starts them from a PEFT
adapter folder). Same run directory as pretraining, plus data_report.json (skipped lines), answers.jsonl
(held-out greedy answers) and, for a LoRA run, adapter/ (the trained adapters as a PEFT folder).
"""

from __future__ import annotations

import sys
from typing import Sequence

from mistral_jax.training.run_config import CHAT_SOURCES
from mistral_jax.cli.train_cli import main as _main


PROG = "python -m train.finetune"


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Runs the fine-tuning program on argv (default: sys.argv[1:]); returns the exit status."""
    return _main(argv, prog, __doc__.splitlines()[0], "configs/finetune-default.toml", CHAT_SOURCES)


if __name__ == "__main__":
    sys.exit(main())
