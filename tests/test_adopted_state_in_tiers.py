"""An optimizer not passed to ``offload()`` gets its state homed in the tiers.

Built inside the context (a transformers ``Trainer``'s ``create_optimizer()``, a loop that builds
AdamW after entering), it is noted when built and adopted at its first ``step()``; at the first
``zero_grad()`` that leaves no gradients the model is placed again with it, so its state lives in
the tiers under their budgets and it runs on tierrt's kernels, as if passed to ``offload()``. Every
case compares losses, weights and optimizer state with the plain run's bit for bit.
"""

from __future__ import annotations

import copy
import logging

import models
import pytest
import torch
from test_late_optimizer import assert_same, loop, tiers
from test_optimizer_offload import assert_state_equal, make_opt
from torch import nn

import tierrt

PLACED = "placing the model again with"


def state_in_tiers(rt: tierrt.Runtime) -> bool:
    """Whether ``rt``'s optimizer keeps its state in the tiers: its state kinds in every trained block."""
    blockwise = rt.blockwise
    if blockwise is None or not blockwise.updater.state_in_tiers or not blockwise.state_kinds:
        return False
    trained = [bs for bs in rt.blocks if "grad" in bs.kinds]
    return bool(trained) and all(set(blockwise.state_kinds) <= set(bs.kinds) for bs in trained)


def build(kind: str, params) -> torch.optim.Optimizer:
    """``make_opt``'s optimizers, plus AdamW fused (a Trainer's default), a subclass of AdamW and
    torch's Adafactor."""
    if kind == "adamw_fused":
        return torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05, fused=True)
    if kind == "adamw_subclass":
        return MyAdamW(params, lr=2e-3, weight_decay=0.05)
    if kind == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2)
    return make_opt(kind, params)


class MyAdamW(torch.optim.AdamW):
    """A class tierrt's table does not know: what it keeps is learned by probing its step."""


@pytest.mark.parametrize("kind", ["adamw", "adamw_fused", "rmsprop", "adamw_subclass"])
def test_optimizer_built_inside_before_the_first_forward_has_its_state_in_the_tiers(kind, nvme_dir, caplog):
    """(a) An optimizer built inside, ``model.zero_grad()`` before the loop (as a Trainer does): one
    pass places the model with it, and its state is in the tiers from the first step on (AdamW on
    tierrt's kernels; fused AdamW and RMSprop stepped by torch, their state tensors in the tiers)."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(4)
    ref_opt = build(kind, reference.parameters())
    ref_values = loop(reference, ref_opt, data)

    with caplog.at_level(logging.WARNING, logger="tierrt"):
        with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)) as rt:
            opt = build(kind, ours.parameters())
            assert rt.optimizer is None  # noted, nothing done in __init__
            ours.zero_grad()
            assert rt.optimizer is opt and state_in_tiers(rt)
            assert rt.blockwise.updater.native == (kind == "adamw")
            values = loop(ours, opt, data)
            assert rt.report().total.bytes_by_link["nvme->dram"] > 0
    assert caplog.text.count(PLACED) == 1 and "adopted" not in caplog.text
    assert "optimizers=(opt, None)" in caplog.text
    assert_same(reference, ours, ref_values, values)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())
    for p, ref_p in zip(ours.parameters(), reference.parameters(), strict=True):
        assert set(opt.state[p]) == set(ref_opt.state[ref_p])
        for key, value in ref_opt.state[ref_p].items():
            assert torch.equal(opt.state[p][key], value), key


def test_adopted_optimizer_is_placed_at_its_zero_grad(nvme_dir, caplog):
    """(b) Stepped once while adopted (state made by torch in memory), then ``opt.zero_grad()``:
    the model is placed again with it, that state goes into the tiers, training goes on bitwise."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(4)
    ref_opt = make_opt("adamw", reference.parameters())
    ref_values = loop(reference, ref_opt, data)

    with caplog.at_level(logging.WARNING, logger="tierrt"):
        with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)) as rt:
            opt = make_opt("adamw", ours.parameters())
            loss = models.lm_loss(ours, data[0])
            loss.backward()
            opt.step()
            assert rt.optimizer is opt and not rt.blockwise.updater.native
            opt.zero_grad()
            assert state_in_tiers(rt) and opt.state.get(next(ours.parameters())) is not None
            values = [loss.detach().clone(), *loop(ours, opt, data[1:])]
    assert "adopted" in caplog.text and caplog.text.count(PLACED) == 1
    assert_same(reference, ours, ref_values, values)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


