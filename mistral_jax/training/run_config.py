"""Training run configuration: pydantic models read from a TOML file of sections, plus `--set` overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from mistral_jax.errors import RunConfigError
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.lora_config import TARGETS as LORA_TARGETS
from mistral_jax.model.lora_config import lora_rank_error


DtypeName = Literal["float32", "bfloat16", "float16"]
StrTuple = Annotated[tuple[str, ...], Field(strict=False)]  # TOML arrays arrive as lists


def _mesh_axis(v: int) -> int:
    if v != -1 and v < 1:
        raise ValueError("must be a positive integer or -1 (the remaining devices)")
    return v


MeshAxis = Annotated[int, AfterValidator(_mesh_axis)]


# "none": keep activations; "full": recompute each block in the backward pass; "dots": keep matmul outputs
RematName = Literal["none", "full", "dots"]


class _Section(BaseModel):
    """A config section: unknown fields refused, values not coerced, and every float finite (no inf/nan:
    TOML's `inf` and `nan` are valid literals, and an infinite lr or weight decay would train NaN params)."""
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelSection(_Section):
    """Which model: a preset plus field overrides, and the numerics."""
    preset: str = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict)  # ModelConfig fields
    dtype: DtypeName = "bfloat16"  # compute dtype
    param_dtype: DtypeName = "float32"  # master params
    remat: RematName = "none"


TEXT_SOURCES = ("stdlib", "files")        # pretraining: documents packed into rows
CHAT_SOURCES = ("chat", "chat-examples")  # fine-tuning: conversations, loss on the answers


class DataSection(_Section):
    """Where text comes from and how rows are packed."""
    # "stdlib": Python's own library sources; "files": the `paths` globs (.jsonl files give their lines' "text");
    # "chat": JSONL conversations at `paths` (held out: `val_paths`); "chat-examples": the built-in instruction
    # set (mistral_jax.data.chat_examples), written into the run directory
    source: Literal["stdlib", "files", "chat", "chat-examples"] = "stdlib"
    paths: StrTuple = ()  # globs, for source = "files" or "chat"
    val_paths: StrTuple = ()  # held-out conversation files for source = "chat" (else val_percent of the lines)
    on_error: Literal["skip", "stop"] = "skip"  # bad conversation lines: skip and count, or stop the run
    examples: int = Field(4000, ge=1)  # conversations written for source = "chat-examples" (held out: val_percent)
    example_tasks: StrTuple = ("module", "function", "parity", "add", "first_word", "last_word")  # chat_examples kinds
    pattern: str = "**/*.py"  # glob under the stdlib directory, for source = "stdlib"
    # skip files with one of these names among their path parts below the corpus root
    exclude: StrTuple = ("site-packages", "test", "tests", "__pycache__")
    max_bytes: int = Field(200_000, ge=0)  # skip larger files (0: no limit)
    val_percent: float = Field(5.0, ge=0, lt=100)  # share of files held out, by a hash of their path
    seq_len: int = Field(256, ge=2)
    batch_size: int = Field(8, ge=1)  # global rows per optimizer step (all micro-batches together)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # a jax.random key seed
    shuffle_files: int = Field(64, ge=1)  # files tokenised and row-shuffled together (bounded memory)
    tokenizer: str = ""  # SentencePiece model file; "" = Mistral's own for the model vocab (v3 for 32768, else v1)
    # independent reader streams over disjoint parts of the corpus, each supplying batch_size / shards rows
    # of every batch; processes split the shards, so it must be a multiple of the process count
    shards: int = Field(1, ge=1)


class OptimSection(_Section):
    """AdamW with linear warmup and cosine decay; global-norm clipping; micro-batching."""
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    clip_norm: float = Field(1.0, ge=0)  # 0: no clipping
    grad_accum: int = Field(1, ge=1)
    # length of the warmup + cosine schedule. 0: train.steps at a fresh start, the checkpoint's length on
    # --resume (so more train.steps continue at the final lr); a value re-stretches on purpose.
    schedule_steps: int = Field(0, ge=0)


class MeshSection(_Section):
    """Device mesh; one axis may be -1. devices = 0 uses all devices, n uses the first n."""
    data: MeshAxis = 1
    fsdp: MeshAxis = -1
    tensor: MeshAxis = 1
    devices: int = Field(0, ge=0)


