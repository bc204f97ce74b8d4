"""Multi-process start-up (one process per host, every process runs the same program) and the few
helpers the programs need: who is process 0, and small host values shared across processes.

Every entry point calls `initialize` first. With nothing given it does nothing (one process), unless
the environment is a cluster that `jax.distributed.initialize()` detects by itself (a TPU pod slice,
SLURM, Open MPI), where it lets jax auto-detect. `--coordinator HOST:PORT --num-processes N
--process-id I` (or MISTRAL_JAX_COORDINATOR / MISTRAL_JAX_NUM_PROCESSES / MISTRAL_JAX_PROCESS_ID)
start an explicit group, e.g. several processes on one machine or GPU nodes without a scheduler.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

ENV = {"coordinator": "MISTRAL_JAX_COORDINATOR", "num_processes": "MISTRAL_JAX_NUM_PROCESSES",
       "process_id": "MISTRAL_JAX_PROCESS_ID"}
# Environment variables that mark a multi-host cluster jax.distributed.initialize() detects by itself.
_CLUSTER_MARKERS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_TASKS",
                    "OMPI_COMM_WORLD_SIZE")


class DistributedError(RuntimeError):
    """The process group cannot start as asked; the message names the flag or variable and the value."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds --coordinator, --num-processes, --process-id and --init-timeout to a program's parser."""
    g = p.add_argument_group("multi-process (one process per host; omit for a single process)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"address of process 0's coordinator service (or ${ENV['coordinator']})")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help=f"or ${ENV['num_processes']}")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help=f"0..N-1 (or ${ENV['process_id']})")
    g.add_argument("--init-timeout", type=int, default=120, metavar="S",
                   help="seconds to wait for every process to join before failing (default 120)")
    g.add_argument("--heartbeat-timeout", type=int, default=60, metavar="S",
                   help="a process whose peer stops answering for this long exits with an error (default 60)")


def start_or_report(args: argparse.Namespace) -> bool:
    """`initialize(args)` for a command-line program: False (after printing `error: ...` to stderr) when the
    group cannot start; the program then exits with status 2."""
    import sys
    try:
        initialize(args)
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    return True


def _cluster_detected() -> bool:
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in tpu_hosts:
        return True
    return any(os.environ.get(k) not in (None, "", "1") for k in _CLUSTER_MARKERS if k != "TPU_WORKER_HOSTNAMES")


def settings(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """{'coordinator', 'num_processes', 'process_id'} from the flags, else the environment (None = unset)."""
    out: dict[str, Any] = {}
    for key, var in ENV.items():
        flag = getattr(args, key, None) if args is not None else None
        raw = flag if flag is not None else os.environ.get(var)
        if raw is not None and key != "coordinator":
            try:
                raw = int(raw)
            except ValueError:
                raise DistributedError(f"${var} must be an integer, got {raw!r}") from None
        out[key] = raw
    return out


def initialize(args: argparse.Namespace | None = None, timeout_s: int | None = None,
               heartbeat_timeout_s: int | None = None) -> None:
    """Starts the process group when asked for (see the module docstring); a no-op for one process.

    Raises DistributedError naming the bad value for incomplete or inconsistent settings, and when the
    group does not form within the timeout (e.g. the coordinator is unreachable). A process whose peer
    dies is stopped by jax's heartbeat after `heartbeat_timeout_s`.
    """
    if jax.distributed.is_initialized():
        return
    s = settings(args)
    timeout_s = timeout_s if timeout_s is not None else getattr(args, "init_timeout", None) or 120
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = getattr(args, "heartbeat_timeout", None) or 60
    given = {k: v for k, v in s.items() if v is not None}
    if not given:
        if _cluster_detected():
            _start(timeout_s=timeout_s, heartbeat_timeout_s=heartbeat_timeout_s)
        return
    missing = [f"--{k.replace('_', '-')}" for k in ENV if s[k] is None]
    if missing and not (s["num_processes"] == 1 and s["coordinator"] is None):
        raise DistributedError(f"multi-process start needs --coordinator, --num-processes and --process-id "
                               f"together; missing {', '.join(missing)} (given: {given})")
    n, i = s["num_processes"], s["process_id"]
    if n is not None and n < 1:
        raise DistributedError(f"--num-processes must be >= 1, got {n}")
    if n == 1 and s["coordinator"] is None:
        return
    if not 0 <= i < n:
        raise DistributedError(f"--process-id must be in [0, {n - 1}] for --num-processes {n}, got {i}")
    host, _, port = str(s["coordinator"]).rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--coordinator must be HOST:PORT, got {s['coordinator']!r}")
    if i != 0:   # process 0 runs the coordinator service; the others wait for it to accept connections
        _wait_for(host, int(port), timeout_s, n, i)
    _start(s["coordinator"], n, i, timeout_s, heartbeat_timeout_s)


def _wait_for(host: str, port: int, timeout_s: float, n: int, i: int) -> None:
    """Returns once HOST:PORT accepts a TCP connection; DistributedError after timeout_s (jax's own client
    aborts the process with a stack trace instead)."""
    import socket
    import time
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(0.1, deadline - time.monotonic()))):
                return
        except OSError as e:
            last = e.strerror or type(e).__name__
            time.sleep(0.25)
    raise DistributedError(f"the coordinator {host}:{port} was not reachable within {timeout_s} s (process {i} "
                           f"of {n}; last error: {last}); start process 0 there, or check --coordinator")


