"""What tierrt costs when nothing has to move: a Llama whose blocks all fit in the DRAM budget, run
plainly and inside ``tierrt.offload()`` in the same process, alternating rounds.

Baseline: the same model, the same inputs, without tierrt (named "plain" below). Three workloads:

- training step (forward, backward, ``opt.step()``, ``opt.zero_grad()``, torch SGD): tierrt's hooks,
  gradients moved to their home tier and the optimizer stepped block by block;
- evaluation forward under ``torch.no_grad()``;
- ``generate()`` of ``--new-tokens`` greedy tokens with a KV cache: between its forwards,
  generation's own torch calls run under tierrt's ``TorchFunctionMode`` (see ``tierrt.access``),
  which looks for offloaded parameters among each call's arguments.

Each figure is the minimum over ``--trials`` runs (the least disturbed one), per round; the ratio
tierrt / plain is printed per round and as the median over rounds. The count of torch calls the mode
saw during one ``generate()`` shows where its cost comes from. On a machine with other load the
ratios move by several percent between rounds: read the median.

Run: ``python benchmarks/bench_overhead.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch


def build(layers: int, hidden: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def best_of(fn: Callable[[], object], trials: int) -> float:
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def workloads(model: torch.nn.Module, opt: torch.optim.Optimizer, args: argparse.Namespace) -> dict:
    ids = torch.randint(0, 2048, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    prompt = ids[:, :8]

    def train() -> None:
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)

    def generate() -> None:
        model.eval()
        with torch.no_grad():
            model.generate(
                prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
            )

    return {"training step": train, "eval forward": evaluate, f"generate {args.new_tokens} tokens": generate}


def calls_seen_by_mode(run: Callable[[], object]) -> int:
    from tierrt import access

    seen = 0
    original = access.ParameterAccess.__torch_function__

    def counting(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        nonlocal seen
        seen += 1
        return original(self, *args, **kwargs)

    access.ParameterAccess.__torch_function__ = counting  # type: ignore[method-assign]
    try:
        run()
    finally:
        access.ParameterAccess.__torch_function__ = original  # type: ignore[method-assign]
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=128, help="sequence length of the training step")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=5, help="runs per round; the minimum counts")
    args = parser.parse_args()

    import tierrt

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build(args.layers, args.hidden)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    print(
        f"Llama {args.layers}x{args.hidden}, {weights / 2**20:.0f} MiB of fp32 weights, all resident "
        f"(DRAM budget 4x the weights); torch threads {torch.get_num_threads()}"
    )
    runs = workloads(model, opt, args)
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory(prefix="tierrt-bench-overhead-") as swap:
        tiers = [tierrt.dram(4 * weights + 2**26), tierrt.nvme(swap)]
        for round_index in range(args.rounds):
            plain = {name: best_of(run, args.trials) for name, run in runs.items()}
            with tierrt.offload(model, tiers=tiers, optimizer=opt):
                for run in runs.values():
                    run()  # the first step traces the execution order
                ours = {name: best_of(run, args.trials) for name, run in runs.items()}
                if round_index == 0:
                    generate = list(runs.values())[-1]
                    seen = calls_seen_by_mode(generate)
            for name in runs:
                ratios[name].append(ours[name] / plain[name])
                print(
                    f"round {round_index + 1}  {name:<20} plain {plain[name] * 1e3:8.1f} ms   "
                    f"tierrt {ours[name] * 1e3:8.1f} ms   ratio {ours[name] / plain[name]:.2f}x"
                )
    print()
    for name, values in ratios.items():
        print(f"{name:<20} tierrt / plain: median {statistics.median(values):.2f}x over {len(values)} rounds")
    print(f"torch calls seen by tierrt's TorchFunctionMode in one generate(): {seen}")


if __name__ == "__main__":
    main()
