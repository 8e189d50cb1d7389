"""Files written whole or not at all: a temporary name in the same directory, fsync, rename.

>>> import os, tempfile
>>> d = tempfile.mkdtemp()
>>> with atomic_file(os.path.join(d, "out.json"), "trace") as handle:
...     _ = handle.write(b"{}")
>>> os.listdir(d)
['out.json']
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import secrets
from collections.abc import Iterator
from typing import BinaryIO

from .errors import TierPathError, TierrtError

__all__ = ["atomic_file"]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, what: str) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path`` for binary writing; when the block ends without an
    error, fsync it and rename it to ``path``. On any error the temporary file is removed and
    ``path`` is left as it was. An OS error (missing directory, read-only filesystem, ``path`` a
    directory, a full disk) becomes :class:`TierPathError` naming ``what``, the path and the errno;
    other errors, tierrt's own included, pass through unchanged."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise _path_error(what, path, _errno.EISDIR)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise _path_error(what, path, exc.errno or 0) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except TierrtError:  # an error of the data being written (an I/O error reading a tier)
        _remove(tmp)
        raise
    except OSError as exc:
        _remove(tmp)
        raise _path_error(what, path, exc.errno or 0) from exc
    except BaseException:
        _remove(tmp)
        raise


def _path_error(what: str, path: str, code: int) -> TierPathError:
    directory = os.path.dirname(os.path.abspath(path))
    hints = {
        _errno.ENOENT: f"the directory {directory} does not exist"
        if not os.path.isdir(directory)
        else f"no file can be created in {directory}",
        _errno.EISDIR: "it is a directory: give a file name",
        _errno.EACCES: "the directory is not writable",
        _errno.EPERM: "the directory is not writable",
        _errno.EROFS: "the filesystem is read-only",
        _errno.ENOSPC: "the disk is full",
    }
    reason = os.strerror(code) if code else "unknown error"
    hint = hints.get(code)
    message = f"{what}: cannot write {path}: {reason} (errno {code})" + (f"; {hint}" if hint else "")
    return TierPathError(message, path=path, errno=code)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
