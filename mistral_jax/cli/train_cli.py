"""The command line shared by `python -m train.pretrain` and `python -m train.finetune`: the two differ
only in the data they train on (documents vs conversations), which the run config's data.source says."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from mistral_jax.errors import DataError, RunConfigError, RunError, TrainingDiverged
from mistral_jax.runtime import distributed
from mistral_jax.runtime import oom
from mistral_jax.training import run_config as rc_lib
from mistral_jax.training.run import run

# Failures reported as `error: ...` lines (exit status 1) rather than tracebacks: bad input, an incompatible
# checkpoint, a diverged run. A RunConfigError (a bad config, also when found by the run) exits with 2.
USER_ERRORS = (RunConfigError, RunError, DataError, TrainingDiverged, FileExistsError)

EXIT_STATUS = ("exit status: 0 done, 1 run failed (bad data, checkpoint, divergence), 2 bad config (a field's value, "
               "or data.paths and data.val_paths naming the same file), 3 out of memory (host or device: one line "
               "naming the stage, the bytes requested and available, and which settings to change), 143 stopped by "
               "SIGTERM (a checkpoint is saved; --resume continues)")

# The stage an out-of-memory failure is reported in: the innermost of these functions on its stack
# ("module:function" -> a name, or a function of that frame's locals giving one).
OOM_STAGES = {
    "mistral_jax.training.sources:make_data": "reading the data",
    "mistral_jax.training.start_state:load_init_params": "loading the --init-from checkpoint",
    "mistral_jax.checkpoint.train_state:restore": "restoring the checkpoint (--resume)",
    "mistral_jax.training.train_step:init_state": "creating the params and optimizer state",
    "mistral_jax.training.run_setup:measure_peak": "measuring the peak FLOP/s (set train.peak_flops to skip it)",
    "mistral_jax.training.step_loop:train": lambda f: f"training step {f['step'] + 1} of {f['steps']}",
    "mistral_jax.checkpoint.train_state:save": "saving a checkpoint",
    "mistral_jax.training.heldout:heldout_loss": "computing the held-out loss",
    "mistral_jax.training.heldout:answer_exact_match": "generating the held-out answers",
    "mistral_jax.checkpoint.native:save_params": "exporting the params",
    "mistral_jax.checkpoint.peft:load_peft_adapter": "loading the lora.init_from adapter",
    "mistral_jax.checkpoint.peft:save_peft_adapter": "exporting the PEFT adapter",
}


def oom_advice(rc: rc_lib.RunConfig, stage: str) -> list[str]:
    """The settings that shrink what a training run holds per device at `stage`: 16-bit compute and master
    params, recomputed activations and smaller micro-batches (steps), more devices."""
    m, d, o = rc.model, rc.data, rc.optim
    running = stage.startswith(("training", "computing", "generating", "measuring"))   # programs with activations
    advice = [f"--set model.{k}=bfloat16" for k in ("dtype", "param_dtype")
              if getattr(m, k) == "float32" and (running or k == "param_dtype")]
    if stage.startswith("training"):
        if m.remat != "full":
            advice.append("--set model.remat=full")
        if d.batch_size // o.grad_accum > 1:
            advice.append(f"a smaller data.batch_size or a larger optim.grad_accum (now {d.batch_size} rows in "
                          f"{o.grad_accum} micro-batch(es))")
    elif stage.startswith("computing") and d.batch_size > 1:
        advice.append(f"a smaller data.batch_size (now {d.batch_size})")
    return advice + ["a larger mesh (more devices; mesh.devices=0 uses them all)"]


def parse_args(argv: Sequence[str] | None, prog: str, description: str, example: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=EXIT_STATUS)
    p.add_argument("--config", required=True, help=f"TOML run config (e.g. {example})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable; bare keys allowed "
                        "when unambiguous, e.g. --set steps=200)")
    p.add_argument("--run-dir", default=None, help="output directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the run dir (a fresh start if there is none)")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from the params of a checkpoint folder (native, Hugging Face or mistral-inference; "
                        "fresh optimizer), or a Hugging Face Hub id org/name[@revision] (no such local folder)")
    p.add_argument("--profile-steps", default=None, metavar="A:B",
                   help="record a jax.profiler trace of steps A..B (0-based) into <run dir>/profile")
    distributed.add_arguments(p)
    return p.parse_args(argv)


def _error(e: BaseException) -> None:
    for line in str(e).splitlines() or [type(e).__name__]:
        print(f"error: {line}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None, prog: str, description: str, example: str, sources: Sequence[str]) -> int:
    """Runs one training program; exit status 0 done, 1 run failed (bad data, checkpoint, divergence), 2 bad
    config (a field's value, or data.paths and data.val_paths naming the same file), 3 out of memory (one
    `oom` line on stderr), 143 stopped by SIGTERM."""
    args = parse_args(argv, prog, description, example)
    if not distributed.start_or_report(args):
        return 2
    try:
        rc = rc_lib.load(args.config, args.set)
    except RunConfigError as e:
        _error(e)
        return 2
    if rc.data.source not in sources:
        _error(ValueError(f"{args.config}: [data] field 'source' is {rc.data.source!r}; {prog} trains on "
                          f"{' or '.join(repr(s) for s in sources)}"))
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    guard = oom.Reporter(prog, lambda stage: oom_advice(rc, stage))
    try:
        with guard.stage(lambda e: oom.frame_stage(e, OOM_STAGES, "preparing the run")):
            summary = run(rc, run_dir, resume=args.resume, init_from=args.init_from,
                          profile_steps=args.profile_steps)
    except RunConfigError as e:   # found once the files are known, e.g. a file both trained on and held out
        _error(e)
        return 2
    except USER_ERRORS as e:
        _error(e)
        return 1
    if summary.get("stopped_by") == "SIGTERM":
        return 143
    if distributed.is_main():
        print(json.dumps({k: v for k, v in summary.items() if k not in ("sample", "data")}, indent=1), flush=True)
    return 0
