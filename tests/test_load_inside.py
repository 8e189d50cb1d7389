"""``model.load_state_dict()`` inside the context: a rollback to a checkpoint mid-run, transformers'
``Trainer.train(resume_from_checkpoint=...)`` and ``load_best_model_at_end``.

Torch copies the loaded values into the parameters; inside the context those are NaN placeholders
(evicted blocks) or views of blocks whose deferred update of the previous step is still pending
(which used to overwrite the loaded values afterwards). The load must give what plain torch gives:
the loaded values from then on, and losses, weights and optimizer state of the run that continues
equal to plain torch's bit for bit; torch's own errors and returned missing/unexpected keys; and,
beyond torch, nothing written when the load fails.
"""

from __future__ import annotations

import copy
import errno

import models
import pytest
import torch
from test_offload_numerics import streaming_budget
from test_optimizer_offload import assert_state_equal, make_opt
from tierrt.scheduler.pipeline import Pipeline
from torch import nn

import tierrt
from tierrt.errors import HookError

CHECKPOINT_AT = 1  # the checkpoint is taken after this step
LOAD_AT = 3  # and loaded after this one
STEPS = 6

_PLAIN_LOAD = nn.Module.load_state_dict  # torch's own, as code that kept a reference calls it


def clone_sd(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model.state_dict()`` (plain torch's views the live parameters)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiers_for(model: nn.Module, budget: str, nvme_dir: str, compute_dtype=None) -> list:
    """``resident``: every block stays in DRAM; ``streaming``: blocks are evicted to NVMe."""
    dram = "64MiB" if budget == "resident" else streaming_budget(model, compute_dtype=compute_dtype)
    return [tierrt.dram(dram), tierrt.nvme(nvme_dir)]


def assert_streamed(rt, budget: str) -> None:
    read = rt.report().total.bytes_by_link.get("nvme->dram", 0)
    assert (read > 0) == (budget == "streaming"), read


def assert_same_values(expected: dict, seen: dict, what: str) -> None:
    assert list(expected) == list(seen)
    for key, value in expected.items():
        assert value.dtype == seen[key].dtype and torch.equal(value, seen[key]), f"{what}: {key} differs"


def assert_same_run(reference, ref_losses, ours, losses) -> None:
    for step, (a, b) in enumerate(zip(ref_losses, losses, strict=True)):
        assert torch.equal(a, b), f"loss of step {step} differs: {a.item()} vs {b.item()}"
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), f"weight {name} differs after the run"


def rollback_run(model, opt, data, *, restore_optimizer: bool, between=None) -> tuple[list, dict]:
    """Train; after step ``LOAD_AT`` go back to the checkpoint of step ``CHECKPOINT_AT`` (the
    model's, and the optimizer's with ``restore_optimizer``) and train on. With ``between`` the
    load comes between that step's backward and its ``step()`` instead (``between(model)`` runs just
    before it). Returns the losses and the model's state dict right after the load."""
    losses, seen, checkpoint = [], {}, None
    for i, ids in enumerate(data):
        loss = models.lm_loss(model, ids)
        loss.backward()
        if i == LOAD_AT and between is not None:
            between(model)
            model.load_state_dict(checkpoint[0])
            seen = clone_sd(model)
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())
        if i == CHECKPOINT_AT:
            checkpoint = (clone_sd(model), copy.deepcopy(opt.state_dict()))
        if i == LOAD_AT and between is None:
            result = model.load_state_dict(checkpoint[0])
            assert result.missing_keys == [] and result.unexpected_keys == []
            if restore_optimizer:
                opt.load_state_dict(checkpoint[1])
            seen = clone_sd(model)
    return losses, seen


