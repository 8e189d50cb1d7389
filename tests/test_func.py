"""``torch.func`` inside the context (see tierrt.functional): functional_call, vmap and gradient
transforms over the caller's own tensors give the plain run's results bit for bit, with blocks
streamed from NVMe; a gradient transform through offloaded weights raises a HookError naming the
fix before anything runs, and the context trains on unchanged after it."""

from __future__ import annotations

import models
import pytest
import torch
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

import tierrt

WIDTH = 64


def _model() -> torch.nn.Module:
    return models.mlp(0, width=WIDTH, depth=4)


def _tiers(nvme_dir: str) -> list:
    return [tierrt.dram("160KiB"), tierrt.nvme(nvme_dir)]  # the blocks stream from the swap files


def _x(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


def _copies(model: torch.nn.Module, shift: float = 0.0) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() + shift for n, p in model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _warm(model: torch.nn.Module) -> None:
    """Two forwards first: later ones are no longer watched by tierrt (the quiet path)."""
    with torch.no_grad():
        for _ in range(3):
            model(_x())


def _streams(rt: tierrt.Runtime) -> None:
    assert rt.report().tiers["nvme"]["in_use"] > 0


def test_functional_call_uses_the_given_tensors_and_the_offloaded_values(nvme_dir):
    plain = _model()
    own = _copies(plain, 0.25)
    x = _x()
    expected_own = functional_call(plain, own, (x,))
    expected_self = functional_call(plain, dict(plain.named_parameters()), (x,))
    with torch.no_grad():
        expected_detached = functional_call(plain, {n: p.detach() for n, p in plain.named_parameters()}, (x,))
    model = _model()
    with tierrt.offload(model, tiers=_tiers(nvme_dir)) as rt:
        _streams(rt)
        _warm(model)
        assert torch.equal(functional_call(model, own, (x,)), expected_own)
        assert torch.equal(functional_call(model, dict(model.named_parameters()), (x,)), expected_self)
        with torch.no_grad():  # MeZO-style code: the module's own parameters, under no_grad
            detached = {n: p.detach() for n, p in model.named_parameters()}
            assert torch.equal(functional_call(model, detached, (x,)), expected_detached)
            assert torch.equal(functional_call(model, dict(model.named_parameters()), (x,)), expected_self)
        assert torch.equal(vmap(model)(x), vmap(plain)(x))


def test_backward_through_functional_call_reaches_the_given_tensors_and_the_tiers(nvme_dir):
    plain = _model()
    x = _x()
    own = {n: t.requires_grad_() for n, t in _copies(plain, 0.1).items()}
    functional_call(plain, own, (x,)).square().mean().backward()
    functional_call(plain, dict(plain.named_parameters()), (x,)).square().mean().backward()
    model = _model()
    mine = {n: t.requires_grad_() for n, t in _copies(model, 0.1).items()}
    with tierrt.offload(model, tiers=_tiers(nvme_dir)) as rt:
        _warm(model)
        functional_call(model, mine, (x,)).square().mean().backward()
        functional_call(model, dict(model.named_parameters()), (x,)).square().mean().backward()
        offloaded = dict(rt.named_grads())
    assert _same({n: t.grad for n, t in mine.items()}, {n: t.grad for n, t in own.items()})
    assert _same(offloaded, {n: p.grad for n, p in plain.named_parameters()})


def _per_sample_loss(model: torch.nn.Module):
    def loss(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x.unsqueeze(0),)).square().mean()

    return loss


def test_gradient_transforms_over_the_callers_tensors(nvme_dir):
    plain = _model()
    x = _x()
    params = _copies(plain)
    loss = _per_sample_loss(plain)
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    one = grad(loss)(params, x[0])
    _, pull = vjp(lambda p: functional_call(plain, p, (x,)), params)
    cotangent = pull(torch.ones(4, 10))[0]
    jacobian = jacrev(lambda inp: functional_call(plain, params, (inp,)).sum(0))(x[0])
    model = _model()
    with tierrt.offload(model, tiers=_tiers(nvme_dir)) as rt:
        _streams(rt)
        _warm(model)
        mine = _copies(model)  # copies of the offloaded values, made inside the context
        assert _same(mine, params)
        loss = _per_sample_loss(model)
        assert _same(vmap(grad(loss), in_dims=(None, 0))(mine, x), per_sample)
        assert _same(grad(loss)(mine, x[0]), one)
        _, pull = vjp(lambda p: functional_call(model, p, (x,)), mine)
        assert _same(pull(torch.ones(4, 10))[0], cotangent)
        assert torch.equal(jacrev(lambda inp: functional_call(model, mine, (inp,)).sum(0))(x[0]), jacobian)
        with torch.no_grad():
            assert torch.equal(model(x), plain(x))  # tierrt's hooks are back after the transforms


