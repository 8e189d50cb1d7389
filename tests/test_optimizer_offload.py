"""Optimizer offload: native Adam/AdamW/SGD with state in the tiers, equal to torch bit for bit.

Every case trains the same model from the same weights twice — plainly with torch's optimizer and
through tierrt with the optimizer's state on NVMe under a DRAM budget below the training state — and
compares losses, weights and optimizer state with ``torch.equal``.
"""

from __future__ import annotations

import copy
import errno

import models
import pytest
import torch
from test_offload_numerics import CASES, streaming_budget
from torch.nn.utils import clip_grad_norm_  # imported by name, as many training scripts do

import tierrt

LOOPS = ("plain", "scheduler_clip_accum")


def run(model, opt, data, loss_fn, *, sched=None, clip=None, accum=1, clip_by_name=False):
    losses = []
    for i, batch in enumerate(data):
        loss = loss_fn(model, batch)
        (loss / accum).backward()
        if (i + 1) % accum == 0:
            if clip is not None:
                fn = clip_grad_norm_ if clip_by_name else torch.nn.utils.clip_grad_norm_
                losses.append(fn(model.parameters(), clip).detach().clone())
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad()
        losses.append(loss.detach().clone())
    return losses


def make_opt(kind, params):
    params = list(params)
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=2e-3, weight_decay=0.05)
    if kind == "adam_l2_amsgrad":
        return torch.optim.Adam(groups, lr=1e-3, weight_decay=0.01, amsgrad=True)
    if kind == "sgd_nesterov":
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if kind == "sgd_plain":
        return torch.optim.SGD(groups, lr=0.05)
    if kind == "rmsprop":  # no native kernel: the torch optimizer is stepped block by block
        return torch.optim.RMSprop(groups, lr=1e-3)
    if kind in TORCH_STEPPED:
        return TORCH_STEPPED[kind](groups)
    raise ValueError(kind)


# No native kernel (or options it leaves to torch): torch's own step, block by block, with the
# optimizer's state tensors homed in the tiers.
TORCH_STEPPED = {
    "adamw_fused": lambda groups: torch.optim.AdamW(groups, lr=2e-3, weight_decay=0.05, fused=True),
    "adam_foreach_amsgrad": lambda groups: torch.optim.Adam(groups, lr=1e-3, amsgrad=True, foreach=True),
    "sgd_fused_momentum": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, fused=True),
    "rmsprop_centered": lambda groups: torch.optim.RMSprop(groups, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda groups: torch.optim.Adagrad(groups, lr=1e-2),  # state made in __init__
    "nadam": lambda groups: torch.optim.NAdam(groups, lr=1e-3),
    "radam": lambda groups: torch.optim.RAdam(groups, lr=1e-3),
    "adamax": lambda groups: torch.optim.Adamax(groups, lr=1e-3),
    "adadelta": lambda groups: torch.optim.Adadelta(groups),
    "rprop": lambda groups: torch.optim.Rprop(groups, lr=1e-3),
    "asgd": lambda groups: torch.optim.ASGD(groups, lr=1e-3),
}


def compare(
    name,
    opt_kind,
    nvme_dir,
    *,
    sched=False,
    clip=None,
    accum=1,
    deferred=True,
    steps=4,
    native=None,
    clip_by_name=False,
):
    build, batches_fn, loss_fn = CASES[name]
    reference = build()
    ours = copy.deepcopy(reference)
    data = batches_fn(steps)
    ref_opt = make_opt(opt_kind, reference.parameters())
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.7) if sched else None
    ref = run(reference, ref_opt, data, loss_fn, sched=ref_sched, clip=clip, accum=accum)

    opt = make_opt(opt_kind, ours.parameters())
    our_sched = (
        torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7) if sched else None
    )  # before entry
    with tierrt.offload(
        ours,
        tiers=[tierrt.dram(streaming_budget(ours)), tierrt.nvme(nvme_dir)],
        optimizer=opt,
        deferred_step=deferred,
        native_optimizer=native,
    ) as rt:
        got = run(
            ours, opt, data, loss_fn, sched=our_sched, clip=clip, accum=accum, clip_by_name=clip_by_name
        )
        state_inside = opt.state_dict()
        report = rt.report()
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b), f"value {i} differs: {a} vs {b}"
    for (n, a), b in zip(reference.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), f"weight {n} differs"
    assert_state_equal(ref_opt.state_dict(), state_inside)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())  # exported on exit, torch's own format
    return rt, report


