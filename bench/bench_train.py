"""Training throughput: our sharded jit train step vs HF transformers MistralForCausalLM (PyTorch, CPU).

    python bench/bench_train.py [--batch 8 --seq 512 --steps 3 --peak-flops 0]
    python bench/bench_train.py --compile-layers 8 32 [--remat none]

Same model (the 57M config: dim 512, 8 layers, 8 q / 2 kv heads, head_dim 64, hidden 1536, vocab
32000), same batch, AdamW with global-norm clipping on both sides. Prints a markdown table of tokens/s,
seconds per step and MFU (model FLOPs from mistral_jax.model.flops over a stated or measured peak).

Same-XLA reference: when /work/venvs/hfflax/bin/python exists (or --hf-flax-python PATH), our initial
weights are written as an HF folder and bench/hf_flax_ref.py runs a jitted train step of transformers'
FlaxMistralForCausalLM on them in that venv (float32 and bfloat16 compute, same batch shape, same
AdamW + clipping, median of the same number of steps after one warm-up; it runs first, before this
process has grown): rows "HF Flax (jit)" and the ratio ours / HF Flax per dtype. Without the venv
those rows say "not run (no venv)".

--memory-seq T instead compiles (without running) the train step of one T-token sequence on a small model
(dim 256, 4 layers, 4 q / 2 kv heads, hidden 768, vocab 32000, window 4096) and prints XLA's peak temp
memory (compiled.memory_analysis()) for the code before the performance work (dense masked attention,
full float32 logits + one-hot loss, per-layer Python loop) and after it (blockwise attention, chunked
loss, scanned layers), each with remat none and full.

--compile-layers N ... instead times `jit(train_step).lower(...).compile()` (lowering and XLA compile
separately, no execution) of a small model (dim 256, 4 q / 2 kv heads, hidden 768, vocab 32000) at each
depth, scanned layers (nn.scan, the default) vs the per-layer Python loop (scan_layers=False).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mistral_jax.model import flops
from mistral_jax.training import optim
from mistral_jax.model import sharding  # noqa: E402
from mistral_jax.training import train_step as ts  # noqa: E402
from mistral_jax.model.config import ModelConfig  # noqa: E402
from mistral_jax.training.run_config import OptimSection  # noqa: E402

import hf_flax_ref  # noqa: E402  (bench/, the script's own folder, is on sys.path)
import ref_venv  # noqa: E402

CFG_57M = ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1536,
                      vocab_size=32000, sliding_window=4096, max_seq_len=4096)


def host_batch(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(3, CFG_57M.vocab_size, (batch, seq)).astype(np.int32),
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids": np.ones((batch, seq), np.int32)}


def time_steps(run_one, steps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        run_one()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run_one()
        out.append(time.perf_counter() - t0)
    return out


def export_initial_params(dst: Path) -> None:
    """Writes bench_jax's initial params (the same init_state draw) to `dst` as an HF folder."""
    from mistral_jax.checkpoint.torch_write import write_hf
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    o = OptimSection(lr=1e-4, warmup_steps=0)
    state = ts.init_state(CFG_57M, optim.make_optimizer(o, 1000), jax.random.key(0), mesh)
    write_hf(dst, CFG_57M, jax.device_get(state["params"]), progress=False, tokenizer=None)


def bench_jax(batch: int, seq: int, steps: int, dtype, remat: str = "none") -> list[float]:
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    o = OptimSection(lr=1e-4, warmup_steps=0)
    opt = optim.make_optimizer(o, 1000)
    state = {"s": ts.init_state(CFG_57M, opt, jax.random.key(0), mesh)}
    step = ts.make_train_step(CFG_57M, opt, optim.learning_rate_schedule(o, 1000), mesh, dtype=dtype, remat=remat)
    b = ts.put_batch(host_batch(batch, seq), mesh, 1)

    def run_one():
        state["s"], m = step(state["s"], b)
        jax.block_until_ready(m["loss"])
    return time_steps(run_one, steps)


def compile_config(n_layers: int) -> ModelConfig:
    """The small model of the compile-time comparison, at `n_layers` layers."""
    return ModelConfig(dim=256, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=768,
                       vocab_size=32000, sliding_window=128, max_seq_len=1024)


def compile_times(n_layers: int, scan_layers: bool, remat: str, batch: int = 4, seq: int = 256,
                  repeats: int = 1) -> tuple[float, float]:
    """(lowering seconds, compile seconds) of the train step, best of `repeats`; nothing is executed."""
    cfg = compile_config(n_layers)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    o = OptimSection(lr=1e-4, warmup_steps=0)
    opt = optim.make_optimizer(o, 1000)
    state = ts.abstract_state(cfg, opt, mesh, scan_layers=scan_layers)
    batch_sh = ts.batch_shardings(mesh)
    abstract_batch = {k: jax.ShapeDtypeStruct((1, batch, seq), jnp.int32, sharding=batch_sh[k]) for k in ts.BATCH_KEYS}
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        jax.clear_caches()
        step = ts.make_train_step(cfg, opt, optim.learning_rate_schedule(o, 1000), mesh, remat=remat,
                                  scan_layers=scan_layers)
        t0 = time.perf_counter()
        lowered = step.lower(state, abstract_batch)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        best = min(best, (t1 - t0, t2 - t1), key=lambda x: x[0] + x[1])
    return best


