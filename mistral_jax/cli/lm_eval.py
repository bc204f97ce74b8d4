"""lm-evaluation-harness on a mistral-jax checkpoint:
`python -m infer.lm_eval --checkpoint CKPT --tasks T1,T2 [--include-path DIR] [--limit N] --output DIR`.

Runs `lm_eval.simple_evaluate` with the "mistral-jax" backend (mistral_jax.evaluation.lm_eval_backend) and writes
lm-eval's results dict to DIR/results.json and each task's per-request sample dicts (with their
log-likelihoods) to DIR/samples_<task>.jsonl. Two example tasks ship with the package and need no
--include-path: `zen_choice` (multiple choice) and `stdlib_docs` (rolling perplexity), in
mistral_jax/evaluation/tasks (their data paths are relative to that folder and resolved when they run; the
package's tasks come before those of the same name elsewhere). Tasks of your own are YAML files in an
--include-path folder (`dataset_path: json` with `dataset_kwargs: {data_files: ...}`, paths relative to the
working directory, as lm-eval reads them). Offline use: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1.
--output is checked (created, writable) before the model loads; should writing still fail at the end, the results
are printed on stdout.
Exit status: 0 done, 1 evaluation or writing failed, 2 bad arguments, files, tasks or checkpoint, 3 out of memory
(one line naming the stage, the bytes requested and available, and what to change).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mistral_jax.cli.generate import dtype_arg, int_arg, mesh_arg, oom_advice
from mistral_jax.errors import first_line
from mistral_jax.evaluation import lm_eval_tasks
from mistral_jax.model import sharding
from mistral_jax.runtime import oom
from mistral_jax.runtime.files import atomic_file, write_atomic


PROG = "python -m infer.lm_eval"      # the command name usage and messages show (mistral-jax passes its own)


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="native checkpoint dir, an HF / mistral-inference "
                   "folder, or a Hub id org/name[@revision]")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    p.add_argument("--include-path", type=Path, default=None,
                   help="folder of task YAML files of your own (the example tasks need none)")
    p.add_argument("--limit", type=int_arg(1), default=None, help="at most N examples per task")
    p.add_argument("--num-fewshot", type=int_arg(0), default=None)
    p.add_argument("--apply-chat-template", action="store_true", help="mistral-common chat prompts")
    p.add_argument("--output", required=True, type=Path, help="output folder (created)")
    p.add_argument("--batch-size", type=int_arg(1), default=8)
    p.add_argument("--max-length", type=int_arg(1), default=None, help="evaluation context (default max_seq_len)")
    p.add_argument("--max-gen-toks", type=int_arg(1), default=256)
    p.add_argument("--rolling-overlap", type=int_arg(1), default=1,
                   help="least context of each later rolling window's first scored token (1: lm-eval's rule)")
    p.add_argument("--seed", type=int_arg(0), default=0)
    p.add_argument("--dtype", type=dtype_arg, default="float32")
    p.add_argument("--mesh", type=mesh_arg, default=None, help="data,fsdp,tensor mesh shape (default: one device)")
    return p.parse_args(argv)


def _jsonable(x: Any) -> Any:
    """What json.dumps writes for a value it cannot: numpy scalars and arrays as numbers, anything else as str."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def write_outputs(out: Path, results: dict[str, Any]) -> list[Path]:
    """results.json (lm-eval's dict without the samples) and samples_<task>.jsonl per task; returns paths."""
    out.mkdir(parents=True, exist_ok=True)
    samples = results.get("samples") or {}
    written = [write_atomic(out / "results.json", json.dumps({k: v for k, v in results.items() if k != "samples"},
                                                             indent=2, default=_jsonable))]
    for task, rows in samples.items():
        path = out / f"samples_{task}.jsonl"
        with atomic_file(path) as f:
            for row in rows:
                f.write(json.dumps(row, default=_jsonable, ensure_ascii=False) + "\n")
        written.append(path)
    return written


def check_output(out: Path, tasks: Sequence[str] = ()) -> None:
    """ValueError (one line) unless `out` is a folder (created if missing) that the result files can be written
    into: results.json and samples_<task>.jsonl of the named tasks must not be folders."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output {out}: cannot create the folder ({e.strerror or e})") from None
    for name in ["results.json"] + [f"samples_{t}.jsonl" for t in tasks]:
        if (out / name).is_dir():
            raise ValueError(f"--output {out}: {name} is a folder; the results could not be written there")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--output {out}: not writable ({e.strerror or e})") from None


def task_specs(tasks: Sequence[str], known: Sequence[str], include_path: Path | None) -> list[str | dict[str, Any]]:
    """What `lm_eval.simple_evaluate` is given for each task name: a packaged example task's configuration (data
    paths resolved, see `lm_eval_tasks`), else the name of a task lm-eval knows (`known`: its own and those in
    --include-path). ValueError naming the unknown ones."""
    packaged = lm_eval_tasks.packaged_tasks()
    unknown = [t for t in tasks if t not in packaged and t not in known]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}" +
                         (f" (none in {include_path} nor among the example tasks {sorted(packaged)})"
                          if include_path else "; pass --include-path for local YAML tasks"))
    return [lm_eval_tasks.task_config(packaged[t]) if t in packaged else t for t in tasks]


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Runs the program on argv (default: sys.argv[1:]) as the command `prog`; returns the exit status."""
    args = parse_args(argv, prog)
    guard = oom.Reporter(prog, lambda stage: oom_advice(args, stage))
    with guard.stage("running"):          # the stages below name themselves; this catches the rest
        return _main(args, guard)


def _main(args: argparse.Namespace, guard: oom.Reporter) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        if not tasks:
            raise ValueError(f"--tasks {args.tasks!r}: no task names")
        if args.include_path is not None and not args.include_path.is_dir():
            raise ValueError(f"--include-path {args.include_path}: not a folder")
        check_output(args.output, tasks)     # before the model loads and the evaluation runs, not after
        import lm_eval              # lm-eval comes with the optional `eval` dependencies
        from lm_eval.tasks import TaskManager
        tm = TaskManager(include_path=str(args.include_path) if args.include_path else None)
        specs = task_specs(tasks, tm.all_tasks, args.include_path)
        from mistral_jax.evaluation.lm_eval_backend import MistralJaxLM   # lm-eval: the optional `eval` dependencies
        mesh = sharding.make_mesh(*args.mesh) if args.mesh else None
        with guard.stage("loading the checkpoint"):
            lm = MistralJaxLM(args.checkpoint, batch_size=args.batch_size, max_length=args.max_length,
                              max_gen_toks=args.max_gen_toks, rolling_overlap=args.rolling_overlap, dtype=args.dtype,
                              mesh=mesh, seed=args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    try:
        with guard.stage(f"evaluating {', '.join(tasks)}"):
            results = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=tm, limit=args.limit,
                                              num_fewshot=args.num_fewshot, log_samples=True,
                                              apply_chat_template=args.apply_chat_template, random_seed=args.seed,
                                              numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                              fewshot_random_seed=args.seed)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {type(e).__name__}: {first_line(e)}", file=sys.stderr)
        return 1
    try:
        paths = write_outputs(args.output, results)
    except (OSError, ValueError, TypeError) as e:    # keep the results: printed on stdout when they cannot be written
        try:
            print(json.dumps({k: v for k, v in results.items() if k != "samples"}, default=_jsonable))
            kept = "; the results are printed on stdout"
        except (ValueError, TypeError):
            kept = ""
        print(f"error: writing {args.output}: {first_line(e)}{kept}", file=sys.stderr)
        return 1
    for task, metrics in (results.get("results") or {}).items():
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown}", file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
