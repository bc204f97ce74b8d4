"""The training run: set-up with fail-fast checks, fresh start or resume, the step loop with logging and
checkpoints, then held-out evaluation, export and a sample. Shared by pretraining and fine-tuning.

A run directory holds config.json, metrics.jsonl (one record per log step), checkpoints/ (orbax;
train state + data position + metadata), export/ (final params), loss_curve.png and summary.json.

A LoRA run (lora.rank > 0) keeps its frozen base weights out of the train state: they are loaded (or drawn)
once, packed once (`packing.pack`) and passed to every step and evaluation as a separate, non-donated
argument; checkpoints hold the adapters, their optimizer state and the data position, and their metadata
records the base's identity (`train_checkpoint.BASE_META`), checked when `--resume` reloads it. The final
export merges the adapters into the base in place (`lora.merge_in_place`), never holding the model twice.
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

from mistral_jax.data import text as data_lib
from mistral_jax.data import shards as data_shards
from mistral_jax.runtime import distributed
from mistral_jax.model import flops
from mistral_jax.training import optim
from mistral_jax.model import packing
from mistral_jax.model import sharding
from mistral_jax.checkpoint import train_state as tc
from mistral_jax.training import run_config as rc_lib
from mistral_jax.training.data_source import DataSource, make_data
from mistral_jax.runtime.prefetch import Prefetcher
from mistral_jax.training import train_step as ts
from mistral_jax.checkpoint.native import load_params, save_params
from mistral_jax.model.config import ModelConfig
from mistral_jax.inference.decode import generate
from mistral_jax.runtime.dtypes import parse_dtype
from mistral_jax.errors import first_line
from mistral_jax.training.metrics import MetricsLog, ScalarSinks, log_record, plot_loss_curve, read_metrics
from mistral_jax.data.tokenizer import DEFAULT_FILES, Tokenizer
from mistral_jax.checkpoint.train_state import TrainCheckpointer
from mistral_jax.errors import RunError, TrainingDiverged


PARAM_LAYOUT = "scanned"  # train-state params: layers stacked under "layers" (checkpoints before had none)


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


# ModelConfig fields that decide the weights' meaning; the others (max_seq_len) may differ from a checkpoint's
NON_ARCH_FIELDS = ("max_seq_len",)


def load_init_params(path: str, cfg: ModelConfig, mesh: Mesh, param_dtype: Any,
                     log: Callable[[str], None] = print, what: str = "--init-from") -> Any:
    """Params of a saved checkpoint for `cfg`, placed on `mesh`; RunError naming `what` and the path
    otherwise.

    The checkpoint's architecture must equal the run's; fields outside it (max_seq_len) may differ, with
    a note: the run's value applies.
    """
    try:
        loaded_cfg, params = load_params(path, mesh=mesh, dtype=param_dtype)
    except (OSError, ValueError) as e:  # CheckpointError, ConfigError, WeightError are ValueErrors
        raise RunError(f"{what} {path}: {first_line(e)}") from None
    diff = {k: v for k, v in loaded_cfg.to_dict().items() if getattr(cfg, k) != v}
    arch = [f"{k} {v!r} (run: {getattr(cfg, k)!r})" for k, v in diff.items() if k not in NON_ARCH_FIELDS]
    if arch:
        raise RunError(f"{what} {path}: its model architecture differs from the run's: {', '.join(arch)}")
    for k, v in diff.items():
        log(f"{what} {path}: checkpoint {k} is {v!r}, the run uses {getattr(cfg, k)!r}")
    return params


def lora_base(rc: rc_lib.RunConfig, cfg: ModelConfig, mesh: Mesh, param_dtype: Any, init_from: str | None,
              log: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """(frozen base weights, their record for the checkpoints) of a fresh LoRA run: the --init-from
    checkpoint (its identity taken before it is read), else random weights from train.seed."""
    if init_from:
        try:
            record = tc.folder_base_record(init_from)
        except (OSError, ValueError) as e:
            raise RunError(f"--init-from {init_from}: {first_line(e)}") from None
        return load_init_params(init_from, cfg, mesh, param_dtype, log), record
    log("note: LoRA (lora.rank > 0) without --init-from trains adapters on random base weights")
    base = ts.init_base(cfg, jax.random.key(rc.train.seed), mesh, param_dtype)
    return base, tc.random_base_record(base, rc.train.seed)


def resumed_lora_base(saved_meta: dict[str, Any], init_from: str | None, cfg: ModelConfig, mesh: Mesh,
                      param_dtype: Any, where: str, log: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """(frozen base weights, their record) for resuming a LoRA run from the checkpoint at `where`: reloaded
    from the recorded path (or --init-from, when given) or drawn again from the recorded seed; RunError
    (one line) when the base is missing or its identity differs from the recorded one, naming both."""
    record = saved_meta.get(tc.BASE_META)
    if not isinstance(record, dict) or "identity" not in record:
        raise RunError(f"--resume: the checkpoint ({where}) holds the LoRA base weights in its train state (written "
                       "before LoRA checkpoints kept only the adapters) and cannot be resumed; use another "
                       "--run-dir with --init-from the base")
    if record.get("kind") == "random":
        seed = record.get("seed")
        base = ts.init_base(cfg, jax.random.key(seed), mesh, param_dtype)
        error = tc.base_mismatch(record, tc.params_identity(base), f"drawn again from seed {seed}")
        if error:
            raise RunError(f"--resume: {error}")
        log(f"LoRA base: random weights drawn again from seed {seed} (identity {record['identity']})")
        return base, record
    path = init_from or record.get("path") or ""
    if not Path(path).is_dir():
        raise RunError(f"--resume: the LoRA base {path} that the checkpoint ({where}) was trained on is missing; "
                       "restore it there or pass --init-from the folder that holds it now")
    try:
        found = tc.folder_base_record(path)
    except (OSError, ValueError) as e:
        raise RunError(f"--resume: the LoRA base {path}: {first_line(e)}") from None
    error = tc.base_mismatch(record, found["identity"], f"at {path}")
    if error:
        raise RunError(f"--resume: {error}")
    log(f"LoRA base: {path} (identity {found['identity']}, as recorded)")
    return load_init_params(path, cfg, mesh, param_dtype, log, what="--resume: the LoRA base"), found


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


def lora_config(rc: rc_lib.RunConfig) -> Any:
    """The run's lora.LoraConfig, or None for full training (lora.rank = 0)."""
    if rc.lora.rank == 0:
        return None
    from mistral_jax.model import lora as lora_lib
    return lora_lib.LoraConfig(rank=rc.lora.rank, alpha=rc.lora.alpha, targets=tuple(rc.lora.targets))


