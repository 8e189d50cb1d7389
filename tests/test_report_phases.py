"""``rt.report()`` tells the steps' stalls apart from placing and giving back, and a closed runtime's
tiers hold nothing.

"compute waited on I/O" is a stall of the steps: waits while the model is placed on entry (before
any step) and while it is given back are counted on their own (``placing_wait_seconds``,
``leaving_wait_seconds``), never as a stall. After leaving, the report keeps the budgets and peaks
but shows nothing reserved or in use on any tier (the swap files are closed, the arenas freed).
"""

from __future__ import annotations

import time

import models
import pytest
import torch
from test_offload_numerics import streaming_budget

import tierrt
from tierrt.report import Counters, Report
from tierrt.store import HostTier, NvmeTierStore


@pytest.fixture
def slow_nvme(monkeypatch):
    """Every NVMe read and write takes 2 ms more (on the transfer thread): whoever needs one waits."""
    for name in ("read", "write"):
        original = getattr(NvmeTierStore, name)

        def slow(self, *args, _original=original):
            time.sleep(0.002)
            return _original(self, *args)

        monkeypatch.setattr(NvmeTierStore, name, slow)


def _train(model, opt, data) -> None:
    for batch in data:
        models.mlp_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()


def test_placing_and_leaving_waits_are_no_step_stall(nvme_dir, slow_nvme):
    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tiers = [tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(model, tiers=tiers, optimizer=opt) as rt:
        placed = rt.report()
        assert placed.total.steps == 0
        assert placed.total.stall_seconds == 0.0 and placed.total.stall_events == 0
        assert placed.total.placing_wait_seconds > 0  # the placement waited for its writes
        assert "compute waited on I/O 0.000s" in str(placed)
        assert "outside the steps: placing the model waited on I/O" in str(placed)
        _train(model, opt, models.mlp_batches(2))
        inside = rt.report().total
        assert inside.stall_seconds > 0 and inside.placing_wait_seconds == placed.total.placing_wait_seconds
        assert inside.leaving_wait_seconds == 0.0
    after = rt.report()
    assert after.total.stall_seconds == inside.stall_seconds  # leaving added no stall
    assert after.total.stall_events == inside.stall_events
    assert after.total.leaving_wait_seconds > 0  # the values were read back
    assert "giving it back" in str(after)
    figures = after.as_dict()["total"]
    assert figures["placing_wait_seconds"] == placed.total.placing_wait_seconds
    assert figures["leaving_wait_seconds"] == after.total.leaving_wait_seconds


def test_closed_tiers_hold_nothing(nvme_dir):
    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    budget = streaming_budget(model)
    tiers = [tierrt.dram(budget), tierrt.nvme(nvme_dir)]
    with tierrt.offload(model, tiers=tiers, optimizer=opt) as rt:
        _train(model, opt, models.mlp_batches(2))
        inside = rt.report().tiers
        assert inside["nvme"]["reserved"] == rt.store.nvme.size and inside["nvme"]["in_use"] > 0
        assert inside["dram"]["reserved"] == rt.store.dram.size > 0
    after = rt.report()
    for name in ("dram", "nvme"):
        tier = after.tiers[name]
        assert tier["reserved"] == 0 and tier["in_use"] == 0 and tier["free"] == 0, (name, tier)
        assert tier["budget"] == inside[name]["budget"]
        assert tier["peak_in_use"] >= inside[name]["in_use"] > 0
    text = str(after)
    assert "host arenas 0B" in text
    dram_row = next(line for line in text.splitlines() if line.strip().startswith("dram "))
    nvme_row = next(line for line in text.splitlines() if line.strip().startswith("nvme "))
    assert dram_row.split()[2:4] == ["0B", "0B"] and nvme_row.split()[2:4] == ["0B", "0B"]


def test_closed_host_tier_reserves_nothing_unless_still_viewed():
    """A closed host tier's arena goes back to the system once nothing views it: its figures then
    show nothing reserved; while a tensor kept from inside the context still views it, the whole
    arena stays, and the figures say so."""
    for keep in (False, True):
        tier = HostTier(tierrt.dram("1MiB"), 1 << 20)
        view = tier.alloc(8192).flat[:16]
        if not keep:
            del view
        tier.close()
        stats = tier.stats()
        figures = Report(Counters(), Counters(), {"dram": {**stats, "reserved": tier.size}}).tiers["dram"]
        if keep:
            assert stats["in_use"] == 8192 and figures["reserved"] == tier.size
        else:
            assert stats["in_use"] == 0 and figures["reserved"] == 0 and stats["free"] == 0