@pytest.mark.parametrize("restore_optimizer", [False, True], ids=["model_only", "with_optimizer"])
@pytest.mark.parametrize("budget", ["resident", "streaming"])
@pytest.mark.parametrize("opt_kind", ["adamw", "sgd_nesterov"])
def test_rollback_mid_run_is_bitwise(opt_kind, budget, restore_optimizer, nvme_dir):
    """``model.load_state_dict`` of an earlier checkpoint after a (deferred) step, optionally with
    ``opt.load_state_dict``: the state dict right after, the losses after and the final weights and
    optimizer state equal plain torch doing the same."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(STEPS)
    ref_opt = make_opt(opt_kind, reference.parameters())
    ref_losses, expected = rollback_run(reference, ref_opt, data, restore_optimizer=restore_optimizer)
    opt = make_opt(opt_kind, ours.parameters())
    with tierrt.offload(ours, tiers=tiers_for(ours, budget, nvme_dir), optimizer=opt) as rt:
        losses, seen = rollback_run(ours, opt, data, restore_optimizer=restore_optimizer)
        assert_streamed(rt, budget)
    assert_same_values(expected, seen, "state_dict() after the load")
    assert_same_run(reference, ref_losses, ours, losses)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


def test_load_between_backward_and_step(nvme_dir):
    """A load after backward and before ``step()``: torch steps the loaded weights with the
    gradients it has. Updates speculated during that backward (from the old weights) are dropped."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(STEPS)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=2e-3)
    ref_losses, expected = rollback_run(
        reference, ref_opt, data, restore_optimizer=False, between=lambda model: None
    )
    opt = torch.optim.AdamW(ours.parameters(), lr=2e-3)
    speculated = []
    with tierrt.offload(ours, tiers=tiers_for(ours, "streaming", nvme_dir), optimizer=opt) as rt:
        speculator = rt.pipeline.updates.speculator

        def note(model):
            speculated.append(len(speculator.specs))

        losses, seen = rollback_run(ours, opt, data, restore_optimizer=False, between=note)
    assert speculated[0] > 0, "the test needs updates speculated during the backward before the load"
    assert_same_values(expected, seen, "state_dict() after the load")
    assert_same_run(reference, ref_losses, ours, losses)
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


def bf16_recipe(
    reference: nn.Module, data: list, after_step=None
) -> tuple[list, list, torch.optim.Optimizer]:
    """What compute_dtype=bf16 implements, in plain torch (see test_mixed_precision): a bf16 copy
    computes, AdamW steps fp32 master weights, the copy follows them. ``after_step(i, master, opt)``
    runs after step ``i``'s update (before the copy follows). Returns the losses, the master weights
    and the optimizer."""
    master = [p.detach().clone() for p in reference.parameters()]
    compute = copy.deepcopy(reference)
    for p in compute.parameters():
        p.data = p.data.to(torch.bfloat16)
    opt = torch.optim.AdamW(master, lr=1e-3, weight_decay=0.01)
    losses = []
    for i, ids in enumerate(data):
        loss = models.lm_loss(compute, ids)
        loss.backward()
        for m, p in zip(master, compute.parameters()):
            m.grad = p.grad.float()
            p.grad = None
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            if after_step is not None:
                after_step(i, master, opt)
            for m, p in zip(master, compute.parameters()):
                p.copy_(m)
        losses.append(loss.detach().clone())
    return losses, master, opt


def assert_same_bf16_run(reference, ref_losses, master, ours, losses) -> None:
    for step, (a, b) in enumerate(zip(ref_losses, losses, strict=True)):
        assert torch.equal(a, b), f"loss of step {step} differs"
    for (name, _), m, p in zip(reference.named_parameters(), master, ours.parameters(), strict=True):
        assert p.dtype == torch.float32 and torch.equal(m, p), f"master weight {name} differs"


