"""This library's checkpoint format (config.json + checksums.json + orbax params) and one loader for
native, HF and mistral-inference folders.

Native format version 3 (FORMAT_VERSION): config.json holds the config fields, the format marker and the
param dtype; checksums.json holds a sha256 of every param's bytes (in its stored dtype) and a copy of
config.json's fields ("config"), both verified on load; the params are the scanned tree (per-layer params
stacked under "layers", leading axis n_layers). Versions 1 and 2 stored per-layer params ("layers_0",
"layers_1", ...): they still load (version 2's checksums verified per stored param), and their layers are
stacked on the host, one param at a time. Version-1 folders (no checksums) load with a note that they were
not verified, and so do folders whose checksums.json predates its "config" copy (config not verified).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from mistral_jax.runtime import distributed
from mistral_jax.checkpoint.atomic import atomic_dir
from mistral_jax.model.config import ModelConfig
from mistral_jax.errors import ConfigError
from mistral_jax.runtime.dtypes import parse_dtype
from mistral_jax.checkpoint.formats import FORMATS, NATIVE_MARKER, detect_format
from mistral_jax.errors import CheckpointError
from mistral_jax.checkpoint.integrity import ALGORITHM, tensor_digest
from mistral_jax.model.transformer import abstract_params, param_shardings
from mistral_jax.checkpoint.native_read import ParamReader, first_line
from mistral_jax.checkpoint.torch_read import (check_values_chunked, count_nonfinite_chunked, load_tensors, open_source,
                                   read_config)
from mistral_jax.checkpoint.train_state import settle_orbax_event_loops
from mistral_jax.checkpoint.weights import aligned_empty, check_shape
from mistral_jax.errors import WeightError

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
SCANNED_SINCE = 3  # versions before this store per-layer ("layers_{i}") params
CHECKSUMS = "checksums.json"
CONFIG_COPY = "config"  # checksums.json's copy of config.json's fields
log = logging.getLogger(__name__)


def _flat(tree: Any) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_tree(cfg: ModelConfig, got: dict[str, Any], source: str, scan_layers: bool = True) -> None:
    """Raises WeightError naming the first param whose presence or shape differs from the config's
    (scanned tree, or the per-layer tree of format versions 1-2 when not scan_layers)."""
    want = {k: tuple(v.shape) for k, v in _flat(nn.unbox(abstract_params(cfg, scan_layers=scan_layers))).items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    if missing:
        raise WeightError(f"{source}: missing param(s) {missing[:5]} ({len(missing)} in all)")
    if unexpected:
        raise WeightError(f"{source}: unexpected param(s) {unexpected[:5]} ({len(unexpected)} in all); "
                          "does the config match the params?")
    for k, shape in want.items():
        check_shape(source, k, got[k].shape, shape, what="param")


@functools.partial(jax.jit, static_argnums=1)
def _cast(x: jax.Array, dtype: np.dtype) -> jax.Array:
    """x cast to dtype, keeping its sharding (one compiled program per shape, sharding and dtype)."""
    return x.astype(dtype)


def _host(leaf: Any) -> np.ndarray:
    """One param as a host numpy array (gathered from its devices if sharded)."""
    if jax.process_count() > 1:   # a param sharded over several processes: gathered from all of them
        return distributed.to_host(leaf)
    return np.asarray(jax.device_get(leaf))


def _host_device() -> jax.Device:
    """The CPU device (host memory) when the CPU backend is available, else the default device."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return jax.devices()[0]


def _wait_for_threads(before: set[threading.Thread], limit_s: float = 60.0) -> None:
    """Waits (at most `limit_s` in all) for the non-daemon threads started since `before` to end.

    On Ctrl-C the main thread stops waiting, but orbax's writer threads and their executor workers go on
    writing into the temp folder; removing it before they end leaves a re-created partial folder behind.
    A second Ctrl-C stops the wait.
    """
    deadline = time.monotonic() + limit_s
    for t in set(threading.enumerate()) - before:
        if t.daemon or t is threading.current_thread():
            continue
        while True:
            try:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
                break
            except RuntimeError:  # start() was called but the thread is not running yet: join() refuses it
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.005)


def _in_flight_gb(leaves: Any, itemsize: int | None = None) -> int:
    """Orbax's in-flight byte budget (GB): 1, or enough for the largest single tensor (orbax refuses to
    move a tensor larger than its budget; a stacked 7B w1 in bfloat16 is 3.8 GB)."""
    largest = max((math.prod(x.shape) * (itemsize or np.dtype(x.dtype).itemsize)
                   for x in jax.tree_util.tree_leaves(leaves)), default=0)
    return max(1, math.ceil(largest / 1e9))


