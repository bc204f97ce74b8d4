"""Batch offline generation: `python -m infer.generate --checkpoint CKPT --prompts in.jsonl --output out.jsonl`.

Input: JSONL, one {"prompt": str} per line (or {"messages": [{"role", "content"}, ...]} with --chat); an
optional "id" (any JSON value) is copied to that line's output row. The file is read as bytes and decoded
line by line, so a line that is not UTF-8, not JSON or not a valid request spoils only its own row.
Blank lines are skipped: they get no output row and are counted in the summary on stderr; every row
carries "line", its 1-based input line number, so rows stay traceable to input lines.

Output: one JSON row per non-blank input line, in input order: {"line", "id"?, "prompt" | "messages",
"completion", "completion_ids", "finish_reason"} where finish_reason is "eos" (the model ended the answer)
or "length" (max_new_tokens ids, no EOS); a line that cannot be run gets {"line", "id"?, ..., "error":
"in.jsonl:N: reason"} instead, and the other lines are still generated.

Writing: --output is checked before the model is loaded (its folder must exist and be writable, it may not
be the --prompts file, and an existing file is refused unless --overwrite). Rows are written batch by batch
to a temporary file in the same folder, which is renamed onto --output once every line is answered; a run
that is killed or fails to write leaves any previous output untouched (a killed run may leave its hidden
.NAME.*.tmp file behind). --prompt without --output prints the prompt and then its completion on stdout.

Batching: prompts are sorted by token count and cut into batches of --batch-size (similar lengths share a
batch: less padding); the last batch is filled with rows that start finished. Prompt lengths are rounded
up to a few buckets, so a file of many lengths compiles a handful of programs (counted in the summary).
Sampling: greedy by default. Line N draws with its own key fold_in(key(seed), N), so sampled outputs are
reproducible from --seed and do not depend on --batch-size or on the other lines.
Exit status: 0 every line generated, 1 some line failed or the output could not be written, 2 bad
arguments, files or checkpoint, 3 out of memory (host or device, loading, compiling or generating: one line
naming the stage, the bytes requested and available, and what to change).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import tqdm

from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.errors import first_line
from mistral_jax.evaluation.output import json_line
from mistral_jax.evaluation.prompts import system_prompt
from mistral_jax.inference import decode
from mistral_jax.model import sharding
from mistral_jax.runtime import distributed, oom
from mistral_jax.runtime.arg_types import int_in as int_arg  # an argparse type: an integer in [lo, hi]
from mistral_jax.runtime.dtypes import parse_dtype
from mistral_jax.runtime.files import atomic_file, file_identity, jsonl_lines, parse_json_line

PROG = "python -m infer.generate"      # the command name usage and messages show (mistral-jax passes its own)


def float_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def mesh_arg(text: str) -> tuple[int, int, int]:
    """--mesh of the infer programs: `sharding.parse_mesh` (D,F,T or data=D,fsdp=F,tensor=T; one axis may be
    -1 for the remaining devices) as an argparse type."""
    try:
        return sharding.parse_mesh(text, allow_rest=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def dtype_arg(text: str) -> Any:
    try:
        return parse_dtype(text, "--dtype")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--dtype: ")) from None


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="native checkpoint dir, an HF / mistral-inference "
                   "folder, or a Hub id org/name[@revision]")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path,
                     help="JSONL file, one {\"prompt\": ...} (or {\"messages\": [...]} with --chat) per line, "
                          "optional \"id\" copied to the output; blank lines are skipped")
    src.add_argument("--prompt", help="a single prompt; printed followed by its completion (--chat: the answer on "
                                      "the next line)")
    p.add_argument("--output", type=Path,
                   help="output JSONL (required with --prompts), one row per non-blank input line; written to a "
                        "temporary file in the same folder and renamed into place when every line is done")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--max-new-tokens", type=int_arg(1), default=128)
    p.add_argument("--temperature", type=float_arg, default=0.0,
                   help="0 (the default) is greedy decoding, which on a small or undertrained model tends to "
                        "repeat one token (e.g. rows of dots); the pretrain run's sample uses "
                        "--temperature 0.8 --top-k 40")
    p.add_argument("--top-k", type=int_arg(0), default=0, help="keep the k most likely tokens; 0 disables")
    p.add_argument("--top-p", type=float_arg, default=1.0, help="nucleus mass in (0, 1]; 1.0 disables")
    p.add_argument("--seed", type=int_arg(0, decode.MAX_SEED), default=0,
                   help="sampling seed; line N samples with fold_in(key(seed), N), independent of --batch-size")
    p.add_argument("--batch-size", type=int_arg(1), default=8)
    p.add_argument("--chat", action="store_true",
                   help="encode prompts as instruct dialogues with mistral-common (v1 or v3, from the tokenizer)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="SentencePiece model; its piece count must equal the model's vocab (default: Mistral v1 "
                        "for vocab 32000, v3 for 32768, from mistral-common)")
    p.add_argument("--dtype", type=dtype_arg, default="float32",
                   help="compute dtype (float32, bfloat16, float16); params and cache are held in it too")
    p.add_argument("--prefill-chunk", type=int_arg(1), default=None,
                   help="prefill chunk in tokens (default: the window)")
    p.add_argument("--mesh", type=mesh_arg, default=None,
                   help="mesh shape as data,fsdp,tensor (e.g. 1,1,8) or data=D,fsdp=F,tensor=T; one axis may be -1 "
                        "for the remaining devices (default: one device)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="a system message before every dialogue (implies --chat)")
    g.add_argument("--safe-prompt", action="store_true",
                   help="the guardrail system prompt (mistral_jax/evaluation/prompt_presets/guardrail.txt) before "
                        "every dialogue (implies --chat)")
    distributed.add_arguments(p)
    args = p.parse_args(argv)
    if args.system_prompt is not None or args.safe_prompt:
        args.chat = True
    if args.prompts is not None and args.output is None:
        p.error("--output is required with --prompts")
    try:
        decode.SamplingConfig(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        p.error(str(e))
    return args


def check_output(out: Path, prompts: Path | None, overwrite: bool) -> None:
    """Raises ValueError (one line) unless `out` can be written: folder exists and is writable, not the input."""
    parent = out.resolve().parent
    if out.is_dir():
        raise ValueError(f"--output {out}: is a folder")
    if not parent.is_dir():
        raise ValueError(f"--output {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {out}: folder {parent} is not writable")
    if prompts is not None and file_identity(out) == file_identity(prompts):
        raise ValueError(f"--output {out} is the --prompts file; it would be overwritten")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ValueError(f"--output {out} exists; pass --overwrite to replace it")


def read_requests(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(rows, number of blank lines): one row per non-blank line, {"line", "id"?, "prompt"|"messages"} or
    {"line", ..., "error": "PATH:N: reason"}. Raises ValueError if the file cannot be read at all."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"--prompts {path}: cannot read ({e.strerror or e})") from None
    rows = [_request_row(n, raw, f"{path}:{n}") for n, raw in jsonl_lines(data)]
    lines = data.split(b"\n")
    n_lines = len(lines) - (lines[-1] == b"")                 # the file's final newline ends a line
    return rows, n_lines - len(rows)


def _request_row(n: int, raw: bytes, where: str) -> dict[str, Any]:
    """The request row of input line n (its raw bytes): the fields to generate from, or an "error"."""
    row: dict[str, Any] = {"line": n}
    obj, why = parse_json_line(raw)
    if why is not None:
        row.update(input=raw.decode("utf-8", "backslashreplace").rstrip("\r"), error=f"{where}: {why}")
        return row
    if not isinstance(obj, dict):
        row.update(input=obj, error=f"{where}: expected an object with 'prompt' (or 'messages'), got "
                                    f"{type(obj).__name__}")
        return row
    if "id" in obj:
        row["id"] = obj["id"]
    for key in ("prompt", "messages"):
        if key in obj:
            row[key] = obj[key]
    if "prompt" in obj and "messages" in obj:
        row["error"] = f"{where}: give either 'prompt' or 'messages', not both"
    elif "prompt" not in obj and "messages" not in obj:
        row["error"] = f"{where}: expected an object with 'prompt' (or 'messages'), got keys {sorted(obj)[:10]}"
    return row


def encode(row: dict[str, Any], tok: Tokenizer, chat: bool, system: str | None = None) -> list[int]:
    """Prompt ids of one request row; raises ValueError with a one-line reason. `system` (chat only) is a
    system message put before the dialogue."""
    head = [{"role": "system", "content": system}] if system is not None else []
    if "messages" in row:
        if not chat:
            raise ValueError("'messages' given without --chat")
        msgs = row["messages"]
        if head and isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
            raise ValueError("the dialogue has its own system message; --system-prompt/--safe-prompt would add a "
                             "second one")
        return tok.encode_chat(head + msgs if isinstance(msgs, list) else msgs)
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("empty prompt")
    return tok.encode_chat(head + [{"role": "user", "content": prompt}]) if chat else tok.encode(prompt, bos=True)


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of indices into `lengths`: prompts sorted by length (ties in input order), cut into batches of
    batch_size, so a batch holds prompts of similar length (less padding, fewer length buckets per batch)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"plan_batches: batch_size must be an integer >= 1, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def oom_advice(args: argparse.Namespace, stage: str = "", rows: int | None = None) -> list[str]:
    """What to change when an infer program (generate, evaluate, lm_eval) runs out of memory at `stage`:
    --dtype bfloat16, a smaller --batch-size (`rows`: the rows of the batch that failed, default
    --batch-size), fewer --max-new-tokens (generating) or a smaller --max-length (scoring), a larger --mesh.
    Loading the checkpoint needs no smaller batch."""
    advice = []
    if str(getattr(args, "dtype", "")) == "float32":
        advice.append("--dtype bfloat16")
    rows = getattr(args, "batch_size", 1) if rows is None else rows
    if not stage.startswith(("loading", "reading")) and rows > 1:
        advice.append(f"a smaller --batch-size (now {rows} rows)")
    if stage.startswith("generating") and getattr(args, "max_new_tokens", 1) > 1:
        advice.append(f"fewer --max-new-tokens (now {args.max_new_tokens}; the cache holds prompt and answer)")
    if stage.startswith(("scoring", "evaluating")) and hasattr(args, "max_length"):
        advice.append("a smaller --max-length (the longest rows scored)")
    n = jax.device_count() if "jax" in sys.modules else 1
    mesh = getattr(args, "mesh", None)
    if mesh is None and n > 1:
        advice.append(f"a larger mesh (--mesh 1,-1,1 shards over all {n} devices)")
    elif mesh is not None and -1 not in mesh and math.prod(mesh) < n:
        advice.append(f"a larger mesh (--mesh uses {math.prod(mesh)} of {n} devices)")
    else:
        advice.append("a larger mesh (--mesh over more devices)")
    return advice


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Runs the program on argv (default: sys.argv[1:]) as the command `prog`; returns the exit status."""
    args = parse_args(argv, prog)
    if not distributed.start_or_report(args):
        return 2
    guard = oom.Reporter(prog, lambda stage: oom_advice(args, stage))
    with guard.stage("running"):          # the stages below name themselves; this catches the rest
        return _main(args, guard)


