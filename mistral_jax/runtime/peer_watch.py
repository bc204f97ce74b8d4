"""The liveness channels of a formed process group: a process whose peer dies or stops answering stops too,
with one line, instead of hanging in a collective or aborting from C++.

Each rendezvous connection stays open as a channel (process 0 to each other process) watched by a thread: a
process that dies closes it at once, and one that stops answering sends no ping for --heartbeat-timeout
seconds. The survivors then print one line naming the process and exit with status 1 (2 before the group has
formed); process 0 relays the news to the others. Processes that finish say "bye" at exit, so a finished
process's closing connection is not a death.

Limits: process 0 also hosts jax's coordination service, so when process 0 dies the others' jax clients see
the service go at the same moment as the watcher sees the channel close, and may abort first with jax's own
message (the watcher usually wins). The pings come from a Python thread: a process that holds the GIL in one
C call for longer than --heartbeat-timeout looks stalled to its peers.
"""

from __future__ import annotations

import atexit
import os
import selectors
import socket
import sys
import threading
import time
from typing import Any

PEER_GRACE_S = 10.0                   # how long an uncaught exception waits for the watcher's verdict


class PeerWatch:
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
        """Starts the watcher thread, the "bye" at exit and the exception hooks that wait for its verdict."""
        for conn in self.peers.values():
            conn.setblocking(True)
            conn.settimeout(max(1.0, self._interval))   # sends never block the watcher for long
        threading.Thread(target=self._run, name="mistral-jax-peer-watch", daemon=True).start()
        atexit.register(self._leave)
        prev_hook, prev_thread_hook = sys.excepthook, threading.excepthook

        def hook(tp: type[BaseException], value: BaseException, tb: Any) -> None:
            if not issubclass(tp, KeyboardInterrupt) and self.failed.wait(PEER_GRACE_S):
                time.sleep(60)                         # the watcher is ending the process with its one line
            prev_hook(tp, value, tb)
            if not self._closed:
                flush_std()
                os._exit(1)                            # not jax's shutdown barrier: the others stop at once

        def thread_hook(hook_args: Any) -> None:
            if not issubclass(hook_args.exc_type, KeyboardInterrupt) and self.failed.wait(PEER_GRACE_S):
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
        flush_std()
        os.write(2, line.encode("utf-8", "replace"))
        os._exit(1 if self._formed else 2)


def flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
