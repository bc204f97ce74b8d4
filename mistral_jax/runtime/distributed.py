"""Multi-process start-up (one process per host, every process runs the same program) and the few
helpers the programs need: who is process 0, and small host values shared across processes.

Every entry point calls `initialize` first. With nothing given it does nothing (one process), unless
the environment is a cluster that `jax.distributed.initialize()` detects by itself (a TPU pod slice,
SLURM, Open MPI), where it lets jax auto-detect. `--coordinator HOST:PORT --num-processes N
--process-id I` (or MISTRAL_JAX_COORDINATOR / MISTRAL_JAX_NUM_PROCESSES / MISTRAL_JAX_PROCESS_ID)
start an explicit group, e.g. several processes on one machine or GPU nodes without a scheduler.

An explicit group forms in two steps, so that every start-up failure is one line (`error: ...`, exit
status 2) instead of jax's abort with a C++ stack: a rendezvous before jax (`rendezvous`: every process is
there, with consistent flags), then jax.distributed.initialize. The rendezvous connections then stay open as
liveness channels (`peer_watch`): a process whose peer dies or stops answering for --heartbeat-timeout
seconds prints one line and exits with status 1; jax's own heartbeat, which aborts the process from C++, is
set to twice that timeout as a backstop. Clusters that jax detects by itself (no --coordinator) start as jax
does, without the rendezvous or the watcher.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from mistral_jax.errors import DistributedError, first_line
from mistral_jax.runtime.arg_types import int_in
from mistral_jax.runtime import rendezvous
from mistral_jax.runtime.peer_watch import PeerWatch

ENV = {"coordinator": "MISTRAL_JAX_COORDINATOR", "num_processes": "MISTRAL_JAX_NUM_PROCESSES",
       "process_id": "MISTRAL_JAX_PROCESS_ID"}
# Environment variables that mark a multi-host cluster jax.distributed.initialize() detects by itself.
_CLUSTER_MARKERS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_TASKS",
                    "OMPI_COMM_WORLD_SIZE")
MAX_TIMEOUT_S = 7 * 24 * 3600          # --init-timeout / --heartbeat-timeout ceiling (jax takes int32 seconds)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds --coordinator, --num-processes, --process-id, --init-timeout and --heartbeat-timeout to a program's
    parser (out-of-range numbers are argparse errors: exit status 2)."""
    g = p.add_argument_group("multi-process (one process per host; omit for a single process)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"address of process 0 (it listens on PORT, 1..65535) (or ${ENV['coordinator']})")
    g.add_argument("--num-processes", type=int_in(1), default=None, metavar="N",
                   help=f"or ${ENV['num_processes']}")
    g.add_argument("--process-id", type=int_in(0), default=None, metavar="I",
                   help=f"0..N-1 (or ${ENV['process_id']})")
    g.add_argument("--init-timeout", type=int_in(1, MAX_TIMEOUT_S), default=120, metavar="S",
                   help="seconds to wait for every process to join before failing with exit status 2 (default 120)")
    g.add_argument("--heartbeat-timeout", type=int_in(1, MAX_TIMEOUT_S), default=60, metavar="S",
                   help="a process whose peer dies stops at once, one whose peer stops answering after S seconds, "
                        "with a one-line error and exit status 1 (default 60)")


def start_or_report(args: argparse.Namespace) -> bool:
    """`initialize(args)` for a command-line program: False (after printing `error: ...` to stderr) when the
    group cannot start; the program then exits with status 2."""
    try:
        initialize(args)
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return False
    return True


def _cluster_detected() -> bool:
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in tpu_hosts:
        return True
    return any(os.environ.get(k) not in (None, "", "1") for k in _CLUSTER_MARKERS if k != "TPU_WORKER_HOSTNAMES")


def _source(args: argparse.Namespace | None, key: str) -> str:
    """How the user set a setting: its flag, or its environment variable."""
    flag = getattr(args, key, None) if args is not None else None
    return f"--{key.replace('_', '-')}" if flag is not None or ENV[key] not in os.environ else f"${ENV[key]}"


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


def _timeout(name: str, value: Any, default: int) -> int:
    """A timeout in whole seconds in [1, MAX_TIMEOUT_S] (default when None); DistributedError otherwise."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or not 1 <= value <= MAX_TIMEOUT_S:
        raise DistributedError(f"{name} must be a whole number of seconds in [1, {MAX_TIMEOUT_S}], got {value!r}")
    return int(value)


def parse_coordinator(text: str, name: str = "--coordinator") -> tuple[str, int]:
    """(host, port) of `HOST:PORT` (`[v6 address]:PORT` too); DistributedError naming `name` for an empty host,
    a port that is not an integer in 1..65535, or a host that does not resolve."""
    host, sep, port_text = str(text).strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit():
        raise DistributedError(f"{name} must be HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise DistributedError(f"{name} {text}: port {port} is not in 1..65535")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise DistributedError(f"{name} {text}: cannot resolve host {host!r} ({why})") from None
    return host, port


def initialize(args: argparse.Namespace | None = None, timeout_s: int | None = None,
               heartbeat_timeout_s: int | None = None) -> None:
    """Starts the process group when asked for (see the module docstring); a no-op for one process.

    Raises DistributedError naming the bad value for incomplete, out-of-range or inconsistent settings, and when
    the group does not form within the timeout (process 0 alone, the coordinator unreachable or not a
    mistral-jax process 0). Once formed, a process whose peer dies or stops answering for
    `heartbeat_timeout_s` prints one line and exits with status 1 (see `peer_watch.PeerWatch`).
    """
    if jax.distributed.is_initialized():
        return
    s = settings(args)
    timeout_s = _timeout("--init-timeout", timeout_s if timeout_s is not None else getattr(args, "init_timeout", None),
                         120)
    heartbeat_timeout_s = _timeout("--heartbeat-timeout", heartbeat_timeout_s if heartbeat_timeout_s is not None
                                   else getattr(args, "heartbeat_timeout", None), 60)
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
        raise DistributedError(f"{_source(args, 'num_processes')} must be >= 1, got {n}")
    if n == 1 and s["coordinator"] is None:
        return
    if i is None or not 0 <= i < n:
        raise DistributedError(f"{_source(args, 'process_id')} must be in [0, {n - 1}] for "
                               f"{_source(args, 'num_processes')} {n}, got {i}")
    coordinator = str(s["coordinator"])
    host, port = parse_coordinator(coordinator, _source(args, "coordinator"))
    if n == 1:                   # a group of one: nobody to wait for or to watch
        _start(coordinator, n, i, timeout_s, heartbeat_timeout_s)
        return
    if i == 0:
        peers = rendezvous.rendezvous_as_host(host, port, n, timeout_s)
    else:
        peers = {0: rendezvous.rendezvous_as_member(host, port, n, i, timeout_s)}
    watch = PeerWatch(peers, i, n, f"{host}:{port}", heartbeat_timeout_s)
    watch.start()
    try:
        # jax's heartbeat aborts the process from C++: a backstop behind the watcher's own timeout
        _start(coordinator, n, i, timeout_s, 2 * heartbeat_timeout_s)
    except DistributedError:
        watch.close()            # the others see the channel close before the group formed
        raise
    watch.formed()


def _start(coordinator: str | None = None, n: int | None = None, i: int | None = None, timeout_s: int = 120,
           heartbeat_timeout_s: int = 60) -> None:
    """jax.distributed.initialize, its failure as one DistributedError line."""
    try:
        jax.distributed.initialize(coordinator, n, i, initialization_timeout=int(timeout_s),
                                   heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    except Exception as e:  # noqa: BLE001 - jax raises XlaRuntimeError / RuntimeError with long texts
        where = f"coordinator {coordinator}" if coordinator else "the auto-detected cluster"
        raise DistributedError(f"could not form the process group with {where} (process {i} of {n}) within "
                               f"{timeout_s} s: {first_line(e)}") from None


def is_main() -> bool:
    """True on process 0, the one that logs and writes files other than orbax checkpoints."""
    return jax.process_index() == 0


def allgather_json(value: Any, max_bytes: int | None = None) -> list[Any]:
    """Every process's JSON-able `value`, in process order (a single-element list for one process).

    max_bytes: the buffer size every process agrees on; None gathers the sizes first (one more collective).
    """
    if jax.process_count() == 1:
        return [value]
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
            multihost_utils.sync_global_devices(name)


def global_array(host: np.ndarray, sharding: Any) -> jax.Array:
    """A jax array in `sharding` from a host array every process holds whole (each places its own shards)."""
    host = np.asarray(host)
    if jax.process_count() == 1:
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process sharded) array as numpy, on every process."""
    # waiting first: on XLA:CPU (jaxlib 0.10.2) np.asarray of the output of a program whose allocation failed
    # after dispatch waits forever, while block_until_ready raises the error
    jax.block_until_ready(x)
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
