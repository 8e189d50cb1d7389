"""Native CPU optimizer steps over torch tensors: Adam / AdamW / SGD, gradient statistics.

Each step is one streaming, multi-threaded, vectorised pass (AVX-512 or AVX2 chosen at run time)
over fp32 master weights and fp32 optimizer state, with the gradient in fp32, bf16 or fp16, an
optional gradient multiplier, and an optional fused write of the updated weights in bf16 / fp16 /
fp32 into a separate buffer (the parameter's compute-dtype home).

The results are **bitwise equal** to ``torch.optim.Adam`` / ``AdamW`` / ``SGD`` as a user constructs
them on the CPU (``foreach=None, fused=None``: the single-tensor path), given the same fp32 gradient:
every element goes through the same fp32 operations, fused multiply-adds and roundings as ATen's
kernels. One of those operations, ``exp_avg_sq.sqrt()``, rounds differently depending on how torch
was built and on the CPU (torch with MKL on an AVX-512 CPU calls MKL's ``vmsSqrt``, which is not
correctly rounded); :func:`torch_sqrt_kind` detects which rounding the running torch uses, once,
and the Adam steps use it by default (``sqrt="torch"``). Should torch's sqrt match neither known
rounding (MKL's code for other CPUs, AMD's EPYC for one, or a future MKL), the step runs in two
native halves around torch's own ``sqrt``, chunk by chunk while the chunk is in cache: still bitwise
torch's result, for one more pass over the second moments. The fused multiply-adds are those of
torch's AVX2 / AVX-512 CPU kernels (its default on any x86-64 CPU with AVX2); under
``ATEN_CPU_CAPABILITY=default`` torch rounds without them, and a warning says so.

Scope: ``amsgrad``, ``maximize``, decoupled (AdamW) and L2 (Adam) weight decay, SGD momentum,
dampening, Nesterov and weight decay are supported. Not supported: tensor-valued hyper-parameters
with ``capturable``/``differentiable``, complex parameters, and torch's ``fused=True`` CPU kernels
(their arithmetic differs from the single-tensor path and depends on torch's thread count).

Example::

    import torch
    from tierrt.optim import kernels

    p = torch.randn(1000)
    g = torch.randn(1000)
    m, v = torch.zeros(1000), torch.zeros(1000)
    bf16 = torch.empty(1000, dtype=torch.bfloat16)
    kernels.adamw_step_(p, g, m, v, lr=1e-3, weight_decay=0.01, step=1, out=bf16)
    assert torch.equal(bf16, p.to(torch.bfloat16))

The memory is passed to the native layer as addresses: every tensor must be a contiguous CPU tensor,
and the call does not track autograd (run it under ``torch.no_grad()`` as optimizers do); the
version counters of the tensors written are bumped, as an in-place torch op would.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal, NamedTuple

import torch

from .. import _native
from ..errors import ConfigError

__all__ = [
    "OUT_DTYPES",
    "GradStats",
    "adam_step_",
    "adamw_step_",
    "convert_",
    "cpu_features",
    "grad_stats",
    "sgd_step_",
    "sqrt_",
    "torch_sqrt_kind",
]

logger = logging.getLogger("tierrt.optim.kernels")

Isa = Literal["auto", "avx512", "avx2", "scalar"]
SqrtKind = Literal["torch", "ieee", "rsqrt14", "halves"]

_GRAD_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_OUT_DTYPES = _GRAD_DTYPES
OUT_DTYPES = frozenset(_OUT_DTYPES)  # the dtypes a kernel writes the computing weights in


class GradStats(NamedTuple):
    """Result of :func:`grad_stats`: the float64 sum of squares and whether any value is inf/NaN."""

    sum_sq: float
    has_inf_or_nan: bool

    @property
    def norm(self) -> float:
        """The L2 norm, ``sqrt(sum_sq)``."""
        return self.sum_sq**0.5


def cpu_features() -> dict[str, Any]:
    """The CPU's vector features and the kernels' instruction-set choice.

    >>> sorted(cpu_features())[:3]
    ['available_isas', 'avx2', 'avx512bf16']
    """
    return dict(_native.cpu_features())


def _check_tensor(name: str, t: Any, dtypes: dict[torch.dtype, str] | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor, got {type(t).__name__}.", argument=name)
    if t.device.type != "cpu":
        raise ConfigError(f"{name} must be a CPU tensor, got one on {t.device}.", argument=name)
    if t.layout != torch.strided:
        raise ConfigError(f"{name} must be a dense (strided) tensor, got layout {t.layout}.", argument=name)
    if not t.is_contiguous():
        raise ConfigError(
            f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
            "call .contiguous() or keep optimizer state in flat buffers.",
            argument=name,
        )
    allowed = dtypes if dtypes is not None else {torch.float32: "float32"}
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ConfigError(
            f"{name} has dtype {str(t.dtype).removeprefix('torch.')}; expected {names}.",
            argument=name,
            dtype=str(t.dtype),
        )
    return t


def _check_same_numel(n: int, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.numel() != n:
            raise ConfigError(
                f"{name} has {t.numel()} elements but param has {n}; every tensor of a step must "
                "have the same number of elements.",
                argument=name,
            )


def _check_no_overlap(**tensors: torch.Tensor | None) -> None:
    spans = [
        (name, t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for name, t in tensors.items()
        if t is not None and t.numel() > 0
    ]
    for i, (name_a, lo_a, hi_a) in enumerate(spans):
        for name_b, lo_b, hi_b in spans[i + 1 :]:
            if lo_a < hi_b and lo_b < hi_a:
                raise ConfigError(
                    f"{name_a} and {name_b} share memory; the step reads and writes them in place, so "
                    "they must be distinct buffers.",
                    argument=name_b,
                )


def _scalar(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ConfigError(f"{name} must be a number or a one-element tensor.", argument=name)
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}.", argument=name) from None


def _step(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f"step must be an integer >= 1 (the step count including this step, as torch's "
            f"state['step'] after its increment), got {value!r}.",
            argument="step",
        )
    return value


def _bump_versions(*tensors: torch.Tensor | None) -> None:
    written = [t for t in tensors if t is not None]
    if written:
        torch.autograd.graph.increment_version(written)


def _param_source(param: torch.Tensor, param_in: torch.Tensor | None, **others: torch.Tensor | None) -> int:
    """The address the step reads the weights from when it differs from ``param`` (else 0)."""
    if param_in is None:
        return 0
    _check_tensor("param_in", param_in)
    _check_same_numel(param.numel(), param_in=param_in)
    if param_in.data_ptr() == param.data_ptr():
        return 0  # in place
    _check_no_overlap(param=param, param_in=param_in, **others)
    return param_in.data_ptr()


@functools.cache
def torch_sqrt_kind() -> Literal["ieee", "rsqrt14", "halves"]:
    """How the running torch rounds fp32 ``Tensor.sqrt()``: ``"ieee"``, ``"rsqrt14"`` or ``"halves"``.

    ``"ieee"`` is the correctly rounded square root (torch without MKL, or MKL on a CPU without
    AVX-512); ``"rsqrt14"`` is MKL's AVX-512 ``vmsSqrt`` rounding on Intel CPUs (one ulp low for
    about 0.6% of inputs). Detected once, by comparing torch's sqrt with each on 65536 probe values.
    ``"halves"``: neither matches (MKL's code for AMD CPUs is within 0.75 ulp and rounds a fifth of
    its results the other way); the Adam steps then run in two native halves around torch's own
    sqrt (see :func:`adam_step_`), which gives torch's rounding whatever it is.

    >>> torch_sqrt_kind() in ("ieee", "rsqrt14", "halves")
    True
    """
    gen = torch.Generator().manual_seed(12345)
    probe = torch.cat(
        [
            torch.rand(65536, generator=gen) * 3 + 1,
            torch.rand(1024, generator=gen) * 2.0**-110,  # below the small-input threshold
            torch.tensor([0.0, -0.0, float("inf"), 2.0**-149, 3.4e38]),
        ]
    )
    reference = probe.sqrt().view(torch.int32)
    kinds = ["ieee"]
    features = cpu_features()
    if features["avx512f"] and features["avx512vl"]:
        kinds.append("rsqrt14")
    for kind in kinds:
        ours = torch.empty_like(probe)
        _native.sqrt_f32(probe.data_ptr(), ours.data_ptr(), probe.numel(), sqrt=kind)
        if torch.equal(ours.view(torch.int32), reference):
            return kind  # type: ignore[return-value]
    logger.info(
        "torch's fp32 sqrt (torch %s) matches none of the roundings tierrt computes natively; the "
        "native Adam steps run in two halves around torch's own sqrt (bitwise torch's result, one more "
        "pass over the second moments).",
        torch.__version__,
    )
    return "halves"


@functools.cache
def _check_torch_capability() -> None:
    """Warns (once) when torch's CPU kernels run without FMA, which the kernels' arithmetic follows."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        logger.warning(
            "torch runs its CPU kernels with capability %s; its optimizers' lerp/addcmul/add then round "
            "without fused multiply-adds, so the native steps (which follow torch's AVX2/AVX-512 kernels) "
            "differ from torch.optim in the last bits.",
            capability,
        )


