"""Sequential read and write bandwidth of tierrt's IOEngine against fio, DeepSpeed's aio op and plain
Python, on the same file, in the same run.

For every (block size, queue depth) configuration, each contender reads and writes the whole file
sequentially with O_DIRECT:

* ``fio``: ``--ioengine=io_uring`` (the baseline) and ``--ioengine=libaio``, ``--direct=1``, same
  ``--bs``/``--iodepth``/``--size``, on the same file.
* DeepSpeed's async I/O op (``AsyncIOBuilder``, libaio, ``aio_handle(block_size, queue_depth)``,
  into its own page-locked tensor), where it builds (``DS_ACCELERATOR=cpu``; ``--no-deepspeed`` to
  skip). If it cannot be built, the reason is printed and the run goes on.
* tierrt's IOEngine on each backend. Its memory is DeepSpeed's page-locked tensor when DeepSpeed
  is there (the same memory for both, so that the engines are compared and not the buffers: on a
  VM the bandwidth into two buffers of the same kind can differ by 20-30%), else (or with
  ``--own-buffer``) an anonymous mmap with transparent hugepages, locked: what the host arena hands
  out. On io_uring it is registered as fixed buffers, as the runtime registers its arena.
* reads only: Python's ``readinto`` of the file (buffered, page cache dropped first when possible).

The file is transferred in segments of at most 1GiB (one request each, all submitted at once) into
one buffer of that size, whatever the file size. Contenders run interleaved and each is
repeated ``--repeat`` times; the table shows the median GB/s (1e9 bytes/s) and the ratios of tierrt
to fio (io_uring) and to DeepSpeed. Goal: tierrt >= 0.95x fio and >= 1.0x DeepSpeed for read and
write at 1MiB / QD 32.

    python benchmarks/bench_io.py                 # 4GiB file, bs 1MiB and 8MiB x QD 8 and 32
    python benchmarks/bench_io.py --quick         # 1GiB, 1MiB / QD 32 only
    python benchmarks/bench_io.py --path /mnt/nvme0/bench.dat --size 16GiB --repeat 5
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tierrt.io import IOEngine, available_backends  # noqa: E402
from tierrt.sizes import format_size, parse_size  # noqa: E402

SEGMENT = 1 << 30
GOAL_FIO = 0.95
GOAL_DS = 1.0


@dataclass
class Result:
    samples: list[tuple[float, float]] = field(default_factory=list)  # (GB/s, CPU cores busy)
    note: str = ""

    @property
    def gbps(self) -> float | None:
        return statistics.median(s[0] for s in self.samples) if self.samples else None

    @property
    def cpu(self) -> float | None:
        return statistics.median(s[1] for s in self.samples) if self.samples else None


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("1\n")
        return True
    except OSError:
        return False


def page_buffer(nbytes: int) -> tuple[mmap.mmap, np.ndarray, str]:
    """Anonymous, page-aligned memory with transparent hugepages, touched and locked when allowed:
    what the host arena hands out."""
    mm = mmap.mmap(-1, nbytes)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)
    arr = np.frombuffer(mm, dtype=np.uint8)
    arr[:] = 0x5A
    libc = ctypes.CDLL(None, use_errno=True)
    locked = libc.mlock(ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(nbytes)) == 0
    return mm, arr, "anonymous mmap, MADV_HUGEPAGE" + (", mlocked" if locked else " (mlock refused)")


def segments(size: int, seg: int) -> list[tuple[int, int]]:
    return [(off, min(seg, size - off)) for off in range(0, size, seg)]


# -- contenders ------------------------------------------------------------------------------------


def run_fio(path: str, size: int, op: str, bs: int, qd: int, engine: str) -> tuple[float, float]:
    cmd = [
        "fio",
        "--name=bench",
        f"--filename={path}",
        f"--size={size}",
        f"--rw={op}",
        f"--bs={bs}",
        f"--iodepth={qd}",
        "--direct=1",
        f"--ioengine={engine}",
        "--numjobs=1",
        "--output-format=json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {out.stderr.strip()[:300]}")
    job = json.loads(out.stdout)["jobs"][0]
    return job[op]["bw_bytes"] / 1e9, (job["usr_cpu"] + job["sys_cpu"]) / 100


class Tierrt:
    def __init__(self, backend: str, path: str, size: int, buf: np.ndarray, register: bool) -> None:
        self.backend, self.path, self.size, self.buf, self.register = backend, path, size, buf, register

    def __call__(self, op: str, bs: int, qd: int) -> tuple[float, float]:
        with IOEngine(self.backend, queue_depth=qd, block_size=bs) as eng:
            fs = eng.open(self.path, self.size, create=False)
            if self.register:
                eng.register_buffers([self.buf])
            seg = self.buf.nbytes
            submit = eng.read if op == "read" else eng.write
            cpu0, start = cpu_seconds(), time.perf_counter()
            reqs = [submit(fs, off, self.buf[:n]) for off, n in segments(self.size, seg)]
            for req in reqs:
                req.wait()
            elapsed = time.perf_counter() - start
            cpu = cpu_seconds() - cpu0
            stats = eng.stats()
            fs.close()
        if not fs.direct or stats["buffered_chunks"]:
            raise RuntimeError("tierrt did not use O_DIRECT for every chunk")
        return self.size / elapsed / 1e9, cpu / elapsed


class DeepSpeedAio:
    """DeepSpeed's aio_handle (libaio) into its own page-locked tensor."""

    def __init__(self, path: str, size: int, seg: int) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import torch
        from deepspeed.ops.op_builder import AsyncIOBuilder

        builder = AsyncIOBuilder()
        if not builder.is_compatible(verbose=False):
            raise RuntimeError("AsyncIOBuilder is not compatible here (libaio-dev missing?)")
        self.module = builder.load(verbose=False)
        self.torch = torch
        self.path, self.size, self.seg = path, size, seg
        self.handles: dict[tuple[int, int], object] = {}
        self.owner = self._handle(1 << 20, 32)
        self.tensor = self.owner.new_cpu_locked_tensor(seg, torch.empty(0, dtype=torch.uint8))
        self.tensor.fill_(0x5A)

    def _handle(self, bs: int, qd: int):
        key = (bs, qd)
        if key not in self.handles:
            # block_size, queue_depth, single_submit, overlap_events, intra_op_parallelism
            self.handles[key] = self.module.aio_handle(bs, qd, False, True, 1)
        return self.handles[key]

    def __call__(self, op: str, bs: int, qd: int) -> tuple[float, float]:
        handle = self._handle(bs, qd)
        parts = segments(self.size, self.seg)
        cpu0, start = cpu_seconds(), time.perf_counter()
        for off, n in parts:
            view = self.tensor[:n]
            if not handle.is_pinned(view):
                raise RuntimeError(
                    "DeepSpeed does not see its tensor as pinned: it would use a bounce buffer"
                )
            if op == "read":
                handle.async_pread(view, self.path, off)
            else:
                handle.async_pwrite(view, self.path, off)
        done = handle.wait()
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds() - cpu0
        if done != len(parts):
            raise RuntimeError(f"DeepSpeed aio completed {done} of {len(parts)} operations")
        return self.size / elapsed / 1e9, cpu / elapsed

    def close(self) -> None:
        if self.tensor is not None:
            self.owner.free_cpu_locked_tensor(self.tensor)
            self.tensor = None


