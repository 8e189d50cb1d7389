"""Torch's own optimizer stepped through tierrt with its state in the tiers: fused AdamW, as a
transformers ``Trainer`` builds it by default (``optim="adamw_torch_fused"``).

Baseline: the same Llama-shaped model trained plainly in RAM with the same fused AdamW, in the same
run. Variants, each in a fresh subprocess so that peak RSS is its own:

- ``plain``: the whole model, its gradients and the fused AdamW state in process memory;
- ``tierrt-torch``: ``AdamW(fused=True)`` passed to ``tierrt.offload()``: torch's fused step runs
  block by block, the ``exp_avg`` / ``exp_avg_sq`` tensors homed on NVMe with the weights, under a
  DRAM budget of ``--budget-fraction`` of the weights (default half: an eighth of the training
  state of weights, gradients and two AdamW states);
- ``tierrt-native``: ``AdamW()`` (no ``fused``), the same tiers: tierrt's SIMD kernel, for
  comparison.

Printed per variant: median step time over ``--steps`` steps after one warm-up step, peak RSS while
building the model and training (read before the ``with``-block is left: leaving gives the model
and the optimizer state back to process memory, by design) above the process's baseline (torch
imported, model not built), and for tierrt the bytes of optimizer state written to NVMe; then the
ratios against ``plain``. Losses are printed too: all three variants
train the same numbers (the tests check that bit for bit).

``--optimizer lion`` runs the same comparison for an optimizer class tierrt's table does not know:
Lion as third-party packages write it (``tests/optimizers.py``). tierrt learns from a probe of its
step that it keeps one ``exp_avg`` per parameter and homes it in the tiers; ``tierrt-native`` does
not apply.

Run: ``python benchmarks/bench_torch_optim.py [--optimizer lion]`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("plain", "tierrt-torch", "tierrt-native")
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def make_optimizer(name: str, variant: str, params) -> object:
    """The optimizer a variant trains with: fused AdamW (tierrt-native: AdamW on tierrt's kernel),
    or the third-party-style Lion."""
    import torch

    if name == "lion":
        sys.path.insert(0, TESTS)
        from optimizers import Lion

        return Lion(params, lr=1e-4, weight_decay=0.1)
    return torch.optim.AdamW(params, lr=1e-4, fused=variant != "tierrt-native")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(variant: str, args: argparse.Namespace) -> dict:
    """One variant, in this (fresh) process; returns its figures."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tierrt

    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS counts from here
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = make_optimizer(args.optimizer, variant, model.parameters())
    ids = torch.randint(0, 2048, (1, args.tokens), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    def run() -> tuple[list[float], list[float]]:
        times, losses = [], []
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - start)
        out["peak_rss_above_baseline"] = _status("VmHWM") - baseline  # training, before any exit
        return times[1:], losses

    out: dict = {"variant": variant, "weights": weights}
    if variant == "plain":
        times, losses = run()
    else:
        budget = int(weights * args.budget_fraction)
        with tempfile.TemporaryDirectory(dir=args.nvme) as nvme:
            tiers = [tierrt.dram(budget), tierrt.nvme(nvme)]
            with tierrt.offload(model, tiers=tiers, optimizer=opt) as rt:
                times, losses = run()
                total = rt.report().total
                out["updater"] = rt.blockwise.updater.describe()
                state_keys = [k for k in total.bytes_by_kind if k.startswith("exp_avg") and "->nvme" in k]
                out["state_to_nvme"] = sum(total.bytes_by_kind[k] for k in state_keys)
                out["budget"] = budget
    out.update(step_s=statistics.median(times), losses=losses)
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget-fraction", type=float, default=0.5)
    parser.add_argument("--nvme", default=None, help="directory for the swap files (default: the temp dir)")
    parser.add_argument("--optimizer", choices=("adamw", "lion"), default="adamw")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    results = {}
    for variant in VARIANTS if args.optimizer == "adamw" else VARIANTS[:2]:
        cmd = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    plain = results["plain"]
    print(
        f"Llama {args.layers} layers x {args.hidden}, {gib(plain['weights'])} of fp32 weights, "
        f"{'AdamW' if args.optimizer == 'adamw' else 'Lion'} state "
        f"{gib((2 if args.optimizer == 'adamw' else 1) * plain['weights'])}, batch 1 x {args.tokens}; "
        f"median of {args.steps} steps after one warm-up"
    )
    for variant, r in results.items():
        line = (
            f"  {variant:14s} step {r['step_s']:.2f} s ({r['step_s'] / plain['step_s']:.2f}x plain)  "
            f"peak RSS +{gib(r['peak_rss_above_baseline'])} "
            f"({r['peak_rss_above_baseline'] / plain['peak_rss_above_baseline']:.2f}x plain)"
        )
        if "updater" in r:
            line += f"  budget {gib(r['budget'])}, state to nvme {gib(r['state_to_nvme'])}  [{r['updater']}]"
        print(line)
        print(f"  {'':14s} losses {', '.join(f'{x:.6f}' for x in r['losses'])}")


if __name__ == "__main__":
    main()
