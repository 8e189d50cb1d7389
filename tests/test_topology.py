"""Topology discovery on recorded sysfs trees (tests/fixtures/sysfs) and on this machine, live."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tierrt import topology
from tierrt.topology import discover, parse_cpulist, storage_info

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"
TWO_SOCKET = str(FIXTURES / "two_socket_cxl")
LAPTOP = str(FIXTURES / "laptop")
THIS = str(FIXTURES / "this_machine")


def test_parse_cpulist() -> None:
    assert parse_cpulist("0-3,8,10-11") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpulist("") == ()
    assert parse_cpulist("\n") == ()
    assert parse_cpulist("0-7:2") == (0, 2, 4, 6)
    assert topology.format_cpulist((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"


# -- two sockets + a CPU-less CXL node -------------------------------------------------------------


def test_two_socket_numa_nodes() -> None:
    topo = discover(TWO_SOCKET)
    assert [n.id for n in topo.numa_nodes] == [0, 1, 2]
    n0, n1, n2 = topo.numa_nodes
    assert n0.cpus == tuple(range(0, 64)) + tuple(range(128, 192))
    assert n1.cpus == tuple(range(64, 128)) + tuple(range(192, 256))
    assert n2.cpus == ()
    assert n0.distances == (10, 21, 14)
    assert n2.distances == (14, 24, 10)
    assert n1.distance_to(2) == 24
    assert n2.mem_total == 256 << 30
    assert n2.mem_free == 268173312 * 1024
    assert [n.is_cxl_candidate for n in topo.numa_nodes] == [False, False, True]
    assert [n.id for n in topo.cxl_nodes] == [2]
    assert [n.id for n in topo.cpu_nodes] == [0, 1]
    assert topo.nearest_cpu_node(2) == 0
    assert topo.nearest_cpu_node(1) == 1
    assert topo.cpu_count == 256
    assert topo.memory_total == 1324927616 * 1024
    assert topo.memory_available == 1290428416 * 1024
    assert topo.cpu_model == "Intel(R) Xeon(R) Platinum 8480+"
    assert topo.transparent_hugepages == "madvise"


def test_two_socket_gpus_from_recorded_pci_tree() -> None:
    gpus = discover(TWO_SOCKET).gpus
    # two NVIDIA 3D controllers; the BMC's VGA and the GPU's audio function are not GPUs
    assert [g.pci_bus_id for g in gpus] == ["0000:17:00.0", "0000:b1:00.0"]
    assert [g.index for g in gpus] == [0, 1]
    assert [g.numa_node for g in gpus] == [0, 1]
    assert all(g.pcie_gen == 5 and g.pcie_width == 16 for g in gpus)
    assert all(g.pcie_gen_current == 1 for g in gpus)  # idle link, trained down
    assert gpus[0].pcie_peak_gbps == pytest.approx(63.0, rel=0.01)
    assert discover(TWO_SOCKET, gpu=False).gpus == []


@pytest.mark.parametrize(
    ("path", "device", "disk", "model", "rotational", "lbs", "fs", "nvme", "numa"),
    [
        (
            "/mnt/nvme0/tier",
            "nvme0n1p1",
            "nvme0n1",
            "SAMSUNG MZQL23T8HCLS-00A07",
            False,
            4096,
            "ext4",
            True,
            0,
        ),
        ("/mnt/raid/a/b", "md0", "md0", "SAMSUNG MZQL23T8HCLS-00A07", False, 512, "xfs", True, 1),
        ("/data/x", "dm-0", "dm-0", "ST16000NM001G-2K", True, 512, "ext4", False, None),
        ("/home/user", "sda2", "sda", "INTEL SSDSC2KB480G8", False, 512, "ext4", False, None),
        (
            "/mnt/my models/m.bin",
            "nvme0n1p1",
            "nvme0n1",
            "SAMSUNG MZQL23T8HCLS-00A07",
            False,
            4096,
            "ext4",
            True,
            0,
        ),
    ],
)
def test_two_socket_storage(path, device, disk, model, rotational, lbs, fs, nvme, numa) -> None:
    s = storage_info(path, TWO_SOCKET)
    assert (s.device, s.disk, s.model, s.rotational) == (device, disk, model, rotational)
    assert (s.logical_block_size, s.filesystem, s.is_nvme, s.numa_node) == (lbs, fs, nvme, numa)
    # facts only the live machine can give are absent for a recorded tree
    assert s.free_bytes is None and s.total_bytes is None and s.supports_direct_io is None


def test_two_socket_stacked_devices_list_their_members() -> None:
    assert storage_info("/mnt/raid/x", TWO_SOCKET).underlying == ("nvme1n1", "nvme2n1")
    assert storage_info("/data", TWO_SOCKET).underlying == ("sdb",)
    assert storage_info("/data", TWO_SOCKET).mount_point == "/data"
    assert storage_info("/database", TWO_SOCKET).mount_point == "/"  # a prefix of the name is not a parent


def test_tmpfs_has_no_block_device() -> None:
    s = storage_info("/dev/shm/x", TWO_SOCKET)
    assert (s.filesystem, s.mount_point, s.device, s.model, s.is_nvme) == (
        "tmpfs",
        "/dev/shm",
        None,
        None,
        False,
    )


# -- a laptop ----------------------------------------------------------------------------------------


def test_laptop() -> None:
    topo = discover(LAPTOP, storage_paths=["/home/me/data", "/boot/efi/EFI", "/tmp/x", "/home/me/images/a"])
    assert len(topo.numa_nodes) == 1
    (n0,) = topo.numa_nodes
    assert n0.cpus == tuple(range(16)) and n0.distances == (10,) and not n0.is_cxl_candidate
    assert topo.cxl_nodes == ()
    assert topo.gpus == []  # an Intel iGPU only
    assert topo.cpu_count == 16
    home, efi, tmp, image = topo.storage
    # btrfs: anonymous device numbers (0:33); the device comes from the mount source
    assert (home.filesystem, home.device, home.disk, home.is_nvme) == ("btrfs", "nvme0n1p3", "nvme0n1", True)
    assert home.model == "SAMSUNG MZVL21T0HCLR-00BL2"
    assert home.rotational is False and home.logical_block_size == 512
    assert home.numa_node is None  # numa_node -1: the platform does not say
    assert (efi.filesystem, efi.device, efi.mount_point) == ("vfat", "nvme0n1p1", "/boot/efi")
    assert (tmp.filesystem, tmp.device) == ("tmpfs", None)
    # a loop device: its backing file lives on the NVMe drive
    assert (image.device, image.backing_file, image.underlying) == (
        "loop0",
        "/home/me/disk.img",
        ("nvme0n1",),
    )
    assert image.is_nvme and image.model == "SAMSUNG MZVL21T0HCLR-00BL2"


# -- this machine: recorded and live -----------------------------------------------------------------


def test_this_machine_recorded() -> None:
    topo = discover(THIS, storage_paths=["/", "/dev/shm/x"])
    assert [n.id for n in topo.numa_nodes] == [0]
    assert topo.numa_nodes[0].cpus == (0, 1)
    assert topo.gpus == []
    root, shm = topo.storage
    assert (root.device, root.filesystem, root.model) == ("vda", "ext4", None)  # virtio has no model
    assert root.logical_block_size == 512 and root.physical_block_size == 4096
    assert shm.filesystem == "tmpfs"


def test_live_discovery(tmp_path: Path) -> None:
    topo = discover("/", storage_paths=[tmp_path, tmp_path / "not" / "yet"])
    assert topo.numa_nodes and all(n.mem_total > 0 for n in topo.numa_nodes if n.cpus)
    assert sum(len(n.cpus) for n in topo.numa_nodes) == topo.cpu_count == os.cpu_count()
    assert topo.cpu_count >= 1 and topo.memory_total > 0
    s, later = topo.storage
    st = os.statvfs(tmp_path)
    assert s.total_bytes == st.f_blocks * st.f_frsize
    assert s.free_bytes is not None and s.free_bytes > 0
    assert s.filesystem and s.mount_point
    assert later.mount_point == s.mount_point  # a path not yet created resolves through its parent
    assert s.supports_direct_io in (True, False)
    assert not any(p.name.startswith(".tierrt-odirect") for p in tmp_path.iterdir())
    json.dumps(topo.summary())  # JSON-serialisable
    text = topo.describe()
    assert "NUMA nodes" in text and str(tmp_path) in text


def test_live_without_gpu_is_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert topology.gpus() == []
    assert discover().gpus == []
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_summary_is_plain_json() -> None:
    s = discover(TWO_SOCKET, storage_paths=["/mnt/nvme0"]).summary()
    again = json.loads(json.dumps(s))
    assert again == s
    assert again["numa_nodes"][2]["is_cxl_candidate"] is True
    assert again["gpus"][1]["numa_node"] == 1
    assert again["storage"][0]["device"] == "nvme0n1p1"


def test_record_fixture_roundtrip(tmp_path: Path) -> None:
    dest = tmp_path / "rec"
    files = topology.record_fixture(dest, "/", ["/"])
    assert "proc/meminfo" in files and "proc/self/mountinfo" in files
    assert all((dest / f).is_file() and not (dest / f).is_symlink() for f in files)
    live = discover("/", storage_paths=["/"], gpu=False)
    rec = discover(str(dest), storage_paths=["/"], gpu=False)
    assert [(n.id, n.cpus, n.distances) for n in rec.numa_nodes] == [
        (n.id, n.cpus, n.distances) for n in live.numa_nodes
    ]
    assert rec.cpu_count == live.cpu_count
    assert (rec.storage[0].device, rec.storage[0].filesystem) == (
        live.storage[0].device,
        live.storage[0].filesystem,
    )


def test_cli_prints_description() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tierrt.topology", "--root", TWO_SOCKET, "/mnt/nvme0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "CXL candidate" in out and "nvme0n1p1" in out and "PCIe gen5 x16" in out


# -- the cxl tier resolved against the NUMA nodes --------------------------------------------------


def test_cxl_without_a_node_binds_to_the_cpu_less_nodes(caplog: pytest.LogCaptureFixture) -> None:
    import tierrt
    from tierrt.tiers import resolve_cxl

    with caplog.at_level("INFO", logger="tierrt"):
        spec = resolve_cxl(tierrt.cxl("256GiB"), topology.numa_nodes(TWO_SOCKET))
    assert spec.nodes == (2,) and spec.name == "cxl"  # the arena is bound there; the name is as given
    assert spec.describe() == "cxl(256GiB, CPU-less NUMA node(s) 2)"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_cxl_without_cxl_memory_falls_back_to_dram_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    import tierrt
    from tierrt.tiers import resolve_cxl

    with caplog.at_level("WARNING", logger="tierrt"):
        spec = resolve_cxl(tierrt.cxl("8MiB"), topology.numa_nodes(LAPTOP))
    assert spec.nodes == () and spec.name == "cxl"
    assert spec.describe() == "cxl(8MiB, ordinary DRAM: this machine has no CPU-less NUMA node)"
    (record,) = caplog.records
    assert record.name == "tierrt" and record.levelname == "WARNING"
    assert "no CPU-less NUMA node" in record.message and "ordinary DRAM arena" in record.message


def test_cxl_on_named_nodes(caplog: pytest.LogCaptureFixture) -> None:
    import tierrt
    from tierrt.tiers import resolve_cxl

    two_socket, laptop = topology.numa_nodes(TWO_SOCKET), topology.numa_nodes(LAPTOP)
    assert (
        resolve_cxl(tierrt.cxl("1GiB", node=2), two_socket).describe()
        == "cxl2(1GiB, CPU-less NUMA node(s) 2)"
    )
    with pytest.raises(tierrt.ConfigError, match=r"node\(s\) 5 do not exist .* CPU-less \(CXL\) ones 2"):
        resolve_cxl(tierrt.cxl("1GiB", node=[2, 5]), two_socket)
    # a node with CPUs is used as asked (CXL emulated with a remote socket), said in its description;
    # a warning where the machine has CPU-less nodes that were not named, a note otherwise
    with caplog.at_level("INFO", logger="tierrt"):
        spec = resolve_cxl(tierrt.cxl("1GiB", node=1), two_socket)
        assert spec.nodes == (1,) and "which have CPUs: ordinary DRAM" in spec.describe()
        assert (
            caplog.records[-1].levelname == "WARNING" and "CPU-less (CXL) nodes are 2" in caplog.messages[-1]
        )
        spec = resolve_cxl(tierrt.cxl("1GiB", node=0), laptop)
        assert spec.nodes == (0,) and caplog.records[-1].levelname == "INFO"


def test_offload_with_a_cxl_tier_and_no_cxl_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch
    from torch import nn

    import tierrt
    import tierrt.tiers

    monkeypatch.setattr(tierrt.tiers, "numa_nodes", lambda: topology.numa_nodes(LAPTOP))
    model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(4)))
    tiers = [tierrt.dram("256KiB"), tierrt.cxl("8MiB"), tierrt.nvme(str(tmp_path))]
    with caplog.at_level("WARNING", logger="tierrt"):
        with tierrt.offload(model, tiers=tiers) as rt:
            model(torch.randn(2, 64))
            assert "ordinary DRAM" in rt.tier_specs[1].describe()
    assert any("no CPU-less NUMA node" in m for m in caplog.messages)
    with pytest.raises(tierrt.ConfigError, match="do not exist"):  # from offload(), nothing moved
        tierrt.offload(model, tiers=[tierrt.dram("256KiB"), tierrt.cxl("8MiB", node=3)])
