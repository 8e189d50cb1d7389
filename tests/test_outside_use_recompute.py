"""A parameter used outside a call of its module, read again when backward recomputes a layer.

DeBERTa(-v2) hands ``rel_embeddings.weight`` to every layer as a keyword argument, and with
``gradient_checkpointing_enable()`` transformers checkpoints each layer's raw ``forward`` (the
module's hooks stay outside the checkpoint): backward then recomputes code that reads that
parameter with none of tierrt's hooks running, and no torch-function mode either (autograd runs
backward without them). tierrt caught the use in the first forwards and holds its block for every
forward; it must hold it through backward too, or the recomputation reads the evicted placeholder
(NaN weights from the next step on, or a ``CheckpointError`` on the recomputed metadata).

Each test trains the same model through plain torch and through tierrt at a DRAM budget that
streams the layers, with both checkpoint variants, and compares losses and weights bit for bit; it
also checks that no block stays held once a backward pass or a step is over.
"""

from __future__ import annotations

import copy
import functools
import logging

import models
import pytest
import torch
import torch.utils.checkpoint
from test_offload_numerics import streaming_budget
from torch import nn

import tierrt

WIDTH = 32
SPAN = 8  # rows of the relative-position table a layer reads
STEPS = 4  # the first two forwards are watched for outside uses, the later ones are not


class RelativeLayer(nn.Module):
    """Attends to a relative-position table it is handed: a parameter of another block."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.query = nn.Linear(WIDTH, WIDTH)
        self.key = nn.Linear(WIDTH, WIDTH)

    def attend(self, x: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        table = rel[:SPAN]
        pos = self.key(table.unsqueeze(0))
        return x + torch.tanh(self.query(x) @ pos.transpose(-1, -2) @ table)

    def forward(self, x: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        """As transformers' ``GradientCheckpointingLayer``: the keyword arguments bound into the
        checkpointed function, which the recomputation calls directly (no module hook runs)."""
        if self.training and torch.is_grad_enabled():
            inner = functools.partial(RelativeLayer.attend, self, rel=rel)
            return torch.utils.checkpoint.checkpoint(inner, x, use_reentrant=self.reentrant)
        return self.attend(x, rel)


class RelativeLM(nn.Module):
    """Passes its relative-position table (``rel.weight``) to every checkpointed layer."""

    def __init__(self, reentrant: bool, depth: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(models.VOCAB, WIDTH)
        self.rel = nn.Embedding(2 * SPAN, WIDTH)
        self.layers = nn.ModuleList(RelativeLayer(reentrant) for _ in range(depth))
        self.head = nn.Linear(WIDTH, models.VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        rel = self.rel.weight
        for layer in self.layers:
            x = layer(x, rel=rel)
        return self.head(x)


def _held(rt: tierrt.Runtime | None) -> list[str]:
    return [] if rt is None else [bs.name for bs in rt.blocks if bs.refcount > 0]


def _train(model: nn.Module, opt: torch.optim.Optimizer, loss_fn, batches, rt=None) -> list[torch.Tensor]:
    """Plain steps; with ``rt``, checks that nothing stays held after each backward and step."""
    torch.manual_seed(123)  # the same dropout masks (if any) in both runs
    losses = []
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        assert _held(rt) == [], "blocks still held after backward"
        opt.step()
        opt.zero_grad()
        assert _held(rt) == [], "blocks still held after the step"
        losses.append(loss.detach().clone())
    return losses


def _assert_same(reference: nn.Module, ours: nn.Module, ref_losses: list, losses: list) -> None:
    for step, (a, b) in enumerate(zip(ref_losses, losses, strict=True)):
        assert torch.equal(a, b), f"loss of step {step} differs: {a.item()} vs {b.item()}"
    for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs"


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_parameter_passed_to_recomputed_layers(reentrant, nvme_dir, caplog):
    torch.manual_seed(0)
    reference = RelativeLM(reentrant)
    ours = copy.deepcopy(reference)
    batches = models.token_batches(STEPS)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    ref_losses = _train(reference, ref_opt, models.lm_loss, batches)

    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    budget = streaming_budget(ours, extra_blocks=0)  # the working set: rel is evicted in backward
    with caplog.at_level(logging.WARNING, logger="tierrt"):
        with tierrt.offload(ours, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)], optimizer=opt) as rt:
            losses = _train(ours, opt, models.lm_loss, batches, rt)
            assert rt.report().total.bytes_by_link["nvme->dram"] > 0  # the layers streamed
    assert "parameter rel.weight is used outside a call of the module" in caplog.text
    _assert_same(reference, ours, ref_losses, losses)


def _deberta_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids[:, 0] % 3).loss


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_deberta_v2_gradient_checkpointing(reentrant, nvme_dir):
    """DeBERTa-v2 with activation checkpointing (``gradient_checkpointing_enable()``): the case
    that found it. Without the hold through backward, the non-reentrant run fails with a
    ``CheckpointError`` (the placeholder's layout changes the recomputed metadata); the reentrant
    run happens to find the block still resident at this size, and guards the nested backward
    passes a reentrant checkpoint runs (each ends inside the outer one, which holds the block)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.DebertaV2Config(
        vocab_size=models.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_labels=3, max_position_embeddings=64, relative_attention=True,
        position_buckets=16, pos_att_type=["p2c", "c2p"], max_relative_positions=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.AutoModelForSequenceClassification.from_config(config).train()
    kwargs = {"use_reentrant": reentrant}
    if hasattr(reference, "activation_checkpointing_enable"):  # transformers >= 5.x (the old name warns)
        reference.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    ours = copy.deepcopy(reference)
    batches = models.token_batches(STEPS)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    ref_losses = _train(reference, ref_opt, _deberta_loss, batches)

    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    budget = streaming_budget(ours, extra_blocks=1)
    with tierrt.offload(ours, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)], optimizer=opt) as rt:
        losses = _train(ours, opt, _deberta_loss, batches, rt)
        assert rt.report().total.bytes_by_link["nvme->dram"] > 0
    _assert_same(reference, ours, ref_losses, losses)