def _start(coordinator: str | None = None, n: int | None = None, i: int | None = None, timeout_s: int = 120,
           heartbeat_timeout_s: int = 60) -> None:
    try:
        jax.distributed.initialize(coordinator, n, i, initialization_timeout=int(timeout_s),
                                   heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    except Exception as e:  # noqa: BLE001 - jax raises XlaRuntimeError / RuntimeError with long texts
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = f"coordinator {coordinator}" if coordinator else "the auto-detected cluster"
        raise DistributedError(f"could not form the process group with {where} (process {i} of {n}) within "
                               f"{timeout_s} s: {first}") from None


def is_main() -> bool:
    """True on process 0, the one that logs and writes files other than orbax checkpoints."""
    return jax.process_index() == 0


def allgather_json(value: Any, max_bytes: int | None = None) -> list[Any]:
    """Every process's JSON-able `value`, in process order (a single-element list for one process).

    max_bytes: the buffer size every process agrees on; None gathers the sizes first (one more collective).
    """
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils
    raw = json.dumps(value).encode()
    if max_bytes is None:
        sizes = np.asarray(multihost_utils.process_allgather(np.array([len(raw)], np.int64)))
        max_bytes = int(sizes.max())
    if len(raw) > max_bytes:
        raise ValueError(f"allgather_json: {len(raw)} bytes exceed the {max_bytes}-byte limit")
    buf = np.zeros(max_bytes + 4, np.uint8)
    buf[:4] = np.frombuffer(np.uint32(len(raw)).tobytes(), np.uint8)
    buf[4:4 + len(raw)] = np.frombuffer(raw, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buf))   # (processes, max_bytes + 4)
    out = []
    for row in gathered.reshape(jax.process_count(), -1):
        n = int(np.frombuffer(row[:4].tobytes(), np.uint32)[0])
        out.append(json.loads(row[4:4 + n].tobytes().decode()))
    return out


def sync(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def process_shares(n_items: int, processes: Sequence[int] | None = None) -> list[range]:
    """Contiguous, disjoint index ranges of n_items, one per process (sizes differ by at most one)."""
    n = jax.process_count() if processes is None else len(processes)
    base, extra = divmod(n_items, n)
    out, start = [], 0
    for p in range(n):
        size = base + (1 if p < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def global_array(host: np.ndarray, sharding: Any) -> jax.Array:
    """A jax array in `sharding` from a host array every process holds whole (each places its own shards)."""
    host = np.asarray(host)
    if jax.process_count() == 1:
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process sharded) array as numpy, on every process."""
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
