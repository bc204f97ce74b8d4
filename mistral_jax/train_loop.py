"""The training run: set-up with fail-fast checks, fresh start or resume, the step loop with logging and
checkpoints, then held-out evaluation, export and a sample. Shared by pretraining and fine-tuning.

A run directory holds config.json, metrics.jsonl (one record per log step), checkpoints/ (orbax;
train state + data position + metadata), export/ (final params), loss_curve.png and summary.json.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from mistral_jax import data as data_lib
from mistral_jax import flops, optim, sharding
from mistral_jax import run_config as rc_lib
from mistral_jax import train_step as ts
from mistral_jax.checkpoint import load_params, save_params
from mistral_jax.config import ModelConfig
from mistral_jax.decode import generate
from mistral_jax.dtypes import parse_dtype
from mistral_jax.errors import first_line
from mistral_jax.metrics import MetricsLog, log_record, plot_loss_curve, read_metrics
from mistral_jax.tokenizer import DEFAULT_FILES, Tokenizer
from mistral_jax.train_checkpoint import TrainCheckpointer


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the step and the last good checkpoint."""


PARAM_LAYOUT = "scanned"  # train-state params: layers stacked under "layers" (checkpoints before had none)


class RunError(ValueError):
    """A run cannot start as asked (mesh, tokenizer, --init-from, an incompatible checkpoint); one line."""


def make_run_mesh(mesh_cfg: rc_lib.MeshSection) -> Mesh:
    """The run's mesh over all devices, or the first `devices` of them."""
    devices = jax.devices()
    if mesh_cfg.devices > len(devices):
        raise RunError(f"[mesh] field 'devices' is {mesh_cfg.devices} but only {len(devices)} devices exist")
    if mesh_cfg.devices:
        devices = devices[:mesh_cfg.devices]
    try:
        return sharding.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices=devices)
    except ValueError as e:
        raise RunError(f"[mesh]: {e}") from None


def load_tokenizer(path: str, vocab_size: int) -> Tokenizer:
    """The SentencePiece tokenizer at `path` ('' = Mistral's own for the vocab: v3 for 32768, else v1),
    checked against the model's vocab size."""
    try:
        if path:
            tokenizer = Tokenizer(path)
        else:
            tokenizer = Tokenizer.for_vocab(vocab_size) if vocab_size in DEFAULT_FILES else Tokenizer()
    except (OSError, RuntimeError, ValueError) as e:
        raise RunError(f"[data] field 'tokenizer' {path!r}: {first_line(e)}") from None
    if tokenizer.vocab_size > vocab_size:
        raise RunError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but model vocab_size "
                       f"is {vocab_size}")
    return tokenizer


def measure_peak(mesh: Mesh, dtype: Any) -> tuple[float, str]:
    """(peak FLOP/s of the mesh, how it was obtained): a 1024^3 matmul timed on one device, times the devices."""
    one = flops.measure_peak_flops(1024, dtype)
    if jax.default_backend() == "cpu":  # simulated CPU devices share the same cores
        return one, f"measured 1024^3 {np.dtype(dtype).name} matmul on the host CPU"
    n = mesh.devices.size
    return one * n, f"measured 1024^3 {np.dtype(dtype).name} matmul x {n} devices"


def load_init_params(path: str, cfg: ModelConfig, mesh: Mesh, param_dtype: Any) -> Any:
    """Params of a saved checkpoint for `cfg`, placed on `mesh`; RunError naming the path otherwise."""
    try:
        loaded_cfg, params = load_params(path, mesh=mesh, dtype=param_dtype)
    except (OSError, ValueError) as e:  # CheckpointError, ConfigError, WeightError are ValueErrors
        raise RunError(f"--init-from {path}: {first_line(e)}") from None
    if loaded_cfg != cfg:
        diff = [f"{k} {v!r} (run: {getattr(cfg, k)!r})" for k, v in loaded_cfg.to_dict().items()
                if getattr(cfg, k) != v]
        raise RunError(f"--init-from {path}: its model config differs from the run's: {', '.join(diff)}")
    return params


