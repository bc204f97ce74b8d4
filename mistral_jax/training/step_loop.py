"""The step loop of a training run: the train step over prefetched batches, with a metrics record every
train.log_every steps, a checkpoint every checkpoint.every steps, at the end and on SIGTERM, an optional
profiler trace, and a stop on divergence."""

from __future__ import annotations

import itertools
import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
from tqdm import tqdm

from mistral_jax.checkpoint.train_state import TrainCheckpointer
from mistral_jax.data import shards as data_shards
from mistral_jax.errors import TrainingDiverged
from mistral_jax.model import packing
from mistral_jax.runtime import distributed
from mistral_jax.runtime.prefetch import Prefetcher
from mistral_jax.training import run_config as rc_lib
from mistral_jax.training import train_step as ts
from mistral_jax.training.metrics import MetricsLog, ScalarSinks, log_record
from mistral_jax.training.run_setup import RunSetup
from mistral_jax.training.start_state import Start


class StepRecorder:
    """Fetches the dispatched steps' metrics from the device, in step order: stops on a non-finite step
    (TrainingDiverged), writes a record every train.log_every steps (metrics.jsonl, the scalar sinks, and the
    log when there is no progress bar) and moves the progress bar."""

    def __init__(self, rc: rc_lib.RunConfig, ckpt: TrainCheckpointer, metrics_log: MetricsLog, sinks: ScalarSinks,
                 flops_per_token: float, peak: float, log: Callable[[str], None]):
        self.rc, self.ckpt, self.metrics_log, self.sinks, self.log = rc, ckpt, metrics_log, sinks, log
        self.flops_per_token, self.peak = flops_per_token, peak
        self.bar: Any = None
        self._pending: list[tuple[int, dict[str, Any]]] = []   # (step, device metrics) not yet fetched
        self._since_log: list[dict[str, Any]] = []
        self._last = time.perf_counter()
        self._first = True      # the first fetched step included compilation: not timed

    def add(self, step: int, metrics: dict[str, Any]) -> None:
        """Step `step` was dispatched; its metrics (device arrays) are fetched by a later `drain`."""
        self._pending.append((step, metrics))

    def drain(self) -> None:
        """Fetches every pending step's metrics."""
        while self._pending:
            step, m = self._pending.pop(0)
            self._fetched(step, jax.device_get(m))

    def _fetched(self, step: int, m: dict[str, Any]) -> None:
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        if not bool(m["finite"]):
            self.ckpt.wait()
            raise TrainingDiverged(diverged_message(step, m, self.ckpt.latest_step(), self.ckpt.directory))
        self._since_log.append({"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                                "tokens": float(m["tokens"]), "dt": dt, "timed": not self._first})
        self._first = False
        done, rc = step + 1, self.rc
        self.bar.update(1)
        if done % rc.train.log_every == 0 or done == rc.train.steps:
            rec = log_record(done, self._since_log, rc.data.batch_size, rc.data.seq_len, self.flops_per_token,
                             self.peak)
            self.metrics_log.write(rec)
            self.sinks.write(rec)
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}")
            if not rc.train.progress:
                self.log(json.dumps(rec))
            self._since_log.clear()


def train(rc: rc_lib.RunConfig, state: ts.TrainState, step_fn: Callable,
          batches: Iterator[tuple[ts.Batch, dict[str, Any]]], ckpt: TrainCheckpointer, meta: dict[str, Any],
          recorder: StepRecorder, stop: dict[str, bool], profile_dir: Path) -> ts.TrainState:
    """Steps from state['step'] to rc.train.steps over (placed batch, data state after it) pairs, with the
    records of `recorder` and a checkpoint (state, data state, meta) every checkpoint.every steps, at the end
    and on SIGTERM (`stop`).

    Step k's metrics are fetched from the device after step k+1 has been dispatched, so the host never
    waits on the device between steps; a non-finite step (whose update the step itself discards) is still
    caught before any later checkpoint is written.
    """
    start, steps = int(state["step"]), rc.train.steps
    profile = rc_lib.profile_range(rc.train.profile_steps) if rc.train.profile_steps else None
    recorder.bar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True,
                        disable=not (rc.train.progress and distributed.is_main()))
    tracing, last_saved = False, start
    try:
        for step in range(start, steps):
            if profile is not None and step == profile[0] and not tracing:
                recorder.drain()
                jax.profiler.start_trace(str(profile_dir))
                tracing = True
            batch, data_state = next(batches)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, m = step_fn(state, batch)
            recorder.drain()   # the previous step's metrics: this step is already queued behind it
            recorder.add(step, m)
            done = step + 1
            if tracing and (step == profile[1] or done == steps):
                recorder.drain()
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
                recorder.log(f"profile of steps {profile[0]}..{step} written to {profile_dir} (open with "
                             "TensorBoard's profile plugin or XProf)")
            if (done % rc.checkpoint.every == 0 or done == steps or stop["sigterm"]) and done != last_saved:
                recorder.drain()   # never checkpoint past a diverged step
                ckpt.save(done, state, _global_data_state(data_state), meta)
                last_saved = done
            if stop["sigterm"]:
                recorder.drain()
                ckpt.wait()
                recorder.log(f"SIGTERM: saved checkpoint at step {done} in {ckpt.directory}; exiting")
                break
        recorder.drain()
    finally:
        if tracing:
            jax.profiler.stop_trace()
        recorder.bar.close()
    return state