@pytest.mark.parametrize(
    ("optim", "eval_on_entry"),
    [("adamw_torch", False), ("adamw_torch", True), ("adamw_torch_fused", False)],
    ids=["adamw_torch", "adamw_torch_from_pretrained_eval_mode", "adamw_torch_fused_default"],
)
def test_transformers_trainer_optimizer_state_in_the_tiers(optim, eval_on_entry, nvme_dir, tmp_path, caplog):
    """(c) ``with offload(model, tiers=...): trainer.train()``: the Trainer's ``model.zero_grad()``
    before its first step places the model with the optimizer it built (for a model entered in eval
    mode, in the same one pass that gives gradients room), on tierrt's kernels for
    ``optim="adamw_torch"``, stepped by torch for the default fused AdamW; logs and weights equal
    the plain Trainer's."""
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    reference = models.llama()
    ours = copy.deepcopy(reference)
    ref_trainer, ref_logs = models.tiny_trainer(reference, tmp_path / "plain", optim=optim)
    ref_trainer.train()
    our_trainer, logs = models.tiny_trainer(ours, tmp_path / "tierrt", optim=optim)
    if eval_on_entry:
        ours.eval()
    with caplog.at_level(logging.WARNING, logger="tierrt"):
        with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)) as rt:
            our_trainer.train()
            assert state_in_tiers(rt) and rt.blockwise.updater.native == (optim == "adamw_torch")
    assert caplog.text.count("placing the model again") == 1 and "adopted" not in caplog.text
    assert len(logs) == 3 and logs == ref_logs
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_state_that_does_not_fit_stays_adopted_in_memory(nvme_dir, caplog):
    """(d) An nvme budget with room for the weights and gradients but not Adam's state: placing
    again with the optimizer fails as passing it would have, the model is placed again without
    it, and the optimizer trains adopted with its state in memory (a warning says why)."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    ref_opt = make_opt("adamw", reference.parameters())
    ref_values = loop(reference, ref_opt, data)
    dram = tiers(ours, nvme_dir)[0]
    with tierrt.offload(copy.deepcopy(ours), tiers=[dram, tierrt.nvme(nvme_dir)]) as probe:
        needed = probe.placement.needed["nvme"]
        largest = max(k.layout.nbytes for kinds in probe.placement.kinds for k in kinds.values())
    budget = needed + 4 * largest + (64 << 20) + (1 << 20)  # what start() asks, 1 MiB spare
    assert 2 * models.model_bytes(ours) > (1 << 20)  # Adam's state does not fit in the spare

    with caplog.at_level(logging.WARNING, logger="tierrt"):
        with tierrt.offload(ours, tiers=[dram, tierrt.nvme(nvme_dir, budget=budget)]) as rt:
            opt = make_opt("adamw", ours.parameters())
            ours.zero_grad()
            assert rt.optimizer is None and rt.active
            values = loop(ours, opt, data)
            assert rt.optimizer is opt and not rt.blockwise.updater.state_in_tiers
    assert "could not be placed with AdamW's state" in caplog.text and "nvme budget" in caplog.text
    assert caplog.text.count(PLACED) == 1  # tried once, not at every zero_grad
    assert_same(reference, ours, ref_values, values)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


def test_two_optimizers_in_sequence_lose_nothing(nvme_dir):
    """(e) Two phases, each with an optimizer built inside: the second takes over from the first
    (whose state in the tiers goes back into its ``state``), is placed at its zero_grad, and the
    first, stepped again, takes over back with its state, as plain torch would run it."""
    data = models.token_batches(6)

    def phases(model, check=None):
        first = make_opt("adamw", model.parameters())
        model.zero_grad()
        values = loop(model, first, data[:2])
        if check is not None:
            check(first)
        second = make_opt("sgd_nesterov", model.parameters())
        values += loop(model, second, data[2:4])
        if check is not None:
            check(second)
        values += loop(model, first, data[4:])
        if check is not None:
            check(first)
        return values, first, second

    reference = models.llama()
    ours = copy.deepcopy(reference)
    ref_values, ref_first, ref_second = phases(reference)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)) as rt:

        def placed_with(opt):
            assert rt.optimizer is opt and rt.blockwise.updater.native

        values, first, second = phases(ours, placed_with)
    assert_same(reference, ours, ref_values, values)
    assert_state_equal(ref_first.state_dict(), first.state_dict())
    assert_state_equal(ref_second.state_dict(), second.state_dict())


@pytest.mark.parametrize("zero_first", [True, False], ids=["zero_grad_first", "adopted_first"])
@pytest.mark.parametrize("zeroing", ["optimizer", "model"])
def test_gradient_accumulation(zero_first, zeroing, nvme_dir, caplog):
    """(f) zero_grad only every second micro-batch: the gradients accumulate over two micro-batches
    through the placement, which happens only where none are held."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(6)

    def accumulate(model, opt):
        losses = []
        for i, ids in enumerate(data):
            loss = models.lm_loss(model, ids)
            (loss / 2).backward()
            if i % 2 == 1:
                opt.step()
                (opt if zeroing == "optimizer" else model).zero_grad()
            losses.append(loss.detach().clone())
        return losses

    ref_opt = make_opt("adamw", reference.parameters())
    ref_values = accumulate(reference, ref_opt)
    with caplog.at_level(logging.WARNING, logger="tierrt"):
        with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)) as rt:
            opt = make_opt("adamw", ours.parameters())
            if zero_first:
                ours.zero_grad()
            values = accumulate(ours, opt)
            assert state_in_tiers(rt)
    assert caplog.text.count(PLACED) == 1 and ("adopted" in caplog.text) != zero_first
    assert_same(reference, ours, ref_values, values)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