@pytest.mark.parametrize("native", [None, False], ids=["native_kernel", "torch_stepped"])
def test_rollback_with_bf16_compute_and_master_weights(native, nvme_dir):
    """compute_dtype=bf16: the loaded fp32 values become the master weights and the bf16 weights
    are derived from them, as after an update; the optimizer state loaded keeps fp32 (torch would
    cast it to the bf16 compute copy's dtype). Reference: the recipe, rolled back by copying the
    checkpoint into the master weights."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(STEPS)
    checkpoint: list = []

    def rollback(i, master, opt):
        if i == CHECKPOINT_AT:
            checkpoint.extend(([m.clone() for m in master], copy.deepcopy(opt.state_dict())))
        if i == LOAD_AT:
            for m, value in zip(master, checkpoint[0]):
                m.copy_(value)
            opt.load_state_dict(checkpoint[1])

    ref_losses, master, _ = bf16_recipe(reference, data, rollback)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.01)
    with tierrt.offload(
        ours,
        tiers=tiers_for(ours, "streaming", nvme_dir, torch.bfloat16),
        optimizer=opt,
        compute_dtype=torch.bfloat16,
        native_optimizer=native,
    ):
        losses, seen = rollback_run(ours, opt, data, restore_optimizer=True)
        assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert all(seen[name].dtype == torch.float32 for name, _ in reference.named_parameters())
    assert_same_bf16_run(reference, ref_losses, master, ours, losses)


def test_resume_into_an_optimizer_created_inside_with_bf16_compute(nvme_dir):
    """What a Trainer resuming inside the context does: load the model, create the optimizer (not
    passed to offload()) and load its state before its first step, which adopts it. Its state keeps
    fp32 on the CPU, where its updates run."""
    reference = models.llama()
    data = models.token_batches(4)
    checkpoint: list = []

    def save(i, master, opt):
        if i == CHECKPOINT_AT:
            checkpoint.extend(([m.clone() for m in master], copy.deepcopy(opt.state_dict())))

    ref_losses, master, _ = bf16_recipe(reference, data, save)
    ours = models.llama(seed=3)
    names = [name for name, _ in ours.named_parameters()]
    with tierrt.offload(
        ours, tiers=tiers_for(ours, "streaming", nvme_dir, torch.bfloat16), compute_dtype=torch.bfloat16
    ):
        ours.load_state_dict(dict(zip(names, checkpoint[0])))
        opt = torch.optim.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.01)
        opt.load_state_dict(checkpoint[1])
        losses = []
        for ids in data[CHECKPOINT_AT + 1 :]:
            loss = models.lm_loss(ours, ids)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach().clone())
    assert_same_bf16_run(reference, ref_losses[CHECKPOINT_AT + 1 :], master, ours, losses)


def _trained(nvme_dir, model=None, budget="streaming", **options):
    """A model, its optimizer and a runtime after one step (its updates still pending)."""
    model = model or models.llama()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rt = tierrt.offload(model, tiers=tiers_for(model, budget, nvme_dir), optimizer=opt, **options)
    return model, opt, rt


def _step(model, opt, seed=0) -> torch.Tensor:
    loss = models.lm_loss(model, models.token_batches(1, seed=seed)[0])
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


@pytest.mark.parametrize("failure", ["size_mismatch", "missing_key", "unexpected_key", "not_a_tensor"])
def test_failed_load_raises_torchs_error_and_writes_nothing(failure, nvme_dir):
    """The same RuntimeError as plain torch (its message), and no parameter changes (torch leaves
    the ones it copied before the error); training then goes on as if the load had not happened."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    other = clone_sd(models.llama(seed=5))
    last = list(other)[-1]
    if failure == "size_mismatch":
        other[last] = other[last][:-1]
    elif failure == "missing_key":
        del other[last]
    elif failure == "unexpected_key":
        other["model.bogus.weight"] = torch.zeros(2)
    else:
        other[last] = [0.0]
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=2e-3)
    ref_losses = [_step(reference, ref_opt)]
    before = clone_sd(reference)
    with pytest.raises(RuntimeError) as plain_error:
        copy.deepcopy(reference).load_state_dict(other)
    ref_losses.append(_step(reference, ref_opt, seed=2))

    model, opt, rt = _trained(nvme_dir, ours)
    with rt:
        losses = [_step(model, opt)]
        with pytest.raises(RuntimeError) as error:
            model.load_state_dict(other)
        assert str(error.value) == str(plain_error.value)
        assert_same_values(before, clone_sd(model), "state_dict() after the failed load")
        losses.append(_step(model, opt, seed=2))
    assert_same_run(reference, ref_losses, ours, losses)


