"""The native CPU optimizer kernels against torch's own optimizers, bit for bit.

Every test compares with torch.optim.Adam / AdamW / SGD as a user constructs them on the CPU (the
single-tensor path), or with torch's own conversions, on every instruction set this CPU has
(avx512, avx2, scalar) and on 1 and 2 threads.
"""

from __future__ import annotations

import math
import os
import threading

import pytest
import tierrt._native as native
import torch

from tierrt.errors import ConfigError
from tierrt.optim import kernels

ISAS = kernels.cpu_features()["available_isas"]
VARIANTS = [(isa, threads) for isa in ISAS for threads in (1, 2)]
SIZES = [1, 15, 16, 17, 1000003]


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal bit patterns; NaNs must sit in the same places (their payloads are not compared)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    int_dtype = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    if torch.equal(actual.view(int_dtype), expected.view(int_dtype)):
        return
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ"
    a = actual.view(int_dtype)[~nan_a]
    e = expected.view(int_dtype)[~nan_e]
    if not torch.equal(a, e):
        bad = (a != e).nonzero().flatten()
        i = bad[0].item()
        raise AssertionError(
            f"{what}: {bad.numel()} of {a.numel()} elements differ; first at {i}: "
            f"{actual[~nan_a][i].item()!r} != {expected[~nan_e][i].item()!r}"
        )