def run_steps(setup: RunSetup, start: Start, meta: dict[str, Any],
              recorder: StepRecorder) -> tuple[ts.TrainState, bool]:
    """(the state after the step loop, whether SIGTERM stopped it early: its checkpoint is saved): the train
    step built for the run (with LoRA, the base packed once and bound), batches read ahead by a Prefetcher."""
    rc, mesh, train_stream = setup.rc, setup.mesh, setup.data.train
    step_fn = ts.make_train_step(setup.cfg, start.optimizer, start.schedule, mesh, dtype=setup.dtype,
                                 param_dtype=setup.param_dtype, remat=rc.model.remat, lora=setup.lora)
    if setup.lora is not None:    # the base packed once (no copy) and passed to every step, never donated
        step_fn = _with_frozen_base(step_fn, packing.pack(start.base))
    stop = {"sigterm": False}
    old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    n_local = len(getattr(train_stream, "shards", [0]))
    batches = Prefetcher(itertools.chain([start.first], train_stream),
                         lambda b: ts.put_batch(b, mesh, rc.optim.grad_accum, n_local), train_stream.state,
                         depth=rc.train.prefetch)
    try:
        state = train(rc, start.state, step_fn, batches, setup.ckpt, meta, recorder, stop,
                      setup.run_dir / "profile")
    finally:
        batches.close()
        signal.signal(signal.SIGTERM, old_handler)
        recorder.metrics_log.close()
    return state, stop["sigterm"]


def _with_frozen_base(step_fn: Callable, base_packed: Any) -> Callable:
    """step(state, batch) of a LoRA train step jit(state, base, batch), with the packed base bound."""
    def step(state: ts.TrainState, batch: ts.Batch) -> tuple[ts.TrainState, dict[str, Any]]:
        return step_fn(state, base_packed, batch)
    return step


def _global_data_state(data_state: dict[str, Any]) -> dict[str, Any]:
    """The data position a checkpoint records: every process's shards' positions merged, for sharded streams."""
    return data_shards.merge_states(distributed.allgather_json(data_state))


def diverged_message(step: int, m: dict[str, Any], last_good: int | None, directory: Path) -> str:
    """The one line of a TrainingDiverged: what was non-finite at `step` (its fetched metrics `m`: the loss
    or gradient norm, else the params the update would have made) and the last good checkpoint."""
    loss, grad_norm, lr = float(m["loss"]), float(m["grad_norm"]), float(m["lr"])
    if math.isfinite(loss) and math.isfinite(grad_norm):
        what = (f"non-finite params after the update of step {step} (loss={loss}, grad_norm={grad_norm}, "
                f"lr={lr}: the update itself overflowed)")
    else:
        what = f"non-finite training loss at step {step} (loss={loss}, grad_norm={grad_norm})"
    last = (f"Last good checkpoint: step {last_good} in {directory}" if last_good is not None
            else f"No checkpoint was written ({directory})")
    return (f"{what}; the update was not applied and training stopped. {last}. Lower optim.lr (or "
            "optim.weight_decay) or raise optim.warmup_steps, then "
            + ("resume with --resume." if last_good is not None else "start again."))