def run_compile_bench(layers: list[int], remat: str, repeats: int) -> None:
    print(f"\nTrain-step compile time (jit(...).lower(...).compile(), CPU backend, best of {repeats}): "
          f"dim 256, 4q/2kv heads, hidden 768, vocab 32000, batch 4x256, float32, remat {remat!r}.\n")
    print("| layers | scanned | lower s | compile s | total s |")
    print("| ---: | --- | ---: | ---: | ---: |")
    totals: dict[tuple[bool, int], float] = {}
    for scan in (False, True):
        for n in layers:
            lo, co = compile_times(n, scan, remat, repeats=repeats)
            totals[scan, n] = lo + co
            kind = "yes" if scan else "no (Python loop)"
            print(f"| {n} | {kind} | {lo:.2f} | {co:.2f} | {lo + co:.2f} |", flush=True)
    if len(layers) > 1:
        a, b = layers[0], layers[-1]
        for scan in (False, True):
            print(f"\n{'scanned' if scan else 'unscanned'}: {b} layers / {a} layers = "
                  f"{totals[scan, b] / totals[scan, a]:.2f}x", end="")
        print()


def _before_loss(params, tokens_BT, positions_BT, segment_ids_BT, *, cfg, dtype, remat, target_mask_BT=None):
    """The loss as computed before the performance work: dense attention, full (B, T, V) float32 logits."""
    from mistral_jax.model import transformer as model_lib
    model = model_lib.Transformer(cfg, dtype=dtype, remat=remat, scan_layers=False, attn_impl="dense")
    with sharding.with_rules():
        logits_BTV, _ = model.apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT)
    mask_BT = ts.loss_mask(segment_ids_BT, target_mask_BT)
    nll_BT = ts.token_nll(logits_BTV, tokens_BT)
    return jnp.sum(jnp.where(mask_BT, nll_BT, 0.0)), jnp.sum(mask_BT).astype(jnp.float32)


def step_memory(seq: int, before: bool, remat: str) -> tuple[float, float]:
    """(peak temp GiB from memory_analysis, compile seconds) of the train step on one `seq`-token row."""
    cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=768,
                      vocab_size=32000, sliding_window=4096, max_seq_len=seq)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    o = OptimSection(lr=1e-4, warmup_steps=0)
    opt = optim.make_optimizer(o, 1000)
    scan = not before
    state = ts.abstract_state(cfg, opt, mesh, scan_layers=scan)
    sh = ts.batch_shardings(mesh)
    batch = {k: jax.ShapeDtypeStruct((1, 1, seq), jnp.int32, sharding=sh[k]) for k in ts.BATCH_KEYS}
    step = ts.make_train_step(cfg, opt, optim.learning_rate_schedule(o, 1000), mesh, remat=remat, scan_layers=scan,
                              loss_fn=_before_loss if before else None)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    secs = time.perf_counter() - t0
    return compiled.memory_analysis().temp_size_in_bytes / 2**30, secs


def run_memory_bench(seq: int) -> None:
    print(f"\nTrain step on one {seq}-token sequence, dim 256, 4 layers, 4q/2kv heads, hidden 768, vocab 32000, "
          "window 4096, float32: XLA temp memory from compiled.memory_analysis() (compiled, not run).\n")
    print("| code | remat | temp GiB | compile s |")
    print("| --- | --- | ---: | ---: |")
    for before in (True, False):
        for remat in ("none", "full"):
            gib, secs = step_memory(seq, before, remat)
            name = ("before: dense attention, full logits, layer loop" if before
                    else "after: blockwise attention, chunked loss, scanned layers")
            print(f"| {name} | {remat} | {gib:.2f} | {secs:.1f} |", flush=True)