def _schedule_steps(rc: rc_lib.RunConfig, saved_meta: dict[str, Any] | None) -> tuple[int, list[str]]:
    """(length of the lr schedule, notes): train.steps at a fresh start unless optim.schedule_steps is set;
    the checkpoint's length on resume unless optim.schedule_steps is set."""
    if saved_meta is None:
        return rc.optim.schedule_steps or rc.train.steps, []
    saved_run = saved_meta.get("run_config", {})
    saved = saved_meta.get("schedule_steps", saved_run.get("train", {}).get("steps", rc.train.steps))
    if rc.optim.schedule_steps:
        if rc.optim.schedule_steps != saved:
            return rc.optim.schedule_steps, [f"schedule: optim.schedule_steps={rc.optim.schedule_steps} re-stretches "
                                             f"the warmup + cosine schedule (the checkpoint's was {saved} steps)"]
        return saved, []
    notes = []
    if saved != rc.train.steps:
        notes.append(f"schedule: keeping the checkpoint's warmup + cosine length of {saved} steps (train.steps "
                     f"is {rc.train.steps}; steps past {saved} run at the final lr); --set "
                     "optim.schedule_steps=N re-stretches it")
    return saved, notes


def run(rc: rc_lib.RunConfig, run_dir: str | Path, resume: bool = False, init_from: str | None = None,
        log: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, Any]:
    """Trains per `rc` in `run_dir`; returns the summary dict.

    Raises RunConfigError / RunError / DataError / FileExistsError before any compilation for bad input
    or an incompatible checkpoint, and TrainingDiverged on a NaN/inf loss or gradient.
    """
    t_start = time.time()
    run_dir = Path(run_dir)
    cfg = rc.model_cfg()
    dtype = parse_dtype(rc.model.dtype, "[model] field 'dtype'")
    param_dtype = parse_dtype(rc.model.param_dtype, "[model] field 'param_dtype'")
    mesh = make_run_mesh(rc.mesh)
    try:
        ts.check_batch_shape(mesh, rc.optim.grad_accum, rc.data.batch_size)
    except ValueError as e:
        raise RunError(f"[data] batch_size / [mesh]: {e}") from None
    tokenizer = load_tokenizer(rc.data.tokenizer, cfg.vocab_size)
    train_stream, val_stream, corpus = data_lib.make_streams(rc.data, tokenizer)
    log(corpus.describe(rc.data.max_bytes)
        + f"; {len(train_stream.files)} train, {len(val_stream.files) if val_stream else 0} held out")

    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = TrainCheckpointer(run_dir / "checkpoints", keep=rc.checkpoint.keep, async_save=rc.checkpoint.async_save)
    try:
        return _run(rc, cfg, run_dir, resume, init_from, log, t_start, dtype, param_dtype, mesh, tokenizer,
                    train_stream, val_stream, ckpt)
    finally:
        ckpt.close()


