"""Tier specifications: what the user lists in ``tiers=[...]``.

A tier spec only describes a tier (kind, budget, where); the runtime builds the real thing (an arena,
swap files) when a model is offloaded. Tiers are listed fastest first::

    tiers = [tierrt.gpu(0), tierrt.dram("64GiB"), tierrt.cxl("256GiB", node=2),
             tierrt.nvme(["/mnt/nvme0/tierrt", "/mnt/nvme1/tierrt"])]

Without a GPU the compute device is the CPU; the DRAM tier then holds the blocks being computed on::

    tiers = [tierrt.dram("8GiB"), tierrt.nvme("/tmp/tierrt")]
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import ConfigError, ConfigTypeError
from .sizes import Size, format_size, parse_size
from .topology import NumaNode, numa_nodes

log = logging.getLogger("tierrt")

__all__ = [
    "TierSpec",
    "GpuTier",
    "DramTier",
    "CxlTier",
    "NvmeTier",
    "gpu",
    "dram",
    "cxl",
    "nvme",
    "validate_tiers",
    "resolve_cxl",
    "NUMA_POLICIES",
    "MAX_STRIPE",
]

NUMA_POLICIES = ("default", "bind", "interleave", "preferred")

# Position of each kind in the hierarchy, fastest first.
_RANK = {"gpu": 0, "dram": 1, "cxl": 2, "nvme": 3}


@dataclass(frozen=True)
class TierSpec:
    """Base of every tier spec. ``budget`` is in bytes; ``None`` means "choose for me"."""

    kind: str = field(init=False, default="")
    budget: int | None = None

    @property
    def name(self) -> str:
        """Short name used in reports and errors, e.g. "dram", "cxl2", "gpu0", "nvme"."""
        return self.kind

    def describe(self) -> str:
        budget = "auto" if self.budget is None else format_size(self.budget)
        return f"{self.name}({budget})"


@dataclass(frozen=True)
class GpuTier(TierSpec):
    """Device memory of one CUDA GPU: the compute tier when present."""

    kind: str = field(init=False, default="gpu")
    index: int = 0

    @property
    def name(self) -> str:
        return f"gpu{self.index}"


@dataclass(frozen=True)
class DramTier(TierSpec):
    """Host memory, one pinned arena bound to ``node`` (all nodes when None) with ``policy``."""

    kind: str = field(init=False, default="dram")
    node: int | tuple[int, ...] | None = None
    policy: str = "default"

    @property
    def nodes(self) -> tuple[int, ...]:
        if self.node is None:
            return ()
        return (self.node,) if isinstance(self.node, int) else tuple(self.node)


@dataclass(frozen=True)
class CxlTier(TierSpec):
    """CPU-less NUMA node(s) (CXL memory expanders), one arena bound there.

    ``node`` is what the user gave; :func:`resolve_cxl` (run by :func:`validate_tiers`) fills
    ``found`` (the CPU-less nodes picked for ``node=None``) and ``memory`` (what memory the tier
    really is, in words, e.g. "ordinary DRAM: this machine has no CPU-less NUMA node")."""

    kind: str = field(init=False, default="cxl")
    node: int | tuple[int, ...] | None = None
    found: tuple[int, ...] = ()
    memory: str = ""

    @property
    def named_nodes(self) -> tuple[int, ...]:
        """The nodes the user named (none for ``node=None``)."""
        if self.node is None:
            return ()
        return (self.node,) if isinstance(self.node, int) else tuple(self.node)

    @property
    def nodes(self) -> tuple[int, ...]:
        """The nodes the arena is bound to: those named, else those found (none: not bound)."""
        return self.named_nodes or self.found

    @property
    def name(self) -> str:
        return "cxl" + "".join(str(n) for n in self.named_nodes)

    def describe(self) -> str:
        budget = "auto" if self.budget is None else format_size(self.budget)
        return f"{self.name}({budget}" + (f", {self.memory})" if self.memory else ")")


@dataclass(frozen=True)
class NvmeTier(TierSpec):
    """Files on one or more SSDs; data is striped RAID-0 style over ``paths`` (directories)."""

    kind: str = field(init=False, default="nvme")
    paths: tuple[str, ...] = ()
    stripe: int = 1 << 20
    verify: bool = True  # checksum every write, check every read (see nvme())


def gpu(index: int = 0, budget: Size | None = None) -> GpuTier:
    """The GPU ``index`` as the compute tier; ``budget`` caps tierrt's use of its memory
    (default: what is free when the model is offloaded, less a reserve for activations)."""
    if not isinstance(index, int) or isinstance(index, bool):
        raise ConfigTypeError(f"gpu(index): expected a GPU index (int >= 0), got {index!r}")
    if index < 0:
        raise ConfigError(f"gpu(index): expected a GPU index >= 0, got {index!r}")
    return GpuTier(budget=_budget(budget, "gpu budget"), index=index)


def dram(
    budget: Size | None = None, node: int | Sequence[int] | None = None, policy: str = "default"
) -> DramTier:
    """Host memory under a hard ``budget`` (e.g. "64GiB"), optionally bound to NUMA ``node``.

    ``policy`` is one of "default", "bind", "interleave", "preferred" (NUMA placement of the arena).
    ``budget=None`` lets tierrt pick a share of the free memory.
    """
    if policy not in NUMA_POLICIES:
        raise ConfigError(f"dram(policy=...): expected one of {', '.join(NUMA_POLICIES)}, got {policy!r}")
    return DramTier(budget=_budget(budget, "dram budget"), node=_nodes(node, "dram"), policy=policy)


def cxl(budget: Size | None = None, node: int | Sequence[int] | None = None) -> CxlTier:
    """Memory on CPU-less NUMA node(s) (CXL expanders) under ``budget``: one arena bound there.

    ``node=None`` picks the CPU-less nodes the topology reports (``python -m tierrt.topology`` lists
    them). On a machine without any, the tier falls back to an ordinary DRAM arena, not bound to a
    node and outside the dram tier's budget: ``offload()`` logs a warning through
    ``logging.getLogger("tierrt")`` saying so, and the tier's ``describe()`` (``rt.tier_specs``) says
    "ordinary DRAM". ``node=N`` (or a list) binds the arena to those nodes: a node that does not
    exist, or has no memory, raises :class:`~tierrt.ConfigError` from ``offload()``; a node with CPUs
    is used as asked (emulating CXL with a remote socket's memory), with a warning when the machine
    has CPU-less nodes that were not named.
    """
    return CxlTier(budget=_budget(budget, "cxl budget"), node=_nodes(node, "cxl"))


def resolve_cxl(spec: CxlTier, nodes: Sequence[NumaNode] | None = None) -> CxlTier:
    """``spec`` with the memory it will really use, against this machine's NUMA ``nodes`` (read from
    sysfs when None): see :func:`cxl`. Logs what it falls back to; raises :class:`ConfigError` for
    named nodes that do not exist or have no memory."""
    nodes = numa_nodes() if nodes is None else nodes
    cpuless = [n.id for n in nodes if n.is_cxl_candidate]
    named = spec.named_nodes
    if not named:
        if cpuless:
            return dataclasses.replace(
                spec, found=tuple(cpuless), memory=f"CPU-less NUMA node(s) {_ids(cpuless)}"
            )
        log.warning(
            "tierrt: %s: this machine has no CPU-less NUMA node (no CXL memory): the cxl tier is an "
            "ordinary DRAM arena, not bound to a node and outside the dram tier's budget. Remove it "
            "(and give dram() its budget), or name a node with cxl(..., node=N) to use that node's memory",
            spec.describe(),
        )
        return dataclasses.replace(spec, memory="ordinary DRAM: this machine has no CPU-less NUMA node")
    by_id = {n.id: n for n in nodes}
    missing = [n for n in named if n not in by_id]
    if missing:
        raise ConfigError(
            f"cxl(node={spec.node!r}): NUMA node(s) {_ids(missing)} do not exist on this machine; its nodes "
            f"are {_ids(sorted(by_id))}"
            + (f", CPU-less (CXL) ones {_ids(cpuless)}" if cpuless else ", none CPU-less")
        )
    empty = [n for n in named if not by_id[n].mem_total]
    if empty and any(n.mem_total for n in nodes):  # (all 0: the sizes could not be read)
        raise ConfigError(f"cxl(node={spec.node!r}): NUMA node(s) {_ids(empty)} have no memory")
    with_cpus = [n for n in named if by_id[n].cpus]
    if not with_cpus:
        return dataclasses.replace(spec, memory=f"CPU-less NUMA node(s) {_ids(named)}")
    unnamed = [n for n in cpuless if n not in named]
    note = (
        f"tierrt: {spec.describe()}: NUMA node(s) {_ids(with_cpus)} have CPUs (ordinary DRAM of a socket); "
        "the cxl tier uses them as asked"
    )
    if unnamed:
        log.warning("%s, although this machine's CPU-less (CXL) nodes are %s", note, _ids(unnamed))
    else:
        log.info("%s (this machine has no CPU-less node)", note)
    return dataclasses.replace(spec, memory=f"NUMA node(s) {_ids(named)}, which have CPUs: ordinary DRAM")


def _ids(ids: Iterable[int]) -> str:
    return ", ".join(str(i) for i in ids)


# The largest stripe unit nvme() takes: SSDs run at full speed from 64KiB-4MiB; a unit is also one
# piece of a transfer, and the swap files are sized in whole units per path.
MAX_STRIPE = 1 << 30


def nvme(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    budget: Size | None = None,
    stripe: Size = "1MiB",
    verify: bool = True,
) -> NvmeTier:
    """Swap files in one directory or striped over several (one per SSD).

    ``budget`` caps the space used (default: what the placement needs, plus room to write four of
    its largest blocks copy-on-write and 64MiB of headroom, plus the previous step's optimizer state
    when the disk has room for it; checked against the free space). Directories are created if
    missing. ``stripe`` is the bytes per stripe unit: a multiple of 4KiB, at most 1GiB. Each
    directory may appear once (compared after resolving symbolic links and trailing slashes).

    ``verify`` (default True) notes a CRC-32C of every block written and checks it on every read, so
    a swap file damaged outside tierrt (or a device returning wrong data) raises
    :class:`~tierrt.errors.CorruptStoreError` instead of training on it. The checksums run on the
    transfer threads at memory speed (several GB/s per core); on a machine with few cores whose
    compute is CPU-bound, ``verify=False`` gives that CPU time back to the model.
    """
    if not isinstance(verify, bool):
        raise ConfigTypeError(f"nvme(verify=...): expected True or False, got {verify!r}")
    paths = _nvme_paths(path_or_paths)
    stripe_bytes = parse_size(stripe, what="nvme stripe")
    if stripe_bytes < 4096 or stripe_bytes % 4096:
        raise ConfigError(f"nvme(stripe=...): must be a multiple of 4KiB, got {format_size(stripe_bytes)}")
    if stripe_bytes > MAX_STRIPE:
        raise ConfigError(
            f"nvme(stripe=...): at most {format_size(MAX_STRIPE)}, got {format_size(stripe_bytes)}; "
            "SSDs run at full speed with stripes of 64KiB to 4MiB (the default is 1MiB)"
        )
    return NvmeTier(budget=_budget(budget, "nvme budget"), paths=paths, stripe=stripe_bytes, verify=verify)


def _nvme_paths(path_or_paths: object) -> tuple[str, ...]:
    """The directory paths of an nvme tier, checked: str or os.PathLike, non-empty, each once."""
    if isinstance(path_or_paths, (str, os.PathLike)):
        items: list[object] = [path_or_paths]
    elif isinstance(path_or_paths, (bytes, bytearray)) or not isinstance(path_or_paths, Iterable):
        raise ConfigTypeError(
            f"nvme(): expected a directory path (str or os.PathLike) or a list of them, got {path_or_paths!r}"
        )
    else:
        items = list(path_or_paths)
    paths = tuple(_path_str(item) for item in items)
    if not paths or any(not p for p in paths):
        raise ConfigError("nvme(): expected at least one directory path")
    seen: dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise ConfigError(
                f"nvme(): {seen[real]!r} and {path!r} are the same directory; give each directory "
                "once (stripe over directories on different SSDs)"
            )
        seen[real] = path
    return paths


def _path_str(item: object) -> str:
    path = os.fspath(item) if isinstance(item, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise ConfigTypeError(f"nvme(): expected directory paths as str or os.PathLike, got {item!r}")
    return path


def validate_tiers(tiers: Sequence[TierSpec]) -> list[TierSpec]:
    """Check a tier list and return it as a list.

    Rules: every element is a tier spec; fastest first (gpu, dram, cxl, nvme); at most one GPU and
    one DRAM tier; a DRAM tier is present (it holds the blocks being computed on, or staged for the
    GPU); NVMe appears at most once (give it several paths to stripe). A cxl tier is returned
    resolved against this machine's NUMA nodes (:func:`resolve_cxl`).
    """
    if isinstance(tiers, TierSpec):
        tiers = [tiers]
    if isinstance(tiers, (str, bytes)) or not isinstance(tiers, Iterable):
        raise ConfigTypeError(
            f"tiers: expected a list of tier specs, e.g. [tierrt.dram('8GiB'), tierrt.nvme('/tmp/x')], "
            f"got {tiers!r}"
        )
    tiers = list(tiers)
    if not tiers:
        raise ConfigError(
            "tiers: expected at least one tier, e.g. [tierrt.dram('8GiB'), tierrt.nvme('/tmp/x')]"
        )
    for tier in tiers:
        if not isinstance(tier, TierSpec):
            raise ConfigTypeError(
                f"tiers: {tier!r} is not a tier spec; build tiers with tierrt.gpu(), tierrt.dram(), "
                "tierrt.cxl() and tierrt.nvme()"
            )
    ranks = [_RANK[t.kind] for t in tiers]
    if ranks != sorted(ranks):
        order = ", ".join(t.describe() for t in tiers)
        raise ConfigError(f"tiers must be listed fastest first (gpu, dram, cxl, nvme); got [{order}]")
    for kind in ("gpu", "dram", "nvme"):
        if sum(1 for t in tiers if t.kind == kind) > 1:
            hint = " (give one nvme() several paths to stripe over them)" if kind == "nvme" else ""
            raise ConfigError(f"tiers: at most one {kind} tier is supported{hint}")
    if not any(t.kind == "dram" for t in tiers):
        raise ConfigError(
            "tiers: a dram tier is required (it holds the blocks being computed on, or staged for the "
            "GPU); add tierrt.dram(budget)"
        )
    if any(isinstance(t, CxlTier) for t in tiers):
        nodes = numa_nodes()
        tiers = [resolve_cxl(t, nodes) if isinstance(t, CxlTier) else t for t in tiers]
    return tiers


def _budget(budget: Size | None, what: str) -> int | None:
    if budget is None:
        return None
    nbytes = parse_size(budget, what=what)
    if nbytes <= 0:
        raise ConfigError(f"{what}: must be positive, got {budget!r}")
    return nbytes


def _nodes(node: int | Sequence[int] | None, what: str) -> int | tuple[int, ...] | None:
    if node is None:
        return None
    if isinstance(node, int) and not isinstance(node, bool):
        if node < 0:
            raise ConfigError(f"{what}(node=...): NUMA node numbers are >= 0, got {node}")
        return node
    if isinstance(node, (str, bytes)) or not isinstance(node, Iterable):
        raise ConfigTypeError(
            f"{what}(node=...): expected a NUMA node number or a list of them, got {node!r}"
        )
    nodes = tuple(node)
    if any(not isinstance(n, int) or isinstance(n, bool) for n in nodes):
        raise ConfigTypeError(f"{what}(node=...): expected NUMA node numbers (int), got {node!r}")
    if not nodes or any(n < 0 for n in nodes):
        raise ConfigError(f"{what}(node=...): expected NUMA node numbers >= 0, got {node!r}")
    return nodes
