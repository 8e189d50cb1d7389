"""Training through tierrt gives bit for bit what the same run gives without it.

Each case trains a real model for a few steps twice from the same weights and data: once plainly,
once inside ``tierrt.offload`` with a DRAM budget smaller than the model's state and NVMe below it,
and compares every loss and every final weight with ``torch.equal``.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch

import tierrt
from tierrt.blocks import partition_model
from tierrt.placement import plan_placement


def train(model, opt, batches, loss_fn, accum: int = 1):
    losses = []
    for i, batch in enumerate(batches):
        loss = loss_fn(model, batch)
        (loss / accum).backward()
        if (i + 1) % accum == 0:
            opt.step()
            opt.zero_grad()
        losses.append(loss.detach().clone())
    return losses


def streaming_budget(model, extra_blocks: int = 2, compute_dtype=None, adam: bool = True) -> int:
    """A DRAM budget that fits the working set plus ``extra_blocks`` blocks: well below the model."""
    part = partition_model(model)
    kinds = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32} if adam else {}
    probe = plan_placement(
        part,
        compute="dram",
        budgets={"dram": 1 << 40, "nvme": None},
        compute_dtype=compute_dtype,
        depth=0,
        state_kinds=kinds,
    )
    largest = max(k["weight"].layout.nbytes for k in probe.kinds)
    return probe.working_set + extra_blocks * largest


CASES = {
    "gpt2": (models.gpt2, lambda n: models.token_batches(n), models.lm_loss),
    "llama": (models.llama, lambda n: models.token_batches(n), models.lm_loss),
    "mlp": (models.mlp, lambda n: models.mlp_batches(n), models.mlp_loss),
    "tied": (models.tied, lambda n: models.token_batches(n), models.lm_loss),
    "checkpoint": (models.checkpointed, lambda n: models.token_batches(n), models.lm_loss),
    "checkpoint_reentrant": (
        lambda: models.checkpointed(reentrant=True),
        lambda n: models.token_batches(n),
        models.lm_loss,
    ),
    "checkpoint_forward": (models.checkpointed_forward, lambda n: models.token_batches(n), models.lm_loss),
    "llama_gradient_checkpointing": (
        models.llama_gradient_checkpointing,
        lambda n: models.token_batches(n),
        models.lm_loss,
    ),
}

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
}


def _compare(name: str, optimizer: str, nvme_dir: str, accum: int = 1, steps: int = 4) -> tierrt.Report:
    build, batches_fn, loss_fn = CASES[name]
    reference = build()
    ours = copy.deepcopy(reference)
    data = batches_fn(steps)
    ref_losses = train(reference, OPTIMIZERS[optimizer](reference.parameters()), data, loss_fn, accum)

    opt = OPTIMIZERS[optimizer](ours.parameters())
    budget = streaming_budget(ours)
    assert budget < 2 * models.model_bytes(ours), "the budget must be below weights + gradients"
    with tierrt.offload(ours, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)], optimizer=opt) as rt:
        losses = train(ours, opt, data, loss_fn, accum)
        report = rt.report()
    assert report.total.bytes_by_link["nvme->dram"] > 0, "nothing was streamed from NVMe"
    for step, (a, b) in enumerate(zip(ref_losses, losses)):
        assert torch.equal(a, b), f"loss of step {step} differs: {a.item()} vs {b.item()}"
    for (name_a, a), (name_b, b) in zip(reference.named_parameters(), ours.named_parameters()):
        assert name_a == name_b
        assert b.device == a.device and b.dtype == a.dtype
        assert torch.equal(a, b), f"weight {name_a} differs after training"
    return report


@pytest.mark.parametrize("name", list(CASES))
def test_sgd_bitwise(name, nvme_dir):
    _compare(name, "sgd", nvme_dir)


@pytest.mark.parametrize("name", ["gpt2", "llama", "tied"])
def test_adamw_bitwise(name, nvme_dir):
    _compare(name, "adamw", nvme_dir)


@pytest.mark.parametrize("name", ["gpt2", "mlp"])
def test_gradient_accumulation_bitwise(name, nvme_dir):
    _compare(name, "sgd", nvme_dir, accum=2, steps=4)


def test_report_counts_prefetch_and_stalls(nvme_dir):
    report = _compare("llama", "sgd", nvme_dir, steps=4)
    total = report.total
    assert total.steps == 4
    assert total.prefetch_hits > 0
    assert total.bytes_by_link["dram->nvme"] > 0  # gradients and updated weights written home
    text = str(report)
    assert "nvme->dram" in text and "dram" in text


def test_budget_that_is_not_a_multiple_of_a_page(nvme_dir):
    """An odd DRAM budget (arena capacity not page-aligned) still gives aligned buffers and exact results."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    ref = train(reference, torch.optim.SGD(reference.parameters(), lr=0.05), data, models.lm_loss)
    opt = torch.optim.SGD(ours.parameters(), lr=0.05)
    with tierrt.offload(
        ours, tiers=[tierrt.dram(streaming_budget(ours) + 12345), tierrt.nvme(nvme_dir)], optimizer=opt
    ):
        got = train(ours, opt, data, models.lm_loss)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), ours.parameters()))


def test_layers_too_large_for_the_budget_are_split(nvme_dir):
    """A DRAM budget below one layer's working set: layers are split into their sub-modules
    (attention, MLP, norms) and training stays exact."""
    reference = models.llama(width=128)
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    ref = train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3), data, models.lm_loss)
    whole_layer = streaming_budget(ours, extra_blocks=0)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    with tierrt.offload(
        ours, tiers=[tierrt.dram(whole_layer * 2 // 3), tierrt.nvme(nvme_dir)], optimizer=opt
    ) as rt:
        got = train(ours, opt, data, models.lm_loss)
        names = [bs.name for bs in rt.blocks]
    assert any(".mlp" in name for name in names), names  # a layer became several blocks
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), ours.parameters()))


def test_a_single_tensor_larger_than_the_budget_is_named(nvme_dir):
    model = torch.nn.Sequential(torch.nn.Embedding(4096, 256), torch.nn.Linear(256, 4))  # 4MiB embedding
    with pytest.raises(tierrt.TierCapacityError, match="0.weight") as info:
        with tierrt.offload(model, tiers=[tierrt.dram("2MiB"), tierrt.nvme(nvme_dir)]):
            pass
    assert info.value.tier == "dram"


def test_peft_lora_bitwise_and_merge(nvme_dir):
    """LoRA adapters (peft) on a Llama: only the adapters train, the frozen base streams from NVMe;
    losses, adapters and the merged model after the context match the run without tierrt."""
    peft = pytest.importorskip("peft")

    def build():
        base = models.llama()
        torch.manual_seed(1)
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
        )
        return peft.get_peft_model(base, config)

    data = models.token_batches(3)
    reference, ours = build(), build()
    trainable = [p for p in reference.parameters() if p.requires_grad]
    ref_losses = train(reference, torch.optim.AdamW(trainable, lr=1e-2), data, models.lm_loss)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    budget = streaming_budget(ours)
    with tierrt.offload(ours, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)], optimizer=opt) as rt:
        losses = train(ours, opt, data, models.lm_loss)
        assert rt.report().total.bytes_by_link["nvme->dram"] > 0
    for a, b in zip(ref_losses, losses):
        assert torch.equal(a, b)
    for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name
    merged_ref, merged = reference.merge_and_unload(), ours.merge_and_unload()
    for (name, a), b in zip(merged_ref.state_dict().items(), merged.state_dict().values()):
        assert torch.equal(a, b), name
