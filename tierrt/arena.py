"""Host arenas: one reserved, NUMA-placed, pinned region of host memory per tier.

A :class:`HostArena` maps its whole budget once, binds it to NUMA node(s), advises transparent huge
pages, faults every page in (in parallel) and locks it, so the budget is really reserved and later use
never faults. Allocations are exact sizes rounded up to the alignment (4096 by default), placed best
fit with immediate coalescing; the arena never grows, and a request that does not fit raises
:class:`~tierrt.errors.TierCapacityError` naming the tier, the request, the free bytes and the largest
free extent.

Allocations are :class:`ArenaBuffer` objects that export the buffer protocol: ``torch.frombuffer`` and
``numpy.frombuffer`` alias them without a copy, and the range returns to the arena only when the last
reference to the buffer is gone (tensors and arrays viewing it hold one), so memory is never reused
while something still views it.

Example::

    >>> import torch
    >>> from tierrt.arena import HostArena
    >>> arena = HostArena("64MiB", name="dram")
    >>> w = arena.tensor(1024, 1024, dtype=torch.float32)   # a tensor living in the arena
    >>> w.fill_(1.0).sum().item()
    1048576.0
    >>> arena.stats()["in_use"]
    4194304
    >>> del w                                                # its range returns to the arena
"""

from __future__ import annotations

import glob
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import _native
from .errors import ConfigError
from .sizes import Size, format_size, parse_size

if TYPE_CHECKING:
    import torch

__all__ = [
    "HostArena",
    "ArenaBuffer",
    "Allocator",
    "plan_static",
    "numa_nodes",
    "as_tensor",
]

log = logging.getLogger("tierrt.arena")

#: A range of a host arena (buffer protocol, ``.address``, ``.offset``, ``.nbytes``, ``.arena_name``).
ArenaBuffer = _native.ArenaBuffer
#: The best-fit offset allocator (used by arenas and for extents of NVMe swap files).
Allocator = _native.Allocator
#: Static offset planner for buffers with known lifetimes:
#: ``plan_static(sizes, first_use, last_use, alignment=4096) -> (offsets, peak)``.
plan_static = _native.plan_static

_POLICIES = ("default", "bind", "interleave", "preferred", "weighted")


def numa_nodes() -> list[int]:
    """NUMA nodes with memory that this process may allocate on.

    >>> 0 in numa_nodes()
    True
    """
    return list(_native.numa_nodes())


def as_tensor(buf: Any, dtype: torch.dtype | None = None, shape: Sequence[int] | None = None) -> torch.Tensor:
    """A torch tensor viewing ``buf`` (an :class:`ArenaBuffer` or any writable buffer) without a copy.

    ``dtype`` defaults to ``torch.uint8``; ``shape`` defaults to 1-D over as many elements as fit.
    The tensor keeps ``buf`` alive, so the arena range stays reserved while the tensor exists.

    >>> import torch
    >>> arena = HostArena("4MiB", lock=False)
    >>> t = as_tensor(arena.alloc(4096), torch.float32, (32, 32))
    >>> t.shape
    torch.Size([32, 32])
    """
    import torch

    dtype = torch.uint8 if dtype is None else dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = len(memoryview(buf))
    if shape is None:
        count = nbytes // itemsize
        shape = (count,)
    else:
        shape = tuple(int(d) for d in shape)
        count = math.prod(shape)
    if count * itemsize > nbytes:
        raise ConfigError(
            f"as_tensor: shape {tuple(shape)} of {dtype} needs {count * itemsize} bytes, "
            f"the buffer has {nbytes}"
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)


def _loaded_cudart() -> str:
    """Path of the CUDA runtime library torch uses: one mapped in this process (preferring a copy
    shipped in a Python package, as torch's is), else one in an ``nvidia-*`` wheel, else "" (the
    native side then tries the usual sonames)."""
    mapped: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[-1]).startswith("libcudart.so"):
                    mapped.append(fields[-1])
    except OSError:
        pass
    if mapped:
        return sorted(mapped, key=lambda path: "-packages" not in path)[0]
    for root in sys.path:
        for pattern in ("nvidia/cuda_runtime/lib/libcudart.so*", "nvidia/cu*/lib/libcudart.so*"):
            found = sorted(glob.glob(os.path.join(root, pattern)))
            if found:
                return found[-1]
    return ""