@pytest.mark.parametrize(("after", "mode"), [(0, "error"), (5, "error"), (2, "torn")])
def test_io_error_while_loading_loads_nothing(after, mode, nvme_dir):
    """A write to the disk fails partway through a load (the first one, or after some blocks
    landed; a torn write): a clear IOEngineError says nothing was loaded, every parameter keeps its
    previous value (the blocks already written are put back), and training then goes on as if the
    load had not been tried."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    other = clone_sd(models.llama(seed=5))
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=2e-3)
    ref_losses = [_step(reference, ref_opt)]
    before = clone_sd(reference)
    ref_losses.append(_step(reference, ref_opt, seed=2))

    model, opt, rt = _trained(nvme_dir, ours)
    with rt:
        losses = [_step(model, opt)]
        assert_same_values(before, clone_sd(model), "state_dict() before the load")  # step 1 applied
        rt.synchronize()  # and home: the faults hit the load's writes only
        rt.engine.inject_fault(op="write", errno=errno.EIO, after=after, count=10**6, mode=mode)
        with pytest.raises(tierrt.IOEngineError, match="nothing was loaded") as error:
            model.load_state_dict(other)
        assert error.value.errno == errno.EIO
        rt.engine.clear_faults()
        assert_same_values(before, clone_sd(model), "state_dict() after the failed load")
        losses.append(_step(model, opt, seed=2))
    assert_same_run(reference, ref_losses, ours, losses)


def test_load_then_io_error_in_the_next_step_keeps_the_load(nvme_dir):
    """A load that succeeded is committed: a later step's failed write rolls back to the loaded
    values, not to those from before the load. (No updates during backward: the step's writes all
    run after the faults are set, in step() and the next forward.)"""
    model, opt, rt = _trained(nvme_dir, overlap_backward=False)
    other = clone_sd(models.llama(seed=5))
    with rt:
        _step(model, opt)
        model.load_state_dict(other)
        assert_same_values(other, clone_sd(model), "state_dict() after the load")
        loss = models.lm_loss(model, models.token_batches(1, seed=3)[0])
        loss.backward()
        rt.synchronize()
        rt.engine.inject_fault(op="write", errno=errno.ENOSPC, count=10**6)
        with pytest.raises(tierrt.IOEngineError, match="rolled back"):
            opt.step()
            opt.zero_grad()
            models.lm_loss(model, models.token_batches(1, seed=4)[0])
            rt.synchronize()  # the writes run on: their failure is raised here at the latest
        rt.engine.clear_faults()
        assert_same_values(other, clone_sd(model), "state_dict() after the rolled back step")


def test_strict_false_returns_torchs_keys(nvme_dir):
    """``strict=False`` with keys missing and unexpected: torch's IncompatibleKeys, and the keys
    present are loaded."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    other = clone_sd(models.llama(seed=5))
    partial = {k: v for i, (k, v) in enumerate(other.items()) if i % 3}
    partial["lm_head.extra"] = torch.ones(3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=2e-3)
    _step(reference, ref_opt)
    expected_keys = reference.load_state_dict(partial, strict=False)
    expected = clone_sd(reference)
    model, opt, rt = _trained(nvme_dir, ours)
    with rt:
        _step(model, opt)
        keys = model.load_state_dict(partial, strict=False)
        seen = clone_sd(model)
    assert keys.missing_keys == expected_keys.missing_keys and keys.missing_keys
    assert keys.unexpected_keys == expected_keys.unexpected_keys == ["lm_head.extra"]
    assert_same_values(expected, seen, "state_dict() after the load")


