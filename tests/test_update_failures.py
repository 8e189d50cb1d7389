"""Failures of the optimizer's update and of reads, and what they leave behind.

- A hyperparameter the arithmetic cannot use (``lr=None``, ``betas="x"``) makes ``step()`` raise,
  as torch's own step does, before anything changes; fixed, ``step()`` then trains as plain torch.
- An exception raised inside a block's update (here: the kernel, made to fail) rolls the whole step
  back, keeps the exception's type, and leaves the runtime usable: redoing the step gives plain
  torch's result bit for bit.
- A prefetch whose read failed while the disk was failing is read again when needed: once the disk
  is healthy, nothing stale is raised and leaving gives back the trained model.

Each case compares with ``torch.equal`` against plain torch on a small MLP whose optimizer state
lives on NVMe under a DRAM budget below the training state.
"""

from __future__ import annotations

import copy
import errno
import gc

import models
import pytest
import torch
from test_offload_numerics import streaming_budget

import tierrt

LR = 1e-2


def train(model, opt, batches):
    for batch in batches:
        models.mlp_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()


def plain_after(steps: int, batches, **options) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, **options)
    train(model, opt, batches[:steps])
    return model, opt


def offload(model, opt, nvme_dir, budget=None, **options):
    tiers = [tierrt.dram(budget or streaming_budget(model)), tierrt.nvme(nvme_dir)]
    return tierrt.offload(model, tiers=tiers, optimizer=opt, **options)


def fits_in_dram(model) -> int:
    """A DRAM budget that homes the whole training state in memory (nothing on the nvme tier)."""
    return 8 * models.model_bytes(model) + (4 << 20)


def assert_same(reference, ours, what: str) -> None:
    values = ours.state_dict()
    for name, p in reference.state_dict().items():
        assert torch.equal(values[name], p), f"{what}: {name} differs from plain torch"


def assert_state_equal(expected: dict, actual: dict) -> None:
    assert expected["state"].keys() == actual["state"].keys()
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(actual["state"][index][key])), (
                index,
                key,
            )


def assert_runtime_clean(rt) -> None:
    """No pins left on any block's state, and (once cyclic garbage is gone) no DRAM held by tensors
    outside tierrt."""
    rt.synchronize()
    for bs in rt.pipeline.blocks:
        for kind, ks in bs.kinds.items():
            assert ks.pins == 0, f"{bs.name}.{kind} left pinned"
    gc.collect()
    assert rt.pipeline._held_outside() == 0


BAD = [
    ("lr", None),
    ("weight_decay", None),
    ("lr", "0.01"),
    ("eps", "1e-8"),
    ("betas", "x"),
    ("betas", (0.9,)),
]


@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "synchronous"])
@pytest.mark.parametrize(("key", "value"), BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_bad_hyperparameter_raises_at_step_like_torch(key, value, deferred, nvme_dir):
    """step() raises what plain torch's step raises for the value (a TypeError or ValueError) and
    changes nothing; once the value is fixed, step() again trains exactly as plain torch."""
    batches = models.mlp_batches(4)
    plain, plain_opt = plain_after(2, batches)
    for group in plain_opt.param_groups:
        group[key] = value
    models.mlp_loss(plain, batches[2]).backward()
    with pytest.raises((TypeError, ValueError)) as plain_error:
        plain_opt.step()
    reference, _ = plain_after(4, batches)

    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    with offload(model, opt, nvme_dir, deferred_step=deferred) as rt:
        train(model, opt, batches[:2])
        good = opt.param_groups[0][key]
        for group in opt.param_groups:
            group[key] = value
        models.mlp_loss(model, batches[2]).backward()
        with pytest.raises(tierrt.HyperparameterError, match=f"{key}=") as error:
            opt.step()
        assert isinstance(error.value, type(plain_error.value))
        assert "changed nothing" in str(error.value)
        assert_same(plain_after(2, batches)[0], model, "after the failed step()")
        for group in opt.param_groups:
            group[key] = good
        opt.step()  # the gradients of batch 2 are still there, as in torch
        opt.zero_grad()
        train(model, opt, batches[3:])
        assert_runtime_clean(rt)
    assert_same(reference, model, "after leaving")


@pytest.mark.parametrize("fused", [False, True], ids=["native", "torch_fused"])
def test_amsgrad_turned_on_inside_is_refused_at_step(fused, nvme_dir):
    """The tiers hold no max_exp_avg_sq when amsgrad was off on entering: step() says so, on
    tierrt's kernels and with torch's fused step alike."""
    batches = models.mlp_batches(3)
    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=fused or None)
    with offload(model, opt, nvme_dir):
        train(model, opt, batches[:2])
        opt.param_groups[0]["amsgrad"] = True
        models.mlp_loss(model, batches[2]).backward()
        says = "max_exp_avg_sq.*before entering" if fused else "amsgrad=True.*before entering"
        with pytest.raises(tierrt.HyperparameterError, match=says):
            opt.step()
        opt.param_groups[0]["amsgrad"] = False
    assert_same(plain_after(2, batches, fused=fused or None)[0], model, "after leaving")


