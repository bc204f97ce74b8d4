"""The training run, shared by pretraining and fine-tuning: set-up with fail-fast checks (`run_setup`), a fresh
start or resume (`start_state`), the step loop with logging and checkpoints (`step_loop`), then held-out
evaluation, export and a sample (`heldout`).

A run directory holds config.json, metrics.jsonl (one record per log step), checkpoints/ (orbax;
train state + data position + metadata), export/ (final params; a LoRA run's with its adapters merged, and
adapter/ beside it: the adapters as a PEFT folder), loss_curve.png and summary.json (W&B: wandb/, wandb_id).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mistral_jax.checkpoint import train_state as tc
from mistral_jax.errors import RunError
from mistral_jax.model import flops
from mistral_jax.runtime import distributed
from mistral_jax.runtime.files import write_atomic
from mistral_jax.training import run_config as rc_lib
from mistral_jax.training import start_state
from mistral_jax.training.heldout import evaluate, evaluate_and_export
from mistral_jax.training.metrics import MetricsLog, ScalarSinks, plot_loss_curve, read_metrics, wandb_run_id
from mistral_jax.training.run_setup import RunSetup, peak_flops, prepare
from mistral_jax.training.step_loop import StepRecorder, run_steps


def run(rc: rc_lib.RunConfig, run_dir: str | Path, resume: bool = False, init_from: str | None = None,
        log: Callable[[str], None] = lambda s: print(s, flush=True),
        profile_steps: str | None = None) -> dict[str, Any]:
    """Trains per `rc` in `run_dir`; returns the summary dict.

    Raises RunConfigError / RunError / DataError / FileExistsError before any compilation for bad input
    or an incompatible checkpoint, and TrainingDiverged on a NaN/inf loss, gradient or updated param. profile_steps
    ("A:B") overrides train.profile_steps.
    """
    if not distributed.is_main():   # every process runs the same program; process 0 speaks for them
        log = lambda s: None  # noqa: E731
    setup = prepare(rc, Path(run_dir), log, profile_steps)
    try:
        return _run(setup, resume, init_from)
    finally:
        setup.ckpt.close()


def _run(setup: RunSetup, resume: bool, init_from: str | None) -> dict[str, Any]:
    """`run` once its fixed parts are prepared: start, steps, evaluation, summary."""
    saved_meta, latest = start_state.resume_point(setup, resume, init_from)
    n_schedule, notes = start_state.schedule_steps(setup.rc, saved_meta)
    for note in notes:
        setup.log(note)
    setup = dataclasses.replace(setup, rc=setup.rc.replace(optim={"schedule_steps": n_schedule}))
    start = start_state.begin(setup, saved_meta, latest, init_from)
    rc, cfg, run_dir, log = setup.rc, setup.cfg, setup.run_dir, setup.log

    peak, peak_source = peak_flops(setup, saved_meta)
    meta = {"model": cfg.to_dict(), "run_config": rc.to_dict(), "schedule_steps": n_schedule,
            "peak_flops": peak, "peak_source": peak_source}
    if start.base_record is not None:
        meta[tc.BASE_META] = start.base_record
    if distributed.is_main():
        write_atomic(run_dir / "config.json", json.dumps(rc.to_dict(), indent=1))
    flops_per_token = flops.train_flops_per_token(cfg, rc.data.seq_len)
    log(f"model {cfg.dim}d x {cfg.n_layers} layers, mesh {dict(setup.mesh.shape)}, {flops_per_token / 1e6:.1f} "
        f"MFLOP/token, peak {peak / 1e9:.1f} GFLOP/s ({peak_source})")

    metrics_log, sinks = _outputs(setup, latest if saved_meta is not None else None)
    recorder = StepRecorder(rc, setup.ckpt, metrics_log, sinks, flops_per_token, peak, log)
    try:
        baseline = _baseline(setup, start, sinks)
        state, stopped = run_steps(setup, start, meta, recorder)
        if stopped:
            return {"stopped_by": "SIGTERM", "step": int(state["step"])}
        summary = evaluate_and_export(setup, state["params"], sinks, step=int(state["step"]), base=start.base,
                                      base_name=_base_name(start.base_record))
    finally:
        sinks.close()
    summary.update(steps=int(state["step"]), wall_s=round(time.time() - setup.t_start, 1),
                   schedule_steps=n_schedule, peak_flops=peak, peak_source=peak_source,
                   flops_per_token=flops_per_token)
    summary.update(baseline)
    return _finish(setup, summary, start.base_record)


def _outputs(setup: RunSetup, resumed_step: int | None) -> tuple[MetricsLog, ScalarSinks]:
    """The run's metrics.jsonl (fresh, or cut back to the checkpoint `resumed_step`) and scalar sinks
    (TensorBoard, W&B); on processes other than process 0, ones that write nothing."""
    rc, run_dir = setup.rc, setup.run_dir
    if not distributed.is_main():
        return MetricsLog.null(), ScalarSinks(None)
    if resumed_step is not None:
        metrics_log, notes = MetricsLog.resume(run_dir / "metrics.jsonl", resumed_step)
    else:
        metrics_log, notes = MetricsLog.fresh(run_dir / "metrics.jsonl")
    for note in notes:
        setup.log(note)
    run_id = wandb_run_id(run_dir, resumed_step is not None) if rc.train.wandb_project else None
    try:
        sinks = ScalarSinks(run_dir / "tensorboard" if rc.train.tensorboard else None, rc.train.wandb_project,
                            run_name=run_dir.name, config=rc.to_dict(), wandb_dir=run_dir, run_id=run_id)
    except (ImportError, RuntimeError) as e:
        metrics_log.close()
        raise RunError(str(e)) from None
    return metrics_log, sinks


def _baseline(setup: RunSetup, start: start_state.Start, sinks: ScalarSinks) -> dict[str, Any]:
    """The "before" evaluation of a fresh run (eval.before), its held-out stream rewound after it."""
    if not (setup.rc.eval.before and start.saved_meta is None):
        return {}
    # fresh adapters (B = 0) leave the base's outputs bit for bit: its answers are the base's own
    baseline = evaluate(setup, start.state["params"], sinks, step=0, tag="before", base=start.base,
                        plain=start.base)
    if setup.data.val is not None:
        setup.data.val.restore(setup.data.val_start)
    return baseline


def _base_name(record: dict[str, Any] | None) -> str | None:
    """A LoRA base's name for its PEFT adapter's base_model_name_or_path: the Hub id or the folder it was
    read from; None for random base weights (or full training)."""
    if record is None or record.get("kind") != "checkpoint":
        return None
    return record.get("hub_id") or record.get("path")


def _finish(setup: RunSetup, summary: dict[str, Any], base_record: dict[str, Any] | None) -> dict[str, Any]:
    """The summary completed with the base record, data report and training-metrics medians; process 0
    writes loss_curve.png and summary.json."""
    if base_record is not None:
        summary[tc.BASE_META] = base_record
    if setup.data.report:
        summary["data"] = setup.data.report
    main = distributed.is_main()
    records = read_metrics(setup.run_dir / "metrics.jsonl") if main else []
    if records:
        summary["final_train_loss"] = records[-1]["loss"]
        tps = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
        summary["median_tokens_per_s"] = float(np.median(tps)) if tps else None
        summary["median_mfu"] = float(np.median([r["mfu"] for r in records if r.get("mfu")])) if tps else None
        plot_loss_curve(records, setup.run_dir / "loss_curve.png")
    if main:
        write_atomic(setup.run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary
