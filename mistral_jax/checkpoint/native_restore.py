"""Restoring a native checkpoint folder: each param read in its stored dtype, verified against its checksum
and values, placed on its devices and cast; per-layer folders (format versions 1-2) stacked into the
scanned tree."""

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
from mistral_jax.checkpoint.native_meta import (CHECKSUMS, SCANNED_SINCE, check_tree, param_digests,
                                                read_native_meta)
from mistral_jax.checkpoint.native_read import ParamReader, store_error_line
from mistral_jax.checkpoint.torch_read import check_values_chunked
from mistral_jax.checkpoint.train_state import settle_orbax_event_loops
from mistral_jax.checkpoint.weights import aligned_empty, get_path
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


def _host_device() -> jax.Device:
    """The CPU device (host memory) when the CPU backend is available, else the default device."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return jax.devices()[0]


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


def _place(x: np.ndarray, sharding: Any, scanned: bool) -> jax.Array:
    """A host param on its device(s) (the default device, or the host for a per-layer tree to be stacked);
    the CPU device shares the aligned host buffer instead of copying it."""
    if sharding is None:
        return jax.device_put(x, jax.devices()[0] if scanned else _host_device())
    return distributed.global_array(x, sharding)


def _stack_legacy(cfg: ModelConfig, params: dict, shardings: Any) -> dict:
    """A per-layer tree (format versions 1-2, restored in host memory) -> the scanned tree in `shardings`
    (None: the default device). Each stacked param is filled layer by layer into one aligned host buffer
    (its per-layer arrays freed as they are copied) and placed (without a copy on the CPU device) before
    the next one."""
    layers = [params.pop(f"layers_{i}") for i in range(cfg.n_layers)]
    out = {k: jax.device_put(v, jax.devices()[0] if shardings is None else shardings[k]) for k, v in params.items()}
    flat0, treedef = jax.tree_util.tree_flatten_with_path(layers[0])
    per_layer = [jax.tree_util.tree_leaves(layer) for layer in layers]
    stacked = []
    for j, (kpath, first) in enumerate(flat0):
        x = aligned_empty((cfg.n_layers, *first.shape), first.dtype)
        for i, leaves in enumerate(per_layer):  # filled in place, each layer freed once copied
            x[i] = host_array(leaves[j])
            leaves[j].delete()
        stacked.append(jax.device_put(x, None if shardings is None else get_path(shardings["layers"], kpath)))
        stacked[-1].block_until_ready()
        del x
    out["layers"] = jax.tree_util.tree_unflatten(treedef, stacked)
    return out


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
    param by param to `dtype`). Folders of format versions 1-2 (per-layer params) are restored, checked per
    stored param, then stacked into the scanned tree."""
    settle_orbax_event_loops()  # a corrupt file fails with its error only, no "Event loop is closed" tracebacks
    cfg, stored, version, sums, notes = read_native_meta(path, verify)
    shardings = param_shardings(cfg, mesh) if mesh is not None else None
    cfg, theta_notes = cfg.with_rope_theta(rope_theta, str(path / "config.json"))
    notes += theta_notes
    params_dir = (path / "params").absolute()
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing (native checkpoint has no params folder)")
    stored_dt = parse_dtype(stored, f"{path / 'config.json'}: field 'param_dtype'")
    want_dt = parse_dtype(stored_dt if dtype is None else dtype, "dtype")
    scanned = version >= SCANNED_SINCE
    abstract = nn.unbox(abstract_params(cfg, scan_layers=scanned))
    item = _orbax_item_metadata(params_dir)
    check_tree(cfg, flat_params(item.tree), str(params_dir), scan_layers=scanned)
    digests = param_digests(path, sums, list(flat_params(abstract))) if sums is not None else None
    # per-layer trees are stacked on the host first; a scanned one goes straight to its devices
    place = (shardings if scanned and shardings is not None
             else jax.tree_util.tree_map(lambda _: None, abstract))
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
        leaf = _place(x, get_path(place, kpath) if scanned else None, scanned)
        del x
        if want_dt != stored_dt:
            cast = _cast(leaf, want_dt)
            if want_dt.itemsize < stored_dt.itemsize:  # narrowing can overflow to inf
                check_values_chunked(host_array(cast), name, f"{params_dir} (cast to {want_dt.name})",
                                     allow_nonfinite, before=host_array(leaf))
            leaf.delete()
            leaf = cast
        out.append(leaf)
    params = jax.tree_util.tree_unflatten(treedef, out)
    if not scanned:
        params = _stack_legacy(cfg, params, shardings)
    return cfg, params, notes
