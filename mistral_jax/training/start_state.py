"""Where a training run starts: a fresh train state (random, or from --init-from params: a folder or a Hugging
Face Hub id), or the latest checkpoint on --resume, checked against the run's config first.

A LoRA run (lora.rank > 0, or lora.init_from: adapters that start from a PEFT folder) keeps its frozen base
weights out of the train state: they are loaded (or drawn) once here; checkpoints hold the adapters, their
optimizer state and the data position, and their metadata records the base's identity
(`train_state.BASE_META`), checked when --resume reloads it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from mistral_jax.checkpoint import train_state as tc
from mistral_jax.checkpoint import peft
from mistral_jax.checkpoint.hub import resolve_checkpoint
from mistral_jax.checkpoint.native import load_params
from mistral_jax.errors import CheckpointError, RunError, first_line
from mistral_jax.model import lora as lora_lib
from mistral_jax.model.config import ModelConfig
from mistral_jax.training import optim
from mistral_jax.training import run_config as rc_lib
from mistral_jax.training import train_step as ts
from mistral_jax.training.run_setup import Log, RunSetup

# ModelConfig fields that decide the weights' meaning; the others (max_seq_len) may differ from a checkpoint's
NON_ARCH_FIELDS = ("max_seq_len",)

Meta = dict[str, Any]   # a train checkpoint's metadata: model and run config, schedule length, peak FLOP/s, ...


@dataclasses.dataclass
class Start:
    """A run's starting point: the train state and step function parts, the LoRA base and its record (None
    without LoRA), the metadata of the checkpoint resumed from (None at a fresh start) and the first batch."""
    state: ts.TrainState
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    base: Any
    base_record: dict[str, Any] | None
    saved_meta: Meta | None
    first: dict[str, Any]


def resume_point(setup: RunSetup, resume: bool, init_from: str | None) -> tuple[Meta | None, int | None]:
    """(metadata, step) of the checkpoint the run continues from, or (None, None) for a fresh start; moves the
    train stream to the checkpoint's data position. FileExistsError for checkpoints without --resume,
    RunError for an unreadable checkpoint or one written with a config that may not change on resume."""
    ckpt, log, rc = setup.ckpt, setup.log, setup.rc
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise FileExistsError(f"{ckpt.directory} already has checkpoints (latest step {latest}); "
                              "pass --resume to continue or choose another --run-dir")
    if not resume:
        return None, None
    if latest is None:
        log(f"--resume: no checkpoint in {ckpt.directory}; starting a fresh run")
        return None, None
    try:
        data_state, saved_meta = ckpt.read_meta(latest)
    except Exception as e:  # orbax raises assorted types for unreadable checkpoints
        raise RunError(f"--resume: cannot read checkpoint step {latest} in {ckpt.directory} "
                       f"({type(e).__name__}: {first_line(e)})") from None
    changes = rc_lib.resume_changes(saved_meta["run_config"], saved_meta["model"], rc)
    if changes:
        raise RunError(
            f"--resume: the checkpoint (step {latest} in {ckpt.directory}) was written with a different "
            f"config: {'; '.join(changes)}. Only {', '.join(rc_lib.RESUMABLE_CHANGES)} may change on "
            "resume; use another --run-dir (with --init-from an exported checkpoint to keep the params)")
    try:
        setup.data.train.restore(data_state)
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"--resume: checkpoint step {latest}: {e}") from None
    if init_from and setup.lora is None:
        log(f"--init-from {init_from} ignored: resuming from checkpoint step {latest}")
    return saved_meta, latest


def schedule_steps(rc: rc_lib.RunConfig, saved_meta: Meta | None) -> tuple[int, list[str]]:
    """(length of the lr schedule, notes): train.steps at a fresh start unless optim.schedule_steps is set;
    the checkpoint's length on resume unless optim.schedule_steps is set."""
    if saved_meta is None:
        return rc.optim.schedule_steps or rc.train.steps, []
    saved = saved_meta["schedule_steps"]
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