def bench_torch(batch: int, seq: int, steps: int) -> list[float]:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    c = CFG_57M
    hf_cfg = MistralConfig(**c.to_hf_config())
    model = MistralForCausalLM(hf_cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.from_numpy(host_batch(batch, seq)["tokens"]).long()

    def run_one():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time_steps(run_one, steps)


def torch_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    """Best observed FLOP/s of an n x n x n float32 torch matmul (MKL/oneDNN on CPU)."""
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.ones(n, n), torch.ones(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--peak-flops", type=float, default=0.0,
                   help="FLOP/s for MFU; 0 takes the best 1024^3 float32 matmul of JAX and PyTorch")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--compile-layers", type=int, nargs="+", metavar="N",
                   help="time train-step compilation (scanned vs unscanned) at these depths instead")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"), help="for --compile-layers")
    p.add_argument("--memory-seq", type=int, default=0, metavar="T",
                   help="report the train step's peak temp memory at one T-token sequence, before/after")
    p.add_argument("--repeats", type=int, default=1, help="for --compile-layers: best of this many compiles")
    hf_flax_ref.REFERENCE.add_cli_option(p)
    args = p.parse_args(argv)
    if args.compile_layers:
        run_compile_bench(args.compile_layers, args.remat, args.repeats)
        return
    if args.memory_seq:
        run_memory_bench(args.memory_seq)
        return

    if args.peak_flops:
        peak, peak_src = args.peak_flops, "given"
    else:
        jax_mm = flops.measure_peak_flops(1024, jnp.float32, repeats=10)
        torch_mm = 0.0 if args.skip_torch else torch_matmul_flops()
        peak = max(jax_mm, torch_mm)
        peak_src = (f"best 1024^3 float32 matmul: JAX {jax_mm / 1e9:.0f}, PyTorch {torch_mm / 1e9:.0f} GFLOP/s")
    fpt = flops.train_flops_per_token(CFG_57M, args.seq)
    tokens = args.batch * args.seq
    flax_py = hf_flax_ref.REFERENCE.find_python(args.hf_flax_python)
    ref: dict | str = ref_venv.NOT_RUN
    if flax_py is not None:
        # First, while this process is still small: the reference's f32 step needs a few GiB of its own.
        with tempfile.TemporaryDirectory(prefix="bench_train_hf_") as tmp:
            export_initial_params(Path(tmp) / "hf")
            ref = hf_flax_ref.REFERENCE.run(flax_py, "train", Path(tmp) / "hf", "--batch", str(args.batch),
                                          "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", "1",
                                          "--dtypes", "float32", "bfloat16")
    bf16 = "bfloat16 compute, f32 master"
    rows = []
    runs = [("mistral-jax jit step", "float32", lambda: bench_jax(args.batch, args.seq, args.steps, jnp.float32)),
            ("mistral-jax jit step", bf16, lambda: bench_jax(args.batch, args.seq, args.steps, jnp.bfloat16))]
    if not args.skip_torch:
        runs.append(("HF transformers MistralForCausalLM (PyTorch)", "float32",
                     lambda: bench_torch(args.batch, args.seq, args.steps)))
    for name, dt, fn in runs:
        times = fn()
        med = statistics.median(times)
        rows.append((name, dt, tokens / med, med, flops.mfu(tokens / med, fpt, peak)))
        print(f"# {name} [{dt}]: step times {[round(t, 2) for t in times]}", file=sys.stderr, flush=True)
    flax_name = "HF Flax (jit) FlaxMistralForCausalLM, transformers 4.57 (same weights)"
    flax_tps: dict[str, float] = {}
    if isinstance(ref, dict):
        for r in ref["results"]:
            dt = "float32" if r["dtype"] == "float32" else bf16
            flax_tps[dt] = r["tokens_per_s"]
            rows.append((flax_name, dt, r["tokens_per_s"], r["median_s"], flops.mfu(r["tokens_per_s"], fpt, peak)))
            print(f"# HF Flax (jit) [{dt}]: step times {[round(t, 2) for t in r['step_times_s']]}, "
                  f"losses {[round(x, 4) for x in r['losses']]}", file=sys.stderr, flush=True)
    else:
        rows.append((flax_name, "float32, bfloat16", None, None, None))

    print(f"\nModel: 57M Mistral (dim 512, 8 layers, 8q/2kv, hidden 1536, vocab 32000); batch {args.batch}x{args.seq}; "
          f"{fpt / 1e6:.0f} MFLOP/token (train, mistral_jax.model.flops); peak {peak / 1e9:.1f} GFLOP/s "
          f"({peak_src}); median of {args.steps} steps.\n")
    print("| implementation | dtype | tokens/s | s/step | MFU |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, dt, tps, med, m in rows:
        if tps is None:
            print(f"| {name} | {dt} | {ref} | - | - |")
        else:
            print(f"| {name} | {dt} | {tps:.0f} | {med:.2f} | {100 * m:.1f}% |")
    ours = {dt: tps for name, dt, tps, _, _ in rows if name.startswith("mistral-jax")}
    ratios = [f"{dt}: {ours[dt] / flax_tps[dt]:.2f}x" for dt in ours if dt in flax_tps]
    print(f"\nours / HF Flax (jit) tokens/s, same run: {'; '.join(ratios) if ratios else ref}")


if __name__ == "__main__":
    main()
