"""Transfers: chains of copy steps run on worker threads while the model computes.

A :class:`Transfer` is a list of steps (each a callable that starts a copy and may return something
with a ``wait()`` method: an I/O request, a CUDA event). A :class:`TransferWorker` thread runs the
steps of each transfer in order and waits on what they return; the GIL is released while it waits,
so compute goes on. Workers never allocate tier memory and never change block state: the scheduler
allocates destinations before it submits, and applies a transfer's effect when it *reaps* it on the
thread that runs the model. So there is no lock shared between compute and transfers, and a failed
transfer changes nothing but its own error, which the reaping thread raises.
"""

from __future__ import annotations

import atexit
import collections
import queue
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Transfer", "TransferShare", "TransferWorker", "Span", "SpanLog"]

Step = Callable[[], Any]


@dataclass(slots=True)
class Span:
    """One timed interval, for reports and Chrome traces."""

    name: str
    category: str  # "transfer", "compute", "wait", "optimizer"
    lane: str  # e.g. "nvme->dram", "compute"
    start: float
    end: float
    nbytes: int = 0


class SpanLog:
    """The last ``limit`` spans, thread-safe; older ones are dropped (counted in ``dropped``), so a
    long run's log stops growing after a few hundred steps and a trace shows its latest steps.
    ``enabled=False`` keeps nothing."""

    def __init__(self, limit: int = 50_000) -> None:
        self.enabled = True
        self.limit = limit
        self._spans: collections.deque[Span] = collections.deque(maxlen=limit)
        self._lock = threading.Lock()
        self.dropped = 0

    def add(self, span: Span) -> None:
        if not self.enabled:
            return
        with self._lock:
            if len(self._spans) == self.limit:
                self.dropped += 1  # the oldest span falls out
            self._spans.append(span)

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self.dropped = 0


@dataclass(eq=False)
class Transfer:
    """A chain of copy steps moving ``nbytes`` over ``link`` (e.g. "nvme->dram").

    ``wait()`` blocks until every step finished and re-raises the first error. ``keep`` holds
    objects (buffers, tensors) that must stay alive until the transfer is done.
    """

    label: str
    link: str
    nbytes: int
    steps: list[Step]
    keep: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    submitted: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    reaped: bool = False
    _done: threading.Event = field(default_factory=threading.Event)

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> None:
        if not self._done.wait(timeout):
            raise TimeoutError(f"transfer {self.label} ({self.link}) did not finish in {timeout}s")
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        """Run every step in order on the calling thread, waiting on what each returns."""
        self.started = time.perf_counter()
        steps, self.steps = self.steps, []
        step: Step | None = None
        pending: Any = None
        try:
            for step in steps:
                pending = step()
                if pending is not None and hasattr(pending, "wait"):
                    pending.wait()
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait() on the reaping thread
            # The error lives on (raised later, logged): its traceback must not keep the frames'
            # buffers alive. The message says what failed (path, offset, errno).
            traceback.clear_frames(exc.__traceback__)
            self.error = exc
        finally:
            self.finished = time.perf_counter()
            # Drop the closures (and the buffers they hold) as soon as possible: also from the list
            # the loop's iterator still references while a failure's traceback keeps this frame.
            steps.clear()
            step = pending = None
            self._done.set()


class TransferShare:
    """One kind's share of a transfer that moves several kinds at once: its own label and bytes,
    the whole transfer's link, timing, completion and error (what the pipeline reaps per kind)."""

    def __init__(self, transfer: Transfer, nbytes: int, label: str) -> None:
        self.transfer = transfer
        self.nbytes = nbytes
        self.label = label

    @property
    def link(self) -> str:
        return self.transfer.link

    @property
    def _done(self) -> threading.Event:
        return self.transfer._done

    @property
    def error(self) -> BaseException | None:
        return self.transfer.error

    @property
    def started(self) -> float:
        return self.transfer.started

    @property
    def finished(self) -> float:
        return self.transfer.finished

    def done(self) -> bool:
        return self.transfer.done()

    def wait(self, timeout: float | None = None) -> None:
        self.transfer.wait(timeout)


# Workers not closed yet: stopped at interpreter exit (see _stop_workers_at_exit).
_LIVE_WORKERS: weakref.WeakSet[TransferWorker] = weakref.WeakSet()


class TransferWorker:
    """One thread running transfers in submission order.

    The thread is a daemon (a runtime left open must not keep the process alive), so a worker
    not closed by then is stopped at interpreter exit: a daemon thread still inside a native
    transfer when Python finalises would be unwound through C++ frames, and the process aborts."""

    def __init__(self, name: str, spans: SpanLog | None = None) -> None:
        self.name = name
        self.spans = spans
        self._queue: queue.SimpleQueue[Transfer | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"tierrt-{name}", daemon=True)
        self._closed = False
        self.busy_seconds = 0.0
        self._thread.start()
        _LIVE_WORKERS.add(self)

    def submit(self, transfer: Transfer) -> Transfer:
        if self._closed:
            raise RuntimeError(f"transfer worker {self.name} is closed")
        transfer.submitted = time.perf_counter()
        self._queue.put(transfer)
        return transfer

    def _loop(self) -> None:
        while True:
            transfer = self._queue.get()
            if transfer is None:
                return
            transfer.run()
            self.busy_seconds += transfer.finished - transfer.started
            if self.spans is not None:
                self.spans.add(
                    Span(
                        transfer.label,
                        "transfer",
                        transfer.link,
                        transfer.started,
                        transfer.finished,
                        transfer.nbytes,
                    )
                )

    def close(self, timeout: float | None = 60.0) -> None:
        """Finish queued transfers, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        _LIVE_WORKERS.discard(self)


@atexit.register
def _stop_workers_at_exit() -> None:
    """Let every open worker finish its queued transfers and stop, before Python finalises."""
    for worker in list(_LIVE_WORKERS):
        worker.close(timeout=30.0)
