"""Batches prepared ahead of the train step: a background thread reads, packs and places the next batches
while the device runs the current step.

The data position saved with a checkpoint must be that of the batches the steps consumed, not of the
ones read ahead, so each batch travels with the stream state taken right after it was read.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

_DONE = object()


class Prefetcher:
    """Iterates (placed batch, stream state after it) from `batches`, up to `depth` batches ahead.

    place: host batch -> device batch (e.g. train_step.put_batch), run in the thread; state: the stream's
    `state()` function. An exception in the thread (bad data, a failed device_put) is raised by the
    `next()` that would have returned that batch. `close()` stops the thread.
    """

    def __init__(self, batches: Iterator[dict[str, Any]], place: Callable[[dict[str, Any]], Any],
                 state: Callable[[], dict[str, Any]], depth: int = 2):
        if depth < 1:
            raise ValueError(f"Prefetcher: depth must be >= 1, got {depth}")
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(batches, place, state), daemon=True,
                                        name="batch-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, batches, place, state) -> None:
        try:
            for host in batches:
                item = (place(host), state())
                if not self._put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(e)
            return
        self._put(_DONE)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> tuple[Any, dict[str, Any]]:
        item = self._q.get()
        if item is _DONE:
            self._q.put(_DONE)
            raise StopIteration
        if isinstance(item, BaseException):
            self._q.put(item)
            raise item
        return item

    def close(self) -> None:
        """Stops reading ahead (the thread exits after its current batch)."""
        self._stop.set()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=30)
