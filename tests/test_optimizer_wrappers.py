"""Optimizer wrappers passed to ``offload(optimizer=...)``: accelerate's ``AcceleratedOptimizer``.

``accelerator.prepare`` returns a wrapper that never runs ``Optimizer.__init__`` and forwards to the
torch optimizer inside it; its ``step()`` raised AttributeError (``_optimizer_step_pre_hooks``)
under tierrt. tierrt now steps the inner optimizer while the user keeps calling the wrapper, whose
own policy (no step or zero_grad while accumulating, stepping through a GradScaler that may skip a
step) behaves as without tierrt: losses and weights equal plain accelerate's bit for bit.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
from test_offload_numerics import streaming_budget

import tierrt

accelerate = pytest.importorskip("accelerate")
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _prepare(model, accum: int):
    acc = accelerate.Accelerator(gradient_accumulation_steps=accum, cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(models.token_batches(6), batch_size=None)
    return (acc, *acc.prepare(model, opt, loader))


def _accelerate_loop(acc, model, opt, loader) -> list[torch.Tensor]:
    out = []
    for ids in loader:
        with acc.accumulate(model):
            loss = models.lm_loss(model, ids)
            acc.backward(loss)
            if acc.sync_gradients:
                out.append(acc.clip_grad_norm_(model.parameters(), 1.0).detach().clone())
            opt.step()
            opt.zero_grad()
        out.append(loss.detach().clone())
    return out


def _assert_same(reference, ours, ref_values, values) -> None:
    assert len(ref_values) == len(values)
    for i, (a, b) in enumerate(zip(ref_values, values)):
        assert torch.equal(a, b), f"value {i} differs: {a} vs {b}"
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), f"weight {name} differs"


@pytest.mark.parametrize("accum", [1, 2])
def test_accelerated_optimizer_passed_to_offload_trains_like_plain_accelerate(accum, nvme_dir):
    """prepare() outside, the prepared optimizer passed to offload(), accumulate() and clipping."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    ref_values = _accelerate_loop(*_prepare(reference, accum))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    acc, model, opt, loader = _prepare(ours, accum)
    assert isinstance(opt, AcceleratedOptimizer)
    tiers = [tierrt.dram(streaming_budget(ours)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(model, tiers=tiers, optimizer=opt) as rt:
        assert rt.optimizer is opt.optimizer
        values = _accelerate_loop(acc, model, opt, loader)
        assert rt.report().total.bytes_by_link["nvme->dram"] > 0
    _assert_same(reference, ours, ref_values, values)


def _scaled_loop(model, opt, scaler, data, poison: int) -> list[torch.Tensor]:
    """A GradScaler step (as accelerate runs fp16 on a GPU); batch ``poison`` overflows, so that
    step is skipped and the scale halves."""
    out = []
    for i, ids in enumerate(data):
        loss = models.lm_loss(model, ids)
        if i == poison:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        opt.step()
        opt.zero_grad()
        out += [loss.detach().clone(), torch.tensor(opt.step_was_skipped), torch.tensor(scaler.get_scale())]
    return out


def test_accelerated_optimizer_with_grad_scaler_skips_overflowing_steps(nvme_dir):
    """The wrapper steps through its GradScaler, which swaps the inner optimizer's step() for its
    own bound method captured before entering: the updates still go through tierrt, and a step with
    inf gradients is skipped as without tierrt."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(4)

    accelerate.Accelerator(cpu=True)  # the state AcceleratedOptimizer reads

    def wrapped(model):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return AcceleratedOptimizer(inner, device_placement=False, scaler=scaler), scaler

    ref_opt, ref_scaler = wrapped(reference)
    ref_values = _scaled_loop(reference, ref_opt, ref_scaler, data, poison=1)
    assert ref_values[4].item() is True  # the overflowing step was skipped

    opt, scaler = wrapped(ours)
    tiers = [tierrt.dram(streaming_budget(ours)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(ours, tiers=tiers, optimizer=opt):
        values = _scaled_loop(ours, opt, scaler, data, poison=1)
    _assert_same(reference, ours, ref_values, values)


def test_an_optimizer_subclass_that_wraps_nothing_is_refused_at_entry(nvme_dir):
    """A torch.optim.Optimizer subclass that never ran Optimizer.__init__ and holds no optimizer:
    ConfigError before anything moves."""

    class Hollow(torch.optim.Optimizer):
        def __init__(self) -> None:  # noqa: D107 - never calls Optimizer.__init__
            self.optimizer = None

    model = models.mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(tierrt.ConfigError, match="pass the torch optimizer"):
        with tierrt.offload(model, tiers=[tierrt.dram("64MiB"), tierrt.nvme(nvme_dir)], optimizer=Hollow()):
            pass
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_wrapper_made_inside_the_context_keeps_working_after_it(nvme_dir):
    """The wrapper is made inside the context around the optimizer given to offload(), so the
    GradScaler path captures tierrt's step(); after leaving, that captured step is the optimizer's
    own again and training continues as plain torch's."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(4)
    accelerate.Accelerator(cpu=True)

    def wrap(inner):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        return AcceleratedOptimizer(inner, device_placement=False, scaler=scaler), scaler

    ref_opt, ref_scaler = wrap(torch.optim.AdamW(reference.parameters(), lr=1e-3))
    ref_values = _scaled_loop(reference, ref_opt, ref_scaler, data, poison=2)

    inner = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    tiers = [tierrt.dram(streaming_budget(ours)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(ours, tiers=tiers, optimizer=inner):
        opt, scaler = wrap(inner)
        values = _scaled_loop(ours, opt, scaler, data[:3], poison=2)
    values += _scaled_loop(ours, opt, scaler, data[3:], poison=-1)
    _assert_same(reference, ours, ref_values, values)
