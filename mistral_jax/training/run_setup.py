"""A training run's fixed parts, prepared and checked before anything compiles: the config, mesh, dtypes,
tokenizer, data streams and checkpointer (`prepare` -> `RunSetup`)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from mistral_jax.checkpoint import peft
from mistral_jax.checkpoint.train_state import TrainCheckpointer
from mistral_jax.data import shards as data_shards
from mistral_jax.data.tokenizer import DEFAULT_FILES, Tokenizer
from mistral_jax.errors import CheckpointError, DataError, RunError, first_line
from mistral_jax.model import flops, sharding
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.lora_config import LoraConfig
from mistral_jax.runtime.dtypes import parse_dtype
from mistral_jax.training import run_config as rc_lib
from mistral_jax.training import train_step as ts
from mistral_jax.training.data_source import DataSource
from mistral_jax.training.sources import make_data

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What every stage of a run reads: its config (`rc`, with optim.schedule_steps resolved once the start is
    known), model config, folder, mesh, compute and master-param dtypes, tokenizer, data, checkpointer, log."""
    rc: rc_lib.RunConfig
    cfg: ModelConfig
    run_dir: Path
    mesh: Mesh
    dtype: Any
    param_dtype: Any
    tokenizer: Tokenizer
    data: DataSource
    ckpt: TrainCheckpointer
    log: Log
    t_start: float                 # time.time() when the run began
    lora: LoraConfig | None        # None: full training (lora.rank = 0)


def prepare(rc: rc_lib.RunConfig, run_dir: Path, log: Log, profile_steps: str | None = None) -> RunSetup:
    """The run's fixed parts; RunError / DataError / RunConfigError for bad input, before any compilation.
    profile_steps ("A:B") overrides train.profile_steps. The caller closes `ckpt`."""
    t_start = time.time()
    if profile_steps is not None:
        try:
            rc_lib.profile_range(profile_steps)
        except ValueError as e:
            raise RunError(f"--profile-steps: {e}") from None
        rc = rc.replace(train={"profile_steps": profile_steps})
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
    except DataError as e:
        raise RunError(f"[data]: {e}") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    data = make_data(rc, tokenizer, run_dir)
    log(data.description)
    ckpt = TrainCheckpointer(run_dir / "checkpoints", keep=rc.checkpoint.keep, async_save=rc.checkpoint.async_save)
    return RunSetup(rc, cfg, run_dir, mesh, dtype, param_dtype, tokenizer, data, ckpt, log, t_start,
                    lora_config(rc, cfg))


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


def lora_config(rc: rc_lib.RunConfig, cfg: ModelConfig) -> LoraConfig | None:
    """The run's LoraConfig, or None for full training (lora.rank = 0 without lora.init_from). With
    lora.init_from, the PEFT adapter's r, lora_alpha and target_modules, checked against the rank (unless 0),
    alpha and targets the config sets explicitly; RunError (one line naming the file and field) otherwise."""
    lo = rc.lora
    if not lo.init_from:
        return None if lo.rank == 0 else LoraConfig(rank=lo.rank, alpha=lo.alpha, targets=tuple(lo.targets))
    given = lo.model_fields_set
    try:
        adapter, _ = peft.read_adapter_config(lo.init_from, cfg)
        return peft.check_run_lora(adapter, lo.init_from, rank=lo.rank or None,
                                   alpha=lo.alpha if "alpha" in given else None,
                                   targets=lo.targets if "targets" in given else None)
    except CheckpointError as e:
        raise RunError(f"lora.init_from {first_line(e)}") from None


def measure_peak(mesh: Mesh, dtype: Any) -> tuple[float, str]:
    """(peak FLOP/s of the mesh, how it was obtained): a 1024^3 matmul timed on one device, times the devices."""
    one = flops.measure_peak_flops(1024, dtype)
    if jax.default_backend() == "cpu":  # simulated CPU devices share the same cores
        return one, f"measured 1024^3 {np.dtype(dtype).name} matmul on the host CPU"
    n = mesh.devices.size
    return one * n, f"measured 1024^3 {np.dtype(dtype).name} matmul x {n} devices"


def peak_flops(setup: RunSetup, saved_meta: dict[str, Any] | None) -> tuple[float, str]:
    """(peak FLOP/s for MFU, its source): train.peak_flops when set, else the one measured at the run's start
    (recorded in its checkpoints), else measured now."""
    if setup.rc.train.peak_flops > 0:
        return setup.rc.train.peak_flops, "train.peak_flops"
    if saved_meta is not None:
        return float(saved_meta["peak_flops"]), saved_meta["peak_source"] + ", at the run's start"
    return measure_peak(setup.mesh, setup.dtype)
