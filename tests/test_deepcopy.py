"""``copy.deepcopy`` (and ``torch.save``) of the offloaded model, or of a module in it, inside the context.

It raised ``TypeError: cannot pickle 'HostArena'`` (tierrt's hooks lead to the runtime), which broke
``torch.optim.swa_utils.AveragedModel(model)`` and frozen reference or teacher copies. A copy made in
the middle of a run is now what plain torch's deepcopy gives at that point, bit for bit: a plain
model with no tierrt hooks, holding the current values (pending updates applied, evicted blocks
read from their tiers) on the original device; and the original keeps training exactly as plain.
"""

from __future__ import annotations

import copy
import io

import models
import pytest
import torch
from test_offload_numerics import streaming_budget
from test_optimizer_offload import make_opt
from torch import nn

import tierrt

STEPS = 4
COPY_AT = 2  # the copy is made after this many steps


def run(model: nn.Module, opt: torch.optim.Optimizer, data, copy_fn) -> tuple[list[torch.Tensor], object]:
    """Train ``STEPS`` steps, copying with ``copy_fn(model)`` after ``COPY_AT`` of them."""
    losses, copied = [], None
    for step, ids in enumerate(data):
        if step == COPY_AT:
            copied = copy_fn(model)
        loss = models.lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())
    return losses, copied


def assert_plain(module: nn.Module) -> None:
    """No tierrt hook, wrapper or patch on any module or parameter of ``module``."""
    for name, sub in module.named_modules():
        for attr in (
            "_forward_pre_hooks",
            "_forward_hooks",
            "_state_dict_hooks",
            "_forward_hooks_always_called",
            "_load_state_dict_pre_hooks",
            "_load_state_dict_post_hooks",
        ):
            assert not getattr(sub, attr), f"{name or 'the copy'} has {attr}"
        patches = {"forward", "zero_grad", "__deepcopy__", "__reduce_ex__"} & set(vars(sub))
        assert not patches, f"{name} has instance patches {patches}"
    for name, p in module.named_parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None), f"{name} has a grad hook"


