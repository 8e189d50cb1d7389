"""Optimizers tierrt was not given (created inside the context, or not passed to ``offload()``).

Offloaded parameters have no ``.grad``; an optimizer tierrt does not know used to step nothing, so
the model silently did not train (a transformers ``Trainer`` wrapped by ``offload()`` builds its
optimizer that way). Such an optimizer is now adopted at its first ``step()``: losses, weights and
optimizer state equal plain torch's bit for bit. What cannot be adopted raises from ``step()``.
"""

from __future__ import annotations

import copy
import logging

import models
import pytest
import torch
from test_offload_numerics import streaming_budget
from test_optimizer_offload import assert_state_equal, make_opt
from torch import nn

import tierrt


def tiers(model: nn.Module, nvme_dir: str) -> list:
    return [tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]


def loop(model, opt, data, *, sched=None, clip=None, closure=False) -> list[torch.Tensor]:
    """Plain training steps; with ``closure`` the loss and backward run inside ``step(closure)``."""
    out = []
    for ids in data:
        if closure:

            def compute(ids=ids):
                loss = models.lm_loss(model, ids)
                loss.backward()
                return loss

            loss = opt.step(compute)
        else:
            loss = models.lm_loss(model, ids)
            loss.backward()
            if clip is not None:
                out.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).detach().clone())
            opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        out.append(loss.detach().clone())
    return out


def assert_same(reference, ours, ref_values, values) -> None:
    assert len(ref_values) == len(values)
    for i, (a, b) in enumerate(zip(ref_values, values)):
        assert torch.equal(a, b), f"value {i} differs: {a} vs {b}"
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), f"weight {name} differs"


@pytest.mark.parametrize("opt_kind", ["adamw", "sgd_nesterov"])
def test_optimizer_created_inside_is_adopted_bitwise(opt_kind, nvme_dir, caplog):
    """Optimizer and LR scheduler built inside the context, gradient clipping: torch's run exactly;
    after leaving, the optimizer (its state moved with the parameters) keeps training them."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(4)
    ref_opt = make_opt(opt_kind, reference.parameters())
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.7)
    ref_values = loop(reference, ref_opt, data[:3], sched=ref_sched, clip=1.0)
    ref_state = copy.deepcopy(ref_opt.state_dict())
    ref_values += loop(reference, ref_opt, data[3:], sched=ref_sched)

    with caplog.at_level(logging.WARNING, logger="tierrt"):
        with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)) as rt:
            opt = make_opt(opt_kind, ours.parameters())
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
            values = loop(ours, opt, data[:3], sched=sched, clip=1.0)
            assert rt.optimizer is opt and rt.report().total.bytes_by_link["nvme->dram"] > 0
            assert_state_equal(ref_state, opt.state_dict())
    assert "adopted" in caplog.text and "optimizer=" in caplog.text
    values += loop(ours, opt, data[3:], sched=sched)  # outside again: plain torch on the restored model
    assert_same(reference, ours, ref_values, values)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


def test_optimizer_made_before_entry_but_not_passed_is_adopted(nvme_dir):
    reference = models.gpt2()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    ref_values = loop(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3), data)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)):
        values = loop(ours, opt, data)
    assert_same(reference, ours, ref_values, values)


def test_first_step_runs_user_pre_hooks_first_and_a_closure_once(nvme_dir):
    """The adopting step is torch's step: the optimizer's own pre-hooks run before the update is
    recorded (a hook that changes the learning rate is seen), a closure is evaluated once."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    calls = []

    def halve_lr(opt, args, kwargs):
        calls.append(1)
        for group in opt.param_groups:
            group["lr"] *= 0.5

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    ref_opt.register_step_pre_hook(halve_lr)
    ref_values = loop(reference, ref_opt, data, closure=True)
    ref_calls = len(calls)
    calls.clear()
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)):
        opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
        opt.register_step_pre_hook(halve_lr)
        values = loop(ours, opt, data, closure=True)
    assert len(calls) == ref_calls == len(data)
    assert_same(reference, ours, ref_values, values)


def test_an_optimizer_over_other_parameters_is_left_alone(nvme_dir):
    """An optimizer of another model, created inside the context, steps as usual (not adopted)."""
    ours = models.mlp()
    given = torch.optim.SGD(ours.parameters(), lr=0.1)
    other = nn.Linear(4, 4)
    expected = copy.deepcopy(other)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=given) as rt:
        other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
        other(torch.ones(2, 4)).sum().backward()
        other_opt.step()
        assert rt.optimizer is given
    expected_opt = torch.optim.SGD(expected.parameters(), lr=0.1)
    expected(torch.ones(2, 4)).sum().backward()
    expected_opt.step()
    assert torch.equal(expected.weight, other.weight) and torch.equal(expected.bias, other.bias)


def _one_step(model, opt, ids=None) -> None:
    models.lm_loss(model, models.token_batches(1)[0] if ids is None else ids).backward()
    opt.step()
    opt.zero_grad()


