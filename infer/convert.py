"""Checkpoint conversion CLI.

    python -m infer.convert SRC DST [--format hf|mistral|native] [--dtype float32|bfloat16] [--rope-theta X]
    python -m infer.convert --to hf|mistral CKPT OUT [--dtype ...] [--max-shard-size 5GB]

The first form writes a native checkpoint; the second exports one (or any readable folder) to a
PyTorch layout. Errors print one line naming the culprit and exit with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mistral_jax.config import ConfigError
from mistral_jax.convert import CheckpointError
from mistral_jax.weights import WeightError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.convert",
                                description="Convert Mistral checkpoints between PyTorch layouts and this library.")
    p.add_argument("src", help="checkpoint folder to read (native, Hugging Face or mistral-inference)")
    p.add_argument("dst", help="folder to write")
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
    p.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> None:
    """Performs the conversion described by parsed CLI arguments."""
    from mistral_jax import checkpoint, convert

    convert.check_dst(args.dst, args.force)  # fail before reading gigabytes
    dtype = args.dtype
    if dtype is None and args.to == "native":
        fmt = args.format or convert.detect_format(args.src)
        dtype = None if fmt == "native" else "float32"
    t0 = time.perf_counter()
    cfg, params, notes = checkpoint.load_params_with_notes(args.src, dtype=dtype, fmt=args.format,
                                                           rope_theta=args.rope_theta, progress=not args.quiet)
    for note in notes:
        print(f"note: {note}")
    if args.to == "native":
        checkpoint.save_params(args.dst, cfg, params, force=args.force)
    elif args.to == "hf":
        convert.write_hf(args.dst, cfg, params, max_shard_size=args.max_shard_size, force=args.force,
                         progress=not args.quiet)
    else:
        convert.write_mistral(args.dst, cfg, params, force=args.force, progress=not args.quiet)
    print(f"wrote {args.to} checkpoint to {args.dst} ({time.perf_counter() - t0:.1f}s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CheckpointError, ConfigError, WeightError, OSError) as e:
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
