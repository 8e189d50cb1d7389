"""What the runtime did: bytes per link, stalls, prefetch hits, memory per tier, per step and in total.

``rt.report()`` returns a :class:`Report`; ``print(rt.report())`` shows it as a table::

    tierrt step 12 (last step 3.41s, 12 steps 41.0s)
      link            last step     total    GB/s(busy)
      nvme->dram       4.20GiB    50.4GiB      2.31
      dram->nvme       1.05GiB    12.6GiB      2.52
      compute waited on I/O: 0.21s (6.2%)   prefetch hits 44 / misses 0
      tier      budget  reserved    in use      peak
      dram        1GiB      1GiB    812MiB      1GiB
      nvme      9.2GiB    9.2GiB    8.1GiB    8.3GiB

``reserved`` is what the tier holds: a host tier's arena (the budget, or less when the placement
needs less), the NVMe tier's swap files. Once the model is given back the tiers are closed: they
hold nothing (``reserved`` and ``in use`` are 0; ``budget`` and ``peak`` stay), except a host arena
whose memory tensors kept from inside the context still view.

"compute waited on I/O" counts only waits while the model was in use (from its first forward or
parameter access inside the context until leaving began), a fraction of the steps' wall time.
Waits while the model was placed (entering, placing it again) and while it was given back are no
step's stall: they are shown on a line of their own (``placing_wait_seconds``,
``leaving_wait_seconds``).

``rt.trace("run.json")`` writes the spans as a Chrome/Perfetto trace (chrome://tracing, ui.perfetto.dev).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

from .atomic import atomic_file
from .sizes import format_size

__all__ = ["Counters", "Report", "write_chrome_trace"]


@dataclass
class Counters:
    """Monotonic counters; a step's figures are the difference of two snapshots."""

    bytes_by_link: Counter = field(default_factory=Counter)
    busy_by_link: Counter = field(default_factory=Counter)  # seconds transfers on a link were running
    bytes_by_kind: Counter = field(default_factory=Counter)  # "grad nvme->dram" -> bytes
    prefetch_hits: int = 0
    prefetch_misses: int = 0
    stall_seconds: float = 0.0  # compute waited on I/O while the model was in use
    stall_events: int = 0
    placing_wait_seconds: float = 0.0  # waits while the model was placed (entering, placing again)
    leaving_wait_seconds: float = 0.0  # waits while the model was given back
    transfers: int = 0
    evictions: int = 0
    optimizer_seconds: float = 0.0
    optimizer_overlap_seconds: float = 0.0
    block_updates: int = 0  # blocks step() updated (in backward, in step() or deferred to the next forward)
    block_updates_in_backward: int = 0  # of them: computed during backward and committed by step()
    steps: int = 0
    wall_seconds: float = 0.0

    def copy(self) -> Counters:
        values = (getattr(self, f.name) for f in fields(self))
        return Counters(*(Counter(v) if isinstance(v, Counter) else v for v in values))

    def minus(self, other: Counters) -> Counters:
        return Counters(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def record_transfer(self, link: str, kind: str, nbytes: int, seconds: float) -> None:
        self.bytes_by_link[link] += nbytes
        self.busy_by_link[link] += seconds
        self.bytes_by_kind[f"{kind} {link}"] += nbytes
        self.transfers += 1

    def as_dict(self) -> dict[str, Any]:
        hits, misses = self.prefetch_hits, self.prefetch_misses
        return {
            "bytes_by_link": dict(self.bytes_by_link),
            "busy_seconds_by_link": dict(self.busy_by_link),
            "bytes_by_kind": dict(self.bytes_by_kind),
            "prefetch_hits": hits,
            "prefetch_misses": misses,
            "prefetch_hit_rate": hits / (hits + misses) if hits + misses else None,
            "stall_seconds": self.stall_seconds,
            "stall_fraction": self.stall_seconds / self.wall_seconds if self.wall_seconds else None,
            "stall_events": self.stall_events,
            "placing_wait_seconds": self.placing_wait_seconds,
            "leaving_wait_seconds": self.leaving_wait_seconds,
            "transfers": self.transfers,
            "evictions": self.evictions,
            "optimizer_seconds": self.optimizer_seconds,
            "optimizer_overlap_seconds": self.optimizer_overlap_seconds,
            "block_updates": self.block_updates,
            "block_updates_in_backward": self.block_updates_in_backward,
            "steps": self.steps,
            "wall_seconds": self.wall_seconds,
        }


@dataclass
class Report:
    """A snapshot: the last completed step, the totals, and memory per tier."""

    step: Counters
    total: Counters
    tiers: dict[str, dict[str, Any]]
    native_overhead: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tiers = {name: _held(stats) for name, stats in self.tiers.items()}

    def as_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.step.as_dict(),
            "total": self.total.as_dict(),
            "tiers": self.tiers,
            "overhead": self.native_overhead,
        }

    # Shorthands for the figures people look at most.
    @property
    def stall_fraction(self) -> float:
        total = self.total
        return total.stall_seconds / total.wall_seconds if total.wall_seconds else 0.0

    @property
    def prefetch_hit_rate(self) -> float:
        hits, misses = self.total.prefetch_hits, self.total.prefetch_misses
        return hits / (hits + misses) if hits + misses else 1.0

    def __str__(self) -> str:
        step, total = self.step, self.total
        lines = [
            f"tierrt: {total.steps} steps in {total.wall_seconds:.2f}s"
            + (f" (last step {step.wall_seconds:.2f}s)" if total.steps else "")
        ]
        links = sorted(set(total.bytes_by_link) | set(step.bytes_by_link))
        if links:
            lines.append(f"  {'link':<14}{'last step':>12}{'total':>12}{'GB/s busy':>11}")
            for link in links:
                busy = total.busy_by_link.get(link, 0.0)
                rate = total.bytes_by_link[link] / busy / 1e9 if busy > 0 else 0.0
                lines.append(
                    f"  {link:<14}{format_size(step.bytes_by_link.get(link, 0)):>12}"
                    f"{format_size(total.bytes_by_link.get(link, 0)):>12}{rate:>11.2f}"
                )
        else:
            lines.append("  no data moved between tiers")
        for label, counters in (("last step", step), ("total", total)):
            wall = counters.wall_seconds
            # A fraction of the steps' wall time (stalls while the model was first placed come
            # before any step and have no such fraction).
            frac = f" ({100 * counters.stall_seconds / wall:.1f}%)" if wall > 0 and counters.steps else ""
            hits, misses = counters.prefetch_hits, counters.prefetch_misses
            lines.append(
                f"  {label}: compute waited on I/O {counters.stall_seconds:.3f}s{frac}; "
                f"prefetch hits {hits}, misses {misses}; evictions {counters.evictions}"
            )
            if counters.optimizer_seconds:
                lines.append(
                    f"    optimizer {counters.optimizer_seconds:.3f}s, "
                    f"{counters.optimizer_overlap_seconds:.3f}s of it overlapped backward; "
                    f"{counters.block_updates_in_backward} of {counters.block_updates} block updates "
                    "ran during backward"
                )
        outside = _outside_steps(total)
        if outside:
            lines.append(f"  outside the steps: {outside}")
        lines.append(f"  {'tier':<8}{'budget':>10}{'reserved':>10}{'in use':>10}{'peak':>10}")
        for name, stats in self.tiers.items():
            lines.append(
                f"  {name:<8}{format_size(stats.get('budget', 0)):>10}"
                f"{format_size(stats.get('reserved', stats.get('budget', 0))):>10}"
                f"{format_size(stats.get('in_use', 0)):>10}{format_size(stats.get('peak_in_use', 0)):>10}"
            )
        if self.native_overhead:
            extra = ", ".join(f"{k} {format_size(v)}" for k, v in self.native_overhead.items())
            lines.append(f"  memory: {extra}")
        return "\n".join(lines)


