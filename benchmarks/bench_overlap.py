"""Optimizer updates overlapped with backward (``overlap_backward=True``, the default) against the
same run updating every block in ``step()`` (``overlap_backward=False``), at several DRAM budgets,
with the plain in-RAM step as the reference, all in one process.

With the CPU computing, an update run during backward competes with it for the cores: it pays off
when it hides the block's NVMe I/O (state streamed from disk), and costs when that I/O is cheap
(state mostly in DRAM or the page cache). This prints where each side wins on this machine.

    python benchmarks/bench_overlap.py                  # Llama 6x512, AdamW, budgets 1x/2.5x/4x
    python benchmarks/bench_overlap.py --budgets 1,4 --steps 6
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from bench_overhead import build

import tierrt


def step_times(
    model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, steps: int, sync
) -> list:
    """Seconds per training step (forward, backward, AdamW), each step's updates finished."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        sync()
        times.append(time.perf_counter() - start)
    return times


def offloaded(model, factor: float, overlap: bool, ids, steps: int) -> tuple[float, int, int]:
    """Median step time through tierrt with a DRAM budget of ``factor`` times the weights, and the
    block updates that ran during backward out of all, over the timed steps."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with tempfile.TemporaryDirectory(prefix="tierrt-bench-overlap-") as swap:
        tiers = [tierrt.dram(int(factor * weights)), tierrt.nvme(swap)]
        with tierrt.offload(model, tiers=tiers, optimizer=opt, overlap_backward=overlap) as rt:
            step_times(model, opt, ids, 2, rt.synchronize)  # traces the order, learns the loop
            before = rt.report().total
            times = step_times(model, opt, ids, steps, rt.synchronize)
            after = rt.report().total
    in_backward = after.block_updates_in_backward - before.block_updates_in_backward
    return statistics.median(times), in_backward, after.block_updates - before.block_updates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--budgets", default="1,2.5,4", help="DRAM budgets as multiples of the weights")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (the median counts)")
    args = parser.parse_args()
    factors = [float(f) for f in args.budgets.split(",")]
    ids = torch.randint(0, 2048, (1, args.tokens), generator=torch.Generator().manual_seed(1))

    plain_model = build(args.layers, args.hidden)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-4)
    step_times(plain_model, plain_opt, ids, 2, lambda: None)
    plain = statistics.median(step_times(plain_model, plain_opt, ids, args.steps, lambda: None))
    weights = sum(p.numel() * p.element_size() for p in plain_model.parameters())
    del plain_model, plain_opt
    print(
        f"Llama {args.layers}x{args.hidden} ({weights / 2**20:.0f} MiB of fp32 weights), AdamW, "
        f"{args.tokens} tokens; torch threads {torch.get_num_threads()}; "
        f"plain in RAM {plain * 1e3:.1f} ms/step"
    )
    print(
        f"{'DRAM budget':>12} {'overlap':>9} {'ms/step':>9} {'vs plain':>9} {'in backward':>12} {'off/on':>7}"
    )
    for factor in factors:
        results = {}
        for overlap in (False, True):
            model = build(args.layers, args.hidden)
            results[overlap] = offloaded(model, factor, overlap, ids, args.steps)
            median, in_backward, total = results[overlap]
            print(
                f"{factor:>11.1f}x {'on' if overlap else 'off':>9} {median * 1e3:>9.1f} "
                f"{median / plain:>8.2f}x "
                f"{in_backward:>5} of {total:<4}"
                + (f" {results[False][0] / median:>6.2f}x" if overlap else "")
            )
    print("off/on > 1: overlapping updates with backward is faster at that budget")


if __name__ == "__main__":
    main()
