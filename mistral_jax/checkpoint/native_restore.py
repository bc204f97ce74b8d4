"""Restoring a native checkpoint folder: each param read in its stored dtype, verified against its checksum
and values, placed on its devices and cast."""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any, Iterator

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from tqdm import tqdm

from mistral_jax.checkpoint.integrity import ALGORITHM, tensor_digest
from mistral_jax.checkpoint.native_meta import CHECKSUMS, check_tree, param_digests, read_native_meta
from mistral_jax.checkpoint.native_read import ParamReader, store_error_line
from mistral_jax.checkpoint.torch_read import check_values_chunked
from mistral_jax.checkpoint.train_state import settle_orbax_event_loops
from mistral_jax.checkpoint.weights import get_path
from mistral_jax.errors import CheckpointError
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.param_tree import flat_params, host_array, param_name
from mistral_jax.model.transformer import abstract_params, param_shardings
from mistral_jax.runtime import distributed
from mistral_jax.runtime.dtypes import parse_dtype


@functools.partial(jax.jit, static_argnums=1)
def _cast(x: jax.Array, dtype: np.dtype) -> jax.Array:
    """x cast to dtype, keeping its sharding (one compiled program per shape, sharding and dtype)."""
    return x.astype(dtype)


@contextlib.contextmanager
def _quiet_orbax_logs() -> Iterator[None]:
    """Drops orbax's absl log records below CRITICAL while it reads a checkpoint: what fails is reported
    as one CheckpointError, and what orbax recovers from (an unparsable _CHECKPOINT_METADATA) is harmless
    since the params are verified by their checksums."""
    absl_log = logging.getLogger("absl")

    def drop(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL

    absl_log.addFilter(drop)
    try:
        yield
    finally:
        absl_log.removeFilter(drop)


def _place(x: np.ndarray, sharding: Any) -> jax.Array:
    """A host param on its device(s) (`sharding`, or the default device when None); the CPU device shares
    the aligned host buffer instead of copying it."""
    if sharding is None:
        return jax.device_put(x, jax.devices()[0])
    return distributed.global_array(x, sharding)


def _orbax_item_metadata(params_dir: Path) -> Any:
    """Orbax's metadata of the params folder (its tree of array metadata); CheckpointError naming the folder
    when it is unreadable."""
    ckptr = ocp.StandardCheckpointer()
    try:
        try:
            with _quiet_orbax_logs():
                item = ckptr.metadata(params_dir).item_metadata
        except Exception as e:  # orbax raises various types for unreadable metadata
            raise CheckpointError(f"{params_dir}: unreadable orbax metadata ({type(e).__name__}: "
                                  f"{store_error_line(e)})") from None
    finally:
        ckptr.close()
    if item is None:  # what orbax returns (after a logged warning) when a metadata file is unreadable
        raise CheckpointError(f"{params_dir}: unreadable orbax metadata (its _METADATA, _sharding or "
                              "array metadata files are missing or corrupt)")
    return item


def restore_native(path: Path, mesh: Mesh | None, dtype: Any, rope_theta: float | None, verify: bool = True,
                   allow_nonfinite: bool = False, progress: bool = True) -> tuple[ModelConfig, Any, list[str]]:
    """Restores a native folder (placed on `mesh` if given); with `verify`, checks config.json against its
    saved copy and each param's checksum and values in its stored dtype (restored in that dtype, then cast
    param by param to `dtype`)."""
    settle_orbax_event_loops()  # a corrupt file fails with its error only, no "Event loop is closed" tracebacks
    cfg, stored, sums = read_native_meta(path, verify)
    shardings = param_shardings(cfg, mesh) if mesh is not None else None
    cfg, notes = cfg.with_rope_theta(rope_theta, str(path / "config.json"))
    params_dir = (path / "params").absolute()
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing (native checkpoint has no params folder)")
    stored_dt = parse_dtype(stored, f"{path / 'config.json'}: field 'param_dtype'")
    want_dt = parse_dtype(stored_dt if dtype is None else dtype, "dtype")
    abstract = nn.unbox(abstract_params(cfg))
    item = _orbax_item_metadata(params_dir)
    check_tree(cfg, flat_params(item.tree), str(params_dir))
    digests = param_digests(path, sums, list(flat_params(abstract))) if sums is not None else None
    reader = ParamReader(params_dir)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out = []
    # a bar on a terminal only (disable=None): programs whose stderr is a log keep it to their own lines
    for kpath, spec in tqdm(leaves, desc=f"reading {path.name}", unit="param", disable=None if progress else True):
        name = param_name(kpath)
        x = reader.read(name.replace("/", "."), spec.shape, stored_dt)  # one host buffer, one chunk on top
        if digests is not None and tensor_digest(x) != digests[name]:
            raise CheckpointError(f"{params_dir}: param '{name}' does not match its {ALGORITHM} checksum in "
                                  f"{CHECKSUMS}: the params files are corrupt")
        check_values_chunked(x, name, str(params_dir), allow_nonfinite)
        leaf = _place(x, None if shardings is None else get_path(shardings, kpath))
        del x
        if want_dt != stored_dt:
            cast = _cast(leaf, want_dt)
            if want_dt.itemsize < stored_dt.itemsize:  # narrowing can overflow to inf
                check_values_chunked(host_array(cast), name, f"{params_dir} (cast to {want_dt.name})",
                                     allow_nonfinite, before=host_array(leaf))
            leaf.delete()
            leaf = cast
        out.append(leaf)
    return cfg, jax.tree_util.tree_unflatten(treedef, out), notes