def _sqrt_kind(sqrt: str) -> str:
    _check_torch_capability()
    if sqrt == "torch":
        return torch_sqrt_kind()
    if sqrt not in ("ieee", "rsqrt14", "halves"):
        raise ConfigError(
            f"sqrt must be 'torch', 'ieee', 'rsqrt14' or 'halves', got {sqrt!r}.", argument="sqrt"
        )
    return sqrt


def adam_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    amsgrad: bool = False,
    max_exp_avg_sq: torch.Tensor | None = None,
    maximize: bool = False,
    grad_scale: float = 1.0,
    out: torch.Tensor | None = None,
    threads: int = 0,
    isa: Isa = "auto",
    sqrt: SqrtKind = "torch",
    param_in: torch.Tensor | None = None,
) -> None:
    """One Adam step in place (``decoupled=True``: AdamW), bitwise equal to torch.optim.Adam.

    Args:
        param, exp_avg, exp_avg_sq: contiguous float32 CPU tensors of the same numel (master
            weights, first and second moments), updated in place.
        grad: contiguous float32 / bfloat16 / float16 tensor of the same numel; read only.
        step: this step's count, starting at 1 (torch's ``state["step"]`` after its increment).
        lr, betas, eps, weight_decay, maximize: as torch.optim.Adam(W).
        decoupled: AdamW's decoupled weight decay (``param *= 1 - lr*wd``) instead of Adam's L2 term
            (``grad += wd*param``).
        amsgrad, max_exp_avg_sq: AMSGrad and its running maximum (float32, zeros initially).
        grad_scale: the gradient is first multiplied by ``fp32(grad_scale)``; equal to torch's
            ``grad.mul_(grad_scale)`` on an fp32 gradient (e.g. 1/loss_scale or a clip coefficient).
        out: optional float32 / bfloat16 / float16 tensor receiving the updated weights in the same
            pass, with the bits of ``param.to(out.dtype)``.
        threads: 0 uses every CPU this process may run on.
        isa: "auto" (best available; env TIERRT_CPU_ISA overrides), "avx512", "avx2" or "scalar".
        sqrt: rounding of ``exp_avg_sq.sqrt()``: "torch" (the running torch's, detected), "ieee",
            "rsqrt14", or "halves" (two native passes around torch's own sqrt: torch's rounding,
            whatever it is; what "torch" picks when torch's matches neither native one).
        param_in: an out-of-place step: the weights are read from ``param_in`` (float32, same
            numel, left unchanged) and the updated weights written to ``param``, in the same single
            pass (no copy of the weights first). ``param_in`` is ``param`` or overlaps nothing.

    Raises:
        ConfigError: a tensor that is not a contiguous CPU tensor of an accepted dtype, numels that
            differ, buffers that overlap, step < 1, an ISA this CPU lacks.

    Example::

        adam_step_(p, g, m, v, step=1, lr=1e-3, weight_decay=0.0)
    """
    _check_tensor("param", param)
    _check_tensor("grad", grad, _GRAD_DTYPES)
    _check_tensor("exp_avg", exp_avg)
    _check_tensor("exp_avg_sq", exp_avg_sq)
    if amsgrad and max_exp_avg_sq is None:
        raise ConfigError("amsgrad=True needs max_exp_avg_sq (a float32 buffer, zeros initially).")
    if not amsgrad and max_exp_avg_sq is not None:
        raise ConfigError("max_exp_avg_sq was given but amsgrad is False.", argument="max_exp_avg_sq")
    if max_exp_avg_sq is not None:
        _check_tensor("max_exp_avg_sq", max_exp_avg_sq)
    if out is not None:
        _check_tensor("out", out, _OUT_DTYPES)
    n = param.numel()
    _check_same_numel(
        n, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, max_exp_avg_sq=max_exp_avg_sq, out=out
    )
    _check_no_overlap(
        param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, max_exp_avg_sq=max_exp_avg_sq, out=out
    )
    source = _param_source(
        param,
        param_in,
        grad=grad,
        exp_avg=exp_avg,
        exp_avg_sq=exp_avg_sq,
        max_exp_avg_sq=max_exp_avg_sq,
        out=out,
    )
    if len(betas) != 2:
        raise ConfigError(f"betas must be a pair (beta1, beta2), got {betas!r}.", argument="betas")
    scalars = {
        "lr": _scalar("lr", lr),
        "beta1": _scalar("beta1", betas[0]),
        "beta2": _scalar("beta2", betas[1]),
        "eps": _scalar("eps", eps),
        "weight_decay": _scalar("weight_decay", weight_decay),
        "step": _step(step),
        "decoupled": bool(decoupled),
        "maximize": bool(maximize),
        "grad_dtype": _GRAD_DTYPES[grad.dtype],
        "grad_scale": _scalar("grad_scale", grad_scale),
        "out_dtype": _OUT_DTYPES[out.dtype] if out is not None else "bfloat16",
        "threads": int(threads),
        "isa": isa,
    }
    kind = _sqrt_kind(sqrt)
    if kind == "halves":
        _adam_in_halves(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, out, source, scalars)
    else:
        _native.adam_step(
            param.data_ptr(),
            grad.data_ptr(),
            exp_avg.data_ptr(),
            exp_avg_sq.data_ptr(),
            n,
            amsgrad_max=max_exp_avg_sq.data_ptr() if max_exp_avg_sq is not None else 0,
            out=out.data_ptr() if out is not None else 0,
            sqrt=kind,
            param_in=source,
            **scalars,
        )
    _bump_versions(param, exp_avg, exp_avg_sq, max_exp_avg_sq, out)


