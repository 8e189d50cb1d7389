"""Blocks kept resident through every pass (a parameter used outside its module) and the budget.

trl's fused LM head (``SFTTrainer``) computes log-probabilities chunk by chunk, slicing
``lm_head.weight`` in the model's own forward, outside a call of ``lm_head``. tierrt learns that in
the first forward and keeps ``lm_head``'s block resident for every forward and backward after it.
The placement made at entry knew nothing of that block: at the tightest budget ``offload()`` accepts,
the next forward applied a block's pending optimizer update (weights, gradients, ``exp_avg``,
``exp_avg_sq`` staged in DRAM) next to the held head and found no room (or no extent large enough),
with a ``TierCapacityError`` in the middle of training.

Now the runtime adapts when it learns of such a block: the pending updates are applied at the start
of each forward, before the held blocks are taken, when only that fits; training then runs at that
budget, bit for bit as plain torch. Where even that does not fit, the forward that learns of the block
raises a ``TierCapacityError`` naming the parameter, the block, and the budget that fits, with
nothing lost.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from test_outside_use_recompute import _assert_same
from torch import nn

import tierrt
from tierrt.blocks import partition_model
from tierrt.placement import plan_placement

VOCAB, WIDTH, HIDDEN, CHUNK = 512, 64, 256, 128
STEPS = 6
ADAM_STATE = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32}


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, HIDDEN)
        self.down = nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class FusedHeadLM(nn.Module):
    """A language model whose loss projects through ``head.weight`` in vocabulary chunks, in its own
    forward (as trl's fused LM head does): ``head`` itself is never called. With ``outside_from``,
    the first forwards call ``head`` and only later ones slice its weight."""

    def __init__(self, depth: int = 4, outside_from: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(Layer() for _ in range(depth))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.outside_from = outside_from
        self.calls = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        self.calls += 1
        if self.calls > self.outside_from:
            w = self.head.weight
            logits = torch.cat([x @ w[i : i + CHUNK].t() for i in range(0, VOCAB, CHUNK)], dim=-1)
        else:
            logits = self.head(x)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _batches(n: int = STEPS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4, 16), generator=generator) for _ in range(n)]


def _tightest_budget(model: nn.Module, state: dict[str, torch.dtype]) -> int:
    """The smallest DRAM budget offload() accepts for ``model``: its working set at depth 0."""
    plan = plan_placement(
        partition_model(model),
        compute="dram",
        budgets={"dram": 1 << 40, "nvme": None},
        compute_dtype=None,
        depth=0,
        state_kinds=state,
    )
    return max(plan.pass_need, plan.update_need) + plan.slack


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    losses = []
    for batch in batches:
        loss = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())
    return losses


def _spy_updates(monkeypatch) -> list[tuple[str, list[str]]]:
    """Record each optimizer update applied: (its block, the blocks in use at that moment)."""
    from tierrt.scheduler.optimizer import OptimizerPipeline

    applied: list[tuple[str, list[str]]] = []
    original = OptimizerPipeline.apply

    def apply(self, index: int) -> None:
        if self.has_pending(index):
            blocks = self.pipeline.blocks
            applied.append((blocks[index].name, [bs.name for bs in blocks if bs.refcount > 0]))
        original(self, index)

    monkeypatch.setattr(OptimizerPipeline, "apply", apply)
    return applied


@pytest.mark.parametrize("fused", [False, True], ids=["native_adamw", "torch_fused_adamw"])
def test_trains_at_the_tightest_budget(fused, nvme_dir, caplog, monkeypatch):
    """Whether the deferred update of a layer found room next to the held head depended on how the
    arena happened to be fragmented (timing of writes home): the updates must run before the head
    is taken, every time, and training match plain torch."""
    torch.manual_seed(0)
    reference = FusedHeadLM()
    ours = copy.deepcopy(reference)
    batches = _batches()
    ref_losses = _train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=fused), batches)

    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=fused)
    budget = _tightest_budget(ours, ADAM_STATE)
    with pytest.raises(tierrt.TierCapacityError, match="would fit"):  # the tightest indeed
        tierrt.offload(ours, tiers=[tierrt.dram(budget - 4096), tierrt.nvme(nvme_dir)], optimizer=opt).start()
    applied = _spy_updates(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="tierrt"):
        with tierrt.offload(ours, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)], optimizer=opt) as rt:
            losses = _train(ours, opt, batches)
            assert [bs.name for bs in rt.blocks if bs.refcount > 0] == []
            assert rt.report().total.bytes_by_link["nvme->dram"] > 0  # the layers streamed
    assert "parameter head.weight is used outside a call of the module" in caplog.text
    assert len(applied) >= STEPS - 1  # deferred updates ran (others, speculated in backward, did not)
    assert [(name, held) for name, held in applied if "head" in held] == []
    _assert_same(reference, ours, ref_losses, losses)


def test_budget_too_small_for_the_held_block_raises_when_learned(nvme_dir):
    """SGD without momentum: an update needs no more room than a backward, so nothing makes room
    for the held head at the tightest budget. The first forward raises, saying so, with the budget
    that fits; at that budget training matches plain torch."""
    torch.manual_seed(0)
    reference = FusedHeadLM()
    ours = copy.deepcopy(reference)
    batches = _batches()
    ref_losses = _train(reference, torch.optim.SGD(reference.parameters(), lr=1e-2), batches)
    initial = copy.deepcopy(ours.state_dict())

    opt = torch.optim.SGD(ours.parameters(), lr=1e-2)
    budget = _tightest_budget(ours, {})
    with tierrt.offload(ours, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)], optimizer=opt):
        with pytest.raises(tierrt.TierCapacityError) as caught:
            ours(batches[0])
        with pytest.raises(tierrt.TierCapacityError):  # and so does every later forward
            ours(batches[0])
    error = caught.value
    message = str(error)
    assert "parameter head.weight is used outside a call of its module head" in message
    assert "keeps its block head resident" in message
    needed = error.needed_budget
    assert needed > budget and f"raise the dram budget to {needed // 1024}KiB" in message
    assert "use head.weight inside head's forward" in message and "share the Parameter" in message
    assert error.parameter == "head.weight" and error.block == "head"
    for name, value in initial.items():  # nothing lost
        assert torch.equal(ours.state_dict()[name], value), name

    ours.calls = 0
    with tierrt.offload(ours, tiers=[tierrt.dram(needed), tierrt.nvme(nvme_dir)], optimizer=opt):
        losses = _train(ours, opt, batches)
    _assert_same(reference, ours, ref_losses, losses)


def test_learned_after_a_step_loses_no_update(nvme_dir):
    """The outside use first shows in the second forward, with the first step's updates pending:
    the error leaves them pending, and leaving the context applies them as torch's step did."""
    torch.manual_seed(0)
    reference = FusedHeadLM(outside_from=1)
    ours = copy.deepcopy(reference)
    batches = _batches(2)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=1e-2)
    ref_losses = _train(reference, ref_opt, batches[:1])

    opt = torch.optim.SGD(ours.parameters(), lr=1e-2)
    budget = _tightest_budget(ours, {})
    with tierrt.offload(ours, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)], optimizer=opt):
        losses = _train(ours, opt, batches[:1])
        with pytest.raises(tierrt.TierCapacityError, match="raise the dram budget to"):
            ours(batches[1])
    _assert_same(reference, ours, ref_losses, losses)