def test_zero_grad_inside_a_closure_is_not_a_safe_point(nvme_dir):
    """``opt.step(closure)`` whose closure calls ``opt.zero_grad()`` first: the model is not placed
    again in the middle of a step, only at the zero_grad after it."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)

    def run(model, opt):
        losses = []
        for ids in data:

            def closure(ids=ids):
                opt.zero_grad()
                loss = models.lm_loss(model, ids)
                loss.backward()
                return loss

            losses.append(opt.step(closure).detach().clone())
        opt.zero_grad()
        return losses

    ref_opt = make_opt("sgd_nesterov", reference.parameters())
    ref_values = run(reference, ref_opt)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)) as rt:
        opt = make_opt("sgd_nesterov", ours.parameters())
        values = run(ours, opt)
        assert rt.optimizer is opt and rt.blockwise.updater.native
    assert_same(reference, ours, ref_values, values)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


def test_no_placement_when_it_would_not_help(nvme_dir, caplog):
    """An optimizer that keeps no state shaped like every parameter (Adafactor's factored row and
    column statistics for matrices, a full variance for vectors only): placing again would not move
    its state into the tiers, so it stays adopted in memory, as before, bitwise."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    ref_opt = build("adafactor", reference.parameters())
    ref_values = loop(reference, ref_opt, data)
    with caplog.at_level(logging.WARNING, logger="tierrt"):
        with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)) as rt:
            opt = build("adafactor", ours.parameters())
            ours.zero_grad()
            values = loop(ours, opt, data)
            assert rt.optimizer is opt and not rt.blockwise.updater.state_in_tiers
    assert PLACED not in caplog.text and "no update overlaps backward" in caplog.text
    assert_same(reference, ours, ref_values, values)


def test_native_optimizer_false_places_torch_arithmetic_with_state_in_the_tiers(nvme_dir):
    """``native_optimizer=False``: the optimizer built inside is placed with torch's own step, its
    state tensors in the tiers."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    ref_opt = make_opt("adamw", reference.parameters())
    ref_values = loop(reference, ref_opt, data)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), native_optimizer=False) as rt:
        opt = make_opt("adamw", ours.parameters())
        values = loop(ours, opt, data)
        assert state_in_tiers(rt) and not rt.blockwise.updater.native
    assert_same(reference, ours, ref_values, values)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


def test_optimizer_of_another_model_is_not_noted(nvme_dir):
    model = models.llama()
    other = nn.Linear(4, 4)
    with tierrt.offload(model, tiers=tiers(model, nvme_dir)) as rt:
        torch.optim.AdamW(other.parameters())
        model.zero_grad()
        assert rt.optimizer is None and rt._noted is None


@pytest.mark.parametrize("kind", ["adamw", "adagrad", "adamw_subclass", "adafactor"])
def test_state_read_right_after_an_adopted_step_is_the_steps(kind, nvme_dir):
    """``opt.state[p]`` read between ``step()`` and ``zero_grad()`` of an optimizer adopted with its
    state in memory (built inside, or placed again with it) equals plain torch's at
    that point: the step's pending block updates are applied before the state is read (it read
    the state before the step: empty for Adam, the initial sum for Adagrad)."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)

    def run(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
        watched = [model.model.layers[0].mlp.up_proj.weight, model.lm_head.weight]
        seen = []
        for ids in data:
            models.lm_loss(model, ids).backward()
            opt.step()
            seen += [value.clone() for p in watched for value in opt.state[p].values()]
            seen.append(torch.tensor(len(opt.state)))
            opt.zero_grad()
        return seen

    ref_opt = build(kind, reference.parameters())
    ref_seen = run(reference, ref_opt)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)):
        opt = build(kind, ours.parameters())
        seen = run(ours, opt)
    assert len(seen) == len(ref_seen)
    for i, (a, b) in enumerate(zip(ref_seen, seen)):
        assert torch.equal(a, b), f"state value {i} differs"
    assert_same(reference, ours, [], [])
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())
