"""Reads inside the context, outside the training loop, at a tight DRAM budget.

``model.state_dict()`` (of the model or of a submodule), ``optimizer.state_dict()``, ``rt.save()`` and
an evaluation under ``no_grad`` in the middle of a run must return the values plain torch has at that
point, must not fail for room at a budget where training runs, and must not change the run: losses,
weights and optimizer state afterwards are those of plain torch bit for bit. The pending (deferred)
updates they apply must survive an error: a failure leaves them pending and the run exact.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
from test_offload_numerics import streaming_budget
from test_optimizer_offload import assert_state_equal
from tierrt.scheduler.pipeline import Pipeline
from torch import nn

import tierrt
from tierrt.errors import TierCapacityError

STEPS = 3
READ_AT = 1  # the read happens after this step's optimizer.step()
VOCAB = 4000


def wide_vocab_llama() -> nn.Module:
    """A Llama whose embedding and head are the largest blocks (as in real models): the blocks
    whose updates need the most room, at a budget that streams everything."""
    return models.llama(layers=3, width=128, vocab=VOCAB, intermediate=344)


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (2, 16), generator=gen) for _ in range(STEPS)]


def read(kind: str, model: nn.Module, opt: torch.optim.Optimizer, rt, tmp_path) -> dict:
    """What the reader ``kind`` sees, as a dict of tensors comparable with plain torch's (copies:
    plain torch's state dicts view the live parameters)."""
    if kind == "model_state_dict":
        return {k: v.clone() for k, v in model.state_dict().items()}
    if kind == "submodule_state_dict":
        return {k: v.clone() for k, v in model.model.embed_tokens.state_dict().items()}
    if kind == "optimizer_state_dict":
        state = opt.state_dict()["state"]
        return {f"{i}.{k}": v.clone() for i, entry in state.items() for k, v in entry.items()}
    if kind == "save":
        from safetensors.torch import load_file

        if rt is None:
            return {k: v.clone() for k, v in model.state_dict().items()}
        return load_file(rt.save(tmp_path / "mid.safetensors"))
    if kind == "evaluation":
        was = model.training
        model.eval()
        with torch.no_grad():
            logits = model(batches()[0]).logits.clone()
        model.train(was)
        return {"logits": logits}
    raise ValueError(kind)


def run(model: nn.Module, reader: str, tmp_path) -> tuple[torch.optim.Optimizer, list, dict]:
    """The plain torch run: its optimizer, losses and what ``reader`` saw."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    losses, seen = _loop(model, opt, reader, tmp_path, None, None)
    return opt, losses, seen


def _loop(model, opt, reader, tmp_path, rt, on_read) -> tuple[list, dict]:
    """``STEPS`` training steps; after step ``READ_AT`` the read (or ``on_read``)."""
    losses = []
    seen: dict = {}
    for i, ids in enumerate(batches()):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())
        if i == READ_AT:
            seen = on_read(model, opt) if on_read is not None else read(reader, model, opt, rt, tmp_path)
    return losses, seen


def tight_tiers(model: nn.Module, nvme_dir: str) -> list:
    return [tierrt.dram(streaming_budget(model, extra_blocks=0)), tierrt.nvme(nvme_dir)]


def assert_same_run(reference, ref_opt, ref_losses, ours, opt, losses) -> None:
    for step, (a, b) in enumerate(zip(ref_losses, losses, strict=True)):
        assert torch.equal(a, b), f"loss of step {step} differs: {a.item()} vs {b.item()}"
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), f"weight {name} differs after the run"
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


# (reader, overlap_backward): the state dicts with both kinds of step, the other reads with one each
CASES = [
    ("model_state_dict", False),
    ("model_state_dict", True),
    ("optimizer_state_dict", False),
    ("optimizer_state_dict", True),
    ("submodule_state_dict", False),
    ("save", True),
    ("evaluation", False),
]


@pytest.mark.parametrize(
    ("reader", "overlap"), CASES, ids=[f"{r}-{'overlap' if o else 'step_only'}" for r, o in CASES]
)
def test_read_mid_run_is_exact_and_changes_nothing(reader, overlap, nvme_dir, tmp_path):
    reference = wide_vocab_llama()
    ours = copy.deepcopy(reference)
    ref_opt, ref_losses, expected = run(reference, reader, tmp_path)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.01)
    with tierrt.offload(
        ours, tiers=tight_tiers(ours, nvme_dir), optimizer=opt, overlap_backward=overlap
    ) as rt:
        losses, seen = _loop(ours, opt, reader, tmp_path, rt, None)
    assert set(seen) == set(expected)
    for key, value in expected.items():
        assert torch.equal(value, seen[key]), f"{reader}: {key} differs from plain torch's"
    assert_same_run(reference, ref_opt, ref_losses, ours, opt, losses)


@pytest.mark.parametrize("reader", ["model_state_dict", "evaluation"])
def test_update_survives_an_error_while_it_is_applied(reader, nvme_dir, tmp_path, monkeypatch):
    """A pending update that cannot get room when a read applies it stays pending: the error says
    so, and the run goes on exactly as plain torch's. (Without updates during backward, so that
    every block's update is still pending when the read comes.)"""
    reference = wide_vocab_llama()
    ours = copy.deepcopy(reference)
    ref_opt, ref_losses, _ = run(reference, "model_state_dict", tmp_path)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.01)
    errors: list[TierCapacityError] = []
    ensure_host = Pipeline.ensure_host

    def full_dram(self, bs, kind, *, demand=True, protect=()):
        # No room for an update's second moments: fails even when a prefetch already read them
        if demand and kind == "exp_avg_sq":
            self._raise_no_room("dram", bs.kinds[kind])
        return ensure_host(self, bs, kind, demand=demand, protect=protect)

    def read_failing(model, opt):
        assert rt.pipeline.updates.order, "the test needs updates still pending"
        with monkeypatch.context() as patch:
            patch.setattr(Pipeline, "ensure_host", full_dram)
            with pytest.raises(TierCapacityError) as info:
                read(reader, model, opt, rt, tmp_path)
        errors.append(info.value)
        return {}

    with tierrt.offload(ours, tiers=tight_tiers(ours, nvme_dir), optimizer=opt, overlap_backward=False) as rt:
        losses, _ = _loop(ours, opt, "", tmp_path, rt, read_failing)
    (error,) = errors
    assert "still pending" in str(error) and error.tier == "dram"
    assert_same_run(reference, ref_opt, ref_losses, ours, opt, losses)


