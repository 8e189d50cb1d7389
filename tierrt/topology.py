"""What the machine has: NUMA nodes, GPUs, and the storage under a path.

Everything is read from sysfs and procfs under a ``root`` prefix (``root/sys/...``, ``root/proc/...``),
so the same code describes this machine (``root="/"``) or a recorded tree (the test fixtures under
``tests/fixtures/sysfs/``; see :func:`record_fixture`). Facts that only the live machine can give
come from it alone: free space (``os.statvfs``), whether ``O_DIRECT`` works, and the GPUs that CUDA
sees (torch, then nvidia-ml-py). For a recorded tree, GPUs are read from its PCI devices instead.

Example::

    >>> from tierrt import topology
    >>> topo = topology.discover(storage_paths=["/tmp"])
    >>> [n.id for n in topo.numa_nodes]
    [0]
    >>> topo.gpus                      # no GPU here: an empty list, no exception, no warning
    []
    >>> topo.storage[0].filesystem
    'ext4'
    >>> print(topo.describe())          # doctest: +SKIP

Run ``python -m tierrt.topology [PATH ...]`` to print a description, or
``python -m tierrt.topology --record DEST [PATH ...]`` to record this machine's relevant sysfs files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as _errno
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .sizes import format_size

__all__ = [
    "NumaNode",
    "GpuInfo",
    "StorageInfo",
    "Topology",
    "discover",
    "storage_info",
    "numa_nodes",
    "gpus",
    "parse_cpulist",
    "record_fixture",
]

log = logging.getLogger("tierrt.topology")

_NODE_DIR = "sys/devices/system/node"
_CPU_DIR = "sys/devices/system/cpu"
_BLOCK_DIR = "sys/block"
_PCI_DIR = "sys/bus/pci/devices"
_NVIDIA_VENDOR = "0x10de"


# --------------------------------------------------------------------------------------------------
# dataclasses


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node.

    ``distances`` is the node's row of the SLIT distance table, indexed by node id order as the kernel
    prints it (``distance_to()`` looks one up by id). A node with memory and no CPUs is flagged as a
    CXL candidate: that is how CXL memory expanders (and other CPU-less memory, such as HBM or
    persistent memory in memory mode) appear to the OS.
    """

    id: int
    cpus: tuple[int, ...]
    mem_total: int
    mem_free: int
    distances: tuple[int, ...]
    is_cxl_candidate: bool
    #: Node ids the ``distances`` row refers to (same order).
    distance_ids: tuple[int, ...] = ()

    def distance_to(self, other: int) -> int | None:
        """The SLIT distance from this node to node ``other`` (10 = local), or None if unknown."""
        ids = self.distance_ids or tuple(range(len(self.distances)))
        try:
            return self.distances[ids.index(other)]
        except ValueError:
            return None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as CUDA numbers it.

    ``pcie_gen``/``pcie_width`` are the fastest link the slot can train to (NVML's system maximum, or
    sysfs ``max_link_speed``/``max_link_width``); ``pcie_gen_current``/``pcie_width_current`` are what
    the link runs at right now (an idle GPU often drops to gen 1). ``numa_node`` is the node the GPU's
    PCIe root is attached to (None when the platform does not say).
    """

    index: int
    name: str
    memory_total: int | None
    pcie_gen: int | None
    pcie_width: int | None
    numa_node: int | None
    pci_bus_id: str | None = None
    pcie_gen_current: int | None = None
    pcie_width_current: int | None = None
    compute_capability: tuple[int, int] | None = None
    source: str = "torch"

    @property
    def pcie_peak_gbps(self) -> float | None:
        """Theoretical one-direction PCIe bandwidth in GB/s (after line encoding), or None."""
        return pcie_bandwidth_gbps(self.pcie_gen, self.pcie_width)


@dataclass(frozen=True)
class StorageInfo:
    """The storage under a path: its mount, filesystem, block device and the device's properties.

    ``device`` is the block device the filesystem sits on as the kernel names it (``"nvme0n1p2"``,
    ``"dm-0"``, ``"loop3"``, ``"vda"``); ``disk`` the whole disk holding it (``"nvme0n1"``). For stacked
    devices (device-mapper, md RAID, loop) ``underlying`` names the disks below, and ``model`` and
    ``is_nvme`` are taken from them. Fields are None when they do not apply (tmpfs has no device)
    or cannot be read. ``free_bytes``/``total_bytes``/``supports_direct_io`` are measured on the live
    path, so they are None for a recorded ``root``.
    """

    path: str
    mount_point: str | None
    filesystem: str | None
    source: str | None
    device: str | None
    disk: str | None
    model: str | None
    rotational: bool | None
    logical_block_size: int | None
    physical_block_size: int | None
    free_bytes: int | None
    total_bytes: int | None
    is_nvme: bool
    supports_direct_io: bool | None
    underlying: tuple[str, ...] = ()
    numa_node: int | None = None
    backing_file: str | None = None


@dataclass(frozen=True)
class Topology:
    """The whole machine: NUMA nodes, GPUs, CPUs, memory and the storage asked about."""

    numa_nodes: tuple[NumaNode, ...]
    gpus: list[GpuInfo]
    cpu_count: int
    memory_total: int
    memory_available: int
    storage: tuple[StorageInfo, ...] = ()
    cpu_model: str | None = None
    transparent_hugepages: str | None = None
    root: str = "/"

    # -- queries ---------------------------------------------------------------------------------
    @property
    def cpu_nodes(self) -> tuple[NumaNode, ...]:
        """Nodes that have CPUs."""
        return tuple(n for n in self.numa_nodes if n.cpus)

    @property
    def cxl_nodes(self) -> tuple[NumaNode, ...]:
        """CPU-less memory nodes (CXL candidates)."""
        return tuple(n for n in self.numa_nodes if n.is_cxl_candidate)

    def node(self, node_id: int) -> NumaNode:
        """The node with id ``node_id`` (KeyError if there is none)."""
        for n in self.numa_nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"no NUMA node {node_id}; nodes are {[n.id for n in self.numa_nodes]}")

    def nearest_cpu_node(self, node_id: int) -> int | None:
        """The CPU node closest to ``node_id`` by SLIT distance (itself when it has CPUs)."""
        node = self.node(node_id)
        if node.cpus:
            return node.id
        best: tuple[int, int] | None = None
        for other in self.cpu_nodes:
            d = node.distance_to(other.id)
            if d is not None and (best is None or d < best[0]):
                best = (d, other.id)
        return best[1] if best else None

    # -- output ----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable dict of everything known (sizes in bytes)."""
        return _jsonable(dataclasses.asdict(self))

    def describe(self) -> str:
        """A readable multi-line description."""
        lines = [
            f"CPUs: {self.cpu_count}" + (f" ({self.cpu_model})" if self.cpu_model else ""),
            f"Memory: {format_size(self.memory_total)} total, {format_size(self.memory_available)} available"
            + (
                f"; transparent hugepages: {self.transparent_hugepages}" if self.transparent_hugepages else ""
            ),
            f"NUMA nodes: {len(self.numa_nodes)}",
        ]
        for n in self.numa_nodes:
            kind = (
                "CXL candidate (CPU-less memory)" if n.is_cxl_candidate else f"CPUs {format_cpulist(n.cpus)}"
            )
            if not n.cpus and not n.mem_total:
                kind = "empty"
            lines.append(
                f"  node {n.id}: {kind}; {format_size(n.mem_total)} memory, {format_size(n.mem_free)} free;"
                f" distances {' '.join(map(str, n.distances))}"
            )
        if self.gpus:
            lines.append(f"GPUs: {len(self.gpus)}")
            for g in self.gpus:
                parts = [g.name]
                if g.memory_total:
                    parts.append(format_size(g.memory_total))
                if g.pcie_gen or g.pcie_width:
                    link = f"PCIe gen{g.pcie_gen or '?'} x{g.pcie_width or '?'}"
                    if g.pcie_gen_current and g.pcie_gen_current != g.pcie_gen:
                        link += f" (now gen{g.pcie_gen_current} x{g.pcie_width_current or '?'})"
                    parts.append(link)
                parts.append(f"NUMA node {g.numa_node if g.numa_node is not None else '?'}")
                if g.pci_bus_id:
                    parts.append(g.pci_bus_id)
                lines.append(f"  cuda:{g.index}: " + ", ".join(parts))
        else:
            lines.append("GPUs: none")
        for s in self.storage:
            lines.append(f"Storage {s.path}:")
            lines.append("  " + _describe_storage(s))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def _describe_storage(s: StorageInfo) -> str:
    parts = [f"mounted at {s.mount_point} ({s.filesystem or '?'}"]
    if s.source:
        parts[0] += f" on {s.source}"
    parts[0] += ")"
    if s.device:
        dev = s.device if s.disk in (None, s.device) else f"{s.device} on {s.disk}"
        if s.underlying:
            dev += f" over {', '.join(s.underlying)}"
        kind = "NVMe" if s.is_nvme else ("rotational" if s.rotational else "non-rotational")
        parts.append(f"device {dev} [{kind}]" + (f" model {s.model!r}" if s.model else ""))
        if s.logical_block_size:
            parts.append(f"logical/physical block {s.logical_block_size}/{s.physical_block_size}")
        if s.numa_node is not None:
            parts.append(f"NUMA node {s.numa_node}")
    if s.free_bytes is not None and s.total_bytes is not None:
        parts.append(f"{format_size(s.free_bytes)} free of {format_size(s.total_bytes)}")
    if s.supports_direct_io is not None:
        parts.append("O_DIRECT " + ("works" if s.supports_direct_io else "NOT supported"))
    return "; ".join(parts)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# small readers