def run(rc: rc_lib.RunConfig, run_dir: str | Path, resume: bool = False, init_from: str | None = None,
        log: Callable[[str], None] = lambda s: print(s, flush=True),
        profile_steps: str | None = None) -> dict[str, Any]:
    """Trains per `rc` in `run_dir`; returns the summary dict.

    Raises RunConfigError / RunError / DataError / FileExistsError before any compilation for bad input
    or an incompatible checkpoint, and TrainingDiverged on a NaN/inf loss, gradient or updated param. profile_steps
    ("A:B") overrides train.profile_steps.
    """
    t_start = time.time()
    if not distributed.is_main():   # every process runs the same program; process 0 speaks for them
        log = lambda s: None  # noqa: E731
    if profile_steps is not None:
        try:
            rc_lib.profile_range(profile_steps)
        except ValueError as e:
            raise RunError(f"--profile-steps: {e}") from None
        rc = rc.replace(train={"profile_steps": profile_steps})
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
    try:
        data_shards.check_shards(rc.data.shards, rc.data.batch_size, rc.optim.grad_accum, jax.process_count())
    except data_lib.DataError as e:
        raise RunError(f"[data]: {e}") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    data = make_data(rc, tokenizer, run_dir)
    log(data.description)

    ckpt = TrainCheckpointer(run_dir / "checkpoints", keep=rc.checkpoint.keep, async_save=rc.checkpoint.async_save)
    try:
        return _run(rc, cfg, run_dir, resume, init_from, log, t_start, dtype, param_dtype, mesh, tokenizer,
                    data, ckpt)
    finally:
        ckpt.close()


