"""tierrt-probe: a quick run (JSON shape, table, plot), the profile API, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tierrt.probe import LinkResult, Profile, default_profile_path, run_probe

REQUIRED = {"src", "dst", "op", "block_size", "queue_depth", "bytes", "seconds", "gbps"}
QUICK = ["--quick", "--size", "8MiB", "--dram-size", "4MiB", "--no-progress"]


def probe(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierrt.probe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_bad_input(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("tierrt-probe: error:"), lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in res.stderr


def test_quick_run_json_table_and_plot(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "profile.json"
    png = tmp_path / "links.png"
    res = probe(*QUICK, "--path", str(data), "--json", str(out), "--plot", str(png))
    assert res.returncode == 0, res.stderr
    assert list(data.iterdir()) == []  # the test file is gone
    doc = json.loads(out.read_text())
    assert doc["tierrt_version"] and doc["schema"] == 1
    assert doc["io_backend"]
    assert doc["topology"]["numa_nodes"] and "gpus" in doc["topology"]
    assert doc["topology"]["storage"][0]["path"] == str(data)
    links = doc["links"]
    assert links and all(REQUIRED <= set(r) for r in links)
    assert all(r["gbps"] > 0 and r["seconds"] > 0 and r["bytes"] > 0 for r in links)
    ops = {(r["src"].split(":")[0], r["dst"].split(":")[0], r["op"]) for r in links}
    assert ("dram", "dram", "copy") in ops
    assert ("nvme", "dram", "read") in ops and ("dram", "nvme", "write") in ops
    nvme = [r for r in links if r["op"] in ("read", "write")]
    assert {r["block_size"] for r in nvme} == {128 << 10, 1 << 20}
    assert all(r["direct"] is True for r in nvme)  # ext4 under tmp_path takes O_DIRECT
    assert {r["threads"] for r in links if r["op"] == "copy"} == {1, os.cpu_count()}
    if len(doc["topology"]["numa_nodes"]) == 1:  # one node: every host buffer is on it, by one name
        assert {r["src"] for r in links if r["op"] in ("copy", "write")} == {"dram:0"}
    if not doc["topology"]["gpus"]:
        assert "gpu" in doc["skipped"]
    # the table on stdout
    assert "GB/s" in res.stdout and "copy" in res.stdout and str(out) in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the Python API reads it back
    prof = Profile.load(out)
    assert prof.bandwidth("nvme", "dram", op="read") > 0
    assert prof.bandwidth(f"nvme:{data}", "dram", op="read", block_size="1MiB") == max(
        r["gbps"] for r in nvme if r["op"] == "read" and r["block_size"] == 1 << 20
    )


def test_run_probe_api_links_selection(tmp_path: Path) -> None:
    prof = run_probe(
        path=tmp_path, quick=True, size="4MiB", links=["nvme"], block_sizes=["1MiB"], queue_depths=[4]
    )
    assert {(r.op, r.block_size, r.queue_depth) for r in prof.links} == {
        ("write", 1 << 20, 4),
        ("read", 1 << 20, 4),
    }
    assert all(r.bytes == 4 << 20 for r in prof.links)
    assert list(tmp_path.iterdir()) == []
    saved = prof.save(tmp_path / "sub" / "p.json")
    assert Profile.load(saved).links == prof.links


def test_profile_bandwidth_matching() -> None:
    def rec(src: str, dst: str, op: str, bs: int, qd: int, gbps: float) -> LinkResult:
        return LinkResult(src, dst, op, bs, qd, 1 << 30, (1 << 30) / gbps / 1e9, gbps)

    p = Profile(
        links=[
            rec("nvme:/a", "dram:0", "read", 128 << 10, 1, 0.5),
            rec("nvme:/a", "dram:0", "read", 1 << 20, 32, 3.0),
            rec("nvme:/a", "dram:0", "read", 8 << 20, 32, 3.4),
            rec("dram:0", "nvme:/a", "write", 1 << 20, 32, 2.0),
            rec("dram:0", "gpu:0", "h2d", 1 << 28, 1, 24.0),
            rec("cxl:2", "cxl:2", "copy", 1 << 29, 1, 11.0),
        ]
    )
    assert p.bandwidth("nvme", "dram", op="read") == 3.4
    assert p.bandwidth("nvme", "dram", op="read", block_size="128KiB") == 0.5
    assert p.bandwidth("nvme", "dram", op="read", block_size="2MiB") == 3.0  # nearest on a log scale
    assert p.bandwidth("dram:0", "nvme:/a", op="write") == 2.0
    assert p.bandwidth("dram", "nvme") == 2.0
    assert p.bandwidth("dram", "gpu") == 24.0
    assert p.bandwidth("cxl", "cxl", op="copy") == 11.0
    with pytest.raises(KeyError, match="no measured link"):
        p.bandwidth("nvme:/b", "dram")
    with pytest.raises(KeyError):
        p.bandwidth("gpu", "dram", op="d2h")


def test_default_profile_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_profile_path() == tmp_path / "tierrt" / "profile.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_profile_path() == Path.home() / ".cache" / "tierrt" / "profile.json"


def test_load_errors(tmp_path: Path) -> None:
    from tierrt.errors import ConfigError

    with pytest.raises(ConfigError, match="run `tierrt-probe`"):
        Profile.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Profile.load(tmp_path / "bad.json")


# -- bad input: one line, exit 2, nothing left behind ----------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    res = probe(*QUICK, "--path", str(tmp_path / "nope"), "--json", str(tmp_path / "p.json"))
    assert_bad_input(res, "no such directory", str(tmp_path / "nope"))
    assert list(tmp_path.iterdir()) == []


def test_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    res = probe(*QUICK, "--path", str(f), "--json", str(tmp_path / "p.json"))
    assert_bad_input(res, "not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_unwritable_path(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i not available here")
    try:
        res = probe(*QUICK, "--path", str(d), "--json", str(tmp_path / "p.json"))
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    assert_bad_input(res, "cannot create files", "Operation not permitted")
    assert list(d.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["ro"]


def test_not_enough_space(tmp_path: Path) -> None:
    d = tmp_path / "tiny"
    d.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1M", "none", str(d)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs root and tmpfs mounts")
    try:
        res = probe(*QUICK, "--path", str(d), "--json", str(tmp_path / "p.json"))
        assert_bad_input(res, "not enough free space", "8MiB")
        assert list(d.iterdir()) == []
    finally:
        subprocess.run(["umount", str(d)], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_bad_sizes_and_json_dir(tmp_path: Path) -> None:
    assert_bad_input(probe("--size", "12 parsecs", "--path", str(tmp_path)), "size")
    assert_bad_input(probe("--size", "1000", "--path", str(tmp_path)), "at least 1MiB")
    assert_bad_input(
        probe(*QUICK, "--path", str(tmp_path), "--json", str(tmp_path / "x" / "p.json")), "--json"
    )
    assert list(tmp_path.iterdir()) == []


def test_outputs_that_are_directories_and_empty_choices(tmp_path: Path) -> None:
    # each refused before anything is measured (an existing directory as --json failed with a raw
    # IsADirectoryError after the run; "--links ," saved an empty profile over the default one)
    assert_bad_input(probe(*QUICK, "--path", str(tmp_path), "--json", str(tmp_path)), "--json", "directory")
    assert_bad_input(probe(*QUICK, "--links", "dram", "--plot", str(tmp_path)), "--plot", "directory")
    assert_bad_input(probe(*QUICK, "--links", ","), "--links")
    assert_bad_input(probe(*QUICK, "--path", str(tmp_path), "--queue-depths", "1,x"), "--queue-depths")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def immutable_dir(tmp_path: Path):
    """A directory no file can be created in, even by root (chattr +i: EPERM)."""
    d = tmp_path / "ro"
    d.mkdir()
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i not available here")
    yield d
    subprocess.run(["chattr", "-i", str(d)], check=True)


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_outputs_that_cannot_be_written_are_refused_before_measuring(flag: str, immutable_dir: Path) -> None:
    # they were measured first, then died with a traceback (for --json, the EPERM/EROFS hidden by a
    # second OSError from removing the temporary file)
    target = immutable_dir / "out"
    others = ["--json", str(immutable_dir.parent / "p.json")] if flag == "--plot" else []
    res = probe(*QUICK, "--links", "dram", flag, str(target), *others)
    assert_bad_input(res, f"{flag} {target}: cannot write in {immutable_dir}", "(errno 1)")
    assert res.stdout == ""  # nothing was measured
    assert list(immutable_dir.iterdir()) == [] and not (immutable_dir.parent / "p.json").exists()


def test_profile_save_failures_are_tier_path_errors_naming_path_and_errno(
    immutable_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from tierrt.errors import TierPathError

    profile = Profile(links=[])
    with pytest.raises(TierPathError, match=f"cannot write {immutable_dir / 'p.json'}") as info:
        profile.save(immutable_dir / "p.json")
    assert info.value.errno == errno.EPERM and info.value.path == str(immutable_dir / "p.json")
    # a write failing part way (the disk filled): the old file stays, no temporary file is left
    old = tmp_path / "p.json"
    old.write_text("old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(TierPathError, match="the disk is full") as info:
        profile.save(old)
    assert info.value.errno == errno.ENOSPC
    assert old.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "ro"]


def test_a_save_failing_after_the_run_is_one_line_and_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno

    from tierrt import probe as probe_module

    monkeypatch.setattr(probe_module, "run_probe", lambda **_: Profile(links=[]))

    def remounted_read_only(fd: int) -> None:  # the filesystem went read-only during the run
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "fsync", remounted_read_only)
    assert probe_module.main(["--links", "dram", "--json", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"tierrt-probe: error: bandwidth profile: cannot write {tmp_path / 'p.json'}: Read-only file system "
        "(errno 30); the filesystem is read-only"
    ]
    assert list(tmp_path.iterdir()) == []


def test_block_sizes_larger_than_the_test_file(tmp_path: Path) -> None:
    # asked for: refused (it printed an empty NVMe table and "profile saved", status 0)
    res = probe(
        *QUICK, "--links", "nvme", "--size", "4MiB", "--block-sizes", "1MiB,8MiB", "--path", str(tmp_path)
    )
    assert_bad_input(
        res, "block size 8MiB is larger than the NVMe test file (4MiB)", "--size", "--block-sizes"
    )
    assert list(tmp_path.iterdir()) == []
    # a default block size that does not fit is left out, and the profile says so
    prof = run_probe(path=tmp_path, size="4MiB", links=["nvme"], queue_depths=[1])
    assert {r.block_size for r in prof.links} == {128 << 10, 1 << 20}
    assert prof.skipped == {"nvme 8MiB blocks": "larger than the 4MiB test file (--size)"}
    assert "skipped nvme 8MiB blocks" in prof.table()


def test_plot_without_matplotlib(tmp_path: Path) -> None:
    # a matplotlib that cannot be imported, first on the path
    blocker = tmp_path / "block" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib blocked for this test')\n")
    data = tmp_path / "data"
    data.mkdir()
    res = probe(
        *QUICK,
        "--path",
        str(data),
        "--json",
        str(tmp_path / "p.json"),
        "--plot",
        str(tmp_path / "p.png"),
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "block"), os.environ.get("PYTHONPATH", "")])},
    )
    assert_bad_input(res, "matplotlib")
    assert list(data.iterdir()) == [] and not (tmp_path / "p.json").exists()


def test_ctrl_c_removes_the_test_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tierrt.probe",
            "--quick",
            "--links",
            "nvme",
            "--size",
            "1GiB",
            "--no-progress",
            "--path",
            str(data),
            "--json",
            str(tmp_path / "p.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(data.iterdir()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert list(data.iterdir()) == []
    assert not (tmp_path / "p.json").exists()


def test_console_script_installed() -> None:
    exe = shutil.which("tierrt-probe", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("not installed with pip -e here")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--quick" in res.stdout


def test_info_reports_backends_and_features(tmp_path: Path) -> None:
    import tierrt

    facts = tierrt.info(tmp_path)
    json.dumps(facts)
    assert facts["version"] and facts["native_module"]["built"] is True
    assert facts["o_direct"] == {
        "path": str(tmp_path),
        "supported": True,
        "filesystem": facts["o_direct"]["filesystem"],
        "device": facts["o_direct"]["device"],
    }
    assert facts["numa_nodes"] and facts["numa_nodes"][0]["id"] == 0
    assert facts["transparent_hugepages"]["enabled"] in ("always", "madvise", "never")
    assert facts["mlock_limit"]["soft"] is not None
    assert isinstance(facts["cuda"]["available"], bool)
    assert facts["torch_sqrt_rounding"] in ("ieee", "rsqrt14", "halves")
    text = tierrt.format_info(facts)
    for word in (
        "native module",
        "io backends",
        "O_DIRECT",
        "transparent hugepages",
        "NUMA",
        "CUDA",
        "mlock",
        "torch's fp32 sqrt",
    ):
        assert word in text
    out = subprocess.run(
        [sys.executable, "-m", "tierrt.sysinfo", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0 and "O_DIRECT under" in out.stdout
    assert list(tmp_path.iterdir()) == []  # the O_DIRECT check leaves nothing behind