class HostArena:
    """One reserved region of host memory for a tier, with an exact-size allocator over it.

    Args:
        nbytes: the budget, as bytes or a string such as ``"64GiB"``. The arena never grows.
        nodes: NUMA nodes to place the memory on (``None``: no placement, the kernel's default).
        policy: ``"bind"`` (the default when ``nodes`` is given), ``"interleave"``, ``"preferred"``,
            ``"weighted"`` (contiguous ranges bound to each node in proportion to ``weights``, e.g.
            ``nodes=[0, 2], weights=[0.7, 0.3]`` puts 70% on node 0 and 30% on CXL node 2), or
            ``"default"`` (no nodes).
        weights: one positive weight per node, for ``"weighted"`` only.
        hugepages: advise transparent huge pages (``MADV_HUGEPAGE``).
        lock: ``mlock`` the region. When the kernel refuses (``RLIMIT_MEMLOCK``), the arena still
            works: ``locked`` is False, ``lock_error`` says why, and one warning is logged.
        populate: fault every page in at creation (in parallel), so the budget is really reserved.
        alignment: allocation granularity, a power of two up to 2MiB.
        name: the tier's name, used in errors and statistics.

    Raises:
        ConfigError: bad size, policy, weights, or nodes that do not exist / are not allowed.
        TierCapacityError: the memory cannot be mapped or populated, or is not available.

    Example::

        >>> import numpy
        >>> arena = HostArena("16MiB", nodes=[0], policy="bind", name="dram")
        >>> buf = arena.alloc(10_000)                      # 12KiB reserved (rounded to 4KiB)
        >>> arr = numpy.frombuffer(buf, dtype=numpy.uint8) # zero copy
        >>> arena.page_nodes(buf.offset, buf.nbytes)       # where the pages really are
        [0, 0, 0]
    """

    def __init__(
        self,
        nbytes: Size,
        *,
        nodes: Sequence[int] | None = None,
        policy: str | None = None,
        weights: Sequence[float] | None = None,
        hugepages: bool = True,
        lock: bool = True,
        populate: bool = True,
        alignment: Size = 4096,
        name: str = "dram",
    ) -> None:
        size = parse_size(nbytes, what=f"tier '{name}' arena size")
        align = parse_size(alignment, what=f"tier '{name}' alignment")
        if nodes is not None:
            nodes = [int(n) for n in nodes]
        if policy is None:
            policy = "bind" if nodes else "default"
        if policy not in _POLICIES:
            raise ConfigError(
                f"tier '{name}': unknown NUMA policy {policy!r} (use one of {', '.join(_POLICIES)})"
            )
        self._native = _native.HostArena(
            size,
            nodes=nodes,
            policy=policy,
            weights=None if weights is None else [float(w) for w in weights],
            hugepages=hugepages,
            lock=lock,
            populate=populate,
            alignment=align,
            name=name,
        )
        if lock and not self._native.locked:
            log.warning("tier '%s': host arena not locked in memory: %s", name, self._native.lock_error)

    # --- allocation ---------------------------------------------------------------------------

    def alloc(self, nbytes: Size) -> ArenaBuffer:
        """A new :class:`ArenaBuffer` of ``nbytes``; it returns to the arena when no longer referenced.

        Raises :class:`~tierrt.errors.TierCapacityError` when it does not fit.
        """
        return self._native.alloc(nbytes if isinstance(nbytes, int) else parse_size(nbytes))

    def try_alloc(self, nbytes: Size) -> ArenaBuffer | None:
        """Like :meth:`alloc`, but returns ``None`` when the request does not fit."""
        return self._native.try_alloc(nbytes if isinstance(nbytes, int) else parse_size(nbytes))

    def buffer_at(self, offset: int, nbytes: int) -> ArenaBuffer:
        """A non-owning view of ``[offset, offset + nbytes)``, for layouts planned with
        :func:`plan_static`. It keeps the arena alive and is bounds-checked.

        >>> offsets, peak = plan_static([4096, 8192], [0, 1], [0, 1])
        >>> arena = HostArena(peak, lock=False)
        >>> arena.buffer_at(offsets[1], 8192).nbytes
        8192
        """
        return self._native.buffer_at(offset, nbytes)

    def tensor(self, *shape: int | Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new tensor of ``shape`` and ``dtype`` (default ``torch.uint8``) living in the arena.

        ``arena.tensor(4096)`` is 4096 bytes; ``arena.tensor(1024, 1024, dtype=torch.bfloat16)`` or
        ``arena.tensor((1024, 1024), dtype=torch.bfloat16)`` is a 2MiB matrix. Its memory returns to
        the arena when the tensor (and every view of it) is gone.
        """
        import torch

        dims: tuple[int, ...]
        if len(shape) == 1 and not isinstance(shape[0], int):
            dims = tuple(int(d) for d in shape[0])  # type: ignore[union-attr]
        else:
            dims = tuple(int(d) for d in shape)  # type: ignore[arg-type]
        dtype = torch.uint8 if dtype is None else dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(dims) * itemsize
        if nbytes == 0:
            return torch.empty(dims, dtype=dtype)
        return as_tensor(self._native.alloc(nbytes), dtype, dims)

    as_tensor = staticmethod(as_tensor)

    # --- CUDA ---------------------------------------------------------------------------------

    def register_cuda(self) -> bool:
        """Register the whole arena with CUDA as pinned memory, once. Returns True when registered
        (now or before), False when no CUDA device is available (a no-op then).

        The CUDA runtime torch loaded is used (found at run time); the registration is undone by
        :meth:`unregister_cuda`, and at the latest before the memory is unmapped.
        """
        if self._native.cuda_registered:
            return True
        try:
            import torch
        except ImportError:
            return False
        if not torch.cuda.is_available():
            return False
        torch.cuda.init()
        self._native.cuda_register(_loaded_cudart())
        log.info("tier %r: registered %s with CUDA as pinned memory", self.name, format_size(self.nbytes))
        return True

    def unregister_cuda(self) -> bool:
        """Undo :meth:`register_cuda`; returns False when the arena was not registered."""
        return bool(self._native.cuda_unregister())

    @property
    def cuda_registered(self) -> bool:
        return bool(self._native.cuda_registered)

    # --- facts --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Allocator statistics (capacity, in_use, peak_in_use, high_water, free, largest_free,
        free_extents, fragmentation, allocations, total_allocs, total_frees) plus reserved, locked,
        hugepages, policy, nodes, name, cuda_registered."""
        stats = dict(self._native.stats())
        stats["cuda_registered"] = self.cuda_registered
        return stats

    def reset_peak(self) -> None:
        """Restart ``peak_in_use`` and ``high_water`` from the current use."""
        self._native.reset_peak()

    def page_nodes(self, offset: int = 0, nbytes: int | None = None, max_pages: int = 64) -> list[int]:
        """NUMA node of up to ``max_pages`` pages sampled evenly over the range, as the kernel
        reports it (``move_pages(2)``); a negative entry is ``-errno`` for that page."""
        return list(self._native.page_nodes(offset, nbytes, max_pages))

    def policy_at(self, offset: int = 0) -> tuple[str, list[int]]:
        """The kernel's memory policy at ``offset``: ``(mode, nodes)`` from ``get_mempolicy(2)``."""
        mode, nodes = self._native.policy_at(offset)
        return str(mode), list(nodes)

    def hugepage_bytes(self) -> int:
        """Bytes of the arena backed by transparent huge pages (reads /proc/self/smaps: a few ms)."""
        return int(self._native.hugepage_bytes())

    @property
    def native(self) -> _native.HostArena:
        """The native arena (for the I/O engine and other native components)."""
        return self._native

    @property
    def address(self) -> int:
        return int(self._native.address)

    @property
    def nbytes(self) -> int:
        return int(self._native.nbytes)

    @property
    def name(self) -> str:
        return str(self._native.name)

    @property
    def alignment(self) -> int:
        return int(self._native.alignment)

    @property
    def locked(self) -> bool:
        return bool(self._native.locked)

    @property
    def lock_error(self) -> str:
        return str(self._native.lock_error)

    @property
    def hugepages(self) -> bool:
        return bool(self._native.hugepages)

    @property
    def policy(self) -> str:
        return str(self._native.policy)

    @property
    def nodes(self) -> list[int]:
        return list(self._native.nodes)

    @property
    def node_ranges(self) -> list[tuple[int, int, int]]:
        """``(offset, nbytes, node)`` of each range bound with mbind (node -1: bound to several)."""
        return [tuple(r) for r in self._native.node_ranges]

    @property
    def create_seconds(self) -> float:
        """Wall time the creation took (map, bind, populate, lock)."""
        return float(self._native.create_seconds)

    def __repr__(self) -> str:
        stats = self._native.stats()
        return (
            f"HostArena({self.name!r}, in_use={stats['in_use']}, reserved={self.nbytes}, "
            f"policy={self.policy!r}, nodes={self.nodes}, locked={self.locked}, hugepages={self.hugepages})"
        )
