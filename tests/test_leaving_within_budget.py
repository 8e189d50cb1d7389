"""Leaving the context keeps to the DRAM budget unless memory kept by the user leaves no room.

Giving the model back applies the last step's pending updates. An update needs all its inputs in
DRAM at once; when the block's own copies already there split the free room into pieces too small
for the rest, tierrt lets go of those copies and places all of them again, inside the context and
when leaving alike: no value is read outside the budget and nothing warns. Only memory that tensors
kept from inside the context still view makes leaving read values outside the budget, and the
warning then says so (how much); the arena's own buffers leaving no room in one piece is logged at
info level, worded as such.
"""

from __future__ import annotations

import logging

import models
import torch

import tierrt
from tierrt.blocks import partition_model
from tierrt.placement import plan_placement
from tierrt.store import HostTier, KindLayout, KindState, TensorStore

PAGE = 4096


def _plain(steps: int, data) -> torch.nn.Module:
    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in data[:steps]:
        models.mlp_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return model


def _fragment_with_own_copies(rt, bs, kinds: list[str]) -> None:
    """Empty the DRAM arena, then give ``bs``'s ``kinds`` DRAM buffers (contents not read yet)
    placed so that the free room around them is in pieces each smaller than one more of them."""
    pipeline, store = rt.pipeline, rt.store
    pipeline.drain()
    for other in rt.blocks:
        for kind, ks in other.kinds.items():
            if ks.host is not None and ks.home != "dram":
                pipeline.evict(other, kind, "dram")
    arena = store.dram.arena
    assert arena.stats()["in_use"] == 0
    size = bs.kinds[kinds[0]].nbytes
    free_pages = (arena.stats()["capacity"] - len(kinds) * size) // PAGE
    pieces = len(kinds) + 1
    gap = -(-free_pages // pieces)  # the free room, in pieces of at most this many pages
    assert gap * PAGE < size, "the arena is too large for this layout"
    fillers = []
    for kind in kinds:  # from the bottom, one after the other: filler, buffer, filler, buffer, ...
        fillers.append(arena.try_alloc(gap * PAGE, from_top=False))
        ks = bs.kinds[kind]
        assert ks.home == "nvme" and "dram" not in ks.valid and ks.nbytes == size
        ks.host = store.dram.try_alloc(ks.nbytes)  # from the bottom too, right after the filler
    del fillers
    stats = arena.stats()
    assert stats["largest_free"] < size <= stats["free"], stats


def test_pending_update_split_by_its_own_copies_is_placed_again_when_leaving(nvme_dir, caplog):
    data = models.mlp_batches(3)
    reference = _plain(3, data)
    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with caplog.at_level(logging.INFO, logger="tierrt"):
        # The working set: exactly room for one update's inputs and the block computing.
        probe = plan_placement(
            partition_model(model),
            compute="dram",
            budgets={"dram": 1 << 40, "nvme": None},
            compute_dtype=None,
            depth=0,
            state_kinds={"exp_avg": torch.float32, "exp_avg_sq": torch.float32},
        )
        tiers = [tierrt.dram(probe.working_set), tierrt.nvme(nvme_dir)]
        with tierrt.offload(model, tiers=tiers, optimizer=opt, overlap_backward=False) as rt:
            for batch in data:
                models.mlp_loss(model, batch).backward()
                opt.step()  # deferred: the updates are pending until each block is used again
                opt.zero_grad()
            updates = rt.blockwise.updates
            bs = rt.blocks[updates.order[0]]  # the update leaving applies first
            kinds = updates.input_kinds(bs)
            _fragment_with_own_copies(rt, bs, kinds[:-1])  # every input but one has a buffer
    assert rt.store.overflowed == 0
    assert not any("outside" in record.getMessage() for record in caplog.records)
    for (name, a), b in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), name


def _overflow_store() -> tuple[TensorStore, list[KindState]]:
    tier = HostTier(tierrt.dram("64KiB"), 64 << 10)
    store = TensorStore({"dram": tier}, None, None)
    layout = KindLayout("exp_avg", (0,), (torch.float32,), (0,), 2 * PAGE)
    return store, [KindState(layout, "nvme") for _ in range(3)]


def test_overflow_warns_only_about_memory_kept_by_the_user(caplog):
    store, (first, second, third) = _overflow_store()
    with caplog.at_level(logging.INFO, logger="tierrt"):
        store.alloc_overflow(first, held_outside=0)  # the arena's own buffers: info, no warning
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        (info,) = caplog.records
        assert "tierrt's own buffers" in info.getMessage() and "viewed" not in info.getMessage()
        store.alloc_overflow(second, held_outside=3 * PAGE)  # tensors kept by the user: a warning
        store.alloc_overflow(third, held_outside=3 * PAGE)  # once
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "12KiB of the dram tier still viewed by tensors kept from inside the context" in warnings[0]
    assert store.overflowed == 3 * 2 * PAGE
    assert all(ks.host is not None and ks.host.tier is None for ks in (first, second, third))