#: Elements per chunk of a step run in halves: its arrays stay in the caches between the halves
#: (1MiB per array: 256Ki elements measured fastest on an AMD EPYC, 1 and 2 threads, against 64Ki to
#: 1Mi: 15% faster than 1Mi).
HALVES_CHUNK = 1 << 18


def _adam_in_halves(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    out: torch.Tensor | None,
    source: int,
    scalars: dict[str, Any],
) -> None:
    """One Adam step as two native halves around torch's own ``sqrt``, chunk by chunk: the first
    half updates the moments, torch takes the square roots of the (maximum) second moments, the
    second half applies them to the weights. Bitwise the fused step with torch's rounding of sqrt,
    whatever that rounding is (see :func:`torch_sqrt_kind`)."""
    n = param.numel()
    roots = torch.empty(min(n, HALVES_CHUNK), dtype=torch.float32)
    second = (max_exp_avg_sq if max_exp_avg_sq is not None else exp_avg_sq).view(-1)
    grad_size, out_size = grad.element_size(), out.element_size() if out is not None else 0
    p, g, m, v = param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr()
    vmax = max_exp_avg_sq.data_ptr() if max_exp_avg_sq is not None else 0
    o = out.data_ptr() if out is not None else 0
    for start in range(0, n, HALVES_CHUNK):
        k = min(HALVES_CHUNK, n - start)
        f32, g_at = 4 * start, g + grad_size * start
        p_in = source + f32 if source else 0
        _native.adam_step(
            p + f32, g_at, m + f32, v + f32, k, amsgrad_max=vmax + f32 if vmax else 0, out=0,
            sqrt="moments", param_in=p_in, **scalars,
        )  # fmt: skip
        torch.sqrt(second[start : start + k], out=roots[:k])
        _native.adam_step(
            p + f32, g_at, m + f32, roots.data_ptr(), k, amsgrad_max=0, out=o + out_size * start if o else 0,
            sqrt="given", param_in=p_in, **scalars,
        )  # fmt: skip


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    **kwargs: Any,
) -> None:
    """One AdamW step in place, bitwise equal to torch.optim.AdamW (defaults as torch's).

    Same arguments as :func:`adam_step_` (with ``decoupled=True``).

    Example::

        adamw_step_(p, g, m, v, step=3, lr=1e-4, weight_decay=0.1, out=p_bf16)
    """
    if "decoupled" in kwargs:
        raise ConfigError("adamw_step_ always uses decoupled weight decay; use adam_step_ to choose.")
    adam_step_(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        step=step,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        decoupled=True,
        **kwargs,
    )


