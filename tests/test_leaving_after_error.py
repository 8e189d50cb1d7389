"""Leaving the with-block while its own error propagates, when giving the model back fails too.

The disk fails for good after step 2's ``step()`` returned (its updates still pending, as
``deferred_step`` leaves them) and the loop then raises. Leaving applies the pending updates, their
writes home fail, and step 2 is rolled back: the model is given back with step 1's values and step
count. That used to be told in a logged traceback only, while the user got the block's own error;
now that error carries a note saying step 2 was rolled back and which values the model holds.
"""

from __future__ import annotations

import copy
import errno

import pytest
import torch
from torch import nn

import tierrt

DRAM = "400KiB"


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(128, 128) for _ in range(6)])


def batches(count: int) -> list[torch.Tensor]:
    return [torch.randn(4, 128, generator=torch.Generator().manual_seed(i)) for i in range(count)]


def step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    net(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def plain_run(count: int) -> list[tuple[list[torch.Tensor], dict]]:
    """Parameters and optimizer state after each of ``count`` plain torch steps."""
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    after = []
    for x in batches(count):
        step(net, opt, x)
        after.append(([p.detach().clone() for p in net.parameters()], copy.deepcopy(opt.state_dict())))
    return after


def assert_holds(net: nn.Module, opt: torch.optim.Optimizer, expected: tuple[list, dict]) -> None:
    values, state = expected
    for (name, p), value in zip(net.named_parameters(), values, strict=True):
        assert torch.equal(p, value), name
    got = opt.state_dict()["state"]
    assert set(got) == set(state["state"])
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(got[index][key], value), f"state {index}.{key}"


def text_of(error: BaseException) -> str:
    return "\n".join([str(error), *getattr(error, "__notes__", [])])


def test_a_step_rolled_back_on_leaving_is_told_on_the_blocks_own_error(nvme_dir):
    """Deterministic: no update runs during backward (``overlap_backward=False``), so every update
    of step 2 is pending when the loop raises; each of their writes home fails on leaving."""
    after = plain_run(2)
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    tiers = [tierrt.dram(DRAM), tierrt.nvme(nvme_dir)]
    with pytest.raises(KeyError, match="the loop's own error") as caught:
        with tierrt.offload(net, tiers=tiers, optimizer=opt, overlap_backward=False) as rt:
            for x in batches(2):
                step(net, opt, x)
            assert rt.blockwise.updates.pending  # step 2's updates wait for the next use
            rt.engine.inject_fault(op="write", errno=errno.EIO, after=0, count=-1)  # for good
            raise KeyError("the loop's own error")
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "leaving the with-block after this error" in notes, notes
    assert "Step 2 (counting the optimizer.step() calls" in notes and "was rolled back" in notes, notes
    assert "hold step 1's values again" in notes, notes
    assert_holds(net, opt, after[0])
    assert rt.closed and not rt.active


def test_a_disk_failing_for_good_says_which_step_the_model_holds(nvme_dir):
    """The acceptance probe's case: the disk fails for good between steps, and the next forward
    fails on a write. Whichever write fails first (a gradient's, or step 2's state), the error the
    user gets says that step 2 was rolled back, and the model holds step 1's values."""
    after = plain_run(2)
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    data = batches(3)
    with pytest.raises(tierrt.IOEngineError) as caught:
        with tierrt.offload(net, tiers=[tierrt.dram(DRAM), tierrt.nvme(nvme_dir)], optimizer=opt) as rt:
            for x in data[:2]:
                step(net, opt, x)
            rt.engine.inject_fault(op="write", errno=errno.EIO, after=0, count=-1)
            step(net, opt, data[2])
    text = text_of(caught.value)
    assert "Step 2 (counting the optimizer.step() calls" in text and "was rolled back" in text, text
    assert "hold step 1's values again" in text, text
    assert_holds(net, opt, after[0])
    assert not any(torch.isnan(p).any() for p in net.parameters())


def test_a_step_rolled_back_on_leaving_without_an_error_in_the_block_is_raised(nvme_dir):
    """The same without an error in the block: leaving raises the rollback itself (not the write
    error that came first, now a note of it), and the optimizer's state is given back, at step 1."""
    after = plain_run(2)
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    tiers = [tierrt.dram(DRAM), tierrt.nvme(nvme_dir)]
    with pytest.raises(tierrt.IOEngineError, match=r"Step 2 \(counting .* was rolled back") as caught:
        with tierrt.offload(net, tiers=tiers, optimizer=opt, overlap_backward=False) as rt:
            for x in batches(2):
                step(net, opt, x)
            rt.engine.inject_fault(op="write", errno=errno.EIO, after=0, count=-1)
    assert "hold step 1's values again" in str(caught.value)
    assert not getattr(caught.value, "lost_parameters", None)
    assert_holds(net, opt, after[0])
