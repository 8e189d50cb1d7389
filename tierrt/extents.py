"""Extents of an NVMe tier, recycled by size: copy-on-write churn without fragmentation.

Every extent tierrt allocates on an NVMe tier holds one kind of state of one block, so the same few
sizes are requested over and over: each optimizer step writes a block's new copy to a fresh extent
while the previous one is kept until the step commits (and an update run during backward holds a
third). A best-fit allocator that merges freed ranges fragments under that churn: a freed 250 MiB
embedding extent is given to a 168 MiB layer and leaves an 82 MiB hole that no kind fits, until the
tier has gigabytes free and no room for one block.

:class:`ExtentPool` keeps freed extents in free lists by size and gives them out again for that
size. Only when none is free does it carve a new extent from the native allocator, which therefore
never sees a free and never fragments. When neither works, a larger free extent is lent (its tail
unused until it returns to its own size's list).
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

from . import _native
from .errors import ConfigError, TierCapacityError
from .sizes import format_size

__all__ = ["ExtentPool"]


class ExtentPool:
    """Offsets of extents in ``[0, capacity)``, aligned to ``alignment``.

    Example::

        pool = ExtentPool(64 << 30, 4096, "nvme")
        a = pool.alloc(168 << 20)
        pool.free(a)
        assert pool.alloc(168 << 20) == a  # the same extent again: no new hole
    """

    def __init__(self, capacity: int, alignment: int = 4096, name: str = "nvme") -> None:
        self.name = name
        self.capacity = int(capacity)
        self.alignment = int(alignment)
        self._carver = _native.Allocator(self.capacity, self.alignment, name)
        self._lock = threading.Lock()
        self._free: dict[int, list[int]] = {}  # extent size -> free offsets of that size
        self._sizes: list[int] = []  # sorted sizes with a non-empty free list
        self._live: dict[int, int] = {}  # offset -> size of the extent handed out there
        self._in_use = 0
        self._peak = 0
        self._recycled = 0  # bytes in the free lists

    def _round(self, nbytes: int) -> int:
        if nbytes <= 0:
            raise ConfigError(f"{self.name}: an extent needs a positive size, got {nbytes}")
        return -(-int(nbytes) // self.alignment) * self.alignment

    def _take(self, size: int) -> int:
        offsets = self._free[size]
        offset = offsets.pop()
        if not offsets:
            del self._free[size]
            self._sizes.remove(size)
        self._recycled -= size
        return offset

    def try_alloc(self, nbytes: int) -> int | None:
        """The offset of an extent of at least ``nbytes``, or None when none is free."""
        want = self._round(nbytes)
        with self._lock:
            size = want
            if want in self._free:
                offset = self._take(want)
            else:
                carved = self._carver.try_alloc(want)
                if carved is not None:
                    offset = int(carved)
                else:  # lend the smallest larger free extent
                    at = bisect.bisect_left(self._sizes, want)
                    if at == len(self._sizes):
                        return None
                    size = self._sizes[at]
                    offset = self._take(size)
            self._live[offset] = size
            self._in_use += size
            self._peak = max(self._peak, self._in_use)
            return offset

    def alloc(self, nbytes: int) -> int:
        """Like :meth:`try_alloc`, but raises :class:`TierCapacityError` when nothing is free."""
        offset = self.try_alloc(nbytes)
        if offset is None:
            stats = self.stats()
            raise TierCapacityError(
                f"{self.name}: no room for a {format_size(nbytes)} extent ({format_size(stats['free'])} "
                f"free, largest extent {format_size(stats['largest_free'])}, "
                f"tier {format_size(self.capacity)})",
                tier=self.name,
                requested=int(nbytes),
                free=stats["free"],
                largest_free=stats["largest_free"],
                budget=self.capacity,
            )
        return offset

    def free(self, offset: int) -> None:
        """Give the extent at ``offset`` back (to the free list of its size)."""
        with self._lock:
            size = self._live.pop(int(offset), None)
            if size is None:
                raise ConfigError(
                    f"{self.name}: free of offset {offset}, where no extent was handed out (double free, "
                    "or an offset this pool did not give)"
                )
            self._in_use -= size
            self._recycled += size
            if size not in self._free:
                self._free[size] = []
                bisect.insort(self._sizes, size)
            self._free[size].append(int(offset))

    def stats(self) -> dict[str, Any]:
        """Bytes in use, free (carvable plus recycled), the largest extent that would be given."""
        with self._lock:
            carver = dict(self._carver.stats())
            largest = max(int(carver["largest_free"]), self._sizes[-1] if self._sizes else 0)
            return {
                "capacity": self.capacity,
                "alignment": self.alignment,
                "in_use": self._in_use,
                "peak_in_use": self._peak,
                "free": self.capacity - self._in_use,
                "largest_free": largest,
                "recycled": self._recycled,
                "carved": int(carver["in_use"]),
                "allocations": len(self._live),
            }
