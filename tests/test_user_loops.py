"""Loops from the transformers world that once went wrong: a layer that sits out a step (LayerDrop)
under gradient clipping, and ``state_dict()`` of a model with tied weights (``save_pretrained``)."""

from __future__ import annotations

import copy

import models
import pytest
import torch
from test_offload_numerics import streaming_budget
from torch import nn

import tierrt


class _LayerDrop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 32)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))
        self.head = nn.Linear(32, 64)
        self.skip: int | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for i, layer in enumerate(self.layers):
            if i != self.skip:
                h = torch.tanh(layer(h))
        return self.head(h)


def _layerdrop_loop(model: _LayerDrop, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    logged = []
    for step in range(4):
        model.skip = 2 if step == 2 else None
        ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        logged.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
        opt.step()
        opt.zero_grad()
        logged.append(loss.detach().clone())
    return logged


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no_overlap"])
def test_a_layer_sitting_out_a_step_is_not_clipped_with_old_gradients(overlap, nvme_dir):
    """The skipped layer's update from the step before is still pending when zero_grad() runs;
    clipping must see its gradients as cleared (plain torch: None), not as last step's."""
    reference = _LayerDrop()
    model = copy.deepcopy(reference)
    expected = _layerdrop_loop(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tiers = [tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(model, tiers=tiers, optimizer=opt, overlap_backward=overlap):
        got = _layerdrop_loop(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)


def _ties(state_dict: dict[str, torch.Tensor]) -> set[tuple[str, str]]:
    def address(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage().data_ptr()

    return {
        (a, b)
        for a, x in state_dict.items()
        for b, y in state_dict.items()
        if a < b and address(x) == address(y)
    }


def test_state_dict_keeps_tied_weights_tied(nvme_dir):
    model = models.tied()
    plain = model.state_dict()
    assert _ties(plain)  # the model has a tie to keep
    with tierrt.offload(model, tiers=[tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]):
        inside = model.state_dict()
        assert _ties(inside) == _ties(plain)
        for key, value in plain.items():
            assert torch.equal(inside[key], value), key


@pytest.mark.parametrize("set_to_none", [True, False])
def test_optimizer_zero_grad_clears_only_its_own_parameters(set_to_none, nvme_dir):
    """Progressive unfreezing: the optimizer starts with the top layers and gains the rest by
    ``add_param_group``; meanwhile the others accumulate gradients, which its ``zero_grad()`` leaves
    alone (as torch does), so the group added later steps with them."""
    data = models.mlp_batches(4)

    def loop(model: nn.Module) -> tuple[list[torch.Tensor], nn.Module]:
        layers = list(model.children())
        opt = torch.optim.AdamW([p for layer in layers[-2:] for p in layer.parameters()], lr=1e-3)
        losses = []
        for step, batch in enumerate(data):
            if step == 2:
                opt.add_param_group({"params": [p for layer in layers[:-2] for p in layer.parameters()]})
            loss = models.mlp_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
            losses.append(loss.detach().clone())
        return losses, model

    reference = models.mlp()
    expected, _ = loop(reference)
    model = models.mlp()
    with tierrt.offload(model, tiers=[tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]):
        got, _ = loop(model)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), name


class _MaxNormEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 32, max_norm=1.0)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))
        self.head = nn.Linear(32, 64)
        with torch.no_grad():
            self.embed.weight.mul_(3.0)  # rows well above max_norm: every lookup renormalises

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(h)


@pytest.mark.parametrize("make_opt", [torch.optim.AdamW, torch.optim.SGD], ids=["native_adamw", "sgd"])
def test_a_forward_that_changes_a_weight_in_place_keeps_the_change(make_opt, nvme_dir):
    """``nn.Embedding(max_norm=...)`` renormalises the rows it looks up, in place, inside forward:
    the change reaches the tiers (and the master weights) as it stays in the parameter in torch."""

    def loop(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
        losses = []
        for step in range(4):
            ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(step))
            loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach().clone())
        return losses

    reference = _MaxNormEmbedding()
    model = copy.deepcopy(reference)
    expected = loop(reference, make_opt(reference.parameters(), lr=1e-2))
    opt = make_opt(model.parameters(), lr=1e-2)
    tiers = [tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(model, tiers=tiers, optimizer=opt):
        got = loop(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda params: torch.optim.AdamW(params, lr=1e-3, amsgrad=True),
        lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
    ],
    ids=["adamw_amsgrad", "sgd_momentum"],
)
def test_optimizer_state_reads_like_torch_inside(make_opt, nvme_dir):
    """``opt.state[p]`` inside the context (logging Adam's step or second moment) shows what torch
    holds, read from the tiers, while tierrt's kernels step the optimizer."""
    data = models.mlp_batches(3)

    def loop(model: nn.Module, opt: torch.optim.Optimizer) -> list:
        logged = []
        for batch in data:
            models.mlp_loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
            first = next(model.parameters())
            logged.append(
                (len(opt.state), first in opt.state, {k: v.clone() for k, v in opt.state[first].items()})
            )
            logged.append([sorted(entry) for entry in opt.state.values()])
        return logged

    reference = models.mlp()
    expected = loop(reference, make_opt(reference.parameters()))
    model = models.mlp()
    opt = make_opt(model.parameters())
    with tierrt.offload(
        model, tiers=[tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)], optimizer=opt
    ):
        got = loop(model, opt)
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected):
        if isinstance(theirs, tuple):
            assert ours[:2] == theirs[:2]
            assert ours[2].keys() == theirs[2].keys()
            assert all(torch.equal(ours[2][k], theirs[2][k]) for k in theirs[2])
        else:
            assert ours == theirs
    assert type(opt.state).__name__ == "defaultdict"  # torch's own again after the with-block
