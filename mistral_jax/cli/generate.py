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
.NAME.*.tmp file behind).

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
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Sequence

import jax

from mistral_jax.inference import decode
from mistral_jax.runtime import distributed
from mistral_jax.runtime import oom
from mistral_jax.model import sharding
from mistral_jax.runtime.files import file_identity
from mistral_jax.runtime.dtypes import parse_dtype
from mistral_jax.errors import first_line
from mistral_jax.data.tokenizer import Tokenizer


_int_arg = distributed.int_in  # an argparse type: an integer in [lo, hi]


def _float_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _mesh_arg(text: str) -> tuple[int, int, int]:
    """--mesh of the infer programs: `sharding.parse_mesh` (D,F,T or data=D,fsdp=F,tensor=T; one axis may be
    -1 for the remaining devices) as an argparse type."""
    try:
        return sharding.parse_mesh(text, allow_rest=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _dtype_arg(text: str) -> Any:
    try:
        return parse_dtype(text, "--dtype")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--dtype: ")) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="native checkpoint dir, or an HF / mistral-inference folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path,
                     help="JSONL file, one {\"prompt\": ...} (or {\"messages\": [...]} with --chat) per line, "
                          "optional \"id\" copied to the output; blank lines are skipped")
    src.add_argument("--prompt", help="a single prompt; the completion is printed")
    p.add_argument("--output", type=Path,
                   help="output JSONL (required with --prompts), one row per non-blank input line; written to a "
                        "temporary file in the same folder and renamed into place when every line is done")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--max-new-tokens", type=_int_arg(1), default=128)
    p.add_argument("--temperature", type=_float_arg, default=0.0,
                   help="0 (the default) is greedy decoding, which on a small or undertrained model tends to "
                        "repeat one token (e.g. rows of dots); the pretrain run's sample uses "
                        "--temperature 0.8 --top-k 40")
    p.add_argument("--top-k", type=_int_arg(0), default=0, help="keep the k most likely tokens; 0 disables")
    p.add_argument("--top-p", type=_float_arg, default=1.0, help="nucleus mass in (0, 1]; 1.0 disables")
    p.add_argument("--seed", type=_int_arg(0, decode.MAX_SEED), default=0,
                   help="sampling seed; line N samples with fold_in(key(seed), N), independent of --batch-size")
    p.add_argument("--batch-size", type=_int_arg(1), default=8)
    p.add_argument("--chat", action="store_true",
                   help="encode prompts as instruct dialogues with mistral-common (v1 or v3, from the tokenizer)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="SentencePiece model; its piece count must equal the model's vocab (default: Mistral v1 "
                        "for vocab 32000, v3 for 32768, from mistral-common)")
    p.add_argument("--dtype", type=_dtype_arg, default="float32",
                   help="compute dtype (float32, bfloat16, float16); params and cache are held in it too")
    p.add_argument("--prefill-chunk", type=_int_arg(1), default=None,
                   help="prefill chunk in tokens (default: the window)")
    p.add_argument("--mesh", type=_mesh_arg, default=None,
                   help="mesh shape as data,fsdp,tensor (e.g. 1,1,8) or data=D,fsdp=F,tensor=T; one axis may be -1 "
                        "for the remaining devices (default: one device)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="a system message before every dialogue (implies --chat)")
    g.add_argument("--safe-prompt", action="store_true",
                   help="the guardrail system prompt (mistral_jax/evaluation/prompt_presets/guardrail.txt) before every dialogue "
                        "(implies --chat)")
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
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()                                        # the file's final newline ends a line
    rows, blank = [], 0
    for n, raw in enumerate(lines, 1):
        where = f"{path}:{n}"
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]                                  # UTF-8 byte order mark
        if not raw.strip():
            blank += 1
            continue
        row: dict[str, Any] = {"line": n}
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            row.update(input=raw.decode("utf-8", "backslashreplace"),
                       error=f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start} of the line)")
            rows.append(row)
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            row.update(input=text.rstrip("\r"), error=f"{where}: not valid JSON ({str(e)[:200]})")
            rows.append(row)
            continue
        if not isinstance(obj, dict):
            row.update(input=obj, error=f"{where}: expected an object with 'prompt' (or 'messages'), got "
                                        f"{type(obj).__name__}")
            rows.append(row)
            continue
        if "id" in obj:
            row["id"] = obj["id"]
        for key in ("prompt", "messages"):
            if key in obj:
                row[key] = obj[key]
        if "prompt" in obj and "messages" in obj:
            row["error"] = f"{where}: give either 'prompt' or 'messages', not both"
        elif "prompt" not in obj and "messages" not in obj:
            row["error"] = f"{where}: expected an object with 'prompt' (or 'messages'), got keys {sorted(obj)[:10]}"
        rows.append(row)
    return rows, blank


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


