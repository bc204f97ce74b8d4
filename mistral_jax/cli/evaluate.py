"""Batch offline evaluation: `python -m infer.evaluate --checkpoint CKPT --task TASK --data FILE --output DIR`.

Tasks (inputs):
  perplexity  JSONL with a "text" field per line, or plain text files (one document each). Per document and
              overall: token NLL, perplexity, bits per byte. Documents longer than --max-length tokens are
              scored in windows (the rolling rule of mistral_jax.inference.scoring.rolling_windows): every token
              is scored exactly once, each later window giving its scored tokens at least --overlap tokens of
              context (default: the sliding window, at most half of --max-length).
  choice      JSONL {"context": str, "choices": [str, ...], "label": int}; each choice is scored as
              context + --delimiter + choice by summed and per-byte log-likelihood; accuracies with 95%
              Wilson intervals; per-example log-likelihoods and is_greedy.
  generate    JSONL {"prompt": str} or {"messages": [...]} (chat, mistral-common templates), optional
              "target" for exact match; greedy unless --temperature.
  moderate    JSONL {"text": str, "label": "acceptable" | "unacceptable"}; each text is put into the
              self-reflection prompt (--moderation-prompt, default
              mistral_jax/evaluation/prompt_presets/moderate.txt, {text} replaced) and classified by the
              larger log-likelihood of the label words as continuations.
              Precision and recall of "unacceptable" (the positive class) and accuracy, 95% Wilson intervals.
An optional "id" is copied to the example's row.

Chat tasks (generate, moderate): --system-prompt TEXT or --safe-prompt (the paper's guardrail prompt, preset
mistral_jax/evaluation/prompt_presets/guardrail.txt) adds a system message; a system prompt implies --chat.
Few-shot (choice, generate): --num-fewshot K shots drawn with --fewshot-seed from --fewshot-data FILE (default:
the evaluated data, never the example itself); each shot is its context + --delimiter + its answer, shots and
context separated by a blank line (chat: user/assistant turns before the example's messages).

Stdout: the headline metrics over every row (perplexity and bits per byte; accuracy, precision and recall, exact
match with 95% Wilson intervals), one "name: value" line each; progress, notes and errors go to stderr.
Output folder: examples.jsonl (one row per example, written as examples finish, with "key" = FILE:LINE, FILE
resolved, and "line"), summary.json (written at the end; "token_counts" says which tokens "tokens_scored" and
"tokens_run" count), run.json (task, data digest, checkpoint and its
identity, settings). Rerunning with the same --output scores only the examples not yet in examples.jsonl,
however the data's path is spelled (a torn last line from a killed run is dropped; another line that is not a
row is skipped with a note); a rerun with another task, data, checkpoint or settings is refused unless
--overwrite. No input (--data, --fewshot-data, --tokenizer, the moderation prompt) may be a file the run writes.
Exit status: 0 every example scored, 1 some example failed (its row holds "error": "FILE:LINE: reason"), 2 bad
arguments, files or checkpoint, 3 out of memory (one line naming the stage, the bytes requested and available, and
what to change; the examples already in examples.jsonl are kept, and a rerun scores the rest).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import tqdm

from mistral_jax.cli.generate import dtype_arg, float_arg, int_arg, mesh_arg, oom_advice
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.errors import EvalError, first_line
from mistral_jax.evaluation import prompts
from mistral_jax.evaluation.encoding import RUN_SETTINGS, Settings
from mistral_jax.evaluation.examples import CHAT_TASKS, FEWSHOT_TASKS, TASKS, Example, file_digest, read_examples
from mistral_jax.evaluation.fewshot import FewShot, fewshot_pool
from mistral_jax.evaluation.generate_task import run_generate_task
from mistral_jax.evaluation.likelihood_tasks import run_scoring_task
from mistral_jax.evaluation.output import EXAMPLES_FILE, RUN_FILE, Output, check_inputs_not_written, check_run, read_run
from mistral_jax.evaluation.summary import headline, summarize, timing
from mistral_jax.inference import scoring
from mistral_jax.model import sharding
from mistral_jax.runtime import distributed, oom


PROG = "python -m infer.evaluate"      # the command name usage and messages show (mistral-jax passes its own)


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="native checkpoint dir, an HF / mistral-inference "
                   "folder, or a Hub id org/name[@revision]")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, type=Path, nargs="+", help="JSONL file(s) (perplexity: or text files)")
    p.add_argument("--output", required=True, type=Path, help="output folder (created; reused to resume)")
    p.add_argument("--overwrite", action="store_true", help="discard what --output holds and start again")
    p.add_argument("--batch-size", type=int_arg(1), default=8,
                   help="rows per batch (rounded up to a multiple of the mesh's data x fsdp size)")
    p.add_argument("--max-length", type=int_arg(1), default=None,
                   help="evaluation context: most tokens fed in one pass (default: the model's max_seq_len)")
    p.add_argument("--overlap", type=int_arg(1), default=None,
                   help="perplexity: least context of the first scored token of each later window (default: "
                        "the sliding window, capped at half of --max-length)")
    p.add_argument("--smallest-bucket", type=int_arg(1), default=64, help="smallest padded length bucket")
    p.add_argument("--pack-length", type=int_arg(0), default=256,
                   help="scoring: requests share rows of at least this many positions as separate segments; "
                        "0: one request per row of its length bucket")
    p.add_argument("--delimiter", default=" ",
                   help="choice/moderate: text between context and each choice or label word; few-shot: between "
                        "a shot's context and answer (default ' ')")
    p.add_argument("--token-logprobs", action="store_true", help="perplexity: add per-token log-probs to rows")
    p.add_argument("--chat", action="store_true",
                   help="generate/moderate: wrap plain prompts (moderate: the filled template) as a user message")
    sp = p.add_mutually_exclusive_group()
    sp.add_argument("--system-prompt", default=None, help="generate/moderate: system message (implies --chat)")
    sp.add_argument("--safe-prompt", action="store_true",
                    help="generate/moderate: the paper's guardrail system prompt (preset 'guardrail', "
                         "mistral_jax/evaluation/prompt_presets/guardrail.txt; implies --chat)")
    p.add_argument("--moderation-prompt", default="moderate",
                   help="moderate: template preset name in mistral_jax/evaluation/prompt_presets or a file; must "
                        "hold {text} once")
    p.add_argument("--num-fewshot", type=int_arg(0), default=0, help="choice/generate: shots per example")
    p.add_argument("--fewshot-data", type=Path, default=None,
                   help="JSONL file the shots are drawn from (default: the --data files, excluding the example)")
    p.add_argument("--fewshot-seed", type=int_arg(0, 2**32 - 1), default=1234, help="seed of the shot draw")
    p.add_argument("--max-new-tokens", type=int_arg(1), default=64)
    p.add_argument("--temperature", type=float_arg, default=0.0)
    p.add_argument("--top-k", type=int_arg(0), default=0)
    p.add_argument("--top-p", type=float_arg, default=1.0)
    p.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0)
    p.add_argument("--tokenizer", type=Path, default=None, help="SentencePiece model (default: by vocab)")
    p.add_argument("--dtype", type=dtype_arg, default="float32")
    p.add_argument("--mesh", type=mesh_arg, default=None, help="data,fsdp,tensor mesh shape (default: one device)")
    distributed.add_arguments(p)
    return p.parse_args(argv)


class Progress:
    """The progress callback of a task: the bar counts finished examples, and its tokens and tokens/s move
    with every scored batch (each window of a long document), not only when an example finishes."""

    def __init__(self, bar: Any):
        self.bar, self.examples, self.tokens = bar, 0, 0
        self.start = self._shown = time.perf_counter()

    def __call__(self, examples_done: int, tokens: int) -> None:
        self.examples += examples_done
        self.tokens += tokens
        now = time.perf_counter()
        self.bar.set_postfix({"tokens": self.tokens, "tok_s": f"{self.tokens / max(now - self.start, 1e-9):.0f}"},
                             refresh=False)
        if examples_done:
            self.bar.update(examples_done)
        elif tokens and not self.bar.disable and now - self._shown >= self.bar.mininterval:
            self.bar.refresh()      # tqdm redraws on update(0) only until its first finished example
            self._shown = now


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Runs the program on argv (default: sys.argv[1:]) as the command `prog`; returns the exit status."""
    args = parse_args(argv, prog)
    if not distributed.start_or_report(args):
        return 2
    guard = oom.Reporter(prog, lambda stage: oom_advice(args, stage))
    with guard.stage("running"):          # the stages below name themselves; this catches the rest
        return _main(args, guard)


