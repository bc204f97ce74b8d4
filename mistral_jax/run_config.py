"""Pretraining run configuration: a TOML file of sections plus `--set section.key=value` overrides."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

from mistral_jax.config import ModelConfig


class RunConfigError(ValueError):
    """A run configuration is malformed; the message names the file, section and field."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model: a preset plus field overrides, and the numerics."""
    preset: str = "tiny"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # ModelConfig fields
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master params
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Where text comes from and how rows are packed."""
    source: str = "stdlib"  # "stdlib" (Python's own library sources) or "files"
    paths: Sequence[str] = ()  # globs, for source = "files"
    pattern: str = "**/*.py"  # glob under the stdlib directory, for source = "stdlib"
    exclude: Sequence[str] = ("site-packages", "test", "tests", "__pycache__")  # skip paths with these parts
    max_bytes: int = 200_000  # skip larger files (0: no limit)
    val_percent: float = 5.0  # share of files held out, by a hash of their path
    seq_len: int = 256
    batch_size: int = 8  # global rows per optimizer step (all micro-batches together)
    seed: int = 0
    shuffle_files: int = 64  # files tokenised and row-shuffled together (bounded memory)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW with linear warmup and cosine decay; global-norm clipping; micro-batching."""
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh; one axis may be -1. devices = 0 uses all devices, n uses the first n."""
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    devices: int = 0


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 100
    seed: int = 0
    log_every: int = 10
    peak_flops: float = 0.0  # per-device-set FLOP/s for MFU; 0 measures a matmul once
    nan_at_step: int = -1  # testing aid: poison the loss at this step (0-based) to exercise the NaN stop
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 50
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalSection:
    batches: int = 8  # held-out batches for the final perplexity (0: skip)
    sample_prompt: str = "def "
    sample_tokens: int = 48  # 0: skip the sample
    sample_temperature: float = 0.0  # 0: greedy
    sample_top_k: int = 0
    export: bool = True  # write final params with mistral_jax.checkpoint.save_params


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    mesh: MeshSection = MeshSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()

    def model_config(self) -> ModelConfig:
        """The ModelConfig: preset with overrides applied."""
        cfg = ModelConfig.preset(self.model.preset)
        try:
            return cfg.replace(**dict(self.model.overrides)) if self.model.overrides else cfg
        except TypeError as e:
            raise RunConfigError(f"[model.overrides]: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"]["overrides"] = dict(self.model.overrides)
        d["data"]["paths"] = list(self.data.paths)
        d["data"]["exclude"] = list(self.data.exclude)
        return d


_SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}
_SECTION_CLS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "mesh": MeshSection,
                "train": TrainSection, "checkpoint": CheckpointSection, "eval": EvalSection}


def _section(name: str, d: Mapping[str, Any], source: str) -> Any:
    cls = _SECTION_CLS[name]
    if not isinstance(d, Mapping):
        raise RunConfigError(f"{source}: [{name}] must be a table, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise RunConfigError(f"{source}: unknown field(s) {unknown} in [{name}]; known: {sorted(fields)}")
    kw = {}
    for key, value in d.items():
        default = getattr(cls(), key)
        kw[key] = _check_type(value, default, f"{source}: [{name}] field '{key}'")
    return cls(**kw)


def _check_type(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RunConfigError(f"{where} must be true/false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RunConfigError(f"{where} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunConfigError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise RunConfigError(f"{where} must be a string, got {value!r}")
    elif isinstance(default, (tuple, list)):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise RunConfigError(f"{where} must be a list of strings, got {value!r}")
        value = tuple(value)
    elif isinstance(default, Mapping):
        if not isinstance(value, Mapping):
            raise RunConfigError(f"{where} must be a table, got {value!r}")
        value = dict(value)
    return value


def from_dict(d: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Builds and validates a RunConfig from nested dicts (TOML tables)."""
    unknown = sorted(set(d) - set(_SECTIONS))
    if unknown:
        raise RunConfigError(f"{source}: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
    cfg = RunConfig(**{k: _section(k, v, source) for k, v in d.items()})
    _validate(cfg, source)
    return cfg


def _validate(cfg: RunConfig, source: str) -> None:
    def need(ok: bool, field: str, msg: str) -> None:
        if not ok:
            raise RunConfigError(f"{source}: field '{field}' {msg}")

    need(cfg.data.source in ("stdlib", "files"), "data.source", f"must be 'stdlib' or 'files', got {cfg.data.source!r}")
    need(cfg.data.source != "files" or bool(cfg.data.paths), "data.paths", "must list files/globs when data.source = 'files'")
    need(cfg.data.seq_len >= 2, "data.seq_len", f"must be >= 2, got {cfg.data.seq_len}")
    need(cfg.data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {cfg.data.batch_size}")
    need(cfg.data.shuffle_files >= 1, "data.shuffle_files", f"must be >= 1, got {cfg.data.shuffle_files}")
    need(0 <= cfg.data.val_percent < 100, "data.val_percent", f"must be in [0, 100), got {cfg.data.val_percent}")
    need(cfg.optim.grad_accum >= 1, "optim.grad_accum", f"must be >= 1, got {cfg.optim.grad_accum}")
    need(cfg.data.batch_size % cfg.optim.grad_accum == 0, "optim.grad_accum",
         f"={cfg.optim.grad_accum} must divide data.batch_size={cfg.data.batch_size}")
    need(cfg.optim.lr > 0, "optim.lr", f"must be > 0, got {cfg.optim.lr}")
    need(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {cfg.optim.warmup_steps}")
    need(cfg.train.steps >= 1, "train.steps", f"must be >= 1, got {cfg.train.steps}")
    need(cfg.train.log_every >= 1, "train.log_every", f"must be >= 1, got {cfg.train.log_every}")
    need(cfg.checkpoint.every >= 1, "checkpoint.every", f"must be >= 1, got {cfg.checkpoint.every}")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")
    for name in ("dtype", "param_dtype"):
        value = getattr(cfg.model, name)
        need(value in ("float32", "bfloat16", "float16"), f"model.{name}",
             f"must be float32, bfloat16 or float16, got {value!r}")
    try:
        cfg.model_config()
    except ValueError as e:
        raise RunConfigError(f"{source}: [model]: {e}") from None


def load(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a TOML run config and applies `key=value` overrides (TOML values; bare strings allowed)."""
    path = Path(path)
    if not path.is_file():
        raise RunConfigError(f"run config not found: {path}")
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RunConfigError(f"{path}: invalid TOML ({e})") from None
    for item in overrides:
        apply_override(d, item)
    return from_dict(d, source=str(path))


def apply_override(d: dict[str, Any], item: str) -> None:
    """Applies one `section.key=value` (or `key=value` when the key names one section's field) in place."""
    if "=" not in item:
        raise RunConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as a path or a dtype name
    parts = key.split(".")
    if len(parts) == 1:
        owners = [s for s, cls in _SECTION_CLS.items() if parts[0] in {f.name for f in dataclasses.fields(cls)}]
        if len(owners) != 1:
            raise RunConfigError(f"--set {item!r}: key '{key}' is "
                                 + ("unknown" if not owners else f"ambiguous (in sections {owners})")
                                 + "; write it as section.key")
        parts = [owners[0], parts[0]]
    if parts[0] not in _SECTIONS:
        raise RunConfigError(f"--set {item!r}: unknown section '{parts[0]}'; known: {sorted(_SECTIONS)}")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RunConfigError(f"--set {item!r}: '{p}' is not a table")
    node[parts[-1]] = value
