"""Benchmark: convert a random Hugging Face bf16 checkpoint (sharded safetensors) to a native checkpoint.

    python bench/bench_convert.py --preset mistral-7b-v0.1 [--layers N] [--dtype bfloat16] [--shard-size 4GB]

Writes the source checkpoint into a temp dir, runs `python -m convert` on it in a subprocess, and
reports the conversion's wall time and peak RSS (getrusage of the child) as a markdown table row.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mistral_jax.torch_write import parse_size, write_safetensors  # noqa: E402
from mistral_jax.config import ModelConfig  # noqa: E402
from mistral_jax.weights import tensor_specs  # noqa: E402


def write_random_hf(dst: Path, cfg: ModelConfig, shard_bytes: int, seed: int = 0) -> int:
    """Writes a sharded bf16 HF checkpoint with random weights (slices of one random pool); returns bytes."""
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1 << 26, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    specs = tensor_specs(cfg, "hf")
    shards: list[list] = [[]]
    size = 0
    for s in specs:
        n = math.prod(s.shape) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((s.key, s.shape, bf16))
        size += n
    shapes = {s.key: s.shape for s in specs}

    def tensor(key: str) -> np.ndarray:
        n = math.prod(shapes[key])
        reps = -(-n // pool.size)
        start = int(rng.integers(0, pool.size))
        flat = np.roll(pool, -start)[:n] if reps == 1 else np.tile(np.roll(pool, -start), reps)[:n]
        return flat.reshape(shapes[key])

    dst.mkdir(parents=True)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, entries in zip(names, shards):
        write_safetensors(dst / name, entries, tensor)
    weight_map = {k: name for name, entries in zip(names, shards) for k, _, _ in entries}
    total = sum(math.prod(s.shape) for s in specs) * 2
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps(cfg.to_hf_config() | {"dtype": "bfloat16"}))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mistral-7b-v0.1")
    p.add_argument("--layers", type=int, default=None, help="override n_layers (to fit time or memory)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--shard-size", default="4GB")
    p.add_argument("--workdir", default=None, help="where to put the temp dir (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args()

    cfg = ModelConfig.preset(args.preset)
    if args.layers is not None:
        cfg = cfg.replace(n_layers=args.layers)
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        src_bytes = write_random_hf(work / "src", cfg, parse_size(args.shard_size))
        write_s = time.perf_counter() - t0
        n_shards = len(list((work / "src").glob("*.safetensors")))
        print(f"wrote {src_bytes / 1e9:.2f} GB in {n_shards} shards in {write_s:.0f}s", file=sys.stderr)
        subprocess.run(["sync"], check=False)
        cmd = [sys.executable, "-m", "convert", str(work / "src"), str(work / "native"),
               "--dtype", args.dtype, "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"conversion failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
        model_bytes = src_bytes * (2 if args.dtype == "float32" else 1)
        out_bytes = sum(f.stat().st_size for f in (work / "native").rglob("*") if f.is_file())
        print("| preset | layers | params | source | to dtype | native size | wall | peak RSS | RSS / model |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| {args.preset} | {cfg.n_layers} | {src_bytes / 2 / 1e9:.2f} B | HF bf16, {n_shards} shards, "
              f"{src_bytes / 1e9:.2f} GB | {args.dtype} | {out_bytes / 1e9:.2f} GB | {wall:.1f} s | "
              f"{peak / 2**30:.2f} GiB | {peak / model_bytes:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
