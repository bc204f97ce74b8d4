"""The rendezvous of an explicit process group, before jax starts, so that every start-up failure is one line.

Process 0 listens on the coordinator's port, checks that the address reaches it, and waits (--init-timeout)
until processes 1..N-1 have connected and said who they are; it refuses a wrong --num-processes, a repeated
or out-of-range --process-id, and reports the processes that never came. The others retry until process 0
listens, and refuse a port that does not answer as a mistral-jax process 0 (another program's listener).
Then process 0 closes the listener and jax's own coordination service takes the port. The connections stay
open as the group's liveness channels (see `peer_watch`).

Protocol, one line each: "mistral-jax-group/1 hello N I NONCE" (member -> process 0), "wait" (acknowledged),
"go" (the group is complete), "error MESSAGE" (the group cannot form).
"""

from __future__ import annotations

import secrets
import selectors
import socket
import time
from typing import Sequence

from mistral_jax.errors import DistributedError

MAGIC = "mistral-jax-group/1"         # first word of every rendezvous hello
MAX_LINE = 512                        # longest protocol line; a longer one is not ours


def hello(n: int, i: int, nonce: str) -> bytes:
    """The hello line of process `i` of `n` (process 0 sends its own with a secret nonce)."""
    return f"{MAGIC} hello {n} {i} {nonce}\n".encode()


def ranges(ids: Sequence[int]) -> str:
    """'1, 3-5' for [1, 3, 4, 5] (ids ascending)."""
    runs: list[list[int]] = []
    for k in ids:
        if runs and runs[-1][1] == k - 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class _Host:
    """Process 0's side of the rendezvous: the listener, the connections still saying hello (`buffers`) and
    the members that did (`members`, by process id)."""

    def __init__(self, host: str, port: int, n: int, timeout_s: int):
        self.host, self.port, self.n, self.timeout_s = host, port, n, timeout_s
        self.where = f"{host}:{port}"
        self.deadline = time.monotonic() + timeout_s
        self.nonce = secrets.token_hex(8)
        self.members: dict[int, socket.socket] = {}
        self.buffers: dict[socket.socket, bytearray] = {}
        self.reached_self = False
        self.sel = selectors.DefaultSelector()
        dual = socket.has_dualstack_ipv6()
        try:
            self.srv = socket.create_server(("", port), family=socket.AF_INET6 if dual else socket.AF_INET,
                                            dualstack_ipv6=dual, backlog=max(16, min(n, 1024)))
        except OSError as e:
            self.sel.close()
            raise DistributedError(f"process 0 cannot listen on port {port} of the coordinator {self.where} "
                                   f"({e.strerror or e}); choose a free port") from None
        self.sel.register(self.srv, selectors.EVENT_READ)

    def fail(self, message: str, *also: socket.socket) -> DistributedError:
        """Tells every connected process (and `also`) why the group cannot form; the error to raise."""
        for conn in [*self.members.values(), *self.buffers, *also]:
            try:
                conn.sendall(f"error {message}\n".encode())
            except OSError:
                pass
            conn.close()
        return DistributedError(message)

    def wait_for_all(self) -> None:
        """Returns once every member has said hello and process 0's own hello arrived; DistributedError at
        the deadline or for a member that breaks the rules."""
        while len(self.members) < self.n - 1 or not self.reached_self:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out()
            for key, _ in self.sel.select(timeout=min(left, 1.0)):
                if key.fileobj is self.srv:
                    self._accept()
                else:
                    self._read(key.fileobj)

    def _timed_out(self) -> DistributedError:
        if not self.reached_self:
            return self.fail(f"the coordinator address {self.where} does not reach process 0 (its own hello never "
                             "arrived); run process 0 on that host, or give its address")
        absent = [k for k in range(1, self.n) if k not in self.members]
        return self.fail(f"process(es) {ranges(absent)} of {self.n} did not join the coordinator {self.where} "
                         f"within {self.timeout_s} s (--init-timeout); start them with --coordinator {self.where} "
                         f"--num-processes {self.n}")

    def _accept(self) -> None:
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        conn.setblocking(False)
        self.buffers[conn] = bytearray()
        self.sel.register(conn, selectors.EVENT_READ)

    def _drop(self, conn: socket.socket) -> None:
        """Forgets a connection that is not one of ours (a port scan, another program) or already answered."""
        self.sel.unregister(conn)
        self.buffers.pop(conn, None)
        conn.close()

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(MAX_LINE)
        except OSError:
            data = b""
        if conn not in self.buffers:                      # a member: it should wait quietly for "go"
            k = next(k for k, c in self.members.items() if c is conn)
            if not data:
                self.sel.unregister(conn)
                del self.members[k]
                raise self.fail(f"process {k} of {self.n} left before the group formed at the coordinator "
                                f"{self.where}")
            return
        buf = self.buffers[conn]
        buf += data
        if not data or (b"\n" not in buf and len(buf) >= MAX_LINE) or not MAGIC.encode().startswith(
                bytes(buf[:len(MAGIC)])):
            self._drop(conn)
            return
        if b"\n" in buf:
            self._hello(conn, buf[:buf.index(b"\n")].decode("ascii", "replace").split())

    def _hello(self, conn: socket.socket, words: list[str]) -> None:
        """Admits the member that sent hello `words`, or refuses the group (DistributedError)."""
        del self.buffers[conn]
        if len(words) != 5 or words[1] != "hello" or not words[2].isdigit() or not words[3].isdigit():
            self._drop(conn)
            return
        pn, pi, their_nonce, n = int(words[2]), int(words[3]), words[4], self.n
        if pi == 0 and their_nonce == self.nonce:        # our own hello: the address reaches this process
            self.reached_self = True
            self._drop(conn)
            return
        if pn != n:
            raise self.fail(f"process {pi} was started with --num-processes {pn}, process 0 with {n}", conn)
        if not 1 <= pi < n:
            raise self.fail(f"a process with --process-id {pi} joined; with --num-processes {n} the others "
                            f"are 1..{n - 1} (process 0 is already running at {self.where})", conn)
        if pi in self.members:
            raise self.fail(f"two processes were started with --process-id {pi}", conn)
        self.members[pi] = conn
        try:
            conn.sendall(b"wait\n")                  # acknowledged: a mistral-jax process 0 is here
        except OSError:
            pass

    def go(self) -> dict[int, socket.socket]:
        """Tells every member the group is complete; their connections, by process id."""
        for k, conn in self.members.items():
            conn.setblocking(True)
            try:
                conn.sendall(b"go\n")
            except OSError:
                raise self.fail(f"process {k} of {self.n} left before the group formed at the coordinator "
                                f"{self.where}") from None
        return self.members

    def close(self, members_too: bool) -> None:
        """Closes the listener (and the members' connections when the rendezvous failed)."""
        if members_too:
            for conn in list(self.members.values()) + list(self.buffers):
                conn.close()
        self.sel.close()
        self.srv.close()


