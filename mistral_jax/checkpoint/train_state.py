"""Training checkpoints with orbax: sharded train state + data-iterator state + run metadata per step.

Saves are atomic (orbax writes to a temporary directory and renames it) and asynchronous when
enabled; only the last `keep` steps are kept.

A LoRA run's train state holds the adapters and their optimizer state, not the frozen base weights; its
metadata records the base's identity instead (`BASE_META`: `folder_base_record` for a checkpoint folder,
`random_base_record` for random weights), which `--resume` checks before it reloads the base.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any, Coroutine

import numpy as np
import orbax.checkpoint as ocp

from mistral_jax.checkpoint.formats import detect_format
from mistral_jax.checkpoint.integrity import checkpoint_identity, tensor_digest
from mistral_jax.model.param_tree import flat_params, host_array

ITEMS = ("state", "data", "meta")
BASE_META = "lora_base"  # metadata key of a LoRA run's base record
SETTLE_LIMIT_S = 60.0  # the longest a failed orbax call waits for its other reads and writes


def _run_sync_settled(coro: Coroutine) -> Any:
    """Runs `coro` on a fresh event loop, as orbax's own runner does; when it fails, the tasks still pending
    may finish (60 s at most, then they are cancelled) before the loop is closed.

    orbax runs each synchronous step (metadata, restore, save) as a coroutine on a new event loop and
    closes the loop as soon as the coroutine ends. When one of its gathered reads fails (a corrupt
    metadata or array file), the others are still in flight; tensorstore's threads then complete them
    into the closed loop and print "RuntimeError: Event loop is closed" tracebacks below the error.
    """
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    except BaseException:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if pending:  # their outcomes are dropped: the coroutine's own error is what counts
            _, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=SETTLE_LIMIT_S))
            for t in stuck:  # waiting on something that will never come: cancelled, not waited for
                t.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        raise
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def settle_orbax_event_loops() -> None:
    """Makes orbax's synchronous calls wait for their in-flight reads and writes before closing their event
    loop, also when the call fails (see `_run_sync_settled`). Idempotent; a no-op on orbax versions without
    the private hook `asyncio_utils._run_sync_via_new_loop` (0.12 has it)."""
    try:
        from orbax.checkpoint._src import asyncio_utils
    except ImportError:
        return
    if callable(getattr(asyncio_utils, "_run_sync_via_new_loop", None)):
        asyncio_utils._run_sync_via_new_loop = _run_sync_settled


class TrainCheckpointer:
    """Wraps an orbax CheckpointManager for (train state, data state, metadata) triples."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        settle_orbax_event_loops()  # a corrupt checkpoint fails with its error only, no loop tracebacks
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Starts saving (returns before an async save is on disk; `wait()` blocks until it is)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def _check_step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"checkpoint step {step} not in {self.directory}; have {self.all_steps()}")
        return step

    def read_meta(self, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(data state, metadata) of `step` (default: latest), without reading the train state."""
        step = self._check_step(step)
        out = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore(),
                                                                  meta=ocp.args.JsonRestore()))
        return dict(out["data"]), dict(out["meta"])

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(state placed as `abstract_state`'s shardings, data state, metadata) of `step` (default: latest)."""
        step = self._check_step(step)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["data"]), dict(out["meta"])

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and for the start-up clean-up of unfinished (tmp) checkpoint folders."""
        self._manager.wait_until_finished()
        # orbax awaits that clean-up only before a save; a run that stops before saving would otherwise
        # exit under the clean-up thread, which then prints a traceback ('cannot schedule new futures
        # after shutdown'). No public method awaits it in orbax-checkpoint 0.12.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self._manager.close()


# ----- a LoRA run's frozen base: what identifies it -----

def folder_base_record(path: str | Path) -> dict[str, Any]:
    """The record of a base read from a checkpoint folder: its format, resolved path and
    `integrity.checkpoint_identity` (for a native folder a digest of its config.json and checksums.json,
    for HF / mistral-inference folders of their JSON files and each weight file's name, size and mtime).
    CheckpointError (a ValueError naming the folder) when it is not a readable checkpoint folder."""
    path = Path(path)
    return {"kind": "checkpoint", "format": detect_format(path), "path": str(path.resolve()),
            "identity": checkpoint_identity(path)}


def params_identity(params: Any) -> str:
    """A short digest of a params tree's per-tensor sha256 checksums (each param's name and digest, in tree
    order): what `checkpoint_identity` is of a native folder's checksums, for weights that have no folder.
    Reads one param at a time to the host (no copy on the CPU device)."""
    h = hashlib.sha256()
    for name, leaf in flat_params(params).items():
        x = host_array(leaf)
        h.update(f"{name}\0{np.dtype(x.dtype).name}\0{tensor_digest(x)}\n".encode())
        del x
    return h.hexdigest()[:16]


def random_base_record(params: Any, seed: int) -> dict[str, Any]:
    """The record of random base weights drawn from `seed` (no --init-from): the seed that remakes them with
    the run's model config and param dtype, and `params_identity` of the weights drawn, which a resume
    compares with the weights it draws again."""
    return {"kind": "random", "seed": int(seed), "path": None, "identity": params_identity(params)}


def base_mismatch(recorded: dict[str, Any], found: str, where: str) -> str | None:
    """None when `found` (the identity of the base at hand) is the recorded one; else one line naming
    `where` (the base's path, or how it was drawn) and both digests."""
    if recorded.get("identity") == found:
        return None
    what = ("a digest of its config and checksums" if recorded.get("format") == "native" else
            "a digest of its files" if recorded.get("kind") == "checkpoint" else "a digest of its weights' checksums")
    return (f"the LoRA base {where} is not the base this run trained on: recorded identity "
            f"{recorded.get('identity')}, found {found} ({what})")