def make_grad(n: int, gen: torch.Generator, edge: bool = True) -> torch.Tensor:
    """Random gradients over many magnitudes, with zeros, signed zeros, denormals and huge values."""
    g = torch.randn(n, generator=gen) * torch.pow(10.0, torch.randint(-8, 4, (n,), generator=gen).float())
    if edge and n >= 8:
        idx = torch.randint(0, n, (max(1, n // 50),), generator=gen)
        choices = torch.tensor([0.0, -0.0, 1e-40, -3e-42, 1e-30, 3e20, -2e25, 1.0])
        g[idx] = choices[torch.randint(0, len(choices), idx.shape, generator=gen)]
    return g


def make_param(n: int, gen: torch.Generator) -> torch.Tensor:
    p = torch.randn(n, generator=gen)
    if n >= 8:
        p[0], p[1], p[2], p[3] = 0.0, -0.0, 1e-39, 1e30
    return p


class NativeAdam:
    """Native Adam state for one (isa, threads) variant."""

    def __init__(self, p0: torch.Tensor, isa: str, threads: int, amsgrad: bool, out_dtype=None) -> None:
        self.param = p0.clone()
        self.exp_avg = torch.zeros_like(p0)
        self.exp_avg_sq = torch.zeros_like(p0)
        self.max_sq = torch.zeros_like(p0) if amsgrad else None
        self.out = torch.empty(p0.shape, dtype=out_dtype) if out_dtype is not None else None
        self.isa, self.threads = isa, threads

    def step(self, grad: torch.Tensor, step: int, **kw) -> None:
        kernels.adam_step_(
            self.param,
            grad,
            self.exp_avg,
            self.exp_avg_sq,
            step=step,
            amsgrad=self.max_sq is not None,
            max_exp_avg_sq=self.max_sq,
            out=self.out,
            threads=self.threads,
            isa=self.isa,
            **kw,
        )


def run_adam_against_torch(
    n: int,
    cls: type[torch.optim.Optimizer],
    *,
    steps: int = 20,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_dtype: torch.dtype = torch.float32,
    grad_scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
    variants=None,
    seed: int = 0,
) -> None:
    gen = torch.Generator().manual_seed(seed + n)
    p0 = make_param(n, gen)
    ref = torch.nn.Parameter(p0.clone())
    opt = cls(
        [ref], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=amsgrad, maximize=maximize
    )
    # Set after construction so that values torch's constructor rejects (lr < 0, ...) can be tested.
    opt.param_groups[0].update(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    ours = [NativeAdam(p0, isa, t, amsgrad, out_dtype) for isa, t in (variants or VARIANTS)]
    decoupled = cls is torch.optim.AdamW
    for step in range(1, steps + 1):
        grad = make_grad(n, gen).to(grad_dtype)
        ref_grad = grad.to(torch.float32, copy=True)
        if grad_scale != 1.0:
            ref_grad.mul_(grad_scale)  # what the runtime's clip / unscale does before the step
        ref.grad = ref_grad
        opt.step()
        state = opt.state[ref]
        for o in ours:
            o.step(
                grad,
                step,
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                decoupled=decoupled,
                maximize=maximize,
                grad_scale=grad_scale,
            )
            what = f"{cls.__name__} n={n} isa={o.isa} threads={o.threads} step={step}"
            assert_bits_equal(o.param, ref.data, what + " param")
            assert_bits_equal(o.exp_avg, state["exp_avg"], what + " exp_avg")
            assert_bits_equal(o.exp_avg_sq, state["exp_avg_sq"], what + " exp_avg_sq")
            if amsgrad:
                assert_bits_equal(o.max_sq, state["max_exp_avg_sq"], what + " max_exp_avg_sq")
            if out_dtype is not None:
                assert_bits_equal(o.out, ref.data.to(out_dtype), what + " out")


@pytest.mark.parametrize("n", SIZES)
def test_adamw_bitwise_equal_to_torch(n):
    run_adam_against_torch(n, torch.optim.AdamW, weight_decay=0.01, steps=20 if n < 10**6 else 6)


@pytest.mark.parametrize("n", [1, 17, 40000])
def test_adam_l2_weight_decay_bitwise_equal_to_torch(n):
    run_adam_against_torch(n, torch.optim.Adam, weight_decay=0.1, steps=20)


@pytest.mark.parametrize(
    "cls,options",
    [
        (torch.optim.AdamW, dict(amsgrad=True, weight_decay=0.05)),
        (torch.optim.Adam, dict(amsgrad=True, maximize=True, weight_decay=0.01)),
        (torch.optim.AdamW, dict(maximize=True)),
        (torch.optim.AdamW, dict(betas=(0.3, 0.9), eps=1e-3)),  # lerp weight >= 0.5: other branch
        (torch.optim.AdamW, dict(betas=(0.0, 0.0), eps=0.0, weight_decay=0.0)),
        (torch.optim.Adam, dict(lr=-1e-2, betas=(0.99, 0.9999), eps=1e-12, weight_decay=-0.01)),
        (torch.optim.AdamW, dict(lr=10.0, weight_decay=0.2)),
    ],
)
def test_adam_options_bitwise_equal_to_torch(cls, options):
    run_adam_against_torch(1041, cls, steps=25, **options)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients(grad_dtype):
    # torch's reference runs the same step on grad.float().
    run_adam_against_torch(5003, torch.optim.AdamW, weight_decay=0.01, grad_dtype=grad_dtype)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_scale_equals_fp32_mul(grad_dtype):
    # grad_scale multiplies like torch's grad.mul_(s) in fp32 before the step (clip / unscale).
    run_adam_against_torch(2049, torch.optim.Adam, grad_dtype=grad_dtype, grad_scale=0.3791, steps=10)
    run_adam_against_torch(
        2049, torch.optim.AdamW, grad_dtype=grad_dtype, grad_scale=1 / 1024, maximize=True, steps=10
    )


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_weight_output_equals_to_dtype(out_dtype):
    run_adam_against_torch(4099, torch.optim.AdamW, weight_decay=0.01, out_dtype=out_dtype, steps=8)


def test_adam_ieee_sqrt_matches_torch_ops_with_correctly_rounded_sqrt():
    """sqrt="ieee" equals torch's single-tensor Adam written out op by op with an exact sqrt."""
    n = 3001
    gen = torch.Generator().manual_seed(7)
    p = make_param(n, gen)
    m, v = torch.zeros(n), torch.zeros(n)
    ours = [NativeAdam(p, isa, t, False) for isa, t in VARIANTS]
    lr, b1, b2, eps, wd = 2e-3, 0.9, 0.995, 1e-7, 0.02
    for step in range(1, 16):
        g = make_grad(n, gen)
        p.mul_(1 - lr * wd)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        exact_sqrt = v.double().sqrt().float()  # correctly rounded (double rounding is harmless)
        denom = (exact_sqrt / bc2**0.5).add_(eps)
        p.addcdiv_(m, denom, value=-(lr / bc1))
        for o in ours:
            o.step(g, step, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, decoupled=True, sqrt="ieee")
            assert_bits_equal(o.param, p, f"isa={o.isa} threads={o.threads} step={step}")


def test_sqrt_kinds():
    gen = torch.Generator().manual_seed(3)
    x = torch.cat(
        [
            torch.rand(100000, generator=gen) * 1e3,
            torch.rand(1000, generator=gen) * 1e-38,  # small normals and denormals
            torch.tensor([0.0, -0.0, float("inf"), 3.4e38, 1.4e-45]),
        ]
    )
    out = torch.empty_like(x)
    for isa in ISAS:
        kernels.sqrt_(x, out, sqrt="ieee", isa=isa)
        assert_bits_equal(out, x.double().sqrt().float(), f"ieee isa={isa}")
        kernels.sqrt_(x, out, sqrt="torch", isa=isa)
        assert_bits_equal(out, x.sqrt(), f"torch's sqrt isa={isa}")
    assert kernels.torch_sqrt_kind() in ("ieee", "rsqrt14", "halves")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "options",
    [
        dict(decoupled=True, weight_decay=0.1),
        dict(decoupled=False, weight_decay=0.1, maximize=True),
        dict(decoupled=True, weight_decay=0.0, amsgrad=True),
    ],
)
def test_adam_in_halves_is_torchs_step(options, isa, monkeypatch):
    """sqrt="halves" (what "torch" picks where torch's sqrt is neither rounding the kernel computes,
    as on AMD CPUs): two native passes around torch's own sqrt, chunk by chunk, give torch's Adam
    bit for bit, across chunk edges, with a bf16 output and a bf16 gradient, in place and out of place."""
    monkeypatch.setattr(kernels, "HALVES_CHUNK", 1000)  # many chunks, a partial last one
    gen = torch.Generator().manual_seed(11)
    n = 4321
    options = dict(options)
    decoupled = options.pop("decoupled")
    ref = torch.randn(n, generator=gen).requires_grad_()
    opt = (torch.optim.AdamW if decoupled else torch.optim.Adam)([ref], lr=1e-2, **options)
    param, param_in = ref.detach().clone(), ref.detach().clone()
    m, v = torch.zeros(n), torch.zeros(n)
    vmax = torch.zeros(n) if options.get("amsgrad") else None
    out = torch.empty(n, dtype=torch.bfloat16)
    for step in range(1, 4):
        grad = torch.randn(n, generator=gen).bfloat16()
        ref.grad = grad.float()
        opt.step()
        kernels.adam_step_(
            param, grad, m, v, step=step, lr=1e-2, decoupled=decoupled, max_exp_avg_sq=vmax, out=out,
            param_in=param_in if step == 2 else None, isa=isa, sqrt="halves", **options,
        )  # fmt: skip
        param_in.copy_(param)  # the out-of-place step (step 2) read param_in and wrote param
        state = opt.state[ref]
        assert_bits_equal(param, ref.detach(), f"weights, step {step}")
        assert_bits_equal(m, state["exp_avg"], f"exp_avg, step {step}")
        assert_bits_equal(v, state["exp_avg_sq"], f"exp_avg_sq, step {step}")
        if vmax is not None:
            assert_bits_equal(vmax, state["max_exp_avg_sq"], f"max_exp_avg_sq, step {step}")
        assert torch.equal(out, ref.detach().bfloat16()), f"bf16 output, step {step}"


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.0),
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True, weight_decay=1e-4),
        dict(momentum=0.5, dampening=0.3, weight_decay=0.01, maximize=True),
        dict(momentum=0.0, weight_decay=0.1, maximize=True),
    ],
)
@pytest.mark.parametrize("n", [1, 17, 100003])
def test_sgd_bitwise_equal_to_torch(options, n):
    gen = torch.Generator().manual_seed(n)
    p0 = make_param(n, gen)
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([ref], lr=0.05, **options)
    mom = options.get("momentum", 0.0)
    ours = [(isa, t, p0.clone(), torch.empty(n), torch.empty(n, dtype=torch.bfloat16)) for isa, t in VARIANTS]
    for step in range(20):
        grad = make_grad(n, gen)
        ref.grad = grad.clone()
        opt.step()
        for isa, threads, param, buf, out in ours:
            kernels.sgd_step_(
                param,
                grad,
                buf if mom else None,
                lr=0.05,
                first_step=step == 0,
                out=out,
                threads=threads,
                isa=isa,
                **options,
            )
            what = f"SGD {options} n={n} isa={isa} threads={threads} step={step}"
            assert_bits_equal(param, ref.data, what)
            assert_bits_equal(out, ref.data.to(torch.bfloat16), what + " out")
            if mom:
                assert_bits_equal(buf, opt.state[ref]["momentum_buffer"], what + " buffer")


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_sgd_low_precision_gradients_and_scale(grad_dtype):
    n = 3001
    gen = torch.Generator().manual_seed(11)
    p0 = make_param(n, gen)
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([ref], lr=0.01, momentum=0.9, nesterov=True)
    ours = [(isa, t, p0.clone(), torch.empty(n)) for isa, t in VARIANTS]
    for step in range(10):
        grad = make_grad(n, gen).to(grad_dtype)
        ref.grad = grad.float().mul_(0.125)
        opt.step()
        for isa, threads, param, buf in ours:
            kernels.sgd_step_(
                param, grad, buf, lr=0.01, momentum=0.9, nesterov=True, first_step=step == 0,
                grad_scale=0.125, threads=threads, isa=isa,
            )  # fmt: skip
            assert_bits_equal(param, ref.data, f"isa={isa} threads={threads} step={step}")


