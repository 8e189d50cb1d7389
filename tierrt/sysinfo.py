"""What tierrt is running with: build, I/O backends, O_DIRECT, huge pages, NUMA, CPU ISA, CUDA, mlock.

``tierrt.info()`` returns a JSON-serialisable dict; :func:`format_info` renders it; ``python -m
tierrt.info [PATH]`` prints it (O_DIRECT is checked under PATH, default the cache directory).

Example::

    >>> import tierrt
    >>> facts = tierrt.info()
    >>> facts["io_backends"]["threads"]["usable"]
    True
    >>> print(tierrt.format_info(facts))     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

from . import __version__
from . import topology as _topology
from .sizes import format_size

__all__ = ["info", "format_info", "cache_dir", "main"]


def cache_dir() -> Path:
    """tierrt's cache directory: ``$XDG_CACHE_HOME/tierrt`` or ``~/.cache/tierrt`` (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "tierrt"


def _native() -> tuple[Any, dict[str, Any]]:
    try:
        from . import _native as native  # type: ignore[attr-defined]
    except ImportError as err:
        return None, {"built": False, "path": None, "error": str(err)}
    return native, {"built": True, "path": getattr(native, "__file__", None), "error": None}


def _engine_check(native: Any, backend: str) -> dict[str, Any]:
    """Try to create an IOEngine with ``backend``: usable or the reason it is not."""
    engine_cls = getattr(native, "IOEngine", None) if native is not None else None
    if engine_cls is None:
        return {"usable": None, "reason": "tierrt._native has no IOEngine (not built yet)"}
    try:
        engine = engine_cls(backend=backend, queue_depth=1, block_size=1 << 20)
    except Exception as err:  # noqa: BLE001 - the reason is the answer
        return {"usable": False, "reason": f"{type(err).__name__}: {err}"}
    out = {"usable": True, "reason": None, "backend": getattr(engine, "backend", backend)}
    with contextlib.suppress(Exception):
        if hasattr(engine, "close"):
            engine.close()
    return out


def _io_backends(native: Any, check: bool) -> dict[str, Any]:
    built = bool(getattr(native, "HAVE_LIBURING", False)) if native is not None else False
    sysctl = None
    with contextlib.suppress(OSError, ValueError):
        sysctl = int(Path("/proc/sys/kernel/io_uring_disabled").read_text().strip())
    uring: dict[str, Any] = {"built": built, "io_uring_disabled_sysctl": sysctl}
    threads: dict[str, Any] = {"built": native is not None and hasattr(native, "IOEngine")}
    status = getattr(native, "io_uring_status", None) if native is not None else None
    if status is not None:  # the kernel's answer without creating an engine
        with contextlib.suppress(Exception):
            ok, why = status()
            uring["kernel_allows"] = bool(ok)
            uring["kernel_reason"] = str(why) or None
    if check and native is not None:
        if built:
            uring.update(_engine_check(native, "io_uring"))
        else:
            uring.update({"usable": False, "reason": "built without liburing"})
        threads.update(_engine_check(native, "threads"))
        auto = _engine_check(native, "auto")
        default = auto.get("backend") if auto.get("usable") else None
    else:
        uring.setdefault("usable", None)
        threads.setdefault("usable", None)
        default = None
    if threads.get("usable") is None and native is not None and getattr(native, "IOEngine", None) is None:
        threads["usable"] = None
    return {"io_uring": uring, "threads": threads, "default": default}


def _hugepages() -> dict[str, Any]:
    base = Path("/sys/kernel/mm/transparent_hugepage")
    out: dict[str, Any] = {}
    for name in ("enabled", "defrag"):
        with contextlib.suppress(OSError):
            text = (base / name).read_text().strip()
            out[name] = text[text.find("[") + 1 : text.find("]")] if "[" in text else text
    meminfo = _topology._parse_meminfo(_topology._read("/proc/meminfo"))
    out["reserved_total"] = meminfo.get("HugePages_Total")
    out["reserved_free"] = meminfo.get("HugePages_Free")
    out["reserved_page_size"] = meminfo.get("Hugepagesize")
    return out


def _torch_sqrt_rounding(native: Any) -> str | None:
    """How the Adam kernels match torch's fp32 sqrt here (see tierrt.optim.kernels.torch_sqrt_kind)."""
    if native is None:
        return None
    try:
        from .optim.kernels import torch_sqrt_kind

        return torch_sqrt_kind()
    except Exception as err:  # noqa: BLE001
        return f"error: {err}"


def _cpu_features(native: Any) -> Any:
    feat = getattr(native, "cpu_features", None) if native is not None else None
    if feat is None:
        return None
    try:
        value = feat() if callable(feat) else feat
    except Exception as err:  # noqa: BLE001
        return f"error: {err}"
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, dict):
        return {
            str(k): v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted(str(v) for v in value)
    return str(value)


def _cuda() -> dict[str, Any]:
    try:
        import torch
    except Exception as err:  # noqa: BLE001
        return {"available": False, "torch": None, "reason": f"torch not importable: {err}"}
    out: dict[str, Any] = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "available": False}
    try:
        out["available"] = bool(torch.cuda.is_available())
        if out["available"]:
            out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as err:  # noqa: BLE001
        out["reason"] = str(err)
    return out