def assert_state_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert set(a["state"]) == set(b["state"])
    for index, entry in a["state"].items():
        other = b["state"][index]
        assert set(entry) == set(other), (entry.keys(), other.keys())
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other[key]), f"state {index}.{key} differs"
            else:
                assert value == other[key]


@pytest.mark.parametrize("name", ["gpt2", "llama", "mlp", "tied", "checkpoint"])
def test_adamw_native_bitwise(name, nvme_dir):
    rt, report = compare(name, "adamw", nvme_dir)
    assert rt.blockwise.updater.native
    assert report.total.bytes_by_kind["exp_avg dram->nvme"] > 0  # state really lives on NVMe


@pytest.mark.parametrize("opt_kind", ["adam_l2_amsgrad", "sgd_nesterov", "sgd_plain", "rmsprop"])
def test_other_optimizers_bitwise(opt_kind, nvme_dir):
    rt, _ = compare("llama", opt_kind, nvme_dir)
    assert rt.blockwise.updater.native == (opt_kind != "rmsprop")
    assert rt.blockwise.updater.state_in_tiers


@pytest.mark.parametrize("opt_kind", sorted(TORCH_STEPPED))
def test_torch_optimizers_keep_their_state_in_the_tiers(opt_kind, nvme_dir):
    """Torch's own step (fused AdamW as a transformers Trainer builds it, foreach Adam, RMSprop,
    Adagrad, ...) gives torch's results bit for bit with its state tensors on NVMe, not in
    ``optimizer.state``; state_dict() inside and opt.state after leaving are torch's."""
    rt, report = compare("llama", opt_kind, nvme_dir)
    updater = rt.blockwise.updater
    assert updater.state_in_tiers and not updater.native
    first_kind = next(iter(updater.state_kinds))
    assert report.total.bytes_by_kind[f"{first_kind} dram->nvme"] > 0  # state really lives on NVMe


def test_torch_stepped_state_loads_inside_and_continues(nvme_dir):
    """Fused AdamW: two plain steps, the state loaded inside the context (into the tiers), two more
    steps there: equal to four plain steps; and with the state held before entering (imported)."""
    build, batches_fn, loss_fn = CASES["llama"]
    data = batches_fn(4)
    reference = build()
    ours, ours2 = copy.deepcopy(reference), copy.deepcopy(reference)
    ref_opt = make_opt("adamw_fused", reference.parameters())
    ref = run(reference, ref_opt, data, loss_fn)

    plain_opt = make_opt("adamw_fused", ours.parameters())
    run(ours, plain_opt, data[:2], loss_fn)
    saved = copy.deepcopy(plain_opt.state_dict())
    opt = make_opt("adamw_fused", ours.parameters())
    with tierrt.offload(
        ours, tiers=[tierrt.dram(streaming_budget(ours)), tierrt.nvme(nvme_dir)], optimizer=opt
    ):
        opt.load_state_dict(saved)
        assert not any(
            isinstance(v, torch.Tensor) and v.dim() for e in opt.state.original.values() for v in e.values()
        )
        rest = run(ours, opt, data[2:], loss_fn)
    assert all(torch.equal(a, b) for a, b in zip(ref[2:], rest))
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), ours.parameters()))
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())

    held = make_opt("adamw_fused", ours2.parameters())  # steps taken before entering: imported
    run(ours2, held, data[:2], loss_fn)
    with tierrt.offload(
        ours2, tiers=[tierrt.dram(streaming_budget(ours2)), tierrt.nvme(nvme_dir)], optimizer=held
    ):
        rest2 = run(ours2, held, data[2:], loss_fn)
    assert all(torch.equal(a, b) for a, b in zip(ref[2:], rest2))
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), ours2.parameters()))


def test_scheduler_clipping_and_accumulation(nvme_dir):
    compare("gpt2", "adamw", nvme_dir, sched=True, clip=0.5, accum=2, steps=6)


def test_clip_imported_by_name_is_patched(nvme_dir):
    compare("llama", "adamw", nvme_dir, clip=0.1, clip_by_name=True)


def test_clip_with_synchronous_step(nvme_dir):
    compare("mlp", "sgd_nesterov", nvme_dir, clip=0.05, deferred=False)