def _p(root: str, rel: str) -> str:
    return os.path.join(root, rel.lstrip("/"))


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse a kernel CPU list such as ``"0-3,8-11"`` or ``"0-31:2"`` (stride) into ids.

    >>> parse_cpulist("0-3,8,10-11")
    (0, 1, 2, 3, 8, 10, 11)
    >>> parse_cpulist("")
    ()
    """
    cpus: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        stride = 1
        if ":" in part:
            part, s = part.split(":", 1)
            stride = int(s.split("/")[0])
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.extend(range(int(lo), int(hi) + 1, stride))
        else:
            cpus.append(int(part))
    return tuple(sorted(set(cpus)))


def format_cpulist(cpus: Sequence[int]) -> str:
    """The inverse of :func:`parse_cpulist`: ``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out) or "-"


def _parse_meminfo(text: str | None) -> dict[str, int]:
    """``/proc/meminfo`` or a node's ``meminfo`` -> {"MemTotal": bytes, ...}."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        m = re.match(r"^(?:Node\s+\d+\s+)?([A-Za-z0-9_()]+):\s+(\d+)\s*(kB)?", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if m.group(3) else 1)
    return out


# --------------------------------------------------------------------------------------------------
# NUMA


def numa_nodes(root: str = "/") -> tuple[NumaNode, ...]:
    """The NUMA nodes under ``root``. A kernel without NUMA gives one node 0 holding everything."""
    base = _p(root, _NODE_DIR)
    ids = sorted(int(d[4:]) for d in _listdir(base) if re.fullmatch(r"node\d+", d))
    nodes: list[NumaNode] = []
    for nid in ids:
        d = os.path.join(base, f"node{nid}")
        cpus = parse_cpulist(_read(os.path.join(d, "cpulist")) or "")
        mem = _parse_meminfo(_read(os.path.join(d, "meminfo")))
        dist_text = _read(os.path.join(d, "distance")) or ""
        distances = tuple(int(x) for x in dist_text.split())
        nodes.append(
            NumaNode(
                id=nid,
                cpus=cpus,
                mem_total=mem.get("MemTotal", 0),
                mem_free=mem.get("MemFree", 0),
                distances=distances,
                is_cxl_candidate=not cpus and mem.get("MemTotal", 0) > 0,
                distance_ids=tuple(ids) if len(distances) == len(ids) else (),
            )
        )
    if nodes:
        return tuple(nodes)
    # No NUMA in this kernel (or no sysfs): one node with every CPU and all memory.
    mem = _parse_meminfo(_read(_p(root, "proc/meminfo")))
    cpus = _cpus_online(root)
    return (
        NumaNode(
            id=0,
            cpus=cpus,
            mem_total=mem.get("MemTotal", 0),
            mem_free=mem.get("MemFree", 0),
            distances=(10,),
            is_cxl_candidate=False,
            distance_ids=(0,),
        ),
    )


def _cpus_online(root: str) -> tuple[int, ...]:
    text = _read(_p(root, f"{_CPU_DIR}/online"))
    if text:
        return parse_cpulist(text)
    if _is_live(root):
        return tuple(range(os.cpu_count() or 1))
    return ()


def _is_live(root: str) -> bool:
    return os.path.realpath(root) == "/"


def _cpu_model(root: str) -> str | None:
    text = _read(_p(root, "proc/cpuinfo")) or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model"):
            return value.strip() or None
    return None


def _thp_mode(root: str) -> str | None:
    text = _read(_p(root, "sys/kernel/mm/transparent_hugepage/enabled"))
    if not text:
        return None
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else text


# --------------------------------------------------------------------------------------------------
# GPUs

_GT_TO_GEN = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6, 128.0: 7}
# Usable GB/s per lane after line encoding (8b/10b for gen 1-2, 128b/130b for gen 3+; gen6 FLIT ~ same).
_GEN_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563, 7: 15.125}


def pcie_bandwidth_gbps(gen: int | None, width: int | None) -> float | None:
    """Theoretical one-direction PCIe bandwidth in GB/s: ``pcie_bandwidth_gbps(4, 16)`` ~= 31.5."""
    if not gen or not width or gen not in _GEN_LANE_GBPS:
        return None
    return _GEN_LANE_GBPS[gen] * width


def _speed_to_gen(text: str | None) -> int | None:
    """sysfs ``current_link_speed`` ("16.0 GT/s PCIe", "8 GT/s") -> PCIe generation."""
    if not text:
        return None
    m = re.search(r"([\d.]+)\s*GT/s", text)
    if not m:
        return None
    return _GT_TO_GEN.get(float(m.group(1)))


def _pci_facts(root: str, bdf: str | None) -> dict[str, Any]:
    """NUMA node and link facts of a PCI device from sysfs (empty when unknown)."""
    if not bdf:
        return {}
    d = _p(root, f"{_PCI_DIR}/{bdf.lower()}")
    if not os.path.isdir(d):
        return {}
    numa = _read_int(os.path.join(d, "numa_node"))
    return {
        "numa_node": numa if numa is not None and numa >= 0 else None,
        "pcie_gen": _speed_to_gen(_read(os.path.join(d, "max_link_speed"))),
        "pcie_width": _read_int(os.path.join(d, "max_link_width")),
        "pcie_gen_current": _speed_to_gen(_read(os.path.join(d, "current_link_speed"))),
        "pcie_width_current": _read_int(os.path.join(d, "current_link_width")),
    }


def _normal_bdf(bus_id: str | None) -> str | None:
    """NVML's "00000000:17:00.0" or torch's parts -> sysfs's "0000:17:00.0"."""
    if not bus_id:
        return None
    m = re.fullmatch(r"(?:([0-9a-fA-F]+):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])", bus_id.strip())
    if not m:
        return None
    dom = int(m.group(1) or "0", 16)
    return f"{dom:04x}:{int(m.group(2), 16):02x}:{int(m.group(3), 16):02x}.{m.group(4)}"