def _run(rc, cfg, run_dir, resume, init_from, log, t_start, dtype, param_dtype, mesh, tokenizer, train_stream,
         val_stream, ckpt: TrainCheckpointer) -> dict[str, Any]:
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise FileExistsError(f"{ckpt.directory} already has checkpoints (latest step {latest}); "
                              "pass --resume to continue or choose another --run-dir")
    saved_meta = None
    if resume and latest is None:
        log(f"--resume: no checkpoint in {ckpt.directory}; starting a fresh run")
    elif resume:
        try:
            data_state, saved_meta = ckpt.read_meta(latest)
        except Exception as e:  # orbax raises assorted types for unreadable checkpoints
            raise RunError(f"--resume: cannot read checkpoint step {latest} in {ckpt.directory} "
                           f"({type(e).__name__}: {first_line(e)})") from None
        changes = rc_lib.resume_changes(saved_meta.get("run_config", {}), saved_meta.get("model", {}), rc)
        if changes:
            raise RunError(
                f"--resume: the checkpoint (step {latest} in {ckpt.directory}) was written with a different "
                f"config: {'; '.join(changes)}. Only {', '.join(rc_lib.RESUMABLE_CHANGES)} may change on "
                "resume; use another --run-dir (with --init-from an exported checkpoint to keep the params)")
        if saved_meta.get("param_layout") != PARAM_LAYOUT:
            raise RunError(
                f"--resume: the checkpoint (step {latest} in {ckpt.directory}) holds per-layer params from before "
                "scanned layers and cannot be resumed; use another --run-dir with --init-from its exported "
                "native checkpoint (native checkpoints of every version load)")
        try:
            train_stream.restore(data_state)
        except ValueError as e:
            raise RunError(f"--resume: checkpoint step {latest}: {e}") from None
        if init_from:
            log(f"--init-from {init_from} ignored: resuming from checkpoint step {latest}")

    schedule_steps, notes = _schedule_steps(rc, saved_meta)
    for note in notes:
        log(note)
    rc = rc.replace(optim={"schedule_steps": schedule_steps})
    optimizer = optim.make_optimizer(rc.optim, schedule_steps)
    schedule = optim.learning_rate_schedule(rc.optim, schedule_steps)
    init_params = load_init_params(init_from, cfg, mesh, param_dtype) if init_from and saved_meta is None else None
    first = next(train_stream)  # fails here, before compiling anything, for a corpus without text

    if saved_meta is not None:
        try:
            state, _, _ = ckpt.restore(ts.abstract_state(cfg, optimizer, mesh, param_dtype), latest)
        except Exception as e:  # orbax raises assorted types for unreadable or mismatched arrays
            raise RunError(f"--resume: cannot restore the train state of step {latest} in {ckpt.directory} "
                           f"({type(e).__name__}: {first_line(e)})") from None
        log(f"resumed from step {int(state['step'])} ({ckpt.directory})")
    else:
        state = ts.init_state(cfg, optimizer, jax.random.key(rc.train.seed), mesh, param_dtype, init_params)

    if rc.train.peak_flops > 0:
        peak, peak_source = rc.train.peak_flops, "train.peak_flops"
    elif saved_meta is not None and saved_meta.get("peak_flops"):
        peak, peak_source = float(saved_meta["peak_flops"]), saved_meta["peak_source"] + ", at the run's start"
    else:
        peak, peak_source = measure_peak(mesh, dtype)
    meta = {"model": cfg.to_dict(), "run_config": rc.to_dict(), "param_layout": PARAM_LAYOUT,
            "schedule_steps": schedule_steps,
            "peak_flops": peak, "peak_source": peak_source}
    (run_dir / "config.json").write_text(json.dumps(rc.to_dict(), indent=1))

    step_fn = ts.make_train_step(cfg, optimizer, schedule, mesh, dtype=dtype, param_dtype=param_dtype,
                                 remat=rc.model.remat)
    flops_per_token = flops.train_flops_per_token(cfg, rc.data.seq_len)
    log(f"model {cfg.dim}d x {cfg.n_layers} layers, mesh {dict(mesh.shape)}, {flops_per_token / 1e6:.1f} "
        f"MFLOP/token, peak {peak / 1e9:.1f} GFLOP/s ({peak_source})")

    if saved_meta is not None:
        metrics_log, notes = MetricsLog.resume(run_dir / "metrics.jsonl", latest)
    else:
        metrics_log, notes = MetricsLog.fresh(run_dir / "metrics.jsonl")
    for note in notes:
        log(note)
    stop = {"sigterm": False}
    old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    try:
        state = train(rc, state, step_fn, itertools.chain([first], train_stream), train_stream.state, mesh, ckpt,
                      meta, metrics_log, stop, flops_per_token, peak, log)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        metrics_log.close()
    if stop["sigterm"]:
        return {"stopped_by": "SIGTERM", "step": int(state["step"])}

    summary = evaluate_and_export(rc, cfg, state["params"], mesh, tokenizer, val_stream, run_dir, dtype,
                                  param_dtype, log)
    summary.update(steps=int(state["step"]), wall_s=round(time.time() - t_start, 1), schedule_steps=schedule_steps,
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


def train(rc: rc_lib.RunConfig, state: ts.TrainState, step_fn: Callable, batches: Iterator[dict[str, np.ndarray]],
          data_state: Callable[[], dict[str, Any]], mesh: Mesh, ckpt: TrainCheckpointer, meta: dict[str, Any],
          metrics_log: MetricsLog, stop: dict[str, bool], flops_per_token: float, peak: float,
          log: Callable[[str], None]) -> ts.TrainState:
    """Steps from state['step'] to rc.train.steps: a metrics record every log_every steps, a checkpoint
    (state, `data_state()`, meta) every checkpoint.every steps, at the end and on SIGTERM (`stop`)."""
    from tqdm import tqdm

    start, steps = int(state["step"]), rc.train.steps
    log_every, every = rc.train.log_every, rc.checkpoint.every
    bar = tqdm(total=steps, initial=start, desc="train", disable=not rc.train.progress, dynamic_ncols=True)
    since_log: list[dict[str, Any]] = []
    first_call = True
    last_saved = start
    try:
        for step in range(start, steps):
            batch = ts.put_batch(next(batches), mesh, rc.optim.grad_accum)
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
            since_log.append({"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                              "tokens": float(m["tokens"]), "dt": dt, "timed": not first_call})
            first_call = False
            done = step + 1
            bar.update(1)
            if done % log_every == 0 or done == steps:
                rec = log_record(done, since_log, rc.data.batch_size, rc.data.seq_len, flops_per_token, peak)
                metrics_log.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}")
                if not rc.train.progress:
                    log(json.dumps(rec))
                since_log = []
            if (done % every == 0 or done == steps or stop["sigterm"]) and done != last_saved:
                ckpt.save(done, state, data_state(), meta)
                last_saved = done
            if stop["sigterm"]:
                ckpt.wait()
                log(f"SIGTERM: saved checkpoint at step {done} in {ckpt.directory}; exiting")
                break
    finally:
        bar.close()
    return state


def heldout_loss(params: Any, cfg: ModelConfig, mesh: Mesh, val_stream: Iterator, n_batches: int, dtype: Any,
                 param_dtype: Any) -> tuple[float, int]:
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
        raise data_lib.DataError("held-out set produced no tokens (data.val_percent too small?)")
    return total / count, int(count)


def evaluate_and_export(rc: rc_lib.RunConfig, cfg: ModelConfig, params: Any, mesh: Mesh, tokenizer: Tokenizer,
                        val_stream: Iterator | None, run_dir: Path, dtype: Any, param_dtype: Any,
                        log: Callable[[str], None]) -> dict[str, Any]:
    """Per rc.eval: export the params, held-out loss/perplexity, a sample; returns their summary fields."""
    summary: dict[str, Any] = {}
    if rc.eval.export:
        save_params(run_dir / "export", cfg, params, force=True)
        summary["export"] = str(run_dir / "export")
    if rc.eval.batches and val_stream is not None:
        val_loss, n = heldout_loss(params, cfg, mesh, val_stream, rc.eval.batches, dtype, param_dtype)
        summary.update(heldout_loss=val_loss, heldout_perplexity=math.exp(val_loss), heldout_tokens=n)
        log(f"held-out: loss {val_loss:.4f} nats/token, perplexity {math.exp(val_loss):.2f} over {n} tokens")
    if rc.eval.sample_tokens:
        prompt_ids = tokenizer.encode(rc.eval.sample_prompt, bos=True)
        out = generate(params, cfg, [prompt_ids], rc.eval.sample_tokens, temperature=rc.eval.sample_temperature,
                       top_k=rc.eval.sample_top_k, seed=rc.train.seed, mesh=mesh)
        text = tokenizer.decode(out[0])
        summary.update(sample_prompt=rc.eval.sample_prompt, sample=text)
        (run_dir / "sample.txt").write_text(rc.eval.sample_prompt + text + "\n")
        log(f"sample (temperature {rc.eval.sample_temperature}) for prompt {rc.eval.sample_prompt!r}:\n"
            f"{rc.eval.sample_prompt}{text}")
    return summary