def _main(args: argparse.Namespace, guard: oom.Reporter) -> int:
    try:
        if args.output is not None:
            check_output(args.output, args.prompts, args.overwrite)
        if args.prompt is not None:
            rows, blank, where = [{"line": 1, "prompt": args.prompt}], 0, "--prompt"
        else:
            with guard.stage("reading the prompts"):
                rows, blank = read_requests(args.prompts)
            where = str(args.prompts)
        tok = Tokenizer(args.tokenizer) if args.tokenizer is not None else None
        mesh = sharding.make_mesh(*args.mesh) if args.mesh else None
        if mesh is None and jax.process_count() > 1:
            mesh = sharding.make_mesh(1, -1, 1)     # every process's devices
        system = system_prompt(args.system_prompt, args.safe_prompt)
    except ValueError as e:             # PromptError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cfg, params, tok = _load(args, guard, tok, mesh)
    except (OSError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    runnable: list[tuple[int, list[int]]] = []          # (index into rows, prompt ids)
    for i, row in enumerate(rows):
        if "error" in row:
            continue
        try:
            ids = encode(row, tok, args.chat, system)
            decode.check_prompt(ids, cfg, args.max_new_tokens)
            runnable.append((i, ids))
        except ValueError as e:
            row["error"] = f"{where}:{row['line']}: {e}" if args.prompts else f"{where}: {e}"
    return _generate_rows(args, guard, rows, blank, runnable, (cfg, params, tok, mesh))


def _load(args: argparse.Namespace, guard: oom.Reporter, tok: Tokenizer | None,
          mesh: Any) -> tuple[Any, Any, Tokenizer]:
    """(model config, params, tokenizer) of --checkpoint; the tokenizer checked against the model's vocab."""
    from mistral_jax.checkpoint.native import load_params  # start-up time: loaded after argument and file checks
    with guard.stage("loading the checkpoint"):
        cfg, params = load_params(args.checkpoint, mesh=mesh, dtype=args.dtype)
    if tok is None:
        tok = Tokenizer.for_vocab(cfg.vocab_size)
    tok.check_model_vocab(cfg.vocab_size)
    if args.chat:
        tok.chat_tokenizer()
    return cfg, params, tok


class _InOrder:
    """Writes finished rows in input order as soon as they are contiguous: JSONL lines to `out`, or without
    an output file each completion on stdout (an error on stderr). Only the main process writes."""

    def __init__(self, rows: list[dict[str, Any]], out: Any, writer: bool,
                 show: Callable[[int, dict[str, Any]], str] | None = None):
        """show(i, row): what stdout shows of finished row i (default: its completion)."""
        self.rows, self.out, self.writer = rows, out, writer
        self.show = show or (lambda i, row: row["completion"])
        self.done = [("error" in r) for r in rows]
        self.written = 0

    def flush(self) -> None:
        while self.written < len(self.rows) and self.done[self.written]:
            row = self.rows[self.written]
            if not self.writer:
                pass
            elif self.out is not None:
                self.out.write(json_line(row))
                self.out.flush()
            elif "error" in row:
                print(f"error: {row['error']}", file=sys.stderr)
            else:
                print(self.show(self.written, row))
            self.written += 1


def shown_with_prompt(chat: bool, tok: Tokenizer, prompt_ids: dict[int, list[int]]) -> Callable[..., str]:
    """show(i, row) for `_InOrder`: the prompt, then the completion: on the next line (chat), or the text the
    completion's ids decode to after the prompt's (plain; keeps the space SentencePiece drops from a first piece)."""
    def show(i: int, row: dict[str, Any]) -> str:
        if chat:
            return f"{row['prompt']}\n{row['completion']}"
        head, full = tok.decode(prompt_ids[i]), tok.decode(prompt_ids[i] + row["completion_ids"])
        return row["prompt"] + (full[len(head):] if full.startswith(head) else row["completion"])
    return show


def _generate_rows(args: argparse.Namespace, guard: oom.Reporter, rows: list[dict[str, Any]], blank: int,
                   runnable: list[tuple[int, list[int]]], model: tuple[Any, Any, Tokenizer, Any]) -> int:
    """Generates the runnable rows batch by batch and writes every row (--output: atomically); the exit status."""
    main_process = distributed.is_main()   # with several processes, all generate; process 0 writes
    batches = [[runnable[j] for j in b] for b in plan_batches([len(ids) for _, ids in runnable], args.batch_size)]
    programs_before = decode.compiled_programs()
    try:
        to_file = args.output is not None and main_process
        with atomic_file(args.output, "wb") if to_file else contextlib.nullcontext() as out:
            show = shown_with_prompt(args.chat, model[2], dict(runnable)) if args.prompt is not None else None
            n_tokens, t_gen = _run_batches(args, guard, batches, _InOrder(rows, out, main_process, show), model)
        distributed.sync("generate-written")
    except OSError as e:
        print(f"error: writing {args.output or 'stdout'}: {e.strerror or e}", file=sys.stderr)
        return 1
    n_err = sum("error" in r for r in rows)
    if main_process:
        print(f"generated {n_tokens} tokens for {len(runnable)} prompts in {t_gen:.2f} s "
              f"({n_tokens / max(t_gen, 1e-9):.1f} tokens/s, compilation included; "
              f"{decode.compiled_programs() - programs_before} program(s) compiled); {n_err} line(s) failed; "
              f"{blank} blank line(s) skipped", file=sys.stderr)
    return 1 if n_err else 0


def _run_batches(args: argparse.Namespace, guard: oom.Reporter, batches: list[list[tuple[int, list[int]]]],
                 writer: _InOrder, model: tuple[Any, Any, Tokenizer, Any]) -> tuple[int, float]:
    """Runs `batches` of (row index, prompt ids), filling in the rows' completions; (tokens generated, seconds)."""
    cfg, params, tok, mesh = model
    rows, n_tokens, t_gen = writer.rows, 0, 0.0
    writer.flush()
    for k, batch in enumerate(tqdm.tqdm(batches, desc="generate", unit="batch", disable=len(batches) < 2,
                                   file=sys.stderr), 1):
        t0 = time.perf_counter()
        # one batch shape for every batch (filler rows start finished and cost no decode steps)
        stage = f"generating (batch {k} of {len(batches)}, {args.max_new_tokens} new tokens)"
        n_rows = args.batch_size if len(batches) > 1 else len(batch)
        with guard.stage(stage, oom_advice(args, stage, n_rows)):
            gen = decode.generate(params, cfg, [ids for _, ids in batch], args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                  row_ids=[rows[i]["line"] for i, _ in batch], mesh=mesh, dtype=args.dtype,
                                  prefill_chunk=args.prefill_chunk, eos_id=tok.eos_id, return_info=True,
                                  pad_batch_to=args.batch_size if len(batches) > 1 else None)
        t_gen += time.perf_counter() - t0
        for (i, _), comp, eos in zip(batch, gen.tokens, gen.stopped_on_eos):
            rows[i].update(completion=tok.decode(comp), completion_ids=comp, finish_reason="eos" if eos else "length")
            writer.done[i] = True
            n_tokens += len(comp) + int(eos)
        writer.flush()
    return n_tokens, t_gen


if __name__ == "__main__":
    sys.exit(main())
