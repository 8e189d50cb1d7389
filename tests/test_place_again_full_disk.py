"""Placing the model again with an optimizer built inside the context, on a nearly full nvme tier.

The nvme tier has room for the placement the model was entered with, not for a second one beside it
(so placing again falls back to giving the model back into memory and placing it from there), and
not for the placement with AdamW's state either: the model is then placed again without that state
and AdamW stays adopted with its state in process memory, as the README promises, and the run
equals plain torch's bit for bit. When even the placement without it does not fit, the error says
that the model was given back into memory, and nothing is lost.

The filesystem is simulated (deterministic, no mount needed): ``shutil.disk_usage`` of the swap
directory reports a capacity the test sets, less what this process's swap files there take.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Callable

import models
import pytest
import torch
from test_optimizer_offload import assert_state_equal
from torch import nn

import tierrt

DRAM = "8MiB"
MIB = 1 << 20
WIDTH = 512  # 1MiB of weights per layer: AdamW's state needs 16MiB more on the nvme tier


class FakeDisk:
    """``shutil.disk_usage`` for ``directory`` as a filesystem of ``capacity`` bytes holding only the
    swap files this process has open there (they are unlinked, so they are found through
    ``/proc/self/fd``); other paths get the real answer."""

    def __init__(self, directory: str, capacity: int, real: Callable) -> None:
        self.directory = os.path.realpath(directory)
        self.capacity = capacity
        self.real = real

    def swap_bytes(self) -> int:
        seen: dict[tuple[int, int], int] = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith(self.directory + os.sep) and ".swap" in target:
                    stat = os.fstat(int(fd))
                    seen[(stat.st_dev, stat.st_ino)] = stat.st_size
            except OSError:
                continue  # the descriptor of the listing itself, or one closed meanwhile
        return sum(seen.values())

    def __call__(self, path: str | os.PathLike) -> shutil._ntuple_diskusage:  # type: ignore[name-defined]
        if not os.path.realpath(path).startswith(self.directory):
            return self.real(path)
        used = self.swap_bytes()
        return shutil._ntuple_diskusage(self.capacity, used, max(self.capacity - used, 0))  # type: ignore[attr-defined]


def model() -> nn.Module:
    return models.mlp(width=WIDTH, depth=8)


def nvme_needed(nvme_dir: str, with_adamw: bool) -> int:
    """The least the nvme tier must hold for the model (training, no optimizer given, or AdamW's
    state in the tiers), as tierrt computes it: an nvme budget of 1MiB is refused naming it."""
    probe = model()
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3) if with_adamw else None
    tiers = [tierrt.dram(DRAM), tierrt.nvme(nvme_dir, budget="1MiB")]
    with pytest.raises(tierrt.TierCapacityError, match="nvme budget") as caught:
        with tierrt.offload(probe, tiers=tiers, optimizer=opt):
            pass
    return caught.value.requested


def train(net: nn.Module, opt: torch.optim.Optimizer, batches: list) -> list[torch.Tensor]:
    losses = []
    for batch in batches:
        loss = models.mlp_loss(net, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())
    return losses


def assert_same_run(reference: nn.Module, ours: nn.Module, ref_losses: list, losses: list) -> None:
    assert len(ref_losses) == len(losses)
    for step, (a, b) in enumerate(zip(ref_losses, losses)):
        assert torch.equal(a, b), f"loss {step}: {a} vs {b}"
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.fixture
def disk(nvme_dir, monkeypatch) -> FakeDisk:
    """The nvme tier's filesystem: room for the placement with AdamW's state but 1MiB, so the
    placement without it fits, with room to spare for the check before placing again from the
    current placement (it used to pass there, and the runtime streamed from its closed store)."""
    plain, with_adamw = nvme_needed(nvme_dir, False), nvme_needed(nvme_dir, True)
    assert with_adamw - plain > 8 * MIB, (plain, with_adamw)
    fake = FakeDisk(nvme_dir, with_adamw - MIB, shutil.disk_usage)
    monkeypatch.setattr(shutil, "disk_usage", fake)
    return fake


def test_no_room_for_the_optimizers_state_places_the_model_again_without_it(nvme_dir, disk, caplog):
    """The acceptance probe's case: AdamW built inside the context and stepped once (adopted);
    ``zero_grad(set_to_none=True)`` places the model again with room for its state. There is no room
    for a second placement (fallback through memory) nor for the one with AdamW's state: the model
    is placed again without it, AdamW stays adopted with its state in memory, and training goes on
    equal to plain torch (it raised a bare AssertionError from zero_grad())."""
    reference = model()
    ours = copy.deepcopy(reference)
    batches = models.mlp_batches(4, width=WIDTH)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    ref_losses = train(reference, ref_opt, batches)
    with caplog.at_level(logging.WARNING, logger="tierrt"):
        with tierrt.offload(ours, tiers=[tierrt.dram(DRAM), tierrt.nvme(nvme_dir)]) as rt:
            opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
            losses = train(ours, opt, batches[:1])  # adopted; zero_grad() places the model again
            assert rt.active and rt.optimizer is None  # placed again, without AdamW's state
            assert all(set(bs.kinds) <= {"weight", "grad"} for bs in rt.blocks)
            assert disk.swap_bytes() <= disk.capacity
            losses += train(ours, opt, batches[1:])
            assert rt.optimizer is opt and not rt.blockwise.updater.state_in_tiers
    text = caplog.text
    assert "placing it again from process memory instead" in text
    assert "it is placed again without it" in text and "adopted at its next step()" in text
    assert_same_run(reference, ours, ref_losses, losses)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())
    assert disk.swap_bytes() == 0


def test_no_room_even_without_the_optimizers_state_gives_a_clear_error_and_loses_nothing(nvme_dir, disk):
    """As above, but the disk filled up meanwhile: not even the placement without AdamW's state
    fits any more. zero_grad() raises the capacity error with a note saying the model was given back
    into process memory; every value is there (training on in plain torch equals the plain run)."""
    reference = model()
    ours = copy.deepcopy(reference)
    batches = models.mlp_batches(4, width=WIDTH)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    ref_losses = train(reference, ref_opt, batches)
    with pytest.raises(tierrt.TierCapacityError) as caught:
        with tierrt.offload(ours, tiers=[tierrt.dram(DRAM), tierrt.nvme(nvme_dir)]) as rt:
            opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
            loss = models.mlp_loss(ours, batches[0])
            loss.backward()
            opt.step()
            losses = [loss.detach().clone()]
            disk.capacity = disk.swap_bytes() - 2 * MIB  # something else took the free space
            opt.zero_grad(set_to_none=True)
    error = caught.value
    notes = "\n".join(getattr(error, "__notes__", []))
    assert "given it back into process memory" in notes and "nothing is lost" in notes, notes
    assert "AdamW's state in its state" in notes
    assert not rt.active and rt.closed and disk.swap_bytes() == 0
    assert all(p.device.type == "cpu" and not p.is_meta for p in ours.parameters())
    losses += train(ours, opt, batches[1:])  # plain torch from here
    assert_same_run(reference, ours, ref_losses, losses)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())
