"""Run a producer ahead of its consumer: a thread and a bounded queue.

Decoding and preprocessing are CPU work; the vision tower and the prefill are accelerator work. Iterated
through `Prefetcher`, the next slice is decoded while the model encodes the current one. The thread never
outlives the `with` block: an error in the producer is raised in the consumer (its own type and
traceback), and a consumer that stops early (an error, a deletion, a time limit) stops the producer and
closes its source (so a decoder closes its file) before the block exits.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()
_POLL_SECONDS = 0.1  # how often a blocked producer checks whether it should stop


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Iterate over `source` while a thread computes up to `depth` items ahead. Use it as a context manager.

    Args:
        source (Iterable): produced in the thread; when it is a generator, it is closed there if the
            consumer stops early.
        depth (int): most items waiting in the queue (memory stays bounded by depth + 2 items: the queued
            ones, the one being produced and the one being consumed).
        name (str): the thread's name (for debugging and for tests that look for orphans).
    """

    def __init__(self, source: Iterable[T], depth: int = 2, name: str = "videoqa-prefetch") -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._done = False

    def __enter__(self) -> Prefetcher[T]:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._done = True
            raise item.error
        return item

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until `next()` would not block (an item, the end or an error is queued), at most `timeout`
        seconds; whether it would not."""
        # queue.Queue's own condition, notified on every put; its lock is the queue's (so no qsize() here)
        with self._queue.not_empty:
            return self._done or self._queue.not_empty.wait_for(lambda: len(self._queue.queue) > 0, timeout)

    def close(self) -> None:
        """Stop the producer (if it still runs) and wait for its thread to end."""
        self._stop.set()
        self._done = True
        self._thread.join()

    def _produce(self) -> None:
        iterator = iter(self._source)
        try:
            for item in iterator:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(_Failed(error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # a generator's finally blocks run here, in its own thread

    def _put(self, item) -> bool:
        """Queue `item`, waiting for room; False when the consumer stopped meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False
