"""tierrt's error classes.

Every error tierrt raises on purpose is a :class:`TierrtError`. Each subclass also derives from the
built-in exception a user would already catch for that kind of failure (``ValueError`` for bad
configuration, ``MemoryError`` for a budget that does not fit, ``OSError`` for I/O), and carries the
facts needed to act on it as attributes (``path``, ``offset``, ``nbytes``, ``errno``, ``tier``,
``requested``, ``free``, ``largest_free``, ...). The native layer raises these same classes.

Example::

    try:
        arena.alloc(10 << 30)
    except tierrt.TierCapacityError as err:
        print(err.tier, err.requested, err.largest_free)
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

__all__ = [
    "TierrtError",
    "ConfigError",
    "ConfigTypeError",
    "HyperparameterError",
    "TierCapacityError",
    "TierPathError",
    "IOEngineError",
    "CorruptStoreError",
    "HookError",
]


class TierrtError(Exception):
    """Base class of every error tierrt raises.

    Keyword arguments become attributes, so ``err.path`` or ``err.tier`` can be read directly;
    ``err.details`` holds all of them.
    """

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details)
        for key, value in details.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # keep details across pickling (multiprocessing, pytest-xdist)
        return (_rebuild, (type(self), self.message, self.details))


def _rebuild(cls: type, message: str, details: dict[str, Any]) -> TierrtError:
    return cls(message, **details)


def restated(error: BaseException, message: str) -> BaseException:
    """``error`` told again with ``message`` (what the failure meant: "the step was rolled back"):
    the same class and details (errno, path, tier, ...), or ``error`` itself when its class takes
    no such arguments."""
    details = dict(getattr(error, "details", {}) or {})
    try:
        return type(error)(message, **details)
    except TypeError:
        return error


class ConfigError(TierrtError, ValueError):
    """Bad configuration or argument: a malformed size, tiers in the wrong order, an unknown option."""


class ConfigTypeError(ConfigError, TypeError):
    """An argument of the wrong type (``nvme(None)``, ``dram(node=1.5)``): a :class:`ConfigError`
    that ``except TypeError`` also catches, as it would catch Python's own error for it."""


class HyperparameterError(ConfigTypeError):
    """A param group's hyperparameter that the optimizer's arithmetic cannot use (``lr=None``,
    ``lr="0.01"``, ``betas`` that are not two numbers, ``amsgrad=True`` turned on after entering).
    Raised by ``optimizer.step()`` before anything changes. It is a ``TypeError`` (what torch's own
    step raises for such values) and a ``ValueError``. Attributes: ``group`` (index), ``key``."""


def listed(names: list[str], most: int) -> str:
    """``names`` for a message: the first ``most`` of them, then how many more there are."""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def noted(error: BaseException, note: str) -> BaseException:
    """``error`` itself, with ``note`` added (shown under its message in tracebacks): what the
    failure meant for tierrt's state, keeping the original exception's class and arguments."""
    error.add_note(note)
    return error


class TierCapacityError(TierrtError, MemoryError):
    """A request does not fit in a tier's budget.

    Attributes (when known): ``tier`` (name), ``requested``, ``free``, ``largest_free``, ``budget``
    (bytes).
    """


class HookError(TierrtError, RuntimeError):
    """A model (or a use of it) that tierrt's hooks cannot handle: no parameters, entering twice,
    a parameter shared with another offloaded model, a parameter used where it is not resident, a
    parameter frozen on entry that requires grad inside the context (attribute ``parameters``)."""


class CorruptStoreError(TierrtError, RuntimeError):
    """Stored data failed its integrity check (checksum, manifest, size)."""


class _OSErrorBase(TierrtError, OSError):
    """Shared constructor for the OSError-derived errors: ``errno`` may be passed by keyword."""

    def __init__(self, message: str = "", **details: Any) -> None:
        TierrtError.__init__(self, message, **details)
        code = details.get("errno")
        # OSError's own attributes, so `except OSError as e: e.errno` works as usual.
        self.errno = code
        self.strerror = os.strerror(code) if isinstance(code, int) and code > 0 else None
        self.filename = details.get("path")

    def __str__(self) -> str:
        return self.message


class TierPathError(_OSErrorBase):
    """A tier's path is unusable: missing, not a directory, not writable, or on an unsuitable
    filesystem. Attributes: ``path``, ``errno`` when the OS reported one."""


class IOEngineError(_OSErrorBase):
    """A read or write failed or was short.

    Attributes: ``path``, ``offset``, ``nbytes``, ``errno`` (``None`` for a short transfer without an
    OS error), ``op`` ("read" or "write").
    """

    @property
    def is_no_space(self) -> bool:
        """True when the device ran out of space (ENOSPC or EDQUOT)."""
        return self.errno in (_errno.ENOSPC, _errno.EDQUOT)
