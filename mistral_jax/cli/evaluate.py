"""Batch offline evaluation: `python -m infer.evaluate --checkpoint CKPT --task TASK --data FILE --output DIR`.

Tasks (inputs):
  perplexity  JSONL with a "text" field per line, or plain text files (one document each). Per document and
              overall: token NLL, perplexity, bits per byte. Documents longer than --max-length tokens are
              scored in windows (the rolling rule of mistral_jax.inference.scoring.rolling_windows): every token is
              scored exactly once, each later window giving its scored tokens at least --overlap tokens of
              context (default: the sliding window, at most half of --max-length).
  choice      JSONL {"context": str, "choices": [str, ...], "label": int}; each choice is scored as
              context + --delimiter + choice by summed and per-byte log-likelihood; accuracies with 95%
              Wilson intervals; per-example log-likelihoods and is_greedy.
  generate    JSONL {"prompt": str} or {"messages": [...]} (chat, mistral-common templates), optional
              "target" for exact match; greedy unless --temperature.
  moderate    JSONL {"text": str, "label": "acceptable" | "unacceptable"}; each text is put into the
              self-reflection prompt (--moderation-prompt, default mistral_jax/evaluation/prompt_presets/moderate.txt, {text}
              replaced) and classified by the larger log-likelihood of the label words as continuations.
              Precision and recall of "unacceptable" (the positive class) and accuracy, 95% Wilson intervals.
An optional "id" is copied to the example's row.

Chat tasks (generate, moderate): --system-prompt TEXT or --safe-prompt (the paper's guardrail prompt, preset
mistral_jax/evaluation/prompt_presets/guardrail.txt) adds a system message; a system prompt implies --chat.
Few-shot (choice, generate): --num-fewshot K shots drawn with --fewshot-seed from --fewshot-data FILE (default:
the evaluated data, never the example itself); each shot is its context + --delimiter + its answer, shots and
context separated by a blank line (chat: user/assistant turns before the example's messages).

Output folder: examples.jsonl (one row per example, written as examples finish, with "key" = FILE:LINE, FILE
resolved, and "line"), summary.json (written at the end), run.json (task, data digest, checkpoint and its
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
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax

from mistral_jax.cli.generate import _dtype_arg, _float_arg, _int_arg, _mesh_arg, oom_advice
from mistral_jax.evaluation import evaluate as ev
from mistral_jax.runtime import oom
from mistral_jax.errors import first_line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="native checkpoint dir, or an HF / mistral-inference folder")
    p.add_argument("--task", required=True, choices=ev.TASKS)
    p.add_argument("--data", required=True, type=Path, nargs="+", help="JSONL file(s) (perplexity: or text files)")
    p.add_argument("--output", required=True, type=Path, help="output folder (created; reused to resume)")
    p.add_argument("--overwrite", action="store_true", help="discard what --output holds and start again")
    p.add_argument("--batch-size", type=_int_arg(1), default=8,
                   help="rows per batch (rounded up to a multiple of the mesh's data x fsdp size)")
    p.add_argument("--max-length", type=_int_arg(1), default=None,
                   help="evaluation context: most tokens fed in one pass (default: the model's max_seq_len)")
    p.add_argument("--overlap", type=_int_arg(1), default=None,
                   help="perplexity: least context of the first scored token of each later window (default: "
                        "the sliding window, capped at half of --max-length)")
    p.add_argument("--smallest-bucket", type=_int_arg(1), default=64, help="smallest padded length bucket")
    p.add_argument("--pack-length", type=_int_arg(0), default=256,
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
                   help="moderate: template preset name in mistral_jax/evaluation/prompt_presets or a file; must hold {text} once")
    p.add_argument("--num-fewshot", type=_int_arg(0), default=0, help="choice/generate: shots per example")
    p.add_argument("--fewshot-data", type=Path, default=None,
                   help="JSONL file the shots are drawn from (default: the --data files, excluding the example)")
    p.add_argument("--fewshot-seed", type=_int_arg(0, 2**32 - 1), default=1234, help="seed of the shot draw")
    p.add_argument("--max-new-tokens", type=_int_arg(1), default=64)
    p.add_argument("--temperature", type=_float_arg, default=0.0)
    p.add_argument("--top-k", type=_int_arg(0), default=0)
    p.add_argument("--top-p", type=_float_arg, default=1.0)
    p.add_argument("--seed", type=_int_arg(0, 2**32 - 1), default=0)
    p.add_argument("--tokenizer", type=Path, default=None, help="SentencePiece model (default: by vocab)")
    p.add_argument("--dtype", type=_dtype_arg, default="float32")
    p.add_argument("--mesh", type=_mesh_arg, default=None, help="data,fsdp,tensor mesh shape (default: one device)")
    from mistral_jax.runtime import distributed
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mistral_jax.runtime import distributed
    if not distributed.start_or_report(args):
        return 2
    guard = oom.Reporter("python -m infer.evaluate", lambda stage: oom_advice(args, stage))
    with guard.stage("running"):          # the stages below name themselves; this catches the rest
        return _main(args, guard)


def _main(args: argparse.Namespace, guard: oom.Reporter) -> int:
    from mistral_jax.runtime import distributed
    from mistral_jax.evaluation import prompts
    from mistral_jax.inference import scoring
    from mistral_jax.model import sharding
    writer = distributed.is_main()   # with several processes, all score; process 0 writes and reports
    from mistral_jax.data.tokenizer import Tokenizer
    try:
        for d in args.data:
            if not d.is_file():
                raise ev.EvalError(f"--data {d}: not a file")
        inputs = [("--data", d) for d in args.data]
        inputs += [(flag, Path(v)) for flag, v in (("--fewshot-data", args.fewshot_data),
                                                   ("--tokenizer", args.tokenizer)) if v is not None]
        if args.task == "moderate":
            inputs.append(("--moderation-prompt", prompts.prompt_path(args.moderation_prompt)))
        ev.check_inputs_not_written(args.output, inputs, Path(args.checkpoint))
        system = prompts.system_prompt(args.system_prompt, args.safe_prompt)
        if system is not None and args.task not in ev.CHAT_TASKS:
            raise ev.EvalError(f"--system-prompt/--safe-prompt: only for the chat tasks ({', '.join(ev.CHAT_TASKS)}), "
                               f"not {args.task}")
        if args.chat and args.task not in ev.CHAT_TASKS:
            raise ev.EvalError(f"--chat: only for the chat tasks ({', '.join(ev.CHAT_TASKS)}), not {args.task}")
        template = prompts.load_template(args.moderation_prompt) if args.task == "moderate" else ""
        with guard.stage("reading the data"):
            examples = ev.read_examples(args.data, args.task)
        fewshot, fewshot_run = None, {}
        if args.fewshot_data is not None and not args.num_fewshot:
            raise ev.EvalError("--fewshot-data needs --num-fewshot K >= 1")
        if args.num_fewshot:
            if args.task not in ev.FEWSHOT_TASKS:
                raise ev.EvalError(f"--num-fewshot: only for {', '.join(ev.FEWSHOT_TASKS)}, not {args.task}")
            if args.fewshot_data is not None and not args.fewshot_data.is_file():
                raise ev.EvalError(f"--fewshot-data {args.fewshot_data}: not a file")
            src = [args.fewshot_data] if args.fewshot_data is not None else args.data
            pool = ev.fewshot_pool(examples if args.fewshot_data is None else ev.read_examples(src, args.task),
                                   args.task)
            need = args.num_fewshot + (args.fewshot_data is None)
            if len(pool) < need:
                raise ev.EvalError(f"--num-fewshot {args.num_fewshot}: {', '.join(map(str, src))} has {len(pool)} "
                                   f"usable example(s), {need} needed")
            fewshot = ev.FewShot(args.num_fewshot, pool, args.fewshot_seed, args.fewshot_data is None)
            fewshot_run = {"num_fewshot": args.num_fewshot, "fewshot_seed": args.fewshot_seed,
                           "fewshot_data": None if args.fewshot_data is None else str(args.fewshot_data.resolve()),
                           "fewshot_sha256": None if args.fewshot_data is None else ev.file_digest(src)}
        tok = Tokenizer(args.tokenizer) if args.tokenizer is not None else None
        mesh = sharding.make_mesh(*args.mesh) if args.mesh else None
        if mesh is None and jax.process_count() > 1:
            mesh = sharding.make_mesh(1, -1, 1)     # every process's devices
    except (ValueError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2

    from mistral_jax.checkpoint.native import load_params  # heavy imports only after argument and file checks
    from mistral_jax.checkpoint.integrity import checkpoint_identity
    try:
        run = {"task": args.task, "data": [str(d.resolve()) for d in args.data],
               "data_sha256": ev.file_digest(args.data), "checkpoint": str(Path(args.checkpoint).resolve())}
        if Path(args.checkpoint).is_dir():      # else load_params says what is wrong
            run["checkpoint_id"] = checkpoint_identity(args.checkpoint)
        old_run = ev.read_run(args.output) if writer and not args.overwrite and args.output.is_dir() else None
        if old_run is not None:     # refuse another task, data or checkpoint before loading the model
            ev.check_run(args.output / ev.RUN_FILE, old_run, run, keys=run)
        with guard.stage("loading the checkpoint"):
            cfg, params = load_params(args.checkpoint, mesh=mesh, dtype=args.dtype, progress=False)
        if tok is None:
            tok = Tokenizer.for_vocab(cfg.vocab_size)
        tok.check_model_vocab(cfg.vocab_size)
        max_input = args.max_length or cfg.max_seq_len
        if max_input > cfg.max_seq_len:
            raise ev.EvalError(f"--max-length {max_input} exceeds the model's max_seq_len {cfg.max_seq_len}")
        overlap = args.overlap or scoring.default_overlap(cfg, max_input)
        if args.task == "perplexity" and overlap >= max_input:
            if args.overlap is None:
                raise ev.EvalError(f"--max-length {max_input}: too short for perplexity windows, which need more "
                                   f"than the default --overlap of {overlap} token(s); use --max-length "
                                   f"{overlap + 1} or more")
            raise ev.EvalError(f"--overlap {overlap} must be smaller than --max-length {max_input}")
        st = ev.Settings(max_input=max_input, overlap=overlap, batch_size=args.batch_size, delimiter=args.delimiter,
                         chat=args.chat, system_prompt=system, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         token_logprobs=args.token_logprobs, moderation_template=template, fewshot=fewshot)
        run.update(dtype=str(args.dtype), tokenizer=str(tok.path))
        keys = {"perplexity": ("max_input", "overlap", "token_logprobs"),
                "choice": ("max_input", "delimiter"),
                "moderate": ("max_input", "delimiter", "chat", "system_prompt", "moderation_template"),
                "generate": ("chat", "system_prompt", "delimiter", "max_new_tokens", "temperature", "top_k",
                             "top_p", "seed")}[args.task]
        run.update({k: getattr(st, k) for k in keys}, **fewshot_run)
        if writer:
            out = ev.Output(args.output, run, args.overwrite)
        distributed.sync("evaluate-output-ready")   # the others read what process 0 has prepared
        if not writer:
            out = ev.Output(args.output, run, args.overwrite, writer=False)
    except (OSError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2

    todo = out.resume(examples)
    if writer:
        for note in out.notes:
            print(f"note: {note}", file=sys.stderr)
    skipped = len(examples) - len(todo)
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc=args.task, unit="ex", file=sys.stderr, disable=not (todo and writer))
    progress = Progress(bar)
    t0 = progress.start

    try:
        try:
            if args.task == "generate":
                with guard.stage("generating"):
                    ev.run_generate_task(todo, tok, params, cfg, mesh, args.dtype, st, out, progress)
            else:
                with guard.stage(f"scoring ({args.task})"):
                    scorer = scoring.Scorer(params, cfg, mesh=mesh, dtype=args.dtype, batch_size=args.batch_size,
                                            max_input=max_input, smallest_bucket=min(args.smallest_bucket, max_input),
                                            pack=args.pack_length > 0, pack_length=max(args.pack_length, 1))
                    ev.run_scoring_task(args.task, todo, tok, scorer, st, out, progress)
        finally:
            bar.close()
            out.close()
        summary = ev.summarize(args.task, out.rows)
        n_ex, n_tok = progress.examples, progress.tokens
        summary["this_run"] = {**ev.timing(t0, n_ex, n_tok), "examples": n_ex, "tokens": n_tok,
                               "skipped_already_scored": skipped}
        if args.task != "generate":
            summary["this_run"]["buckets"] = sorted(scorer.used_buckets)
            summary["this_run"]["programs"] = sorted(scorer.used_shapes)        # (rows, row length)
            summary["this_run"]["positions_run"] = scorer.positions_run       # padding included
            if args.task == "perplexity":
                summary["rolling_rule"] = {"max_length": max_input, "overlap": overlap}
        out.write_summary(summary)
    except OSError as e:
        print(f"error: writing {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    errors = summary["errors"]
    if not writer:
        return 1 if errors else 0
    print(f"{args.task}: {summary['scored']} example(s) scored, {errors} failed, {skipped} already in "
          f"{args.output / ev.EXAMPLES_FILE}; {n_tok} tokens in {summary['this_run']['seconds']:.2f} s "
          f"({summary['this_run']['tokens_per_s']:.0f} tokens/s, compilation included)", file=sys.stderr)
    for row in out.rows:
        if "error" in row:
            print(f"error: {row['error']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
