"""The execution order of blocks, learned as the model runs.

Every acquisition of a block is an event ``(phase, block)`` with phase "fwd" (forward, including
recomputation under activation checkpointing) or "bwd" (backward). The trace remembers, for every
event, the event that followed it the last time; the prefetcher walks that chain to see which blocks
come next. A forward that visits blocks in a data-dependent order simply rewrites the links it
changes: a wrong guess costs a synchronous fetch (counted as a miss), never a wrong result.
"""

from __future__ import annotations

__all__ = ["Event", "SuccessorTrace"]

Event = tuple[str, int]


class SuccessorTrace:
    """Successor map over acquisition events."""

    def __init__(self) -> None:
        self._next: dict[Event, Event] = {}
        self.last: Event | None = None
        self.events = 0
        self.changed_links = 0

    def observe(self, event: Event) -> None:
        """Record that ``event`` happened now (after ``self.last``)."""
        if self.last is not None and self.last != event:
            previous = self._next.get(self.last)
            if previous != event:
                if previous is not None:
                    self.changed_links += 1
                self._next[self.last] = event
        self.last = event
        self.events += 1

    def predict(self, start: Event, count: int) -> list[Event]:
        """Up to ``count`` events expected after ``start`` (following the chain, no repeats)."""
        out: list[Event] = []
        seen = {start}
        event = start
        while len(out) < count:
            nxt = self._next.get(event)
            if nxt is None or nxt in seen:
                break
            out.append(nxt)
            seen.add(nxt)
            event = nxt
        return out

    def __len__(self) -> int:
        return len(self._next)
