"""Optimizer state that exists before entering, and parameters that change status inside.

Entering ``tierrt.offload()`` continues from whatever state the optimizer holds — a checkpoint
loaded with ``load_state_dict``, plain steps taken before, an earlier ``offload()`` of the same
model — bit for bit as plain torch would, and leaving hands it back. A parameter frozen on entry
that requires grad inside is refused with a clear error (never silently left untrained), and a
param group added inside is trained like torch trains it.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
from test_offload_numerics import CASES, streaming_budget
from test_optimizer_offload import assert_state_equal, make_opt, run

import tierrt

OPTIMIZERS = ["adamw", "adam_l2_amsgrad", "sgd_nesterov"]
MODEL_OF = {"adamw": "llama", "adam_l2_amsgrad": "mlp", "sgd_nesterov": "gpt2"}


def tiers(model, nvme_dir):
    return [tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]


def reference_run(name, opt_kind, steps=4):
    """The plain run: ``steps`` steps of one model; returns it, its optimizer, data, loss, losses."""
    build, batches_fn, loss_fn = CASES[name]
    data = batches_fn(steps)
    model = build()
    opt = make_opt(opt_kind, model.parameters())
    losses = run(model, opt, data, loss_fn)
    return model, opt, data, loss_fn, losses


def assert_same(reference, ref_opt, ref_losses, ours, opt, losses):
    assert len(ref_losses) == len(losses)
    for i, (a, b) in enumerate(zip(ref_losses, losses)):
        assert torch.equal(a, b), f"loss {i} differs: {a} vs {b}"
    for (n, a), b in zip(reference.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), f"weight {n} differs"
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


@pytest.mark.parametrize("opt_kind", OPTIMIZERS)
def test_state_loaded_before_entering_continues(opt_kind, nvme_dir):
    """Resuming: weights and optimizer state of a checkpoint loaded before entering."""
    name = MODEL_OF[opt_kind]
    reference, ref_opt, data, loss_fn, ref_losses = reference_run(name, opt_kind)
    build = CASES[name][0]
    saved = build()  # the run that wrote the checkpoint: the reference's first two steps
    saved_opt = make_opt(opt_kind, saved.parameters())
    run(saved, saved_opt, data[:2], loss_fn)
    checkpoint = copy.deepcopy((saved.state_dict(), saved_opt.state_dict()))

    ours = build()
    opt = make_opt(opt_kind, ours.parameters())
    ours.load_state_dict(checkpoint[0])
    opt.load_state_dict(checkpoint[1])
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt):
        assert not opt.state.original, "the torch-side copies of the imported state are freed"
        assert_state_equal(checkpoint[1], opt.state_dict())  # torch's format, read from the tiers
        losses = run(ours, opt, data[2:], loss_fn)
        assert_state_equal(ref_opt.state_dict(), opt.state_dict())
    assert_same(reference, ref_opt, ref_losses[2:], ours, opt, losses)


@pytest.mark.parametrize("opt_kind", OPTIMIZERS)
def test_plain_steps_before_entering_continue(opt_kind, nvme_dir):
    name = MODEL_OF[opt_kind]
    reference, ref_opt, data, loss_fn, ref_losses = reference_run(name, opt_kind)
    ours = CASES[name][0]()
    opt = make_opt(opt_kind, ours.parameters())
    losses = run(ours, opt, data[:2], loss_fn)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt):
        losses += run(ours, opt, data[2:], loss_fn)
    assert_same(reference, ref_opt, ref_losses, ours, opt, losses)


@pytest.mark.parametrize("opt_kind", OPTIMIZERS)
@pytest.mark.parametrize("plain_between", [False, True])
def test_reentering_continues(opt_kind, plain_between, nvme_dir):
    """Enter, train, leave, (train plainly,) enter again with the same model and optimizer."""
    name = MODEL_OF[opt_kind]
    reference, ref_opt, data, loss_fn, ref_losses = reference_run(name, opt_kind, steps=5)
    ours = CASES[name][0]()
    opt = make_opt(opt_kind, ours.parameters())
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt):
        losses = run(ours, opt, data[:2], loss_fn)
    assert_state_equal(copy.deepcopy(opt.state_dict()), opt.state_dict())
    later = data[2:]
    if plain_between:
        losses += run(ours, opt, data[2:3], loss_fn)
        later = data[3:]
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt):
        losses += run(ours, opt, later, loss_fn)
    assert_same(reference, ref_opt, ref_losses, ours, opt, losses)


def test_state_of_a_parameter_frozen_on_entry_stays_with_torch(nvme_dir):
    """A parameter trained before entering and frozen on entry keeps its torch state, untouched."""
    build, batches_fn, loss_fn = CASES["mlp"]
    data = batches_fn(4)
    reference, ours = build(), build()
    ref_opt = make_opt("adamw", reference.parameters())
    opt = make_opt("adamw", ours.parameters())
    ref_losses = run(reference, ref_opt, data[:2], loss_fn)
    losses = run(ours, opt, data[:2], loss_fn)
    for model in (reference, ours):
        model[0].weight.requires_grad_(False)
    ref_losses += run(reference, ref_opt, data[2:], loss_fn)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt):
        assert list(opt.state.original) == [ours[0].weight]  # only the frozen one is left on the torch side
        assert len(opt.state) == len(list(ours.parameters()))  # the others read from the tiers
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # round trip, the frozen one included
        losses += run(ours, opt, data[2:], loss_fn)
        assert_state_equal(ref_opt.state_dict(), opt.state_dict())
    assert_same(reference, ref_opt, ref_losses, ours, opt, losses)


def test_mismatched_state_is_refused_before_anything_moves(nvme_dir):
    """Optimizer state of another model (torch's load_state_dict does not check shapes)."""
    other = models.mlp(width=64)
    other_opt = make_opt("adamw", other.parameters())
    run(other, other_opt, models.mlp_batches(1, width=64), models.mlp_loss)
    model = models.mlp()
    before = copy.deepcopy(model.state_dict())
    opt = make_opt("adamw", model.parameters())
    opt.load_state_dict(other_opt.state_dict())
    state = dict(opt.state)
    assert len(state) == 14
    with pytest.raises(
        tierrt.ConfigError, match=r"optimizer state of 0\.weight: exp_avg has shape \[64, 64\]"
    ):
        with tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt):
            pass
    assert len(opt.state) == len(state) and all(opt.state[p] is entry for p, entry in state.items())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_mismatched_state_loaded_inside_is_refused(nvme_dir):
    other = models.mlp(width=64)
    other_opt = make_opt("adamw", other.parameters())
    run(other, other_opt, models.mlp_batches(1, width=64), models.mlp_loss)
    model = models.mlp()
    opt = make_opt("adamw", model.parameters())
    with tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt):
        with pytest.raises(tierrt.ConfigError, match=r"of 0\.weight \(index 0\): exp_avg has shape"):
            opt.load_state_dict(other_opt.state_dict())
        assert opt.state_dict()["state"] == {}  # nothing was changed


