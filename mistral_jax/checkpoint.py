"""This library's checkpoint format (config.json + orbax params) and one loader for native, HF and
mistral-inference folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mistral_jax import convert
from mistral_jax.config import ConfigError, ModelConfig
from mistral_jax.convert import NATIVE_MARKER, CheckpointError
from mistral_jax.model import abstract_params, param_shardings
from mistral_jax.weights import WeightError

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


def _flat(tree: Any) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_tree(cfg: ModelConfig, got: dict[str, Any], source: str) -> None:
    """Raises WeightError naming the first param whose presence or shape differs from the config's."""
    want = {k: tuple(v.shape) for k, v in _flat(nn.unbox(abstract_params(cfg))).items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    if missing:
        raise WeightError(f"{source}: missing param(s) {missing[:5]} ({len(missing)} in all)")
    if unexpected:
        raise WeightError(f"{source}: unexpected param(s) {unexpected[:5]} ({len(unexpected)} in all); "
                          "does the config match the params?")
    for k, shape in want.items():
        if tuple(got[k].shape) != shape:
            raise WeightError(f"{source}: param '{k}' has shape {tuple(got[k].shape)}, the config expects {shape}")


def save_params(dst: str | Path, cfg: ModelConfig, params: Any, force: bool = False) -> Path:
    """Writes DST/config.json (config fields + format marker + param dtype) and an orbax checkpoint DST/params.

    The folder appears only when complete; an existing non-empty DST is refused unless `force`.
    """
    import orbax.checkpoint as ocp

    flat = _flat(params)
    _check_tree(cfg, flat, "save_params")
    dtypes = sorted({str(np.dtype(v.dtype)) for v in flat.values()})
    if len(dtypes) != 1:
        raise WeightError(f"save_params: params mix dtypes {dtypes}; cast them to one dtype first")
    meta = {NATIVE_MARKER: FORMAT_VERSION, "param_dtype": dtypes[0], **cfg.to_dict()}
    with convert.atomic_dir(dst, force) as tmp:
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        # Synchronous, uncompressed, at most ~1 GB in flight: compression doubled the save time and added
        # about half a model copy of host memory on a 7B-shaped model (see bench/bench_convert.py).
        handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, save_device_host_concurrent_gb=1,
                                              use_compression=False)
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save((tmp / "params").absolute(), args=ocp.args.PyTreeSave(params))
    return Path(dst)


def read_native_config(path: str | Path) -> tuple[ModelConfig, str]:
    """(config, stored param dtype name) of a native checkpoint folder."""
    source = Path(path) / "config.json"
    try:
        d = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: cannot read native config ({e})") from None
    version = d.pop(NATIVE_MARKER, None)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source}: field '{NATIVE_MARKER}' is {version!r}, this library reads "
                              f"version {FORMAT_VERSION}")
    dtype = d.pop("param_dtype", "float32")
    return ModelConfig.from_dict(d, source=str(source)), dtype


def _load_native(path: Path, shardings: Any, dtype: Any, rope_theta: float | None) -> tuple[ModelConfig, Any, list[str]]:
    import orbax.checkpoint as ocp

    cfg, stored = read_native_config(path)
    notes: list[str] = []
    if rope_theta is not None and float(rope_theta) != cfg.rope_theta:
        notes.append(f"rope_theta overridden: checkpoint says {cfg.rope_theta}, using {rope_theta}")
        cfg = cfg.replace(rope_theta=float(rope_theta))
    params_dir = (path / "params").absolute()
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing (native checkpoint has no params folder)")
    dtype = convert.parse_dtype(stored if dtype is None else dtype)
    ckptr = ocp.StandardCheckpointer(restore_concurrent_gb=1)
    try:
        try:
            stored_tree = ckptr.metadata(params_dir).item_metadata.tree
        except Exception as e:  # orbax raises various types for unreadable metadata
            raise CheckpointError(f"{params_dir}: unreadable orbax metadata ({type(e).__name__}: {e})") from None
        _check_tree(cfg, _flat(stored_tree), str(params_dir))
        abstract = nn.unbox(abstract_params(cfg, dtype))
        if shardings is None:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: dev, abstract)
        target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s),
                                        abstract, shardings)
        try:
            params = ckptr.restore(params_dir, target)
        except Exception as e:  # truncated/corrupt array files surface as assorted tensorstore errors
            raise CheckpointError(f"{params_dir}: cannot restore params ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        ckptr.close()
    return cfg, params, notes


def load_params_with_notes(path: str | Path, mesh: Mesh | None = None, dtype: Any = jnp.float32,
                           fmt: str | None = None, rope_theta: float | None = None,
                           progress: bool = True) -> tuple[ModelConfig, Any, list[str]]:
    """Like `load_params`, also returning notes about inferred or overridden config values."""
    path = Path(path)
    fmt = fmt or convert.detect_format(path)
    if fmt not in convert.FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {convert.FORMATS}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (does not exist or is a file)")
    if fmt == "native":
        cfg, _ = read_native_config(path)
        shardings = param_shardings(cfg, mesh) if mesh is not None else None
        return _load_native(path, shardings, dtype, rope_theta)
    cfg, notes = convert.read_config(path, fmt, rope_theta)
    shardings = param_shardings(cfg, mesh) if mesh is not None else None
    with convert.open_source(path, fmt) as source:
        params = convert.load_tensors(source, cfg, fmt, dtype, shardings, progress)
    return cfg, params, notes


def load_params(path: str | Path, mesh: Mesh | None = None, dtype: Any = jnp.float32, fmt: str | None = None,
                rope_theta: float | None = None, progress: bool = True) -> tuple[ModelConfig, Any]:
    """Loads a native, Hugging Face or mistral-inference folder (auto-detected unless `fmt`) as (cfg, params).

    With a mesh, params are placed with `model.param_shardings(cfg, mesh)` as they are read. `dtype` None
    keeps the stored dtype. Notes about inferred config values (e.g. v0.1's rope_theta) are logged as
    warnings; `load_params_with_notes` returns them instead.
    """
    cfg, params, notes = load_params_with_notes(path, mesh, dtype, fmt, rope_theta, progress)
    for note in notes:
        log.warning(note)
    return cfg, params


__all__ = ["save_params", "load_params", "load_params_with_notes", "read_native_config", "CheckpointError",
           "ConfigError", "WeightError"]