def sgd_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None = None,
    *,
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    first_step: bool = False,
    grad_scale: float = 1.0,
    out: torch.Tensor | None = None,
    threads: int = 0,
    isa: Isa = "auto",
    param_in: torch.Tensor | None = None,
) -> None:
    """One SGD step in place, bitwise equal to torch.optim.SGD.

    ``momentum_buffer`` (float32, needed when ``momentum != 0``) plays torch's
    ``state["momentum_buffer"]``: on the ``first_step`` (torch's buffer is still None) it is set to the
    gradient (after weight decay), afterwards it is updated. Other arguments as :func:`adam_step_`.

    Example::

        buf = torch.empty_like(p)
        sgd_step_(p, g, buf, lr=0.1, momentum=0.9, first_step=True)
        sgd_step_(p, g, buf, lr=0.1, momentum=0.9)
        sgd_step_(new_p, g, lr=0.1, param_in=p)  # out of place: p is left as it was
    """
    _check_tensor("param", param)
    _check_tensor("grad", grad, _GRAD_DTYPES)
    momentum = _scalar("momentum", momentum)
    dampening = _scalar("dampening", dampening)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ConfigError(
            "Nesterov momentum requires a momentum > 0 and zero dampening (as torch.optim.SGD)."
        )
    if momentum != 0:
        if momentum_buffer is None:
            raise ConfigError("momentum != 0 needs a momentum_buffer (float32, same numel as param).")
        _check_tensor("momentum_buffer", momentum_buffer)
    else:
        momentum_buffer = None
    if out is not None:
        _check_tensor("out", out, _OUT_DTYPES)
    n = param.numel()
    _check_same_numel(n, grad=grad, momentum_buffer=momentum_buffer, out=out)
    _check_no_overlap(param=param, grad=grad, momentum_buffer=momentum_buffer, out=out)
    source = _param_source(param, param_in, grad=grad, momentum_buffer=momentum_buffer, out=out)
    _native.sgd_step(
        param.data_ptr(),
        grad.data_ptr(),
        momentum_buffer.data_ptr() if momentum_buffer is not None else 0,
        n,
        lr=_scalar("lr", lr),
        momentum=momentum,
        dampening=dampening,
        nesterov=bool(nesterov),
        weight_decay=_scalar("weight_decay", weight_decay),
        maximize=bool(maximize),
        first_step=bool(first_step),
        grad_dtype=_GRAD_DTYPES[grad.dtype],
        grad_scale=_scalar("grad_scale", grad_scale),
        out=out.data_ptr() if out is not None else 0,
        out_dtype=_OUT_DTYPES[out.dtype] if out is not None else "bfloat16",
        threads=int(threads),
        isa=isa,
        param_in=source,
    )
    _bump_versions(param, momentum_buffer, out)


