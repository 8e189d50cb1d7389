"""Mixed precision through tierrt: bf16 compute with fp32 master weights, autocast with GradScaler."""

from __future__ import annotations

import copy

import models
import pytest
import torch
from test_late_optimizer import loop
from test_offload_numerics import streaming_budget

import tierrt


def tiers(model, nvme_dir, compute_dtype=None):
    return [tierrt.dram(streaming_budget(model, compute_dtype=compute_dtype)), tierrt.nvme(nvme_dir)]


def master_recipe(reference, data, make_opt, dtype, whole_model=False):
    """What ``compute_dtype=dtype`` implements, by hand: a ``dtype`` copy of ``reference``'s parameters
    computes (``whole_model``: buffers too), its gradients go to fp32 master weights, ``make_opt(master)``
    steps them and the copy is refreshed. Returns (losses, master weights, the optimizer)."""
    master = [p.detach().clone() for p in reference.parameters()]
    compute = copy.deepcopy(reference)
    if whole_model:
        compute.to(dtype)
    for p in compute.parameters():  # parameters only: buffers (rotary frequencies) keep their dtype
        p.data = p.data.to(dtype)
    opt = make_opt(master)
    losses = []
    for ids in data:
        loss = models.lm_loss(compute, ids)
        loss.backward()
        for m, p in zip(master, compute.parameters()):
            m.grad, p.grad = p.grad.float(), None
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for m, p in zip(master, compute.parameters()):
                p.copy_(m)
        losses.append(loss.detach().clone())
    return losses, master, opt


