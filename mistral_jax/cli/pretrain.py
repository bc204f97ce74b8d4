"""Pretraining entry point: `python -m train.pretrain --config configs/pretrain-default.toml [--set k=v ...]`.

Writes into the run directory: config.json, metrics.jsonl (one record per log step), tensorboard/ (event
files), checkpoints/ (orbax, resumable with --resume), export/ (final params), loss_curve.png and
summary.json.
"""

from __future__ import annotations

import sys
from typing import Sequence

from mistral_jax.training.run_config import TEXT_SOURCES
from mistral_jax.cli.train_cli import main as _main


PROG = "python -m train.pretrain"


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Runs the pretraining program on argv (default: sys.argv[1:]); returns the exit status."""
    return _main(argv, prog, __doc__.splitlines()[0], "configs/pretrain-default.toml", TEXT_SOURCES)


if __name__ == "__main__":
    sys.exit(main())
