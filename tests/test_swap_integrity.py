"""What the swap files hold is checked, and the model comes back whole or says what it lost.

Every write to an NVMe tier notes a checksum of the bytes written; every read checks it, so a swap
file damaged outside tierrt (or a device returning wrong data) raises CorruptStoreError naming the
file, offset and size, never a silently wrong value. Leaving the context after such a loss gives back
every parameter it can and raises an error naming the lost ones (they hold NaN), even when the
with-block's own error is already propagating. Leaving also works when the DRAM tier has no room
left (its memory viewed by tensors kept from inside the forward): the values are read outside the
budget.
"""

from __future__ import annotations

import glob
import os

import models
import pytest
import torch
from test_offload_numerics import streaming_budget

import tierrt
from tierrt import _native
from tierrt.errors import CorruptStoreError, TierCapacityError


@pytest.mark.parametrize("nbytes", [0, 1, 7, 31, 32, 33, 4096, 3 * 4096 + 5, 1 << 20])
def test_checksum_instruction_and_table_agree_and_see_one_bit(nbytes):
    data = torch.randint(
        0, 256, (nbytes + 1,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes)
    )
    fast = _native.checksum(data.data_ptr(), nbytes)
    assert fast == _native.checksum(data.data_ptr(), nbytes, table_only=True)
    assert _native.checksum_impl() in ("sse4.2", "table")
    if nbytes:
        flipped = data.clone()
        flipped[nbytes // 2] ^= 1
        assert _native.checksum(flipped.data_ptr(), nbytes) != fast
    # the length counts: the same bytes and one more zero differ
    padded = torch.cat([data[:nbytes], torch.zeros(1, dtype=torch.uint8)])
    assert _native.checksum(padded.data_ptr(), nbytes + 1) != fast


def _plain(steps: int, data, opt_cls=torch.optim.AdamW, **opt_kwargs):
    model = models.mlp()
    opt = opt_cls(model.parameters(), **opt_kwargs)
    for batch in data[:steps]:
        models.mlp_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return model


def _open_swap_files(nvme_dir: str) -> dict[str, str]:
    """The swap files this process has open in ``nvme_dir``: their names are unlinked once opened,
    so they are reached through /proc/self/fd. Returns {path tierrt named: /proc/self/fd/N}."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        path = target.removesuffix(" (deleted)")
        if os.path.dirname(path) == os.path.realpath(nvme_dir) and path.endswith(".swap"):
            found[path] = f"/proc/self/fd/{fd}"
    return found


def _damage(nvme_dir: str) -> list[str]:
    """Flip the first byte of every 4 KiB page of every swap file."""
    files = _open_swap_files(nvme_dir)
    assert files
    for link in files.values():
        with open(link, "r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            for offset in range(0, size, 4096):
                handle.seek(offset)
                byte = handle.read(1)
                handle.seek(offset)
                handle.write(bytes([byte[0] ^ 0xFF]))
    return list(files)


def test_damaged_swap_file_raises_and_leaving_names_what_was_lost(nvme_dir):
    data = models.mlp_batches(4)
    reference = _plain(2, data, lr=1e-3)
    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tiers = [tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]
    with pytest.raises(CorruptStoreError) as leaving:
        with tierrt.offload(model, tiers=tiers, optimizer=opt):
            for batch in data[:2]:
                models.mlp_loss(model, batch).backward()
                opt.step()
                opt.zero_grad()
            files = _damage(nvme_dir)
            with pytest.raises(CorruptStoreError) as step:
                models.mlp_loss(model, data[2]).backward()
                opt.step()
            assert step.value.path in files and step.value.nbytes > 0 and step.value.offset >= 0
            assert "integrity check" in str(step.value) and step.value.path in str(step.value)
            raise step.value  # the with-block's own error: leaving must not hide the loss behind it
    lost = leaving.value.lost_parameters
    assert lost and "could not give back" in str(leaving.value)
    for name, param in model.named_parameters():
        if name in lost:
            assert torch.isnan(param).all(), name
        else:  # not read since the damage: the last committed step's value
            assert torch.equal(param, dict(reference.named_parameters())[name]), name
    assert not _open_swap_files(nvme_dir) and not glob.glob(os.path.join(nvme_dir, "*.swap"))


def test_leaving_with_the_dram_tier_full_of_held_memory_gives_the_model_back(nvme_dir):
    """Tensors kept from inside the forward (a hook stashing ``weight.detach()``, a traced graph)
    pin the DRAM tier's memory until a step cannot find room; leaving reads the values outside the
    budget and hands back the last completed step's weights, bit for bit."""
    data = models.mlp_batches(6)
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    tiers = [tierrt.dram(streaming_budget(model, adam=False)), tierrt.nvme(nvme_dir)]
    kept: list[torch.Tensor] = []
    completed = 0
    with pytest.raises(TierCapacityError, match="held by tensors outside tierrt"):
        with tierrt.offload(model, tiers=tiers, optimizer=opt):
            for step, batch in enumerate(data):
                if step == 2:
                    for module in model.modules():
                        if isinstance(module, torch.nn.Linear):
                            module.register_forward_hook(lambda m, args, out: kept.append(m.weight.detach()))
                models.mlp_loss(model, batch).backward()
                opt.step()
                opt.zero_grad()
                completed += 1
    assert 0 < completed < len(data)
    reference = _plain(completed, data, torch.optim.SGD, lr=1e-2)
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_verify_false_trains_the_same_without_checksums(nvme_dir):
    data = models.mlp_batches(3)
    reference = _plain(3, data, lr=1e-3)
    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tiers = [tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir, verify=False)]
    with tierrt.offload(model, tiers=tiers, optimizer=opt) as rt:
        for batch in data:
            models.mlp_loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
        assert rt.store.nvme._checksums == {}
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(tierrt.ConfigTypeError, match="verify"):
        tierrt.nvme(nvme_dir, verify="yes")