def python_readinto(path: str, size: int, buf: np.ndarray) -> tuple[float, float]:
    view = memoryview(buf)
    cpu0, start = cpu_seconds(), time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        done = 0
        while done < size:
            n = handle.readinto(view[: min(len(view), size - done)])
            if not n:
                raise RuntimeError("unexpected end of file")
            done += n
    elapsed = time.perf_counter() - start
    return size / elapsed / 1e9, (cpu_seconds() - cpu0) / elapsed


# -- driver ----------------------------------------------------------------------------------------


def cell(result: Result) -> str:
    if result.gbps is None:
        return "failed" if result.note else "-"
    return f"{result.gbps:.2f} ({100 * (result.cpu or 0):.0f}%)"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", help="file to use (default: a new file under /tmp, removed at the end)")
    parser.add_argument("--size", default="4GiB", help="file size (default 4GiB; at least 4GiB for figures)")
    parser.add_argument("--block-sizes", default="1MiB,8MiB")
    parser.add_argument("--queue-depths", default="8,32")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender (median is shown)")
    parser.add_argument("--backends", default=",".join(available_backends()))
    parser.add_argument("--quick", action="store_true", help="1GiB, 1MiB / QD 32, one run each")
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--no-fio", action="store_true")
    parser.add_argument("--no-register", action="store_true", help="do not register the buffer (io_uring)")
    parser.add_argument(
        "--own-buffer",
        action="store_true",
        help="give tierrt its own mmap buffer instead of DeepSpeed's locked tensor",
    )
    args = parser.parse_args(argv)

    if args.quick:
        args.size, args.block_sizes, args.queue_depths, args.repeat = "1GiB", "1MiB", "32", 1
    size = parse_size(args.size, what="--size")
    block_sizes = [parse_size(b, what="--block-sizes") for b in args.block_sizes.split(",")]
    depths = [int(q) for q in args.queue_depths.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    seg = min(SEGMENT, size)
    if size % max(block_sizes) != 0:
        parser.error("--size must be a multiple of every block size")

    tmpdir = None
    path = args.path
    if path is None:
        tmpdir = tempfile.mkdtemp(prefix="io-bench-", dir="/tmp")
        path = os.path.join(tmpdir, "bench.dat")

    print(f"file {path}, {format_size(size)}; segments of {format_size(seg)}; repeat {args.repeat}")
    contenders: dict[str, Callable[[str, int, int], tuple[float, float]]] = {}
    notes: list[str] = []
    ds = None
    if not args.no_deepspeed:
        try:
            ds = DeepSpeedAio(path, size, seg)
        except Exception as exc:  # a build failure is a result, not a crash
            notes.append(f"DeepSpeed aio unavailable: {type(exc).__name__}: {str(exc)[:300]}")
    if ds is not None and not args.own_buffer:
        # The same memory for every in-process contender: on a VM, bandwidth into different buffers
        # of the same kind can differ by 20-30% (host-side backing), which would drown the engines.
        buf = ds.tensor.numpy()
        memory = "DeepSpeed's page-locked tensor, shared by DeepSpeed, tierrt and readinto"
    else:
        _mm, buf, memory = page_buffer(seg)
    print(f"memory: {format_size(seg)}, {memory}")
    try:
        # Create and preallocate through tierrt, then write it once so no extent is left unwritten
        # (writes into unwritten extents pay for conversion; the first contender would be penalised).
        with IOEngine(queue_depth=32) as eng:
            fs = eng.open(path, size)
            for off, n in segments(size, seg):
                eng.write(fs, off, buf[:n]).wait()
            fs.close()

        if not args.no_fio:
            if shutil.which("fio"):
                contenders["fio io_uring"] = lambda op, bs, qd: run_fio(path, size, op, bs, qd, "io_uring")
                contenders["fio libaio"] = lambda op, bs, qd: run_fio(path, size, op, bs, qd, "libaio")
            else:
                notes.append("fio: not installed")
        if ds is not None:
            contenders["DeepSpeed aio"] = ds
        for backend in backends:
            register = backend == "io_uring" and not args.no_register
            contenders[f"tierrt {backend}"] = Tierrt(backend, path, size, buf, register)

        results: dict[tuple[str, int, int, str], Result] = {}
        for bs in block_sizes:
            for qd in depths:
                for rep in range(args.repeat):
                    for op in ("write", "read"):
                        for name, fn in contenders.items():
                            res = results.setdefault((op, bs, qd, name), Result())
                            try:
                                res.samples.append(fn(op, bs, qd))
                            except Exception as exc:
                                res.note = f"{type(exc).__name__}: {str(exc)[:200]}"
                        if op == "read" and rep == 0 and bs == block_sizes[0] and qd == depths[0]:
                            res = results.setdefault(("read", 0, 0, "python readinto"), Result())
                            dropped = drop_caches()
                            res.samples.append(python_readinto(path, size, buf))
                            if not dropped:
                                res.note = "page cache not dropped (not root?)"
                    print(
                        f"  done: bs {format_size(bs)} qd {qd} run {rep + 1}/{args.repeat}",
                        file=sys.stderr,
                        flush=True,
                    )
        if ds is not None:
            ds.close()
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)

    names = list(contenders)
    ours_names = [n for n in names if n.startswith("tierrt")]
    header = ["op", "bs", "QD"] + names + ["tierrt/fio", "tierrt/DS", "goal"]
    rows = []
    all_met = True
    for op in ("read", "write"):
        for bs in block_sizes:
            for qd in depths:
                res = {n: results[(op, bs, qd, n)] for n in names}
                vals = {n: r.gbps for n, r in res.items()}
                fio_v, ds_v = vals.get("fio io_uring"), vals.get("DeepSpeed aio")
                vs_fio = " / ".join(ratio(vals[n], fio_v) for n in ours_names)
                vs_ds = " / ".join(ratio(vals[n], ds_v) for n in ours_names)
                goal = ""
                if bs == 1 << 20 and qd == 32:
                    ours = [vals[n] for n in ours_names]
                    met = bool(ours) and all(
                        v is not None
                        and (fio_v is None or v >= GOAL_FIO * fio_v)
                        and (ds_v is None or v >= GOAL_DS * ds_v)
                        for v in ours
                    )
                    all_met = all_met and met
                    goal = "met" if met else "MISSED"
                cells = [cell(r) for r in res.values()]
                rows.append([op, format_size(bs), str(qd), *cells, vs_fio, vs_ds, goal])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print()
    print(f"GB/s (1e9 bytes/s) and, in brackets, CPU used (% of one core); median of {args.repeat} run(s).")
    print("Ratios list the tierrt backends in the order:", " / ".join(ours_names))
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    py = results.get(("read", 0, 0, "python readinto"))
    if py and py.gbps is not None and ours_names:
        ours = results[("read", block_sizes[0], depths[0], ours_names[0])].gbps
        print(
            f"python readinto (buffered, page cache dropped first): {cell(py)}; {ours_names[0]} at "
            f"{format_size(block_sizes[0])} / QD {depths[0]} is {ratio(ours, py.gbps)} of it. {py.note}"
        )
    for (op, bs, qd, name), r in sorted(results.items()):
        if r.note and name != "python readinto":
            print(f"note: {name} {op} bs {format_size(bs)} QD {qd}: {r.note}")
    for note in notes:
        print("note:", note)
    print(
        f"goal at 1MiB / QD 32, read and write, every tierrt backend: >= {GOAL_FIO}x fio io_uring and "
        f">= {GOAL_DS}x DeepSpeed aio: {'met' if all_met else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
