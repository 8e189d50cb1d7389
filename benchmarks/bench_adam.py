"""AdamW step over 100M fp32 elements: tierrt's native CPU kernel against torch and DeepSpeed.

Compares, in one run and on 1 and 2 threads:

* tierrt: ``tierrt.optim.kernels.adamw_step_`` (fp32 grads), without and with the fused bf16 weight
  output (written in the same pass);
* torch.optim.AdamW(foreach=True) and AdamW(fused=True) on the CPU;
* DeepSpeedCPUAdam (``DS_ACCELERATOR=cpu``; its ``cpu_adam`` op builds on first use), when deepspeed
  is installed and its op builds here (the table says why when it does not);

against the memory-bandwidth bound: bytes touched per element (read param, grad, exp_avg,
exp_avg_sq = 16 B; write param, exp_avg, exp_avg_sq = 12 B; +2 B for the bf16 copy) divided by the
measured bandwidth of the same access pattern without the arithmetic (``tierrt._native.memory_probe``:
p += g, m += g, v += g over the same n elements; the highest of it, a streaming in-place add
``a += b`` and ``copy_``, all measured in the same run).

Timings are medians over all timed calls after a warm-up; all methods update the same tensors and
take turns within every round, so that load from other processes spreads over all of them. Peak
memory: about 6 tensors of n fp32 values plus torch foreach's temporaries (about 3GiB at 100M).

Goals: >= 1.0x DeepSpeedCPUAdam, >= 80% of the bound, and the bf16 output no slower than without.

    python benchmarks/bench_adam.py            # 100M elements
    python benchmarks/bench_adam.py --quick    # 10M elements
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from tierrt import _native  # noqa: E402
from tierrt.optim import kernels  # noqa: E402
from tierrt.sizes import format_size  # noqa: E402

STEP_BYTES = 28  # per element: read p, g, m, v; write p, m, v (fp32)
BF16_OUT_BYTES = 2
NATIVE = "tierrt native"
NATIVE_BF16 = "tierrt native + bf16 weights out"
NATIVE_ONE_PASS = "tierrt native, one pass (ieee sqrt)"


def time_calls(fn: Callable[[], None], rounds: int) -> list[float]:
    """Seconds of each of `rounds` calls of fn, after one warm-up call."""
    fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


class NativeState:
    """tierrt's AdamW state over a shared param/grad."""

    def __init__(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        self.param, self.grad = param, grad
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.out = torch.empty(param.shape, dtype=torch.bfloat16)
        self.count = 0

    def step(self, threads: int, bf16_out: bool, sqrt: str = "torch") -> None:
        self.count += 1
        kernels.adamw_step_(
            self.param,
            self.grad,
            self.exp_avg,
            self.exp_avg_sq,
            step=self.count,
            lr=1e-3,
            weight_decay=0.01,
            out=self.out if bf16_out else None,
            threads=threads,
            sqrt=sqrt,  # type: ignore[arg-type]
        )


def measure_bandwidth(
    state: NativeState, zeros: torch.Tensor, threads: list[int], rounds: int
) -> dict[int, dict[str, float]]:
    """Bytes per second (read + written) of the step's access pattern without arithmetic, of a
    streaming in-place add and of copy_."""
    n = state.param.numel()
    a, b = state.exp_avg, zeros  # a += 0 leaves the state as it is
    half = n // 2
    src, dst = zeros[half : 2 * half], zeros[:half]
    result: dict[int, dict[str, float]] = {}
    for t in threads:
        torch.set_num_threads(t)

        def probe(t: int = t) -> None:
            _native.memory_probe(
                state.param.data_ptr(),
                zeros.data_ptr(),
                state.exp_avg.data_ptr(),
                state.exp_avg_sq.data_ptr(),
                n,
                threads=t,
            )

        step_like = statistics.median(time_calls(probe, rounds))
        add = statistics.median(time_calls(lambda: a.add_(b), rounds))
        copy = statistics.median(time_calls(lambda: dst.copy_(src), rounds))
        result[t] = {"probe": STEP_BYTES * n / step_like, "add": 12 * n / add, "copy": 8 * half / copy}
    return result


def deepspeed_adam(params: list[torch.nn.Parameter]) -> tuple[torch.optim.Optimizer | None, str]:
    """A DeepSpeedCPUAdam over params, or None and the reason it is unavailable."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as err:  # noqa: BLE001 - any import failure means "not available here"
        return None, f"deepspeed is not importable ({type(err).__name__}: {err})"
    try:
        opt = DeepSpeedCPUAdam(
            params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, adamw_mode=True
        )
        return opt, ""
    except Exception as err:  # noqa: BLE001 - the JIT build of its op failed
        return None, f"DeepSpeedCPUAdam's cpu_adam op did not build ({type(err).__name__}: {err})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10M elements instead of 100M")
    parser.add_argument("--n", type=float, default=None, help="number of elements (overrides --quick)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per pass and thread count")
    parser.add_argument("--passes", type=int, default=2, help="passes (bandwidth, then rounds; default 2)")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeedCPUAdam")
    args = parser.parse_args(argv)

    n = int(args.n) if args.n else (10_000_000 if args.quick else 100_000_000)
    thread_counts = [int(t) for t in args.threads.split(",")]
    rounds = args.rounds or (10 if args.quick else 5)
    features = kernels.cpu_features()
    print(
        f"AdamW step over {n:,} fp32 elements ({format_size(n * 4)} per tensor); torch {torch.__version__}; "
        f"tierrt ISA {features['chosen_isa']}, torch's sqrt rounding {kernels.torch_sqrt_kind()}; "
        f"{features['threads']} CPUs"
    )

    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(n, generator=gen))
    param.grad = torch.randn(n, generator=gen) * 1e-3
    native = NativeState(param.data, param.grad)
    zeros = torch.zeros(n)

    # Every method updates the same param, exp_avg and exp_avg_sq (each optimizer's state is
    # pre-populated with them), so that all can stay alive and take turns in every round.
    def shared_state(step: object) -> dict[str, object]:
        return {"step": step, "exp_avg": native.exp_avg, "exp_avg_sq": native.exp_avg_sq}

    optimizers: dict[str, torch.optim.Optimizer] = {}
    for name, fused in (("torch AdamW(foreach=True)", False), ("torch AdamW(fused=True)", True)):
        opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01, foreach=not fused, fused=fused or None)
        opt.state[param] = shared_state(torch.tensor(0.0))
        optimizers[name] = opt
    ds_note = "skipped (--no-deepspeed)"
    if not args.no_deepspeed:
        ds_opt, ds_note = deepspeed_adam([param])
        if ds_opt is not None:
            ds_opt.state[param] = shared_state(0)
            optimizers["DeepSpeedCPUAdam"] = ds_opt

    # The methods take turns within every round, so that load from other processes (and any drift)
    # spreads over all of them; each method's first call in a round series is a warm-up.
    methods: dict[str, Callable[[int], None]] = {
        NATIVE: lambda t: native.step(t, False),
        NATIVE_BF16: lambda t: native.step(t, True),
    }
    if kernels.torch_sqrt_kind() == "halves":
        # What the two halves around torch's sqrt cost: the one-pass step with the correctly rounded
        # sqrt (not torch's bits on this CPU; for comparison only).
        methods[NATIVE_ONE_PASS] = lambda t: native.step(t, False, "ieee")
    for name, opt in optimizers.items():
        methods[name] = lambda t, opt=opt: opt.step()
    samples: dict[tuple[str, int], list[float]] = defaultdict(list)
    bandwidth: dict[int, dict[str, list[float]]] = {t: defaultdict(list) for t in thread_counts}
    for _ in range(args.passes):
        for t, values in measure_bandwidth(native, zeros, thread_counts, max(3, rounds // 2)).items():
            for kind, value in values.items():
                bandwidth[t][kind].append(value)
        for t in thread_counts:
            torch.set_num_threads(t)
            for fn in methods.values():
                fn(t)  # warm-up
            for _ in range(rounds):
                for name, fn in methods.items():
                    start = time.perf_counter()
                    fn(t)
                    samples[(name, t)].append(time.perf_counter() - start)
    seconds = {key: statistics.median(values) for key, values in samples.items()}
    best_bw = {t: max(statistics.median(v) for v in bandwidth[t].values()) for t in thread_counts}
    print()
    for t in thread_counts:
        probe, add, copy = (statistics.median(bandwidth[t][k]) / 1e9 for k in ("probe", "add", "copy"))
        bound = STEP_BYTES * n / best_bw[t] * 1e3
        bound_bf16 = (STEP_BYTES + BF16_OUT_BYTES) * n / best_bw[t] * 1e3
        print(
            f"measured bandwidth, {t} thread(s): step's pattern without arithmetic {probe:.1f} GB/s, "
            f"in-place add {add:.1f} GB/s, copy_ {copy:.1f} GB/s -> bound {bound:.1f} ms/step "
            f"({STEP_BYTES} B/element), {bound_bf16:.1f} ms with bf16 out"
        )
    if "DeepSpeedCPUAdam" not in optimizers:
        print(f"DeepSpeedCPUAdam: not measured: {ds_note}")
    print()

    header = (
        f"{'method':34s} {'thr':>3s} {'ms/step':>8s} {'GB/s':>6s} {'% bound':>7s} "
        f"{'vs DS':>6s} {'vs fused':>8s} {'vs foreach':>10s}"
    )
    print(header)
    print("-" * len(header))
    for (name, t), secs in seconds.items():
        nbytes = STEP_BYTES + (BF16_OUT_BYTES if name == NATIVE_BF16 else 0)
        bound = nbytes * n / best_bw[t]
        ratios = []
        for base in ("DeepSpeedCPUAdam", "torch AdamW(fused=True)", "torch AdamW(foreach=True)"):
            other = seconds.get((base, t))
            ratios.append(f"{other / secs:.2f}x" if other else "-")
        print(
            f"{name:34s} {t:3d} {secs * 1e3:8.1f} {nbytes * n / secs / 1e9:6.1f} "
            f"{bound / secs * 100:6.0f}% {ratios[0]:>6s} {ratios[1]:>8s} {ratios[2]:>10s}"
        )
    print()
    print("GB/s: bytes the step must move / time; ratios: other method's time / this one's (> 1: faster)")
    print("goals for tierrt native: >= 1.00x DeepSpeedCPUAdam, >= 80% of the bound, bf16 out no slower")
    for t in thread_counts:
        ours, ours_bf16 = seconds[(NATIVE, t)], seconds[(NATIVE_BF16, t)]
        verdicts = [f"{STEP_BYTES * n / best_bw[t] / ours * 100:.0f}% of bound"]
        ds = seconds.get(("DeepSpeedCPUAdam", t))
        if ds is not None:
            verdicts.append(f"{ds / ours:.2f}x DeepSpeedCPUAdam")
        verdicts.append(f"bf16 out costs {(ours_bf16 / ours - 1) * 100:+.0f}%")
        print(f"  {t} thread(s): " + ", ".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
