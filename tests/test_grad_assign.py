"""Gradients that do not arrive through ``loss.backward()``, and gradients left when leaving.

- ``p.grad = g`` on an offloaded parameter (``g`` from ``torch.autograd.grad``, or made by hand)
  replaces its gradient as in torch: the step, clipping, ``GradScaler``, ``rt.grad()`` and a later
  backward (which adds to it) all see it. It used to be ignored silently (the step updated nothing).
- Leaving the context gives the gradients still held (accumulated, not cleared by ``zero_grad()``)
  back in ``p.grad``, also when an exception leaves the block, so a step after the block applies them.
- ``zero_grad()`` of an optimizer tierrt has not adopted yet clears the gradients in the tiers.

Every case runs plain torch and tierrt on the same model and seed and compares bit for bit, at a
DRAM budget that streams the blocks through an NVMe tier.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import models
import pytest
import torch
from test_offload_numerics import streaming_budget
from test_optimizer_offload import make_opt
from torch import nn

import tierrt
from tierrt.errors import HookError

STEPS = 3


def tiers(model: nn.Module, nvme_dir: str) -> list:
    return [tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]


def current_grad(p: nn.Parameter, rt: tierrt.Runtime | None) -> torch.Tensor | None:
    """What ``p.grad`` holds in plain torch (read through ``rt.grad`` inside the context)."""
    return p.grad if rt is None else rt.grad(p)


def assert_same_weights(reference: nn.Module, ours: nn.Module) -> None:
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), f"weight {name} differs"


def assert_same_grads(reference: nn.Module, ours: nn.Module) -> None:
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, f"{name}: plain torch has no gradient, tierrt gave one back"
        else:
            assert b.grad is not None, f"{name}: gradient lost"
            assert b.grad.dtype == a.grad.dtype and b.grad.device == a.grad.device
            assert torch.equal(a.grad, b.grad), f"gradient of {name} differs"


def run_both(
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module, torch.optim.Optimizer, tierrt.Runtime | None], list[torch.Tensor]],
    opt_kind: str,
    nvme_dir: str,
) -> tierrt.Runtime:
    """``train`` on plain torch and inside tierrt (optimizer passed to offload); same results."""
    reference = build()
    ours = copy.deepcopy(reference)
    ref_values = train(reference, make_opt(opt_kind, reference.parameters()), None)
    opt = make_opt(opt_kind, ours.parameters())
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt) as rt:
        values = train(ours, opt, rt)
        assert rt.report().total.bytes_by_link["nvme->dram"] > 0
    assert len(values) == len(ref_values)
    for i, (a, b) in enumerate(zip(ref_values, values)):
        assert torch.equal(a, b), f"value {i} differs: {a} vs {b}"
    assert_same_weights(reference, ours)
    assert_same_grads(reference, ours)
    return rt


# ---- p.grad = g -----------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_kind", ["sgd_plain", "adamw", "rmsprop"])
def test_autograd_grad_assigned_by_hand_is_stepped(opt_kind, nvme_dir):
    """``torch.autograd.grad`` + ``p.grad = g`` + ``step()``: the native kernels (SGD, AdamW) and a
    torch-stepped optimizer (RMSprop) apply the assigned gradients; ``p.grad`` is None again after
    the step (no memory held), ``zero_grad()`` clears them."""
    data = models.token_batches(STEPS)

    def train(model, opt, rt):
        params = list(model.parameters())
        out = []
        for ids in data:
            loss = models.lm_loss(model, ids)
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
            opt.step()
            if rt is not None:
                with torch._C.DisableTorchFunction():  # below tierrt.access: no memory held
                    assert all(p.grad is None for p in params)
                assert torch.equal(rt.grad(params[1]), params[1].grad)
            out.append(params[1].grad.clone())  # what p.grad holds after the step
            opt.zero_grad()
            out.append(loss.detach())
        return out

    run_both(models.llama, train, opt_kind, nvme_dir)


def test_assigned_grads_mix_with_backward_and_clipping(nvme_dir):
    """On a subset of the parameters: a term added after a backward (``p.grad = p.grad + extra``,
    then clipping); a value assigned before a backward (the backward adds to it); a step where only
    the assigned parameters have gradients (the others are skipped, as in torch)."""
    data = models.token_batches(STEPS + 1)

    def train(model, opt, rt):
        params = list(model.parameters())
        some = params[::3]
        out = []
        # micro-batch 1: backward, then add a hand-made term to some parameters' gradients
        models.lm_loss(model, data[0]).backward()
        extra = torch.autograd.grad(models.lm_loss(model, data[1]), some)
        for p, g in zip(some, extra):
            p.grad = current_grad(p, rt) + 0.5 * g
        out.append(torch.nn.utils.clip_grad_norm_(params, 0.5).detach().clone())
        opt.step()
        opt.zero_grad()
        # assigned before a backward: the backward adds to it
        for i, p in enumerate(some):
            p.grad = torch.full_like(p, 1e-3 * (i + 1))
        loss = models.lm_loss(model, data[2])
        loss.backward()
        out.append(loss.detach())
        opt.step()
        # a step whose only gradients are assigned (the others were cleared): only those move
        opt.zero_grad()
        for p, g in zip(some, torch.autograd.grad(models.lm_loss(model, data[3]), some)):
            p.grad = g
        opt.step()
        return out

    run_both(models.llama, train, "sgd_nesterov", nvme_dir)


def test_assigned_grads_with_grad_scaler(nvme_dir):
    """``GradScaler``: gradients of the scaled loss assigned by hand are unscaled once (by the
    scaler's check of the offloaded gradients, not twice through ``p.grad`` as well)."""
    data = models.token_batches(STEPS)

    def train(model, opt, rt):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        params = list(model.parameters())
        out = []
        for ids in data:
            loss = models.lm_loss(model, ids)
            for p, g in zip(params, torch.autograd.grad(scaler.scale(loss), params)):
                p.grad = g
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            out.append(loss.detach())
        return out

    run_both(models.llama, train, "adamw", nvme_dir)


def test_zero_grad_keeping_zeros_clears_assigned_grads(nvme_dir):
    """``zero_grad(set_to_none=False)`` after an assignment: a zero gradient, stepped (momentum
    and weight decay still move the weights), as in torch."""
    data = models.mlp_batches(2)

    def train(model, opt, rt):
        params = list(model.parameters())
        models.mlp_loss(model, data[0]).backward()
        opt.step()
        for p, g in zip(params, torch.autograd.grad(models.mlp_loss(model, data[1]), params)):
            p.grad = g
        opt.zero_grad(set_to_none=False)
        opt.step()
        return [] if rt is None else [rt.grad(params[0])]

    reference = models.mlp()
    ref_opt = make_opt("sgd_nesterov", reference.parameters())
    train(reference, ref_opt, None)
    ours = models.mlp()
    opt = make_opt("sgd_nesterov", ours.parameters())
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt) as rt:
        (grad,) = train(ours, opt, rt)
        assert torch.equal(grad, torch.zeros_like(grad))
    assert_same_weights(reference, ours)
    assert_same_grads(reference, ours)