def assert_same_module(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    assert list(sa) == list(sb)
    for key in sa:
        x, y = sa[key], sb[key]
        assert type(x) is type(y) and x.dtype == y.dtype and x.device == y.device, key
        assert x.requires_grad == y.requires_grad, key
        assert torch.equal(x, y), f"{key} differs"


def compare(build, opt_kind: str, nvme_dir: str, copy_fn, **offload_kw) -> tuple:
    reference = build()
    ours = copy.deepcopy(reference)
    data = models.token_batches(STEPS)
    ref_losses, ref_copy = run(reference, make_opt(opt_kind, reference.parameters()), data, copy_fn)
    opt = make_opt(opt_kind, ours.parameters())
    tiers = [tierrt.dram(streaming_budget(ours)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(ours, tiers=tiers, optimizer=opt, **offload_kw) as rt:
        losses, our_copy = run(ours, opt, data, copy_fn)
        assert rt.report().total.bytes_by_link["nvme->dram"] > 0
    for step, (a, b) in enumerate(zip(ref_losses, losses, strict=True)):
        assert torch.equal(a, b), f"loss of step {step} differs"
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), f"{name} differs after training"
    return ref_copy, our_copy


@pytest.mark.parametrize(
    ("opt_kind", "deferred"), [("adamw", True), ("adamw", False), ("sgd_nesterov", True), ("rmsprop", True)]
)
def test_deepcopy_mid_run_is_plain_torchs_copy(opt_kind, deferred, nvme_dir):
    """The copy equals plain torch's deepcopy at that point and is a plain model; it is independent
    (training it leaves the original alone) and computes what plain torch's copy computes."""
    ref_copy, our_copy = compare(models.llama, opt_kind, nvme_dir, copy.deepcopy, deferred_step=deferred)
    assert_same_module(ref_copy, our_copy)
    assert_plain(our_copy)
    ids = models.token_batches(1, seed=7)[0]
    for m in (ref_copy, our_copy):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        models.lm_loss(m, ids).backward()
        opt.step()
    assert_same_module(ref_copy, our_copy)
    with torch.no_grad():
        assert torch.equal(ref_copy(ids).logits, our_copy(ids).logits)


def test_deepcopy_of_a_tied_model_keeps_the_tie(nvme_dir):
    ref_copy, our_copy = compare(models.tied, "adamw", nvme_dir, copy.deepcopy)
    assert our_copy.head.weight is our_copy.embed.weight
    assert_same_module(ref_copy, our_copy)
    assert_plain(our_copy)


def test_deepcopy_of_submodules_and_containers(nvme_dir):
    """A layer, the model's body, and the model inside a list: each copy is plain torch's."""

    def copies(model):
        return copy.deepcopy([model.model.layers[1], model.model, {"whole": model}])

    ref_copies, our_copies = compare(models.llama, "adamw", nvme_dir, copies)
    for a, b in zip(ref_copies[:2], our_copies[:2]):
        assert_same_module(a, b)
        assert_plain(b)
    assert_same_module(ref_copies[2]["whole"], our_copies[2]["whole"])
    assert our_copies[2]["whole"].model is our_copies[1]  # one memo: shared submodules stay shared


def test_averaged_model_made_inside_the_context(nvme_dir):
    """torch's AveragedModel(model) deep-copies the model: made inside the context it starts from
    plain torch's copy."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def averaged(model):
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))

    ref_ema, our_ema = compare(models.llama, "adamw", nvme_dir, averaged)
    assert_same_module(ref_ema.module, our_ema.module)
    assert_plain(our_ema.module)


def test_after_leaving_deepcopy_is_torchs_own(nvme_dir):
    model = models.mlp()
    with tierrt.offload(model, tiers=[tierrt.dram("4MiB"), tierrt.nvme(nvme_dir)]):
        assert "__deepcopy__" in vars(model)
    assert not any("__deepcopy__" in vars(m) for m in model.modules())
    assert_same_module(model, copy.deepcopy(model))


@pytest.mark.parametrize("kind", ["ema", "swa_buffers"])
def test_averaged_model_updated_every_step(kind, nvme_dir):
    """``ema.update_parameters(model)`` after every step inside the context averages the real
    values (it read the placeholders: NaN), bit for bit what it averages without tierrt."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def make(model):
        if kind == "ema":
            return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        return AveragedModel(model, use_buffers=True)  # SWA's running mean, buffers averaged too

    def loop(model, opt, averaged):
        losses = []
        for ids in models.token_batches(STEPS):
            loss = models.lm_loss(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad()
            averaged.update_parameters(model)
            losses.append(loss.detach().clone())
        return losses

    reference = models.llama()
    ours = copy.deepcopy(reference)
    ref_avg, our_avg = make(reference), make(ours)  # made before entering
    ref_losses = loop(reference, make_opt("adamw", reference.parameters()), ref_avg)
    opt = make_opt("adamw", ours.parameters())
    with tierrt.offload(
        ours, tiers=[tierrt.dram(streaming_budget(ours)), tierrt.nvme(nvme_dir)], optimizer=opt
    ):
        losses = loop(ours, opt, our_avg)
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses, strict=True))
    assert int(our_avg.n_averaged) == STEPS
    assert_same_module(ref_avg.module, our_avg.module)


def _saved_and_loaded(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("build", [models.llama, models.tied], ids=["llama", "tied"])
def test_torch_save_of_the_model_mid_run(build, nvme_dir):
    """``torch.save(model)`` inside the context stores the plain model with the current values (it
    raised: tierrt's hooks lead to the runtime and its arenas)."""
    ref_copy, our_copy = compare(build, "adamw", nvme_dir, _saved_and_loaded)
    assert_same_module(ref_copy, our_copy)
    assert_plain(our_copy)


def test_torch_save_of_parameters_mid_run(nvme_dir):
    """``torch.save`` of the parameters themselves (and of ``p.data``) stores their current values,
    not the placeholders, nor storage that an evicted block hands out again before torch writes it."""

    def save(model):
        return _saved_and_loaded(
            {"params": dict(model.named_parameters()), "head_data": model.lm_head.weight.data}
        )

    ref, ours = compare(models.llama, "rmsprop", nvme_dir, save)
    assert list(ref["params"]) == list(ours["params"])
    for key, value in ref["params"].items():
        assert type(ours["params"][key]) is type(value) and torch.equal(ours["params"][key], value), key
    assert torch.equal(ours["head_data"], ref["head_data"])


def test_model_passed_to_a_spawned_process_gets_the_current_values(nvme_dir):
    """multiprocessing "spawn" pickles a Process's arguments: an offloaded model goes as its plain
    copy (current values), and that copy lives until the process has its tensors' descriptors
    (freed at once, it failed with "ValueError: bad value(s) in fds_to_keep")."""
    import multiprocessing

    model = models.llama(layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = models.token_batches(2)
    with tierrt.offload(
        model, tiers=[tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)], optimizer=opt
    ):
        models.lm_loss(model, ids[0]).backward()
        opt.step()
        with torch.no_grad():
            expected = models.lm_loss(model, ids[1])
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        child = ctx.Process(target=_loss_in_child, args=(model, ids[1], results))
        child.start()
        got = results.get(timeout=120)
        child.join(60)
    assert child.exitcode == 0 and got == expected.item()  # fp32 -> Python float is exact


def _loss_in_child(model, ids, results) -> None:
    with torch.no_grad():
        results.put(models.lm_loss(model, ids).item())  # not a tensor: shared memory dies with the child
