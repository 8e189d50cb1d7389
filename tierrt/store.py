"""TensorStore: where every block's state lives, and the copies that move it.

Each block has one flat buffer per *kind* of state ("weight", "master", "grad", "exp_avg", ...),
laid out by :class:`KindLayout`. A kind has a *home* tier (where it lives for good) and may have
copies on faster tiers (the compute copy of the weights, a DRAM staging copy of NVMe-homed state).
``valid`` names the tiers whose copy holds the current value.

The store holds data and knows how to copy it; *when* to copy is the scheduler's business
(``tierrt.scheduler``). All state changes happen on the thread running the model; copies run on
transfer workers and take effect when the scheduler reaps them.

Writes to NVMe are copy-on-write: new data goes to a fresh extent and the old extent is released
only once the write succeeded (or, inside a step transaction, when the step commits), so a failed
write (EIO, ENOSPC, a full tier) never damages what was stored before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _native
from .blocks import SLOT_ALIGN, BlockSpec, ParamSlot
from .errors import ConfigError, CorruptStoreError, TierCapacityError, TierPathError, listed
from .extents import ExtentPool
from .sizes import format_size
from .tiers import CxlTier, DramTier, GpuTier, NvmeTier

log = logging.getLogger("tierrt.store")

__all__ = [
    "ExtentOwner",
    "KindLayout",
    "HostBuffer",
    "HostTier",
    "NvmeTierStore",
    "GpuTierStore",
    "KindState",
    "BlockState",
    "TensorStore",
    "make_layout",
]


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class KindLayout:
    """Layout of one kind of state in a block buffer: which slots it covers, their dtypes and byte
    offsets, and the buffer size (whole pages)."""

    kind: str
    slots: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    nbytes: int

    def position(self, slot_index: int) -> int | None:
        try:
            return self.slots.index(slot_index)
        except ValueError:
            return None


def make_layout(
    spec: BlockSpec, kind: str, dtype: torch.dtype | None = None, trainable_only: bool = False
) -> KindLayout:
    """Lay out ``kind`` for ``spec``: every slot (or only trainable ones) in ``dtype`` (or its own)."""
    slots, dtypes, offsets = [], [], []
    cursor = 0
    for slot in spec.slots:
        if trainable_only and not slot.param.requires_grad:
            continue
        dt = dtype or slot.dtype
        slots.append(slot.index)
        dtypes.append(dt)
        offsets.append(cursor)
        cursor = _align(cursor + slot.numel * dt.itemsize, SLOT_ALIGN)
    return KindLayout(kind, tuple(slots), tuple(dtypes), tuple(offsets), _align(max(cursor, 1), 4096))


class HostBuffer:
    """A range of a host arena and a uint8 tensor viewing it (zero copy).

    The arena range returns to the arena when the last tensor viewing it is gone, so memory that
    autograd or a user still holds is never handed out again.
    """

    __slots__ = ("tier", "nbytes", "flat", "__weakref__")

    def __init__(self, tier: HostTier | None, buffer: Any) -> None:
        self.tier = tier  # None: a one-off buffer outside every tier (see TensorStore.overflow)
        self.nbytes = int(buffer.nbytes)
        self.flat = torch.frombuffer(buffer, dtype=torch.uint8)

    @property
    def address(self) -> int:
        return self.flat.data_ptr()

    def view(self, offset: int, dtype: torch.dtype, shape: torch.Size, numel: int) -> torch.Tensor:
        """The slot at byte ``offset`` as a ``dtype`` tensor of ``shape`` sharing this storage."""
        return self.flat[offset : offset + numel * dtype.itemsize].view(dtype).view(shape)


class HostTier:
    """A DRAM or CXL tier: one arena of ``size`` bytes (the budget, or what the placement needs
    when that is less), reserved at creation."""

    def __init__(
        self, spec: DramTier | CxlTier, budget: int, nodes: tuple[int, ...] = (), size: int | None = None
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.budget = budget
        self.size = budget if size is None else min(size, budget)
        policy = getattr(spec, "policy", "default")
        nodes = nodes or spec.nodes
        if nodes and policy == "default":
            policy = "bind"
        self.arena = _native.HostArena(
            self.size,
            nodes=list(nodes),
            policy=policy,
            hugepages=True,
            lock=True,
            populate=True,
            alignment=4096,
            name=self.name,
        )
        if not self.arena.locked:
            log.info(
                "%s arena of %s is not locked in memory (%s); it is still fully reserved",
                self.name,
                format_size(self.size),
                getattr(self.arena, "lock_error", "mlock failed"),
            )
        self.registered_cuda = False

    def try_alloc(self, nbytes: int, transient: bool = False) -> HostBuffer | None:
        """An arena range, or None when no free extent holds it. ``transient`` buffers (gradients,
        optimizer state in flight) come from the top of the arena and cached weights from the
        bottom, so the two do not fragment each other."""
        buf = self.arena.try_alloc(nbytes, from_top=transient)
        return None if buf is None else HostBuffer(self, buf)

    def alloc(self, nbytes: int) -> HostBuffer:
        return HostBuffer(self, self.arena.alloc(nbytes))

    def stats(self) -> dict[str, Any]:
        if self.arena is None:
            return dict(self._final_stats)
        return dict(self.arena.stats())

    def free_bytes(self) -> int:
        return int(self.stats()["free"])

    def largest_free(self) -> int:
        return int(self.stats()["largest_free"])

    def register_cuda(self) -> None:
        """Pin the arena for fast, asynchronous host<->GPU copies (once)."""
        if self.registered_cuda or not torch.cuda.is_available():
            return
        result = torch.cuda.cudart().cudaHostRegister(self.arena.address, self.arena.nbytes, 0)
        code = result[0] if isinstance(result, tuple) else result
        if int(code) != 0:
            log.warning(
                "cudaHostRegister of the %s arena failed (error %s); copies will be slower",
                self.name,
                int(code),
            )
            return
        self.registered_cuda = True

    def close(self) -> None:
        """Unregister the arena and let it go: its memory returns to the system once no tensor
        views it any more. ``stats()`` keeps answering with the figures of this moment: nothing free
        or reserved when nothing views it (what tensors kept from inside the context still view
        stays in use, and with it the whole arena)."""
        if self.arena is None:
            return
        if self.registered_cuda:
            torch.cuda.cudart().cudaHostUnregister(self.arena.address)
            self.registered_cuda = False
        stats = self.stats()
        if not stats.get("in_use"):  # nothing views the arena: its memory goes back to the system now
            stats.update(free=0, largest_free=0, reserved=0)
        self._final_stats = stats
        self.arena = None


class NvmeTierStore:
    """Swap files on one or more directories, striped, with an extent allocator over them.

    Each swap file's name is removed as soon as the native layer has it open (``unlink=True``): the
    descriptors keep the space while the store lives and the kernel frees it however the process
    ends, SIGKILL included, so a run never leaves a swap file behind. ``files`` keeps the paths for
    messages. Directories the store had to create are removed again, when empty, on close (or when
    the store is collected, or at interpreter exit)."""

    def __init__(self, spec: NvmeTier, size: int, engine: Any) -> None:
        self.spec = spec
        self.name = spec.name
        self.size = _align(max(size, 1 << 20), spec.stripe * len(spec.paths))
        self.engine = engine
        self.files: list[str] = []
        created = check_nvme_paths(spec.paths, self.size)
        self._remove_created = weakref.finalize(self, remove_empty_dirs, created)
        try:
            for path in spec.paths:
                sweep_stale_swap_files(path)
            token = f"{os.getpid()}-{secrets.token_hex(4)}"
            self.files = [os.path.join(path, f"tierrt-{token}-{i}.swap") for i, path in enumerate(spec.paths)]
            self.fileset = engine.open(
                self.files,
                self.size,
                stripe=spec.stripe,
                create=True,
                preallocate=True,
                direct=True,
                unlink=True,
            )
        except BaseException:
            self._remove_created()
            raise
        if not self.fileset.direct:
            log.warning(
                "nvme tier %s: O_DIRECT is not supported there; using buffered I/O "
                "(the page cache will hold copies of swapped data)",
                ", ".join(spec.paths),
            )
        self.allocator = ExtentPool(self.size, 4096, "nvme")  # recycled by size: no fragmentation
        # offset -> (bytes, checksum) of the last write there (see verify)
        self._checksums: dict[int, tuple[int, int]] = {}
        # Which block's state an extent holds, for the message of a failed check (set by the
        # TensorStore over this tier: a weak reference to its lookup, so no cycle keeps it alive).
        self.owner_of: Callable[[], Callable[[int], ExtentOwner | None] | None] = lambda: None
        self._final_stats: dict[str, Any] | None = None  # the figures once closed (see stats)

    @property
    def budget(self) -> int:
        return self.size

    def read(self, offset: int, host: HostBuffer, nbytes: int) -> Any:
        """Read ``nbytes`` at ``offset`` into ``host``; the returned request's ``wait()`` also checks
        the bytes against the checksum of what was written there (CorruptStoreError if they differ)."""
        request = self.engine.read(self.fileset, offset, host.flat.numpy(), nbytes)
        return _CheckedRead(request, self, offset, host, nbytes) if self.spec.verify else request

    def write(self, offset: int, host: HostBuffer, nbytes: int) -> Any:
        """Write ``nbytes`` of ``host`` at ``offset``, noting their checksum first (a write that fails
        or tears leaves a checksum the extent does not match: a later read of it fails loudly)."""
        if self.spec.verify:
            self._checksums[offset] = (nbytes, _native.checksum(host.address, nbytes))
        return self.engine.write(self.fileset, offset, host.flat.numpy(), nbytes)

    def verify(self, offset: int, host: HostBuffer, nbytes: int) -> None:
        """Raise CorruptStoreError when the ``nbytes`` just read from ``offset`` into ``host`` are not
        what tierrt wrote there. Runs on the transfer thread (the checksum releases the GIL)."""
        written = self._checksums.get(offset)
        if written is None or written[0] != nbytes:
            return  # not written by this store as one piece (never read by the pipeline)
        found = _native.checksum(host.address, nbytes)
        if found == written[1]:
            return
        raise self._corrupt(offset, nbytes, found, written[1])

    def _corrupt(self, offset: int, nbytes: int, found: int, written: int) -> CorruptStoreError:
        """The error for a failed check of the ``nbytes`` at ``offset``: where they are (file and
        offset in it), whose they are (block, parameters, kind of state) and what to do."""
        path, file_offset = self.locate(offset)
        owner = self._owner(offset)
        where = f"the {format_size(nbytes)} read at offset {file_offset} of {path}"
        what = "the value stored there is lost"
        details: dict[str, Any] = {"path": path, "offset": file_offset, "nbytes": nbytes}
        if owner is not None:
            where += f", {owner.describe()},"
            what = (
                f"tierrt cannot read back the {owner.kind_name} of block {owner.block}. Load the model "
                "and its optimizer state from your last checkpoint to go on"
            )
            details.update(block=owner.block, kind=owner.kind, parameters=list(owner.parameters))
        return CorruptStoreError(
            f"swap data failed its integrity check: {where} are not what tierrt wrote there "
            f"(checksum {found:#010x}, written {written:#010x}). The swap file was changed outside "
            f"tierrt, or the device returned damaged data: {what}",
            **details,
        )

    def _owner(self, offset: int) -> ExtentOwner | None:
        """Whose state the extent at ``offset`` holds, or None when that is not known. Runs on the
        transfer thread while the model's thread may change the blocks: a lookup that trips over a
        change says nothing rather than fail the error it describes."""
        lookup = self.owner_of()
        if lookup is None:
            return None
        try:
            return lookup(offset)
        except Exception:  # noqa: BLE001 - only the message's detail is lost
            return None

    def locate(self, offset: int) -> tuple[str, int]:
        """The swap file and the offset in it that hold the tier's byte ``offset`` (striping as the
        I/O engine does: stripe units dealt round-robin to the files)."""
        stripe, count = self.spec.stripe, len(self.files)
        unit = offset // stripe
        return self.files[unit % count], (unit // count) * stripe + offset % stripe

    def stats(self) -> dict[str, Any]:
        """The extents' figures (``in_use``, ``free``, ``peak_in_use``, ...), ``reserved`` (the swap
        files' size), the files and whether I/O is direct. Once closed: the figures of that moment
        with nothing in use, free or reserved (the files are gone), the peak kept."""
        if self._final_stats is not None:
            return dict(self._final_stats)
        stats = dict(self.allocator.stats())
        stats["reserved"] = self.size
        stats["files"] = list(self.files)
        stats["direct"] = bool(self.fileset.direct)
        return stats

    def close(self) -> None:
        """Close the swap files and the I/O engine made for them (its thread, ring and eventfd go
        now, not when the last reference to a runtime kept for its report goes)."""
        if self._final_stats is None:
            self._final_stats = {**self.stats(), "in_use": 0, "free": 0, "largest_free": 0, "reserved": 0}
        try:
            self.fileset.close(remove=True)
        finally:
            try:
                self.engine.close()
            finally:
                self._remove_created()


# How a message names each kind of state; the others are optimizer state (exp_avg, momentum_buffer).
_KIND_NAMES = {"weight": "weights", "master": "fp32 master weights", "grad": "gradients"}


@dataclass(frozen=True)
class ExtentOwner:
    """What an NVMe extent holds: one kind of one block's state, for the parameters it covers."""

    block: str
    kind: str
    parameters: tuple[str, ...]

    @property
    def kind_name(self) -> str:
        """``kind`` in words: "weights", "gradients", "exp_avg (optimizer state)", ..."""
        return _KIND_NAMES.get(self.kind, f"{self.kind} (optimizer state)")

    def describe(self) -> str:
        """E.g. "the weights of block layers.3 (layers.3.weight, layers.3.bias)"."""
        return f"the {self.kind_name} of block {self.block} ({listed(list(self.parameters), 4)})"


