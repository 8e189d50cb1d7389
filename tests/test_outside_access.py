"""Parameters and gradients used directly between steps, as plain-torch code does.

A user's own loop reads and writes ``p`` and ``p.grad`` outside the model's forward: it logs weight
and gradient norms, keeps an EMA of the weights by hand (``torch._foreach_lerp_``), adds an L2
penalty over ``model.parameters()`` to the loss, clips gradients by value through ``p.grad.data``,
scales one gradient, sets one to None, rescales a weight in place (``p.mul_()``, ``p.data *= s``),
assigns ``p.data = x`` (also a copy of another parameter's ``.data``), keeps
``w = p.detach()`` across steps. With tierrt each of these sees and changes the values plain torch
has, at a DRAM budget below the model with everything homed on NVMe, and the run stays bit for bit
that of plain torch (losses, logged values, final weights). Both optimizer paths are covered: torch's
own optimizer stepped per block (RMSprop) and tierrt's native AdamW with deferred updates.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
from test_offload_numerics import streaming_budget
from torch import nn

import tierrt
from tierrt import runtime
from tierrt.errors import HookError

STEPS = 3


def _rmsprop(params):
    return torch.optim.RMSprop(params, lr=1e-3)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def _values_loop(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor]) -> list:
    """Weights read and written between steps; returns what it logged."""
    ema = [p.detach().clone() for p in model.parameters()]
    kept = model.lm_head.weight.detach()  # an alias: plain torch sees it follow the updates
    logged = []
    for ids in data:
        loss = models.lm_loss(model, ids)
        penalty = sum(p.pow(2).sum() for p in model.parameters())
        (loss + 1e-4 * penalty).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(model.parameters()), 0.1)
            norms = torch.stack([p.norm() for p in model.parameters()])
            first = [p.data.clone() for p in model.parameters()][:4]
            flat = model.model.layers[0].mlp.up_proj.weight.view(-1)[:7].clone()
            model.model.norm.weight.mul_(1.01)
            model.lm_head.weight.data.add_(1e-3)
            model.model.layers[1].self_attn.o_proj.weight[0] = 0.5
            model.model.layers[0].mlp.gate_proj.weight.data *= 0.999
            mlp = model.model.layers[3].mlp
            mlp.up_proj.weight.data = mlp.gate_proj.weight.data.clone()
        logged.append((loss.detach().clone(), norms, first, flat, kept.sum().clone()))
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.data = torch.full_like(
            model.model.layers[2].mlp.down_proj.weight, 0.25
        )
        nn.init.zeros_(model.model.layers[0].self_attn.k_proj.weight)
        # torch.nn.init hands the tensor by keyword (tensor=...); orthogonal_ writes through a view
        seeded = torch.Generator().manual_seed(5)
        nn.init.normal_(model.model.layers[1].mlp.gate_proj.weight, std=0.02, generator=seeded)
        nn.init.kaiming_uniform_(model.model.layers[2].self_attn.v_proj.weight, generator=seeded)
        nn.init.orthogonal_(model.model.layers[3].self_attn.q_proj.weight, generator=seeded)
        kept_vars = model.state_dict(keep_vars=True)  # the parameters themselves, as torch gives
        kept_vars["model.layers.3.mlp.down_proj.weight"].mul_(0.5)
        model.model.layers[2].mlp.up_proj.weight.detach().view(-1)[:5].zero_()  # through an alias's view
        model.model.embed_tokens.weight[3].fill_(0.25)  # a row: ``emb.weight[pad].zero_()``
    logged.append([e.clone() for e in ema])
    return logged


def _grads_loop(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor]) -> list:
    """Gradients read and changed between backward and step; returns what it logged."""
    logged = []
    for ids in data:
        loss = models.lm_loss(model, ids)
        loss.backward()
        total = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
        params = list(model.parameters())  # torch's clipping in two calls (its clip_grad_norm_ since 2.6)
        clip_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        torch.nn.utils.clip_grads_with_norm_(params, 0.5, clip_norm)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.data.clamp_(-1e-3, 1e-3)
        model.model.layers[1].mlp.up_proj.weight.grad.mul_(3.0)
        model.model.layers[2].self_attn.q_proj.weight.grad = None
        head = model.lm_head.weight
        same = head.grad is head.grad
        opt.step()
        opt.zero_grad()
        cleared = all(p.grad is None for p in model.parameters())
        logged.append((loss.detach().clone(), total, clip_norm, same, cleared))
    return logged


def _autograd_loop(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor]) -> list:
    """Gradients taken with ``torch.autograd.grad`` over every parameter and assigned by hand, then
    ``backward(inputs=...)`` over one layer's: at a streaming budget, autograd fetches the blocks
    as backward reaches them (never all at once)."""
    logged = []
    params = list(model.parameters())
    for ids in data:
        loss = models.lm_loss(model, ids)
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad()
        logged.append((loss.detach().clone(), torch.stack([g.norm() for g in grads])))
    loss = models.lm_loss(model, data[0])
    loss.backward(inputs=list(model.model.layers[1].parameters()))
    logged.append([p.grad is not None for p in params])
    opt.step()
    opt.zero_grad()
    return logged


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize(
    "loop", [_values_loop, _grads_loop, _autograd_loop], ids=["values", "grads", "autograd_grad"]
)
@pytest.mark.parametrize("make_opt", [_rmsprop, _adamw], ids=["torch_rmsprop", "native_adamw"])
def test_direct_use_between_steps_matches_plain_torch(loop, make_opt, nvme_dir):
    reference = models.llama(layers=4, width=64, vocab=500, intermediate=172)
    model = copy.deepcopy(reference)
    data = models.token_batches(STEPS)
    expected = loop(reference, make_opt(reference.parameters()), data)
    budget = streaming_budget(model)
    opt = make_opt(model.parameters())
    with tierrt.offload(model, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)], optimizer=opt):
        got = loop(model, opt, data)
    assert _equal(got, expected)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def _counts(nvme_dir, read_between: bool) -> tuple[int, int]:
    model = models.llama(layers=4, width=64, vocab=500, intermediate=172)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    tiers = [tierrt.dram(streaming_budget(model, adam=False)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(model, tiers=tiers, optimizer=opt) as rt:
        for ids in models.token_batches(4):
            models.lm_loss(model, ids).backward()
            opt.step()
            opt.zero_grad()
            if read_between:
                for p in model.parameters():
                    p.norm()
        total = rt.report().total
    return total.prefetch_hits, total.prefetch_misses


def test_reads_do_not_enter_the_trace(nvme_dir):
    """Reads between steps are not forward uses: the blocks acquired (prefetch hits + misses) are
    those of the same run without them (a read may leave a block cached, turning a miss into a hit)."""
    assert sum(_counts(nvme_dir, read_between=True)) == sum(_counts(nvme_dir, read_between=False))


def test_data_of_another_shape_or_storage_is_refused(nvme_dir):
    model = models.llama(layers=2, width=64, vocab=500, intermediate=172)
    weight = model.lm_head.weight
    with tierrt.offload(model, tiers=[tierrt.dram("64MiB"), tierrt.nvme(nvme_dir)]) as rt:
        before = rt.value(weight)
        with pytest.raises(HookError, match="another shape or dtype"):
            weight.data = torch.zeros(3, 3)
        with pytest.raises(HookError, match="another shape or dtype"):
            weight.data = torch.zeros(weight.shape, dtype=torch.float64)
        with pytest.raises(HookError, match="share one storage"):  # tied in torch: not after entry
            weight.data = model.model.embed_tokens.weight.data
        assert torch.equal(rt.value(weight), before)
    assert weight.shape == before.shape


@pytest.mark.parametrize(
    "move, target",
    [
        (lambda m: m.to("meta"), "meta"),
        (lambda m: m[2].to("meta"), "meta"),
        (lambda m: m.to_empty(device="meta"), "meta"),
        (lambda m: m.to("cuda:1"), "cuda:1"),
        (lambda m: m.to(torch.empty(1, device="meta")), "meta"),
    ],
)
def test_moving_the_model_to_another_device_inside_is_refused(move, target, nvme_dir):
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = models.mlp_batches(2)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for batch in batches:
        models.mlp_loss(reference, batch).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    with tierrt.offload(model, tiers=[tierrt.dram("512KiB"), tierrt.nvme(nvme_dir)], optimizer=opt):
        models.mlp_loss(model, batches[0]).backward()
        opt.step()
        opt.zero_grad()
        with pytest.raises(HookError, match=f"to {target} inside the offload context") as info:
            move(model)
        assert info.value.parameter.endswith("weight")
        models.mlp_loss(model, batches[1]).backward()  # the model is unchanged and trains on
        opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert a.device == b.device and torch.equal(a, b)


def test_moves_to_the_compute_device_inside_are_no_ops(nvme_dir):
    model = models.mlp()
    expected = copy.deepcopy(model)
    x = torch.randn(2, 128)
    with tierrt.offload(model, tiers=[tierrt.dram("512KiB"), tierrt.nvme(nvme_dir)]):
        assert model.cpu() is model
        model.to("cpu")
        model.float()
        out = model(x)
    assert torch.equal(out, expected(x))
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loop", [_values_loop, _grads_loop], ids=["values", "grads"])
def test_direct_use_on_the_gpu_path(loop, nvme_dir, monkeypatch):
    """The same with a GPU compute tier that evicts (backed by host memory, as in
    test_gpu_path_schedule.py): a parameter held for a call is staged through DRAM to the GPU tier,
    and a write reaches the DRAM copies. (The GPU budget holds two blocks: the L2 penalty's backward
    unpacks weights of every block before the model's backward reaches them.)"""
    monkeypatch.setattr(runtime, "gpu_device", lambda spec: torch.device("cpu"))
    reference = models.llama(layers=4, width=64, vocab=500, intermediate=172)
    model = copy.deepcopy(reference)
    data = models.token_batches(STEPS)
    expected = loop(reference, _adamw(reference.parameters()), data)
    weights = models.model_bytes(model)
    tiers = [tierrt.gpu(0, budget=weights // 2), tierrt.dram(weights * 4), tierrt.nvme(nvme_dir)]
    opt = _adamw(model.parameters())
    with tierrt.offload(model, tiers=tiers, optimizer=opt):
        got = loop(model, opt, data)
    assert _equal(got, expected)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_an_alias_kept_past_the_context_views_the_restored_parameter(nvme_dir):
    """``w = p.detach()`` taken inside and still held after the with-block is ``p``'s memory, as in
    torch: it shows the trained value and follows later changes of ``p``."""
    model = models.llama(layers=2, width=64, vocab=500, intermediate=172)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    tiers = [tierrt.dram(streaming_budget(model, adam=False)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(model, tiers=tiers, optimizer=opt):
        kept = model.model.layers[0].mlp.up_proj.weight.detach()
        data = model.lm_head.weight.data
        for ids in models.token_batches(2):
            models.lm_loss(model, ids).backward()
            opt.step()
            opt.zero_grad()
    weight = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(kept, weight) and torch.equal(data, model.lm_head.weight)
    with torch.no_grad():
        weight.mul_(2.0)
    assert torch.equal(kept, weight)
    assert kept.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
