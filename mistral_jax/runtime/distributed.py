"""Multi-process start-up (one process per host, every process runs the same program) and the few
helpers the programs need: who is process 0, and small host values shared across processes.

Every entry point calls `initialize` first. With nothing given it does nothing (one process), unless
the environment is a cluster that `jax.distributed.initialize()` detects by itself (a TPU pod slice,
SLURM, Open MPI), where it lets jax auto-detect. `--coordinator HOST:PORT --num-processes N
--process-id I` (or MISTRAL_JAX_COORDINATOR / MISTRAL_JAX_NUM_PROCESSES / MISTRAL_JAX_PROCESS_ID)
start an explicit group, e.g. several processes on one machine or GPU nodes without a scheduler.

An explicit group forms in two steps, so that every start-up failure is one line (`error: ...`, exit
status 2) instead of jax's abort with a C++ stack:

1. Rendezvous, before jax: process 0 listens on the coordinator's port, checks that the address reaches it,
   and waits (--init-timeout) until processes 1..N-1 have connected and said who they are; it refuses a
   wrong --num-processes, a repeated or out-of-range --process-id, and reports the processes that never
   came. The others retry until process 0 listens, and refuse a port that does not answer as a mistral-jax
   process 0 (another program's listener). Then process 0 closes the listener and jax's own coordination
   service takes the port.
2. jax.distributed.initialize, with every process known to be there.

Each rendezvous connection stays open as a liveness channel (process 0 to each other process) watched by a
thread: a process that dies closes it at once, and one that stops answering sends no ping for
--heartbeat-timeout seconds. The survivors then print one line naming the process and exit with status 1
(2 before the group has formed); process 0 relays the news to the others. jax's own heartbeat, which aborts
the process from C++, is set to twice that timeout as a backstop. Processes that finish say "bye" at exit,
so a finished process's closing connection is not a death.

Limits: process 0 also hosts jax's coordination service, so when process 0 dies the others' jax clients see
the service go at the same moment as the watcher sees the channel close, and may abort first with jax's own
message (the watcher usually wins). The pings come from a Python thread: a process that holds the GIL in one
C call for longer than --heartbeat-timeout looks stalled to its peers. Clusters that jax detects by itself
(no --coordinator) start as jax does, without the rendezvous or the watcher.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import secrets
import selectors
import socket
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from mistral_jax.errors import DistributedError

ENV = {"coordinator": "MISTRAL_JAX_COORDINATOR", "num_processes": "MISTRAL_JAX_NUM_PROCESSES",
       "process_id": "MISTRAL_JAX_PROCESS_ID"}
# Environment variables that mark a multi-host cluster jax.distributed.initialize() detects by itself.
_CLUSTER_MARKERS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_TASKS",
                    "OMPI_COMM_WORLD_SIZE")
MAX_TIMEOUT_S = 7 * 24 * 3600          # --init-timeout / --heartbeat-timeout ceiling (jax takes int32 seconds)
_MAGIC = "mistral-jax-group/1"         # first word of every rendezvous hello
_MAX_LINE = 512                        # longest protocol line; a longer one is not ours
_PEER_GRACE_S = 10.0                   # how long an uncaught exception waits for the watcher's verdict


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'}, "
                                             f"got {v}")
        return v
    return parse


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
    `heartbeat_timeout_s` prints one line and exits with status 1 (see `_PeerWatch`).
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
        peers = _rendezvous_as_host(host, port, n, timeout_s)
    else:
        peers = {0: _rendezvous_as_member(host, port, n, i, timeout_s)}
    watch = _PeerWatch(peers, i, n, f"{host}:{port}", heartbeat_timeout_s)
    watch.start()
    try:
        # jax's heartbeat aborts the process from C++: a backstop behind the watcher's own timeout
        _start(coordinator, n, i, timeout_s, 2 * heartbeat_timeout_s)
    except DistributedError:
        watch.close()            # the others see the channel close before the group formed
        raise
    watch.formed()


def _hello(n: int, i: int, nonce: str) -> bytes:
    return f"{_MAGIC} hello {n} {i} {nonce}\n".encode()


def _rendezvous_as_host(host: str, port: int, n: int, timeout_s: int) -> dict[int, socket.socket]:
    """Process 0: listens on `port`, checks that HOST:PORT reaches this process, and returns once processes
    1..n-1 have all said hello (their connections, by process id); DistributedError otherwise, after telling
    the processes that did come why."""
    deadline = time.monotonic() + timeout_s
    where = f"{host}:{port}"
    dual = socket.has_dualstack_ipv6()
    try:
        srv = socket.create_server(("", port), family=socket.AF_INET6 if dual else socket.AF_INET,
                                   dualstack_ipv6=dual, backlog=max(16, min(n, 1024)))
    except OSError as e:
        raise DistributedError(f"process 0 cannot listen on port {port} of the coordinator {where} "
                               f"({e.strerror or e}); choose a free port") from None
    nonce = secrets.token_hex(8)
    sel = selectors.DefaultSelector()
    members: dict[int, socket.socket] = {}
    buffers: dict[socket.socket, bytearray] = {}
    me: socket.socket | None = None              # process 0's own connection: proof the address reaches it

    def fail(message: str, *also: socket.socket) -> DistributedError:
        """Tells every connected process (and `also`) why the group cannot form; the error to raise."""
        for conn in [*members.values(), *buffers, *also]:
            try:
                conn.sendall(f"error {message}\n".encode())
            except OSError:
                pass
            conn.close()
        return DistributedError(message)

    try:
        sel.register(srv, selectors.EVENT_READ)
        try:
            me = socket.create_connection((host, port), timeout=max(1.0, min(10.0, timeout_s)))
            me.sendall(_hello(n, 0, nonce))
        except OSError as e:
            raise fail(f"the coordinator address {where} does not reach process 0 ({e.strerror or e}); run process "
                       "0 on that host, or give its address") from None
        reached_self = False
        while len(members) < n - 1 or not reached_self:
            left = deadline - time.monotonic()
            if left <= 0:
                if not reached_self:
                    raise fail(f"the coordinator address {where} does not reach process 0 (its own hello never "
                               "arrived); run process 0 on that host, or give its address")
                absent = [k for k in range(1, n) if k not in members]
                raise fail(f"process(es) {_ranges(absent)} of {n} did not join the coordinator {where} within "
                           f"{timeout_s} s (--init-timeout); start them with --coordinator {where} --num-processes "
                           f"{n}")
            for key, _ in sel.select(timeout=min(left, 1.0)):
                if key.fileobj is srv:
                    try:
                        conn, _ = srv.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    buffers[conn] = bytearray()
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(_MAX_LINE)
                except OSError:
                    data = b""
                if conn not in buffers:                      # a member: it should wait quietly for "go"
                    k = next(k for k, c in members.items() if c is conn)
                    if not data:
                        sel.unregister(conn)
                        del members[k]
                        raise fail(f"process {k} of {n} left before the group formed at the coordinator {where}")
                    continue
                buf = buffers[conn]
                buf += data
                if not data or (b"\n" not in buf and len(buf) >= _MAX_LINE) or not _MAGIC.encode().startswith(
                        bytes(buf[:len(_MAGIC)])):
                    sel.unregister(conn)                     # not one of ours (a port scan, another program)
                    del buffers[conn]
                    conn.close()
                    continue
                if b"\n" not in buf:
                    continue
                words = buf[:buf.index(b"\n")].decode("ascii", "replace").split()
                del buffers[conn]
                if len(words) != 5 or words[1] != "hello" or not words[2].isdigit() or not words[3].isdigit():
                    sel.unregister(conn)
                    conn.close()
                    continue
                pn, pi, their_nonce = int(words[2]), int(words[3]), words[4]
                if pi == 0 and their_nonce == nonce:        # our own hello: the address reaches this process
                    reached_self = True
                    sel.unregister(conn)
                    conn.close()
                    continue
                if pn != n:
                    raise fail(f"process {pi} was started with --num-processes {pn}, process 0 with {n}", conn)
                if not 1 <= pi < n:
                    raise fail(f"a process with --process-id {pi} joined; with --num-processes {n} the others "
                               f"are 1..{n - 1} (process 0 is already running at {where})", conn)
                if pi in members:
                    raise fail(f"two processes were started with --process-id {pi}", conn)
                members[pi] = conn
                try:
                    conn.sendall(b"wait\n")                  # acknowledged: a mistral-jax process 0 is here
                except OSError:
                    pass
        for k, conn in members.items():
            conn.setblocking(True)
            try:
                conn.sendall(b"go\n")
            except OSError:
                raise fail(f"process {k} of {n} left before the group formed at the coordinator {where}") from None
        return members
    except BaseException:
        for conn in list(members.values()) + list(buffers):
            conn.close()
        raise
    finally:
        if me is not None:
            me.close()
        sel.close()
        srv.close()


def _ranges(ids: Sequence[int]) -> str:
    """'1, 3-5' for [1, 3, 4, 5] (ids ascending)."""
    runs: list[list[int]] = []
    for k in ids:
        if runs and runs[-1][1] == k - 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _rendezvous_as_member(host: str, port: int, n: int, i: int, timeout_s: int) -> socket.socket:
    """Process i > 0: connects to process 0 (retrying until it listens), says hello and returns the connection
    once process 0 says the whole group is there; DistributedError with process 0's reason, or naming the
    coordinator when nothing there answers as a mistral-jax process 0."""
    deadline = time.monotonic() + timeout_s
    where = f"{host}:{port}"
    last = ""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DistributedError(f"the coordinator {where} was not reachable within {timeout_s} s (process {i} "
                                   f"of {n}; last error: {last}); start process 0 there, or check --coordinator")
        try:
            conn = socket.create_connection((host, port), timeout=min(2.0, max(0.1, left)))
            break
        except OSError as e:
            last = e.strerror or type(e).__name__
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
    not_ours = (f"the coordinator {where} is not a mistral-jax process 0 (process {i} of {n}): it")
    acked = False
    buf = b""
    try:
        conn.sendall(_hello(n, i, "-"))
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                word, _, rest = line.decode("utf-8", "replace").partition(" ")
                if word == "go" and acked:
                    conn.settimeout(None)
                    return conn
                if word == "wait":
                    acked = True
                elif word == "error":
                    raise DistributedError(f"process 0 at the coordinator {where} stopped the group: {rest}")
                else:
                    raise DistributedError(f"{not_ours} answered {line[:60]!r}; check --coordinator")
            if len(buf) > _MAX_LINE:
                raise DistributedError(f"{not_ours} answered {buf[:60]!r}; check --coordinator")
            left = deadline - time.monotonic()
            if left <= 0:
                if acked:
                    raise DistributedError(f"the group at the coordinator {where} did not form within {timeout_s} s "
                                           f"(--init-timeout; process {i} of {n} joined, process 0 waits for others)")
                raise DistributedError(f"{not_ours} accepted the connection but did not answer within "
                                       f"{timeout_s} s (--init-timeout); check --coordinator")
            conn.settimeout(min(left, 1.0))
            try:
                data = conn.recv(_MAX_LINE)
            except socket.timeout:
                continue
            except OSError as e:
                data, last = b"", e.strerror or type(e).__name__
            if not data:
                if acked:
                    raise DistributedError(f"process 0 at the coordinator {where} stopped before the group formed "
                                           f"(process {i} of {n})")
                raise DistributedError(f"{not_ours} closed the connection without answering; check --coordinator")
            buf += data
    except OSError as e:                               # the listener reset the connection
        conn.close()
        raise DistributedError(f"{not_ours} reset the connection ({e.strerror or e}); check --coordinator") from None
    except BaseException:
        conn.close()
        raise


class _PeerWatch:
    """The liveness channels of a formed group (process 0: one per other process; others: one to process 0),
    watched by a daemon thread that pings each peer every few seconds. A peer whose channel closes before it
    said "bye" (it died), or that sends nothing for `timeout_s`, ends this process: one `error:` line on stderr
    and exit status 1 (2 if jax's group has not formed yet); process 0 first tells the other processes which
    process it was. At exit (atexit, before jax's own shutdown) the process says "bye"; a peer's closing
    channel is then expected once both have said it. An uncaught exception waits briefly for the watcher's
    verdict, so that a collective that failed because a peer died yields the one line, not a traceback;
    otherwise it prints its traceback and ends the process at once (the others then stop too, instead of
    waiting in jax's shutdown barrier)."""

    def __init__(self, peers: dict[int, socket.socket], me: int, n: int, where: str, timeout_s: int) -> None:
        self.peers, self.me, self.n, self.where, self.timeout_s = dict(peers), me, n, where, timeout_s
        self.failed = threading.Event()       # set once the watcher has decided to end the process
        self._send_lock = threading.Lock()
        self._said_bye: set[int] = set()
        self._leaving = False
        self._formed = False
        self._closed = False
        self._interval = max(0.2, min(5.0, timeout_s / 6))

    def start(self) -> None:
        for conn in self.peers.values():
            conn.setblocking(True)
            conn.settimeout(max(1.0, self._interval))   # sends never block the watcher for long
        threading.Thread(target=self._run, name="mistral-jax-peer-watch", daemon=True).start()
        atexit.register(self._leave)
        prev_hook, prev_thread_hook = sys.excepthook, threading.excepthook

        def hook(tp: type[BaseException], value: BaseException, tb: Any) -> None:
            if not issubclass(tp, KeyboardInterrupt) and self.failed.wait(_PEER_GRACE_S):
                time.sleep(60)                         # the watcher is ending the process with its one line
            prev_hook(tp, value, tb)
            if not self._closed:
                _flush_std()
                os._exit(1)                            # not jax's shutdown barrier: the others stop at once

        def thread_hook(hook_args: Any) -> None:
            if not issubclass(hook_args.exc_type, KeyboardInterrupt) and self.failed.wait(_PEER_GRACE_S):
                time.sleep(60)
            prev_thread_hook(hook_args)

        sys.excepthook, threading.excepthook = hook, thread_hook

    def formed(self) -> None:
        """jax's group has formed: a peer's death now means exit status 1 (run failed), not 2."""
        self._formed = True

    def close(self) -> None:
        """Closes every channel without "bye" (the group failed to start) and stops watching."""
        self._closed = True
        for conn in self.peers.values():
            try:
                conn.close()
            except OSError:
                pass

    def _send(self, conn: socket.socket, line: str) -> None:
        with self._send_lock:
            try:
                conn.sendall(line.encode())
            except OSError:
                pass                                   # a dead peer shows as a closed channel on the read side

    def _leave(self) -> None:
        if self._closed or self.failed.is_set():
            return
        self._leaving = True
        for conn in self.peers.values():
            self._send(conn, "bye\n")

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for k, conn in self.peers.items():
            sel.register(conn, selectors.EVENT_READ, k)
        buffers = {k: b"" for k in self.peers}
        last = {k: time.monotonic() for k in self.peers}
        next_ping = 0.0
        while not self._closed:
            now = time.monotonic()
            if now >= next_ping:
                for k in last:                         # the peers whose channel is still open
                    self._send(self.peers[k], "ping\n")
                next_ping = now + self._interval
            try:
                events = sel.select(timeout=max(0.05, next_ping - now))
            except (OSError, ValueError):              # closed by close()
                return
            now = time.monotonic()
            for key, _ in events:
                k = key.data
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b""
                if self._closed:
                    return
                if not data:
                    sel.unregister(key.fileobj)
                    del last[k]
                    if k in self._said_bye and self._leaving:
                        continue                       # both finished: the peer has exited
                    self._end(k, "stopped before finishing (its connection closed)")
                last[k] = now
                buffers[k] += data
                *lines, buffers[k] = buffers[k].split(b"\n")
                for line in lines:
                    word, _, rest = line.decode("utf-8", "replace").partition(" ")
                    if word == "bye":
                        self._said_bye.add(k)
                    elif word == "dead" and k == 0 and self.me != 0:
                        dead, _, what = rest.partition(" ")
                        self._end(int(dead) if dead.isdigit() else -1, what, relayed=True)
            for k, t in list(last.items()):
                if now - t > self.timeout_s:
                    self._end(k, f"sent nothing for {self.timeout_s} s (--heartbeat-timeout)")

    def _end(self, k: int, what: str, relayed: bool = False) -> None:
        """Prints the one line about peer k and exits (never returns)."""
        self.failed.set()
        if self.me == 0:
            for other, conn in self.peers.items():
                if other != k:
                    self._send(conn, f"dead {k} {what}\n")
        who = f"process {k} of {self.n}" + (f" (the coordinator {self.where})" if k == 0 else "")
        via = " (reported by process 0)" if relayed else ""
        stage = "" if self._formed else " before the group formed"
        line = f"error: {who} {what}{via}{stage}; process {self.me} stops too\n"
        _flush_std()
        os.write(2, line.encode("utf-8", "replace"))
        os._exit(1 if self._formed else 2)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


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
    # waiting first: on XLA:CPU (jaxlib 0.10.2) np.asarray of the output of a program whose allocation failed
    # after dispatch waits forever, while block_until_ready raises the error
    jax.block_until_ready(x)
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
