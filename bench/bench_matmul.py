"""The train step's matmuls alone, in JAX (XLA:CPU) and in PyTorch (its CPU BLAS), side by side.

    python bench/bench_matmul.py [--tokens 4096 --repeats 5 --dtype float32]

Shapes are those of bench_train.py's step (57M config: dim 512, 8 q / 2 kv heads of 64, hidden 1536,
vocab 32000; --tokens = batch x seq = 8 x 512), with Flax's kernel layout W (in, out):

    forward   Y  = X @ W        (M x K) @ (K x N)     "NN"
    backward  dX = dY @ W^T     W stored (K x N) = (N' x K') as the transposed operand      "NT"
    backward  dW = X^T @ dY     X stored (M x K), contracted over its first axis            "TN"

Both sides see the same stored arrays (the same numpy data; torch.from_numpy, jax.device_put) and the
transposes are expressed the same way: in torch `a @ b.t()` / `a.t() @ b` on the stored tensors (no copy;
BLAS transposition flags), in JAX `jax.jit` of `a @ b.T` / `a.T @ b` (XLA picks dot dimension numbers and
may or may not insert a physical transpose: that is part of what is measured). Each round times JAX once
and torch once (alternating, so machine load drifts hit both alike); the median of --repeats rounds after
one untimed call of each. Threads: torch.set_num_threads(os.cpu_count()); XLA:CPU uses all cores.

The table gives ms, GFLOP/s (2 M K N / t) and JAX / torch throughput. The last rows weight each matmul by
how often one train step runs it (8 layers x q, k, v, o, w1, w2, w3, plus the LM head; each in its
forward, dX and dW form; attention's own batched products are not included) to give the seconds one
step spends in these matmuls with each library: the part of a JAX/torch step-time gap that XLA:CPU's
dense matmuls alone explain.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np


def shapes(tokens: int, dim: int = 512, q: int = 512, kv: int = 128, hidden: int = 1536, vocab: int = 32000,
           layers: int = 8) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, count per step) of the forward product Y (M x N) = X (M x K) @ W (K x N)."""
    return [("wq / wo", tokens, dim, q, 2 * layers),
            ("wk / wv", tokens, dim, kv, 2 * layers),
            ("w1 / w3 (gate, up)", tokens, dim, hidden, 2 * layers),
            ("w2 (down)", tokens, hidden, dim, layers),
            ("LM head", tokens, dim, vocab, 1)]


def operands(kind: str, M: int, K: int, N: int, rng) -> tuple[np.ndarray, np.ndarray, int]:
    """Stored arrays for one of the three products of Y = X @ W, and its FLOPs.

    NN: X (M x K) @ W (K x N).  NT: dY (M x N) @ W^T, W stored (K x N) -> (M x K).
    TN: X^T @ dY, X stored (M x K), dY (M x N) -> (K x N).
    """
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    if kind == "NN":
        return f(M, K), f(K, N), 2 * M * K * N
    if kind == "NT":
        return f(M, N), f(K, N), 2 * M * K * N
    if kind == "TN":
        return f(M, K), f(M, N), 2 * M * K * N
    raise ValueError(kind)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="M = batch x seq (8 x 512)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--square", type=int, default=1024, help="also an n^3 square product (0: no)")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    jdt = jnp.dtype(a.dtype)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    fns = {"NN": jax.jit(lambda x, y: x @ y), "NT": jax.jit(lambda x, y: x @ y.T),
           "TN": jax.jit(lambda x, y: x.T @ y)}
    tfns = {"NN": lambda x, y: x @ y, "NT": lambda x, y: x @ y.t(), "TN": lambda x, y: x.t() @ y}
    rng = np.random.default_rng(0)
    cases = [(name, kind, M, K, N, cnt) for name, M, K, N, cnt in shapes(a.tokens) for kind in ("NN", "NT", "TN")]
    if a.square:
        cases.append((f"square {a.square}^3", "NN", a.square, a.square, a.square, 0))

    def timer(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    rows = []
    for name, kind, M, K, N, cnt in cases:
        x, y, fl = operands(kind, M, K, N, rng)
        jx, jy = jax.device_put(x.astype(jdt)), jax.device_put(y.astype(jdt))
        tx, ty = torch.from_numpy(x).to(tdt), torch.from_numpy(y).to(tdt)
        jf, tf = fns[kind], tfns[kind]
        run_j = lambda: jf(jx, jy).block_until_ready()  # noqa: E731
        run_t = lambda: tf(tx, ty)  # noqa: E731
        run_j(), run_t()
        tj, tt = [], []
        for _ in range(a.repeats):
            tj.append(timer(run_j))
            time.sleep(0.02)   # let torch's / XLA's worker threads stop spinning before the other side runs
            tt.append(timer(run_t))
            time.sleep(0.02)
        mj, mt = statistics.median(tj), statistics.median(tt)
        rows.append((name, kind, M, K, N, cnt, fl, mj, mt))
        print(f"# {name} {kind}: jax {[round(t * 1e3, 1) for t in tj]} ms, torch {[round(t * 1e3, 1) for t in tt]} ms",
              file=sys.stderr, flush=True)

    print(f"\n# train-step matmuls, {time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), {a.dtype}, median of {a.repeats}; load average at the end "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| matmul | form | stored operands -> result | per step | jax ms | torch ms | jax GFLOP/s "
          "| torch GFLOP/s | jax / torch |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    desc = {"NN": "X {M}x{K} @ W {K}x{N} -> {M}x{N}", "NT": "dY {M}x{N} @ (W {K}x{N})^T -> {M}x{K}",
            "TN": "(X {M}x{K})^T @ dY {M}x{N} -> {K}x{N}"}
    sum_j = sum_t = 0.0
    for name, kind, M, K, N, cnt, fl, mj, mt in rows:
        sum_j += cnt * mj
        sum_t += cnt * mt
        print(f"| {name} | {kind} | {desc[kind].format(M=M, K=K, N=N)} | {cnt} | {mj * 1e3:.1f} | {mt * 1e3:.1f} | "
              f"{fl / mj / 1e9:.1f} | {fl / mt / 1e9:.1f} | {mt / mj:.2f}x |")
    total_fl = sum(cnt * fl for *_, cnt, fl, _, _ in rows)
    print(f"\nOne train step's dense matmuls ({total_fl / 1e12:.2f} TFLOP, each counted as often as the step "
          f"runs it): jax {sum_j:.2f} s ({total_fl / sum_j / 1e9:.0f} GFLOP/s), torch {sum_t:.2f} s "
          f"({total_fl / sum_t / 1e9:.0f} GFLOP/s); jax / torch throughput {sum_t / sum_j:.2f}x")


if __name__ == "__main__":
    main()
