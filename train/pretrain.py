"""Pretraining entry point: `python -m train.pretrain --config configs/pretrain-default.toml [--set k=v ...]`.

Writes into the run directory: config.json, metrics.jsonl (one record per log step), checkpoints/
(orbax, resumable with --resume), export/ (final params), loss_curve.png and summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from mistral_jax import run_config as rc_lib
from mistral_jax.data import DataError
from mistral_jax.train_loop import RunError, TrainingDiverged, run

# Failures reported as `error: ...` lines (exit status 1) rather than tracebacks: bad input, an incompatible
# checkpoint, a diverged run.
USER_ERRORS = (rc_lib.RunConfigError, RunError, DataError, TrainingDiverged, FileExistsError)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="TOML run config (e.g. configs/pretrain-default.toml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable; bare keys allowed "
                        "when unambiguous, e.g. --set steps=200)")
    p.add_argument("--run-dir", default=None, help="output directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the run dir (a fresh start if there is none)")
    p.add_argument("--init-from", default=None,
                   help="start from params saved by mistral_jax.checkpoint.save_params (fresh optimizer)")
    return p.parse_args(argv)


def _error(e: BaseException) -> None:
    for line in str(e).splitlines() or [type(e).__name__]:
        print(f"error: {line}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rc = rc_lib.load(args.config, args.set)
    except rc_lib.RunConfigError as e:
        _error(e)
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    try:
        summary = run(rc, run_dir, resume=args.resume, init_from=args.init_from)
    except USER_ERRORS as e:
        _error(e)
        return 1
    if summary.get("stopped_by") == "SIGTERM":
        return 143
    print(json.dumps({k: v for k, v in summary.items() if k != "sample"}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
