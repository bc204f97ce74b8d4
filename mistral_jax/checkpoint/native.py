"""This library's checkpoint format (config.json + checksums.json + orbax params) and one loader for
native, HF and mistral-inference folders.

Native format version 3 (FORMAT_VERSION, the only one read): config.json holds the config fields, the format
marker and the param dtype; checksums.json holds a sha256 of every param's bytes (in its stored dtype) and a
copy of config.json's fields ("config"), both verified on load; the params are the scanned tree (per-layer
params stacked under "layers", leading axis n_layers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from mistral_jax.checkpoint.hub import resolve_checkpoint
from mistral_jax.checkpoint.atomic import atomic_dir
from mistral_jax.checkpoint.formats import FORMATS, NATIVE_MARKER, detect_format
from mistral_jax.checkpoint.integrity import ALGORITHM, tensor_digest
from mistral_jax.checkpoint.native_meta import CHECKSUMS, CONFIG_COPY, FORMAT_VERSION, check_tree
from mistral_jax.checkpoint.native_restore import restore_native
from mistral_jax.checkpoint.torch_read import count_nonfinite_chunked, load_tensors, open_source, read_config
from mistral_jax.checkpoint.train_state import settle_orbax_event_loops
from mistral_jax.errors import CheckpointError, WeightError
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.param_tree import flat_params, host_array
from mistral_jax.model.transformer import param_shardings
from mistral_jax.runtime import distributed

log = logging.getLogger(__name__)


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
    settle_orbax_event_loops()
    flat = flat_params(params)
    check_tree(cfg, flat, "save_params")
    dtypes = sorted({str(np.dtype(v.dtype)) for v in flat.values()})
    if len(dtypes) != 1:
        raise WeightError(f"save_params: params mix dtypes {dtypes}; cast them to one dtype first")
    meta = {NATIVE_MARKER: FORMAT_VERSION, "param_dtype": dtypes[0], **cfg.to_dict()}
    digests: dict[str, str] = {}
    for k, leaf in flat.items():  # one host copy at a time (none for a param on the CPU device)
        x = host_array(leaf)
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


def load_params_with_notes(path: str | Path, mesh: Mesh | None = None, dtype: Any = jnp.float32,
                           fmt: str | None = None, rope_theta: float | None = None,
                           progress: bool = True, allow_nonfinite: bool = False,
                           verify: bool = True) -> tuple[ModelConfig, Any, list[str]]:
    """Like `load_params`, also returning notes about inferred or overridden config values."""
    path = resolve_checkpoint(path)   # a Hub id (org/name[@revision]) when no such local folder exists
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (does not exist or is a file)")
    if fmt == "native":
        return restore_native(path, mesh, dtype, rope_theta, verify, allow_nonfinite, progress)
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
    checksums, and its config.json against the copy saved beside them, unless `verify=False`.
    """
    cfg, params, notes = load_params_with_notes(path, mesh, dtype, fmt, rope_theta, progress, allow_nonfinite,
                                                verify)
    for note in notes:
        log.warning(note)
    return cfg, params


__all__ = ["save_params", "load_params", "load_params_with_notes"]