def begin(setup: RunSetup, saved_meta: Meta | None, latest: int | None, init_from: str | None) -> Start:
    """The run's Start (`setup.rc` has its schedule length resolved): the restored or fresh train state, the
    LoRA base, and the first batch (read before anything compiles: a corpus without text fails here).
    On resume only an explicit --init-from (`init_from`) moves a LoRA run's recorded base."""
    rc, log = setup.rc, setup.log
    optimizer = optim.make_optimizer(rc.optim, rc.optim.schedule_steps)
    schedule = optim.learning_rate_schedule(rc.optim, rc.optim.schedule_steps)
    name = init_from
    if saved_meta is None:
        init_from, name = _fresh_init_from(rc, init_from, log)
    init_params, base, base_record = _initial_params(setup, init_from, saved_meta, latest, name)
    first = next(setup.data.train)
    state = _initial_state(setup, optimizer, latest if saved_meta is not None else None, init_params, base)
    return Start(state, optimizer, schedule, base, base_record, saved_meta, first)


def resolve_init_from(init_from: str, what: str = "--init-from") -> str:
    """The folder to read for `init_from`: a local path as given, else the snapshot folder of the Hugging Face
    Hub id `org/name[@revision]` it names (`hub.resolve_checkpoint`); RunError (one line naming `what`)
    when it is neither."""
    try:
        return str(resolve_checkpoint(init_from))
    except CheckpointError as e:
        raise RunError(f"{what} {first_line(e)}") from None


def _fresh_init_from(rc: rc_lib.RunConfig, init_from: str | None, log: Log) -> tuple[str | None, str | None]:
    """(the folder a fresh run's params start from, its name as given: a path or Hub id): --init-from, else
    train.init_from ((None, None) when it is optional and missing: random init, with a note)."""
    name = init_from
    if init_from:
        init_from = resolve_init_from(init_from)
    elif rc.train.init_from:
        try:
            init_from, name = str(resolve_checkpoint(rc.train.init_from)), rc.train.init_from
        except CheckpointError as e:
            if not rc.train.init_from_optional:
                raise RunError(f"train.init_from {first_line(e)}") from None
            log(f"train.init_from {first_line(e)} (train.init_from_optional): random init")
    if init_from:
        log(f"initial params from {name}" + (f" ({init_from})" if init_from != name else ""))
    return init_from, name


def _initial_params(setup: RunSetup, init_from: str | None, saved_meta: Meta | None, latest: int | None,
                    name: str | None = None) -> tuple[Any, Any, dict[str, Any] | None]:
    """(--init-from params of a fresh full-training run or None, LoRA's frozen base or None, the base's
    record or None): what a run's train state starts from besides its checkpoint. `init_from` is the folder
    to read, `name` the path or Hub id it was given as."""
    s = setup
    if s.lora is None:
        init_params = (load_init_params(init_from, s.cfg, s.mesh, s.param_dtype, s.log)
                       if init_from and saved_meta is None else None)
        return init_params, None, None
    if saved_meta is not None:
        where = f"step {latest} in {s.ckpt.directory}"
        return (None, *resumed_lora_base(saved_meta, init_from, s.cfg, s.mesh, s.param_dtype, where, s.log))
    return (None, *lora_base(s.rc, s.cfg, s.mesh, s.param_dtype, init_from, s.log, name))