class _CheckedRead:
    """An NVMe read request whose ``wait()`` verifies the data read (see NvmeTierStore.verify)."""

    def __init__(self, request: Any, nvme: NvmeTierStore, offset: int, host: HostBuffer, nbytes: int) -> None:
        self.request = request
        self._check = (nvme, offset, host, nbytes)

    def wait(self) -> None:
        self.request.wait()
        nvme, offset, host, nbytes = self._check
        nvme.verify(offset, host, nbytes)


# tierrt-<pid>-<8 hex>-<index>.swap, as NvmeTierStore names its files.
_SWAP_NAME = re.compile(r"tierrt-(\d+)-[0-9a-f]{8}-\d+\.swap")


def sweep_stale_swap_files(directory: str) -> list[str]:
    """Remove swap files in ``directory`` left by tierrt processes that are gone (versions before
    swap files were unlinked on open kept their names until close, so a killed run left them).
    The owner's pid is in the name; files of live processes are kept. Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _SWAP_NAME.fullmatch(name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    if removed:
        log.info("nvme tier: removed %d stale swap file(s) of ended runs in %s", len(removed), directory)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or no pid to judge: keep
        return True
    return True


def remove_empty_dirs(created: list[str]) -> None:
    """Remove the directories in ``created`` (deepest first) that are empty; keep the rest."""
    for path in sorted(created, key=len, reverse=True):
        try:
            os.rmdir(path)
        except OSError:
            pass


def check_nvme_paths(paths: Iterable[str], size: int) -> list[str]:
    """Create the directories if needed and check each is writable and has room for its share.

    Returns the directories this call created (the path and any missing parents), so they can be
    removed again. Raises :class:`TierPathError` (unwritable, not a directory) or
    :class:`TierCapacityError` (no room) naming the path, before anything is written; directories
    it created are removed again then.
    """
    paths = list(paths)
    share = -(-size // len(paths))
    created: list[str] = []
    try:
        for path in paths:
            _check_nvme_path(path, share, created)
    except BaseException:
        remove_empty_dirs(created)
        raise
    return created


def _check_nvme_path(path: str, share: int, created: list[str]) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise TierPathError(
            f"nvme tier: {path} is a file, not a directory: give a directory for the swap files",
            path=path,
        )
    missing = _missing_dirs(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        created.extend(d for d in missing if os.path.isdir(d))
        raise TierPathError(
            f"nvme tier: cannot create directory {path}: {exc.strerror}", path=path, errno=exc.errno
        ) from None
    created.extend(missing)
    if not os.path.isdir(path):
        raise TierPathError(f"nvme tier: {path} is not a directory", path=path)
    probe = os.path.join(path, f".tierrt-probe-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        with open(probe, "wb"):
            pass
    except OSError as exc:
        raise TierPathError(
            f"nvme tier: {path} is not writable: {exc.strerror}", path=path, errno=exc.errno
        ) from None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    free = shutil.disk_usage(path).free
    if free < share:
        raise TierCapacityError(
            f"nvme tier: {path} has {format_size(free)} free but the placement needs "
            f"{format_size(share)} there",
            tier="nvme",
            requested=share,
            free=free,
            path=path,
        )


def _missing_dirs(path: str) -> list[str]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def gpu_device(spec: GpuTier) -> torch.device:
    """The torch device that GPU tier ``spec`` computes on.

    Raises ConfigError when torch sees no CUDA device, or not the one asked for."""
    if not torch.cuda.is_available():
        raise ConfigError(f"tiers include {spec.name} but torch sees no CUDA device")
    count = torch.cuda.device_count()
    if spec.index >= count:
        raise ConfigError(f"tiers include {spec.name} but torch sees {count} CUDA device(s)")
    return torch.device("cuda", spec.index)


class GpuTierStore:
    """Device memory of the compute GPU, under a budget tierrt keeps to for the blocks it holds.

    ``device`` is the CUDA device of ``spec``. The scheduler's own tests also run this tier in host
    memory (a CPU device) to check its GPU-path logic on machines without a GPU; copies are then
    plain synchronous copies."""

    def __init__(self, spec: GpuTier, budget: int, device: torch.device) -> None:
        self.spec = spec
        self.name = spec.name
        self.device = device
        self.budget = budget
        self.used = 0
        self.peak = 0

    def try_alloc(self, nbytes: int) -> torch.Tensor | None:
        if self.used + nbytes > self.budget:
            return None
        tensor = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return tensor

    def release(self, nbytes: int) -> None:
        self.used -= nbytes

    def free_bytes(self) -> int:
        return self.budget - self.used

    def stats(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "in_use": self.used,
            "peak_in_use": self.peak,
            "free": self.budget - self.used,
        }


@dataclass(eq=False)
class KindState:
    """One kind of a block's state: its layout, home, copies and which copies are current."""

    layout: KindLayout
    home: str
    host: HostBuffer | None = None  # copy in the compute-side host tier ("dram")
    far: HostBuffer | None = None  # copy in a CXL home
    extent: int | None = None  # NVMe extent offset
    gpu: torch.Tensor | None = None
    valid: set[str] = field(default_factory=set)
    inflight: Any = None  # the Transfer currently moving this kind
    on_reap: Callable[..., Any] | None = None
    # Step transaction: while ``in_step``, the first copy-on-write of this kind keeps the extent that
    # holds the previous step's value (``step_undo``) until the step commits or rolls back.
    in_step: bool = False
    step_undo: int | None = None
    # The same for a kind homed in DRAM, which has no extent to keep: a copy of its previous value
    # in the arena, taken when the step first changes it if there is room (see OptimizerPipeline).
    dram_undo: HostBuffer | None = None
    written: bool = False  # the home holds a value (later writes go copy-on-write)
    version: int = 0
    pins: int = 0  # > 0 while compute or the optimizer works on the DRAM copy: not evictable

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