def test_value_and_grad_read_what_plain_torch_holds(nvme_dir):
    """``rt.grad(p)`` (after two accumulated backwards and a clip_grad_norm_, which scales lazily)
    and ``rt.value(p)`` (after a deferred step) equal plain torch's ``p.grad`` and ``p`` bit for
    bit; reading changes nothing in the run."""
    reference = wide_vocab_llama()
    ours = copy.deepcopy(reference)

    def loop(model, opt, on_grads, on_values):
        losses = []
        for step, ids in enumerate(batches()):
            for half in ids.chunk(2):
                loss = model(half, labels=half).loss / 2
                loss.backward()
                losses.append(loss.detach().clone())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            if step == READ_AT:
                on_grads()
            opt.step()
            if step == READ_AT:
                on_values()
            opt.zero_grad()
        return losses

    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.01)
    expected: dict = {}
    ref_losses = loop(
        reference,
        ref_opt,
        lambda: expected.update({f"grad {n}": p.grad.clone() for n, p in reference.named_parameters()}),
        lambda: expected.update({f"value {n}": p.detach().clone() for n, p in reference.named_parameters()}),
    )
    seen: dict = {}
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.01)
    with tierrt.offload(ours, tiers=tight_tiers(ours, nvme_dir), optimizer=opt) as rt:

        def grads():
            named = dict(rt.named_grads())
            for name, p in ours.named_parameters():
                seen[f"grad {name}"] = rt.grad(p)
                assert torch.equal(named[name], seen[f"grad {name}"]), name
                assert torch.equal(p.grad, seen[f"grad {name}"])  # a copy of the tiers' gradient
            assert set(named) == {n for n, _ in ours.named_parameters()}

        def values():
            for name, _ in ours.named_parameters():
                seen[f"value {name}"] = rt.value(name)

        losses = loop(ours, opt, grads, values)
        assert rt.grad("lm_head.weight") is None  # after zero_grad()
        with pytest.raises(tierrt.HookError, match="no parameter named"):
            rt.value("lm_head.weights")
        with pytest.raises(tierrt.HookError, match="not a parameter"):
            rt.grad(torch.zeros(3))
    with pytest.raises(tierrt.HookError, match="inside the with-block"):
        rt.value("lm_head.weight")
    assert set(seen) == set(expected)
    for key, value in expected.items():
        assert seen[key].dtype == value.dtype and torch.equal(value, seen[key]), key
    for a, b in zip(ref_losses, losses, strict=True):
        assert torch.equal(a, b)
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), name