def _initial_state(setup: RunSetup, optimizer: optax.GradientTransformation, latest: int | None,
                   init_params: Any, base: Any) -> ts.TrainState:
    """The train state restored from checkpoint step `latest`, or fresh (None): from `init_params` (random
    when None), or with LoRA fresh adapters for `base`."""
    s, lora = setup, setup.lora
    if latest is not None:
        try:
            state, _, _ = s.ckpt.restore(ts.abstract_state(s.cfg, optimizer, s.mesh, s.param_dtype, lora=lora), latest)
        except Exception as e:  # orbax raises assorted types for unreadable or mismatched arrays
            raise RunError(f"--resume: cannot restore the train state of step {latest} in {s.ckpt.directory} "
                           f"({type(e).__name__}: {first_line(e)})") from None
        s.log(f"resumed from step {int(state['step'])} ({s.ckpt.directory})")
    else:
        state = ts.init_state(s.cfg, optimizer, jax.random.key(s.rc.train.seed), s.mesh, s.param_dtype,
                              init_params if lora is None else base, lora=lora, adapters=_peft_adapters(s))
    if lora is not None:
        n_train = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
        n_all = n_train + sum(x.size for x in jax.tree_util.tree_leaves(base))
        s.log(f"LoRA rank {lora.rank}, alpha {lora.alpha} on {', '.join(lora.targets)}: {n_train:,} trained of "
              f"{n_all:,} params; optimizer state {lora_lib.count_bytes(state['opt_state']) / 2**20:.1f} MiB")
    return state


def _peft_adapters(s: RunSetup) -> Any:
    """A fresh LoRA run's starting adapters from the PEFT folder lora.init_from (None: fresh, B = 0)."""
    folder = s.rc.lora.init_from
    if s.lora is None or not folder:
        return None
    try:
        lcfg, adapters = peft.load_peft_adapter(folder, s.cfg)
    except (OSError, ValueError) as e:   # CheckpointError, WeightError are ValueErrors
        raise RunError(f"lora.init_from {first_line(e)}") from None
    s.log(f"LoRA adapters from {folder} ({peft.describe(lcfg)})")
    return adapters


def load_init_params(path: str, cfg: ModelConfig, mesh: Mesh, param_dtype: Any, log: Log = print,
                     what: str = "--init-from") -> Any:
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
              log: Log, name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(frozen base weights, their record for the checkpoints) of a fresh LoRA run: the --init-from
    checkpoint folder (its identity taken before it is read; a Hub id it was given as, `name`, recorded as
    "hub_id"), else random weights from train.seed."""
    if init_from:
        try:
            record = tc.folder_base_record(init_from)
        except (OSError, ValueError) as e:
            raise RunError(f"--init-from {init_from}: {first_line(e)}") from None
        if name and not Path(name).exists():
            record["hub_id"] = name
        return load_init_params(init_from, cfg, mesh, param_dtype, log), record
    log("note: LoRA (lora.rank > 0) without --init-from trains adapters on random base weights")
    base = ts.init_base(cfg, jax.random.key(rc.train.seed), mesh, param_dtype)
    return base, tc.random_base_record(base, rc.train.seed)


def resumed_lora_base(saved_meta: Meta, init_from: str | None, cfg: ModelConfig, mesh: Mesh, param_dtype: Any,
                      where: str, log: Log) -> tuple[Any, dict[str, Any]]:
    """(frozen base weights, their record) for resuming a LoRA run from the checkpoint at `where`: reloaded
    from the recorded path (or --init-from, when given) or drawn again from the recorded seed; RunError
    (one line) when the base is missing or its identity differs from the recorded one, naming both."""
    record = saved_meta[tc.BASE_META]
    if record["kind"] == "random":
        seed = record["seed"]
        base = ts.init_base(cfg, jax.random.key(seed), mesh, param_dtype)
        error = tc.base_mismatch(record, tc.params_identity(base), f"drawn again from seed {seed}")
        if error:
            raise RunError(f"--resume: {error}")
        log(f"LoRA base: random weights drawn again from seed {seed} (identity {record['identity']})")
        return base, record
    path = init_from or record["path"]
    if init_from:
        try:
            path = str(resolve_checkpoint(init_from))   # a Hub id's snapshot; a missing folder is reported below
        except CheckpointError:
            pass
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
    if init_from and not Path(init_from).exists():   # the Hub id it was read by, for the exported adapter
        found["hub_id"] = init_from
    elif not init_from and record.get("hub_id"):
        found["hub_id"] = record["hub_id"]
    log(f"LoRA base: {path} (identity {found['identity']}, as recorded)")
    return load_init_params(path, cfg, mesh, param_dtype, log, what="--resume: the LoRA base"), found
