"""Optimizer classes outside tierrt's table (third-party ones, subclasses, transformers' Adafactor,
torch's Muon): what they keep per parameter is learned by probing their step, their state tensors
live in the tiers, and training equals plain torch bit for bit. Optimizers whose results
block-by-block stepping would change are refused before anything moves.

Each optimizer here is a real algorithm as a user would bring it (Lion as published, an AdamW
subclass with a decoupled weight-decay schedule), not a stand-in for one.
"""

from __future__ import annotations

import copy
import logging
import os

import models
import pytest
import torch
from optimizers import Lion
from test_adopted_state_in_tiers import state_in_tiers
from test_late_optimizer import assert_same, loop, tiers
from test_optimizer_offload import assert_state_equal
from torch import nn

import tierrt


class DecayingAdamW(torch.optim.AdamW):
    """A subclass with state of its own: the weight decay each parameter has had so far."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    decayed = self.state[p].setdefault("decayed", torch.zeros_like(p))
                    decayed.add_(p, alpha=group["lr"] * group["weight_decay"])
        return loss


class GlobalNormSGD(torch.optim.Optimizer):
    """SGD on the gradient divided by the norm of all gradients: couples the parameters."""

    def __init__(self, params, lr: float = 0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad / norm, alpha=-group["lr"])


class EstimatingSGD(torch.optim.Optimizer):
    """Per-parameter SGD whose step size ``d`` grows in the param group on every step, as
    D-Adaptation's and Prodigy's estimates do."""

    def __init__(self, params, lr: float = 0.1):
        super().__init__(params, dict(lr=lr, d=1e-3))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] * group["d"])
            group["d"] *= 1.5


class CountingLion(Lion):
    """Lion that counts its steps on the optimizer object."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_taken = 0

    def step(self, closure=None):
        self.steps_taken += 1
        return super().step(closure)


def make(kind: str, params) -> torch.optim.Optimizer:
    params = list(params)
    groups = [
        {"params": [p for p in params if p.dim() > 1]},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    if kind == "lion":
        return Lion(groups, lr=1e-3, weight_decay=0.1)
    if kind == "decaying_adamw":
        return DecayingAdamW(groups, lr=2e-3, weight_decay=0.05)
    if kind == "muon":  # matrices only (Muon refuses vectors); the rest is frozen in these runs
        return torch.optim.Muon([p for p in params if p.dim() == 2], lr=2e-2)
    if kind == "hf_adafactor":
        transformers = pytest.importorskip("transformers")
        return transformers.optimization.Adafactor(
            params, lr=1e-3, beta1=0.9, relative_step=False, scale_parameter=False
        )
    raise ValueError(kind)


# kind -> the state kinds tierrt learns (held in the tiers)
LEARNED = {
    "lion": {"exp_avg"},
    "decaying_adamw": {"exp_avg", "exp_avg_sq", "decayed"},
    "muon": {"momentum_buffer"},
    "hf_adafactor": {"exp_avg"},  # its factored second moments stay in memory
}


def _model(kind: str) -> nn.Module:
    model = models.llama()
    if kind == "muon":
        for p in model.parameters():
            p.requires_grad_(p.dim() == 2)
    return model


@pytest.mark.parametrize("kind", list(LEARNED))
def test_learned_state_lives_in_the_tiers_and_trains_bitwise(kind, nvme_dir):
    reference = _model(kind)
    ours = copy.deepcopy(reference)
    data = models.token_batches(4)
    ref_opt = make(kind, reference.parameters())
    ref_values = loop(reference, ref_opt, data)

    opt = make(kind, ours.parameters())
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt) as rt:
        assert state_in_tiers(rt) and set(rt.blockwise.state_kinds) == LEARNED[kind]
        values = loop(ours, opt, data)
        assert rt.report().total.bytes_by_link["nvme->dram"] > 0
        inside = opt.state_dict()
    assert_same(reference, ours, ref_values, values)
    assert_state_equal(ref_opt.state_dict(), inside)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