def _run(rc, cfg, run_dir, resume, init_from, log, t_start, dtype, param_dtype, mesh, tokenizer,
         data: DataSource, ckpt: TrainCheckpointer) -> dict[str, Any]:
    train_stream = data.train
    lora = lora_config(rc)
    cli_init_from = init_from   # on resume only an explicit --init-from moves a LoRA run's recorded base
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
        except (ValueError, KeyError, TypeError) as e:
            raise RunError(f"--resume: checkpoint step {latest}: {e}") from None
        if init_from and lora is None:
            log(f"--init-from {init_from} ignored: resuming from checkpoint step {latest}")

    schedule_steps, notes = _schedule_steps(rc, saved_meta)
    for note in notes:
        log(note)
    rc = rc.replace(optim={"schedule_steps": schedule_steps})
    optimizer = optim.make_optimizer(rc.optim, schedule_steps)
    schedule = optim.learning_rate_schedule(rc.optim, schedule_steps)
    if not init_from and rc.train.init_from:
        if Path(rc.train.init_from).exists() or not rc.train.init_from_optional:
            init_from = rc.train.init_from
        elif saved_meta is None:
            log(f"train.init_from {rc.train.init_from} does not exist (train.init_from_optional): random init")
    if init_from and saved_meta is None:
        log(f"initial params from {init_from}")
    where = f"step {latest} in {ckpt.directory}"
    init_params, base, base_record = _initial_params(rc, cfg, mesh, param_dtype, lora,
                                                     init_from if saved_meta is None else cli_init_from,
                                                     saved_meta, where, log)
    first = next(train_stream)  # fails here, before compiling anything, for a corpus without text
    state = _initial_state(rc, cfg, mesh, param_dtype, optimizer, lora, ckpt, latest if saved_meta else None,
                           init_params, base, log)

    if rc.train.peak_flops > 0:
        peak, peak_source = rc.train.peak_flops, "train.peak_flops"
    elif saved_meta is not None and saved_meta.get("peak_flops"):
        peak, peak_source = float(saved_meta["peak_flops"]), saved_meta["peak_source"] + ", at the run's start"
    else:
        peak, peak_source = measure_peak(mesh, dtype)
    meta = {"model": cfg.to_dict(), "run_config": rc.to_dict(), "param_layout": PARAM_LAYOUT,
            "schedule_steps": schedule_steps,
            "peak_flops": peak, "peak_source": peak_source}
    if base_record is not None:
        meta[tc.BASE_META] = base_record
    main = distributed.is_main()
    if main:
        (run_dir / "config.json").write_text(json.dumps(rc.to_dict(), indent=1))

    step_fn = ts.make_train_step(cfg, optimizer, schedule, mesh, dtype=dtype, param_dtype=param_dtype,
                                 remat=rc.model.remat, lora=lora)
    if lora is not None:    # the base packed once (no copy) and passed to every step, never donated
        step_fn = _with_frozen_base(step_fn, packing.pack(base))
    flops_per_token = flops.train_flops_per_token(cfg, rc.data.seq_len)
    log(f"model {cfg.dim}d x {cfg.n_layers} layers, mesh {dict(mesh.shape)}, {flops_per_token / 1e6:.1f} "
        f"MFLOP/token, peak {peak / 1e9:.1f} GFLOP/s ({peak_source})")

    if not main:
        metrics_log, notes = MetricsLog.null(), []
    elif saved_meta is not None:
        metrics_log, notes = MetricsLog.resume(run_dir / "metrics.jsonl", latest)
    else:
        metrics_log, notes = MetricsLog.fresh(run_dir / "metrics.jsonl")
    for note in notes:
        log(note)
    try:
        sinks = (ScalarSinks(run_dir / "tensorboard" if rc.train.tensorboard else None, rc.train.wandb_project,
                             run_name=run_dir.name, config=rc.to_dict(), wandb_dir=run_dir)
                 if main else ScalarSinks(None))
    except ImportError as e:
        metrics_log.close()
        raise RunError(str(e)) from None
    baseline: dict[str, Any] = {}
    if rc.eval.before and saved_meta is None:
        # fresh adapters (B = 0) leave the base's outputs bit for bit: its answers are the base's own
        baseline = evaluate(rc, cfg, state["params"], mesh, tokenizer, data, run_dir, dtype, param_dtype, log,
                            lora, sinks, step=0, tag="before", base=base, plain=base)
        if data.val is not None:
            data.val.restore(data.val_start)
    stop = {"sigterm": False}
    old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    n_local = len(getattr(train_stream, "shards", [0]))
    batches = Prefetcher(itertools.chain([first], train_stream),
                         lambda b: ts.put_batch(b, mesh, rc.optim.grad_accum, n_local), train_stream.state,
                         depth=rc.train.prefetch)
    try:
        state = train(rc, state, step_fn, batches, mesh, ckpt, meta, metrics_log, stop, flops_per_token, peak,
                      log, sinks=sinks, profile_dir=run_dir / "profile")
    finally:
        batches.close()
        signal.signal(signal.SIGTERM, old_handler)
        metrics_log.close()
    if stop["sigterm"]:
        sinks.close()
        return {"stopped_by": "SIGTERM", "step": int(state["step"])}

    try:
        summary = evaluate_and_export(rc, cfg, state["params"], mesh, tokenizer, data, run_dir, dtype,
                                      param_dtype, log, lora=lora, sinks=sinks, step=int(state["step"]), base=base)
    finally:
        sinks.close()
    summary.update(steps=int(state["step"]), wall_s=round(time.time() - t_start, 1), schedule_steps=schedule_steps,
                   peak_flops=peak, peak_source=peak_source, flops_per_token=flops_per_token)
    summary.update(baseline)
    if base_record is not None:
        summary[tc.BASE_META] = base_record
    if data.report:
        summary["data"] = data.report
    records = read_metrics(run_dir / "metrics.jsonl") if main else []
    if records:
        summary["final_train_loss"] = records[-1]["loss"]
        tps = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
        summary["median_tokens_per_s"] = float(np.median(tps)) if tps else None
        summary["median_mfu"] = float(np.median([r["mfu"] for r in records if r.get("mfu")])) if tps else None
        plot_loss_curve(records, run_dir / "loss_curve.png")
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _initial_params(rc: rc_lib.RunConfig, cfg: ModelConfig, mesh: Mesh, param_dtype: Any, lora: Any,
                    init_from: str | None, saved_meta: dict[str, Any] | None, where: str,
                    log: Callable[[str], None]) -> tuple[Any, Any, dict[str, Any] | None]:
    """(--init-from params of a fresh full-training run or None, LoRA's frozen base or None, the base's
    record or None): what a run's train state starts from besides its checkpoint (at `where`, when resuming)."""
    if lora is None:
        init_params = (load_init_params(init_from, cfg, mesh, param_dtype, log)
                       if init_from and saved_meta is None else None)
        return init_params, None, None
    if saved_meta is not None:
        return (None, *resumed_lora_base(saved_meta, init_from, cfg, mesh, param_dtype, where, log))
    return (None, *lora_base(rc, cfg, mesh, param_dtype, init_from, log))


