"""Weights and optimizer state changed by the user's loop inside the context — between backward and
step() (where updates run during backward already), or between steps — are what the next step uses,
exactly as in plain torch."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable

import models
import pytest
import torch
from test_offload_numerics import streaming_budget

import tierrt

Edit = Callable[[torch.nn.Module, torch.optim.Optimizer, int], None]

STEPS = 5


def loop(model, opt, data, edit: Edit, when: str) -> list[torch.Tensor]:
    losses = []
    for i, ids in enumerate(data):
        loss = models.lm_loss(model, ids)
        loss.backward()
        if when == "before step":
            edit(model, opt, i)
        opt.step()
        opt.zero_grad()
        if when == "after step":
            edit(model, opt, i)
        losses.append(loss.detach().clone())
    return losses


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    if kind == "amsgrad":
        return torch.optim.Adam(params, lr=1e-3, amsgrad=True)
    return torch.optim.AdamW(params, lr=1e-3)


def assert_same_as_plain(nvme_dir, edit: Edit, when: str, kind: str = "adamw") -> tierrt.Runtime:
    """Train a Llama with ``edit`` applied at ``when``, plainly and through tierrt (a streaming
    budget, updates overlapping backward): bitwise the same losses, weights and optimizer state."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(STEPS)
    ref_opt = make_optimizer(kind, reference.parameters())
    ref_losses = loop(reference, ref_opt, data, edit, when)
    opt = make_optimizer(kind, ours.parameters())
    budget = streaming_budget(ours, extra_blocks=6, adam=kind != "sgd")
    tiers = [tierrt.dram(budget), tierrt.nvme(nvme_dir)]
    with tierrt.offload(ours, tiers=tiers, optimizer=opt) as rt:
        losses = loop(ours, opt, data, edit, when)
        state = opt.state_dict()
    for a, b in zip(ref_losses, losses, strict=True):
        assert torch.equal(a, b)
    for (name, a), b in zip(reference.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), name
    ref_state = ref_opt.state_dict()["state"]
    assert sorted(ref_state) == sorted(state["state"])
    for index, entry in ref_state.items():
        assert sorted(entry) == sorted(state["state"][index]), index
        for key, value in entry.items():
            got = state["state"][index][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got)), (index, key)
    return rt


def head(model) -> torch.nn.Parameter:
    return model.lm_head.weight


# ---- weights changed between backward and step() ----------------------------------------------------
def decay_by_hand(model, opt, i):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.999)


def assign_data(model, opt, i):
    p = model.model.layers[0].mlp.up_proj.weight
    p.data = p.detach() * 0.5


def test_weights_changed_between_backward_and_step_are_stepped(nvme_dir):
    rt = assert_same_as_plain(nvme_dir, decay_by_hand, "before step")
    speculator = rt.blockwise.updates.speculator
    assert speculator.committed == 0 and speculator.discarded > 0  # every early update was stale


def test_weight_assigned_between_backward_and_step_is_stepped(nvme_dir):
    assert_same_as_plain(nvme_dir, assign_data, "before step")


# ---- optimizer state loaded or edited --------------------------------------------------------------
@pytest.mark.parametrize("when", ["before step", "after step"])
def test_load_state_dict_between_steps_is_what_the_step_continues_from(nvme_dir, when):
    saved: dict[str, object] = {}

    def roll_back_the_optimizer(model, opt, i):
        if i == 1:
            saved["state"] = copy.deepcopy(opt.state_dict())
        if i == 3:
            opt.load_state_dict(saved["state"])

    assert_same_as_plain(nvme_dir, roll_back_the_optimizer, when)


def zero_in_place(model, opt, i):
    if i == 1:
        opt.state[head(model)]["exp_avg"].zero_()


def zero_through_a_view(model, opt, i):
    if i == 1:
        opt.state[head(model)]["exp_avg_sq"][:4].mul_(2.0)


def assign_a_state_tensor(model, opt, i):
    if i == 1:
        opt.state[head(model)]["exp_avg"] = torch.full_like(head(model), 1e-3)


def set_the_step(model, opt, i):
    if i == 1:
        opt.state[head(model)]["step"] = torch.tensor(10.0)


def delete_one_entry(model, opt, i):
    if i == 1:
        del opt.state[head(model)]


def clear_the_state(model, opt, i):
    if i == 2:
        opt.state.clear()


def replace_the_state(model, opt, i):
    if i == 2:
        opt.state = defaultdict(dict)


def assign_a_whole_entry(model, opt, i):
    p, q = head(model), model.model.embed_tokens.weight
    if i == 2 and p.shape == q.shape:
        opt.state[p] = {key: value.clone() for key, value in opt.state[q].items()}


EDITS = [zero_in_place, zero_through_a_view, assign_a_state_tensor, set_the_step, delete_one_entry,
         clear_the_state, replace_the_state, assign_a_whole_entry]  # fmt: skip


@pytest.mark.parametrize("when", ["before step", "after step"])
@pytest.mark.parametrize("edit", EDITS, ids=lambda edit: edit.__name__)
def test_edits_of_optimizer_state_are_used_by_the_next_step(nvme_dir, edit, when):
    assert_same_as_plain(nvme_dir, edit, when)


def zero_momentum(model, opt, i):
    if i == 1:
        opt.state[head(model)]["momentum_buffer"].zero_()


@pytest.mark.parametrize("edit", [zero_momentum, delete_one_entry], ids=lambda edit: edit.__name__)
def test_edits_of_sgd_momentum_are_used_by_the_next_step(nvme_dir, edit):
    assert_same_as_plain(nvme_dir, edit, "before step", kind="sgd")


def test_bad_state_values_are_refused_with_nothing_changed(nvme_dir):
    model = models.llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = models.token_batches(2)
    tiers = [tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(model, tiers=tiers, optimizer=opt):
        loop(model, opt, data[:1], lambda *_: None, "after step")
        p = head(model)
        before = opt.state[p]["exp_avg"].clone()
        with pytest.raises(tierrt.ConfigError, match="shaped like the parameter"):
            opt.state[p]["exp_avg"] = torch.zeros(3)
        with pytest.raises(tierrt.ConfigError, match="not a whole number"):
            opt.state[p]["step"] = torch.tensor(1.5)
        with pytest.raises(tierrt.ConfigError, match="lacks exp_avg_sq"):
            opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p)}
        assert torch.equal(opt.state[p]["exp_avg"], before)
        assert float(opt.state[p]["step"]) == 1.0


def amsgrad_off_then_on(model, opt, i):
    for group in opt.param_groups:
        group["amsgrad"] = i not in (1, 2)


def test_amsgrad_turned_off_keeps_the_state_torch_keeps(nvme_dir):
    """torch makes max_exp_avg_sq at a parameter's first step with amsgrad and keeps it when amsgrad
    is turned off: state_dict() inside the context has it too (a checkpoint saved meanwhile could
    not be resumed with amsgrad on otherwise)."""
    assert_same_as_plain(nvme_dir, amsgrad_off_then_on, "after step", kind="amsgrad")