def test_learned_state_resumes_from_a_checkpoint(nvme_dir):
    """A Lion checkpoint saved by plain torch after two steps loads into the tiers, and the next
    steps equal torch's."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(4)
    ref_opt = make("lion", reference.parameters())
    loop(reference, ref_opt, data[:2])
    saved_weights = copy.deepcopy(reference.state_dict())
    saved_state = copy.deepcopy(ref_opt.state_dict())
    ref_values = loop(reference, ref_opt, data[2:])

    ours.load_state_dict(saved_weights)
    opt = make("lion", ours.parameters())
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt) as rt:
        opt.load_state_dict(saved_state)
        assert state_in_tiers(rt)
        values = loop(ours, opt, data[2:])
    assert_same(reference, ours, ref_values, values)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


def test_third_party_optimizer_built_inside_is_placed_with_its_state_in_the_tiers(nvme_dir, caplog):
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    ref_opt = make("lion", reference.parameters())
    ref_values = loop(reference, ref_opt, data)
    with caplog.at_level(logging.WARNING, logger="tierrt"):
        with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)) as rt:
            opt = make("lion", ours.parameters())
            ours.zero_grad()
            assert rt.optimizer is opt and state_in_tiers(rt)
            values = loop(ours, opt, data)
    assert "placing the model again with Lion" in caplog.text
    assert_same(reference, ours, ref_values, values)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


@pytest.mark.parametrize(
    ("optimizer_class", "says"),
    [
        (GlobalNormSGD, "does not update each parameter on its own"),
        (EstimatingSGD, "changes param group 0's 'd' on every step"),
    ],
)
def test_an_optimizer_block_by_block_stepping_would_change_is_refused(optimizer_class, says, nvme_dir):
    """Refused before anything moves, the model untouched; the probe changed nothing of the
    optimizer."""
    model = models.mlp()
    before = {name: (p.detach().clone(), p.data_ptr()) for name, p in model.named_parameters()}
    opt = optimizer_class(model.parameters())
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(tierrt.HookError, match=says):
        tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt).start()
    for name, p in model.named_parameters():
        value, pointer = before[name]
        assert p.data_ptr() == pointer and torch.equal(p, value), name
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    assert not opt.state
    assert os.listdir(nvme_dir) == []


def test_refused_when_adopted_inside_the_context(nvme_dir):
    """Built inside the context, the coupled optimizer's first step() raises the same error, and
    the model has not been stepped."""
    model = models.mlp()
    batch = models.mlp_batches(1)[0]
    with tierrt.offload(model, tiers=tiers(model, nvme_dir)):
        before = [p.detach().clone() for p in model.parameters()]
        opt = GlobalNormSGD(model.parameters())
        models.mlp_loss(model, batch).backward()
        with pytest.raises(tierrt.HookError, match="does not update each parameter on its own"):
            opt.step()
        for p, value in zip(model.parameters(), before, strict=True):
            assert torch.equal(p, value)


def test_attributes_set_by_the_step_are_warned_about(nvme_dir, caplog):
    model = models.mlp()
    opt = CountingLion(model.parameters(), lr=1e-3)
    with caplog.at_level(logging.WARNING, logger="tierrt"):
        with tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt) as rt:
            assert state_in_tiers(rt)
    assert caplog.text.count("changes self.steps_taken on the optimizer itself") == 1
    assert opt.steps_taken == 0  # the probe ran on copies


def test_an_optimizer_whose_probe_fails_keeps_its_state_in_memory(nvme_dir, caplog):
    """torch's SparseAdam refuses dense gradients in the probe as in training: nothing is learned,
    its state stays in memory, and its step raises torch's own error (when its update runs, at the
    latest when the context is left), the model given back as it was."""
    model = models.mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SparseAdam(model.parameters())
    with caplog.at_level(logging.INFO, logger="tierrt"):
        with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients"):
            with tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt) as rt:
                assert not rt.blockwise.updater.state_in_tiers
                models.mlp_loss(model, models.mlp_batches(1)[0]).backward()
                opt.step()
    assert "cannot learn what SparseAdam keeps per parameter" in caplog.text
    for p, value in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, value)


def test_transformers_trainer_with_adafactor(nvme_dir, tmp_path):
    """``Trainer(optim="adafactor")`` inside the context: its Adafactor keeps factored statistics
    for matrices and a full second moment for vectors (in a group of their own): no state kind
    every group keeps, so the state stays in memory (small next to the model); the logs and the
    weights equal the plain Trainer's."""
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    reference = models.llama()
    ours = copy.deepcopy(reference)
    ref_trainer, ref_logs = models.tiny_trainer(reference, tmp_path / "plain", optim="adafactor")
    ref_trainer.train()
    our_trainer, logs = models.tiny_trainer(ours, tmp_path / "tierrt", optim="adafactor")
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)) as rt:
        our_trainer.train()
        assert type(rt.optimizer).__name__ == "Adafactor" and not rt.blockwise.updater.state_in_tiers
    assert len(logs) == 3 and logs == ref_logs
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), name


class NoisyMomentumSGD(torch.optim.Optimizer):
    """SGD with momentum plus Gaussian noise on each update (stochastic gradient Langevin style)."""

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.9, noise: float = 1e-4):
        super().__init__(params, dict(lr=lr, momentum=momentum, noise=noise))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = p.grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(p.grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
                p.add_(torch.randn_like(p), alpha=group["noise"])


def test_a_stochastic_optimizer_is_stepped_in_order_on_the_callers_thread(nvme_dir, caplog):
    """A step that draws random numbers cannot be checked for coupling; it is stepped block by
    block with its state in the tiers, never on a worker thread during backward."""
    model = models.mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = NoisyMomentumSGD(model.parameters())
    data = models.mlp_batches(3)
    with caplog.at_level(logging.INFO, logger="tierrt"):
        with tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt) as rt:
            assert state_in_tiers(rt) and not rt.blockwise.updater.thread_safe
            for batch in data:
                models.mlp_loss(model, batch).backward()
                opt.step()
                opt.zero_grad()
    assert "draws random numbers" in caplog.text
    assert all(not torch.equal(p, b) and p.isfinite().all() for p, b in zip(model.parameters(), before))
    assert all(set(opt.state[p]) == {"momentum_buffer"} for p in model.parameters())