def test_state_lacking_what_the_options_need_is_refused(nvme_dir):
    model = models.mlp()
    plain = make_opt("adamw", model.parameters())
    run(model, plain, models.mlp_batches(1), models.mlp_loss)
    opt = make_opt("adamw", model.parameters())
    opt.load_state_dict(plain.state_dict())
    for group in opt.param_groups:
        group["amsgrad"] = True  # the state has no max_exp_avg_sq: torch's own step would fail too
    with pytest.raises(tierrt.ConfigError, match="lacks max_exp_avg_sq"):
        with tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt):
            pass


# ---- parameters frozen on entry, param groups added inside --------------------------------------
def test_unfreezing_inside_is_refused_at_forward_and_step(nvme_dir):
    """An unfrozen parameter has no gradient buffer or state: a clear error, never silent no-training.
    Freezing it again lets the run continue exactly like torch with the parameter frozen throughout."""
    build, batches_fn, loss_fn = CASES["llama"]
    data = batches_fn(3)
    reference, ours = build(), build()
    for model in (reference, ours):
        model.model.embed_tokens.weight.requires_grad_(False)
    ref_opt = make_opt("adamw", reference.parameters())
    ref_losses = run(reference, ref_opt, data, loss_fn)
    opt = make_opt("adamw", ours.parameters())
    embedding = ours.model.embed_tokens.weight
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt):
        losses = run(ours, opt, data[:1], loss_fn)
        embedding.requires_grad_(True)
        with pytest.raises(tierrt.HookError, match="model.embed_tokens.weight did not require grad") as info:
            loss_fn(ours, data[1])
        assert info.value.parameters == ["model.embed_tokens.weight"]
        with pytest.raises(tierrt.HookError, match="model.embed_tokens.weight"):
            opt.step()
        assert embedding.grad is None
        embedding.requires_grad_(False)
        losses += run(ours, opt, data[1:], loss_fn)
    assert_same(reference, ref_opt, ref_losses, ours, opt, losses)


