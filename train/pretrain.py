"""Pretraining entry point: `python -m train.pretrain --config configs/pretrain-default.toml [--set k=v ...]`.

Writes into the run directory: config.json, metrics.jsonl (one record per log step), checkpoints/
(orbax, resumable with --resume), export/ (final params), loss_curve.png and summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import data as data_lib
from mistral_jax import flops, optim, sharding
from mistral_jax import run_config as rc_lib
from mistral_jax import train_step as ts
from mistral_jax.checkpoint import load_params, save_params
from mistral_jax.config import ModelConfig
from mistral_jax.decode import generate
from mistral_jax.tokenizer import Tokenizer
from mistral_jax.train_checkpoint import TrainCheckpointer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the step and the last good checkpoint."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="TOML run config (e.g. configs/pretrain-default.toml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable; bare keys allowed "
                        "when unambiguous, e.g. --set steps=200)")
    p.add_argument("--run-dir", default=None, help="output directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run dir")
    p.add_argument("--init-from", default=None,
                   help="start from params saved by mistral_jax.checkpoint.save_params (fresh optimizer)")
    return p.parse_args(argv)


def make_run_mesh(rc: rc_lib.RunConfig) -> jax.sharding.Mesh:
    devices = jax.devices()
    if rc.mesh.devices:
        if rc.mesh.devices > len(devices):
            raise rc_lib.RunConfigError(f"mesh.devices={rc.mesh.devices} but only {len(devices)} devices exist")
        devices = devices[:rc.mesh.devices]
    return sharding.make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor, devices=devices)


def peak_flops(rc: rc_lib.RunConfig, mesh: jax.sharding.Mesh, dtype: Any) -> tuple[float, str]:
    """(peak FLOP/s of the mesh, how it was obtained)."""
    if rc.train.peak_flops > 0:
        return rc.train.peak_flops, "train.peak_flops"
    one = flops.measure_peak_flops(1024, dtype)
    if jax.default_backend() == "cpu":  # simulated CPU devices share the same cores
        return one, f"measured 1024^3 {jnp.dtype(dtype).name} matmul on the host CPU"
    n = mesh.devices.size
    return one * n, f"measured 1024^3 {jnp.dtype(dtype).name} matmul x {n} devices"


def _load_init_params(path: str, cfg: ModelConfig, mesh, param_dtype) -> Any:
    loaded_cfg, params = load_params(path, mesh=mesh, dtype=param_dtype)
    if loaded_cfg != cfg:
        raise rc_lib.RunConfigError(f"--init-from {path}: its model config {loaded_cfg} differs from the run's {cfg}")
    return params


def run(rc: rc_lib.RunConfig, run_dir: str | Path, resume: bool = False, init_from: str | None = None) -> dict[str, Any]:
    """Trains per `rc` in `run_dir`; returns the summary dict. Raises TrainingDiverged on a NaN/inf loss."""
    t_start = time.time()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = rc.model_config()
    dtype, param_dtype = DTYPES[rc.model.dtype], DTYPES[rc.model.param_dtype]
    mesh = make_run_mesh(rc)
    ts.check_batch_shape(mesh, rc.optim.grad_accum, rc.data.batch_size)

    tokenizer = Tokenizer()
    if tokenizer.vocab_size > cfg.vocab_size:
        raise rc_lib.RunConfigError(f"tokenizer has {tokenizer.vocab_size} pieces but model vocab_size is {cfg.vocab_size}")
    train_stream, val_stream = data_lib.make_streams(rc.data, tokenizer)

    optimizer = optim.make_optimizer(rc.optim, rc.train.steps)
    schedule = optim.learning_rate_schedule(rc.optim, rc.train.steps)
    ckpt = TrainCheckpointer(run_dir / "checkpoints", keep=rc.checkpoint.keep, async_save=rc.checkpoint.async_save)
    meta = {"model": cfg.to_dict(), "run_config": rc.to_dict()}

    if ckpt.latest_step() is not None and not resume:
        raise FileExistsError(f"{run_dir / 'checkpoints'} already has checkpoints (latest step {ckpt.latest_step()}); "
                              "pass --resume to continue or choose another --run-dir")
    if resume and ckpt.latest_step() is not None:
        state, data_state, saved_meta = ckpt.restore(ts.abstract_state(cfg, optimizer, mesh, param_dtype))
        if saved_meta.get("model") != cfg.to_dict():
            raise rc_lib.RunConfigError(f"--resume: checkpoint model config {saved_meta.get('model')} differs "
                                        f"from the run's {cfg.to_dict()}")
        train_stream.restore(data_state)
        print(f"resumed from step {int(state['step'])} ({ckpt.directory})", flush=True)
    else:
        params = _load_init_params(init_from, cfg, mesh, param_dtype) if init_from else None
        state = ts.init_state(cfg, optimizer, jax.random.key(rc.train.seed), mesh, param_dtype, params)
    (run_dir / "config.json").write_text(json.dumps(rc.to_dict(), indent=1))

    step_fn = ts.make_train_step(cfg, optimizer, schedule, mesh, dtype=dtype, param_dtype=param_dtype,
                                 remat=rc.model.remat, nan_at_step=rc.train.nan_at_step)
    peak, peak_source = peak_flops(rc, mesh, dtype)
    flops_per_token = flops.train_flops_per_token(cfg, rc.data.seq_len)
    print(f"model {cfg.dim}d x {cfg.n_layers} layers, mesh {dict(mesh.shape)}, {flops_per_token / 1e6:.1f} "
          f"MFLOP/token, peak {peak / 1e9:.1f} GFLOP/s ({peak_source})", flush=True)

    stop = {"sigterm": False}
    old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    start = int(state["step"])
    try:
        state = _train_loop(rc, state, step_fn, train_stream, mesh, ckpt, meta, start, run_dir, stop,
                            flops_per_token, peak)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        ckpt.close()
    if stop["sigterm"]:
        return {"stopped_by": "SIGTERM", "step": int(state["step"])}

    summary = _finish(rc, cfg, state["params"], mesh, tokenizer, val_stream, run_dir, dtype, param_dtype)
    summary.update(steps=int(state["step"]), wall_s=round(time.time() - t_start, 1),
                   peak_flops=peak, peak_source=peak_source, flops_per_token=flops_per_token)
    records = read_metrics(run_dir / "metrics.jsonl")
    if records:
        summary["final_train_loss"] = records[-1]["loss"]
        tps = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
        summary["median_tokens_per_s"] = float(np.median(tps)) if tps else None
        summary["median_mfu"] = float(np.median([r["mfu"] for r in records if r.get("mfu")])) if tps else None
        plot_loss_curve(records, run_dir / "loss_curve.png")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _train_loop(rc, state, step_fn, train_stream, mesh, ckpt, meta, start, run_dir, stop,
                flops_per_token, peak):
    from tqdm import tqdm

    steps, log_every, every = rc.train.steps, rc.train.log_every, rc.checkpoint.every
    bar = tqdm(total=steps, initial=start, desc="train", disable=not rc.train.progress, dynamic_ncols=True)
    window: list[dict[str, float]] = []
    metrics_file = open(run_dir / "metrics.jsonl", "a")
    first_call = True
    last_saved = start
    try:
        for step in range(start, steps):
            batch = ts.put_batch(next(train_stream), mesh, rc.optim.grad_accum)
            t0 = time.perf_counter()
            state, m = step_fn(state, batch)
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            if not bool(m["finite"]):
                ckpt.wait()
                raise TrainingDiverged(
                    f"non-finite training loss at step {step} (loss={float(m['loss'])}, grad_norm="
                    f"{float(m['grad_norm'])}); the update was not applied and training stopped. Last good "
                    f"checkpoint: step {ckpt.latest_step()} in {ckpt.directory}. Lower optim.lr or raise "
                    "optim.warmup_steps, then resume with --resume.")
            window.append({"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                           "tokens": float(m["tokens"]), "dt": dt, "timed": not first_call})
            first_call = False
            done = step + 1
            bar.update(1)
            if done % log_every == 0 or done == steps:
                rec = _log_record(done, window, rc, flops_per_token, peak)
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}")
                if not rc.train.progress:
                    print(json.dumps(rec), flush=True)
                window = []
            if done % every == 0 or done == steps or stop["sigterm"]:
                if done != last_saved:
                    ckpt.save(done, state, train_stream.state(), meta)
                    last_saved = done
            if stop["sigterm"]:
                ckpt.wait()
                print(f"SIGTERM: saved checkpoint at step {done} in {ckpt.directory}; exiting", flush=True)
                break
    finally:
        bar.close()
        metrics_file.close()
    return state


def _log_record(step: int, window: list[dict[str, float]], rc, flops_per_token: float, peak: float) -> dict:
    timed = [w for w in window if w["timed"]]
    tokens_per_s = (sum(w["tokens"] for w in timed) / sum(w["dt"] for w in timed)) if timed else None
    # tokens here are predicted (loss) tokens; throughput counts all row positions processed.
    rows_tokens_per_s = (len(timed) * rc.data.batch_size * rc.data.seq_len / sum(w["dt"] for w in timed)) if timed else None
    return {
        "step": step,
        "loss": sum(w["loss"] for w in window) / len(window),
        "lr": window[-1]["lr"],
        "grad_norm": window[-1]["grad_norm"],
        "tokens_per_s": rows_tokens_per_s,
        "loss_tokens_per_s": tokens_per_s,
        "mfu": flops.mfu(rows_tokens_per_s, flops_per_token, peak) if rows_tokens_per_s else None,
        "time": time.time(),
    }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records, the last one per step (a resumed run rewrites the steps after its checkpoint)."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title("pretraining loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def heldout_loss(params, cfg, mesh, val_stream, n_batches: int, dtype, param_dtype) -> tuple[float, int]:
    """(mean NLL per predicted token, token count) over the first n_batches held-out batches."""
    eval_fn = ts.make_eval_step(cfg, mesh, dtype=dtype, param_dtype=param_dtype)
    total, count = 0.0, 0.0
    for _ in range(n_batches):
        try:
            batch = next(val_stream)
        except StopIteration:
            break
        s, n = jax.device_get(eval_fn(params, ts.put_batch(batch, mesh, 1)))
        total, count = total + float(s), count + float(n)
    if count == 0:
        raise ValueError("held-out set produced no tokens (data.val_percent too small?)")
    return total / count, int(count)


def _finish(rc, cfg, params, mesh, tokenizer, val_stream, run_dir, dtype, param_dtype) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if rc.eval.export:
        save_params(run_dir / "export", cfg, params, force=True)
        summary["export"] = str(run_dir / "export")
    if rc.eval.batches and val_stream is not None:
        val_loss, n = heldout_loss(params, cfg, mesh, val_stream, rc.eval.batches, dtype, param_dtype)
        summary.update(heldout_loss=val_loss, heldout_perplexity=math.exp(val_loss), heldout_tokens=n)
        print(f"held-out: loss {val_loss:.4f} nats/token, perplexity {math.exp(val_loss):.2f} over {n} tokens",
              flush=True)
    if rc.eval.sample_tokens:
        prompt_ids = tokenizer.encode(rc.eval.sample_prompt, bos=True)
        out = generate(params, cfg, [prompt_ids], rc.eval.sample_tokens, temperature=rc.eval.sample_temperature,
                       top_k=rc.eval.sample_top_k, seed=rc.train.seed, mesh=mesh)
        text = tokenizer.decode(out[0])
        summary.update(sample_prompt=rc.eval.sample_prompt, sample=text)
        (run_dir / "sample.txt").write_text(rc.eval.sample_prompt + text + "\n")
        print(f"sample (temperature {rc.eval.sample_temperature}) for prompt {rc.eval.sample_prompt!r}:\n"
              f"{rc.eval.sample_prompt}{text}", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rc = rc_lib.load(args.config, args.set)
    except rc_lib.RunConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    try:
        summary = run(rc, run_dir, resume=args.resume, init_from=args.init_from)
    except (TrainingDiverged, FileExistsError, rc_lib.RunConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary.get("stopped_by") == "SIGTERM":
        return 143
    print(json.dumps({k: v for k, v in summary.items() if k != "sample"}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