def test_tied_weights_load_once(nvme_dir, monkeypatch):
    """One parameter under two names: written once (with the value of its last key, as torch's
    second copy leaves it); without the alias (as safetensors stores a tied model) torch's
    missing_keys name it."""
    reference = models.tied()
    ours = copy.deepcopy(reference)
    other = clone_sd(models.tied(seed=5))
    other["head.weight"] = other["head.weight"] + 1  # the later key wins in torch
    without_alias = {k: v for k, v in other.items() if k != "head.weight"}
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=2e-3)
    _step(reference, ref_opt)
    reference.load_state_dict(other)
    expected = clone_sd(reference)
    expected_keys = copy.deepcopy(reference).load_state_dict(without_alias, strict=False)
    writes: list[tuple[int, int]] = []
    write_values = Pipeline.write_values

    def counting(self, bs, values):
        writes.extend((bs.index, slot) for slot in values)
        return write_values(self, bs, values)

    monkeypatch.setattr(Pipeline, "write_values", counting)
    model, opt, rt = _trained(nvme_dir, ours)
    with rt:
        _step(model, opt)
        model.load_state_dict(other)
        seen = clone_sd(model)
        assert len(writes) == len(set(writes)) == sum(len(bs.spec.slots) for bs in rt.blocks)
        keys = model.load_state_dict(without_alias, strict=False)
    assert_same_values(expected, seen, "state_dict() after the load")
    assert keys.missing_keys == expected_keys.missing_keys == ["head.weight"]


class NormNet(nn.Module):
    """Layers with BatchNorm buffers (running statistics) next to offloaded parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU()) for _ in range(3)
        )
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_buffers_load_and_a_failed_load_puts_them_back(nvme_dir):
    """Buffers load as in torch; a load that fails leaves them (and the parameters) as they were."""
    reference = NormNet()
    ours = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 32, generator=gen) for _ in range(4)]

    def step(model, opt, x):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    checkpoint = clone_sd(reference)
    bad = dict(checkpoint)
    bad["head.weight"] = bad["head.weight"][:, :3]
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    ref_losses = [step(reference, ref_opt, x) for x in data[:2]]
    before = clone_sd(reference)
    reference.load_state_dict(checkpoint)
    after = clone_sd(reference)
    ref_losses += [step(reference, ref_opt, x) for x in data[2:]]

    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    with tierrt.offload(ours, tiers=[tierrt.dram("1MiB"), tierrt.nvme(nvme_dir)], optimizer=opt):
        losses = [step(ours, opt, x) for x in data[:2]]
        with pytest.raises(RuntimeError, match="size mismatch for head.weight"):
            ours.load_state_dict(bad)
        assert_same_values(before, clone_sd(ours), "state_dict() after the failed load")
        ours.load_state_dict(checkpoint)
        assert_same_values(after, clone_sd(ours), "state_dict() after the load")
        losses += [step(ours, opt, x) for x in data[2:]]
    assert_same_run(reference, ref_losses, ours, losses)
    for (name, a), b in zip(reference.named_buffers(), ours.buffers(), strict=True):
        assert torch.equal(a, b), f"buffer {name} differs"


def test_assign_is_refused_before_anything_changes(nvme_dir):
    model, opt, rt = _trained(nvme_dir)
    other = clone_sd(models.llama(seed=5))
    with rt:
        _step(model, opt)
        before = clone_sd(model)
        params = list(model.parameters())
        with pytest.raises(HookError, match="assign=True"):
            model.load_state_dict(other, assign=True)
        assert list(model.parameters()) == params
        assert_same_values(before, clone_sd(model), "state_dict() after the refused load")


def test_submodule_parent_and_unwrapped_loads(nvme_dir):
    """A submodule's load_state_dict, a load through a parent of the offloaded module (offload of
    ``model.model``, loaded as the whole model as Trainer does), and torch's load_state_dict called
    through a reference taken before entering (it bypasses the wrapper; each module's values are
    written as torch reaches it)."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    other = clone_sd(models.llama(seed=5))
    layer = {k[len("model.layers.1.") :]: v for k, v in other.items() if k.startswith("model.layers.1.")}
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    ref_losses = [_step(reference, ref_opt)]
    reference.model.layers[1].load_state_dict(layer)
    ref_losses.append(_step(reference, ref_opt, seed=2))
    reference.load_state_dict(other)
    ref_losses.append(_step(reference, ref_opt, seed=3))
    _PLAIN_LOAD(reference, clone_sd(models.llama(seed=6)))
    expected = clone_sd(reference)

    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    inner = ours.model  # the head stays outside the offloaded module, stepped plainly
    with tierrt.offload(inner, tiers=tiers_for(inner, "streaming", nvme_dir), optimizer=opt):
        losses = [_step(ours, opt)]
        ours.model.layers[1].load_state_dict(layer)
        losses.append(_step(ours, opt, seed=2))
        ours.load_state_dict(other)
        losses.append(_step(ours, opt, seed=3))
        _PLAIN_LOAD(ours, clone_sd(models.llama(seed=6)))
        seen = clone_sd(ours)
    assert_same_values(expected, seen, "state_dict() after the loads")
    for step, (a, b) in enumerate(zip(ref_losses, losses, strict=True)):
        assert torch.equal(a, b), f"loss of step {step} differs"


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 8) -> None:
        gen = torch.Generator().manual_seed(9)
        self.ids = torch.randint(0, models.VOCAB, (count, models.SEQ), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model, out: str, opt=None):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=out,
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=2e-3,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    optimizers = (opt, None) if opt is not None else (None, None)
    return Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=optimizers)