def test_forward_mode_over_the_offloaded_weights(nvme_dir):
    plain = _model()
    x, tangent = _x(), _x(seed=2)
    expected = jvp(plain, (x,), (tangent,))
    model = _model()
    with tierrt.offload(model, tiers=_tiers(nvme_dir)):
        _warm(model)
        out, tangent_out = jvp(model, (x,), (tangent,))
    assert torch.equal(out, expected[0]) and torch.equal(tangent_out, expected[1])


def _plain_steps(steps: int) -> list[torch.Tensor]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(steps):
        model(_x(seed=10 + i)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "case",
    ["grad of the module's parameters", "grad of p.detach()", "vmap of grad", "input gradients", "vjp"],
)
def test_gradient_transforms_through_offloaded_weights_raise_before_anything_changes(case, nvme_dir):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = _x()
    with tierrt.offload(model, tiers=_tiers(nvme_dir), optimizer=opt) as rt:
        model(_x(seed=10)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        before = [rt.value(p) for p in model.parameters()]
        loss = _per_sample_loss(model)
        if case == "grad of the module's parameters":
            run, match = lambda: grad(loss)(dict(model.named_parameters()), x[0]), "was given offloaded"
        elif case == "grad of p.detach()":
            run = lambda: grad(loss)({n: p.detach() for n, p in model.named_parameters()}, x[0])  # noqa: E731
            match = r"p\.detach\(\)\.clone\(\)"
        elif case == "vmap of grad":
            run = lambda: vmap(grad(loss), in_dims=(None, 0))(dict(model.named_parameters()), x)  # noqa: E731
            match = "was given offloaded"
        elif case == "input gradients":
            run, match = lambda: grad(lambda inp: model(inp).sum())(x), r"torch\.autograd\.grad"
        else:
            run, match = lambda: vjp(model, x), "runs Sequential's forward over offloaded parameters"
        with pytest.raises(tierrt.HookError, match=match):
            run()
        assert all(torch.equal(rt.value(p), b) for p, b in zip(model.parameters(), before))
        model(_x(seed=11)).square().mean().backward()  # training goes on as if nothing happened
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _plain_steps(2)))


def test_functional_call_of_a_transformers_model_mezo_style(nvme_dir):
    """GPT-2 (tied embedding and head), streamed: the module's own parameters, p.detach() of them
    and perturbed copies, under no_grad as zeroth-order code runs them."""
    ids = torch.randint(0, models.VOCAB, (2, models.SEQ), generator=torch.Generator().manual_seed(0))
    plain = models.gpt2(0)
    perturbed = {n: p.detach().clone() * 1.01 for n, p in plain.named_parameters()}
    with torch.no_grad():
        expected = [
            functional_call(plain, dict(plain.named_parameters()), (ids,)).logits,
            functional_call(plain, {n: p.detach() for n, p in plain.named_parameters()}, (ids,)).logits,
            functional_call(plain, perturbed, (ids,)).logits,
        ]
    model = models.gpt2(0)
    budget = sum(p.numel() * p.element_size() for p in model.parameters()) // 3
    with tierrt.offload(model, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)]) as rt, torch.no_grad():
        _streams(rt)
        for _ in range(3):
            model(ids)
        got = [
            functional_call(model, dict(model.named_parameters()), (ids,)).logits,
            functional_call(model, {n: p.detach() for n, p in model.named_parameters()}, (ids,)).logits,
            functional_call(model, perturbed, (ids,)).logits,
        ]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