@pytest.mark.parametrize(
    ("native", "fused"),
    [(None, False), (False, False), (None, True)],
    ids=["native_kernel", "torch_stepped", "torch_fused"],
)
def test_bf16_compute_with_fp32_master_weights(native, fused, nvme_dir):
    """compute_dtype=bf16 equals, bit for bit, the recipe it implements: a bf16 copy of the model's
    parameters computes, its bf16 gradients are accumulated in fp32, AdamW updates fp32 master weights and the
    bf16 copy is refreshed from them. Also when torch's AdamW is stepped block by block (the optimizer
    tierrt steps without its kernels, e.g. one created inside the context), and with torch's fused
    AdamW (its state in the tiers too)."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)

    ref_losses, master, _ = master_recipe(
        reference,
        data,
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=fused),
        torch.bfloat16,
    )

    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.01, fused=fused)
    with tierrt.offload(
        ours,
        tiers=tiers(ours, nvme_dir, torch.bfloat16),
        optimizer=opt,
        compute_dtype=torch.bfloat16,
        native_optimizer=native,
    ) as rt:
        assert all(p.dtype == torch.bfloat16 for p in ours.parameters())  # the model computes in bf16
        losses = loop(ours, opt, data)
        assert rt.blockwise.updater.native == (native is None and not fused)
        assert rt.blockwise.updater.state_in_tiers
    for a, b in zip(ref_losses, losses):
        assert torch.equal(a, b)
    for (name, _), m, p in zip(reference.named_parameters(), master, ours.parameters()):
        assert p.dtype == torch.float32  # given back in its own dtype, with the master values
        assert torch.equal(m, p), (name, (m - p).abs().max())


def _autocast_run(model, opt, scaler, data):
    losses = []
    for ids in data:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = models.lm_loss(model, ids)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        losses.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).detach().clone())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(loss.detach().clone())
        losses.append(scaler.get_scale() * torch.ones(()))
    return losses


@pytest.mark.parametrize(
    ("build", "init_scale"),
    [(models.gpt2, 2.0**10), (models.gpt2, 2.0**127), (models.llama, 2.0**10)],
    ids=["gpt2", "gpt2_overflow", "llama"],
)
def test_autocast_with_grad_scaler(build, init_scale, nvme_dir):
    """GradScaler's unscale_/step/update on offloaded gradients: equal to plain torch, including the
    skipped step and the lowered scale when the scaled gradients overflow (init_scale 2**127).

    The weights' autocast casts that backward needs are cast again there (not kept): GPT-2's Conv1D
    saves the cast itself, Llama's linear layers a transposed view of it."""
    reference = build()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    ref = _autocast_run(reference, ref_opt, torch.amp.GradScaler("cpu", init_scale=init_scale), data)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt):
        got = _autocast_run(ours, opt, torch.amp.GradScaler("cpu", init_scale=init_scale), data)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all()), (i, a, b)
    for a, b in zip(reference.parameters(), ours.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("unscale", [False, True], ids=["unscaled_in_step", "unscale_first"])
@pytest.mark.parametrize("init_scale", [2.0**10, 2.0**127], ids=["finite", "overflow"])
def test_grad_scaler_with_fused_adamw(unscale, init_scale, nvme_dir):
    """GradScaler with torch's fused AdamW (stepped by torch, state in the tiers): the scaler hands
    the fused step ``grad_scale`` and ``found_inf`` for that call, and the step unscales (or skips
    on overflow) inside itself. tierrt's deferred updates run after step() returned, with the values
    of that call: equal to plain torch, also on overflow and after an explicit ``unscale_``."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)

    def run(model, opt):
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        values = []
        for ids in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = models.lm_loss(model, ids)
            scaler.scale(loss).backward()
            if unscale:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            values += [loss.detach().clone(), scaler.get_scale() * torch.ones(())]
        return values

    ref = run(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3, fused=True))
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3, fused=True)
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), optimizer=opt) as rt:
        got = run(ours, opt)
        assert rt.blockwise.updater.state_in_tiers and not rt.blockwise.updater.native
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all()), (i, a, b)
    for a, b in zip(reference.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def test_autocast_over_frozen_fp32_weights_warns(nvme_dir, caplog):
    """The casts of frozen fp32 weights cannot be recognised (no autograd history) and stay saved
    until backward: one warning names a weight and the remedy (compute_dtype)."""
    model = models.llama()
    for name, p in model.named_parameters():
        p.requires_grad_("layers.1." in name)  # a frozen base with one trainable layer
    ids = models.token_batches(1)[0]
    with tierrt.offload(model, tiers=tiers(model, nvme_dir)):
        with caplog.at_level("WARNING", logger="tierrt"):
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = models.lm_loss(model, ids)
                loss.backward()
    warnings = [r.getMessage() for r in caplog.records if "autocast" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "compute_dtype=torch.bfloat16" in warnings[0] and "frozen fp32" in warnings[0]


def test_compute_dtype_the_kernel_cannot_write_steps_with_torch(nvme_dir):
    """compute_dtype=float64 (the native kernel writes fp32/bf16/fp16 weights only): AdamW is stepped
    by torch block by block, equal to the recipe, instead of failing (and rolling back) at step 1."""
    reference = models.llama(layers=2)
    ours = copy.deepcopy(reference)
    data = models.token_batches(2)
    ref_losses, master, _ = master_recipe(
        reference, data, lambda ps: torch.optim.AdamW(ps, lr=1e-3), torch.float64, whole_model=True
    )

    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    with tierrt.offload(
        ours, tiers=tiers(ours, nvme_dir, torch.float64), optimizer=opt, compute_dtype=torch.float64
    ) as rt:
        assert not rt.blockwise.updater.native
        losses = loop(ours, opt, data)
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses))
    for m, p in zip(master, ours.parameters()):
        assert p.dtype == torch.float32 and torch.equal(m, p)
    with pytest.raises(tierrt.ConfigError, match="compute_dtype=torch.float64"):  # before anything moves
        with tierrt.offload(
            ours,
            tiers=tiers(ours, nvme_dir),
            optimizer=opt,
            compute_dtype=torch.float64,
            native_optimizer=True,
        ):
            pass
    assert all(torch.equal(m, p) for m, p in zip(master, ours.parameters()))


def test_grad_scaler_refuses_fp16_parameters_as_torch_does(nvme_dir):
    """torch's GradScaler raises ValueError for fp16 gradients (unscaling them in fp16 overflows); the
    offloaded ones too, instead of stepping to inf/NaN weights. Nothing is stepped."""
    model = models.llama(layers=2).half()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with tierrt.offload(model, tiers=tiers(model, nvme_dir), optimizer=opt):
        scaler.scale(models.lm_loss(model, models.token_batches(1)[0])).backward()
        with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients") as info:
            scaler.step(opt)
        assert isinstance(info.value, tierrt.ConfigError) and "compute_dtype" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_adagrad_built_inside_under_bf16_keeps_its_sum_in_fp32(nvme_dir):
    """Adagrad makes its ``sum`` in ``__init__`` over the parameters as they look inside the
    context (bf16 under ``compute_dtype``); adopted at its first step, it accumulated that step
    into a bf16 sum. Now it equals the fp32 master recipe (and Adagrad passed at entry) bit for bit."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    _, master, ref_opt = master_recipe(
        reference, data, lambda ps: torch.optim.Adagrad(ps, lr=1e-2), torch.bfloat16
    )
    with tierrt.offload(ours, tiers=tiers(ours, nvme_dir, torch.bfloat16), compute_dtype=torch.bfloat16):
        opt = torch.optim.Adagrad(ours.parameters(), lr=1e-2)
        for ids in data:
            models.lm_loss(ours, ids).backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(master, ours.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ref_opt.state.values(), (opt.state[p] for p in ours.parameters()), strict=True):
        assert a["sum"].dtype == b["sum"].dtype == torch.float32 and torch.equal(a["sum"], b["sum"])