def test_non_finite_values_follow_torch():
    """inf / NaN in gradients or weights land in the same places as with torch."""
    n = 257
    gen = torch.Generator().manual_seed(5)
    p0 = make_param(n, gen)
    p0[5] = float("inf")
    p0[6] = float("nan")
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=1e-3, amsgrad=True)
    ours = [NativeAdam(p0, isa, t, True, torch.bfloat16) for isa, t in VARIANTS]
    for step in range(1, 6):
        grad = make_grad(n, gen)
        grad[10 * step] = float("inf")
        grad[10 * step + 1] = -float("inf")
        grad[10 * step + 2] = float("nan")
        ref.grad = grad.clone()
        opt.step()
        for o in ours:
            o.step(grad, step, weight_decay=0.01, decoupled=True)
            assert_bits_equal(o.param, ref.data, f"isa={o.isa} step={step}")
            assert_bits_equal(o.exp_avg_sq, opt.state[ref]["exp_avg_sq"], f"isa={o.isa} step={step}")
            assert_bits_equal(o.out, ref.data.to(torch.bfloat16), f"isa={o.isa} step={step} out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_conversion_equals_torch_on_all_kinds_of_values(dtype):
    """Round to nearest even, overflow, denormals and torch's NaN encodings, on random bit patterns."""
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65519.996, 65520.0, -65520.0,
         2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-14, 3.3895313e38, 3.4028235e38, 1.00390625, 1.01171875],
    )  # fmt: skip
    x = torch.cat([bits.view(torch.float32), specials, torch.randn(1000, generator=gen) * 1e-5])
    expected = x.to(dtype)
    for isa in ISAS:
        out = torch.empty(x.shape, dtype=dtype)
        kernels.convert_(x, out, isa=isa)
        int_dtype = torch.int32 if dtype == torch.float32 else torch.int16
        if dtype == torch.float32:
            assert_bits_equal(out, expected, f"isa={isa}")
        else:  # the exact NaN encoding as well
            assert torch.equal(out.view(int_dtype), expected.view(int_dtype)), f"isa={isa}"


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_stats(grad_dtype):
    gen = torch.Generator().manual_seed(2)
    for n in (0, 1, 15, 16, 17, 16384, 16385, 300001):
        g = (torch.randn(n, generator=gen) * 3).to(grad_dtype)
        reference = g.double().square().sum().item()
        results = {(isa, t): kernels.grad_stats(g, threads=t, isa=isa) for isa in ISAS for t in (1, 2)}
        for key, stats in results.items():
            assert not stats.has_inf_or_nan
            assert math.isclose(stats.sum_sq, reference, rel_tol=1e-12, abs_tol=0.0), (n, key)
            # a fixed summation order: the same float64 for every ISA and thread count
            assert stats.sum_sq == results[(ISAS[0], 1)].sum_sq, (n, key)
    g = torch.zeros(50000, dtype=grad_dtype)
    assert kernels.grad_stats(g) == (0.0, False)
    for bad in (float("inf"), -float("inf"), float("nan")):
        for pos in (0, 7, 16, 40000, 49999):
            g.zero_()
            g[pos] = bad
            for isa in ISAS:
                assert kernels.grad_stats(g, isa=isa).has_inf_or_nan, (bad, pos, isa)
    assert kernels.grad_stats(torch.tensor([3.0, 4.0])).norm == 5.0