def test_a_sparse_assigned_grad_raises(nvme_dir):
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt):
        weight = model[0].weight
        weight.grad = torch.zeros(weight.shape).to_sparse()
        with pytest.raises(HookError, match="dense"):
            opt.step()
        assert weight.grad is not None  # not dropped
        weight.grad = None


# ---- gradients on leaving ---------------------------------------------------------------------------
ENDINGS = ["accumulated", "stepped", "zeroed_to_none", "zeroed_to_zeros", "assigned"]


@pytest.mark.parametrize(
    ("ending", "with_optimizer"),
    [(ending, True) for ending in ENDINGS] + [("accumulated", False), ("assigned", False)],
)
def test_gradients_are_given_back_on_exit(ending, with_optimizer, nvme_dir):
    """The gradients held when the block ends are in ``p.grad`` afterwards (dtype and device of
    plain torch), and a step outside the block applies them."""
    data = models.token_batches(3)

    def inside(model, opt):
        models.lm_loss(model, data[0]).backward()
        opt.step()
        opt.zero_grad()
        models.lm_loss(model, data[1]).backward()
        models.lm_loss(model, data[2]).backward()  # two micro-batches accumulated
        if ending == "stepped":
            opt.step()
        elif ending == "zeroed_to_none":
            opt.zero_grad(set_to_none=True)
        elif ending == "zeroed_to_zeros":
            opt.zero_grad(set_to_none=False)
        elif ending == "assigned":
            head = model.lm_head.weight
            head.grad = torch.full_like(head, 0.25)

    reference = models.llama()
    ours = copy.deepcopy(reference)
    ref_opt = make_opt("adamw", reference.parameters())
    inside(reference, ref_opt)
    opt = make_opt("adamw", ours.parameters())
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), **({"optimizer": opt} if with_optimizer else {})):
        inside(ours, opt)
    assert_same_grads(reference, ours)
    ref_opt.step()
    opt.step()  # outside: plain torch on the restored model
    assert_same_weights(reference, ours)