def _outside_steps(counters: Counters) -> str:
    """The waits for I/O that are no step's stall, in words ("" when there were none)."""
    parts = []
    if counters.placing_wait_seconds:
        parts.append(f"placing the model waited on I/O {counters.placing_wait_seconds:.3f}s")
    if counters.leaving_wait_seconds:
        parts.append(f"giving it back {counters.leaving_wait_seconds:.3f}s")
    return "; ".join(parts)


def _held(stats: dict[str, Any]) -> dict[str, Any]:
    """A tier's figures with ``reserved`` at most what is in use or free there: a closed tier (the
    model given back) reports neither, so it reserves nothing."""
    reserved, in_use, free = (stats.get(key) for key in ("reserved", "in_use", "free"))
    if not all(isinstance(value, int) for value in (reserved, in_use, free)):
        return stats
    return {**stats, "reserved": min(reserved, in_use + free)}


def write_chrome_trace(path: str | os.PathLike, spans: list[Any], origin: float | None = None) -> str:
    """Write ``spans`` (objects with name, category, lane, start, end, nbytes) as a Chrome trace.

    Each lane (e.g. "compute", "nvme->dram") becomes a row; times are microseconds from ``origin``.
    Atomic (temporary file, rename); a path that cannot be written raises :class:`TierPathError`.
    """
    path = os.fspath(path)
    if origin is None:
        origin = min((s.start for s in spans), default=time.perf_counter())
    lanes: dict[str, int] = {}
    events: list[dict[str, Any]] = []
    for span in spans:
        tid = lanes.setdefault(span.lane, len(lanes) + 1)
        event = {
            "name": span.name,
            "cat": span.category,
            "ph": "X",
            "pid": 1,
            "tid": tid,
            "ts": (span.start - origin) * 1e6,
            "dur": max(span.end - span.start, 0.0) * 1e6,
        }
        if span.nbytes:
            event["args"] = {"bytes": span.nbytes, "size": format_size(span.nbytes)}
        events.append(event)
    for lane, tid in lanes.items():
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": lane}})
    events.append({"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "tierrt"}})
    with atomic_file(path, "trace") as handle:
        handle.write(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}).encode())
    return path