def test_a_second_optimizer_is_refused(nvme_dir):
    model = models.llama()
    given = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=given):
        late = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(tierrt.HookError, match="one optimizer"):
            _one_step(model, late)


def test_native_optimizer_true_needs_the_optimizer_at_entry(nvme_dir):
    model = models.llama()
    with tierrt.offload(model, tiers=tiers(model, nvme_dir), native_optimizer=True):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with pytest.raises(tierrt.ConfigError, match="optimizer=opt"):
            _one_step(model, opt)


def test_eval_mode_at_entry_without_optimizer_is_refused(nvme_dir):
    """Entered in eval mode without an optimizer, and trained without calling model.train():
    gradients have no home, so an optimizer created inside could step nothing; step() says so
    instead of training nothing."""
    model = models.llama().eval()
    with tierrt.offload(model, tiers=tiers(model, nvme_dir)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with pytest.raises(tierrt.HookError, match="model.train"):
            _one_step(model, opt)


def test_model_train_inside_a_context_entered_in_eval_mode_places_it_again(nvme_dir, caplog):
    """A model from ``from_pretrained()`` is in eval mode; ``model.train()`` inside the context
    places it again with room for gradients, and the run equals plain torch's bit for bit."""
    data = models.token_batches(3)
    reference = models.llama().eval()
    ours = copy.deepcopy(reference)
    with torch.no_grad():
        expected_eval = reference(data[0]).logits
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    reference.train()
    for ids in data:
        _one_step(reference, ref_opt, ids)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)) as rt:
        with torch.no_grad():
            assert torch.equal(ours(data[0]).logits, expected_eval)
        opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
        with caplog.at_level("WARNING", logger="tierrt"):
            ours.train()
        assert "placing the model again" in caplog.text
        assert rt.grads is not None
        for ids in data:
            _one_step(ours, opt, ids)
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("eval_on_entry", [False, True], ids=["train_mode", "from_pretrained_eval_mode"])
def test_transformers_trainer_wrapped_by_offload_trains_like_plain(eval_on_entry, nvme_dir, tmp_path):
    """``with tierrt.offload(model, tiers=...): trainer.train()``: the Trainer builds its optimizer
    and scheduler inside the context; logs (loss, grad norm) and weights equal the plain Trainer's.
    Also for a model in eval mode on entry, as ``from_pretrained()`` returns it (the Trainer's
    ``model.train()`` places it again with room for gradients)."""
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()

    reference = models.llama()
    ours = copy.deepcopy(reference)
    if eval_on_entry:
        ours.eval()
    ref_trainer, ref_logs = models.tiny_trainer(reference, tmp_path / "plain")
    ref_trainer.train()
    our_trainer, logs = models.tiny_trainer(ours, tmp_path / "tierrt")
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)):
        our_trainer.train()
    assert len(logs) == 3 and logs == ref_logs
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(next(reference.parameters()), next(models.llama().parameters()))


def test_a_new_optimizer_takes_over_from_an_adopted_one(nvme_dir):
    """Two training phases in one context, each with its own optimizer created inside (two
    Trainers, or a new optimizer after unfreezing): the second takes over from the adopted first,
    and stepping the first again adopts it back, as plain torch would step either."""
    data = models.token_batches(5)

    def phases(model):
        first = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        for ids in data[:2]:
            _one_step(model, first, ids)
        second = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for ids in data[2:4]:
            _one_step(model, second, ids)
        _one_step(model, first, data[4])

    reference = models.llama()
    ours = copy.deepcopy(reference)
    phases(reference)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)):
        phases(ours)
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_two_optimizers_taking_turns_are_stepped_without_placing_again(nvme_dir, caplog):
    """Muon for the hidden matrices and AdamW for the rest, both built inside the context and
    stepped one after the other each iteration: each takes over from the other at every step. Their
    results equal plain torch's bit for bit, and once they are seen taking turns (warned once) the
    model is not placed again at every step (one pass over its weights each time)."""
    data = models.token_batches(5)

    def two_optimizers(model):
        matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "layers" in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "layers" in n)]
        return torch.optim.Muon(matrices, lr=1e-2), torch.optim.AdamW(rest, lr=1e-3)

    def train(model):
        muon, adamw = two_optimizers(model)
        losses = []
        for ids in data:
            loss = models.lm_loss(model, ids)
            loss.backward()
            muon.step()
            adamw.step()
            muon.zero_grad()
            adamw.zero_grad()
            losses.append(loss.detach().clone())
        return losses, muon, adamw

    reference = models.llama()
    ours = copy.deepcopy(reference)
    ref_losses, ref_muon, ref_adamw = train(reference)
    with caplog.at_level(logging.INFO, logger="tierrt"):
        with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)):
            losses, muon, adamw = train(ours)
    assert_same(reference, ours, ref_losses, losses)
    assert_state_equal(ref_muon.state_dict(), muon.state_dict())
    assert_state_equal(ref_adamw.state_dict(), adamw.state_dict())
    assert caplog.text.count("take turns stepping") == 1
    assert caplog.text.count("placing the model again") <= 2  # before the turns were seen, not after