@dataclasses.dataclass
class _Inputs:
    """What the checks before the model loads produce."""
    examples: list[Example]
    system: str | None
    template: str
    fewshot: FewShot | None
    fewshot_run: dict[str, Any]       # the few-shot fields of run.json
    tok: Tokenizer | None
    mesh: Any


@dataclasses.dataclass
class _Job:
    """A run ready to score: the model, its settings and the output folder."""
    cfg: Any
    params: Any
    tok: Tokenizer
    st: Settings
    out: Output


def _main(args: argparse.Namespace, guard: oom.Reporter) -> int:
    writer = distributed.is_main()   # with several processes, all score; process 0 writes and reports
    try:
        inp = _read_inputs(args, guard)
    except (ValueError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    try:
        job = _prepare(args, guard, inp, writer)
    except (OSError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    todo = job.out.resume(inp.examples)
    if writer:
        for note in job.out.notes:
            print(f"note: {note}", file=sys.stderr)
    skipped = len(inp.examples) - len(todo)
    try:
        summary = _evaluate(args, guard, inp, job, todo, writer)
        summary["this_run"]["skipped_already_scored"] = skipped
        job.out.write_summary(summary)
    except OSError as e:
        print(f"error: writing {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    errors = summary["errors"]
    if writer:
        run = summary["this_run"]
        print(f"{args.task}: {summary['scored']} example(s) scored, {errors} failed, {skipped} already in "
              f"{args.output / EXAMPLES_FILE}; {run['tokens']} tokens in {run['seconds']:.2f} s "
              f"({run['tokens_per_s']:.0f} tokens/s, compilation included)", file=sys.stderr)
        for row in job.out.rows:
            if "error" in row:
                print(f"error: {row['error']}", file=sys.stderr)
        print("\n".join(headline(summary)), flush=True)       # stdout: the metrics, as lm_eval's table
    return 1 if errors else 0


def _check_flags(args: argparse.Namespace) -> str | None:
    """The system prompt asked for; EvalError when the flags or input files do not fit the task."""
    for d in args.data:
        if not d.is_file():
            raise EvalError(f"--data {d}: not a file")
    inputs = [("--data", d) for d in args.data]
    inputs += [(flag, Path(v)) for flag, v in (("--fewshot-data", args.fewshot_data),
                                               ("--tokenizer", args.tokenizer)) if v is not None]
    if args.task == "moderate":
        inputs.append(("--moderation-prompt", prompts.prompt_path(args.moderation_prompt)))
    check_inputs_not_written(args.output, inputs, Path(args.checkpoint))
    system = prompts.system_prompt(args.system_prompt, args.safe_prompt)
    if system is not None and args.task not in CHAT_TASKS:
        raise EvalError(f"--system-prompt/--safe-prompt: only for the chat tasks ({', '.join(CHAT_TASKS)}), "
                        f"not {args.task}")
    if args.chat and args.task not in CHAT_TASKS:
        raise EvalError(f"--chat: only for the chat tasks ({', '.join(CHAT_TASKS)}), not {args.task}")
    if args.fewshot_data is not None and not args.num_fewshot:
        raise EvalError("--fewshot-data needs --num-fewshot K >= 1")
    return system


def _read_inputs(args: argparse.Namespace, guard: oom.Reporter) -> _Inputs:
    """Checks the flags and reads the data, the few-shot pool, the prompts and the tokenizer."""
    system = _check_flags(args)
    template = prompts.load_template(args.moderation_prompt) if args.task == "moderate" else ""
    with guard.stage("reading the data"):
        examples = read_examples(args.data, args.task)
    fewshot, fewshot_run = _fewshot(args, examples) if args.num_fewshot else (None, {})
    tok = Tokenizer(args.tokenizer) if args.tokenizer is not None else None
    mesh = sharding.make_mesh(*args.mesh) if args.mesh else None
    if mesh is None and jax.process_count() > 1:
        mesh = sharding.make_mesh(1, -1, 1)     # every process's devices
    return _Inputs(examples, system, template, fewshot, fewshot_run, tok, mesh)


def _fewshot(args: argparse.Namespace, examples: list[Example]) -> tuple[FewShot, dict[str, Any]]:
    """The few-shot draw of --num-fewshot and its run.json fields; EvalError when the pool is too small."""
    if args.task not in FEWSHOT_TASKS:
        raise EvalError(f"--num-fewshot: only for {', '.join(FEWSHOT_TASKS)}, not {args.task}")
    own = args.fewshot_data is None
    if not own and not args.fewshot_data.is_file():
        raise EvalError(f"--fewshot-data {args.fewshot_data}: not a file")
    src = args.data if own else [args.fewshot_data]
    pool = fewshot_pool(examples if own else read_examples(src, args.task), args.task)
    need = args.num_fewshot + own
    if len(pool) < need:
        raise EvalError(f"--num-fewshot {args.num_fewshot}: {', '.join(map(str, src))} has {len(pool)} "
                        f"usable example(s), {need} needed")
    run = {"num_fewshot": args.num_fewshot, "fewshot_seed": args.fewshot_seed,
           "fewshot_data": None if own else str(args.fewshot_data.resolve()),
           "fewshot_sha256": None if own else file_digest(src)}
    return FewShot(args.num_fewshot, pool, args.fewshot_seed, own), run


def _settings(args: argparse.Namespace, inp: _Inputs, cfg: Any) -> Settings:
    """The run's settings; EvalError when --max-length or --overlap do not fit the model or each other."""
    max_input = args.max_length or cfg.max_seq_len
    if max_input > cfg.max_seq_len:
        raise EvalError(f"--max-length {max_input} exceeds the model's max_seq_len {cfg.max_seq_len}")
    overlap = args.overlap or scoring.default_overlap(cfg, max_input)
    if args.task == "perplexity" and overlap >= max_input:
        if args.overlap is None:
            raise EvalError(f"--max-length {max_input}: too short for perplexity windows, which need more "
                            f"than the default --overlap of {overlap} token(s); use --max-length "
                            f"{overlap + 1} or more")
        raise EvalError(f"--overlap {overlap} must be smaller than --max-length {max_input}")
    return Settings(max_input=max_input, overlap=overlap, batch_size=args.batch_size, delimiter=args.delimiter,
                    chat=args.chat, system_prompt=inp.system, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    token_logprobs=args.token_logprobs, moderation_template=inp.template, fewshot=inp.fewshot)


def _prepare(args: argparse.Namespace, guard: oom.Reporter, inp: _Inputs, writer: bool) -> _Job:
    """Refuses a resume of another run, loads the model and opens the output folder."""
    from mistral_jax.checkpoint.native import load_params  # start-up time: loaded after the argument checks
    from mistral_jax.checkpoint.integrity import checkpoint_identity
    from mistral_jax.checkpoint.hub import resolve_checkpoint
    args.checkpoint = str(resolve_checkpoint(args.checkpoint))   # run.json names the snapshot of a Hub id
    run = {"task": args.task, "data": [str(d.resolve()) for d in args.data],
           "data_sha256": file_digest(args.data), "checkpoint": str(Path(args.checkpoint).resolve())}
    if Path(args.checkpoint).is_dir():      # else load_params says what is wrong
        run["checkpoint_id"] = checkpoint_identity(args.checkpoint)
    old_run = read_run(args.output) if writer and not args.overwrite and args.output.is_dir() else None
    if old_run is not None:     # refuse another task, data or checkpoint before loading the model
        check_run(args.output / RUN_FILE, old_run, run, keys=run)
    with guard.stage("loading the checkpoint"):
        cfg, params = load_params(args.checkpoint, mesh=inp.mesh, dtype=args.dtype, progress=False)
    tok = inp.tok if inp.tok is not None else Tokenizer.for_vocab(cfg.vocab_size)
    tok.check_model_vocab(cfg.vocab_size)
    st = _settings(args, inp, cfg)
    run.update(dtype=str(args.dtype), tokenizer=str(tok.path))
    run.update({k: getattr(st, k) for k in RUN_SETTINGS[args.task]}, **inp.fewshot_run)
    if writer:
        out = Output(args.output, run, args.overwrite)
    distributed.sync("evaluate-output-ready")   # the others read what process 0 has prepared
    if not writer:
        out = Output(args.output, run, args.overwrite, writer=False)
    return _Job(cfg, params, tok, st, out)


def _evaluate(args: argparse.Namespace, guard: oom.Reporter, inp: _Inputs, job: _Job, todo: list[Example],
              writer: bool) -> dict[str, Any]:
    """Scores the examples `todo`, writing each row as it finishes; the summary over every row."""
    bar = tqdm.tqdm(total=len(todo), desc=args.task, unit="ex", file=sys.stderr, disable=not (todo and writer))
    progress = Progress(bar)
    scorer = None
    try:
        if args.task == "generate":
            with guard.stage("generating"):
                run_generate_task(todo, job.tok, job.params, job.cfg, inp.mesh, args.dtype, job.st, job.out,
                                  progress)
        else:
            with guard.stage(f"scoring ({args.task})"):
                max_input = job.st.max_input
                scorer = scoring.Scorer(job.params, job.cfg, mesh=inp.mesh, dtype=args.dtype,
                                        batch_size=args.batch_size, max_input=max_input,
                                        smallest_bucket=min(args.smallest_bucket, max_input),
                                        pack=args.pack_length > 0, pack_length=max(args.pack_length, 1))
                run_scoring_task(args.task, todo, job.tok, scorer, job.st, job.out, progress)
    finally:
        bar.close()
        job.out.close()
    summary = summarize(args.task, job.out.rows)
    n_ex, n_tok = progress.examples, progress.tokens
    summary["this_run"] = {**timing(progress.start, n_ex, n_tok), "examples": n_ex, "tokens": n_tok}
    if scorer is not None:
        summary["this_run"]["buckets"] = sorted(scorer.used_buckets)
        summary["this_run"]["programs"] = sorted(scorer.used_shapes)        # (rows, row length)
        summary["this_run"]["positions_run"] = scorer.positions_run       # padding included
        if args.task == "perplexity":
            summary["rolling_rule"] = {"max_length": job.st.max_input, "overlap": job.st.overlap}
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