def test_fp16_overflow_is_detected_without_temporaries():
    g = torch.full((100003,), 60000.0, dtype=torch.float16)
    stats = kernels.grad_stats(g)
    assert not stats.has_inf_or_nan and stats.sum_sq == pytest.approx(100003 * 60000.0**2)
    g[-1] = float("inf")  # an fp16 overflow during backward
    assert kernels.grad_stats(g).has_inf_or_nan


def test_concurrent_callers_share_the_pool():
    n = 200003
    gen = torch.Generator().manual_seed(9)
    grads = [make_grad(n, gen) for _ in range(4)]
    p0 = make_param(n, gen)

    def run(results, idx):
        st = NativeAdam(p0, "auto", 2, False)
        for step, g in enumerate(grads, 1):
            st.step(g, step, weight_decay=0.01, decoupled=True)
        results[idx] = st.param

    results: list = [None] * 4
    workers = [threading.Thread(target=run, args=(results, i)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for r in results[1:]:
        assert_bits_equal(r, results[0], "concurrent")


def test_cpu_features():
    f = kernels.cpu_features()
    for key in ("avx2", "fma", "avx512f", "avx512bw", "avx512bf16", "avx512fp16", "chosen_isa"):
        assert key in f
    assert f["chosen_isa"] in f["available_isas"]
    assert "scalar" in f["available_isas"]
    assert f["threads"] >= 1


def test_bad_arguments_raise_config_error():
    p, g, m, v = torch.zeros(10), torch.zeros(10), torch.zeros(10), torch.zeros(10)
    cases = [
        lambda: kernels.adamw_step_(p, g, m, torch.zeros(11), step=1),
        lambda: kernels.adamw_step_(p, g.double(), m, v, step=1),
        lambda: kernels.adamw_step_(p.half(), g, m, v, step=1),
        lambda: kernels.adamw_step_(torch.zeros(20)[::2], g, m, v, step=1),
        lambda: kernels.adamw_step_(p, g, m, v, step=0),
        lambda: kernels.adamw_step_(p, g, m, m, step=1),
        lambda: kernels.adamw_step_(p, g, m, v, step=1, out=torch.zeros(10, dtype=torch.int32)),
        lambda: kernels.adamw_step_(p, g, m, v, step=1, isa="sse9"),
        lambda: kernels.adamw_step_(p, g, m, v, step=1, sqrt="fast"),
        lambda: kernels.adamw_step_(p, g, m, v, step=1, threads=-1),
        lambda: kernels.adam_step_(p, g, m, v, step=1, amsgrad=True),
        lambda: kernels.adamw_step_(p, "grad", m, v, step=1),
        lambda: kernels.sgd_step_(p, g, None, lr=0.1, momentum=0.9),
        lambda: kernels.sgd_step_(p, g, torch.zeros(10), lr=0.1, momentum=0.0, nesterov=True),
        lambda: kernels.grad_stats(torch.zeros(10, dtype=torch.int64)),
        lambda: native.adam_step(
            0, 0, 0, 0, 5, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0, step=1
        ),
        lambda: native.adam_step(
            p.data_ptr() + 1,
            g.data_ptr(),
            m.data_ptr(),
            v.data_ptr(),
            2,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0,
            step=1,
        ),  # fmt: skip
        lambda: native.grad_stats(g.data_ptr(), -1),
        lambda: native.grad_stats(g.data_ptr(), 10, "int8"),
    ]
    if "avx512" not in ISAS:
        cases.append(lambda: kernels.adamw_step_(p, g, m, v, step=1, isa="avx512"))
    for i, case in enumerate(cases):
        with pytest.raises(ConfigError):
            case()
            pytest.fail(f"case {i} did not raise")


def test_empty_tensors_are_a_no_op():
    e = torch.empty(0)
    kernels.adamw_step_(e, e.clone(), e.clone(), e.clone(), step=1)
    kernels.sgd_step_(e, e.clone(), e.clone(), lr=0.1, momentum=0.9)
    assert kernels.grad_stats(e) == (0.0, False)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_output_large_and_unaligned(out_dtype):
    """Large steps store the output non-temporally; an output at an odd offset is peeled first."""
    n = (4 << 20) // torch.empty(0, dtype=out_dtype).element_size() + 1001
    gen = torch.Generator().manual_seed(4)
    p0 = make_param(n, gen)
    for isa, threads in VARIANTS:
        for offset in (0, 3):
            backing = torch.empty(n + offset, dtype=out_dtype)
            out = backing[offset:]
            st = NativeAdam(p0, isa, threads, False)
            st.out = out
            st.step(make_grad(n, gen), 1, weight_decay=0.01, decoupled=True)
            assert_bits_equal(out, st.param.to(out_dtype), f"isa={isa} threads={threads} offset={offset}")
            buf = torch.empty(n)
            param = p0.clone()
            kernels.sgd_step_(param, make_grad(n, gen), buf, lr=0.1, momentum=0.9, first_step=True, out=out,
                              threads=threads, isa=isa)  # fmt: skip
            assert_bits_equal(out, param.to(out_dtype), f"sgd isa={isa} threads={threads} offset={offset}")
            src = torch.randn(n, generator=gen)
            kernels.convert_(src, out, threads=threads, isa=isa)
            assert_bits_equal(out, src.to(out_dtype), f"convert isa={isa} offset={offset}")


def test_isa_environment_override(monkeypatch):
    monkeypatch.setenv("TIERRT_CPU_ISA", "scalar")
    assert kernels.cpu_features()["chosen_isa"] == "scalar"
    monkeypatch.setenv("TIERRT_CPU_ISA", "sse9")
    with pytest.raises(ConfigError):
        kernels.grad_stats(torch.zeros(4))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_thread_pool_in_forked_child():
    g = torch.randn(200000)
    expected = kernels.grad_stats(g, threads=2)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child must build its own pool (the parent's workers do not exist here)
        ok = kernels.grad_stats(g, threads=2) == expected
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("n", [1, 17, 100003])
def test_out_of_place_steps_equal_in_place_and_leave_the_input(n):
    """param_in: the weights are read there and the result written to param, bitwise as in place."""
    gen = torch.Generator().manual_seed(11)
    p0 = make_param(n, gen)
    g = make_grad(n, gen)
    for isa, threads in VARIANTS:
        what = f"isa={isa} threads={threads}"
        # AdamW with a fused bf16 output and AMSGrad
        m0, v0 = torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 0.01
        expected = {"p": p0.clone(), "m": m0.clone(), "v": v0.clone(), "x": v0.clone()}
        out_e = torch.empty(n, dtype=torch.bfloat16)
        kernels.adamw_step_(expected["p"], g, expected["m"], expected["v"], step=3, lr=1e-2, amsgrad=True,
                            max_exp_avg_sq=expected["x"], out=out_e, threads=threads, isa=isa)  # fmt: skip
        source = p0.clone()
        param, m, v, x = torch.full((n,), 7.0), m0.clone(), v0.clone(), v0.clone()
        out = torch.empty(n, dtype=torch.bfloat16)
        kernels.adamw_step_(param, g, m, v, step=3, lr=1e-2, amsgrad=True, max_exp_avg_sq=x, out=out,
                            threads=threads, isa=isa, param_in=source)  # fmt: skip
        assert_bits_equal(param, expected["p"], what)
        assert_bits_equal(m, expected["m"], what)
        assert_bits_equal(x, expected["x"], what)
        assert_bits_equal(out, out_e, what)
        assert_bits_equal(source, p0, what + " (param_in changed)")
        # SGD with momentum and weight decay
        buf_e, buf = m0.clone(), m0.clone()
        p_e = p0.clone()
        kernels.sgd_step_(p_e, g, buf_e, lr=0.1, momentum=0.9, weight_decay=0.01, threads=threads, isa=isa)
        param = torch.empty(n)
        kernels.sgd_step_(param, g, buf, lr=0.1, momentum=0.9, weight_decay=0.01, threads=threads, isa=isa,
                          param_in=source)  # fmt: skip
        assert_bits_equal(param, p_e, "sgd " + what)
        assert_bits_equal(buf, buf_e, "sgd " + what)
        assert_bits_equal(source, p0, "sgd " + what + " (param_in changed)")
    # param_in == param is an in-place step
    p = p0.clone()
    kernels.sgd_step_(p, g, lr=0.1, param_in=p)
    assert_bits_equal(p, torch.add(p0, g, alpha=-0.1))


def test_out_of_place_step_refuses_overlapping_or_mismatched_input():
    p, g, m, v = (torch.zeros(64) for _ in range(4))
    with pytest.raises(ConfigError, match="param_in"):
        kernels.sgd_step_(p[:32], g[:32], lr=0.1, param_in=p[16:48])
    with pytest.raises(ConfigError, match="param_in"):
        kernels.adamw_step_(p, g, m, v, step=1, param_in=g)
    with pytest.raises(ConfigError, match="param_in"):
        kernels.sgd_step_(p, g, lr=0.1, param_in=torch.zeros(63))
    with pytest.raises(ConfigError, match="param_in"):
        kernels.sgd_step_(p, g, lr=0.1, param_in=torch.zeros(64, dtype=torch.float64))
