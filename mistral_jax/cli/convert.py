"""Checkpoint conversion CLI.

    mistral-jax convert SRC DST [--format hf|mistral|native] [--dtype float32|bfloat16|float16] [--rope-theta X]
    mistral-jax convert --to hf|mistral CKPT OUT [--dtype ...] [--max-shard-size 5GB] [--tokenizer PATH|none]

The first form writes a native checkpoint; the second exports one (or any readable folder) to a
PyTorch layout; `--adapter PEFT_DIR` merges a PEFT LoRA adapter into the weights on the way. A native SRC
is verified against its checksums.json (params and config.json); `--no-verify` skips that, e.g. to adopt
a deliberate edit of its config.json into DST's fresh checksums.
Errors print one line naming the culprit and exit with status 1; running out of memory prints one line naming
the stage, the bytes requested and available, and what to change, and exits with status 3.
(`python -m infer.convert` runs the same program from a checkout.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mistral_jax.errors import CheckpointError, ConfigError, DtypeError, WeightError
from mistral_jax.runtime import oom

PROG = "python -m infer.convert"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The program's arguments; `prog` is the command name its usage and messages show."""
    p = argparse.ArgumentParser(prog=prog,
                                description="Convert Mistral checkpoints between PyTorch layouts and this library.",
                                epilog="exit status: 0 converted, 1 error (one line naming the culprit), 2 bad "
                                       "arguments, 3 out of memory (one line naming the stage, the bytes requested "
                                       "and available, and what to change)")
    p.add_argument("src", help="checkpoint folder to read (native, Hugging Face or mistral-inference), or a "
                   "Hugging Face Hub id org/name[@revision]")
    p.add_argument("dst", help="folder to write (a symlink is written through)")
    p.add_argument("--to", choices=("native", "hf", "mistral"), default="native",
                   help="output layout (default: native)")
    p.add_argument("--format", choices=("native", "hf", "mistral"), default=None,
                   help="input layout (default: auto-detect)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype to write (default: native input keeps its dtype, else float32 "
                        "for --to native and the stored dtype for exports)")
    p.add_argument("--rope-theta", type=float, default=None,
                   help="override rope_theta (needed for a params.json without rope_theta or window)")
    p.add_argument("--max-shard-size", default="5GB", help="largest Hugging Face shard (default 5GB)")
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece model to ship with --to hf/mistral (default: mistral-common's v1 model for "
                        "vocab 32000, v3 for 32768, none otherwise; 'none' writes no tokenizer)")
    p.add_argument("--adapter", default=None, metavar="PEFT_DIR",
                   help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to merge into "
                        "SRC's weights before writing DST")
    p.add_argument("--no-verify", action="store_true",
                   help="read a native SRC without checking its checksums (params and config.json), e.g. to adopt a "
                        "deliberate edit of its config.json; DST gets fresh checksums")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="accept NaN/inf weights and values past the output dtype's range (default: refuse)")
    p.add_argument("--force", action="store_true",
                   help="replace DST if it is an existing checkpoint folder (never other non-empty folders)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def oom_advice(args: argparse.Namespace) -> list[str]:
    """What shrinks a conversion: 16-bit params (the whole model is held in host memory once)."""
    if args.dtype in ("bfloat16", "float16"):
        return ["more free host memory (the params are held in host memory once, in --dtype)"]
    return ["--dtype bfloat16 (half the host memory of float32)",
            "more free host memory (the params are held in host memory once)"]


def run(args: argparse.Namespace, prog: str = PROG) -> None:
    """Performs the conversion described by parsed CLI arguments; out of memory exits (status 3) with one
    line on stderr naming `prog`."""
    from mistral_jax.checkpoint import native as checkpoint
    from mistral_jax.checkpoint import torch_write
    from mistral_jax.checkpoint.atomic import check_dst
    from mistral_jax.checkpoint.formats import detect_format
    from mistral_jax.checkpoint.hub import resolve_checkpoint
    from mistral_jax.checkpoint.peft import merge_peft_adapter

    check_dst(args.dst, args.force, src=args.src)  # fail before reading (or downloading) gigabytes
    args.src = str(resolve_checkpoint(args.src))
    dtype = args.dtype
    if dtype is None and args.to == "native":
        fmt = args.format or detect_format(args.src)
        dtype = None if fmt == "native" else "float32"
    t0 = time.perf_counter()
    guard = oom.Reporter(prog, oom_advice(args))
    with guard.stage(f"reading {args.src}"):
        cfg, params, notes = checkpoint.load_params_with_notes(args.src, dtype=dtype, fmt=args.format,
                                                               rope_theta=args.rope_theta, progress=not args.quiet,
                                                               allow_nonfinite=args.allow_nonfinite,
                                                               verify=not args.no_verify)
    for note in notes:
        print(f"note: {note}")
    if args.adapter is not None:
        with guard.stage(f"merging the adapter {args.adapter}"):
            params = merge_peft_adapter(params, cfg, args.adapter, in_place=True)
    if args.to == "native":
        with guard.stage(f"writing {args.dst}"):
            checkpoint.save_params(args.dst, cfg, params, force=args.force)
    else:
        if args.tokenizer is None:
            tokenizer = torch_write.tokenizer_for_vocab(cfg.vocab_size)
            if tokenizer is None:
                print(f"note: no known tokenizer for vocab {cfg.vocab_size}; no tokenizer files written "
                      "(pass --tokenizer PATH)")
        else:
            tokenizer = None if args.tokenizer.lower() == "none" else args.tokenizer
        write = torch_write.write_hf if args.to == "hf" else torch_write.write_mistral
        kw = {"max_shard_size": args.max_shard_size} if args.to == "hf" else {}
        with guard.stage(f"writing {args.dst}"):
            write(args.dst, cfg, params, dtype=args.dtype, force=args.force, progress=not args.quiet,
                  tokenizer=tokenizer, allow_nonfinite=args.allow_nonfinite, **kw)
    print(f"wrote {args.to} checkpoint to {args.dst} ({time.perf_counter() - t0:.1f}s)")


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Runs the CLI on `argv` (default: sys.argv[1:]) as the command `prog`; returns the exit status (0 ok,
    1 error reported on one line); out of memory exits with status 3 (`oom.EXIT_CODE`) after its one line."""
    args = build_parser(prog).parse_args(argv)
    try:
        with oom.Reporter(prog, oom_advice(args)).stage("converting"):   # run() names its own stages
            run(args, prog)
    except (CheckpointError, ConfigError, WeightError, DtypeError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI promises one line, not a traceback
        if os.environ.get("MISTRAL_JAX_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__}: {' '.join(str(e).split())} "
              "(set MISTRAL_JAX_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