def grad_stats(grad: torch.Tensor, *, threads: int = 0, isa: Isa = "auto") -> GradStats:
    """Sum of squares (float64) of a gradient and whether it holds an inf or NaN, in one pass.

    For global-norm clipping accumulated block by block as gradients arrive (add the ``sum_sq`` of
    every block, then take the square root) and for fp16 overflow checks; no temporaries. The sum
    is accumulated in a fixed order (each 16384-element block in 16 float64 lanes, lanes combined
    pairwise, blocks added in order), so it is the same for every thread count and instruction set;
    it is not bitwise equal to ``torch.linalg.vector_norm``.

    >>> grad_stats(torch.tensor([3.0, 4.0]))
    GradStats(sum_sq=25.0, has_inf_or_nan=False)
    """
    _check_tensor("grad", grad, _GRAD_DTYPES)
    sum_sq, bad = _native.grad_stats(
        grad.data_ptr(), grad.numel(), _GRAD_DTYPES[grad.dtype], threads=int(threads), isa=isa
    )
    return GradStats(float(sum_sq), bool(bad))


def convert_(src: torch.Tensor, out: torch.Tensor, *, threads: int = 0, isa: Isa = "auto") -> None:
    """Writes float32 ``src`` into ``out`` (float32 / bfloat16 / float16) with ``src.to(out.dtype)``'s bits.

    The rounding of the steps' fused output, on its own (e.g. to refresh a compute copy).

    >>> out = torch.empty(2, dtype=torch.bfloat16); convert_(torch.tensor([1.0, 2.5]), out); out
    tensor([1.0000, 2.5000], dtype=torch.bfloat16)
    """
    _check_tensor("src", src)
    _check_tensor("out", out, _OUT_DTYPES)
    _check_same_numel(src.numel(), out=out)
    _check_no_overlap(src=src, out=out)
    _native.convert_from_f32(
        src.data_ptr(),
        out.data_ptr(),
        src.numel(),
        dtype=_OUT_DTYPES[out.dtype],
        threads=int(threads),
        isa=isa,
    )
    _bump_versions(out)


def sqrt_(
    src: torch.Tensor, out: torch.Tensor, *, sqrt: SqrtKind = "torch", threads: int = 0, isa: Isa = "auto"
) -> None:
    """Square roots of float32 ``src`` into ``out`` with the given rounding (see :func:`torch_sqrt_kind`).

    >>> out = torch.empty(1); sqrt_(torch.tensor([4.0]), out); out
    tensor([2.])
    """
    _check_tensor("src", src)
    _check_tensor("out", out)
    _check_same_numel(src.numel(), out=out)
    if src.data_ptr() != out.data_ptr():
        _check_no_overlap(src=src, out=out)
    kind = _sqrt_kind(sqrt)
    if kind == "halves":  # torch's own rounding, computed by torch
        torch.sqrt(src.view(-1), out=out.view(-1))
    else:
        n = src.numel()
        _native.sqrt_f32(src.data_ptr(), out.data_ptr(), n, sqrt=kind, threads=int(threads), isa=isa)
    _bump_versions(out)