def _initial_state(rc: rc_lib.RunConfig, cfg: ModelConfig, mesh: Mesh, param_dtype: Any, optimizer: Any, lora: Any,
                   ckpt: TrainCheckpointer, latest: int | None, init_params: Any, base: Any,
                   log: Callable[[str], None]) -> ts.TrainState:
    """The train state restored from checkpoint step `latest`, or fresh (None): from `init_params` (random
    when None), or with LoRA fresh adapters for `base`."""
    if latest is not None:
        try:
            state, _, _ = ckpt.restore(ts.abstract_state(cfg, optimizer, mesh, param_dtype, lora=lora), latest)
        except Exception as e:  # orbax raises assorted types for unreadable or mismatched arrays
            raise RunError(f"--resume: cannot restore the train state of step {latest} in {ckpt.directory} "
                           f"({type(e).__name__}: {first_line(e)})") from None
        log(f"resumed from step {int(state['step'])} ({ckpt.directory})")
    else:
        state = ts.init_state(cfg, optimizer, jax.random.key(rc.train.seed), mesh, param_dtype,
                              init_params if lora is None else base, lora=lora)
    if lora is not None:
        from mistral_jax.model import lora as lora_lib
        n_train = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
        n_all = n_train + sum(x.size for x in jax.tree_util.tree_leaves(base))
        log(f"LoRA rank {lora.rank}, alpha {lora.alpha} on {', '.join(lora.targets)}: {n_train:,} trained of "
            f"{n_all:,} params; optimizer state {lora_lib.count_bytes(state['opt_state']) / 2**20:.1f} MiB")
    return state