def test_torch_updater_matches_too(nvme_dir):
    compare("tied", "adamw", nvme_dir, native=False)


def test_state_dict_round_trips_with_plain_torch(nvme_dir):
    build, batches_fn, loss_fn = CASES["llama"]
    data = batches_fn(4)
    reference = build()
    ours = copy.deepcopy(reference)
    ref_opt = make_opt("adamw", reference.parameters())
    ref = run(reference, ref_opt, data, loss_fn)

    # Two steps through tierrt, then save the state and continue plainly in a fresh optimizer.
    opt = make_opt("adamw", ours.parameters())
    with tierrt.offload(
        ours, tiers=[tierrt.dram(streaming_budget(ours)), tierrt.nvme(nvme_dir)], optimizer=opt
    ):
        first = run(ours, opt, data[:2], loss_fn)
        saved = copy.deepcopy(opt.state_dict())
    fresh = make_opt("adamw", ours.parameters())
    fresh.load_state_dict(saved)
    second = run(ours, fresh, data[2:], loss_fn)
    for a, b in zip(ref, first + second):
        assert torch.equal(a, b)
    for a, b in zip(reference.parameters(), ours.parameters()):
        assert torch.equal(a, b)

    # The reverse: two plain steps, then load that state into tierrt and continue there.
    reference2 = build()
    ours2 = copy.deepcopy(reference2)
    plain_opt = make_opt("adamw", ours2.parameters())
    run(ours2, plain_opt, data[:2], loss_fn)
    saved = copy.deepcopy(plain_opt.state_dict())
    opt2 = make_opt("adamw", ours2.parameters())
    with tierrt.offload(
        ours2, tiers=[tierrt.dram(streaming_budget(ours2)), tierrt.nvme(nvme_dir)], optimizer=opt2
    ):
        opt2.load_state_dict(saved)
        rest = run(ours2, opt2, data[2:], loss_fn)
    assert all(torch.equal(a, b) for a, b in zip(ref[2:], rest))
    for a, b in zip(reference.parameters(), ours2.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_of_wrong_shape_is_refused(nvme_dir):
    model = models.mlp()
    opt = make_opt("adamw", model.parameters())
    with tierrt.offload(
        model, tiers=[tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)], optimizer=opt
    ):
        bad = {"state": {}, "param_groups": [{"params": [0]}]}
        with pytest.raises(tierrt.ConfigError, match="parameter groups"):
            opt.load_state_dict(bad)


def llama_after_one_step():
    """A Llama case: its data, loss, a plain reference after step 1 with its AdamW, and a fresh copy
    of the model with its own AdamW, to be offloaded and trained."""
    build, batches_fn, loss_fn = CASES["llama"]
    data = batches_fn(3)
    reference = build()
    ours = copy.deepcopy(reference)
    ref_opt = make_opt("adamw", reference.parameters())
    run(reference, ref_opt, data[:1], loss_fn)  # the reference after step 1
    return data, loss_fn, reference, ref_opt, ours, make_opt("adamw", ours.parameters())


def assert_holds_reference(ours, opt, reference, ref_opt):
    """Inside the context: the offloaded model and optimizer hold exactly the reference's values."""
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())
    values = ours.state_dict()
    for name, p in reference.named_parameters():
        assert torch.equal(values[name], p), name