@contextlib.contextmanager
def _output_dir(dst: str | Path, force: bool) -> Iterator[Path]:
    """`atomic_dir(dst, force)`; with several processes, process 0 checks `dst` and creates the temp folder,
    every process writes into it (DST must be on a file system they share), and process 0 renames it into
    place once all have finished. Every process leaves only after the rename."""
    if jax.process_count() == 1:
        with atomic_dir(dst, force) as tmp:
            yield tmp
        return
    with contextlib.ExitStack() as stack:
        tmp, error = None, None
        if distributed.is_main():
            try:
                tmp = stack.enter_context(atomic_dir(dst, force))
            except (CheckpointError, OSError) as e:    # told to every process, so none waits for the others
                error = f"{dst}: {e}" if isinstance(e, OSError) else str(e)
        shared = distributed.allgather_json({"tmp": None if tmp is None else str(tmp), "error": error})[0]
        if shared["error"]:
            raise CheckpointError(shared["error"])
        yield Path(shared["tmp"])
        distributed.sync("save_params:written")
    distributed.sync("save_params:renamed")


def save_params(dst: str | Path, cfg: ModelConfig, params: Any, force: bool = False) -> Path:
    """Writes DST/config.json (config fields + format marker + param dtype), DST/checksums.json (sha256 of
    each param) and an orbax checkpoint DST/params.

    The folder appears only when complete; an existing non-empty DST is refused unless `force` (and even
    then unless it is a checkpoint folder). Params holding NaN/inf are saved with a logged warning. With
    several processes every process calls it with the same DST on a shared file system: each writes its
    own shards of the params, process 0 the JSON files.
    """
    import orbax.checkpoint as ocp

    settle_orbax_event_loops()
    flat = _flat(params)
    _check_tree(cfg, flat, "save_params")
    dtypes = sorted({str(np.dtype(v.dtype)) for v in flat.values()})
    if len(dtypes) != 1:
        raise WeightError(f"save_params: params mix dtypes {dtypes}; cast them to one dtype first")
    meta = {NATIVE_MARKER: FORMAT_VERSION, "param_dtype": dtypes[0], **cfg.to_dict()}
    digests: dict[str, str] = {}
    for k, leaf in flat.items():  # one host copy at a time (none for a param on the CPU device)
        x = _host(leaf)
        digests[k] = tensor_digest(x)
        if (n := count_nonfinite_chunked(x)) and jax.process_index() == 0:
            log.warning(f"save_params: param '{k}' holds {n} non-finite value(s) (NaN/inf)")
        del x
    with _output_dir(dst, force) as tmp:
        if jax.process_index() == 0:
            (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
            (tmp / CHECKSUMS).write_text(json.dumps({"algorithm": ALGORITHM, "tensors": digests, CONFIG_COPY: meta},
                                                    indent=2) + "\n")
        # Synchronous, uncompressed, about one tensor in flight: compression doubled the save time and
        # added about half a model copy of host memory on a 7B-shaped model (see bench/bench_convert.py).
        gb = _in_flight_gb(params)
        handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=gb, save_device_host_concurrent_gb=gb,
                                              use_compression=False)
        threads_before = set(threading.enumerate())
        try:
            with ocp.Checkpointer(handler) as ckptr:
                # one chunk per param, however large (orbax splits arrays over 2 GiB into chunks by default,
                # and a chunked write copies the array: +3.9 GiB converting 7B): nothing is copied to save
                ckptr.save((tmp / "params").absolute(),
                           args=ocp.args.PyTreeSave(params, ocdbt_target_data_file_size=0))
        except BaseException:
            _wait_for_threads(threads_before)
            raise
    return Path(dst)