def _losses(trainer) -> list[float]:
    """The losses logged after resuming from step 2 (the history holds the checkpoint's too)."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry and entry["step"] > 2]


@pytest.mark.parametrize("passed", [False, True], ids=["adopted", "optimizer_passed"])
def test_trainer_resume_from_checkpoint_inside(passed, nvme_dir, tmp_path):
    """``Trainer.train(resume_from_checkpoint=...)`` inside the context (transformers loads the
    weights with ``model.load_state_dict``, then the optimizer's and scheduler's state): the
    resumed run equals a plain resumed run, losses and final weights. With the optimizer adopted at
    its first step (not passed to offload()) and with it passed (its state in the tiers)."""
    out = str(tmp_path / "run")

    def make_opt(model):
        return torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01) if passed else None

    first = models.llama(layers=2)
    _trainer(first, out, make_opt(first)).train()  # saves checkpoint-2 and checkpoint-4
    reference = models.llama(seed=3, layers=2)  # other values: only a load makes the runs agree
    ours = copy.deepcopy(reference)
    plain = _trainer(reference, out, make_opt(reference))
    plain.train(resume_from_checkpoint=f"{out}/checkpoint-2")
    opt = make_opt(ours)
    with tierrt.offload(ours, tiers=tiers_for(ours, "streaming", nvme_dir), optimizer=opt) as rt:
        resumed = _trainer(ours, out, opt)
        resumed.train(resume_from_checkpoint=f"{out}/checkpoint-2")
        assert_streamed(rt, "streaming")
    assert _losses(resumed) == _losses(plain) and len(_losses(plain)) == 2
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), f"weight {name} differs after the resumed run"


def test_loading_the_models_own_parameters_changes_nothing(nvme_dir):
    """Parameter objects as the state dict's values (evicted ones are placeholders): their values
    are read from the tiers, so the load is the no-op it is in torch."""
    model, opt, rt = _trained(nvme_dir)
    with rt:
        _step(model, opt)
        before = clone_sd(model)
        assert any(not bs.attached for bs in rt.blocks)  # some parameters are placeholders now
        model.load_state_dict(dict(model.named_parameters()))
        assert_same_values(before, clone_sd(model), "state_dict() after the load")
    assert nn.Module.load_state_dict is _PLAIN_LOAD  # given back on leaving
