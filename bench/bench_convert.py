"""Benchmark: convert a random Hugging Face bf16 checkpoint (sharded safetensors) to a native checkpoint.

    python bench/bench_convert.py --preset mistral-7b-v0.1 [--layers N] [--dtype bfloat16] [--shard-size 4GB]
        [--baseline DIR] [--repeat N]

Writes the source checkpoint into a temp dir, runs `python -m infer.convert` on it in a subprocess, and
reports the conversion's wall time and peak RSS (read from the OS for that child alone) as markdown
table rows. `--baseline DIR` also converts the same source with the checkout in DIR (e.g. `git archive
HEAD | tar -x -C DIR`), alternating with this one, and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

from mistral_jax.checkpoint.torch_write import parse_size, write_safetensors  # noqa: E402
from mistral_jax.model.config import ModelConfig  # noqa: E402
from mistral_jax.checkpoint.weights import tensor_specs  # noqa: E402


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


def convert_once(root: Path, src: Path, dst: Path, dtype: str) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `python -m infer.convert SRC DST` run from the checkout `root`."""
    shutil.rmtree(dst, ignore_errors=True)
    module = "infer.convert" if (root / "infer" / "convert.py").is_file() else "convert"   # older checkouts
    cmd = [sys.executable, "-c", "import resource, runpy, sys; sys.argv[0] = 'convert'; "
           f"code = 0\ntry: runpy.run_module('{module}', run_name='__main__')\n"
           "except SystemExit as e: code = e.code or 0\n"
           "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
           "sys.exit(code)",
           str(src), str(dst), "--dtype", dtype, "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(root)}  # this checkout's packages before the installed ones
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"conversion from {root} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    peak = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KIB")]
    return wall, peak[-1] * 1024  # Linux: KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mistral-7b-v0.1")
    p.add_argument("--layers", type=int, default=None, help="override n_layers (to fit time or memory)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--shard-size", default="4GB")
    p.add_argument("--workdir", default=None, help="where to put the temp dir (default: system temp)")
    p.add_argument("--baseline", default=None, help="another checkout to convert the same source with")
    p.add_argument("--repeat", type=int, default=1, help="conversions per checkout (best wall, max RSS kept)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args()

    cfg = ModelConfig.preset(args.preset)
    if args.layers is not None:
        cfg = cfg.replace(n_layers=args.layers)
    roots = {"this checkout": ROOT}
    if args.baseline:
        baseline = Path(args.baseline).resolve()
        if not any((baseline / f).is_file() for f in ("infer/convert.py", "convert/__main__.py")):
            sys.exit(f"--baseline {baseline}: not a checkout (no infer/convert.py or convert/__main__.py)")
        roots = {"baseline": baseline, **roots}
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        src_bytes = write_random_hf(work / "src", cfg, parse_size(args.shard_size))
        write_s = time.perf_counter() - t0
        n_shards = len(list((work / "src").glob("*.safetensors")))
        print(f"wrote {src_bytes / 1e9:.2f} GB in {n_shards} shards in {write_s:.0f}s", file=sys.stderr)
        subprocess.run(["sync"], check=False)
        model_bytes = src_bytes * (2 if args.dtype == "float32" else 1)
        results: dict[str, tuple[float, int]] = {}
        for _ in range(args.repeat):
            for name, root in roots.items():  # alternating, so both see the same machine load
                wall, peak = convert_once(root, work / "src", work / "native", args.dtype)
                best = results.get(name, (math.inf, 0))
                results[name] = (min(best[0], wall), max(best[1], peak))
                print(f"{name}: {wall:.1f} s, {peak / 2**30:.2f} GiB", file=sys.stderr)
        out_bytes = sum(f.stat().st_size for f in (work / "native").rglob("*") if f.is_file())
        print("| code | preset | layers | params | source | to dtype | native size | wall | peak RSS | RSS / model |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, (wall, peak) in results.items():
            print(f"| {name} | {args.preset} | {cfg.n_layers} | {src_bytes / 2 / 1e9:.2f} B | HF bf16, {n_shards} "
                  f"shards, {src_bytes / 1e9:.2f} GB | {args.dtype} | {out_bytes / 1e9:.2f} GB | {wall:.1f} s | "
                  f"{peak / 2**30:.2f} GiB | {peak / model_bytes:.2f} |")
        if len(results) == 2:
            (w0, p0), (w1, p1) = results["baseline"], results["this checkout"]
            print(f"\nthis checkout / baseline: wall {w1 / w0:.2f}x, peak RSS {p1 / p0:.2f}x")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