def _read_checksums_file(path: Path) -> dict[str, Any]:
    """checksums.json of a native folder: {"algorithm", "tensors": {param: digest}, optional "config"}."""
    source = path / CHECKSUMS
    try:
        d = json.loads(source.read_text())
        algorithm, digests = d["algorithm"], d["tensors"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: cannot read checksums ({type(e).__name__}: {e})") from None
    if algorithm != ALGORITHM:
        raise CheckpointError(f"{source}: field 'algorithm' is {algorithm!r}, this library checks {ALGORITHM!r}")
    if not isinstance(digests, dict):
        raise CheckpointError(f"{source}: field 'tensors' must be an object, got {type(digests).__name__}")
    if CONFIG_COPY in d and not isinstance(d[CONFIG_COPY], dict):
        raise CheckpointError(f"{source}: field '{CONFIG_COPY}' must be an object, got "
                              f"{type(d[CONFIG_COPY]).__name__}")
    return d


def _same_value(a: Any, b: Any) -> bool:
    """JSON values equal in meaning (10000 and 10000.0 are; true and 1 are not)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool) and (a is None) == (b is None)


def _check_config_copy(path: Path, fields: Mapping[str, Any], sums: Mapping[str, Any]) -> list[str]:
    """CheckpointError naming the first field of config.json that differs from checksums.json's copy of it
    (the config as saved); a note when the copy is absent (written before checksums covered the config)."""
    source, sums_path = path / "config.json", path / CHECKSUMS
    saved = sums.get(CONFIG_COPY)
    if saved is None:
        return [f"{sums_path}: holds no copy of config.json (written before checksums covered the config); "
                "config.json not verified (save the checkpoint again to add it)"]
    hint = (f"{source.name} was changed after the checkpoint was saved: restore it, or adopt the change with "
            f"`python -m convert --no-verify {path} NEW_FOLDER`")
    for k in [*fields, *(k for k in saved if k not in fields)]:
        if k not in saved:
            raise CheckpointError(f"{source}: field '{k}' ({fields[k]!r}) is not in the config saved with the "
                                  f"checkpoint ({sums_path}); {hint}")
        if k not in fields:
            raise CheckpointError(f"{source}: field '{k}' is missing; {sums_path} recorded {saved[k]!r} when the "
                                  f"checkpoint was saved; {hint}")
        if not _same_value(fields[k], saved[k]):
            raise CheckpointError(f"{source}: field '{k}' is {fields[k]!r}, but {sums_path} recorded {saved[k]!r} "
                                  f"when the checkpoint was saved; {hint}")
    return []


def _read_native_meta(path: str | Path, verify: bool = True
                      ) -> tuple[ModelConfig, str, int, dict[str, Any] | None, list[str]]:
    """(config, stored param dtype name, format version, checksums.json or None, notes) of a native folder.

    With `verify`, config.json is checked against checksums.json's copy of it (format versions 2-3); the
    checksums are returned then (None for version 1 or without `verify`)."""
    path = Path(path)
    source = path / "config.json"
    try:
        d = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: cannot read native config ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: expected a JSON object")
    version = d.get(NATIVE_MARKER)
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CheckpointError(f"{source}: field '{NATIVE_MARKER}' is {version!r}, this library reads "
                              f"version(s) {', '.join(map(str, READABLE_VERSIONS))}")
    sums, notes = None, []
    if verify and version >= 2:
        sums = _read_checksums_file(path)
        notes = _check_config_copy(path, d, sums)
    elif verify:
        notes = [f"{path}: native format version {version} has no checksums; params and config not verified "
                 "(save it again to add them)"]
    d.pop(NATIVE_MARKER)
    dtype = d.pop("param_dtype", "float32")
    return ModelConfig.from_dict(d, source=str(source)), dtype, version, sums, notes


def read_native_config(path: str | Path, verify: bool = True) -> tuple[ModelConfig, str]:
    """(config, stored param dtype name) of a native checkpoint folder; with `verify`, CheckpointError when
    config.json differs from the copy checksums.json holds of it (the config the params were saved with)."""
    cfg, dtype, *_ = _read_native_meta(path, verify)
    return cfg, dtype


def _param_digests(path: Path, sums: Mapping[str, Any], names: list[str]) -> dict[str, str]:
    """The stored digest of every param in `names`; CheckpointError if checksums.json lacks one."""
    digests = sums["tensors"]
    missing = [k for k in names if k not in digests]
    if missing:
        raise CheckpointError(f"{path / CHECKSUMS}: no checksum for param(s) {missing[:5]} ({len(missing)} in all)")
    return digests


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


def _at(tree: Any, kpath: tuple) -> Any:
    for k in kpath:
        tree = tree[getattr(k, "key", k)]
    return tree


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
            x[i] = _host(leaves[j])
            leaves[j].delete()
        sh = None
        if shardings is not None:
            sh = shardings["layers"]
            for k in kpath:
                sh = sh[k.key]
        stacked.append(jax.device_put(x, sh))
        stacked[-1].block_until_ready()
        del x
    out["layers"] = jax.tree_util.tree_unflatten(treedef, stacked)
    return out


def _load_native(path: Path, mesh: Mesh | None, dtype: Any, rope_theta: float | None, verify: bool = True,
                 allow_nonfinite: bool = False, progress: bool = True) -> tuple[ModelConfig, Any, list[str]]:
    """Restores a native folder (placed on `mesh` if given); with `verify`, checks config.json against its
    saved copy and each param's checksum and values in its stored dtype (restored in that dtype, then cast
    param by param to `dtype`). Folders of format versions 1-2 (per-layer params) are restored, checked per
    stored param, then stacked into the scanned tree."""
    import orbax.checkpoint as ocp

    settle_orbax_event_loops()  # a corrupt file fails with its error only, no "Event loop is closed" tracebacks
    cfg, stored, version, sums, notes = _read_native_meta(path, verify)
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
    ckptr = ocp.StandardCheckpointer()
    try:
        try:
            with _quiet_orbax_logs():
                item = ckptr.metadata(params_dir).item_metadata
        except Exception as e:  # orbax raises various types for unreadable metadata
            raise CheckpointError(f"{params_dir}: unreadable orbax metadata ({type(e).__name__}: "
                                  f"{first_line(e)})") from None
    finally:
        ckptr.close()
    if item is None:  # what orbax returns (after a logged warning) when a metadata file is unreadable
        raise CheckpointError(f"{params_dir}: unreadable orbax metadata (its _METADATA, _sharding or "
                              "array metadata files are missing or corrupt)")
    _check_tree(cfg, _flat(item.tree), str(params_dir), scan_layers=scanned)
    digests = _param_digests(path, sums, list(_flat(abstract))) if sums is not None else None
    # per-layer trees are stacked on the host first; a scanned one goes straight to its devices
    place = (shardings if scanned and shardings is not None
             else jax.tree_util.tree_map(lambda _: None, abstract))
    reader = ParamReader(params_dir)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out = []
    # a bar on a terminal only (disable=None): programs whose stderr is a log keep it to their own lines
    for kpath, spec in tqdm(leaves, desc=f"reading {path.name}", unit="param", disable=None if progress else True):
        name = "/".join(str(getattr(k, "key", k)) for k in kpath)
        x = reader.read(name.replace("/", "."), spec.shape, stored_dt)  # one host buffer, one chunk on top
        if digests is not None and tensor_digest(x) != digests[name]:
            raise CheckpointError(f"{params_dir}: param '{name}' does not match its {ALGORITHM} checksum in "
                                  f"{CHECKSUMS}: the params files are corrupt")
        check_values_chunked(x, name, str(params_dir), allow_nonfinite)
        leaf = _place(x, _at(place, kpath) if scanned else None, scanned)
        del x
        if want_dt != stored_dt:
            cast = _cast(leaf, want_dt)
            if want_dt.itemsize < stored_dt.itemsize:  # narrowing can overflow to inf
                check_values_chunked(_host(cast), name, f"{params_dir} (cast to {want_dt.name})",
                                     allow_nonfinite, before=_host(leaf))
            leaf.delete()
            leaf = cast
        out.append(leaf)
    params = jax.tree_util.tree_unflatten(treedef, out)
    if not scanned:
        params = _stack_legacy(cfg, params, shardings)
    return cfg, params, notes


def load_params_with_notes(path: str | Path, mesh: Mesh | None = None, dtype: Any = jnp.float32,
                           fmt: str | None = None, rope_theta: float | None = None,
                           progress: bool = True, allow_nonfinite: bool = False,
                           verify: bool = True) -> tuple[ModelConfig, Any, list[str]]:
    """Like `load_params`, also returning notes about inferred or overridden config values."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (does not exist or is a file)")
    if fmt == "native":
        return _load_native(path, mesh, dtype, rope_theta, verify, allow_nonfinite, progress)
    cfg, notes = read_config(path, fmt, rope_theta)
    shardings = param_shardings(cfg, mesh) if mesh is not None else None
    with open_source(path, fmt) as source:
        params = load_tensors(source, cfg, fmt, dtype, shardings, progress, allow_nonfinite)
    return cfg, params, notes


