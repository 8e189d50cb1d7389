"""Holding Ctrl-C (SIGINT) over the steps that must not stop half way.

Entering a context swaps every parameter for its block's memory and installs hooks; leaving gives
every parameter its value back. A ``KeyboardInterrupt`` in the middle of either left a model that
was neither offloaded nor whole: some parameters viewing blocks that were being freed, hooks of a
runtime nobody could close. :class:`HeldInterrupts` keeps a SIGINT that arrives meanwhile and
delivers it to the handler that was there as soon as the step is done.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

__all__ = ["HeldInterrupts"]


class HeldInterrupts:
    """``with HeldInterrupts("giving the model back"):`` -- a SIGINT received inside is held and
    raised (through the previous handler, so ``KeyboardInterrupt`` by default) when the block ends.

    Only the main thread receives signals, so elsewhere (or where the handler is not a Python one)
    this does nothing. Nesting is fine: the inner hold passes what it held to the outer one."""

    def __init__(self, doing: str) -> None:
        self.doing = doing
        self._previous: Any = None
        self._held = False
        self._installed = False

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        if not self._held:
            sys.stderr.write(f"tierrt: interrupt received while {self.doing}; raised once that is done\n")
        self._held = True

    def __enter__(self) -> HeldInterrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGINT)
        if previous is None:  # a handler installed from C: not ours to replace
            return self
        try:
            signal.signal(signal.SIGINT, self._hold)
        except ValueError:  # not the main interpreter
            return self
        self._previous, self._installed = previous, True
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._installed:
            return
        signal.signal(signal.SIGINT, self._previous)
        self._installed = False
        if self._held:
            self._held = False
            signal.raise_signal(signal.SIGINT)  # runs the previous handler now (raises, by default)