def test_add_param_group_of_a_parameter_frozen_on_entry_is_refused(nvme_dir):
    model = models.llama()
    head = model.lm_head.weight
    head.requires_grad_(False)
    opt = make_opt("adamw", [p for p in model.parameters() if p.requires_grad])
    with tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt):
        head.requires_grad_(True)
        with pytest.raises(tierrt.HookError, match="parameter lm_head.weight did not require grad"):
            opt.add_param_group({"params": [head], "lr": 1e-3})
        assert len(opt.param_groups) == 2


@pytest.mark.parametrize("opt_kind", ["adamw", "sgd_nesterov"])
def test_add_param_group_inside_trains_like_torch(opt_kind, nvme_dir):
    """Parameters trainable on entry but not in the optimizer yet: added after step 1, trained from
    step 2 on with fresh state; until then they keep their values. (``model.zero_grad()`` before
    adding: torch's ``opt.zero_grad()`` leaves the gradients of parameters outside the optimizer to
    accumulate, tierrt's clears every offloaded gradient.)"""
    build, batches_fn, loss_fn = CASES["llama"]
    data = batches_fn(3)
    models_ = [build(), build()]
    results = []
    for use in (False, True):
        model = models_[use]
        head = model.lm_head.weight
        opt = make_opt(opt_kind, [p for p in model.parameters() if p is not head])
        if use:
            rt = tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt)
            rt.start()
        losses = run(model, opt, data[:1], loss_fn)
        model.zero_grad()
        opt.add_param_group({"params": head, "lr": 1e-3})
        losses += run(model, opt, data[1:], loss_fn)
        state = copy.deepcopy(opt.state_dict())
        if use:
            rt.close()
        results.append((losses, state))
    (ref_losses, ref_state), (losses, state) = results
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses))
    for (n, a), b in zip(models_[0].named_parameters(), models_[1].parameters()):
        assert torch.equal(a, b), n
    assert_state_equal(ref_state, state)


def test_add_param_group_needing_state_not_laid_out_is_refused(nvme_dir):
    model = models.llama()
    head = model.lm_head.weight
    opt = torch.optim.Adam([p for p in model.parameters() if p is not head], lr=1e-3)
    with tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt):
        with pytest.raises(tierrt.ConfigError, match="amsgrad=True in a new group"):
            opt.add_param_group({"params": [head], "amsgrad": True})
        assert len(opt.param_groups) == 1


def test_trainable_parameters_left_out_of_the_optimizer_keep_their_values(nvme_dir):
    """Only the weights are in the optimizer; the biases of the same blocks require grad too."""
    build, batches_fn, loss_fn = CASES["mlp"]
    data = batches_fn(3)
    reference, ours = build(), build()
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.dim() > 1], lr=1e-2)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.dim() > 1], lr=1e-2)
    ref_losses = run(reference, ref_opt, data, loss_fn)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt):
        losses = run(ours, opt, data, loss_fn)
    assert_same(reference, ref_opt, ref_losses, ours, opt, losses)
