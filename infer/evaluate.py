"""Batch offline evaluation: `python -m infer.evaluate --checkpoint CKPT --task TASK --data FILE --output DIR`.

Tasks (inputs):
  perplexity  JSONL with a "text" field per line, or plain text files (one document each). Per document and
              overall: token NLL, perplexity, bits per byte. Documents longer than --max-length tokens are
              scored in windows (the rolling rule of mistral_jax.scoring.rolling_windows): every token is
              scored exactly once, each later window giving its scored tokens at least --overlap tokens of
              context (default: the sliding window, at most half of --max-length).
  choice      JSONL {"context": str, "choices": [str, ...], "label": int}; each choice is scored as
              context + --delimiter + choice by summed and per-byte log-likelihood; accuracies with 95%
              Wilson intervals; per-example log-likelihoods and is_greedy.
  generate    JSONL {"prompt": str} or {"messages": [...]} (chat, mistral-common templates), optional
              "target" for exact match; greedy unless --temperature.
An optional "id" is copied to the example's row.

Output folder: examples.jsonl (one row per example, written as examples finish, with "key" = FILE:LINE and
"line"), summary.json (written at the end), run.json (task, data digest, checkpoint, settings). Rerunning
with the same --output scores only the examples not yet in examples.jsonl (a torn last line from a killed
run is dropped); a rerun with other data or settings is refused unless --overwrite.
Exit status: 0 every example scored, 1 some example failed (its row holds "error": "FILE:LINE: reason"), 2 bad
arguments, files or checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from infer.generate import _dtype_arg, _float_arg, _int_arg, _mesh_arg
from mistral_jax import evaluate as ev
from mistral_jax.errors import first_line

GUARDRAIL_FILE = Path(__file__).resolve().parent.parent / "configs" / "eval" / "guardrail_prompt.txt"


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
    p.add_argument("--delimiter", default=" ", help="choice: text between context and each choice (default ' ')")
    p.add_argument("--token-logprobs", action="store_true", help="perplexity: add per-token log-probs to rows")
    p.add_argument("--chat", action="store_true", help="generate: wrap plain prompts as a user message")
    sp = p.add_mutually_exclusive_group()
    sp.add_argument("--system-prompt", default=None, help="generate: system message for chat prompts")
    sp.add_argument("--safe-prompt", action="store_true",
                    help=f"generate: the paper's guardrail system prompt ({GUARDRAIL_FILE.name} in configs/eval)")
    p.add_argument("--max-new-tokens", type=_int_arg(1), default=64)
    p.add_argument("--temperature", type=_float_arg, default=0.0)
    p.add_argument("--top-k", type=_int_arg(0), default=0)
    p.add_argument("--top-p", type=_float_arg, default=1.0)
    p.add_argument("--seed", type=_int_arg(0, 2**32 - 1), default=0)
    p.add_argument("--tokenizer", type=Path, default=None, help="SentencePiece model (default: by vocab)")
    p.add_argument("--dtype", type=_dtype_arg, default="float32")
    p.add_argument("--mesh", type=_mesh_arg, default=None, help="data,fsdp,tensor mesh shape (default: one device)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mistral_jax import scoring, sharding
    from mistral_jax.tokenizer import Tokenizer
    try:
        for d in args.data:
            if not d.is_file():
                raise ev.EvalError(f"--data {d}: not a file")
        system = args.system_prompt
        if args.safe_prompt:
            system = GUARDRAIL_FILE.read_text().strip()
        examples = ev.read_examples(args.data, args.task)
        tok = Tokenizer(args.tokenizer) if args.tokenizer is not None else None
        mesh = sharding.make_mesh(*args.mesh) if args.mesh else None
    except (ValueError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2

    from mistral_jax.checkpoint import load_params  # heavy imports only after argument and file checks
    try:
        cfg, params = load_params(args.checkpoint, mesh=mesh, dtype=args.dtype, progress=False)
        if tok is None:
            tok = Tokenizer.for_vocab(cfg.vocab_size)
        tok.check_model_vocab(cfg.vocab_size)
        max_input = args.max_length or cfg.max_seq_len
        if max_input > cfg.max_seq_len:
            raise ev.EvalError(f"--max-length {max_input} exceeds the model's max_seq_len {cfg.max_seq_len}")
        overlap = args.overlap or scoring.default_overlap(cfg, max_input)
        if overlap >= max_input:
            raise ev.EvalError(f"--overlap {overlap} must be smaller than --max-length {max_input}")
        st = ev.Settings(max_input=max_input, overlap=overlap, batch_size=args.batch_size, delimiter=args.delimiter,
                         chat=args.chat, system_prompt=system, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         token_logprobs=args.token_logprobs)
        run = {"task": args.task, "data": [str(d.resolve()) for d in args.data],
               "data_sha256": ev.file_digest(args.data), "checkpoint": str(Path(args.checkpoint).resolve()),
               "dtype": str(args.dtype), "tokenizer": str(tok.path)}
        keys = ("max_input", "overlap", "token_logprobs") if args.task == "perplexity" else \
            ("max_input", "delimiter") if args.task == "choice" else \
            ("chat", "system_prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed")
        run.update({k: getattr(st, k) for k in keys})
        out = ev.Output(args.output, run, args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2

    todo = [ex for ex in examples if ex.key not in out.done]
    skipped = len(examples) - len(todo)
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc=args.task, unit="ex", file=sys.stderr, disable=not todo)
    t0, n_ex, n_tok = time.perf_counter(), 0, 0

    def progress(examples_done: int, tokens: int) -> None:
        nonlocal n_ex, n_tok
        n_ex += examples_done
        n_tok += tokens
        bar.update(examples_done)
        bar.set_postfix(tok_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)

    try:
        try:
            if args.task == "generate":
                ev.run_generate_task(todo, tok, params, cfg, mesh, args.dtype, st, out, progress)
            else:
                scorer = scoring.Scorer(params, cfg, mesh=mesh, dtype=args.dtype, batch_size=args.batch_size,
                                        max_input=max_input, smallest_bucket=min(args.smallest_bucket, max_input))
                ev.run_scoring_task(args.task, todo, tok, scorer, st, out, progress)
        finally:
            bar.close()
            out.close()
        summary = ev.summarize(args.task, out.rows)
        summary["this_run"] = {**ev.timing(t0, n_ex, n_tok), "examples": n_ex, "tokens": n_tok,
                               "skipped_already_scored": skipped}
        if args.task != "generate":
            summary["this_run"]["buckets"] = sorted(scorer.used_buckets)
            summary["rolling_rule"] = {"max_length": max_input, "overlap": overlap}
        out.write_summary(summary)
    except OSError as e:
        print(f"error: writing {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    errors = summary["errors"]
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
