"""Checks of :func:`tierrt.offload`'s options, all made when it is called, before anything moves.

A value of the wrong type raises :class:`~tierrt.ConfigTypeError` (also a ``TypeError``), a value of
the right type outside what is accepted raises :class:`~tierrt.ConfigError` (also a ``ValueError``);
each message names the option, what it got and what is accepted::

    >>> check_flag("restore", "no", optional=True)
    Traceback (most recent call last):
    ...
    tierrt.errors.ConfigTypeError: offload(restore=...): expected True, False or None, got 'no'

Options are checked whether or not they end up used (``io_backend=`` and ``queue_depth=`` also
when nothing goes to NVMe), so a script is refused on the machine where it is written, not on the
one where the model first outgrows memory.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ConfigTypeError

__all__ = [
    "IO_BACKENDS",
    "MAX_QUEUE_DEPTH",
    "check_offload_options",
    "check_flag",
    "check_count",
    "check_io_backend",
    "check_blocks",
    "check_path",
]

IO_BACKENDS = ("auto", "io_uring", "threads")
MAX_QUEUE_DEPTH = 4096  # the I/O engine's limit


def _got(value: object) -> str:
    """``value`` for a message: its repr, cut short, with its type when that is not obvious."""
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return text if isinstance(value, (str, int, float, type(None))) else f"{text} ({type(value).__name__})"


def check_flag(name: str, value: object, *, optional: bool = False) -> bool | None:
    """``value`` if it is True or False (or None when ``optional``: "decide for me")."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        accepted = "True, False or None" if optional else "True or False"
        raise ConfigTypeError(f"offload({name}=...): expected {accepted}, got {_got(value)}")
    return value


def check_count(
    name: str, value: object, *, low: int, high: int | None = None, optional: bool = False
) -> int | None:
    """``value`` if it is an int (not a bool) in ``[low, high]`` (or None when ``optional``)."""
    if value is None and optional:
        return None
    bounds = f">= {low}" if high is None else f"from {low} to {high}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy ints are fine
        accepted = f"an int {bounds}" + (" or None" if optional else "")
        raise ConfigTypeError(f"offload({name}=...): expected {accepted}, got {_got(value)}")
    number = int(value)
    if number < low or (high is not None and number > high):
        raise ConfigError(f"offload({name}=...): expected an int {bounds}, got {number}")
    return number


def check_io_backend(value: object) -> str:
    """``value`` if it names an I/O backend this machine has ("auto" always works)."""
    if not isinstance(value, str):
        raise ConfigTypeError(
            f"offload(io_backend=...): expected one of {', '.join(IO_BACKENDS)}, got {_got(value)}"
        )
    if value not in IO_BACKENDS:
        raise ConfigError(f"offload(io_backend=...): expected one of {', '.join(IO_BACKENDS)}, got {value!r}")
    if value == "io_uring":
        from .io import io_uring_status

        available, why = io_uring_status()
        if not available:
            raise ConfigError(
                f"offload(io_backend='io_uring'): io_uring is not available here ({why}); use 'auto' "
                "(io_uring where it works, else threads) or 'threads'"
            )
    return value


def check_path(name: str, value: object, *, optional: bool = False) -> str | None:
    """``value`` as a ``str`` path if it is a ``str`` or ``os.PathLike`` (or None when ``optional``)."""
    if value is None and optional:
        return None
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str) or not path:
        accepted = "a file path (str or os.PathLike)" + (" or None" if optional else "")
        raise ConfigTypeError(f"{name}: expected {accepted}, got {_got(value)}")
    return path


def check_blocks(model: nn.Module, value: object) -> Any:
    """``blocks=`` as the runtime keeps it: None, a predicate ``(name, module) -> bool``, or a list
    of the model's own modules (an iterable given once, e.g. a generator, is read here into a list:
    the runtime reads it again whenever it places the model again)."""
    if value is None:
        return None
    if isinstance(value, nn.Module):
        value = [value]
    elif callable(value):
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigTypeError(
            "offload(blocks=...): expected a list of the model's modules or a predicate "
            f"(name, module) -> bool, got {_got(value)}"
        )
    modules = list(value)
    owned = {id(m) for m in model.modules()}
    for module in modules:
        if not isinstance(module, nn.Module):
            raise ConfigTypeError(
                f"offload(blocks=...): expected modules of the model, got {_got(module)} in the list"
            )
        if id(module) not in owned:
            raise ConfigError(f"offload(blocks=...): {type(module).__name__} is not a submodule of the model")
    return modules


def _check_compute_dtype(value: object) -> None:
    if value is None:
        return
    if not isinstance(value, torch.dtype):
        raise ConfigTypeError(
            f"offload(compute_dtype=...): expected a floating torch.dtype (torch.bfloat16, ...) or None, "
            f"got {_got(value)}"
        )
    if not value.is_floating_point:
        raise ConfigError(f"offload(compute_dtype=...): expected a floating dtype, got {value}")


def check_offload_options(
    model: object,
    *,
    optimizer: object,
    blocks: object,
    prefetch: object,
    compute_dtype: object,
    progress: object,
    io_backend: object,
    queue_depth: object,
    weights: object,
    init: object,
    restore: object,
    native_optimizer: object,
    deferred_step: object,
    overlap_backward: object,
) -> Callable[[str, nn.Module], bool] | list[nn.Module] | None:
    """Check every option of :func:`tierrt.offload` but ``tiers`` (see
    :func:`tierrt.validate_tiers`); returns ``blocks`` as the runtime keeps it (:func:`check_blocks`)."""
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"offload(model): expected a torch.nn.Module, got {_got(model)}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigTypeError(
            f"offload(optimizer=...): expected a torch.optim.Optimizer (or None), got {_got(optimizer)}"
        )
    checked_blocks = check_blocks(model, blocks)
    check_count("prefetch", prefetch, low=0, optional=True)
    _check_compute_dtype(compute_dtype)
    check_io_backend(io_backend)
    check_count("queue_depth", queue_depth, low=1, high=MAX_QUEUE_DEPTH)
    check_path("offload(weights=...)", weights, optional=True)
    for name, value in (("progress", progress), ("restore", restore), ("native_optimizer", native_optimizer)):
        check_flag(name, value, optional=True)
    for name, value in (
        ("init", init),
        ("deferred_step", deferred_step),
        ("overlap_backward", overlap_backward),
    ):
        check_flag(name, value)
    return checked_blocks