def test_interrupted_accumulation_keeps_its_gradients(nvme_dir):
    """An exception in the middle of an accumulation window leaves the block: the micro-batches
    done so far are in ``p.grad``, as in plain torch, and training can go on from there."""
    data = models.token_batches(4)

    def inside(model, opt):
        models.lm_loss(model, data[0]).backward()
        opt.step()
        opt.zero_grad()
        models.lm_loss(model, data[1]).backward()
        models.lm_loss(model, data[2]).backward()
        raise KeyboardInterrupt

    reference = models.gpt2()
    ours = copy.deepcopy(reference)
    ref_opt = make_opt("sgd_nesterov", reference.parameters())
    with pytest.raises(KeyboardInterrupt):
        inside(reference, ref_opt)
    opt = make_opt("sgd_nesterov", ours.parameters())
    with pytest.raises(KeyboardInterrupt):
        with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt):
            inside(ours, opt)
    assert_same_grads(reference, ours)
    for model, optimizer in ((reference, ref_opt), (ours, opt)):
        models.lm_loss(model, data[3]).backward()
        optimizer.step()
    assert_same_weights(reference, ours)


def test_gradients_given_back_in_the_parameters_dtype(nvme_dir):
    """Under ``compute_dtype=bfloat16`` the gradients given back have the restored (fp32)
    parameters' dtype, as ``p.grad`` must."""
    model = models.llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bf16 = torch.bfloat16
    with tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt, compute_dtype=bf16) as rt:
        models.lm_loss(model, models.token_batches(1)[0]).backward()
        expected = dict(rt.named_grads())
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype == torch.float32
        assert torch.equal(p.grad, expected[name])


# ---- an optimizer created inside the context --------------------------------------------------------
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_before_adoption_clears_stored_gradients(set_to_none, nvme_dir):
    """An optimizer built inside the context clears the gradients already in the tiers with its
    ``zero_grad()`` before its first ``step()`` (where it is adopted), as torch's would."""
    data = models.token_batches(3)

    def loop(model, make):
        models.lm_loss(model, data[0]).backward()  # stale gradients, from before the optimizer
        opt = make(model)
        opt.zero_grad(set_to_none=set_to_none)
        losses = []
        for ids in data[1:]:
            loss = models.lm_loss(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
            losses.append(loss.detach())
        return opt, losses

    def make(model):
        return make_opt("sgd_nesterov", model.parameters())

    reference = models.llama()
    ours = copy.deepcopy(reference)
    _, ref_losses = loop(reference, make)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)) as rt:
        opt, losses = loop(ours, make)
        assert rt.optimizer is opt
    assert torch.equal(torch.stack(ref_losses), torch.stack(losses))
    assert_same_weights(reference, ours)
    assert_same_grads(reference, ours)
    from tierrt.adopt import _ORIGINAL_ZERO_GRAD

    assert torch.optim.Optimizer.zero_grad is _ORIGINAL_ZERO_GRAD  # put back on leaving
