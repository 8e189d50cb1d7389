"""Asynchronous file I/O between tier files and memory: the engine under the NVMe tier.

:class:`IOEngine` wraps the native engine (``tierrt._native.IOEngine``). It moves bytes between a
:class:`FileSet` (one or more files striped RAID-0 style, preallocated, opened with ``O_DIRECT``
where the filesystem allows it) and memory: any object with the buffer protocol (``bytearray``,
numpy arrays, ``memoryview``, the host arena's ``ArenaBuffer``), CPU torch tensors, or raw
addresses. Every call returns at once with a :class:`Request`; ``Request.wait()`` releases the GIL
while it waits and raises :class:`~tierrt.errors.IOEngineError` naming the file, offset, length and
errno of whatever failed.

Backends: ``"io_uring"`` (through liburing, when the build found it and the kernel allows it) and
``"threads"`` (a pool of ``pread``/``pwrite`` workers). ``"auto"`` picks io_uring when it works.
Requests are split into ``block_size`` chunks and at most ``queue_depth`` chunks are in flight.

How a transfer is done: each file is opened twice, with ``O_DIRECT`` and buffered. The part of a
request whose file offset and length are multiples of ``FileSet.logical_block_size`` (never less
than the page size) and whose memory is aligned to ``FileSet.memory_alignment`` goes through
``O_DIRECT``; an unaligned head or tail, or a whole request whose memory is not aligned (a torch
tensor is only 64-byte aligned), goes through the page cache. Because the split is at page
boundaries, a page is never written through both paths by one request, and the kernel keeps the two
descriptors coherent between requests (a direct transfer flushes and drops the cached pages of its
range). Overlapping requests in flight at the same time are, as always with asynchronous I/O, the
caller's to avoid. A request that fails names the first failing chunk: its file, offset, length,
errno and the operation; nothing else in flight is affected.

Example::

    >>> import mmap, tempfile, os
    >>> from tierrt.io import IOEngine
    >>> d = tempfile.mkdtemp(prefix="tierrt-doc-")
    >>> with IOEngine(queue_depth=8, block_size="1MiB") as eng:
    ...     fs = eng.open(os.path.join(d, "a.swap"), "4MiB")
    ...     buf = mmap.mmap(-1, 4 << 20)          # page-aligned: goes through O_DIRECT
    ...     buf[:5] = b"hello"
    ...     eng.write(fs, 0, buf).wait()
    ...     out = bytearray(5)
    ...     eng.read(fs, 0, out).wait()
    ...     bytes(out)
    ...     fs.close(remove=True)
    4194304
    5
    b'hello'
    >>> os.rmdir(d)
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from . import _native
from .errors import ConfigError
from .sizes import Size, parse_size

__all__ = [
    "IOEngine",
    "FileSet",
    "Request",
    "available_backends",
    "io_uring_status",
    "default_engine",
]

log = logging.getLogger("tierrt.io")

#: Files holding one logical byte range (see :meth:`IOEngine.open`).
FileSet = _native.FileSet
#: One read, write or sync in flight (see :meth:`IOEngine.read`).
Request = _native.Request

PathLike = str | os.PathLike


def io_uring_status() -> tuple[bool, str]:
    """``(available, reason)``: whether the io_uring backend works here, and if not, why.

    >>> ok, why = io_uring_status()
    >>> isinstance(ok, bool) and isinstance(why, str)
    True
    """
    ok, why = _native.io_uring_status()
    return bool(ok), str(why)


def available_backends() -> list[str]:
    """The backends that work on this machine, best first.

    >>> "threads" in available_backends()
    True
    """
    return (["io_uring"] if io_uring_status()[0] else []) + ["threads"]


def _tensor_span(obj: Any) -> tuple[int, int] | None:
    """``(address, nbytes)`` of a CPU, contiguous torch tensor; None for anything else."""
    torch = sys.modules.get("torch")  # no import: torch is only needed when tensors are passed
    if torch is None or not isinstance(obj, torch.Tensor):
        return None
    if obj.device.type != "cpu":
        raise ConfigError(f"IOEngine: tensors must be on the CPU, got one on {obj.device}")
    if not obj.is_contiguous():
        raise ConfigError("IOEngine: tensors must be contiguous (call .contiguous() first)")
    return obj.data_ptr(), obj.numel() * obj.element_size()


def _nbytes(value: Size | None) -> int | None:
    return None if value is None else parse_size(value, what="nbytes")


class IOEngine:
    """Asynchronous reads and writes between files and memory.

    Args:
        backend: ``"auto"`` (io_uring if available, else threads), ``"io_uring"`` (raises
            :class:`~tierrt.errors.ConfigError` saying why when it is unavailable) or ``"threads"``.
        queue_depth: chunks in flight at most, across all requests (1..4096).
        block_size: chunk size, a multiple of 4KiB ("1MiB", "8MiB", or bytes).
        threads: worker threads of the thread backend (0: ``queue_depth``, at most 256); ignored by
            io_uring, which uses one ring and one thread.
        name: shown in ``repr``, ``stats()`` and errors.

    Example::

        >>> eng = IOEngine("threads", queue_depth=4, block_size="256KiB")
        >>> eng.backend, eng.queue_depth, eng.block_size
        ('threads', 4, 262144)
        >>> eng.close()
    """

    def __init__(
        self,
        backend: str = "auto",
        queue_depth: int = 32,
        block_size: Size = "1MiB",
        threads: int = 0,
        name: str = "",
    ) -> None:
        self._native = _native.IOEngine(
            backend, int(queue_depth), parse_size(block_size, what="block_size"), int(threads), name
        )
        self._registered: list[Any] = []
        note = self._native.stats()["backend_note"]
        if note:
            log.info("IOEngine %s uses the %s backend: %s", name or "", self._native.backend, note)

    # -- properties ---------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``"io_uring"`` or ``"threads"``: the backend in use."""
        return self._native.backend

    @property
    def queue_depth(self) -> int:
        return self._native.queue_depth

    @property
    def block_size(self) -> int:
        return self._native.block_size

    @property
    def name(self) -> str:
        return self._native.name

    @property
    def closed(self) -> bool:
        return self._native.closed

    @property
    def native(self) -> Any:
        """The underlying ``tierrt._native.IOEngine``."""
        return self._native

    # -- files --------------------------------------------------------------------------------
    def open(
        self,
        paths: PathLike | Sequence[PathLike],
        size: Size,
        *,
        stripe: Size = "1MiB",
        create: bool = True,
        preallocate: bool = True,
        direct: bool = True,
        unlink: bool = False,
    ) -> FileSet:
        """Opens a :class:`FileSet` of ``size`` bytes over one file per path.

        With several paths the logical range is striped RAID-0 style, ``stripe`` bytes per stripe
        unit; each file holds ``ceil(size / stripe / len(paths))`` stripe units. ``create=True``
        creates missing files (existing data is kept) and, with ``preallocate=True``, reserves their
        space with ``fallocate(2)`` before anything is written, so a full disk is reported here
        (IOEngineError, errno ENOSPC, naming the path and size) and not in the middle of a run.
        ``direct=True`` uses ``O_DIRECT`` where the filesystem accepts it; where it does not, the
        files are used through the page cache and a warning is logged (``FileSet.direct`` is then
        False). Missing or unwritable paths raise :class:`~tierrt.errors.TierPathError`.
        ``unlink=True`` removes the name of each file this call creates as soon as it is open: the
        open descriptors keep its space until the set is closed, and the kernel frees it however the
        process ends (SIGKILL included), so no file is left behind; ``FileSet.paths`` still names
        the files, for messages.

        Example::

            >>> import tempfile, os
            >>> d = tempfile.mkdtemp(prefix="tierrt-doc-")
            >>> with IOEngine() as eng:
            ...     fs = eng.open([os.path.join(d, "a"), os.path.join(d, "b")], "3MiB", stripe="1MiB")
            ...     fs.file_size, len(fs.paths)
            ...     fs.close(remove=True)
            (2097152, 2)
            >>> os.rmdir(d)
        """
        if isinstance(paths, (str, os.PathLike)):
            path_list = [os.fspath(paths)]
        else:
            path_list = [os.fspath(p) for p in paths]
        fs = self._native.open(
            path_list,
            parse_size(size, what="size"),
            stripe=parse_size(stripe, what="stripe"),
            create=create,
            preallocate=preallocate,
            direct=direct,
            unlink=unlink,
        )
        if direct and fs.buffered_paths:
            log.warning(
                "O_DIRECT is not supported for %s; using buffered I/O through the page cache "
                "(slower, and it uses host memory outside the tier budgets)",
                ", ".join(fs.buffered_paths),
            )
        return fs

    # -- transfers ----------------------------------------------------------------------------
    def read(self, fs: FileSet, offset: int, buffer: Any, nbytes: Size | None = None) -> Request:
        """Starts reading ``nbytes`` (default: the buffer's size) at logical ``offset`` into ``buffer``.

        ``buffer`` is a writable buffer-protocol object or a CPU, contiguous torch tensor. The request
        keeps it alive until it completes.

        Example::

            >>> import tempfile, os
            >>> d = tempfile.mkdtemp(prefix="tierrt-doc-")
            >>> with IOEngine() as eng:
            ...     fs = eng.open(os.path.join(d, "x"), "1MiB")
            ...     eng.write(fs, 100, b"abc").wait()
            ...     out = bytearray(3)
            ...     eng.read(fs, 100, out).wait(), bytes(out)
            ...     fs.close(remove=True)
            3
            (3, b'abc')
            >>> os.rmdir(d)
        """
        span = _tensor_span(buffer)
        if span is not None:
            n = span[1] if nbytes is None else self._check_fit(_nbytes(nbytes), span[1], "read")
            return self._native.read_ptr(fs, offset, span[0], n, buffer)
        return self._native.read(fs, offset, buffer, _nbytes(nbytes))

    def write(self, fs: FileSet, offset: int, buffer: Any, nbytes: Size | None = None) -> Request:
        """Starts writing ``nbytes`` (default: the buffer's size) of ``buffer`` at logical ``offset``."""
        span = _tensor_span(buffer)
        if span is not None:
            n = span[1] if nbytes is None else self._check_fit(_nbytes(nbytes), span[1], "write")
            return self._native.write_ptr(fs, offset, span[0], n, buffer)
        return self._native.write(fs, offset, buffer, _nbytes(nbytes))

    def read_ptr(self, fs: FileSet, offset: int, address: int, nbytes: int, keepalive: Any = None) -> Request:
        """Like :meth:`read` into raw memory at ``address``; ``keepalive`` is held until completion."""
        return self._native.read_ptr(fs, offset, address, nbytes, keepalive)

    def write_ptr(
        self, fs: FileSet, offset: int, address: int, nbytes: int, keepalive: Any = None
    ) -> Request:
        """Like :meth:`write` from raw memory at ``address``; ``keepalive`` is held until completion."""
        return self._native.write_ptr(fs, offset, address, nbytes, keepalive)

    def submit(self, ops: Iterable[tuple[str, FileSet, int, Any, Any]]) -> list[Request]:
        """Starts a batch of ``(op, fileset, offset, buffer, nbytes)`` at once ("read" or "write").

        ``nbytes`` may be None (the whole buffer). Buffers may be tensors. Nothing is started when
        any op is invalid (ConfigError).

        Example::

            >>> import tempfile, os
            >>> d = tempfile.mkdtemp(prefix="tierrt-doc-")
            >>> with IOEngine() as eng:
            ...     fs = eng.open(os.path.join(d, "x"), "1MiB")
            ...     reqs = eng.submit([("write", fs, 0, b"ab", None), ("write", fs, 4096, b"cd", 2)])
            ...     [r.wait() for r in reqs]
            ...     fs.close(remove=True)
            [2, 2]
            >>> os.rmdir(d)
        """
        native_ops: list[tuple[Any, ...]] = []
        for op in ops:
            if len(op) != 5:
                raise ConfigError(
                    f"IOEngine.submit: expected (op, fileset, offset, buffer, nbytes), got {op!r}"
                )
            kind, fs, offset, buffer, nbytes = op
            span = _tensor_span(buffer)
            if span is not None:
                n = span[1] if nbytes is None else self._check_fit(_nbytes(nbytes), span[1], kind)
                native_ops.append((kind, fs, offset, span[0], n, buffer))
            else:
                native_ops.append((kind, fs, offset, buffer, _nbytes(nbytes)))
        return self._native.submit(native_ops)

    def sync(self, fs: FileSet) -> Request:
        """Starts an ``fdatasync`` of every file of ``fs``. It covers the writes that completed before
        it was started; wait for the writes first."""
        return self._native.sync(fs)

    def register_buffers(self, buffers: Iterable[Any]) -> int:
        """Registers memory (the host arena) with io_uring as fixed buffers, replacing earlier ones.

        Chunks whose memory lies inside a registered region then skip the kernel's per-transfer page
        pinning (READ_FIXED / WRITE_FIXED). Each item is a buffer-protocol object, a CPU tensor, or
        ``(address, nbytes)``; they are kept alive until replaced, :meth:`unregister_buffers` or
        :meth:`close`. Returns the ring buffers used (regions are split into pieces of at most 1GiB);
        0 on the thread backend, where this does nothing.
        """
        items: list[Any] = []
        keep: list[Any] = []
        for buf in buffers:
            span = _tensor_span(buf)
            if span is not None:
                items.append(span)
                keep.append(buf)
            else:
                items.append(buf)
        n = self._native.register_buffers(items)
        self._registered = keep
        return n

    def unregister_buffers(self) -> None:
        """Drops the fixed-buffer registration (waits for chunks in flight)."""
        self._native.unregister_buffers()
        self._registered = []

    # -- observation and testing --------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters: backend, queue_depth, block_size, bytes_read, bytes_written, reads, writes,
        syncs (requests submitted), chunks, errors (failed requests), busy_seconds (wall time with
        at least one chunk in flight), inflight, pending, direct_files, buffered_files,
        direct_chunks, buffered_chunks, fixed_chunks, ..."""
        return self._native.stats()

    def inject_fault(
        self,
        op: str = "any",
        errno: int = 5,
        path_contains: str = "",
        after: int = 0,
        count: int = 1,
        mode: str = "error",
    ) -> None:
        """Makes chunks fail, for tests of failure handling (a real layer of the engine, not a mock).

        After ``after`` matching chunks ("read", "write", "sync" or "any"; on files whose path
        contains ``path_contains``) have run normally, the next ``count`` (-1: all) fail:
        ``mode="error"`` fails with ``errno`` without touching the file; ``"short"`` transfers half
        of the chunk and reports a short transfer; ``"torn"`` transfers half and then fails with
        ``errno`` (a torn write); ``"stall"`` holds the chunk back until :meth:`clear_faults`
        (it then runs normally) or :meth:`close` (it fails with ECANCELED), like a hung device
        (``FileSet.close()`` waits for it like for any request in flight).

        Example::

            >>> import errno, tempfile, os
            >>> d = tempfile.mkdtemp(prefix="tierrt-doc-")
            >>> with IOEngine() as eng:
            ...     fs = eng.open(os.path.join(d, "x"), "1MiB")
            ...     eng.inject_fault(op="write", errno=errno.EIO)
            ...     try:
            ...         eng.write(fs, 0, b"data").wait()
            ...     except OSError as err:
            ...         print(err.errno, err.offset, err.nbytes, err.op)
            ...     fs.close(remove=True)
            5 0 4 write
            >>> os.rmdir(d)
        """
        self._native.inject_fault(op, errno, path_contains, after, count, mode)

    def clear_faults(self) -> None:
        """Removes every fault rule and releases stalled chunks."""
        self._native.clear_faults()

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Cancels queued chunks (their requests fail with ECANCELED), lets those in flight finish,
        and stops the backend. Idempotent."""
        self._native.close()
        self._registered = []

    def __enter__(self) -> IOEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._native)

    @staticmethod
    def _check_fit(n: int | None, have: int, what: str) -> int:
        assert n is not None
        if n > have:
            raise ConfigError(f"{what} of {n} bytes does not fit the tensor of {have} bytes")
        return n


_default: IOEngine | None = None
_default_lock = threading.Lock()


def default_engine() -> IOEngine:
    """A process-wide engine (backend "auto", queue depth 32, 1MiB blocks), created on first use and
    closed at exit. Use it for occasional I/O (checkpoints, probes); long-running components own
    their engine.

    >>> default_engine() is default_engine()
    True
    """
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = IOEngine(name="default")
            atexit.register(_default.close)
        return _default