def rendezvous_as_host(host: str, port: int, n: int, timeout_s: int) -> dict[int, socket.socket]:
    """Process 0: listens on `port`, checks that HOST:PORT reaches this process, and returns once processes
    1..n-1 have all said hello (their connections, by process id); DistributedError otherwise, after telling
    the processes that did come why."""
    side = _Host(host, port, n, timeout_s)
    me: socket.socket | None = None              # process 0's own connection: proof the address reaches it
    ok = False
    try:
        try:
            me = socket.create_connection((host, port), timeout=max(1.0, min(10.0, timeout_s)))
            me.sendall(hello(n, 0, side.nonce))
        except OSError as e:
            raise side.fail(f"the coordinator address {side.where} does not reach process 0 ({e.strerror or e}); "
                            "run process 0 on that host, or give its address") from None
        side.wait_for_all()
        members = side.go()
        ok = True
        return members
    finally:
        if me is not None:
            me.close()
        side.close(members_too=not ok)


def _connect(host: str, port: int, n: int, i: int, timeout_s: int, deadline: float) -> socket.socket:
    """A connection to process 0, retried until it listens or the deadline passes (DistributedError)."""
    last = ""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DistributedError(f"the coordinator {host}:{port} was not reachable within {timeout_s} s (process "
                                   f"{i} of {n}; last error: {last}); start process 0 there, or check --coordinator")
        try:
            return socket.create_connection((host, port), timeout=min(2.0, max(0.1, left)))
        except OSError as e:
            last = e.strerror or type(e).__name__
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def rendezvous_as_member(host: str, port: int, n: int, i: int, timeout_s: int) -> socket.socket:
    """Process i > 0: connects to process 0 (retrying until it listens), says hello and returns the connection
    once process 0 says the whole group is there; DistributedError with process 0's reason, or naming the
    coordinator when nothing there answers as a mistral-jax process 0."""
    deadline = time.monotonic() + timeout_s
    where = f"{host}:{port}"
    conn = _connect(host, port, n, i, timeout_s, deadline)
    not_ours = f"the coordinator {where} is not a mistral-jax process 0 (process {i} of {n}): it"
    acked = False
    buf = b""
    try:
        conn.sendall(hello(n, i, "-"))
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
            if len(buf) > MAX_LINE:
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
                data = conn.recv(MAX_LINE)
            except socket.timeout:
                continue
            except OSError:
                data = b""
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
