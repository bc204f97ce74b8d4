"""Forward+backward of one attention layer: blockwise sliding-window vs dense masked, side by side.

    python bench/bench_attention.py [--lengths 4096 8192 16384] [--window 4096] [--heads 4 --kv-heads 1]

For each length T: the jitted grad of sum(attention * cotangent) w.r.t. q, k, v, compiled once per
path; reports the median wall time of a few runs and XLA's temp-buffer size from
`compiled.memory_analysis()` (what the program allocates beyond its arguments and outputs). A
program whose temp buffers exceed 80% of the memory available is compiled (its size is reported)
but not run.
Prints a Markdown table; numbers are for the machine it runs on.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.model.attention import attend, attention_mask
from mistral_jax.model.blockwise import blockwise_attend


def make_fn(kind: str, window: int | None, block: int):
    def loss(q, k, v, pos, ct):
        if kind == "dense":
            out = attend(q, k, v, attention_mask(pos, pos, window))
        else:
            out = blockwise_attend(q, k, v, pos, pos, window, block_q=block, block_k=block, self_attention=True)
        return jnp.sum(out * ct)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def available_mib() -> float:
    """MemAvailable from /proc/meminfo (inf where there is none)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def run(kind: str, T: int, args) -> tuple[float | None, float, float]:
    """(median seconds or None when not run for lack of memory, temp MiB, compile seconds)."""
    r = np.random.default_rng(0)
    B, N, K, H = 1, args.heads, args.kv_heads, args.head_dim
    q = jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(r.normal(size=(B, T, K, H)), jnp.float32)
    v = jnp.asarray(r.normal(size=(B, T, K, H)), jnp.float32)
    ct = jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    fn = make_fn(kind, args.window, args.block)
    t0 = time.perf_counter()
    compiled = fn.lower(q, k, v, pos, ct).compile()
    t_compile = time.perf_counter() - t0
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    if temp > 0.8 * available_mib():
        return None, temp, t_compile
    jax.block_until_ready(compiled(q, k, v, pos, ct))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, pos, ct))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), temp, t_compile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}; B=1 N={args.heads} K={args.kv_heads} H={args.head_dim} W={args.window} "
          f"block={args.block}, float32, fwd+bwd")
    print("| T | dense s | blockwise s | speed-up | dense temp MiB | blockwise temp MiB |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for T in args.lengths:
        b_s, b_mem, _ = run("blockwise", T, args)
        d_s, d_mem, _ = run("dense", T, args)
        if d_s is None:
            print(f"| {T} | not run: needs {d_mem:.0f} MiB, {available_mib():.0f} MiB available | {b_s:.3f} | - | "
                  f"{d_mem:.0f} | {b_mem:.0f} |", flush=True)
            continue
        print(f"| {T} | {d_s:.3f} | {b_s:.3f} | {d_s / b_s:.2f}x | {d_mem:.0f} | {b_mem:.0f} |", flush=True)

if __name__ == "__main__":
    main()
