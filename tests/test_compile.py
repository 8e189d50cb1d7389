"""torch.compile inside a tierrt.offload() context: the model, a loss function, the optimizer step."""

from __future__ import annotations

import copy

import models
import pytest
import torch
from test_offload_numerics import streaming_budget

import tierrt


def tiers(model, nvme_dir):
    return [tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]


def train(model, opt, data, step=None):
    losses = []
    for ids in data:
        loss = models.lm_loss(model, ids)
        loss.backward()
        (step or opt.step)()
        opt.zero_grad()
        losses.append(loss.detach().clone())
    return losses


def test_compiled_optimizer_step_inside_runs_tierrts_step(nvme_dir):
    """torch.compile(opt.step) made inside the context runs tierrt's step uncompiled: bit for bit the
    plain run (dynamo used to trace into the block pipeline and fail with an internal error)."""
    torch._dynamo.reset()
    reference = models.llama(layers=2)
    ours = copy.deepcopy(reference)
    data = models.token_batches(2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    ref_losses = train(reference, ref_opt, data)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt):
        losses = train(ours, opt, data, step=torch.compile(opt.step, backend="eager"))
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses))
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), ours.parameters()))


def test_optimizer_step_compiled_before_entering_raises_clearly(nvme_dir):
    """A step compiled before entering is torch's own, traced over offloaded parameters: a HookError
    says so before anything is stepped, and the model comes back with its values."""
    torch._dynamo.reset()
    model = models.llama(layers=2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = torch.compile(opt.step, backend="eager")
    with pytest.raises(tierrt.HookError, match="torch.compile is tracing AdamW.step"):
        with tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt):
            train(model, opt, models.token_batches(1), step=step)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
def test_compiled_model_inside(nvme_dir):
    """torch.compile(model) inside the context runs (dynamo breaks the graph at tierrt's hooks) and,
    with a backend that keeps torch's kernels, trains bit for bit like the plain run."""
    torch._dynamo.reset()
    reference = models.llama(layers=2)
    ours = copy.deepcopy(reference)
    data = models.token_batches(2)
    ref_losses = train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3), data)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt):
        losses = train(torch.compile(ours, backend="eager"), opt, data)
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses))
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), ours.parameters()))


def test_compiled_model_offloaded(nvme_dir):
    """``tierrt.offload(torch.compile(model))``: the compiled wrapper is what the user holds. It
    trains like the plain run, and leaving gives it back whole (the wrapper forwards ``len()`` to a
    model that has none: leaving must not ask a module for its truth value)."""
    torch._dynamo.reset()
    reference = models.llama(layers=2)
    ours = torch.compile(copy.deepcopy(reference), backend="eager")
    data = models.token_batches(3)
    ref_losses = train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3), data[:2])
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt) as rt:
        losses = train(ours, opt, data[:2])
    assert rt.closed
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses))
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), ours.parameters()))
    assert "__deepcopy__" not in ours.__dict__ and "__deepcopy__" not in ours._orig_mod.__dict__
    assert torch.equal(models.lm_loss(ours, data[2]), models.lm_loss(reference, data[2]))