def _mlock() -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def show(v: int) -> int | str:
        return "unlimited" if v == resource.RLIM_INFINITY else v

    return {"soft": show(soft), "hard": show(hard), "root": os.geteuid() == 0}


def info(path: str | os.PathLike[str] | None = None, *, check_engines: bool = True) -> dict[str, Any]:
    """Facts about this tierrt and this machine, as a JSON-serialisable dict.

    ``path``: where to check ``O_DIRECT`` (default: :func:`cache_dir`; a path that does not exist yet
    is checked on its nearest existing parent). ``check_engines``: create a small IOEngine per
    backend to see whether the kernel allows it (a few milliseconds).
    """
    native, native_facts = _native()
    where = Path(path) if path is not None else cache_dir()
    storage = _topology.storage_info(where)
    topo = _topology.discover(gpu=False)
    return {
        "version": __version__,
        "python": sys.version.split()[0],
        "native_module": native_facts,
        "io_backends": _io_backends(native, check_engines),
        "o_direct": {
            "path": str(where),
            "supported": storage.supports_direct_io,
            "filesystem": storage.filesystem,
            "device": storage.device,
        },
        "transparent_hugepages": _hugepages(),
        "numa_nodes": [
            {
                "id": n.id,
                "cpus": _topology.format_cpulist(n.cpus) if n.cpus else "",
                "mem_total": n.mem_total,
                "cxl_candidate": n.is_cxl_candidate,
            }
            for n in topo.numa_nodes
        ],
        "host_arena": native is not None and hasattr(native, "HostArena"),
        "cpu_features": _cpu_features(native),
        "torch_sqrt_rounding": _torch_sqrt_rounding(native),
        "cuda": _cuda(),
        "mlock_limit": _mlock(),
        "optional": {
            name: importlib.util.find_spec(name) is not None for name in ("pynvml", "kvikio", "matplotlib")
        },
    }


def _yn(value: Any) -> str:
    return {True: "yes", False: "no", None: "unknown"}.get(value, str(value))


def format_info(facts: dict[str, Any] | None = None) -> str:
    """A readable rendering of :func:`info`."""
    f = facts if facts is not None else info()
    nat = f["native_module"]
    io = f["io_backends"]
    uring = io["io_uring"]
    lines = [
        f"tierrt {f['version']} (Python {f['python']})",
        "native module: " + (f"built ({nat['path']})" if nat["built"] else f"NOT built ({nat['error']})"),
        "io backends: io_uring built {} usable {}{}; threads usable {}; default {}".format(
            _yn(uring.get("built")),
            _yn(uring.get("usable")),
            f" ({uring['reason']})" if uring.get("reason") and uring.get("usable") is False else "",
            _yn(io["threads"].get("usable")),
            io.get("default") or "-",
        ),
        "O_DIRECT under {}: {} ({} on {})".format(
            f["o_direct"]["path"],
            _yn(f["o_direct"]["supported"]),
            f["o_direct"]["filesystem"] or "?",
            f["o_direct"]["device"] or "no block device",
        ),
    ]
    thp = f["transparent_hugepages"]
    reserved = ""
    if thp.get("reserved_total"):
        reserved = f"; reserved {thp['reserved_total']} x {format_size(thp['reserved_page_size'] or 0)}"
    lines.append(
        f"transparent hugepages: {thp.get('enabled', '?')} (defrag {thp.get('defrag', '?')}){reserved}"
    )
    nodes = f["numa_nodes"]
    lines.append(
        f"NUMA nodes: {len(nodes)}: "
        + "; ".join(
            f"{n['id']} ({'CXL candidate' if n['cxl_candidate'] else 'CPUs ' + (n['cpus'] or '-')},"
            f" {format_size(n['mem_total'])})"
            for n in nodes
        )
    )
    lines.append(f"host arena: {_yn(f['host_arena'])}")
    cpu = f["cpu_features"]
    lines.append("CPU kernels ISA: " + ("not built" if cpu is None else json.dumps(cpu)))
    rounding = f.get("torch_sqrt_rounding")
    if rounding is not None:
        meaning = {
            "ieee": "correctly rounded; reproduced in one pass",
            "rsqrt14": "MKL's AVX-512 rounding; reproduced in one pass",
            "halves": "neither known rounding; Adam steps run two passes around torch's own sqrt",
        }.get(rounding, "")
        lines.append(f"torch's fp32 sqrt: {rounding}" + (f" ({meaning})" if meaning else ""))
    cuda = f["cuda"]
    if cuda.get("available"):
        lines.append(
            f"CUDA: yes (torch {cuda['torch']}, CUDA {cuda['cuda_runtime']}): " + ", ".join(cuda["devices"])
        )
    else:
        lines.append(f"CUDA: no (torch {cuda.get('torch') or 'missing'})")
    ml = f["mlock_limit"]
    soft = ml["soft"] if isinstance(ml["soft"], str) else format_size(ml["soft"])
    lines.append(f"mlock limit: {soft}" + (" (root: not enforced)" if ml["root"] else ""))
    lines.append("optional: " + ", ".join(f"{k} {_yn(v)}" for k, v in f["optional"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m tierrt.sysinfo [--json] [PATH]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tierrt.sysinfo", description="Print tierrt's build and features."
    )
    parser.add_argument("path", nargs="?", help="where to check O_DIRECT (default: the cache directory)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    facts = info(args.path)
    print(json.dumps(facts, indent=2) if args.json else format_info(facts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