@dataclass(eq=False)
class BlockState:
    """Runtime state of one block: its spec and the state of each kind."""

    spec: BlockSpec
    kinds: dict[str, KindState] = field(default_factory=dict)
    refcount: int = 0
    attached: bool = False
    last_use: int = 0
    pinned: bool = False  # weights permanently on the compute tier

    @property
    def index(self) -> int:
        return self.spec.index

    @property
    def name(self) -> str:
        return self.spec.name

    def trains(self, slot_index: int) -> bool:
        """Whether slot ``slot_index`` has a gradient buffer (and optimizer state) here: its
        parameter required grad when the model was placed. Layouts are fixed then."""
        grad = self.kinds.get("grad")
        return grad is not None and grad.layout.position(slot_index) is not None


class TensorStore:
    """The blocks' state across tiers, with the primitive copies between them.

    ``compute`` is "dram" (CPU compute) or the GPU tier's name. Host copies of every kind are made
    in the "dram" tier.
    """

    def __init__(
        self, host_tiers: dict[str, HostTier], nvme: NvmeTierStore | None, gpu: GpuTierStore | None
    ) -> None:
        self.host_tiers = host_tiers
        self.dram = host_tiers["dram"]
        # Set while the model is given back: a DRAM buffer the arena has no room for is allocated
        # outside its budget instead of failing (unless ``within_budget_first`` holds it back for a
        # first try); ``overflowed`` counts the bytes that took.
        self.overflow = False
        self.overflowed = 0
        self._kept_to_budget = False
        self._overflow_told: set[bool] = set()  # whether each reason for it was logged yet
        self.nvme = nvme
        self.gpu = gpu
        self.blocks: list[BlockState] = []
        self._h2d_stream = None
        if nvme is not None:
            nvme.owner_of = weakref.WeakMethod(self.extent_owner)
        self._d2h_stream = None

    def extent_owner(self, offset: int) -> ExtentOwner | None:
        """The block state the NVMe extent at ``offset`` holds (its current value or the previous
        step's, kept until the step commits), or None when no block's state is there."""
        for bs in list(self.blocks):
            for kind, ks in list(bs.kinds.items()):
                if offset in (ks.extent, ks.step_undo):
                    names = tuple(bs.spec.slots[index].name for index in ks.layout.slots)
                    return ExtentOwner(bs.name, kind, names)
        return None

    # ---- allocation --------------------------------------------------------------------------
    def tier_names(self) -> list[str]:
        names = ([self.gpu.name] if self.gpu else []) + list(self.host_tiers)
        return names + (["nvme"] if self.nvme else [])

    def allocate_home(self, ks: KindState) -> None:
        """Reserve ``ks``'s home (at placement). Raises TierCapacityError when it does not fit."""
        if ks.home == "nvme":
            assert self.nvme is not None
            ks.extent = self.nvme.allocator.alloc(ks.nbytes)
        elif ks.home == "dram":
            ks.host = self.dram.alloc(ks.nbytes)
        elif ks.home in self.host_tiers:
            ks.far = self.host_tiers[ks.home].alloc(ks.nbytes)
        elif self.gpu is not None and ks.home == self.gpu.name:
            tensor = self.gpu.try_alloc(ks.nbytes)
            if tensor is None:
                raise TierCapacityError(
                    f"{self.gpu.name}: no room for {format_size(ks.nbytes)} of {ks.layout.kind}",
                    tier=self.gpu.name,
                    requested=ks.nbytes,
                    free=self.gpu.free_bytes(),
                )
            ks.gpu = tensor
        else:
            raise ConfigError(f"unknown home tier {ks.home!r}")

    def try_host(self, ks: KindState) -> bool:
        """Make sure ``ks`` has a DRAM buffer (contents not yet valid). False when there is no room."""
        if ks.host is not None:
            return True
        buf = self.dram.try_alloc(ks.nbytes, transient=ks.layout.kind != "weight")
        if buf is None:
            return False
        ks.host = buf
        return True

    def may_overflow(self) -> bool:
        """Whether a DRAM buffer the arena has no room for may now be allocated outside the budget:
        while the model is given back, outside a first try within the budget."""
        return self.overflow and not self._kept_to_budget

    @contextlib.contextmanager
    def kept_to_budget(self) -> Iterator[None]:
        """Within this block no buffer is allocated outside the DRAM budget, even while the model is
        given back: a lack of room raises TierCapacityError as it does inside the context."""
        before, self._kept_to_budget = self._kept_to_budget, True
        try:
            yield
        finally:
            self._kept_to_budget = before

    def within_budget_first(self, action: Callable[[], None]) -> None:
        """Run ``action`` within the DRAM budget, also while the model is given back, so that what
        tierrt does when it finds no room (a pending update lets go of its block's own copies and
        places them again, where they had split the free room) runs before anything is read
        outside the budget. Only when that still fails for want of DRAM room is ``action`` run
        again, with buffers outside the budget allowed. ``action`` must leave things as they were
        when it raises TierCapacityError (as applying pending updates does)."""
        if not self.may_overflow():
            action()
            return
        try:
            with self.kept_to_budget():
                action()
            return
        except TierCapacityError as error:
            if getattr(error, "tier", None) != self.dram.name:
                raise
            log.debug("giving the model back: retrying outside the %s budget: %s", self.dram.name, error)
        action()  # outside the except block: the first try's traceback is gone

    def alloc_overflow(self, ks: KindState, held_outside: int = 0) -> None:
        """Give ``ks`` a one-off DRAM buffer outside every tier's budget (see ``overflow``).

        ``held_outside`` is how much of the arena tensors outside tierrt still view (kept from inside
        the context): a warning names it, since letting go of them avoids this. Without any, the
        arena's own buffers left no room in one piece: that is logged (info) only."""
        assert ks.host is None
        self._tell_overflow(ks, held_outside)
        self.overflowed += ks.nbytes
        arena = _native.HostArena(
            _align(max(ks.nbytes, 1), 4096), hugepages=False, lock=False, populate=False, name="overflow"
        )
        ks.host = HostBuffer(None, arena.alloc(ks.nbytes))

    def _tell_overflow(self, ks: KindState, held_outside: int) -> None:
        """Log, once per reason, why giving the model back reads values outside the DRAM budget."""
        held = held_outside > 0
        if held in self._overflow_told:
            return
        self._overflow_told.add(held)
        stats = self.dram.stats()
        if held:
            log.warning(
                "tierrt: giving the model back with %s of the %s tier still viewed by tensors kept from "
                "inside the context (param.detach(), param.data, a hook's stash): reading the values "
                "that do not fit outside its budget (let go of such tensors before leaving to avoid it)",
                format_size(held_outside),
                self.dram.name,
            )
            return
        log.info(
            "tierrt: giving the model back: no room in one piece for %s of %s in the %s tier (%s free, "
            "largest piece %s, the rest held by tierrt's own buffers): reading it outside the budget",
            format_size(ks.nbytes),
            ks.layout.kind,
            self.dram.name,
            format_size(int(stats.get("free", 0))),
            format_size(int(stats.get("largest_free", 0))),
        )

    def try_gpu(self, ks: KindState) -> bool:
        if ks.gpu is not None:
            return True
        assert self.gpu is not None
        tensor = self.gpu.try_alloc(ks.nbytes)
        if tensor is None:
            return False
        ks.gpu = tensor
        return True

    def drop(self, ks: KindState, tier: str) -> None:
        """Forget the copy on ``tier`` (never a home, never the only current copy)."""
        assert ks.inflight is None, "drop() while a transfer is in flight"
        assert tier != ks.home, f"cannot drop the home copy of {ks.layout.kind}"
        if tier in ks.valid and ks.valid == {tier}:
            raise AssertionError(f"dropping the only current copy of {ks.layout.kind} on {tier}")
        if tier == "dram":
            ks.host = None
        elif self.gpu is not None and tier == self.gpu.name:
            if ks.gpu is not None:
                self.gpu.release(ks.nbytes)
            ks.gpu = None
        ks.valid.discard(tier)

    # ---- views -------------------------------------------------------------------------------
    def host_views(
        self, bs: BlockState, ks: KindState, buffer: HostBuffer | None = None
    ) -> list[torch.Tensor]:
        """One tensor per covered slot, viewing the DRAM copy (or ``buffer``)."""
        buf = buffer or ks.host
        assert buf is not None
        out = []
        for slot_index, dtype, offset in zip(ks.layout.slots, ks.layout.dtypes, ks.layout.offsets):
            slot = bs.spec.slots[slot_index]
            out.append(buf.view(offset, dtype, slot.shape, slot.numel))
        return out

    def gpu_views(self, bs: BlockState, ks: KindState) -> list[torch.Tensor]:
        assert ks.gpu is not None
        out = []
        for slot_index, dtype, offset in zip(ks.layout.slots, ks.layout.dtypes, ks.layout.offsets):
            slot = bs.spec.slots[slot_index]
            nbytes = slot.numel * dtype.itemsize
            out.append(ks.gpu[offset : offset + nbytes].view(dtype).view(slot.shape))
        return out

    def slot_view(self, bs: BlockState, ks: KindState, slot: ParamSlot, tier: str) -> torch.Tensor:
        pos = ks.layout.position(slot.index)
        assert pos is not None
        offset, dtype = ks.layout.offsets[pos], ks.layout.dtypes[pos]
        if tier == "dram":
            assert ks.host is not None
            return ks.host.view(offset, dtype, slot.shape, slot.numel)
        assert ks.gpu is not None
        return ks.gpu[offset : offset + slot.numel * dtype.itemsize].view(dtype).view(slot.shape)

    # ---- copies (each returns the steps of a transfer; the caller submits and reaps) ---------
    def read_steps(self, ks: KindState) -> list[Callable[[], Any]]:
        """Steps bringing the home copy into the DRAM buffer ``ks.host`` (allocated already)."""
        host = ks.host
        assert host is not None
        if ks.home == "nvme":
            assert self.nvme is not None and ks.extent is not None
            nvme, extent, nbytes = self.nvme, ks.extent, ks.nbytes
            return [lambda: nvme.read(extent, host, nbytes)]
        if ks.far is not None:
            far = ks.far
            return [lambda: host.flat.copy_(far.flat)]
        raise AssertionError(f"no source to read {ks.layout.kind} from (home {ks.home})")

    def write_steps(self, ks: KindState) -> tuple[list[Callable[[], Any]], int | None]:
        """Steps writing the DRAM copy back home; for NVMe, to a new extent (copy-on-write).

        Returns (steps, new_extent). Raises TierCapacityError when the NVMe tier has no room for the
        new extent (nothing is changed then).
        """
        host = ks.host
        assert host is not None
        if ks.home == "nvme":
            assert self.nvme is not None
            nvme, nbytes = self.nvme, ks.nbytes
            if ks.extent is not None and (not ks.written or ks.layout.kind == "grad"):
                # In place: the first write has no value to protect yet, and gradients are never
                # part of what a failed step must restore (so they cause no extent churn either).
                extent = ks.extent
                return [lambda: nvme.write(extent, host, nbytes)], None
            new_extent = nvme.allocator.try_alloc(nbytes)
            if new_extent is None:
                stats = nvme.allocator.stats()
                raise TierCapacityError(
                    f"nvme tier is full: no room for a {format_size(nbytes)} copy-on-write extent of "
                    f"{ks.layout.kind} ({format_size(stats['free'])} free, largest extent "
                    f"{format_size(stats['largest_free'])}, tier {format_size(nvme.size)})",
                    tier="nvme",
                    requested=nbytes,
                    free=stats["free"],
                    largest_free=stats["largest_free"],
                    budget=nvme.size,
                )
            return [lambda: nvme.write(new_extent, host, nbytes)], new_extent
        if ks.far is not None:
            far = ks.far
            return [lambda: far.flat.copy_(host.flat)], None
        raise AssertionError(f"no home to write {ks.layout.kind} to (home {ks.home})")

    def commit_write(self, ks: KindState, new_extent: int | None) -> None:
        """A write home succeeded: the new extent becomes the home copy."""
        ks.written = True
        if new_extent is not None:
            assert self.nvme is not None
            if ks.extent is not None:
                if ks.in_step and ks.step_undo is None:
                    ks.step_undo = ks.extent  # the previous step's value, until the step commits
                else:
                    self.nvme.allocator.free(ks.extent)
            ks.extent = new_extent
        ks.valid.add(ks.home)

    def abort_write(self, new_extent: int | None) -> None:
        if new_extent is not None and self.nvme is not None:
            self.nvme.allocator.free(new_extent)

    def h2d_steps(self, ks: KindState) -> list[Callable[[], Any]]:
        """Steps copying the DRAM copy to the GPU copy (both allocated).

        Called on the thread that computes, right after the GPU copy was allocated. That memory may
        have been freed by an evicted block a moment ago while kernels reading it are still queued
        on the compute stream (the caching allocator reuses it at once for the same stream). The
        copy runs on a side stream, so it first waits for an event recorded on the compute stream
        now: it cannot overwrite memory that queued kernels still read."""
        assert self.gpu is not None and ks.host is not None and ks.gpu is not None
        host, dev = ks.host, ks.gpu
        if dev.device.type != "cuda":
            return [lambda: dev.copy_(host.flat)]  # a compute tier in host memory (see GpuTierStore)
        stream = self.h2d_stream()
        compute_done = torch.cuda.Event()
        compute_done.record(torch.cuda.current_stream(self.gpu.device))

        def copy() -> Any:
            with torch.cuda.stream(stream):
                stream.wait_event(compute_done)
                dev.copy_(host.flat, non_blocking=True)
                dev.record_stream(stream)  # the allocator sees the side stream's use too
                event = torch.cuda.Event()
                event.record(stream)
            return _EventWait(event)

        return [copy]

    def h2d_stream(self) -> Any:
        if self._h2d_stream is None:
            assert self.gpu is not None
            self._h2d_stream = torch.cuda.Stream(device=self.gpu.device)
        return self._h2d_stream

    def d2h_stream(self) -> Any:
        if self._d2h_stream is None:
            assert self.gpu is not None
            self._d2h_stream = torch.cuda.Stream(device=self.gpu.device)
        return self._d2h_stream

    # ---- step transactions ---------------------------------------------------------------------
    def commit_kind(self, ks: KindState) -> None:
        """The step is complete: the previous step's extent is no longer needed."""
        if ks.step_undo is not None and self.nvme is not None:
            self.nvme.allocator.free(ks.step_undo)
        ks.step_undo = None
        ks.in_step = False

    def rollback_kind(self, ks: KindState) -> None:
        """Give an NVMe-homed ``ks`` back its previous step's value (the DRAM copy is dropped)."""
        ks.in_step = False
        if ks.step_undo is not None:
            assert self.nvme is not None
            if ks.extent is not None:
                self.nvme.allocator.free(ks.extent)
            ks.extent, ks.step_undo = ks.step_undo, None
        ks.valid = {"nvme"} if ks.extent is not None else set()
        ks.host = None

    def close(self) -> None:
        """Free every tier: the blocks' GPU and DRAM copies, the arenas, the swap files. The model
        was given back before; a runtime kept for its report then holds no tier memory."""
        for bs in self.blocks:
            for ks in bs.kinds.values():
                if ks.gpu is not None and self.gpu is not None:
                    self.gpu.release(ks.nbytes)
                ks.gpu = None
                ks.host = None
        for tier in self.host_tiers.values():
            tier.close()
        if self.nvme is not None:
            self.nvme.close()


class _EventWait:
    """Adapter giving a CUDA event a ``wait()`` that blocks the calling (worker) thread."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def wait(self) -> None:
        self.event.synchronize()