class KernelFault:
    """Stands in for the native kernels: Adam calls from the ``fail_at``-th on raise ``error`` (a
    speculative update that fails is discarded; the block's ordinary update then fails too)."""

    def __init__(self, kernels, fail_at: int, message: str) -> None:
        self.kernels, self.fail_at, self.message = kernels, fail_at, message
        self.calls = 0

    def adam_step_(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError(self.message)
        return self.kernels.adam_step_(*args, **kwargs)


@pytest.mark.parametrize(
    ("deferred", "overlap", "in_dram"),
    [(True, True, False), (True, False, False), (False, False, False), (True, True, True)],
    ids=["deferred_overlapped", "deferred", "synchronous", "all_in_dram_overlapped"],
)
def test_exception_inside_the_update_rolls_the_step_back(deferred, overlap, in_dram, nvme_dir):
    """The update of the third block of step 3 raises (as a kernel's argument check or torch's own
    optimizer code could): the exception keeps its type and says the step was rolled back, every
    parameter and the optimizer hold step 2's values, nothing stays pinned, and redoing the batch
    trains exactly as plain torch. Leaving gives back plain torch's weights."""
    batches = models.mlp_batches(4)
    after_two, after_two_opt = plain_after(2, batches)
    reference, _ = plain_after(4, batches)

    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    budget = fits_in_dram(model) if in_dram else None
    with offload(model, opt, nvme_dir, budget, deferred_step=deferred, overlap_backward=overlap) as rt:
        assert (rt.pipeline.store.nvme is None) == in_dram  # all_in_dram: undo copies alone
        train(model, opt, batches[:2])
        opt.state_dict()  # step 2's deferred updates run now: the kernel calls counted are step 3's
        updater = rt.blockwise.updater
        kernels = updater.kernels
        updater.kernels = KernelFault(kernels, fail_at=5, message="kernel says no")
        with pytest.raises(RuntimeError, match="kernel says no") as error:
            models.mlp_loss(model, batches[2]).backward()
            opt.step()
            opt.zero_grad()
            models.mlp_loss(model, batches[3])  # deferred: the updates run as this forward needs them
        assert type(error.value) is RuntimeError
        notes = "\n".join(getattr(error.value, "__notes__", []))
        assert "Step 3" in notes and "rolled back" in notes and "step 2's values" in notes, notes
        updater.kernels = kernels
        opt.zero_grad()
        del error  # its traceback's frames view blocks' buffers
        assert_same(after_two, model, "after the rollback")
        assert_state_equal(after_two_opt.state_dict(), opt.state_dict())
        train(model, opt, batches[2:])  # the batches since step 2, redone
        assert_runtime_clean(rt)
    assert_same(reference, model, "after leaving")


def _fail_third_torch_step(updater):
    """Make torch's own step (as the torch updater calls it) raise from its third call on (a
    speculative update during backward that fails is discarded; the block's own update in step()
    then fails too), until the caller puts the returned step back."""
    raw = updater._raw_step
    calls = 0

    def failing(optimizer):
        nonlocal calls
        calls += 1
        if calls >= 3:
            raise KeyError("not today")
        return raw(optimizer)

    updater._raw_step = failing
    return raw


def test_exception_in_the_torch_optimizer_rolls_the_step_back(nvme_dir):
    """Torch's own AdamW step (native_optimizer=False: its state tensors in the tiers) raises for a
    block of step 3: like the native kernels' failure, the step is rolled back (every parameter and
    the optimizer state hold step 2's values) and redoing the batches trains exactly as torch."""
    batches = models.mlp_batches(4)
    after_two, after_two_opt = plain_after(2, batches)
    reference, _ = plain_after(4, batches)
    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    with offload(model, opt, nvme_dir, native_optimizer=False) as rt:
        assert rt.blockwise.updater.state_in_tiers
        train(model, opt, batches[:2])
        opt.state_dict()  # step 2's deferred updates run now: the calls counted are step 3's
        updater = rt.blockwise.updater
        raw = _fail_third_torch_step(updater)
        with pytest.raises(KeyError, match="not today") as error:
            train(model, opt, batches[2:3])
            models.mlp_loss(model, batches[3])
        notes = "\n".join(error.value.__notes__)
        assert "Step 3" in notes and "rolled back" in notes, notes
        updater._raw_step = raw
        opt.zero_grad()
        del error  # its traceback's frames view blocks' buffers
        assert_same(after_two, model, "after the rollback")
        assert_state_equal(after_two_opt.state_dict(), opt.state_dict())
        train(model, opt, batches[2:])
        assert_runtime_clean(rt)
    assert_same(reference, model, "after leaving")


def test_exception_in_an_optimizer_with_state_in_memory_leaves_a_usable_runtime(nvme_dir):
    """An optimizer without state tensors shaped like the parameters (torch's Adafactor: factored) is stepped
    by torch with its state in ``optimizer.state``; it raises in its step: its exception comes out
    unchanged, with a note, and training goes on afterwards (such a step cannot be rolled back; as
    with torch, the blocks updated before the error keep their new values)."""
    batches = models.mlp_batches(4)
    model = models.mlp()
    opt = torch.optim.Adafactor(model.parameters(), lr=LR)
    with offload(model, opt, nvme_dir) as rt:
        assert not rt.blockwise.updater.state_in_tiers
        train(model, opt, batches[:2])
        updater = rt.blockwise.updater
        raw = _fail_third_torch_step(updater)
        with pytest.raises(KeyError, match="not today") as error:
            train(model, opt, batches[2:3])
            models.mlp_loss(model, batches[3])
        assert "cannot be rolled back" in "\n".join(error.value.__notes__)
        updater._raw_step = raw
        opt.zero_grad()
        del error  # its traceback's frames view blocks' buffers
        assert_runtime_clean(rt)
        train(model, opt, batches[3:])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_prefetch_failed_while_the_disk_failed_is_read_again(nvme_dir):
    """Reads fail while step 3's updates start prefetching their inputs; the disk recovers before
    anything needs them. Nothing stale is raised: leaving applies step 3 with fresh reads and gives
    back plain torch's weights after 3 steps (before the fix: the stale read error was raised on
    leaving and the model came back NaN)."""
    batches = models.mlp_batches(3)
    reference, _ = plain_after(3, batches)

    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    with offload(model, opt, nvme_dir, overlap_backward=False) as rt:
        train(model, opt, batches[:2])
        models.mlp_loss(model, batches[2]).backward()
        rt.synchronize()
        rt.engine.inject_fault(op="read", errno=errno.EIO, count=-1)
        opt.step()  # deferred: starts reading the first updates' inputs, which fail
        reads = [bs.kinds[kind].inflight for bs, kind in rt.pipeline._inflight.values()]
        reads = [t for t in reads if t is not None and t.link.endswith("->dram")]
        assert reads, "no prefetch started: the test does not exercise a failed prefetch"
        for transfer in reads:
            transfer._done.wait()  # failed, not reaped yet
        assert any(transfer.error is not None for transfer in reads)
        del reads, transfer
        rt.engine.clear_faults()
        opt.zero_grad()
    assert_same(reference, model, "after leaving")


def test_read_still_failing_when_needed_raises_then_recovers(nvme_dir):
    """The disk still fails when the forward needs a block: a fresh IOEngineError is raised there;
    once the disk is healthy again, the same batch trains as plain torch."""
    batches = models.mlp_batches(4)
    reference, _ = plain_after(4, batches)

    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    with offload(model, opt, nvme_dir) as rt:
        train(model, opt, batches[:3])
        rt.synchronize()
        rt.engine.inject_fault(op="read", errno=errno.EIO, count=-1)
        with pytest.raises(tierrt.IOEngineError) as error:
            models.mlp_loss(model, batches[3]).backward()
        assert error.value.errno == errno.EIO
        rt.engine.clear_faults()
        opt.zero_grad()
        del error  # its traceback's frames view blocks' buffers
        assert_runtime_clean(rt)
        train(model, opt, batches[3:])
    assert_same(reference, model, "after leaving")


def test_plain_reference_is_deterministic():
    """The references above are plain torch runs; two of them agree bit for bit."""
    batches = models.mlp_batches(2)
    a, _ = plain_after(2, batches)
    b, _ = plain_after(2, batches)
    assert_same(a, copy.deepcopy(b), "plain torch twice")


@pytest.mark.parametrize("pressure", [False, True], ids=["undo-copy-kept", "undo-copy-let-go"])
def test_rollback_of_state_homed_in_dram(pressure, nvme_dir):
    """With room to spare, a block's weights may live in DRAM, rewritten in place by its update (no
    copy-on-write extent on NVMe). The update first keeps a copy of them in the arena, and a step
    whose write fails after that block was updated gives every parameter its previous value back,
    that block's from the copy. When DRAM is needed before the step commits the copy goes: the
    error then names the block, whose weights keep the failed step's update, and says to load a
    checkpoint, instead of claiming that everything holds the previous step's values."""
    model = models.llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tiers = [tierrt.dram(streaming_budget(model, extra_blocks=6)), tierrt.nvme(nvme_dir)]
    batches = models.token_batches(2)
    with tierrt.offload(model, tiers=tiers, optimizer=opt, overlap_backward=False) as rt:
        block = next(bs for bs in rt.pipeline.blocks if bs.name == "lm_head")
        assert (block.kinds["weight"].home, block.kinds["exp_avg"].home) == ("dram", "nvme")
        models.lm_loss(model, batches[0]).backward()
        opt.step()
        opt.zero_grad()
        rt.synchronize()
        before = {n: rt.value(n) for n, _ in model.named_parameters()}
        models.lm_loss(model, batches[1]).backward()
        rt.synchronize()  # the gradients are home: the faults hit the step's writes only
        rt.engine.inject_fault(op="write", errno=errno.EIO, count=10**6)
        opt.step()  # deferred: the updates run when their blocks are next needed
        updated = rt.value("lm_head.weight")  # runs lm_head's update; its moments' writes home fail
        assert not torch.equal(updated, before["lm_head.weight"])
        assert block.kinds["weight"].dram_undo is not None  # the arena had room for the copy
        if pressure:
            assert rt.blockwise.updates.release_undo()  # what make_room does when DRAM is needed
        with pytest.raises(tierrt.IOEngineError, match="rolled back") as error:
            rt.synchronize()
        rt.engine.clear_faults()
        message = str(error.value)
        if pressure:
            assert "Not undone: block(s) lm_head keep step 2's update" in message
            assert "load a checkpoint" in message
            assert torch.equal(rt.value("lm_head.weight"), updated)
        else:
            assert "Not undone" not in message
            assert torch.equal(rt.value("lm_head.weight"), before["lm_head.weight"])
        for n, _ in model.named_parameters():
            if n != "lm_head.weight":
                assert torch.equal(rt.value(n), before[n]), f"{n} was not rolled back"


def test_rollback_of_dram_state_updated_during_backward(nvme_dir):
    """A block whose weights live in DRAM is updated during backward (into a buffer of its own);
    step() takes that update, and the buffer it replaces is the step's undo copy, at no cost. A
    block whose update runs later fails to write home: the step is rolled back, and the first block
    has its previous weights again."""
    model = models.llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tiers = [tierrt.dram(streaming_budget(model, extra_blocks=6)), tierrt.nvme(nvme_dir)]
    batches = models.token_batches(3)
    with tierrt.offload(model, tiers=tiers, optimizer=opt) as rt:
        blocks = rt.pipeline.blocks
        speculator = rt.blockwise.updates.speculator
        models.lm_loss(model, batches[0]).backward()  # the first step learns the loop's pattern
        opt.step()
        opt.zero_grad()
        # A step in which both blocks were updated during backward (on a loaded machine a block
        # may find no room for that while earlier writes still run: then try the next step).
        for attempt in range(1, 8):
            rt.synchronize()
            before = {n: rt.value(n) for n, _ in model.named_parameters()}
            models.lm_loss(model, batches[attempt % 3]).backward()
            rt.synchronize()  # the updates made during backward are home: the faults hit step()'s own
            taken = [bs for bs in blocks if bs.index in speculator.specs]
            block = next((bs for bs in taken if bs.kinds["weight"].home == "dram"), None)
            later = next((bs for bs in taken if all(ks.home == "nvme" for ks in bs.kinds.values())), None)
            if block is not None and later is not None:
                break
            opt.step()
            opt.zero_grad()
        else:
            pytest.fail("no step updated a block with weights in DRAM during backward")
        later_param = next(n for n, p in model.named_parameters() if p is later.spec.slots[0].param)
        speculator.discard(later.index)  # as for a block that found no room during backward
        rt.engine.inject_fault(op="write", errno=errno.EIO, count=10**6)
        opt.step()  # takes the first block's update; the later one's runs when it is next needed
        assert block.kinds["weight"].dram_undo is not None  # the replaced buffer
        with pytest.raises(tierrt.IOEngineError, match="rolled back") as error:
            rt.value(later_param)  # runs the later block's update; its writes fail
            rt.synchronize()
        rt.engine.clear_faults()
        assert "Not undone" not in str(error.value)
        for n, _ in model.named_parameters():
            assert torch.equal(rt.value(n), before[n]), f"{n} was not rolled back"
