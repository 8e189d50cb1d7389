"""Tests of the I/O engine (tierrt.io / tierrt._native.IOEngine) on both backends.

Everything runs on real files: the test directory, and where the test needs a filesystem with a
particular property, a real mount (a tiny tmpfs for ENOSPC at preallocation, a tiny loop-mounted
ext4 for ENOSPC in the middle of a write, ramfs or tmpfs for a filesystem without O_DIRECT). Those
skip, saying why, where mounting is not permitted. Failures that a healthy disk never produces (EIO,
short reads, torn writes, a hung device) come from the engine's own fault injector.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import mmap
import os
import shutil
import signal
import subprocess
import threading
import time
import weakref

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierrt import ConfigError, IOEngineError, TierPathError, TierrtError
from tierrt.io import IOEngine, available_backends, io_uring_status

KiB = 1 << 10
MiB = 1 << 20


def _backend_param(name: str):
    if name == "io_uring" and not io_uring_status()[0]:
        reason = f"io_uring unavailable: {io_uring_status()[1]}"
        return pytest.param(name, marks=pytest.mark.skip(reason=reason))
    return pytest.param(name)


BACKENDS = [_backend_param("io_uring"), _backend_param("threads")]


def aligned(nbytes: int) -> np.ndarray:
    """A page-aligned, writable uint8 array (anonymous mmap), as the host arena hands out."""
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8)[:nbytes]


def pattern(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


@contextlib.contextmanager
def mounted(fstype: str, target: str, options: str = "", source: str = "none"):
    os.makedirs(target, exist_ok=True)
    cmd = ["mount", "-t", fstype] + (["-o", options] if options else []) + [source, target]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount {fstype}: {exc}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount {fstype} (not permitted here?): {result.stderr.strip()}")
    try:
        yield target
    finally:
        gc.collect()  # file sets still referenced by tracebacks keep their descriptors open
        done = subprocess.run(["umount", target], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", target], capture_output=True, timeout=30)
            pytest.fail(f"could not unmount {target}: {done.stderr.strip()} (a descriptor leaked?)")


def o_direct_supported(directory: str) -> bool:
    probe = os.path.join(directory, ".odirect-probe")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    os.close(fd)
    return True


# --------------------------------------------------------------------------------------------------
# Construction and arguments


def test_available_backends_and_auto():
    backends = available_backends()
    assert backends[-1] == "threads"
    with IOEngine() as eng:
        assert eng.backend == backends[0]
        assert eng.stats()["backend"] == eng.backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_properties(backend):
    with IOEngine(backend, queue_depth=8, block_size="256KiB", name="t") as eng:
        assert (eng.backend, eng.queue_depth, eng.block_size, eng.name) == (backend, 8, 256 * KiB, "t")
        stats = eng.stats()
        for key in (
            "backend queue_depth block_size bytes_read bytes_written reads writes chunks errors "
            "busy_seconds inflight direct_files buffered_files"
        ).split():
            assert key in stats, key
        assert stats["threads"] == (1 if backend == "io_uring" else 8)
    assert eng.closed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backend": "bogus"},
        {"queue_depth": 0},
        {"queue_depth": 5000},
        {"block_size": 1000},
        {"block_size": "3KiB"},
        {"threads": -1},
    ],
)
def test_bad_engine_arguments(kwargs):
    with pytest.raises(ConfigError):
        IOEngine(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_request_arguments(backend, tmp_path):
    with IOEngine(backend) as eng:
        fs = eng.open(str(tmp_path / "a.swap"), 64 * KiB)
        buf = bytearray(8 * KiB)
        with pytest.raises(ConfigError, match="outside the file set"):
            eng.read(fs, 60 * KiB, buf)
        with pytest.raises(ConfigError, match="outside the file set"):
            eng.write(fs, 64 * KiB + 1, b"x")
        with pytest.raises(ConfigError, match="read-only"):
            eng.read(fs, 0, b"immutable")
        with pytest.raises(ConfigError, match="does not fit"):
            eng.read(fs, 0, buf, 9 * KiB)
        with pytest.raises(ConfigError):
            eng.read(fs, -1, buf)
        with pytest.raises(ConfigError, match="contiguous"):
            eng.read(fs, 0, np.zeros((8, 8), dtype=np.uint8)[:, ::2])
        before = eng.stats()["writes"]
        with pytest.raises(ConfigError):  # one bad op: nothing of the batch starts
            eng.submit([("write", fs, 0, b"ab", None), ("write", fs, 64 * KiB, b"cd", None)])
        assert eng.stats()["writes"] == before
        with pytest.raises(ConfigError):
            eng.open(str(tmp_path / "b.swap"), 0)
        with pytest.raises(ConfigError):
            eng.open([str(tmp_path / "c"), str(tmp_path / "d")], MiB, stripe=1000)
        fs.close(remove=True)
        with pytest.raises(ConfigError, match="closed"):
            eng.read(fs, 0, buf)
    with pytest.raises(ConfigError, match="closed"):
        eng.open(str(tmp_path / "e.swap"), MiB)


def test_errors_are_tierrt_errors():
    assert issubclass(IOEngineError, TierrtError) and issubclass(IOEngineError, OSError)
    assert issubclass(TierPathError, TierrtError)


# --------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("backend", BACKENDS)
def test_aligned_round_trip_uses_o_direct(backend, tmp_path):
    size = 8 * MiB + 12 * KiB
    path = str(tmp_path / "a.swap")
    with IOEngine(backend, queue_depth=4, block_size="256KiB") as eng:
        fs = eng.open(path, size)
        assert fs.size == size and fs.paths == [path] and fs.logical_block_size >= 4096
        data = pattern(size, 1)
        src = aligned(size)
        src[:] = data
        req = eng.write(fs, 0, src)
        assert req.op == "write" and req.nbytes == size
        assert req.chunks == (size + 256 * KiB - 1) // (256 * KiB)
        assert req.wait() == size and req.done()
        dst = aligned(size)
        assert eng.read(fs, 0, dst).wait() == size
        assert np.array_equal(dst, data)
        assert file_bytes(path) == data.tobytes()
        stats = eng.stats()
        assert stats["bytes_written"] == size and stats["bytes_read"] == size
        assert stats["reads"] == 1 and stats["writes"] == 1 and stats["errors"] == 0
        assert stats["busy_seconds"] > 0 and stats["inflight"] == 0
        if fs.direct:
            assert stats["direct_files"] == 1 and stats["buffered_chunks"] == 0
        assert eng.sync(fs).wait() == 0
        fs.close()
        fs.close()  # idempotent
        assert fs.closed and os.path.exists(path)
        fs.close(remove=True)
        assert not os.path.exists(path)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nfiles", [1, 3])
def test_random_offsets_and_sizes(backend, nfiles, tmp_path):
    """Random writes then reads (random offsets, lengths, memory misalignment) against a model."""
    size = 3 * MiB + 5 * KiB
    paths = [str(tmp_path / f"r{i}.swap") for i in range(nfiles)]
    model = bytearray(size)  # preallocated files read as zeros
    with IOEngine(backend, queue_depth=6, block_size="32KiB") as eng:
        fs = eng.open(paths, size, stripe="64KiB")
        staging = aligned(size + 8 * KiB)
        landing = aligned(size + 8 * KiB)
        pages = st.integers(0, size // 4096 - 1).map(lambda k: k * 4096)
        offsets = st.one_of(pages, st.integers(0, size - 1))
        lengths = st.one_of(st.integers(1, 64).map(lambda k: k * 4096), st.integers(1, 300_000))
        shifts = st.one_of(st.just(0), st.integers(0, 4 * KiB))

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(offsets, lengths, shifts, offsets, lengths, shifts, st.integers(0, 2**31))
        def check(w_off, w_len, w_shift, r_off, r_len, r_shift, seed):
            w_len = min(w_len, size - w_off)
            data = pattern(w_len, seed)
            staging[w_shift : w_shift + w_len] = data
            assert eng.write(fs, w_off, staging[w_shift : w_shift + w_len]).wait() == w_len
            model[w_off : w_off + w_len] = data.tobytes()
            for off, length, shift in ((w_off, w_len, r_shift), (r_off, min(r_len, size - r_off), r_shift)):
                view = landing[shift : shift + length]
                view[:] = 0xEE
                assert eng.read(fs, off, view).wait() == length
                assert view.tobytes() == bytes(model[off : off + length])

        check()
        stats = eng.stats()
        assert stats["errors"] == 0
        if fs.direct:
            assert stats["direct_chunks"] > 0 and stats["buffered_chunks"] > 0
        # The logical content, reassembled from the files with plain Python, equals the model.
        assert striped_content(paths, 64 * KiB, size) == bytes(model)
        fs.close(remove=True)


def striped_content(paths: list[str], stripe: int, size: int) -> bytes:
    files = [file_bytes(p) for p in paths]
    if len(files) == 1:
        return files[0][:size]
    out = bytearray()
    unit = 0
    while len(out) < size:
        f, k = unit % len(files), unit // len(files)
        out += files[f][k * stripe : (k + 1) * stripe]
        unit += 1
    return bytes(out[:size])


@pytest.mark.parametrize("backend", BACKENDS)
def test_striping_lands_in_each_file(backend, tmp_path):
    stripe = 128 * KiB
    size = 10 * stripe + 3000  # 11 stripe units over 3 files: 4, 4, 3 units
    paths = [str(tmp_path / f"s{i}.swap") for i in range(3)]
    with IOEngine(backend, queue_depth=8, block_size="64KiB") as eng:
        fs = eng.open(paths, size, stripe=stripe)
        assert fs.stripe == stripe and fs.file_size == 4 * stripe
        data = pattern(size, 7)
        assert eng.write(fs, 0, data).wait() == size
        files = [file_bytes(p) for p in paths]
        assert [len(f) for f in files] == [4 * stripe] * 3  # preallocated to whole stripes
        for unit in range(11):
            f, k = unit % 3, unit // 3
            lo = unit * stripe
            hi = min(lo + stripe, size)
            assert files[f][k * stripe : k * stripe + hi - lo] == data[lo:hi].tobytes(), unit
        out = np.zeros(size, dtype=np.uint8)
        assert eng.read(fs, 0, out).wait() == size
        assert np.array_equal(out, data)
        # A request crossing a stripe boundary at an odd offset.
        part = bytearray(stripe + 777)
        assert eng.read(fs, stripe - 333, part).wait() == len(part)
        assert bytes(part) == data[stripe - 333 : 2 * stripe + 444].tobytes()
        fs.close(remove=True)
        assert not any(os.path.exists(p) for p in paths)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_submit_and_ptr(backend, tmp_path):
    with IOEngine(backend, queue_depth=4, block_size="64KiB") as eng:
        fs = eng.open(str(tmp_path / "b.swap"), MiB)
        bufs = [pattern(100 * KiB + i, i) for i in range(5)]
        reqs = eng.submit([("write", fs, i * 200 * KiB, b, None) for i, b in enumerate(bufs)])
        assert [r.wait() for r in reqs] == [len(b) for b in bufs]
        outs = [aligned(len(b)) for b in bufs]
        ptr_reqs = [
            eng.read_ptr(fs, i * 200 * KiB, o.ctypes.data, o.nbytes, keepalive=o) for i, o in enumerate(outs)
        ]
        assert [r.wait() for r in ptr_reqs] == [len(b) for b in bufs]
        for b, o in zip(bufs, outs, strict=True):
            assert np.array_equal(b, o)
        src = pattern(4096, 99)
        assert eng.write_ptr(fs, 0, src.ctypes.data, 4096, src).wait() == 4096
        assert file_bytes(fs.paths[0])[:4096] == src.tobytes()
        assert eng.read(fs, 0, bytearray(0)).wait() == 0  # empty request completes at once
        fs.close(remove=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_tensors(backend, tmp_path):
    torch = pytest.importorskip("torch")
    with IOEngine(backend) as eng:
        fs = eng.open(str(tmp_path / "t.swap"), "4MiB")
        src = torch.randn(1000, 300).to(torch.bfloat16)
        nbytes = src.numel() * src.element_size()
        assert eng.write(fs, 4096, src).wait() == nbytes
        dst = torch.empty_like(src)
        reqs = eng.submit([("read", fs, 4096, dst, None)])
        assert reqs[0].wait() == nbytes
        assert torch.equal(src, dst)
        with pytest.raises(ConfigError, match="contiguous"):
            eng.read(fs, 0, dst.t())
        fs.close(remove=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_buffers(backend, tmp_path):
    size = 4 * MiB
    with IOEngine(backend, queue_depth=8, block_size="1MiB") as eng:
        fs = eng.open(str(tmp_path / "f.swap"), size)
        arena = aligned(2 * size)
        n = eng.register_buffers([arena])
        assert n == (1 if backend == "io_uring" else 0)
        data = pattern(size, 3)
        arena[:size] = data
        assert eng.write(fs, 0, arena[:size]).wait() == size
        assert eng.read(fs, 0, arena[size:]).wait() == size
        assert np.array_equal(arena[size:], data)
        stats = eng.stats()
        if backend == "io_uring":
            assert stats["fixed_chunks"] == 8 and stats["registered_bytes"] == 2 * size
        eng.unregister_buffers()
        assert eng.stats()["registered_bytes"] == 0
        out = bytearray(size)
        assert eng.read(fs, 0, out).wait() == size and out == data.tobytes()
        fs.close(remove=True)


# --------------------------------------------------------------------------------------------------
# Files: creation, EOF, missing, unwritable, no O_DIRECT, no space


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_past_end_of_file(backend, tmp_path):
    path = str(tmp_path / "short.swap")
    content = pattern(10_000, 5).tobytes()
    with open(path, "wb") as handle:
        handle.write(content)
    with IOEngine(backend, block_size="4KiB") as eng:
        fs = eng.open(path, 16 * KiB, create=False)
        out = bytearray(10_000)
        assert eng.read(fs, 0, out).wait() == 10_000 and bytes(out) == content
        with pytest.raises(IOEngineError) as info:
            eng.read(fs, 8 * KiB, aligned(8 * KiB)).wait()  # O_DIRECT, then buffered for the tail
        err = info.value
        assert err.path == path and err.op == "read" and err.errno is None
        assert err.offset == 8 * KiB and err.nbytes == 4 * KiB and err.transferred == 10_000 - 8 * KiB
        expected = f"short read: {10_000 - 8 * KiB} of 4096 bytes at offset 8192 of {path}, end of file"
        assert expected in str(err)
        with pytest.raises(IOEngineError, match="end of file"):
            eng.read(fs, 8 * KiB, bytearray(8 * KiB)).wait()  # buffered all the way
        fs.close()
    assert len(file_bytes(path)) == 10_000  # create=False never extends or truncates


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file_and_directory(backend, tmp_path):
    with IOEngine(backend) as eng:
        missing = str(tmp_path / "nope.swap")
        with pytest.raises(TierPathError) as info:
            eng.open(missing, MiB, create=False)
        assert info.value.errno == errno.ENOENT and info.value.path == missing and missing in str(info.value)
        in_missing_dir = str(tmp_path / "no-dir" / "a.swap")
        with pytest.raises(TierPathError) as info:
            eng.open(in_missing_dir, MiB)
        assert info.value.errno == errno.ENOENT and "does not exist" in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unwritable_directory(backend, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    result = subprocess.run(["chattr", "+i", str(ro)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"chattr +i not possible here: {result.stderr.strip()}")
    try:
        with IOEngine(backend) as eng:
            path = str(ro / "a.swap")
            with pytest.raises(TierPathError) as info:
                eng.open(path, MiB)
            assert info.value.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
            assert info.value.path == path and "not writable" in str(info.value)
    finally:
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True)


@contextlib.contextmanager
def mount_without_o_direct(target: str):
    """A filesystem that refuses O_DIRECT: tmpfs until Linux 6.6, ramfs on newer kernels."""
    with mounted("tmpfs", target, "size=8M") as mnt:
        if not o_direct_supported(mnt):
            yield mnt
            return
    with mounted("ramfs", target) as mnt:
        if o_direct_supported(mnt):
            pytest.skip("neither tmpfs nor ramfs refuses O_DIRECT on this kernel")
        yield mnt


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffered_fallback_without_o_direct(backend, tmp_path, caplog):
    with mount_without_o_direct(str(tmp_path / "mnt")) as mnt:
        path = os.path.join(mnt, "b.swap")
        with IOEngine(backend, block_size="64KiB") as eng, caplog.at_level(logging.WARNING, "tierrt.io"):
            fs = eng.open(path, MiB)
            assert not fs.direct and fs.buffered_paths == [path]
            warnings = [r.message for r in caplog.records if "O_DIRECT is not supported" in r.message]
            assert len(warnings) == 1 and path in warnings[0]
            stats = eng.stats()
            assert stats["buffered_files"] == 1 and stats["direct_files"] == 0
            data = pattern(MiB, 11)
            src = aligned(MiB)
            src[:] = data
            assert eng.write(fs, 0, src).wait() == MiB
            out = aligned(MiB)
            assert eng.read(fs, 0, out).wait() == MiB and np.array_equal(out, data)
            assert eng.stats()["direct_chunks"] == 0
            fs.close(remove=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_enospc_at_preallocation(backend, tmp_path):
    with mounted("tmpfs", str(tmp_path / "tiny"), "size=8M") as mnt:
        a, b = os.path.join(mnt, "a.swap"), os.path.join(mnt, "b.swap")
        with IOEngine(backend) as eng:
            with pytest.raises(IOEngineError) as info:
                eng.open(a, 16 * MiB)
            err = info.value
            assert err.errno == errno.ENOSPC and err.is_no_space and err.path == a
            assert a in str(err) and "16.00MiB" in str(err) and "nothing was written" in str(err)
            assert not os.path.exists(a)
            # Two files of 6MiB: the first fits, the second does not; neither is left behind.
            with pytest.raises(IOEngineError) as info:
                eng.open([a, b], 12 * MiB, stripe="1MiB")
            assert info.value.errno == errno.ENOSPC and info.value.path == b
            assert os.listdir(mnt) == []
            assert eng.stats()["bytes_written"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_enospc_in_the_middle_of_a_write(backend, tmp_path):
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 not installed")
    image = str(tmp_path / "ext4.img")
    with open(image, "wb") as handle:
        handle.truncate(16 * MiB)
    mk = subprocess.run(["mkfs.ext4", "-q", "-F", image], capture_output=True, text=True)
    if mk.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {mk.stderr.strip()}")
    with mounted("ext4", str(tmp_path / "loop"), "loop", source=image) as mnt:
        path = os.path.join(mnt, "big.swap")
        with IOEngine(backend, queue_depth=4, block_size="1MiB") as eng:
            fs = eng.open(path, 32 * MiB, preallocate=False)  # sparse: space is taken by the writes
            head = pattern(MiB, 1)
            assert eng.write(fs, 0, head).wait() == MiB
            src = aligned(31 * MiB)
            src[:] = 0xAB
            with pytest.raises(IOEngineError) as info:
                eng.write(fs, MiB, src).wait()
            err = info.value
            assert err.errno == errno.ENOSPC and err.path == path and err.op == "write"
            assert "No space left on device" in str(err) and f"at offset {err.offset}" in str(err)
            assert MiB <= err.offset < 32 * MiB
            out = bytearray(MiB)  # what was written before is intact and readable
            assert eng.read(fs, 0, out).wait() == MiB and out == head.tobytes()
            fs.close(remove=True)


# --------------------------------------------------------------------------------------------------
# Injected faults


@pytest.mark.parametrize("backend", BACKENDS)
def test_injected_eio_names_the_chunk(backend, tmp_path):
    path = str(tmp_path / "f.swap")
    with IOEngine(backend, queue_depth=4, block_size="256KiB") as eng:
        fs = eng.open(path, 2 * MiB)
        data = pattern(MiB, 2)
        assert eng.write(fs, 0, data).wait() == MiB
        eng.inject_fault(op="read", errno=errno.EIO, after=2, count=1)
        with pytest.raises(IOEngineError) as info:
            eng.read(fs, 0, aligned(MiB)).wait()
        err = info.value
        assert (err.errno, err.path, err.op) == (errno.EIO, path, "read")
        assert (err.offset, err.nbytes) == (512 * KiB, 256 * KiB)
        assert err.injected == 1
        text = str(err)
        assert "Input/output error (errno 5)" in text and path in text and "offset 524288" in text
        # count=1: the next read is fine and bit-exact
        out = aligned(MiB)
        assert eng.read(fs, 0, out).wait() == MiB and np.array_equal(out, data)
        # ENOSPC on writes, through the same layer
        eng.inject_fault(op="write", errno=errno.ENOSPC, path_contains="f.swap")
        with pytest.raises(IOEngineError) as info:
            eng.write(fs, 0, data).wait()
        assert info.value.is_no_space
        # a fault on another path does not fire here
        eng.clear_faults()
        eng.inject_fault(op="any", path_contains="other-file")
        assert eng.write(fs, 0, data).wait() == MiB
        eng.inject_fault(op="sync", errno=errno.EIO)
        with pytest.raises(IOEngineError, match=f"fdatasync of {path} failed: Input/output error"):
            eng.sync(fs).wait()
        stats = eng.stats()
        assert stats["errors"] == 3 and stats["faults_injected"] == 3
        fs.close(remove=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_injected_short_read_delivers_real_bytes(backend, tmp_path):
    path = str(tmp_path / "f.swap")
    with IOEngine(backend, queue_depth=2, block_size="256KiB") as eng:
        fs = eng.open(path, MiB)
        data = pattern(256 * KiB, 4)
        assert eng.write(fs, 256 * KiB, data).wait() == 256 * KiB
        eng.inject_fault(op="read", mode="short")
        out = aligned(256 * KiB)
        out[:] = 0xEE
        with pytest.raises(IOEngineError) as info:
            eng.read(fs, 256 * KiB, out).wait()
        err = info.value
        assert err.errno is None and err.transferred == 128 * KiB and err.offset == 256 * KiB
        assert f"short read: 131072 of 262144 bytes at offset 262144 of {path}" in str(err)
        assert np.array_equal(out[: 128 * KiB], data[: 128 * KiB])  # the half that was read is real
        assert (out[128 * KiB :] == 0xEE).all()
        fs.close(remove=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_injected_torn_write(backend, tmp_path):
    path = str(tmp_path / "f.swap")
    with IOEngine(backend, queue_depth=2, block_size="256KiB") as eng:
        fs = eng.open(path, MiB)
        old = pattern(256 * KiB, 5)
        new = pattern(256 * KiB, 6)
        assert eng.write(fs, 0, old).wait() == 256 * KiB
        eng.inject_fault(op="write", mode="torn", errno=errno.EIO)
        src = aligned(256 * KiB)
        src[:] = new
        with pytest.raises(IOEngineError) as info:
            eng.write(fs, 0, src).wait()
        err = info.value
        assert err.errno == errno.EIO and err.transferred == 128 * KiB and err.path == path
        assert "after 131072 of 262144 bytes were written" in str(err)
        on_disk = file_bytes(path)[: 256 * KiB]
        assert on_disk[: 128 * KiB] == new[: 128 * KiB].tobytes()  # torn: half new, half old
        assert on_disk[128 * KiB :] == old[128 * KiB :].tobytes()
        fs.close(remove=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_failure_among_many_concurrent_requests(backend, tmp_path):
    n, piece = 48, 40 * KiB
    path = str(tmp_path / "many.swap")
    with IOEngine(backend, queue_depth=8, block_size="64KiB") as eng:
        fs = eng.open(path, n * 64 * KiB)
        datas = []  # one chunk each (aligned memory, whole pages, within one block)
        for i in range(n):
            d = aligned(piece + 4 * KiB * (i % 6))
            d[:] = pattern(d.nbytes, 100 + i)
            datas.append(d)
        eng.inject_fault(op="write", errno=errno.EIO, after=17, count=1)
        reqs = eng.submit([("write", fs, i * 64 * KiB, d, None) for i, d in enumerate(datas)])
        failed = []
        for i, (req, d) in enumerate(zip(reqs, datas, strict=True)):
            try:
                assert req.wait() == len(d)
            except IOEngineError as err:
                assert err.errno == errno.EIO and err.offset == i * 64 * KiB
                failed.append(i)
        assert failed == [17]  # faults fire in queue order on both backends
        outs = [aligned(len(d)) for d in datas]
        reads = eng.submit([("read", fs, i * 64 * KiB, o, None) for i, o in enumerate(outs)])
        for i, (req, d, o) in enumerate(zip(reads, datas, outs, strict=True)):
            assert req.wait() == len(d)
            if i != 17:
                assert np.array_equal(o, d), i
            else:
                assert not o.any()  # the failed write never touched the file
        fs.close(remove=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wait_timeout_does_not_cancel(backend, tmp_path):
    with IOEngine(backend) as eng:
        fs = eng.open(str(tmp_path / "f.swap"), MiB)
        eng.inject_fault(op="write", mode="stall")
        req = eng.write(fs, 0, b"x" * 4096)
        with pytest.raises(TimeoutError):
            req.wait(timeout=0.05)
        assert not req.done() and eng.stats()["stalled"] == 1
        eng.clear_faults()
        assert req.wait(timeout=30) == 4096 and req.done()
        assert file_bytes(fs.paths[0])[:4096] == b"x" * 4096
        fs.close(remove=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_request_keeps_its_buffer_alive(backend, tmp_path):
    with IOEngine(backend) as eng:
        fs = eng.open(str(tmp_path / "f.swap"), MiB)
        assert eng.write(fs, 0, pattern(64 * KiB, 8)).wait() == 64 * KiB
        eng.inject_fault(op="read", mode="stall", count=2)
        buf = np.zeros(64 * KiB, dtype=np.uint8)
        ref = weakref.ref(buf)
        req = eng.read(fs, 0, buf)
        del buf
        gc.collect()
        assert ref() is not None  # held by the request
        # Dropping the request while in flight hands the buffer to the engine until completion.
        buf2 = np.zeros(64 * KiB, dtype=np.uint8)
        ref2 = weakref.ref(buf2)
        eng.read(fs, 0, buf2)  # the Request is dropped at once
        del buf2
        gc.collect()
        assert ref2() is not None
        eng.clear_faults()
        assert req.wait() == 64 * KiB
        gc.collect()
        assert ref() is None  # released at completion
        deadline = time.monotonic() + 30
        while ref2() is not None and time.monotonic() < deadline:
            eng.stats()  # engine calls release the buffers of completed, dropped requests
            gc.collect()
            time.sleep(0.001)
        assert ref2() is None
        fs.close(remove=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_with_requests_in_flight(backend, tmp_path):
    eng = IOEngine(backend, queue_depth=2, block_size="64KiB")
    fs = eng.open(str(tmp_path / "f.swap"), 8 * MiB)
    data = pattern(8 * MiB, 9)
    assert eng.write(fs, 0, data).wait() == 8 * MiB
    eng.inject_fault(op="read", mode="stall", count=3)
    stalled = [eng.read(fs, i * 64 * KiB, aligned(64 * KiB)) for i in range(3)]
    outs = [aligned(MiB) for _ in range(8)]
    big = [eng.read(fs, i * MiB, o) for i, o in enumerate(outs)]
    eng.close()
    eng.close()  # idempotent
    for req in stalled:  # held back by the fault: cancelled by close()
        with pytest.raises(IOEngineError) as info:
            req.wait(timeout=30)
        assert info.value.errno == errno.ECANCELED and "cancelled" in str(info.value)
    for i, req in enumerate(big):  # each either completed bit-exactly or was cancelled
        try:
            assert req.wait(timeout=30) == MiB
            assert np.array_equal(outs[i], data[i * MiB : (i + 1) * MiB])
        except IOEngineError as err:
            assert err.errno == errno.ECANCELED
    with pytest.raises(ConfigError, match="closed"):
        eng.read(fs, 0, bytearray(10))
    fs.close(remove=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["error", "stall"])
def test_chunks_finished_at_dispatch_free_their_slots(backend, mode, tmp_path):
    """Chunks failed or parked by a fault at dispatch must not leave queued work waiting."""
    with IOEngine(backend, queue_depth=2, block_size="4KiB") as eng:
        fs = eng.open(str(tmp_path / "f.swap"), MiB)
        data = pattern(64 * KiB, 12)
        assert eng.write(fs, 0, data).wait() == 64 * KiB
        eng.inject_fault(op="read", mode=mode, count=2)
        first = eng.read(fs, 0, aligned(8 * KiB))  # its two chunks take both slots and fault
        out = aligned(56 * KiB)
        rest = eng.read(fs, 8 * KiB, out)
        assert rest.wait(timeout=30) == 56 * KiB and np.array_equal(out, data[8 * KiB :])
        if mode == "stall":
            assert not first.done()
            eng.clear_faults()
            assert first.wait(timeout=30) == 8 * KiB
        else:
            with pytest.raises(IOEngineError):
                first.wait(timeout=30)
        fs.close(remove=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wait_is_interruptible_by_signals(backend, tmp_path):
    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    with IOEngine(backend) as eng:
        fs = eng.open(str(tmp_path / "f.swap"), MiB)
        eng.inject_fault(op="write", mode="stall")
        req = eng.write(fs, 0, b"y" * 4096)
        old = signal.signal(signal.SIGALRM, handler)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            with pytest.raises(Interrupted):
                req.wait()  # no timeout: only the signal ends this wait
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert not req.done()
        eng.clear_faults()
        assert req.wait(timeout=30) == 4096
        fs.close(remove=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_stress_concurrent_submitters_with_faults_and_close(backend, tmp_path):
    """Several threads doing random I/O on disjoint regions while faults (errors, short transfers,
    stalls) come and go and the engine is sometimes closed under them: every read that succeeds
    returns exactly what that thread's model says; every failure is one of the expected kinds."""
    rng0 = np.random.default_rng(1234)
    for rnd in range(12):
        eng = IOEngine(backend, queue_depth=int(rng0.choice([1, 2, 4, 16])), block_size="64KiB")
        size = 8 * MiB + int(rng0.integers(0, 100_000))
        paths = [str(tmp_path / f"s{rnd}_{i}") for i in range(int(rng0.integers(1, 4)))]
        fs = eng.open(paths, size, stripe="64KiB")
        region = size // 4
        problems: list[str] = []

        def worker(t: int, rnd=rnd, eng=eng, fs=fs, region=region, problems=problems) -> None:
            rng = np.random.default_rng(rnd * 100 + t)
            model = bytearray(region)
            staging = aligned(2 * MiB)
            base = t * region
            try:
                for _ in range(60):
                    off = int(rng.integers(0, region - 1))
                    n = int(rng.integers(1, min(region - off, MiB) + 1))
                    shift = int(rng.choice([0, 0, int(rng.integers(0, 4096))]))
                    buf = staging[shift : shift + n]
                    if rng.random() < 0.5:
                        data = rng.integers(0, 256, n, dtype=np.uint8)
                        buf[:] = data
                        try:
                            eng.write(fs, base + off, buf).wait()
                            model[off : off + n] = data.tobytes()
                        except IOEngineError:
                            check = bytearray(n)  # the range is unknown now: learn it
                            eng.read(fs, base + off, check).wait()
                            model[off : off + n] = check
                    else:
                        out = np.empty(n, dtype=np.uint8)
                        req = eng.read(fs, base + off, out)
                        if rng.random() < 0.2:
                            del req  # dropped in flight: the engine keeps `out` alive
                            continue
                        try:
                            req.wait()
                            if out.tobytes() != bytes(model[off : off + n]):
                                problems.append(f"thread {t}: wrong data at {off}+{n}")
                        except IOEngineError as err:
                            if err.errno not in (errno.EIO, errno.ECANCELED, None):
                                problems.append(repr(err))
            except (ConfigError, IOEngineError):
                return  # the engine was closed under this thread

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for _ in range(10):
            time.sleep(float(rng0.random()) * 0.01)
            mode = str(rng0.choice(["error", "short", "stall", "none"]))
            if mode != "none":
                op = str(rng0.choice(["read", "any"]))
                eng.inject_fault(
                    op=op, mode=mode, after=int(rng0.integers(0, 20)), count=int(rng0.integers(1, 5))
                )
            if rng0.random() < 0.5:
                eng.clear_faults()
        eng.clear_faults()
        if rng0.random() < 0.3:
            eng.close()
        for th in threads:
            th.join(timeout=120)
            assert not th.is_alive()
        eng.close()
        fs.close(remove=True)
        assert not problems, problems[:5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_with_unlink_leaves_no_name_and_keeps_data(backend, tmp_path):
    existing = tmp_path / "kept.swap"
    existing.write_bytes(b"x" * 4096)
    new = str(tmp_path / "new.swap")
    with IOEngine(backend) as eng:
        fs = eng.open([new, str(existing)], 2 * MiB, stripe="1MiB", unlink=True)
        assert sorted(os.listdir(tmp_path)) == ["kept.swap"]  # only files it created lose their name
        assert fs.paths == [new, str(existing)]  # still named, for messages
        data = np.arange(2 * MiB, dtype=np.uint8)
        eng.write(fs, 0, data).wait()
        out = np.zeros_like(data)
        eng.read(fs, 0, out).wait()
        assert np.array_equal(out, data)
        fs.close(remove=True)
    assert os.listdir(tmp_path) == []
