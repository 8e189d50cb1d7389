"""Optimizer updates overlapped with backward (speculative, committed by step()): same results as the
synchronous step, and discarded whenever the step would use different inputs."""

from __future__ import annotations

import copy
import errno
import sys
import threading
import time

import models
import pytest
import torch
from test_offload_numerics import streaming_budget
from tierrt.scheduler.transfer import Transfer

import tierrt


def loop(model, opt, data, *, change_lr_before_step=False, accumulate=1, clip=None):
    losses = []
    for i, ids in enumerate(data):
        loss = models.lm_loss(model, ids)
        (loss / accumulate).backward()
        if (i + 1) % accumulate:
            continue
        if change_lr_before_step:  # hyperparameters edited between backward and step
            for group in opt.param_groups:
                group["lr"] *= 0.5
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())
    return losses


def plain_run(steps: int, **kwargs):
    """A Llama trained by plain torch (AdamW, ``loop``) over ``steps`` batches, and for tierrt an
    untrained copy of it with its own optimizer: (reference, its losses, ours, our optimizer, data)."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(steps)
    ref = loop(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3), data, **kwargs)
    return reference, ref, ours, torch.optim.AdamW(ours.parameters(), lr=1e-3), data


def assert_same_run(reference, ref_losses, ours, losses) -> None:
    """Bitwise the same losses and final weights as the plain run."""
    assert len(losses) == len(ref_losses)
    for a, b in zip(ref_losses, losses):
        assert torch.equal(a, b)
    for (name, a), b in zip(reference.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), name


def run_both(nvme_dir, setup=None, offload_kwargs=None, **kwargs):
    reference, ref, ours, opt, data = plain_run(6, **kwargs)
    budget = streaming_budget(ours, extra_blocks=6)
    tiers = [tierrt.dram(budget), tierrt.nvme(nvme_dir)]
    with tierrt.offload(ours, tiers=tiers, optimizer=opt, **(offload_kwargs or {})) as rt:
        if setup is not None:
            setup(rt)
        got = loop(ours, opt, data, **kwargs)
        speculator = rt.blockwise.updates.speculator
        report = rt.report()
    assert_same_run(reference, ref, ours, got)
    return speculator, report


def test_updates_overlap_backward_and_match_the_synchronous_step(nvme_dir):
    speculator, report = run_both(nvme_dir)
    total = report.total
    assert speculator.committed > 0  # updates started during backward were used
    assert total.optimizer_overlap_seconds > 0
    assert "overlapped backward" in str(report)
    # The first step learns the loop's pattern; from the second on, the blocks are updated during
    # backward (the previous step is committed as soon as it is home, so its extents are free).
    # A block whose buffers find no room at that moment (an earlier update's write still running,
    # which depends on the machine's load) is updated in step() instead: require most, not all.
    steps, blocks = 6, total.block_updates // 6
    assert total.block_updates == steps * blocks
    assert total.block_updates_in_backward >= (steps - 1) * blocks // 2
    assert speculator.committed == total.block_updates_in_backward
    last = report.step
    assert f"{last.block_updates_in_backward} of {last.block_updates} block updates" in str(report)


def test_hyperparameters_changed_before_step_discard_the_speculation(nvme_dir):
    speculator, _ = run_both(nvme_dir, change_lr_before_step=True)
    assert speculator.discarded > 0 and speculator.committed == 0


@pytest.mark.parametrize("kwargs", [{"accumulate": 2}, {"clip": 0.5}])
def test_accumulation_and_clipping_do_not_speculate(kwargs, nvme_dir):
    speculator, _ = run_both(nvme_dir, **kwargs)
    assert speculator.committed == 0


def test_step_commits_updates_still_being_written(nvme_dir):
    """The last blocks of backward are still writing their updated state home when step() comes:
    step() does not wait for those writes; the DRAM copies are current at once and the writes land
    later as ordinary writes in flight. Results stay bitwise those of torch."""

    def slow_speculative_writes(rt):
        nvme = rt.pipeline.store.nvme
        write = nvme.write

        def delayed(*args, **kwargs):
            if threading.current_thread().name == "tierrt-optimizer-write":
                time.sleep(0.05)  # a slow disk: every update's write outlasts a tiny model's step
            return write(*args, **kwargs)

        nvme.write = delayed

    speculator, report = run_both(nvme_dir, setup=slow_speculative_writes)
    assert speculator.adopted > 0  # committed while their writes were in flight
    assert report.total.block_updates_in_backward == speculator.committed


def test_overlap_backward_off_runs_every_update_in_step(nvme_dir):
    speculator, report = run_both(nvme_dir, offload_kwargs={"overlap_backward": False})
    assert speculator.committed == 0 and report.total.block_updates_in_backward == 0
    assert report.total.block_updates > 0


def test_zero_grad_forgets_gradient_writes_in_flight(nvme_dir, caplog):
    """zero_grad(set_to_none=True) does not wait for gradients still being written home: the writes
    run on and their value is forgotten when they land; one that fails is logged, not raised.

    In the last step every gradient write is held until zero_grad() has returned (anything waiting
    for one before that would time out below). Then the forgotten ones fail; the others (a block
    whose update is still pending keeps its gradients) land normally."""
    reference, ref, ours, opt, data = plain_run(3)
    tiers = [tierrt.dram(streaming_budget(ours, extra_blocks=6)), tierrt.nvme(nvme_dir)]
    release = threading.Event()
    held = {"on": False, "writes": 0, "timeouts": 0, "fail": set()}
    with tierrt.offload(ours, tiers=tiers, optimizer=opt) as rt:
        nvme = rt.pipeline.store.nvme
        grads = {bs.kinds["grad"].extent: bs for bs in rt.pipeline.blocks if "grad" in bs.kinds}
        assert None not in grads
        write = nvme.write

        def held_gradient_writes(extent, buf, size):
            if held["on"] and extent in grads:
                held["writes"] += 1
                if not release.wait(60):  # generous: a loaded machine is slow, a deadlock is not
                    held["timeouts"] += 1
                if extent in held["fail"]:
                    raise OSError(5, "injected I/O error")
            return write(extent, buf, size)

        nvme.write = held_gradient_writes
        losses = []
        for i, ids in enumerate(data):
            held["on"] = i == len(data) - 1
            loss = models.lm_loss(ours, ids)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach().clone())
        forgotten = {
            extent
            for extent, bs in grads.items()
            if bs.kinds["grad"].inflight is not None and not rt.grads.present.get(bs.index)
        }
        assert forgotten
        held["fail"] = forgotten
        release.set()
        with caplog.at_level("WARNING", logger="tierrt"):
            rt.synchronize()  # the failed writes land: logged, not raised
    assert held["writes"] > 0 and held["timeouts"] == 0
    assert caplog.text.count("a write of a forgotten value failed") == len(forgotten)
    assert_same_run(reference, ref, ours, losses)


def test_update_write_failing_just_as_step_takes_it_rolls_the_step_back(nvme_dir, monkeypatch):
    """The updates made during the last backward are still being written home when step() takes
    them, and those writes fail right after step() first looked at them (deterministically here;
    by chance on a loaded machine). The step is rolled back: no failed extent becomes a block's home
    (a later read would find damaged data there), and redoing the batch gives torch's result."""
    reference, ref, ours, opt, data = plain_run(3)
    # Every state the step changes lives on NVMe (test_update_failures covers weights in DRAM).
    tiers = [tierrt.dram(streaming_budget(ours, extra_blocks=2)), tierrt.nvme(nvme_dir)]
    failing = {"on": False, "writes": 0}
    looked: set[int] = set()  # the writes still running when step() first looked at them
    finished = Transfer.done

    def done(transfer):
        result = finished(transfer)
        if (
            failing["on"]
            and not result
            and transfer.label.startswith("speculative update")
            and sys._getframe(1).f_code.co_name == "commit"  # step() taking the update
            and id(transfer) not in looked
        ):
            looked.add(id(transfer))
            transfer._done.wait()  # the write fails just after this first look at it
        return result

    monkeypatch.setattr(Transfer, "done", done)
    with tierrt.offload(ours, tiers=tiers, optimizer=opt) as rt:
        nvme = rt.pipeline.store.nvme
        write = nvme.write

        def failing_update_writes(*args, **kwargs):
            if failing["on"] and threading.current_thread().name == "tierrt-optimizer-write":
                failing["writes"] += 1
                time.sleep(0.2)  # a slow disk: the last blocks' writes outlast the end of backward
                raise OSError(errno.EIO, "injected I/O error")
            return write(*args, **kwargs)

        nvme.write = failing_update_writes
        losses = loop(ours, opt, data[:2])
        rt.synchronize()
        failing["on"] = True
        models.lm_loss(ours, data[2]).backward()
        with pytest.raises(OSError, match="rolled back"):
            opt.step()
            rt.synchronize()  # the writes run on after step(): their failure is raised here at the latest
        failing["on"] = False
        assert all(ks.home == "nvme" for bs in rt.pipeline.blocks for ks in bs.kinds.values())
        assert looked and failing["writes"] > 0
        opt.zero_grad()
        losses += loop(ours, opt, data[2:])  # the batch redone
    assert_same_run(reference, ref, ours, losses)


def test_a_model_whose_state_fits_in_dram_is_updated_at_step_on_the_cpu(nvme_dir):
    """With every home in DRAM (no swap file at all) and the CPU computing, no update runs during
    backward: it would only compete with backward for the cores (and copy its state into spare
    buffers first), with no I/O to hide. The step is still transactional there (undo copies: see
    test_update_failures), and the results are the synchronous step's."""
    reference, ref, ours, opt, data = plain_run(6)
    budget = 8 * models.model_bytes(ours) + (4 << 20)
    with tierrt.offload(ours, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)], optimizer=opt) as rt:
        assert rt.pipeline.store.nvme is None
        got = loop(ours, opt, data)
        speculator = rt.blockwise.updates.speculator
        assert rt.blockwise.updates.transactional
    assert_same_run(reference, ref, ours, got)
    assert speculator.committed == 0