def _with_frozen_base(step_fn: Callable, base_packed: Any) -> Callable:
    """step(state, batch) of a LoRA train step jit(state, base, batch), with the packed base bound."""
    def step(state: ts.TrainState, batch: ts.Batch) -> tuple[ts.TrainState, dict[str, Any]]:
        return step_fn(state, base_packed, batch)
    return step


def train(rc: rc_lib.RunConfig, state: ts.TrainState, step_fn: Callable,
          batches: Iterator[tuple[ts.Batch, dict[str, Any]]], mesh: Mesh, ckpt: TrainCheckpointer,
          meta: dict[str, Any], metrics_log: MetricsLog, stop: dict[str, bool], flops_per_token: float,
          peak: float, log: Callable[[str], None], sinks: ScalarSinks | None = None,
          profile_dir: Path | None = None) -> ts.TrainState:
    """Steps from state['step'] to rc.train.steps over (placed batch, data state after it) pairs: a metrics
    record every log_every steps, a checkpoint (state, data state, meta) every checkpoint.every steps, at
    the end and on SIGTERM (`stop`).

    Step k's metrics are fetched from the device after step k+1 has been dispatched, so the host never
    waits on the device between steps; a non-finite step (whose update the step itself discards) is still
    caught before any later checkpoint is written.
    """
    from tqdm import tqdm

    start, steps = int(state["step"]), rc.train.steps
    log_every, every = rc.train.log_every, rc.checkpoint.every
    profile = rc_lib.profile_range(rc.train.profile_steps) if rc.train.profile_steps else None
    bar = tqdm(total=steps, initial=start, desc="train", disable=not (rc.train.progress and distributed.is_main()),
               dynamic_ncols=True)
    since_log: list[dict[str, Any]] = []
    pending: list[tuple[int, dict[str, Any]]] = []   # (step, device metrics) not yet fetched
    clock = {"last": time.perf_counter(), "first": True}
    tracing = False
    last_saved = start

    def drain() -> None:
        """Fetches the pending steps' metrics (in order): divergence check, log records, progress bar."""
        while pending:
            step, m = pending.pop(0)
            m = jax.device_get(m)
            now = time.perf_counter()
            dt, clock["last"] = now - clock["last"], now
            if not bool(m["finite"]):
                ckpt.wait()
                raise TrainingDiverged(diverged_message(step, m, ckpt.latest_step(), ckpt.directory))
            since_log.append({"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                              "tokens": float(m["tokens"]), "dt": dt, "timed": not clock["first"]})
            clock["first"] = False
            done = step + 1
            bar.update(1)
            if done % log_every == 0 or done == steps:
                rec = log_record(done, since_log, rc.data.batch_size, rc.data.seq_len, flops_per_token, peak)
                metrics_log.write(rec)
                if sinks is not None:
                    sinks.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}")
                if not rc.train.progress:
                    log(json.dumps(rec))
                since_log.clear()

    try:
        for step in range(start, steps):
            if profile is not None and step == profile[0] and not tracing:
                drain()
                jax.profiler.start_trace(str(profile_dir))
                tracing = True
            batch, data_state = next(batches)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, m = step_fn(state, batch)
            drain()   # the previous step's metrics: this step is already queued behind it
            pending.append((step, m))
            done = step + 1
            if tracing and (step == profile[1] or done == steps):
                drain()
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
                log(f"profile of steps {profile[0]}..{step} written to {profile_dir} (open with TensorBoard's "
                    "profile plugin or XProf)")
            if (done % every == 0 or done == steps or stop["sigterm"]) and done != last_saved:
                drain()   # never checkpoint past a diverged step
                ckpt.save(done, state, data_shards.merge_states(distributed.allgather_json(data_state))
                          if "shards" in data_state else data_state, meta)
                last_saved = done
            if stop["sigterm"]:
                drain()
                ckpt.wait()
                log(f"SIGTERM: saved checkpoint at step {done} in {ckpt.directory}; exiting")
                break
        drain()
    finally:
        if tracing:
            jax.profiler.stop_trace()
        bar.close()
    return state


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


def heldout_loss(params: Any, cfg: ModelConfig, mesh: Mesh, val_stream: Iterator, n_batches: int, dtype: Any,
                 param_dtype: Any, lora: Any = None, base: Any = None) -> tuple[float, int]:
    """(mean NLL per target token, target count) over the first n_batches held-out batches; with LoRA,
    `params` are the adapters and `base` the frozen base weights (packed here: no copy)."""
    eval_fn = ts.make_eval_step(cfg, mesh, dtype=dtype, param_dtype=param_dtype, lora=lora)
    args = (params,) if lora is None else (params, packing.pack(base))
    total, count = 0.0, 0.0
    for _ in range(n_batches):
        try:
            batch = next(val_stream)
        except StopIteration:
            break
        s, n = jax.device_get(eval_fn(*args, ts.put_batch(batch, mesh, 1, len(getattr(val_stream, "shards", [0])))))
        total, count = total + float(s), count + float(n)
    if count == 0:
        raise data_lib.DataError("held-out set produced no tokens (data.val_percent too small?)")
    return total / count, int(count)


def answer_exact_match(params: Any, cfg: ModelConfig, mesh: Mesh, tokenizer: Tokenizer,
                       answers: list[tuple[list[int], str]], seed: int, batch_size: int = 16,
                       max_new_tokens: int = 64) -> tuple[float, list[dict[str, Any]]]:
    """(share of prompts whose greedy answer equals the reference after stripping spaces, rows)."""
    rows = []
    for i in range(0, len(answers), batch_size):
        chunk = answers[i:i + batch_size]
        outs = generate(params, cfg, [p for p, _ in chunk], max_new_tokens, seed=seed, mesh=mesh)
        for (_, ref), out in zip(chunk, outs):
            got = tokenizer.decode(out)
            rows.append({"reference": ref, "answer": got, "match": got.strip() == ref.strip()})
    return (sum(r["match"] for r in rows) / len(rows) if rows else 0.0), rows


def evaluate(rc: rc_lib.RunConfig, cfg: ModelConfig, params: Any, mesh: Mesh, tokenizer: Tokenizer,
             data: DataSource, run_dir: Path, dtype: Any, param_dtype: Any, log: Callable[[str], None],
             lora: Any = None, sinks: ScalarSinks | None = None, step: int = 0, tag: str = "",
             base: Any = None, plain: Any = None) -> dict[str, Any]:
    """Held-out loss (on the answers for fine-tuning) and greedy answers' exact match, per rc.eval.

    With LoRA, `params` are the adapters and `base` the frozen base weights. `plain` are the plain model's
    params for the greedy answers, or a function making them (called after the held-out loss); by default
    `params`, or with LoRA `lora.merge` of adapters and base (a copy of the adapted weights).
    tag "" is the final evaluation; another tag (e.g. "before") prefixes the summary fields and files.
    """
    out = heldout_summary(rc, cfg, params, mesh, data, dtype, param_dtype, log, lora, sinks, step, tag, base)
    if rc.eval.answers and data.answers:
        if plain is None and lora is not None:
            from mistral_jax.model import lora as lora_lib
            plain = lora_lib.merge(lora_lib.join(params, base), lora)
        plain = plain() if callable(plain) else params if plain is None else plain
        out.update(answers_summary(rc, cfg, plain, mesh, tokenizer, data, run_dir, log, sinks, step, tag))
    return out


def _label(tag: str) -> tuple[str, str]:
    """(summary field prefix, log label) of an evaluation's tag."""
    return (f"{tag}_" if tag else ""), (f"held-out ({tag})" if tag else "held-out")


def heldout_summary(rc: rc_lib.RunConfig, cfg: ModelConfig, params: Any, mesh: Mesh, data: DataSource,
                    dtype: Any, param_dtype: Any, log: Callable[[str], None], lora: Any = None,
                    sinks: ScalarSinks | None = None, step: int = 0, tag: str = "", base: Any = None
                    ) -> dict[str, Any]:
    """The held-out loss fields of `evaluate` (none without held-out data or eval.batches)."""
    if not (rc.eval.batches and data.val is not None):
        return {}
    pre, label = _label(tag)
    what = "answer loss" if rc.data.source in rc_lib.CHAT_SOURCES else "loss"
    val_loss, n = heldout_loss(params, cfg, mesh, data.val, rc.eval.batches, dtype, param_dtype, lora, base)
    log(f"{label}: {what} {val_loss:.4f} nats/token, perplexity {math.exp(val_loss):.2f} over {n} tokens")
    if sinks is not None:
        sinks.write({"step": step, "loss": val_loss}, prefix="heldout/")
    return {f"{pre}heldout_loss": val_loss, f"{pre}heldout_perplexity": math.exp(val_loss), f"{pre}heldout_tokens": n}


def answers_summary(rc: rc_lib.RunConfig, cfg: ModelConfig, plain: Any, mesh: Mesh, tokenizer: Tokenizer,
                    data: DataSource, run_dir: Path, log: Callable[[str], None], sinks: ScalarSinks | None = None,
                    step: int = 0, tag: str = "") -> dict[str, Any]:
    """The greedy answers' fields of `evaluate`, decoded with the plain model's params `plain`; writes
    <tag_>answers.jsonl (process 0)."""
    pre, label = _label(tag)
    score, rows = answer_exact_match(plain, cfg, mesh, tokenizer, data.answers[:rc.eval.answers], rc.train.seed)
    if distributed.is_main():       # every process decodes; process 0 writes
        with open(run_dir / f"{pre}answers.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    log(f"{label} greedy answers: exact match {score:.3f} over {len(rows)} conversations ({pre}answers.jsonl)")
    if rows:
        log(f"{label} example dialogue:\n{tokenizer.decode(data.answers[0][0])}\n  -> model: "
            f"{rows[0]['answer']!r} (reference {rows[0]['reference']!r})")
    if sinks is not None:
        sinks.write({"step": step, "exact_match": score}, prefix="heldout/")
    return {f"{pre}heldout_exact_match": score, f"{pre}heldout_answers": len(rows)}


def evaluate_and_export(rc: rc_lib.RunConfig, cfg: ModelConfig, params: Any, mesh: Mesh, tokenizer: Tokenizer,
                        data: DataSource, run_dir: Path, dtype: Any, param_dtype: Any,
                        log: Callable[[str], None], lora: Any = None, sinks: ScalarSinks | None = None,
                        step: int = 0, base: Any = None) -> dict[str, Any]:
    """Per rc.eval: the held-out loss, then the export of the plain params, the greedy answers and a sample;
    returns their summary fields.

    With LoRA (`params` the adapters, `base` the frozen base weights) the held-out loss is taken with the
    adapters unmerged; then, if anything needs the plain model, the adapters are merged into the base in
    place (`lora.merge_in_place`: the base arrays become the merged model, nothing is held twice).
    """
    summary = heldout_summary(rc, cfg, params, mesh, data, dtype, param_dtype, log, lora, sinks, step, "", base)
    answers = bool(rc.eval.answers and data.answers)
    plain = params
    if lora is not None and (rc.eval.export or answers or rc.eval.sample_tokens):
        from mistral_jax.model import lora as lora_lib
        plain = lora_lib.merge_in_place(lora_lib.join(params, base), lora)
    if rc.eval.export:         # every process writes its shards of the params (a shared run dir)
        save_params(run_dir / "export", cfg, plain, force=True)
        summary["export"] = str(run_dir / "export")
        if lora is not None:
            summary["export_note"] = "LoRA adapters merged into the weights (W + alpha/rank * A B)"
    if answers:
        summary.update(answers_summary(rc, cfg, plain, mesh, tokenizer, data, run_dir, log, sinks, step))
    if rc.eval.sample_tokens:  # every process decodes; process 0 writes
        prompt_ids = tokenizer.encode(rc.eval.sample_prompt, bos=True)
        out = generate(plain, cfg, [prompt_ids], rc.eval.sample_tokens, temperature=rc.eval.sample_temperature,
                       top_k=rc.eval.sample_top_k, seed=rc.train.seed, mesh=mesh)
        text = tokenizer.decode(out[0])
        summary.update(sample_prompt=rc.eval.sample_prompt, sample=text)
        if distributed.is_main():
            (run_dir / "sample.txt").write_text(rc.eval.sample_prompt + text + "\n")
        log(f"sample (temperature {rc.eval.sample_temperature}) for prompt {rc.eval.sample_prompt!r}:\n"
            f"{rc.eval.sample_prompt}{text}")
    return summary
