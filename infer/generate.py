"""Batch offline generation: `python -m infer.generate --checkpoint CKPT --prompts in.jsonl --output out.jsonl`.

Input lines are {"prompt": "..."} (or {"messages": [...]} with --chat). Output lines carry prompt,
completion, completion_ids and finish_reason; a prompt that cannot be run gets an "error" field
instead, and the others are still generated. Results are written batch by batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jax.numpy as jnp
from tqdm import tqdm

from mistral_jax import decode, sharding
from mistral_jax.tokenizer import Tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="native checkpoint dir, or an HF / mistral-inference folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="JSONL file with one {\"prompt\": ...} per line")
    src.add_argument("--prompt", help="a single prompt; the completion is printed")
    p.add_argument("--output", type=Path, help="output JSONL (required with --prompts)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 disables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the Mistral v1 instruct format")
    p.add_argument("--tokenizer", type=Path, default=None, help="SentencePiece model (default: Mistral v1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype; params and cache are held in it too")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill chunk (default: the window)")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor mesh shape, e.g. 1,1,8 (default: one device)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prompts is not None and args.output is None:
        p.error("--output is required with --prompts")
    try:
        decode.SamplingConfig(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        p.error(str(e))
    return args


def read_requests(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Yields {"prompt" or "messages": ...} dicts, or {"error": ...} for malformed lines."""
    if args.prompt is not None:
        yield {"prompt": args.prompt}
        return
    if not args.prompts.is_file():
        raise FileNotFoundError(f"prompts file not found: {args.prompts}")
    with open(args.prompts) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield {"error": f"{args.prompts}:{n}: not valid JSON ({e})", "prompt": line.rstrip("\n")}
                continue
            if not isinstance(obj, dict) or not ({"prompt", "messages"} & set(obj)):
                yield {"error": f"{args.prompts}:{n}: expected an object with 'prompt' (or 'messages')",
                       "prompt": obj}
                continue
            yield obj


def encode(req: dict[str, Any], tok: Tokenizer, chat: bool) -> list[int]:
    if "messages" in req:
        if not chat:
            raise ValueError("'messages' given without --chat")
        return tok.encode_chat(req["messages"])
    prompt = req["prompt"]
    if not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("empty prompt")
    return tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt, bos=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mistral_jax.checkpoint import load_params  # heavy imports only after argument checks

    mesh = None
    if args.mesh:
        try:
            data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
            mesh = sharding.make_mesh(data, fsdp, tensor)
        except ValueError as e:
            print(f"error: --mesh {args.mesh!r}: {e}", file=sys.stderr)
            return 2
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    try:
        cfg, params = load_params(args.checkpoint, mesh=mesh, dtype=dtype)
        tok = Tokenizer(args.tokenizer)
        requests = list(read_requests(args))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tok.vocab_size > cfg.vocab_size:
        print(f"error: tokenizer {tok.path} has {tok.vocab_size} pieces, the model's vocab is {cfg.vocab_size}",
              file=sys.stderr)
        return 2

    results: list[dict[str, Any] | None] = [None] * len(requests)
    runnable: list[tuple[int, list[int]]] = []
    for i, req in enumerate(requests):
        if "error" in req:
            results[i] = req
            continue
        try:
            ids = encode(req, tok, args.chat)
            decode.check_prompt(ids, cfg, args.max_new_tokens, index=i)
            runnable.append((i, ids))
        except ValueError as e:
            results[i] = {"prompt": req.get("prompt", req.get("messages")), "error": f"prompt {i}: {e}"}

    out = open(args.output, "w") if args.output else None
    written = 0

    def flush() -> None:  # write finished results in input order as soon as they are contiguous
        nonlocal written
        while written < len(results) and results[written] is not None:
            if out:
                out.write(json.dumps(results[written], ensure_ascii=False) + "\n")
                out.flush()
            elif "error" in results[written]:
                print(f"error: {results[written]['error']}", file=sys.stderr)
            else:
                print(results[written]["completion"])
            written += 1

    n_tokens, t_gen = 0, 0.0
    batches = [runnable[i:i + args.batch_size] for i in range(0, len(runnable), args.batch_size)]
    try:
        for batch in tqdm(batches, desc="generate", unit="batch", disable=len(batches) < 2, file=sys.stderr):
            ids = [b[1] for b in batch]
            ids += [ids[-1]] * (args.batch_size - len(ids)) if len(batches) > 1 else []  # one shape: one compile
            t0 = time.perf_counter()
            gen = decode.generate(params, cfg, ids, args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, mesh=mesh, dtype=dtype,
                                  prefill_chunk=args.prefill_chunk, eos_id=tok.eos_id, return_info=True)
            t_gen += time.perf_counter() - t0
            for (i, _), comp, eos in zip(batch, gen.tokens, gen.stopped_on_eos):
                req = requests[i]
                results[i] = {"prompt": req.get("prompt", req.get("messages")), "completion": tok.decode(comp),
                              "completion_ids": comp, "finish_reason": "eos" if eos else "length"}
                n_tokens += len(comp) + int(eos)
            flush()
        flush()
    finally:
        if out:
            out.close()
    n_err = sum(1 for r in results if r is not None and "error" in r)
    print(f"generated {n_tokens} tokens for {len(runnable)} prompts in {t_gen:.2f} s "
          f"({n_tokens / max(t_gen, 1e-9):.1f} tokens/s, compilation included); {n_err} prompt(s) failed",
          file=sys.stderr)
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