def test_trl_sft_trainer_at_the_tightest_budget(nvme_dir, tmp_path, caplog):
    """trl's SFTTrainer (fused LM head, optimizer built inside the context) on a tiny Llama at the
    tightest DRAM budget offload() accepts once the model is placed again with the optimizer."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import SFTConfig, SFTTrainer

    transformers.logging.set_verbosity_error()
    vocab = {f"t{i}": i for i in range(1, VOCAB)} | {"[PAD]": 0}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", eos_token="t1", unk_token="[PAD]"
    )
    generator = torch.Generator().manual_seed(1)
    ids = [torch.randint(2, VOCAB, (16,), generator=generator).tolist() for _ in range(16)]

    def run(offloaded: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        config = transformers.LlamaConfig(  # a fresh one: the trainer sets its pad token
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        args = SFTConfig(
            output_dir=str(tmp_path / f"out_{offloaded}"), max_steps=4, per_device_train_batch_size=4,
            learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0,
            dataloader_num_workers=0, disable_tqdm=True, max_length=32,
        )  # fmt: skip
        dataset = datasets.Dataset.from_dict({"input_ids": ids})
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        if offloaded:  # the Trainer's AdamW, built inside: the model is placed again with its state
            budget = _tightest_budget(model, ADAM_STATE)
            with tierrt.offload(model, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)]):
                trainer.train()
        else:
            trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}

    ref_losses, ref_state = run(False)
    with caplog.at_level(logging.WARNING, logger="tierrt"):
        losses, state = run(True)
    assert "lm_head.weight is used outside a call of the module" in caplog.text  # trl's fused head
    assert losses == ref_losses and len(losses) == 4
    for name, value in ref_state.items():
        assert torch.equal(state[name], value), f"{name} differs"
