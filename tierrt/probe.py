"""``tierrt-probe``: measure the bandwidth of every link this machine has, and keep it as a profile.

Links measured (each skipped with a reason when the machine lacks it):

* **DRAM / CXL copy**, per NUMA node: two buffers in a :class:`~tierrt.arena.HostArena` bound to the
  node, copied by all CPUs of the node (the nearest CPU node for a CPU-less CXL node) and by one
  thread. ``gbps`` counts the bytes copied once: ``nbytes / seconds``. The memory traffic behind it is
  at least twice that (each byte is read and written; write-allocate adds a third pass).
* **NVMe read and write** under each ``--path``: a test file written then read through the
  :class:`~tierrt.io.IOEngine` with ``O_DIRECT`` (page cache bypassed) into arena buffers, at several
  block sizes and queue depths.
* **Host <-> GPU** when CUDA is available: H2D and D2H from an arena registered with CUDA, from torch's
  own pinned tensors, and from pageable memory.
* **NVMe -> GPU** through kvikio (GPUDirect Storage or its compatibility mode) when installed.

Command line::

    tierrt-probe                       # full run, NVMe files in the cache directory's filesystem
    tierrt-probe --quick --path /mnt/nvme0 --plot links.png
    tierrt-probe --json profile.json --size 4GiB

Python::

    >>> from tierrt.probe import run_probe, Profile
    >>> profile = run_probe(path="/mnt/nvme0", quick=True)           # doctest: +SKIP
    >>> profile.save()                                                # doctest: +SKIP
    >>> Profile.load().bandwidth("nvme", "dram", op="read", block_size="1MiB")  # doctest: +SKIP
    3.2

Link names: ``dram:N`` (NUMA node N), ``cxl:N`` (a CPU-less node), ``nvme:PATH``, ``gpu:I``.
:meth:`Profile.bandwidth` matches a bare kind (``"nvme"``) against every link of that kind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from . import topology as _topology
from .atomic import atomic_file
from .errors import ConfigError, TierPathError, TierrtError
from .sizes import format_size, parse_size

__all__ = ["LinkResult", "Profile", "ProbeError", "run_probe", "main", "default_profile_path", "plot_profile"]

log = logging.getLogger("tierrt.probe")

SCHEMA_VERSION = 1
_MiB = 1 << 20
_GiB = 1 << 30
_SPACE_MARGIN = 16 * _MiB  # free space kept beyond the test file


class ProbeError(TierrtError):
    """Bad input to the probe (path missing, not a directory, not writable, too little room,
    plotting without matplotlib). The CLI prints it as one line and exits with status 2."""


# --------------------------------------------------------------------------------------------------
# results and profiles


@dataclass
class LinkResult:
    """One measurement: ``bytes`` moved from ``src`` to ``dst`` by ``op`` in ``seconds``.

    ``block_size`` is the size of one request and ``queue_depth`` how many were in flight (1 for a
    single copy call); ``threads`` the CPU threads that did the work; ``memory`` the kind of host
    memory ("arena", "pinned-arena", "pinned-torch", "pageable"); ``direct`` whether the page cache
    was bypassed. ``gbps`` is decimal GB/s (1e9 bytes per second).
    """

    src: str
    dst: str
    op: str
    block_size: int | None
    queue_depth: int | None
    bytes: int
    seconds: float
    gbps: float
    threads: int | None = None
    memory: str | None = None
    direct: bool | None = None
    device: str | None = None
    repeats: int = 1
    note: str | None = None

    @classmethod
    def measured(cls, src: str, dst: str, op: str, nbytes: int, seconds: float, **kw: Any) -> LinkResult:
        return cls(
            src=src, dst=dst, op=op, bytes=int(nbytes), seconds=seconds, gbps=_gbps(nbytes, seconds), **kw
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinkResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def _kind(name: str) -> str:
    return name.split(":", 1)[0]


def _matches(pattern: str, name: str) -> bool:
    """A bare kind ("nvme") matches every link of that kind; a qualified name ("dram:0") only itself."""
    return pattern == name or (":" not in pattern and _kind(name) == pattern)


@dataclass
class Profile:
    """A machine's measured links plus the facts they were measured under.

    Saved as JSON (``save``/``load``); the default location is :func:`default_profile_path`.
    """

    links: list[LinkResult]
    topology: dict[str, Any] = field(default_factory=dict)
    io_backend: str | None = None
    tierrt_version: str = __version__
    created: str = ""
    hostname: str = ""
    quick: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    # -- persistence ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["links"] = [link.to_dict() for link in self.links]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        kw["links"] = [LinkResult.from_dict(x) for x in data.get("links", [])]
        return cls(**kw)

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the profile as JSON, atomically (a temporary file renamed into place: the file is
        then whole, or as it was). A path that cannot be written (read-only filesystem, no room, a
        directory) raises :class:`~tierrt.TierPathError` naming it and the errno."""
        dest = Path(path) if path is not None else default_profile_path()
        data = (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TierPathError(
                f"bandwidth profile: cannot create the directory {dest.parent} for {dest}: "
                f"{err.strerror} (errno {err.errno})",
                path=str(dest),
                errno=err.errno,
            ) from None
        with atomic_file(dest, "bandwidth profile") as handle:
            handle.write(data)
        return dest

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> Profile:
        """Read a profile saved by :meth:`save` (default location when ``path`` is None)."""
        src = Path(path) if path is not None else default_profile_path()
        try:
            data = json.loads(src.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no bandwidth profile at {src}: run `tierrt-probe` to measure one") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"bandwidth profile {src} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("links"), list):
            raise ConfigError(f"bandwidth profile {src} has no 'links' list")
        return cls.from_dict(data)

    # -- queries ----------------------------------------------------------------------------------
    def find(self, src: str, dst: str, op: str | None = None) -> list[LinkResult]:
        """Records from ``src`` to ``dst`` (a bare kind such as "nvme" matches every link of it)."""
        return [
            r
            for r in self.links
            if _matches(src, r.src) and _matches(dst, r.dst) and (op is None or r.op == op)
        ]

    def bandwidth(
        self, src: str, dst: str, op: str | None = None, block_size: int | str | None = None
    ) -> float:
        """Best measured GB/s from ``src`` to ``dst``.

        With ``block_size``, only the records whose block size is nearest to it (on a log scale) are
        considered; among the candidates the fastest wins (the queue depth, thread count or memory
        kind the runtime can choose). Raises KeyError when nothing matches.

        >>> p = Profile(links=[LinkResult.measured("nvme:/x", "dram:0", "read", 1 << 30, 0.5,
        ...                                        block_size=1 << 20, queue_depth=32)])
        >>> round(p.bandwidth("nvme", "dram", op="read", block_size="1MiB"), 2)
        2.15
        """
        found = [r for r in self.find(src, dst, op) if r.gbps > 0 and math.isfinite(r.gbps)]
        if not found:
            have = sorted({(r.src, r.dst, r.op) for r in self.links})
            raise KeyError(
                f"no measured link {src} -> {dst}" + (f" ({op})" if op else "") + f"; profile has {have}"
            )
        if block_size is not None:
            want = parse_size(block_size, what="block_size")
            sized = [r for r in found if r.block_size]
            if sized:
                best_dist = min(abs(math.log2(r.block_size / want)) for r in sized)
                found = [r for r in sized if abs(math.log2(r.block_size / want)) <= best_dist + 1e-9]
        return max(r.gbps for r in found)

    # -- output -----------------------------------------------------------------------------------
    def table(self) -> str:
        """The measurements as a text table."""
        headers = ("src", "dst", "op", "block", "QD", "threads", "memory", "GB/s")
        rows = [
            (
                r.src,
                r.dst,
                r.op,
                format_size(r.block_size) if r.block_size else "-",
                str(r.queue_depth) if r.queue_depth else "-",
                str(r.threads) if r.threads else "-",
                (r.memory or "-") + ("" if r.direct in (None, True) else " (cached!)"),
                f"{r.gbps:.2f}",
            )
            for r in self.links
        ]
        widths = [
            max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)
        ]
        right = {3, 4, 5, 7}  # numbers

        def line(cells: Sequence[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        lines = [line(headers), line(["-" * w for w in widths])]
        lines.extend(line(row) for row in rows)
        for what, why in self.skipped.items():
            lines.append(f"skipped {what}: {why}")
        return "\n".join(lines)


def default_profile_path() -> Path:
    """``$XDG_CACHE_HOME/tierrt/profile.json``, or ``~/.cache/tierrt/profile.json``."""
    from .sysinfo import cache_dir

    return cache_dir() / "profile.json"


# --------------------------------------------------------------------------------------------------
# the native pieces


def _make_arena(nbytes: int, node: int | None, name: str) -> tuple[Any, str | None]:
    """An arena of ``nbytes`` bound to ``node`` (None: no binding). Falls back to no binding when the
    kernel refuses (a container without mbind, say); returns (arena, note)."""
    from .arena import HostArena

    attempts: list[dict[str, Any]] = []
    if node is not None:
        attempts.append({"nodes": [node], "policy": "bind"})
    attempts.append({})
    last: Exception | None = None
    for kw in attempts:
        try:
            arena = HostArena(nbytes, lock=False, name=name, **kw)
            note = None if (node is None or kw) else f"not bound to node {node} ({last})"
            return arena, note
        except (TierrtError, OSError, ValueError) as err:
            last = err
            log.debug("arena %s with %s failed: %s", name, kw, err)
    raise last if last else RuntimeError("arena creation failed")


# --------------------------------------------------------------------------------------------------
# measurements


def _numpy() -> Any:
    import numpy

    return numpy


def _median_time(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pin_thread(cpus: Sequence[int]) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)  # 0: the calling thread


def measure_dram(
    mem_node: int | None,
    cpus: Sequence[int],
    nbytes: int,
    thread_counts: Iterable[int],
    repeats: int,
    name: str,
) -> list[LinkResult]:
    """Copy ``nbytes`` between two buffers of an arena bound to ``mem_node``, with each thread count
    (threads pinned to ``cpus``). GB/s counts the bytes copied once."""
    np = _numpy()
    arena, note = _make_arena(2 * nbytes + 2 * _MiB, mem_node, name=f"probe-{name}")
    src = np.frombuffer(arena.alloc(nbytes), dtype=np.uint8)
    dst = np.frombuffer(arena.alloc(nbytes), dtype=np.uint8)
    src[::4096] = 7

    def copy(a: int, b: int) -> None:
        np.copyto(dst[a:b], src[a:b])  # numpy releases the GIL: the threads copy in parallel

    results = []
    for threads in thread_counts:
        bounds = [(nbytes * i // threads) // 4096 * 4096 for i in range(threads)] + [nbytes]
        slices = [(bounds[i], bounds[i + 1]) for i in range(threads)]
        with ThreadPoolExecutor(
            max_workers=threads, initializer=_pin_thread, initargs=(tuple(cpus),)
        ) as pool:

            def once(pool: ThreadPoolExecutor = pool, slices: list[tuple[int, int]] = slices) -> None:
                for fut in [pool.submit(copy, a, b) for a, b in slices]:
                    fut.result()

            seconds = _median_time(once, repeats)
        results.append(
            LinkResult.measured(
                name,
                name,
                "copy",
                nbytes,
                seconds,
                block_size=nbytes,
                queue_depth=1,
                threads=threads,
                memory="arena",
                repeats=repeats,
                note=note,
            )
        )
    if dst[4096] != 7:
        raise RuntimeError("DRAM copy check failed: destination does not hold the source's bytes")
    return results


@dataclass(frozen=True)
class _HostNode:
    """Where a link's host buffers live: ``name`` for the records ("dram:0", or "dram" when the node is
    unknown on a multi-node machine) and ``bind``, the node to bind the arena to (None: no binding,
    which is also what a single-node machine gets)."""

    name: str
    bind: int | None


def _host_node(topo: _topology.Topology, preferred: int | None) -> _HostNode:
    nodes = [n for n in topo.numa_nodes if n.mem_total]
    if len(nodes) <= 1:
        return _HostNode(f"dram:{nodes[0].id}" if nodes else "dram", None)
    if preferred is not None and any(n.id == preferred for n in nodes):
        kind = "cxl" if topo.node(preferred).is_cxl_candidate else "dram"
        return _HostNode(f"{kind}:{preferred}", preferred)
    return _HostNode("dram", None)


class _NvmeTarget:
    """The test file under one ``--path`` and the arena buffer the I/O goes through."""

    def __init__(
        self, directory: Path, size: int, buffer_bytes: int, host: _HostNode, device: str | None
    ) -> None:
        self.directory = directory
        self.size = size
        self.device = device
        self.host = host
        self.path = directory / f"tierrt-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        self.name = f"nvme:{directory}"
        self.dram = host.name
        self.buffer_bytes = buffer_bytes
        self.arena: Any = None
        self.buffer: Any = None
        self.fileset: Any = None
        self.direct: bool | None = None

    def open(self, engine: Any) -> None:
        self.arena, _ = _make_arena(self.buffer_bytes + 2 * _MiB, self.host.bind, name="probe-nvme")
        self.buffer = self.arena.alloc(self.buffer_bytes)
        self.fileset = engine.open([str(self.path)], self.size, create=True, preallocate=True, direct=True)
        self.direct = bool(getattr(self.fileset, "direct", False))
        if not self.direct:
            log.warning("%s does not accept O_DIRECT: NVMe figures go through the page cache", self.directory)
        # Fill the file once, so that reads hit written blocks (unwritten extents read as zeros
        # without touching the device) and later writes overwrite allocated blocks.
        _stream(engine, self.fileset, self.buffer, self.buffer_bytes, self.size, "write", max_seconds=None)

    def close(self) -> None:
        if self.fileset is not None:
            with contextlib.suppress(Exception):
                self.fileset.close(remove=True)
            self.fileset = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.buffer = None
        self.arena = None


def _stream(
    engine: Any, fs: Any, buffer: Any, buffer_bytes: int, size: int, op: str, max_seconds: float | None
) -> tuple[int, float]:
    """Read or write the file front to back through ``buffer``, two requests (halves of the buffer)
    in flight, stopping at the end of the file or after ``max_seconds``. Returns (bytes, seconds)."""
    half = max(4096, buffer_bytes // 2 // 4096 * 4096)
    np = _numpy()
    whole = np.frombuffer(buffer, dtype=np.uint8)
    halves = [whole[:half], whole[half : 2 * half]]
    submit = engine.read if op == "read" else engine.write
    inflight: list[tuple[Any, int]] = []
    offset = done = 0
    t0 = time.perf_counter()
    k = 0
    while offset < size or inflight:
        while offset < size and len(inflight) < 2:
            n = min(half, size - offset)
            inflight.append((submit(fs, offset, halves[k % 2], n), n))
            offset += n
            k += 1
        req, n = inflight.pop(0)
        req.wait()
        done += n
        if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
            offset = size  # stop issuing; drain what is in flight
    return done, time.perf_counter() - t0


def measure_nvme(
    target: _NvmeTarget, engine_cls: Any, backend: str, block_size: int, queue_depth: int, max_seconds: float
) -> list[LinkResult]:
    """Write then read ``target``'s file with requests of ``block_size``, ``queue_depth`` in flight."""
    engine = engine_cls(backend=backend, queue_depth=queue_depth, block_size=block_size)
    fixed = 0
    if hasattr(engine, "register_buffers"):  # io_uring fixed buffers, as the runtime uses the arena
        try:
            fixed = engine.register_buffers([target.buffer])
        except Exception as err:  # noqa: BLE001 - measured without them, and said so
            log.info("io_uring fixed buffers not registered: %s", err)
    note = f"io backend {getattr(engine, 'backend', backend)}" + (", fixed buffers" if fixed else "")
    out = []
    try:
        for op in ("write", "read"):
            nbytes, seconds = _stream(
                engine, target.fileset, target.buffer, target.buffer_bytes, target.size, op, max_seconds
            )
            src, dst = (target.name, target.dram) if op == "read" else (target.dram, target.name)
            out.append(
                LinkResult.measured(
                    src,
                    dst,
                    op,
                    nbytes,
                    seconds,
                    block_size=block_size,
                    queue_depth=queue_depth,
                    memory="arena",
                    direct=target.direct,
                    device=target.device,
                    note=note,
                )
            )
    finally:
        if hasattr(engine, "close"):
            with contextlib.suppress(Exception):
                engine.close()
    return out


def measure_gpu(gpu: _topology.GpuInfo, host_node: _HostNode, nbytes: int, repeats: int) -> list[LinkResult]:
    """H2D and D2H between GPU ``gpu.index`` and (a) an arena on ``host_node`` (the GPU's NUMA node)
    registered with CUDA, (b) torch pinned tensors, (c) pageable memory."""
    import torch

    dev = gpu.index
    node = host_node.bind
    host = host_node.name
    name = f"gpu:{dev}"
    device_buf = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dev}")
    hosts: list[tuple[str, Any, str | None]] = []
    arena = None
    try:
        arena, note = _make_arena(nbytes + 2 * _MiB, node, name="probe-pinned")
        if hasattr(arena, "register_cuda"):
            if arena.register_cuda() is False:
                raise RuntimeError("HostArena.register_cuda() found no CUDA device")
        elif hasattr(arena, "cuda_register"):
            arena.cuda_register()
        else:
            raise RuntimeError("this HostArena cannot register with CUDA")
        hosts.append(("pinned-arena", torch.frombuffer(arena.alloc(nbytes), dtype=torch.uint8), note))
    except Exception as err:  # noqa: BLE001 - report and go on with the other memory kinds
        log.warning("GPU %d: pinned arena unavailable: %s", dev, err)
    hosts.append(("pinned-torch", torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None))
    hosts.append(("pageable", torch.empty(nbytes, dtype=torch.uint8), None))
    out = []
    with torch.cuda.device(dev):
        stream = torch.cuda.Stream()
        for memory, tensor, note in hosts:
            tensor.fill_(3)
            for op, (dst_t, src_t), (src, dst) in (
                ("h2d", (device_buf, tensor), (host, name)),
                ("d2h", (tensor, device_buf), (name, host)),
            ):

                def copy(dst_t: Any = dst_t, src_t: Any = src_t) -> None:
                    with torch.cuda.stream(stream):
                        dst_t.copy_(src_t, non_blocking=True)
                    stream.synchronize()

                seconds = _median_time(copy, repeats)
                out.append(
                    LinkResult.measured(
                        src,
                        dst,
                        op,
                        nbytes,
                        seconds,
                        block_size=nbytes,
                        queue_depth=1,
                        memory=memory,
                        repeats=repeats,
                        note=note,
                    )
                )
    del hosts, device_buf
    if arena is not None:
        for fn in ("unregister_cuda", "cuda_unregister"):
            if hasattr(arena, fn):
                with contextlib.suppress(Exception):
                    getattr(arena, fn)()
                break
    return out


def measure_kvikio(target: _NvmeTarget, gpu: _topology.GpuInfo, max_seconds: float) -> list[LinkResult]:
    """Read the NVMe test file into GPU memory through kvikio (cuFile; compatibility mode without GDS)."""
    import kvikio  # type: ignore[import-not-found]
    import torch

    chunk = min(target.size, 256 * _MiB)
    dev_buf = torch.empty(chunk, dtype=torch.uint8, device=f"cuda:{gpu.index}")
    compat = None
    with contextlib.suppress(Exception):
        compat = kvikio.defaults.compat_mode()
    with kvikio.CuFile(str(target.path), "r") as f:
        f.read(dev_buf, chunk, 0)  # warm-up (opens the driver)
        done = 0
        offset = 0
        t0 = time.perf_counter()
        while offset < target.size:
            n = min(chunk, target.size - offset)
            f.read(dev_buf, n, offset)
            offset += n
            done += n
            if time.perf_counter() - t0 >= max_seconds:
                break
        seconds = time.perf_counter() - t0
    return [
        LinkResult.measured(
            target.name,
            f"gpu:{gpu.index}",
            "read",
            done,
            seconds,
            block_size=chunk,
            queue_depth=1,
            direct=True,
            device=target.device,
            note=f"kvikio {getattr(kvikio, '__version__', '?')}"
            + (f", compat mode {compat}" if compat else ""),
        )
    ]


# --------------------------------------------------------------------------------------------------
# the run


def check_path(path: str | os.PathLike[str], need_bytes: int) -> Path:
    """Validate an NVMe test directory: exists, is a directory, files can be created in it, and it has
    room for ``need_bytes``. Raises :class:`ProbeError` with one clear sentence otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ProbeError(f"--path {p}: no such directory", path=str(p))
    if not p.is_dir():
        raise ProbeError(f"--path {p}: not a directory", path=str(p))
    test = p / f".tierrt-probe-check-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(test, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as err:
        raise ProbeError(f"--path {p}: cannot create files there: {err.strerror}", path=str(p)) from None
    os.close(fd)
    os.unlink(test)
    st = os.statvfs(p)
    free = st.f_bavail * st.f_frsize
    if free < need_bytes + _SPACE_MARGIN:
        raise ProbeError(
            f"--path {p}: not enough free space: the test file needs {format_size(need_bytes)}"
            f" (+{format_size(_SPACE_MARGIN)} margin), {format_size(free)} free; use --size to shrink it",
            path=str(p),
            free=free,
        )
    return p.resolve()


def _fitting_block_sizes(
    block_sizes: list[int], size: int, *, explicit: bool, nvme: bool
) -> tuple[list[int], dict[str, str]]:
    """The NVMe block sizes that fit in the ``size``-byte test file, and what was left out (a
    default block size larger than the file, said in the profile's ``skipped``). A block size the
    caller asked for that is larger than the file raises :class:`ConfigError`: nothing could be
    measured with it."""
    too_large = [b for b in block_sizes if b > size]
    if not nvme or not too_large:
        return block_sizes, {}
    if explicit:
        shown = ", ".join(format_size(b) for b in too_large)
        these = f"block sizes {shown} are" if len(too_large) > 1 else f"block size {shown} is"
        raise ConfigError(
            f"{these} larger than the NVMe test file ({format_size(size)}), so nothing "
            "could be measured with them: give --size of at least "
            f"{format_size(max(too_large), round_up=True)} or "
            "smaller --block-sizes"
        )
    skipped = {
        f"nvme {format_size(b)} blocks": f"larger than the {format_size(size)} test file (--size)"
        for b in too_large
    }
    return [b for b in block_sizes if b <= size], skipped


@dataclass
class _Plan:
    what: str
    run: Callable[[], list[LinkResult]]


def run_probe(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    quick: bool = False,
    *,
    size: int | str | None = None,
    dram_size: int | str | None = None,
    gpu_size: int | str | None = None,
    block_sizes: Sequence[int | str] | None = None,
    queue_depths: Sequence[int] | None = None,
    links: Iterable[str] = ("dram", "nvme", "gpu", "kvikio"),
    backend: str = "auto",
    progress: bool | None = None,
) -> Profile:
    """Measure the machine's links and return a :class:`Profile` (not saved; call ``.save()``).

    ``path``: directory (or directories) for the NVMe test files; default: the cache directory.
    ``quick``: smaller sizes and fewer settings (under 30 s). ``size``: NVMe test file size (default
    1GiB, 256MiB quick). ``dram_size``: bytes per DRAM copy (default 512MiB, 128MiB quick).
    ``links``: which of "dram", "nvme", "gpu", "kvikio" to measure. ``progress``: a progress bar on
    stderr (None: when stderr is a terminal). Raises :class:`ProbeError` for unusable paths.
    """
    from .sysinfo import cache_dir

    wanted = set(links)
    unknown = wanted - {"dram", "nvme", "gpu", "kvikio"}
    if unknown:
        raise ConfigError(f"unknown link kinds {sorted(unknown)}; choose from dram, nvme, gpu, kvikio")
    size_b = parse_size(size if size is not None else ("256MiB" if quick else "1GiB"), what="size")
    dram_b = parse_size(
        dram_size if dram_size is not None else ("128MiB" if quick else "512MiB"), what="dram_size"
    )
    gpu_b = parse_size(
        gpu_size if gpu_size is not None else ("64MiB" if quick else "256MiB"), what="gpu_size"
    )
    if size_b < _MiB or size_b % 4096:
        raise ConfigError(
            f"size: the NVMe test file must be at least 1MiB and a multiple of 4KiB, got {size}"
        )
    if dram_b < 4096:
        raise ConfigError(f"dram_size must be at least 4KiB, got {dram_size}")
    bss = [
        parse_size(b, what="block size")
        for b in (block_sizes or (("128KiB", "1MiB") if quick else ("128KiB", "1MiB", "8MiB")))
    ]
    bss, skipped_sizes = _fitting_block_sizes(bss, size_b, explicit=bool(block_sizes), nvme="nvme" in wanted)
    qds = [int(q) for q in (queue_depths or ((1, 32) if quick else (1, 8, 32)))]
    if any(b < 4096 or b % 4096 for b in bss) or any(q < 1 for q in qds):
        raise ConfigError(f"block sizes must be multiples of 4KiB and queue depths >= 1, got {bss}, {qds}")
    repeats = 3 if quick else 5
    io_seconds = 1.0 if quick else 3.0

    if path is None:
        paths: list[Path] = [cache_dir()]
        if "nvme" in wanted:
            paths[0].mkdir(parents=True, exist_ok=True)
    elif isinstance(path, (str, os.PathLike)):
        paths = [Path(path)]
    else:
        paths = [Path(p) for p in path]
    if "nvme" in wanted:
        paths = [check_path(p, size_b) for p in paths]

    topo = _topology.discover(storage_paths=[str(p) for p in paths] if "nvme" in wanted else ())
    from .io import IOEngine as engine_cls

    profile = Profile(
        links=[],
        topology=topo.summary(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        hostname=platform.node(),
        quick=quick,
        settings={
            "size": size_b,
            "dram_size": dram_b,
            "gpu_size": gpu_b,
            "block_sizes": bss,
            "queue_depths": qds,
            "repeats": repeats,
            "io_seconds_max": io_seconds,
            "paths": [str(p) for p in paths],
            "gbps": "decimal GB/s (1e9 bytes/s); DRAM copy counts bytes copied once",
        },
        features={},
        skipped=skipped_sizes,
    )

    plans: list[_Plan] = []
    cleanup: list[Callable[[], None]] = []

    # DRAM / CXL, per node
    if "dram" in wanted:
        nodes = topo.numa_nodes
        for node in nodes:
            if not node.mem_total:
                continue
            kind = "cxl" if node.is_cxl_candidate else "dram"
            cpu_node = topo.nearest_cpu_node(node.id)
            cpus = node.cpus or (topo.node(cpu_node).cpus if cpu_node is not None else ())
            all_threads = max(1, len(cpus) if cpus else (os.cpu_count() or 1))
            counts = sorted({all_threads, 1}, reverse=True)
            name = f"{kind}:{node.id}"
            mem_node = node.id if len(nodes) > 1 else None
            # two buffers of nbytes: stay within a quarter of what the node has free
            nbytes = min(dram_b, max(4 * _MiB, node.mem_free // 8 // 4096 * 4096))
            plans.append(
                _Plan(
                    f"{name} copy",
                    lambda mem_node=mem_node, cpus=cpus, counts=counts, name=name, nbytes=nbytes: (
                        measure_dram(mem_node, cpus, nbytes, counts, repeats, name)
                    ),
                )
            )

    # NVMe
    targets: list[_NvmeTarget] = []
    engine_box: dict[str, Any] = {}
    if "nvme" in wanted:
        profile.features["io_backend_requested"] = backend
        for p, st in zip(paths, topo.storage, strict=True):
            combos = []
            for bs in bss:
                for qd in qds:
                    buf = min(size_b, max(16 * _MiB, bs * qd))
                    eff_qd = max(1, min(qd, buf // bs))
                    if (bs, eff_qd) not in combos and bs <= size_b:
                        combos.append((bs, eff_qd))
            buffer_bytes = (
                max(min(size_b, max(16 * _MiB, bs * qd)) for bs, qd in combos) if combos else 16 * _MiB
            )
            target = _NvmeTarget(p, size_b, buffer_bytes, _host_node(topo, st.numa_node), st.device)
            targets.append(target)
            cleanup.append(target.close)

            def prepare(target: _NvmeTarget = target) -> list[LinkResult]:
                engine = engine_cls(backend=backend, queue_depth=32, block_size=_MiB)
                engine_box.setdefault("backend", getattr(engine, "backend", backend))
                try:
                    target.open(engine)
                finally:
                    if hasattr(engine, "close"):
                        with contextlib.suppress(Exception):
                            engine.close()
                return []

            plans.append(_Plan(f"{target.name} fill", prepare))
            for bs, qd in combos:
                plans.append(
                    _Plan(
                        f"{target.name} {format_size(bs)} QD{qd}",
                        lambda t=target, bs=bs, qd=qd: (
                            measure_nvme(t, engine_cls, backend, bs, qd, io_seconds)
                            if t.fileset is not None
                            else []
                        ),
                    )
                )

    # GPUs
    gpus = [_topology.GpuInfo(**_gpu_kwargs(g)) for g in profile.topology.get("gpus", [])]
    if "gpu" in wanted or "kvikio" in wanted:
        if not gpus:
            profile.skipped["gpu"] = "no CUDA device (torch.cuda.is_available() is False)"
        elif "gpu" in wanted:
            for g in gpus:
                plans.append(
                    _Plan(
                        f"gpu:{g.index} h2d/d2h",
                        lambda g=g: measure_gpu(g, _host_node(topo, g.numa_node), gpu_b, repeats),
                    )
                )
    if "kvikio" in wanted and gpus and targets:
        try:
            import kvikio  # type: ignore[import-not-found]  # noqa: F401

            for t in targets:
                plans.append(
                    _Plan(
                        f"{t.name} -> gpu:{gpus[0].index} (kvikio)",
                        lambda t=t: measure_kvikio(t, gpus[0], io_seconds) if t.fileset is not None else [],
                    )
                )
        except Exception as err:  # noqa: BLE001 - absent or broken
            profile.skipped["nvme->gpu"] = f"kvikio not importable ({type(err).__name__}: {err})"
    elif "kvikio" in wanted and gpus:
        profile.skipped["nvme->gpu"] = "no NVMe path measured"

    bar = _progress(len(plans), progress)
    try:
        for plan in plans:
            bar.set_postfix_str(plan.what, refresh=True)
            log.info("measuring %s", plan.what)
            try:
                profile.links.extend(plan.run())
            except (KeyboardInterrupt, ProbeError):
                raise
            except Exception as err:  # noqa: BLE001 - one broken link must not lose the others
                log.warning("%s failed: %s", plan.what, err)
                profile.skipped[plan.what] = f"{type(err).__name__}: {err}"
            bar.update(1)
    finally:
        bar.close()
        for fn in cleanup:
            fn()
    profile.io_backend = engine_box.get("backend")
    with contextlib.suppress(Exception):
        profile.features.update(_features(paths[0] if paths else None))
    return profile


def _gpu_kwargs(d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(_topology.GpuInfo)}
    kw = {k: v for k, v in d.items() if k in names}
    if isinstance(kw.get("compute_capability"), list):
        kw["compute_capability"] = tuple(kw["compute_capability"])
    return kw


def _features(path: Path | None) -> dict[str, Any]:
    from .sysinfo import info

    facts = info(path=path, check_engines=True)
    keep = (
        "transparent_hugepages",
        "o_direct",
        "numa_nodes",
        "cuda",
        "io_backends",
        "native_module",
        "mlock_limit",
    )
    return {k: facts[k] for k in keep if k in facts}


class _NoBar:
    def set_postfix_str(self, *_: Any, **__: Any) -> None: ...
    def update(self, *_: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool | None) -> Any:
    if enabled is False:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(
        total=total,
        desc="tierrt-probe",
        unit="link",
        file=sys.stderr,
        disable=None if enabled is None else False,
    )


# --------------------------------------------------------------------------------------------------
# plot


def plot_profile(profile: Profile, dest: str | os.PathLike[str]) -> Path:
    """Draw the profile to a PNG: the best GB/s of every link (horizontal bars coloured by kind), and
    NVMe GB/s against block size (one colour per queue depth; solid read, dashed write). Needs
    matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[tuple[str, str, str, str], LinkResult] = {}
    for r in profile.links:
        if _kind(r.src) == "gpu" or _kind(r.dst) == "gpu":
            variant = r.memory or ""
        else:
            variant = f"{r.threads} thread{'s' if r.threads != 1 else ''}" if r.threads else ""
        key = (r.src, r.dst, r.op, variant)
        if key not in best or r.gbps > best[key].gbps:
            best[key] = r
    nvme = [
        r
        for r in profile.links
        if (_kind(r.src) == "nvme" or _kind(r.dst) == "nvme") and "gpu" not in (_kind(r.src), _kind(r.dst))
    ]
    keys = sorted(best, key=lambda k: (list(_COLORS).index(_group(k)), k), reverse=True)
    ncols = 2 if nvme else 1
    height = max(3.5, 0.38 * len(keys) + 1.5)
    fig, axes = plt.subplots(1, ncols, figsize=(7.5 * ncols, height), squeeze=False)
    ax = axes[0][0]
    labels = []
    for src, dst, op, variant in keys:
        r = best[(src, dst, op, variant)]
        labels.append(f"{_short(src, r)} → {_short(dst, r)}  {op}" + (f" ({variant})" if variant else ""))
    values = [best[k].gbps for k in keys]
    ax.barh(range(len(keys)), values, color=[_COLORS.get(_group(k), "#999999") for k in keys])
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("GB/s (best block size / queue depth)")
    ax.set_title(
        f"tierrt-probe: {profile.hostname or 'this machine'}" + (" (quick)" if profile.quick else "")
    )
    ax.grid(axis="x", alpha=0.3)
    top = max(values, default=1.0)
    ax.set_xlim(0, top * 1.15)
    for i, v in enumerate(values):
        ax.text(v + top * 0.01, i, f"{v:.2f}", va="center", fontsize=7)
    present = [g for g in _COLORS if any(_group(k) == g for k in keys)]
    if present:
        ax.legend(
            [plt.Rectangle((0, 0), 1, 1, color=_COLORS[g]) for g in present],
            present,
            loc="lower right",
            fontsize=8,
        )
    if nvme:
        ax2 = axes[0][1]
        series: dict[tuple[str, str, int], list[LinkResult]] = {}
        for r in nvme:
            where = r.dst if r.op == "write" else r.src
            series.setdefault((where, r.op, r.queue_depth or 1), []).append(r)
        qds = sorted({qd for _, _, qd in series})
        cmap = plt.get_cmap("viridis")
        several = len({w for w, _, _ in series}) > 1
        for (where, op, qd), rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: r.block_size or 0)
            label = f"{op} QD{qd}" + (f" {_short(where, rs[0])}" if several else "")
            ax2.plot(
                [r.block_size for r in rs],
                [r.gbps for r in rs],
                marker="o" if op == "read" else "s",
                linestyle="-" if op == "read" else "--",
                color=cmap(qds.index(qd) / max(1, len(qds) - 1) * 0.85),
                label=label,
            )
        ax2.set_xscale("log", base=2)
        ticks = sorted({r.block_size for r in nvme if r.block_size})
        ax2.set_xticks(ticks)
        ax2.set_xticklabels([format_size(t) for t in ticks])
        ax2.minorticks_off()
        ax2.set_xlabel("block size")
        ax2.set_ylabel("GB/s")
        ax2.set_ylim(bottom=0)
        devices = sorted({r.device for r in nvme if r.device})
        direct = all(r.direct for r in nvme)
        ax2.set_title(
            f"storage {', '.join(devices)} through the IOEngine".replace("  ", " ")
            + (" (O_DIRECT)" if direct else " (page cache NOT bypassed)")
        )
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    out = Path(dest)
    kind = out.suffix.lower().lstrip(".")
    try:  # written whole or not at all; a path that cannot be written raises TierPathError
        with atomic_file(out, "plot") as handle:
            fig.savefig(
                handle, dpi=110, format=kind if kind in fig.canvas.get_supported_filetypes() else "png"
            )
    finally:
        plt.close(fig)
    return out


_COLORS = {"dram": "#4C72B0", "cxl": "#8172B3", "nvme": "#DD8452", "gpu": "#55A868", "other": "#999999"}


def _group(key: tuple[str, str, str, str]) -> str:
    src, dst, _, _ = key
    kinds = {_kind(src), _kind(dst)}
    for k in ("gpu", "nvme", "cxl", "dram"):
        if k in kinds:
            return k
    return "other"


def _short(name: str, r: LinkResult | None = None) -> str:
    if name.startswith("nvme:"):
        if r is not None and r.device:
            return f"nvme:{r.device}"
        p = name[5:]
        return "nvme:" + (p if len(p) <= 18 else "…" + p[-17:])
    return name


# --------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tierrt-probe",
        description="Measure the bandwidth of every link of this machine (DRAM/CXL per NUMA node, NVMe "
        "through the IOEngine with O_DIRECT, host<->GPU, NVMe->GPU) and save a JSON profile.",
    )
    p.add_argument(
        "--path",
        action="append",
        metavar="DIR",
        help="directory for the NVMe test file (repeatable; default: the cache directory)",
    )
    p.add_argument(
        "--json", metavar="PATH", help=f"where to save the profile (default: {default_profile_path()})"
    )
    p.add_argument("--plot", metavar="PNG", help="draw the results to this PNG (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer settings (under 30 s)")
    p.add_argument("--size", help="NVMe test file size, e.g. 4GiB (default 1GiB; 256MiB with --quick)")
    p.add_argument("--dram-size", help="bytes per DRAM copy (default 512MiB; 128MiB with --quick)")
    p.add_argument("--gpu-size", help="bytes per host<->GPU copy (default 256MiB; 64MiB with --quick)")
    p.add_argument("--block-sizes", help="NVMe block sizes, comma separated (default 128KiB,1MiB,8MiB)")
    p.add_argument("--queue-depths", help="NVMe queue depths, comma separated (default 1,8,32)")
    p.add_argument("--links", default="dram,nvme,gpu,kvikio", help="which links to measure (default: all)")
    p.add_argument(
        "--backend", default="auto", choices=("auto", "io_uring", "threads"), help="IOEngine backend"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is measured")
    return p


def _fail(message: str) -> int:
    print(f"tierrt-probe: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tierrt-probe``. Exit status: 0 done, 2 bad input, 130 interrupted."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="tierrt-probe: %(message)s",
        stream=sys.stderr,
    )
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _fail("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    # Outputs are checked before anything is measured; None: the default profile location.
    for flag, output in ([("--plot", args.plot)] if args.plot else []) + [("--json", args.json)]:
        problem = _output_problem(flag, output)
        if problem:
            return _fail(problem)
    links = [x.strip() for x in args.links.split(",") if x.strip()]
    if not links:
        return _fail(f"--links {args.links!r}: name at least one of dram, nvme, gpu, kvikio")
    try:
        queue_depths = [int(q) for q in args.queue_depths.split(",")] if args.queue_depths else None
    except ValueError:
        return _fail(f"--queue-depths {args.queue_depths}: expected whole numbers separated by commas")
    try:
        profile = run_probe(
            path=args.path,
            quick=args.quick,
            size=args.size,
            dram_size=args.dram_size,
            gpu_size=args.gpu_size,
            block_sizes=args.block_sizes.split(",") if args.block_sizes else None,
            queue_depths=queue_depths,
            links=links,
            backend=args.backend,
            progress=False if args.no_progress else None,
        )
    except KeyboardInterrupt:
        print("tierrt-probe: interrupted; test files removed", file=sys.stderr)
        return 130
    except (ProbeError, ConfigError) as err:
        return _fail(str(err))
    print(_header(profile))
    print(profile.table())
    try:  # checked above; a failure now (the disk filled, a remount) is still one line
        dest = profile.save(Path(args.json).expanduser() if args.json else None)
        print(f"\nprofile saved to {dest}")
        if args.plot:
            print(f"plot saved to {plot_profile(profile, Path(args.plot).expanduser())}")
    except TierPathError as err:
        return _fail(str(err))
    return 0


def _output_problem(flag: str, output: str | None) -> str | None:
    """Why the file ``output`` (given by ``flag``; None: the default profile location) cannot be
    written, or None: checked before anything is measured, by creating a file beside it."""
    path = Path(output).expanduser() if output is not None else default_profile_path()
    named = (
        f"{flag} {output}" if output is not None else f"the profile's default location {path} (give --json)"
    )
    if path.is_dir():
        return f"{named}: is a directory; give a file name"
    directory = path.resolve().parent
    if output is not None and not directory.is_dir():
        return f"{named}: its directory does not exist"
    while not directory.exists():  # the default location's directories are made when it is saved
        directory = directory.parent
    test = directory / f".tierrt-probe-check-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.close(os.open(test, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as err:
        return f"{named}: cannot write in {directory}: {err.strerror} (errno {err.errno})"
    os.unlink(test)
    return None


def _header(profile: Profile) -> str:
    topo = profile.topology
    nodes = topo.get("numa_nodes", [])
    parts = [
        f"tierrt {profile.tierrt_version}",
        f"{topo.get('cpu_count', '?')} CPUs",
        f"{len(nodes)} NUMA node(s)"
        + (
            f" ({sum(1 for n in nodes if n.get('is_cxl_candidate'))} CPU-less)"
            if any(n.get("is_cxl_candidate") for n in nodes)
            else ""
        ),
        f"{len(topo.get('gpus', []))} GPU(s)",
        f"io backend: {profile.io_backend or '-'}",
    ]
    return " | ".join(parts) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