def _json_line(row: dict[str, Any]) -> bytes:
    text = json.dumps(row, ensure_ascii=False)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:      # a lone surrogate from a "\ud800" escape: keep it escaped
        return (json.dumps(row) + "\n").encode("ascii")


def _open_temp(out: Path) -> tuple[Path, IO[bytes]]:
    """A new temporary file next to `out` (same folder, so the final rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
    return Path(name), os.fdopen(fd, "wb")


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not distributed.start_or_report(args):
        return 2
    guard = oom.Reporter("python -m infer.generate", lambda stage: oom_advice(args, stage))
    with guard.stage("running"):          # the stages below name themselves; this catches the rest
        return _main(args, guard)


def _main(args: argparse.Namespace, guard: oom.Reporter) -> int:
    main_process = distributed.is_main()   # with several processes, all generate; process 0 writes
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
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from mistral_jax.evaluation.prompts import system_prompt
    from mistral_jax.errors import PromptError
    try:
        system = system_prompt(args.system_prompt, args.safe_prompt)
    except PromptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mistral_jax.checkpoint.native import load_params  # heavy imports only after argument and file checks
    try:
        with guard.stage("loading the checkpoint"):
            cfg, params = load_params(args.checkpoint, mesh=mesh, dtype=args.dtype)
        if tok is None:
            tok = Tokenizer.for_vocab(cfg.vocab_size)
        tok.check_model_vocab(cfg.vocab_size)
        if args.chat:
            tok.chat_tokenizer()
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

    tmp, out = _open_temp(args.output) if args.output and main_process else (None, None)
    written, n_tokens, t_gen = 0, 0, 0.0
    done = [("error" in r) for r in rows]

    def flush() -> None:  # write finished rows in input order as soon as they are contiguous
        nonlocal written
        while written < len(rows) and done[written]:
            row = rows[written]
            if not main_process:
                pass
            elif out is not None:
                out.write(_json_line(row))
                out.flush()
            elif "error" in row:
                print(f"error: {row['error']}", file=sys.stderr)
            else:
                print(row["completion"])
            written += 1

    from tqdm import tqdm
    batches = [[runnable[j] for j in b] for b in plan_batches([len(ids) for _, ids in runnable], args.batch_size)]
    programs_before = decode.compiled_programs()
    try:
        try:
            flush()
            for k, batch in enumerate(tqdm(batches, desc="generate", unit="batch", disable=len(batches) < 2,
                                           file=sys.stderr), 1):
                ids = [b[1] for b in batch]
                lines = [rows[i]["line"] for i, _ in batch]
                t0 = time.perf_counter()
                # one batch shape for every batch (filler rows start finished and cost no decode steps)
                stage = f"generating (batch {k} of {len(batches)}, {args.max_new_tokens} new tokens)"
                n_rows = args.batch_size if len(batches) > 1 else len(batch)
                with guard.stage(stage, oom_advice(args, stage, n_rows)):
                    gen = decode.generate(params, cfg, ids, args.max_new_tokens, temperature=args.temperature,
                                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, row_ids=lines,
                                          mesh=mesh, dtype=args.dtype, prefill_chunk=args.prefill_chunk,
                                          eos_id=tok.eos_id, return_info=True,
                                          pad_batch_to=args.batch_size if len(batches) > 1 else None)
                t_gen += time.perf_counter() - t0
                for (i, _), comp, eos in zip(batch, gen.tokens, gen.stopped_on_eos):
                    rows[i].update(completion=tok.decode(comp), completion_ids=comp,
                                   finish_reason="eos" if eos else "length")
                    done[i] = True
                    n_tokens += len(comp) + int(eos)
                flush()
            if out is not None:
                out.close()
                os.replace(tmp, args.output)
            distributed.sync("generate-written")
        except OSError as e:
            print(f"error: writing {args.output or 'stdout'}: {e.strerror or e}", file=sys.stderr)
            return 1
    finally:
        if out is not None and not out.closed:
            out.close()
        if tmp is not None and tmp.exists():
            tmp.unlink()
    n_err = sum("error" in r for r in rows)
    if main_process:
        print(f"generated {n_tokens} tokens for {len(runnable)} prompts in {t_gen:.2f} s "
              f"({n_tokens / max(t_gen, 1e-9):.1f} tokens/s, compilation included; "
              f"{decode.compiled_programs() - programs_before} program(s) compiled); {n_err} line(s) failed; "
              f"{blank} blank line(s) skipped", file=sys.stderr)
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
