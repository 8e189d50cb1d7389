"""The NVMe extent pool: freed extents come back for the same size, so copy-on-write churn over a few
sizes cannot fragment the tier."""

from __future__ import annotations

import random

import pytest

from tierrt.errors import ConfigError, TierCapacityError
from tierrt.extents import ExtentPool

MiB = 1 << 20


def test_freed_extent_is_reused_for_its_size():
    pool = ExtentPool(64 * MiB, 4096)
    a = pool.alloc(3 * MiB)
    b = pool.alloc(5 * MiB)
    pool.free(a)
    assert pool.alloc(3 * MiB) == a
    assert pool.stats()["in_use"] == 8 * MiB
    pool.free(b)
    with pytest.raises(ConfigError, match="no extent"):
        pool.free(b)
    with pytest.raises(ConfigError, match="positive size"):
        pool.alloc(0)


def test_larger_extent_is_lent_when_nothing_else_is_free():
    pool = ExtentPool(10 * MiB, 4096)
    big = pool.alloc(6 * MiB)
    pool.alloc(4 * MiB)
    pool.free(big)
    lent = pool.alloc(2 * MiB)  # nothing left to carve: the 6 MiB extent is lent
    assert lent == big and pool.stats()["in_use"] == 10 * MiB
    pool.free(lent)
    assert pool.alloc(6 * MiB) == big  # back in its own size's list
    with pytest.raises(TierCapacityError, match="no room") as info:
        pool.alloc(1 * MiB)
    assert info.value.details["requested"] == MiB


def test_copy_on_write_churn_of_mixed_sizes_never_runs_out():
    """Blocks of two sizes, each kind kept as home + previous step + one update in flight, rewritten
    in random order for many steps: a tier sized for that peak always has room (the native best-fit
    allocator, merging free ranges, fails this at step 78: 750 MiB free, largest extent 172 MiB)."""
    rng = random.Random(0)
    sizes = [168 * MiB] * 20 + [250 * MiB] * 2 + [8192] * 3
    pool = ExtentPool(sum(sizes) * 2 + 3 * 250 * MiB, 4096)
    home = [pool.alloc(s) for s in sizes]
    for _ in range(200):
        order = list(range(len(sizes)))
        rng.shuffle(order)
        undo = []
        for i in order:  # the step: a new copy of every kind; the old one kept until it commits
            new = pool.alloc(sizes[i])
            undo.append(home[i])
            home[i] = new
            if rng.random() < 0.3:  # an update during backward held one more extent for a while
                pool.free(pool.alloc(sizes[i]))
        for extent in undo:  # commit
            pool.free(extent)
    assert pool.stats()["in_use"] == sum(-(-s // 4096) * 4096 for s in sizes)