def _nvml_facts() -> dict[str, dict[str, Any]]:
    """Per PCI bus id: NVML's name, memory, PCIe and NUMA facts. Empty when NVML is unavailable."""
    try:
        import pynvml  # type: ignore[import-not-found]  # from the nvidia-ml-py package
    except Exception:  # noqa: BLE001 - absent or broken: no NVML facts
        return {}
    try:
        pynvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 - no driver on this machine
        log.debug("NVML unavailable: %s", err)
        return {}
    out: dict[str, dict[str, Any]] = {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            facts: dict[str, Any] = {}

            def get(key: str, fn: Any, *args: Any, facts: dict[str, Any] = facts) -> None:
                try:
                    facts[key] = fn(*args)
                except Exception:  # noqa: BLE001 - optional per-device facts
                    pass

            get("bus", lambda h=h: pynvml.nvmlDeviceGetPciInfo(h).busId)
            get("name", pynvml.nvmlDeviceGetName, h)
            get("memory_total", lambda h=h: int(pynvml.nvmlDeviceGetMemoryInfo(h).total))
            get("pcie_gen", pynvml.nvmlDeviceGetMaxPcieLinkGeneration, h)
            get("pcie_width", pynvml.nvmlDeviceGetMaxPcieLinkWidth, h)
            get("pcie_gen_current", pynvml.nvmlDeviceGetCurrPcieLinkGeneration, h)
            get("pcie_width_current", pynvml.nvmlDeviceGetCurrPcieLinkWidth, h)
            if hasattr(pynvml, "nvmlDeviceGetNumaNodeId"):
                get("numa_node", pynvml.nvmlDeviceGetNumaNodeId, h)
            bus = facts.pop("bus", None)
            if isinstance(bus, bytes):
                bus = bus.decode()
            if isinstance(facts.get("name"), bytes):
                facts["name"] = facts["name"].decode()
            if facts.get("numa_node") is not None and facts["numa_node"] < 0:
                facts["numa_node"] = None
            bdf = _normal_bdf(bus)
            out[bdf or f"nvml{i}"] = facts
    except Exception as err:  # noqa: BLE001
        log.debug("NVML query failed: %s", err)
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return out


def _torch_gpus() -> list[tuple[int, str, int, str | None, tuple[int, int]]]:
    """(index, name, memory, bdf, capability) per CUDA device torch sees; [] without CUDA."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - torch absent or broken
        return []
    try:
        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            bdf = None
            if hasattr(p, "pci_bus_id") and hasattr(p, "pci_device_id"):
                dom = getattr(p, "pci_domain_id", 0)
                bdf = f"{dom:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
            out.append((i, p.name, int(p.total_memory), bdf, (p.major, p.minor)))
        return out
    except Exception as err:  # noqa: BLE001
        log.debug("torch.cuda query failed: %s", err)
        return []


def _sysfs_gpus(root: str) -> list[GpuInfo]:
    """NVIDIA display/3D controllers in a (recorded) PCI tree, in bus order (CUDA's PCI_BUS_ID order)."""
    out: list[GpuInfo] = []
    base = _p(root, _PCI_DIR)
    for bdf in _listdir(base):
        d = os.path.join(base, bdf)
        if (_read(os.path.join(d, "vendor")) or "").lower() != _NVIDIA_VENDOR:
            continue
        cls = _read_int(os.path.join(d, "class"))
        if cls is None or (cls >> 16) != 0x03:  # display controller (VGA 0x0300, 3D 0x0302)
            continue
        facts = _pci_facts(root, bdf)
        label = _read(os.path.join(d, "label"))
        device_id = _read(os.path.join(d, "device")) or "?"
        out.append(
            GpuInfo(
                index=len(out),
                name=label or f"NVIDIA GPU {device_id}",
                memory_total=None,
                pci_bus_id=bdf,
                source="sysfs",
                **facts,
            )
        )
    return out


def gpus(root: str = "/") -> list[GpuInfo]:
    """The GPUs: from torch.cuda (and nvidia-ml-py when importable) on the live machine, from the PCI
    tree for a recorded ``root``. No GPU (or no CUDA) gives ``[]`` quietly."""
    if not _is_live(root):
        return _sysfs_gpus(root)
    torch_gpus = _torch_gpus()
    nvml = _nvml_facts() if torch_gpus or _has_nvidia_pci(root) else {}
    result: list[GpuInfo] = []
    if torch_gpus:
        for index, name, mem, bdf, cc in torch_gpus:
            facts = {**_pci_facts(root, bdf)}
            for k, v in nvml.get(bdf or "", {}).items():
                if v is not None and k not in ("name", "memory_total"):
                    facts[k] = v
            result.append(
                GpuInfo(
                    index=index,
                    name=name,
                    memory_total=mem,
                    pci_bus_id=bdf,
                    compute_capability=cc,
                    source="torch+nvml" if nvml else "torch",
                    **{k: facts.get(k) for k in _LINK_KEYS},
                )
            )
        return result
    # No CUDA through torch (a CPU build, say) but NVML works: list what NVML sees.
    for i, (bdf, f) in enumerate(sorted(nvml.items())):
        facts = {**_pci_facts(root, bdf), **{k: v for k, v in f.items() if v is not None}}
        result.append(
            GpuInfo(
                index=i,
                name=str(facts.get("name", "NVIDIA GPU")),
                memory_total=facts.get("memory_total"),
                pci_bus_id=bdf if not bdf.startswith("nvml") else None,
                source="nvml",
                **{k: facts.get(k) for k in _LINK_KEYS},
            )
        )
    return result


_LINK_KEYS = ("pcie_gen", "pcie_width", "numa_node", "pcie_gen_current", "pcie_width_current")


def _has_nvidia_pci(root: str) -> bool:
    base = _p(root, _PCI_DIR)
    return any(
        (_read(os.path.join(base, d, "vendor")) or "").lower() == _NVIDIA_VENDOR for d in _listdir(base)
    )


# --------------------------------------------------------------------------------------------------
# storage


@dataclass(frozen=True)
class _Mount:
    major: int
    minor: int
    mount_point: str
    fstype: str
    source: str


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _mounts(root: str) -> list[_Mount]:
    """Mounts from ``proc/self/mountinfo`` (or ``proc/mounts`` without device numbers)."""
    text = _read(_p(root, "proc/self/mountinfo"))
    out: list[_Mount] = []
    if text:
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 7 or "-" not in fields[6:]:
                continue
            sep = fields.index("-", 6)
            major, _, minor = fields[2].partition(":")
            out.append(
                _Mount(
                    major=int(major),
                    minor=int(minor or 0),
                    mount_point=_unescape(fields[4]),
                    fstype=fields[sep + 1] if len(fields) > sep + 1 else "?",
                    source=_unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
                )
            )
        return out
    for line in (_read(_p(root, "proc/mounts")) or "").splitlines():
        fields = line.split()
        if len(fields) >= 3:
            out.append(_Mount(-1, -1, _unescape(fields[1]), fields[2], _unescape(fields[0])))
    return out


def _find_mount(mounts: list[_Mount], path: str) -> _Mount | None:
    """The mount holding ``path``: the longest mount point that prefixes it; the last one on ties
    (a later mount on the same point hides the earlier)."""
    best: _Mount | None = None
    for m in mounts:
        mp = m.mount_point.rstrip("/") or "/"
        if (path == mp or mp == "/" or path.startswith(mp + "/")) and (
            best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/")
        ):
            best = m
    return best


@dataclass(frozen=True)
class _BlockDev:
    name: str  # as in /sys/block or a partition under it
    disk: str  # the whole disk
    sysdir: str  # its sysfs directory


def _block_devices(root: str) -> tuple[dict[str, _BlockDev], dict[str, _BlockDev]]:
    """Block devices by "major:minor" and by name, disks and their partitions."""
    by_dev: dict[str, _BlockDev] = {}
    by_name: dict[str, _BlockDev] = {}
    base = _p(root, _BLOCK_DIR)
    for disk in _listdir(base):
        ddir = os.path.join(base, disk)
        entry = _BlockDev(disk, disk, ddir)
        by_name[disk] = entry
        dev = _read(os.path.join(ddir, "dev"))
        if dev:
            by_dev[dev] = entry
        for sub in _listdir(ddir):
            sdir = os.path.join(ddir, sub)
            if os.path.isfile(os.path.join(sdir, "partition")):
                part = _BlockDev(sub, disk, sdir)
                by_name[sub] = part
                pdev = _read(os.path.join(sdir, "dev"))
                if pdev:
                    by_dev[pdev] = part
    return by_dev, by_name


def _device_numa_node(disk_dir: str) -> int | None:
    for rel in ("device/numa_node", "device/device/numa_node"):
        n = _read_int(os.path.join(disk_dir, rel))
        if n is not None:
            return n if n >= 0 else None
    return None


def _resolve_source(root: str, source: str, by_name: dict[str, _BlockDev]) -> _BlockDev | None:
    """A mount source such as "/dev/nvme0n1p2" or "/dev/mapper/vg-root" -> its block device."""
    if not source.startswith("/dev/"):
        return None
    name = os.path.basename(source)
    if name in by_name:
        return by_name[name]
    if source.startswith("/dev/mapper/"):
        for dev in by_name.values():
            if dev.name.startswith("dm-") and _read(os.path.join(dev.sysdir, "dm/name")) == name:
                return dev
    if _is_live(root):
        with contextlib.suppress(OSError):
            real = os.path.basename(os.path.realpath(source))
            return by_name.get(real)
    return None


def _live_anchor(path: str) -> str | None:
    """The nearest existing ancestor of ``path`` (itself if it exists), symlinks resolved."""
    p = os.path.abspath(path)
    while True:
        if os.path.exists(p):
            return os.path.realpath(p)
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def probe_direct_io(directory: str) -> bool | None:
    """True when a file in ``directory`` can be opened with ``O_DIRECT``; False when the filesystem
    refuses it (EINVAL); None when it cannot be tried (no such directory, not writable). The test file
    is removed before returning."""
    if not hasattr(os, "O_DIRECT") or not os.path.isdir(directory):
        return None
    name = os.path.join(directory, f".tierrt-odirect-{uuid.uuid4().hex[:12]}")
    try:
        try:
            fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_DIRECT, 0o600)
        except OSError as err:
            return False if err.errno == _errno.EINVAL else None
        os.close(fd)
        return True
    finally:  # also when a signal (Ctrl-C) lands between the open and here
        with contextlib.suppress(OSError):
            os.unlink(name)


def storage_info(
    path: str | os.PathLike[str], root: str = "/", *, check_direct_io: bool = True
) -> StorageInfo:
    """The storage holding ``path``: mount, filesystem, block device (through partitions,
    device-mapper, md and loop devices), model, rotational, block sizes, and, on the live machine,
    free space and whether ``O_DIRECT`` works there.

    ``path`` need not exist yet (a tier's directory about to be created): its nearest existing
    ancestor is used on the live machine. With a recorded ``root``, ``path`` is a path on the recorded
    machine, resolved against its mount table only.

    >>> storage_info("/tmp").filesystem  # doctest: +SKIP
    'ext4'
    """
    path = os.fspath(path)
    live = _is_live(root)
    anchor = _live_anchor(path) if live else None
    lookup = anchor or os.path.normpath(os.path.join("/", path))
    free = total = None
    direct = None
    if anchor is not None:
        with contextlib.suppress(OSError):
            st = os.statvfs(anchor)
            free = st.f_bavail * st.f_frsize
            total = st.f_blocks * st.f_frsize
        if check_direct_io:
            directory = anchor if os.path.isdir(anchor) else os.path.dirname(anchor)
            direct = probe_direct_io(directory)
    mount = _find_mount(_mounts(root), lookup)
    info = _device_info(root, mount, depth=0)
    return StorageInfo(
        path=path,
        mount_point=mount.mount_point if mount else None,
        filesystem=mount.fstype if mount else None,
        source=mount.source if mount else None,
        free_bytes=free,
        total_bytes=total,
        supports_direct_io=direct,
        **info,
    )


def _device_info(root: str, mount: _Mount | None, depth: int) -> dict[str, Any]:
    empty: dict[str, Any] = {
        "device": None,
        "disk": None,
        "model": None,
        "rotational": None,
        "logical_block_size": None,
        "physical_block_size": None,
        "is_nvme": False,
        "underlying": (),
        "numa_node": None,
        "backing_file": None,
    }
    if mount is None:
        return empty
    by_dev, by_name = _block_devices(root)
    dev = by_dev.get(f"{mount.major}:{mount.minor}") if mount.major > 0 else None
    if dev is None:
        dev = _resolve_source(root, mount.source, by_name)
    if dev is None:
        return empty
    disk_dir = by_name[dev.disk].sysdir
    queue = os.path.join(disk_dir, "queue")
    rot = _read_int(os.path.join(queue, "rotational"))
    model = _read(os.path.join(disk_dir, "device/model"))
    underlying: list[str] = []
    backing = None
    # Stacked devices: device-mapper and md list their members under slaves/; a loop device has a
    # backing file whose own storage is looked up in turn.
    for slave in _listdir(os.path.join(disk_dir, "slaves")):
        member = by_name.get(slave)
        underlying.append(member.disk if member else slave)
    if not underlying and os.path.isdir(os.path.join(disk_dir, "loop")):
        backing = _read(os.path.join(disk_dir, "loop/backing_file"))
        if backing and depth < 4:
            below = _device_info(root, _find_mount(_mounts(root), backing), depth + 1)
            if below["disk"]:
                underlying.extend(below["underlying"] or (below["disk"],))
    underlying = list(dict.fromkeys(underlying))
    is_nvme = dev.disk.startswith("nvme")
    numa = _device_numa_node(disk_dir)
    if underlying:
        members = [by_name[u] for u in underlying if u in by_name]
        if model is None:
            models = [_read(os.path.join(m.sysdir, "device/model")) for m in members]
            model = next((m for m in models if m), None)
        if members and not is_nvme:
            is_nvme = all(m.disk.startswith("nvme") for m in members)
        if numa is None and members:
            nodes = {_device_numa_node(m.sysdir) for m in members}
            numa = nodes.pop() if len(nodes) == 1 else None
    return {
        "device": dev.name,
        "disk": dev.disk,
        "model": model or None,
        "rotational": None if rot is None else bool(rot),
        "logical_block_size": _read_int(os.path.join(queue, "logical_block_size")),
        "physical_block_size": _read_int(os.path.join(queue, "physical_block_size")),
        "is_nvme": is_nvme,
        "underlying": tuple(underlying),
        "numa_node": numa,
        "backing_file": backing,
    }


# --------------------------------------------------------------------------------------------------
# the whole machine


def discover(
    root: str = "/",
    storage_paths: Iterable[str | os.PathLike[str]] = (),
    gpu: bool = True,
) -> Topology:
    """Describe the machine under ``root``: NUMA nodes, GPUs (when ``gpu``), CPUs, memory, and the
    storage under each of ``storage_paths``.

    >>> topo = discover()
    >>> topo.cpu_count >= 1
    True
    """
    root = os.fspath(root)
    nodes = numa_nodes(root)
    mem = _parse_meminfo(_read(_p(root, "proc/meminfo")))
    cpus = _cpus_online(root)
    cpu_count = len(cpus) or sum(len(n.cpus) for n in nodes)
    mem_total = mem.get("MemTotal") or sum(n.mem_total for n in nodes)
    mem_avail = mem.get("MemAvailable", mem.get("MemFree", 0))
    return Topology(
        numa_nodes=nodes,
        gpus=gpus(root) if gpu else [],
        cpu_count=cpu_count,
        memory_total=mem_total,
        memory_available=mem_avail,
        storage=tuple(storage_info(p, root) for p in storage_paths),
        cpu_model=_cpu_model(root),
        transparent_hugepages=_thp_mode(root),
        root=root,
    )


# --------------------------------------------------------------------------------------------------
# recording a fixture

_NODE_FILES = ("cpulist", "meminfo", "distance")
_QUEUE_FILES = ("rotational", "logical_block_size", "physical_block_size", "max_sectors_kb")
_PCI_FILES = (
    "vendor",
    "device",
    "class",
    "numa_node",
    "label",
    "current_link_speed",
    "current_link_width",
    "max_link_speed",
    "max_link_width",
)


def record_fixture(
    dest: str | os.PathLike[str], root: str = "/", storage_paths: Iterable[str] = ("/",)
) -> list[str]:
    """Copy the few sysfs/procfs files :func:`discover` reads from ``root`` into ``dest`` (text files
    only, no symlinks), for use as a recorded tree in tests. Mounts are kept only for the mount points
    holding ``storage_paths``, and block devices only for those mounts. Returns the files written.

    Example: ``python -m tierrt.topology --record tests/fixtures/sysfs/this_machine /tmp``.
    """
    dest = os.fspath(dest)
    written: list[str] = []

    def copy_text(rel: str, text: str | None = None) -> None:
        if text is None:
            text = _read(_p(root, rel))
        if text is None:
            return
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        written.append(rel)

    for rel in ("possible", "online", "has_cpu", "has_memory"):
        copy_text(f"{_NODE_DIR}/{rel}")
    for d in _listdir(_p(root, _NODE_DIR)):
        if re.fullmatch(r"node\d+", d):
            for f in _NODE_FILES:
                copy_text(f"{_NODE_DIR}/{d}/{f}")
    copy_text(f"{_CPU_DIR}/online")
    copy_text(f"{_CPU_DIR}/possible")
    copy_text("proc/meminfo")
    copy_text("sys/kernel/mm/transparent_hugepage/enabled")
    cpuinfo = _read(_p(root, "proc/cpuinfo"))
    if cpuinfo:  # the first processor's block is enough
        copy_text("proc/cpuinfo", cpuinfo.split("\n\n")[0])

    # mounts and the block devices under them
    mounts = _mounts(root)
    keep: list[_Mount] = []
    for sp in storage_paths:
        anchor = _live_anchor(os.fspath(sp)) if _is_live(root) else os.fspath(sp)
        m = _find_mount(mounts, anchor or os.fspath(sp))
        if m is not None and m not in keep:
            keep.append(m)
    mountinfo = _read(_p(root, "proc/self/mountinfo")) or ""
    lines = []
    for line in mountinfo.splitlines():
        f = line.split()
        if len(f) > 4 and any(
            _unescape(f[4]) == m.mount_point and f[2] == f"{m.major}:{m.minor}" for m in keep
        ):
            lines.append(line)
    if lines:
        copy_text("proc/self/mountinfo", "\n".join(lines))
    by_dev, by_name = _block_devices(root)
    disks: list[str] = []
    for m in keep:
        dev = by_dev.get(f"{m.major}:{m.minor}") or _resolve_source(root, m.source, by_name)
        if dev is not None:
            disks.append(dev.disk)
            disks.extend(
                by_name[s].disk
                for s in _listdir(os.path.join(by_name[dev.disk].sysdir, "slaves"))
                if s in by_name
            )
    for disk in dict.fromkeys(disks):
        base = f"{_BLOCK_DIR}/{disk}"
        copy_text(f"{base}/dev")
        copy_text(f"{base}/size")
        for f in _QUEUE_FILES:
            copy_text(f"{base}/queue/{f}")
        for f in ("model", "numa_node", "vendor"):
            copy_text(f"{base}/device/{f}")
        for sub in _listdir(_p(root, base)):
            if os.path.isfile(_p(root, f"{base}/{sub}/partition")):
                copy_text(f"{base}/{sub}/dev")
                copy_text(f"{base}/{sub}/partition")
        for s in _listdir(_p(root, f"{base}/slaves")):
            copy_text(f"{base}/slaves/{s}/dev", _read(_p(root, f"{base}/slaves/{s}/dev")) or "")
        copy_text(f"{base}/dm/name")
        copy_text(f"{base}/loop/backing_file")
    for bdf in _listdir(_p(root, _PCI_DIR)):
        if (_read(_p(root, f"{_PCI_DIR}/{bdf}/vendor")) or "").lower() == _NVIDIA_VENDOR:
            for f in _PCI_FILES:
                copy_text(f"{_PCI_DIR}/{bdf}/{f}")
    return written


# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tierrt.topology [--json] [--root DIR] [--record DEST] [PATH ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tierrt.topology", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="storage paths to describe")
    parser.add_argument("--root", default="/", help="sysfs/procfs root (a recorded tree)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--record", metavar="DEST", help="record the relevant sysfs files into DEST")
    args = parser.parse_args(argv)
    if args.record:
        files = record_fixture(args.record, args.root, args.paths or ["/"])
        print(f"recorded {len(files)} files into {args.record}")
        return 0
    topo = discover(args.root, storage_paths=args.paths)
    print(json.dumps(topo.summary(), indent=2) if args.json else topo.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