@pytest.mark.parametrize("deferred", [True, False])
def test_full_nvme_mid_run_keeps_previous_step(deferred, nvme_dir):
    """Writes of step 2's optimizer state fail with ENOSPC: the error is clear and every block still
    holds step 1's weights and optimizer state, loadable with state_dict(). (Updates during backward
    are off: with them, step 2's state may be home before the disk fills, and step() then succeeds.)"""
    data, loss_fn, reference, ref_opt, ours, opt = llama_after_one_step()
    with tierrt.offload(
        ours,
        tiers=[tierrt.dram(streaming_budget(ours)), tierrt.nvme(nvme_dir)],
        optimizer=opt,
        deferred_step=deferred,
        overlap_backward=False,
    ) as rt:
        run(ours, opt, data[:1], loss_fn)
        loss_fn(ours, data[1]).backward()
        rt.synchronize()  # the gradients are home; now the disk "fills"
        rt.engine.inject_fault(op="write", errno=errno.ENOSPC, count=10**6)
        with pytest.raises(tierrt.IOEngineError, match="rolled back") as info:
            opt.step()
            opt.zero_grad()
            loss_fn(ours, data[2])  # deferred: step 2's updates run as the next forward needs them
        assert info.value.errno == errno.ENOSPC
        rt.engine.clear_faults()
        assert_holds_reference(ours, opt, reference, ref_opt)
    for a, b in zip(reference.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def test_full_nvme_during_backward_with_updates_overlapping_it(nvme_dir):
    """The disk fills before step 2's backward, while updates run during backward: whichever write
    fails first (a gradient's, a speculative update's, or the step's own), a clear IOEngineError
    comes out and every block still holds step 1's weights and optimizer state."""
    data, loss_fn, reference, ref_opt, ours, opt = llama_after_one_step()
    with tierrt.offload(
        ours, tiers=[tierrt.dram(streaming_budget(ours)), tierrt.nvme(nvme_dir)], optimizer=opt
    ) as rt:
        run(ours, opt, data[:1], loss_fn)
        loss = loss_fn(ours, data[1])
        rt.synchronize()
        rt.engine.inject_fault(op="write", errno=errno.ENOSPC, count=10**6)
        with pytest.raises(tierrt.IOEngineError) as info:
            loss.backward()
            opt.step()
            opt.zero_grad()
            loss_fn(ours, data[2])
        assert info.value.errno == errno.ENOSPC
        rt.engine.clear_faults()
        try:
            rt.synchronize()  # the other writes that failed meanwhile report too, each once
        except tierrt.IOEngineError as more:
            assert more.errno == errno.ENOSPC
        rt.synchronize()
        opt.zero_grad()
        assert_holds_reference(ours, opt, reference, ref_opt)


@pytest.mark.parametrize("native", [None, False], ids=["native_kernel", "torch_stepped"])
@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "synchronous"])
def test_parameters_outside_the_model_step_once(native, deferred, nvme_dir):
    """An optimizer that also holds a parameter outside the offloaded model (a learned temperature,
    a second module) steps it exactly once per step, as torch does, next to the offloaded ones."""
    reference = models.mlp()
    ours = copy.deepcopy(reference)
    ref_extra = torch.nn.Parameter(torch.ones(3))
    our_extra = torch.nn.Parameter(torch.ones(3))
    data = models.mlp_batches(3)

    def loop(model, extra, opt):
        for batch in data:
            (models.mlp_loss(model, batch) * extra.sum()).backward()
            opt.step()
            opt.zero_grad()

    ref_opt = torch.optim.AdamW([*reference.parameters(), ref_extra], lr=1e-2)
    loop(reference, ref_extra, ref_opt)
    opt = torch.optim.AdamW([*ours.parameters(), our_extra], lr=1e-2)
    tiers = [tierrt.dram(streaming_budget(ours)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(ours, tiers=tiers, optimizer=opt, native_optimizer=native, deferred_step=deferred):
        loop(ours, our_extra, opt)
    assert torch.equal(ref_extra, our_extra)
    for (name, a), b in zip(reference.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), name


def test_trainer_with_its_default_fused_adamw_keeps_the_state_in_the_tiers(nvme_dir, tmp_path):
    """A transformers ``Trainer`` given the fused AdamW it would build itself (its default
    ``optim="adamw_torch_fused"``), passed to offload() too: the run equals the plain Trainer run
    (losses, weights, optimizer state), with the AdamW state on NVMe."""
    pytest.importorskip("transformers")

    def fused(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)

    reference = models.llama()
    ours = copy.deepcopy(reference)
    ref_opt = fused(reference)
    plain, ref_logs = models.tiny_trainer(reference, tmp_path / "plain", ref_opt)
    plain.train()
    opt = fused(ours)
    mine, logs = models.tiny_trainer(ours, tmp_path / "tierrt", opt)
    with tierrt.offload(
        ours, tiers=[tierrt.dram(streaming_budget(ours)), tierrt.nvme(nvme_dir)], optimizer=opt
    ) as rt:
        mine.train()
        report = rt.report()
        assert rt.blockwise.updater.state_in_tiers and not rt.blockwise.updater.native

    assert logs == ref_logs and len(logs) == 3
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())
    assert report.total.bytes_by_kind["exp_avg dram->nvme"] > 0