class TrainSection(_Section):
    steps: int = Field(100, ge=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # a jax.random key seed
    log_every: int = Field(10, ge=1)
    peak_flops: float = Field(0.0, ge=0)  # FLOP/s of the device set for MFU; 0: measure once per run
    progress: bool = True
    tensorboard: bool = True  # TensorBoard event files in <run dir>/tensorboard
    wandb_project: str = ""  # also log to Weights & Biases (needs `pip install wandb`)
    profile_steps: str = ""  # "A:B": a jax.profiler trace of steps A..B (0-based) in <run dir>/profile
    prefetch: int = Field(2, ge=1)  # batches read and placed ahead of the running step
    # start from these params (a folder load_params reads) unless --init-from is given; with
    # init_from_optional, a missing folder means random init (with a note) instead of an error
    init_from: str = ""
    init_from_optional: bool = False


class LoraSection(_Section):
    """Low-rank adapters: rank 0 trains every weight; rank r > 0 freezes them and trains only adapters
    y = x W + (alpha / r) x A B on the `targets` projections."""
    rank: int = Field(0, ge=0)
    alpha: float = Field(16.0, gt=0)
    targets: StrTuple = LORA_TARGETS
    # a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) the adapters start from (a fresh
    # run; --resume continues from the checkpoint). Its r, lora_alpha and target_modules apply: rank 0 means
    # "the file's r"; a rank, alpha or targets the config sets explicitly must equal the file's
    init_from: str = ""


class CheckpointSection(_Section):
    every: int = Field(50, ge=1)
    keep: int = Field(3, ge=1)
    async_save: bool = True


class EvalSection(_Section):
    batches: int = Field(8, ge=0)  # held-out batches for the final perplexity (0: skip)
    sample_prompt: str = "def "
    sample_tokens: int = Field(48, ge=0)  # 0: skip the sample
    sample_temperature: float = Field(0.0, ge=0)  # 0: greedy
    sample_top_k: int = Field(0, ge=0)
    export: bool = True  # write final params with mistral_jax.checkpoint.native.save_params
    answers: int = Field(0, ge=0)  # fine-tuning: held-out conversations answered greedily for exact match
    before: bool = False  # also evaluate before the first step (a fresh run), for a before/after comparison


class RunConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    mesh: MeshSection = Field(default_factory=MeshSection)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    lora: LoraSection = Field(default_factory=LoraSection)

    def model_cfg(self) -> ModelConfig:
        """The ModelConfig: preset with overrides applied."""
        return _model_cfg(self.model, "config")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able nested dicts (tuples as lists)."""
        return self.model_dump(mode="json")

    def replace(self, **sections: Mapping[str, Any]) -> "RunConfig":
        """A validated copy with some section fields changed, e.g. `rc.replace(optim={'schedule_steps': 12})`."""
        d = self.model_dump(mode="json", exclude_unset=True)   # keeps which fields were set (lora.init_from)
        for name, fields in sections.items():
            d.setdefault(name, {}).update(fields)
        return from_dict(d, source="config")


SECTIONS: dict[str, type[_Section]] = {name: f.annotation for name, f in RunConfig.model_fields.items()}

# Fields that may differ between a checkpoint and the run that resumes from it. Everything else (the
# model, the data and the optimizer's hyperparameters) would make the restored state or data position
# meaningless. The mesh may change: orbax reshards the restored arrays to the new mesh.
RESUMABLE_CHANGES = ("model.remat", "optim.grad_accum", "optim.schedule_steps", "mesh.*", "train.*",
                     "checkpoint.*", "eval.*", "data.on_error")


def _model_cfg(model: ModelSection, source: str) -> ModelConfig:
    try:
        cfg = ModelConfig.preset(model.preset)
        return cfg.replace(**model.overrides) if model.overrides else cfg
    except TypeError as e:
        raise RunConfigError(f"{source}: [model] field 'overrides': {e}") from None
    except ValueError as e:
        raise RunConfigError(f"{source}: [model]: {e}") from None


def _format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if len(loc) == 1:
            if err["type"] == "extra_forbidden":
                lines.append(f"{source}: unknown section [{loc[0]}]; known: {sorted(SECTIONS)}")
            else:
                lines.append(f"{source}: [{loc[0]}] must be a table of fields, got {err['input']!r}")
            continue
        where = f"{source}: [{loc[0]}] field '{'.'.join(loc[1:])}'"
        if err["type"] == "extra_forbidden":
            known = sorted(SECTIONS[loc[0]].model_fields)
            lines.append(f"{where}: unknown field; known: {known}")
        else:
            lines.append(f"{where}: {msg} (got {err['input']!r})")
    return "\n".join(lines)


def _cross_check(rc: RunConfig, source: str) -> None:
    """Constraints between fields; raises RunConfigError naming the fields."""
    errors = []
    d, o, m = rc.data, rc.optim, rc.mesh
    if d.source in ("files", "chat") and not d.paths:
        errors.append(f"{source}: [data] field 'paths': must list files/globs when data.source = '{d.source}'")
    bad_targets = [t for t in rc.lora.targets if t not in LORA_TARGETS]
    repeated = sorted({t for t in rc.lora.targets if rc.lora.targets.count(t) > 1})
    if bad_targets or not rc.lora.targets or repeated:
        errors.append(f"{source}: [lora] field 'targets': {list(rc.lora.targets)} must be a non-empty subset of "
                      f"{list(LORA_TARGETS)} without repeats"
                      + (f" (repeated: {', '.join(repeated)})" if repeated else ""))
    if rc.train.profile_steps:
        try:
            profile_range(rc.train.profile_steps)
        except ValueError as e:
            errors.append(f"{source}: [train] field 'profile_steps': {e}")
    if d.batch_size % o.grad_accum:
        errors.append(f"{source}: [optim] field 'grad_accum': {o.grad_accum} must divide "
                      f"data.batch_size={d.batch_size}")
    elif d.batch_size % (o.grad_accum * d.shards):
        errors.append(f"{source}: [data] field 'batch_size': {d.batch_size} must be a multiple of optim.grad_accum "
                      f"({o.grad_accum}) x data.shards ({d.shards})")
    if [m.data, m.fsdp, m.tensor].count(-1) > 1:
        errors.append(f"{source}: [mesh]: at most one of data, fsdp, tensor may be -1, got data={m.data} "
                      f"fsdp={m.fsdp} tensor={m.tensor}")
    cfg = _model_cfg(rc.model, source)
    if cfg.max_seq_len < d.seq_len:
        errors.append(f"{source}: [model] max_seq_len={cfg.max_seq_len} is below data.seq_len={d.seq_len}; "
                      "lower data.seq_len or raise model.overrides.max_seq_len")
    if rc.lora.rank > 0 and not bad_targets and rc.lora.targets:
        error = lora_rank_error(rc.lora.rank, rc.lora.targets, cfg)
        if error:
            errors.append(f"{source}: [lora] field 'rank': {error}")
    if errors:
        raise RunConfigError("\n".join(errors))


def profile_range(text: str) -> tuple[int, int]:
    """(first, last) 0-based steps of an "A:B" profile range; ValueError naming the text otherwise."""
    parts = text.split(":")
    try:
        a, b = (int(x) for x in parts)
    except ValueError:
        raise ValueError(f"expected A:B with integers 0 <= A <= B (steps to trace), got {text!r}") from None
    if not 0 <= a <= b:
        raise ValueError(f"expected A:B with 0 <= A <= B, got {text!r}")
    return a, b


def from_dict(d: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Builds and validates a RunConfig from nested dicts (TOML tables)."""
    try:
        rc = RunConfig.model_validate(d)
    except ValidationError as e:
        raise RunConfigError(_format_errors(e, source)) from None
    _cross_check(rc, source)
    return rc


def load(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a TOML run config and applies `key=value` overrides (TOML values; bare strings allowed)."""
    path = Path(path)
    if not path.is_file():
        raise RunConfigError(f"run config not found: {path}")
    try:
        d = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
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
        owners = [s for s, cls in SECTIONS.items() if parts[0] in cls.model_fields]
        if len(owners) != 1:
            raise RunConfigError(f"--set {item!r}: key '{key}' is "
                                 + ("unknown" if not owners else f"ambiguous (in sections {owners})")
                                 + "; write it as section.key")
        parts = [owners[0], parts[0]]
    if parts[0] not in SECTIONS:
        raise RunConfigError(f"--set {item!r}: unknown section '{parts[0]}'; known: {sorted(SECTIONS)}")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RunConfigError(f"--set {item!r}: '{p}' is not a table")
    node[parts[-1]] = value


def _resumable(section: str, field: str) -> bool:
    return f"{section}.{field}" in RESUMABLE_CHANGES or f"{section}.*" in RESUMABLE_CHANGES


def resume_changes(saved_run: Mapping[str, Any], saved_model: Mapping[str, Any], rc: RunConfig) -> list[str]:
    """'section.field old -> new' for each field that differs from the checkpoint's and may not change on
    resume. `saved_model` is the checkpoint's resolved ModelConfig dict (preset + overrides), compared
    field by field."""
    out = []
    for k, v in rc.model_cfg().to_dict().items():
        if saved_model[k] != v:
            out.append(f"model.{k} {saved_model[k]!r} -> {v!r}")
    for section, fields in rc.to_dict().items():
        saved = saved_run[section]
        for k, v in fields.items():
            if section == "model" and k in ("preset", "overrides"):
                continue  # compared above as the resolved model config
            if saved[k] != v and not _resumable(section, k):
                out.append(f"{section}.{k} {saved[k]!r} -> {v!r}")
    return out