def load_params(path: str | Path, mesh: Mesh | None = None, dtype: Any = jnp.float32, fmt: str | None = None,
                rope_theta: float | None = None, progress: bool = True, allow_nonfinite: bool = False,
                verify: bool = True) -> tuple[ModelConfig, Any]:
    """Loads a native, Hugging Face or mistral-inference folder (auto-detected unless `fmt`) as (cfg, params).

    With a mesh, params are placed with `model.param_shardings(cfg, mesh)` as they are read. `dtype` None
    keeps the stored dtype. Notes about inferred config values (e.g. v0.1's rope_theta) are logged as
    warnings; `load_params_with_notes` returns them instead.

    NaN/inf values (or values a cast to `dtype` overflows) are refused with a CheckpointError naming the
    tensor unless `allow_nonfinite`. A native checkpoint's params are checked against their stored
    checksums, and its config.json against the copy saved beside them, unless `verify=False` (version-1
    folders have neither, older version 2-3 folders no config copy: a note says so).
    """
    cfg, params, notes = load_params_with_notes(path, mesh, dtype, fmt, rope_theta, progress, allow_nonfinite,
                                                verify)
    for note in notes:
        log.warning(note)
    return cfg, params


__all__ = ["save_params", "load_params", "load_params_with_notes", "read_native_config", "CheckpointError",
           "ConfigError", "WeightError"]
