"""tierrt.offload() on a ~1B-parameter Llama with its weights on NVMe, against named baselines.

What it measures (each contender in its own process, peak RSS from the kernel's VmHWM counter,
above the process's baseline: torch, transformers and accelerate imported, model not built):

1. Forward only (batch 1 x 256 tokens, fp32): the whole model in RAM; accelerate's disk offload
   (``from_pretrained`` with every layer mapped to "disk" and ``offload_folder``; and
   ``accelerate.disk_offload``), with the page cache dropped before each forward (cold) and kept
   (warm); tierrt with the model built on the meta device, its weights streamed from the checkpoint
   into NVMe swap files and a DRAM budget of 25% of the weights. The bound is
   max(compute time (the in-RAM forward), bytes read / the disk's measured read bandwidth).
2. Training step (forward, backward, SGD): in RAM against tierrt (weights and gradients on NVMe,
   same 25% budget). accelerate's offload cannot train: its offloaded weights receive no gradients,
   so it is not compared. Bound: max(compute, read bytes / read bandwidth + written bytes / write
   bandwidth) — one disk serves both directions.
3. Full AdamW step (native kernel, master weights, m, v and gradients on NVMe, a DRAM budget below the
   training state): bound max(compute, state bytes / NVMe bandwidth, optimizer time).

Run: ``python benchmarks/bench_offload.py`` (about 25 minutes here; ``--quick`` uses a ~100M model;
``--no-verify`` turns off the swap-data checksums, ``tierrt.nvme(verify=False)``, to show their cost).
Needs transformers and accelerate; the checkpoint is written once to ``--workdir``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GOAL = 1.15


def rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("1")
        return True
    except OSError:
        return False


def config(quick: bool):
    from transformers import LlamaConfig

    if quick:
        cfg = LlamaConfig(
            vocab_size=4096,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
    else:  # TinyLlama-1.1B's shape
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
    cfg._attn_implementation = "sdpa"
    return cfg


# ---- worker side (one contender per process) ------------------------------------------------------
def worker(args: argparse.Namespace) -> dict:
    # The baseline: the libraries every contender's script imports (torch, transformers' Llama,
    # accelerate), no model built yet.
    import accelerate  # noqa: F401
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401

    import tierrt  # noqa: F401  (imported before the baseline, like torch)

    torch.manual_seed(0)
    base = rss()
    cfg = config(args.quick)
    ckpt = os.path.join(args.workdir, "model")
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    out: dict = {"contender": args.worker, "mode": args.mode, "base": base}
    steps = args.steps
    contender = args.worker

    if contender == "ram":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
        out["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
        with torch.no_grad():  # bring the (memory-mapped) weights in, so the steps measure compute only
            for p in model.parameters():
                p.sum()
        out["loaded"] = rss()
        # Activations: the peak over every step, the first included, above the RSS just before it.
        trim_heap()
        out["step_base"] = rss()
        out["peak_reset"] = reset_peak()
        if args.mode == "forward":
            model.eval()
            times = timed(lambda: forward(model, ids), steps)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=1e-4)
            times = timed(lambda: train_step(model, opt, ids), steps, split=True)
        out["step_peak"] = rss("VmHWM")
        out["times"] = times
    elif contender.startswith("accelerate"):
        from accelerate import disk_offload, init_empty_weights
        from transformers import AutoModelForCausalLM

        folder = os.path.join(args.workdir, f"offload-{contender}")
        shutil.rmtree(folder, ignore_errors=True)
        if contender == "accelerate_map":
            device_map = {
                "model.embed_tokens": "cpu",
                "model.norm": "cpu",
                "model.rotary_emb": "cpu",
                "lm_head": "cpu",
            }
            for i in range(cfg.num_hidden_layers):
                device_map[f"model.layers.{i}"] = "disk"
            model = AutoModelForCausalLM.from_pretrained(
                ckpt, torch_dtype=torch.float32, device_map=device_map, offload_folder=folder
            )
        else:
            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(cfg)
            from safetensors.torch import load_file

            state = (
                load_file(os.path.join(ckpt, "model.safetensors"))
                if os.path.exists(os.path.join(ckpt, "model.safetensors"))
                else None
            )
            if state is None:
                model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
            else:
                model.load_state_dict(state, assign=True)
                del state
            gc.collect()
            disk_offload(model, folder, execution_device=torch.device("cpu"))
        model.eval()
        out["loaded"] = rss()
        cold = args.mode == "forward_cold"
        times = timed(lambda: forward(model, ids), steps, before=drop_caches if cold else None)
        out["times"] = times
        shutil.rmtree(folder, ignore_errors=True)
    elif contender == "tierrt":
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        import tierrt as t

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg)
        if args.mode == "forward":
            model.eval()  # inference: no gradient homes
        weights_bytes = sum(p.numel() * 4 for p in model.parameters())
        fraction = args.budget_fraction
        if args.quick and args.mode == "train":
            fraction = max(fraction, 0.4)  # the small model's layers are a larger share of it
        budget = int(weights_bytes * fraction) if args.mode != "adamw" else args.adamw_budget
        out["budget"] = budget
        swap = os.path.join(args.workdir, "swap")
        shutil.rmtree(swap, ignore_errors=True)
        opt = None
        if args.mode == "train":
            opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        elif args.mode == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
        with t.offload(
            model,
            tiers=[t.dram(budget), t.nvme(swap, verify=not args.no_verify)],
            optimizer=opt,
            weights=ckpt,
            progress=False,
            overlap_backward=not args.no_overlap,
        ) as rt:
            out["loaded"] = rss()
            out["placement"] = rt.describe()
            if args.mode == "forward":
                model.eval()
                with torch.no_grad():
                    forward(model, ids)  # learns the trace
                times = timed(lambda: forward(model, ids), steps, report=rt)
            else:
                train_step(model, opt, ids)
                times = timed(lambda: train_step(model, opt, ids), steps, split=True, report=rt)
            report = rt.report()
            out["report"] = report.as_dict()
            out["report_text"] = str(report)
            steady = rt.counters.minus(rt.steady_start)
            out["steady"] = {
                "stall_seconds": steady.stall_seconds,
                "hits": steady.prefetch_hits,
                "misses": steady.prefetch_misses,
                "optimizer_seconds": steady.optimizer_seconds,
                "overlap_seconds": steady.optimizer_overlap_seconds,
            }
            rt.synchronize()
        shutil.rmtree(swap, ignore_errors=True)
        out["times"] = times
    # The run's peak (for the in-RAM run, since the reset before its steps: the weights were in)
    out["peak"] = rss("VmHWM")
    return out


def forward(model, ids) -> None:
    import torch

    with torch.no_grad():
        model(ids)


def train_step(model, opt, ids) -> dict:
    start = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    mid = time.perf_counter()
    opt.step()
    opt.zero_grad()
    return {"fwd_bwd": mid - start, "step": time.perf_counter() - mid}


def timed(fn, steps: int, split: bool = False, before=None, report=None) -> list:
    """Time ``steps`` calls of ``fn`` after one warm-up call."""
    fn() if before is None else None  # warm-up (kernels, allocator, page cache for the warm case)
    if report is not None:
        report.steady_start = report.counters.copy()  # figures of the timed steps only
    times = []
    for _ in range(steps):
        if before is not None:
            before()
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        times.append({"total": elapsed, **(result or {})} if split else {"total": elapsed})
    return times


# ---- driver ---------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace, contender: str, mode: str, timeout: int = 1800) -> dict | None:
    cmd = (
        [
            sys.executable,
            __file__,
            "--worker",
            contender,
            "--mode",
            mode,
            "--workdir",
            args.workdir,
            "--steps",
            str(args.steps),
            "--tokens",
            str(args.tokens),
            "--budget-fraction",
            str(args.budget_fraction),
            "--adamw-budget",
            str(args.adamw_budget),
        ]
        + (["--quick"] if args.quick else [])
        + (["--no-verify"] if args.no_verify else [])
        + (["--no-overlap"] if args.no_overlap else [])
    )
    print(f"  running {contender} ({mode}) ...", file=sys.stderr, flush=True)
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if result.returncode != 0:
        print(f"  {contender} ({mode}) failed:\n{result.stderr[-4000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_checkpoint(args: argparse.Namespace) -> str:
    ckpt = os.path.join(args.workdir, "model")
    marker = os.path.join(ckpt, "config.json")
    if os.path.exists(marker):
        return ckpt
    code = (
        f"import sys, torch; sys.path.insert(0, {HERE!r}); import bench_offload as b;"
        "from transformers import AutoModelForCausalLM;"
        f"torch.manual_seed(0); m = AutoModelForCausalLM.from_config(b.config({args.quick!r}));"
        f"m.save_pretrained({ckpt!r}, safe_serialization=True, max_shard_size='100GB')"
    )
    print("  writing the checkpoint once ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-c", code], check=True)
    return ckpt


def disk_bandwidth(workdir: str, size: int) -> tuple[float, float]:
    """Sequential O_DIRECT read and write GB/s at 1MiB / QD32 through tierrt's engine (fio-checked by
    bench_io.py), on a file in the same directory as the swap files."""
    from tierrt.arena import HostArena
    from tierrt.io import IOEngine

    path = os.path.join(workdir, "bw.swap")
    arena = HostArena(64 << 20, lock=False)
    buf = arena.alloc(64 << 20)
    engine = IOEngine("auto", queue_depth=32, block_size=1 << 20)
    fs = engine.open([path], size, create=True, preallocate=True, direct=True)
    try:
        start = time.perf_counter()
        for off in range(0, size, 64 << 20):
            engine.write(fs, off, buf, 64 << 20).wait()
        write = size / (time.perf_counter() - start) / 1e9
        drop_caches()
        start = time.perf_counter()
        for off in range(0, size, 64 << 20):
            engine.read(fs, off, buf, 64 << 20).wait()
        read = size / (time.perf_counter() - start) / 1e9
    finally:
        fs.close(remove=True)
        engine.close()
    return read, write


def optimizer_ns_per_element() -> float:
    import torch

    from tierrt.optim import kernels

    n = 50_000_000
    p, g, m, v = (torch.rand(n) for _ in range(4))
    kernels.adamw_step_(p, g, m, v, step=1)
    start = time.perf_counter()
    for step in range(2, 5):
        kernels.adamw_step_(p, g, m, v, step=step)
    return (time.perf_counter() - start) / 3 / n * 1e9


def paired(args: argparse.Namespace, mode: str) -> list[tuple[dict, dict]]:
    """Run the in-RAM and the tierrt contender alternately, ``--rounds`` times each.

    This machine's speed drifts between runs (a shared VM): pairing each tierrt run with an in-RAM
    run just before it, and taking the median of the per-round ratios, cancels most of the drift.
    The disk's bandwidth drifts too, so it is measured again in each round, just before the tierrt
    run, and that round's bound uses it.
    """
    pairs = []
    for _ in range(args.rounds):
        ram = run_worker(args, "ram", mode)
        disk = disk_bandwidth(args.workdir, args.disk_probe_bytes)
        ours = run_worker(args, "tierrt", mode)
        if ram and ours:
            ram["compute"] = mean([t["total"] for t in ram["times"]])
            ours["disk"] = disk
            pairs.append((ram, ours))
    return pairs


def merge(runs: list[dict]) -> dict | None:
    """One contender's rounds as one record: all timed steps, the highest peak, the last report."""
    if not runs:
        return None
    merged = dict(runs[-1])
    merged["times"] = [t for r in runs for t in r["times"]]
    merged["peak"] = max(r["peak"] - r["base"] for r in runs) + merged["base"]
    if "compute" in runs[0]:
        merged["compute"] = mean([r["compute"] for r in runs])
    if "steady" in runs[0]:
        merged["steady"] = {k: sum(r["steady"][k] for r in runs) for k in runs[0]["steady"]}
    return merged


def io_seconds(ours: dict) -> float:
    """The disk time of one tierrt step: its bytes read and written at the round's measured bandwidth
    (one disk serves both directions, so the two add)."""
    read_bw, write_bw = ours["disk"]
    links = ours["report"]["last_step"]["bytes_by_link"]
    return links.get("nvme->dram", 0) / (read_bw * 1e9) + links.get("dram->nvme", 0) / (write_bw * 1e9)


def print_rounds(pairs: list[tuple[dict, dict]], what: str) -> float:
    """Print each round's in-RAM time, disk time, tierrt time and ratio to that round's bound
    max(compute, disk time); return the median ratio."""
    ratios = []
    for i, (ram, ours) in enumerate(pairs):
        t = mean([x["total"] for x in ours["times"]])
        io = io_seconds(ours)
        bound = max(ram["compute"], io)
        ratios.append(t / bound)
        print(
            f"  round {i + 1}: in RAM {ram['compute']:.2f}s/{what}; disk {ours['disk'][0]:.2f} GB/s read, "
            f"{ours['disk'][1]:.2f} GB/s write -> I/O {io:.2f}s; bound {bound:.2f}s; "
            f"tierrt {t:.2f}s/{what}, tierrt / bound {t / bound:.2f}"
        )
    ratios.sort()
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def print_memory(ours: dict, ram: dict) -> None:
    """The peak-RSS criterion: tierrt's peak above baseline <= budget + activations + 10% of budget.

    Activations are measured in the in-RAM run as the peak RSS over all its steps (the first one
    included, as tierrt's peak includes its first) minus the RSS just before them, with the weights
    already in memory and the heap trimmed."""
    activations = max(ram.get("step_peak", 0) - ram.get("step_base", 0), 0)
    budget = ours["budget"]
    allowed = budget + activations + 0.1 * budget
    used = ours["peak"] - ours["base"]
    held = "activations, gradients" if "step" in ram["times"][0] else "activations"
    print(
        f"tierrt peak RSS above baseline {gib(used)} <= budget {gib(budget)} + the plain step's own "
        f"memory ({held}) {gib(activations)}"
        f" + 10% of budget {gib(0.1 * budget)} = {gib(allowed)}: "
        f"{'yes' if used <= allowed else 'NO'}  (tierrt: {gib(ours['loaded'] - ours['base'])} after "
        f"placement, {gib(ours['peak'] - ours['loaded'])} more at the peak of its steps)"
    )


def steady_line(result: dict) -> str:
    """Stall fraction and prefetch hit rate over the timed steps (the warm-up step learns the trace)."""
    steady = result["steady"]
    wall = sum(t["total"] for t in result["times"])
    hits, misses = steady["hits"], steady["misses"]
    rate = hits / (hits + misses) if hits + misses else 1.0
    line = (
        f"tierrt over the timed steps: stall fraction {100 * steady['stall_seconds'] / wall:.1f}%, prefetch "
        f"hit rate {100 * rate:.1f}% ({hits} hits, {misses} misses)"
    )
    if steady["optimizer_seconds"]:
        line += (
            f"; optimizer {steady['optimizer_seconds'] / len(result['times']):.2f}s/step, of which "
            f"{steady['overlap_seconds'] / len(result['times']):.2f}s overlapped backward"
        )
    return line


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~100M model instead of ~1.1B")
    parser.add_argument("--workdir", default="/tmp/tierrt-bench-offload")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender (after one warm-up)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument(
        "--rounds", type=int, default=3, help="paired in-RAM/tierrt rounds for forward and training"
    )
    parser.add_argument("--budget-fraction", type=float, default=0.25, help="DRAM budget / weight bytes")
    parser.add_argument(
        "--adamw-budget",
        type=int,
        default=0,
        help="DRAM budget for the AdamW step (default: 4GiB, or 40%% of the state with --quick)",
    )
    parser.add_argument("--skip", default="", help="comma-separated: forward,train,adamw,accelerate")
    parser.add_argument(
        "--no-verify", action="store_true", help="tierrt.nvme(verify=False): no checksums of swap data"
    )
    parser.add_argument(
        "--no-overlap",
        action="store_true",
        help="tierrt.offload(overlap_backward=False): every block updated in step(), not during backward",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="forward", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    skip = set(filter(None, args.skip.split(",")))
    if not args.adamw_budget:
        args.adamw_budget = int(0.4 * _param_count(config(args.quick)) * 16) if args.quick else 4 << 30
    os.makedirs(args.workdir, exist_ok=True)
    make_checkpoint(args)
    cfg = config(args.quick)
    args.disk_probe_bytes = 2 << 30 if not args.quick else 512 << 20
    print(
        f"model: Llama {cfg.num_hidden_layers} layers x {cfg.hidden_size}, "
        f"batch 1 x {args.tokens} tokens, fp32"
    )
    results: dict[str, dict] = {}

    if "forward" not in skip:
        print("\n== forward only ==")
        pairs = paired(args, "forward")
        contenders = {"in RAM": merge([r for r, _ in pairs]), "tierrt": merge([o for _, o in pairs])}
        if "accelerate" not in skip:
            contenders["accelerate from_pretrained(disk), warm cache"] = run_worker(
                args, "accelerate_map", "forward"
            )
            contenders["accelerate from_pretrained(disk), cold cache"] = run_worker(
                args, "accelerate_map", "forward_cold"
            )
            contenders["accelerate.disk_offload, cold cache"] = run_worker(
                args, "accelerate_disk", "forward_cold"
            )
        results["forward"] = {k: v for k, v in contenders.items() if v}
        ram, ours = contenders["in RAM"], contenders["tierrt"]
        if ram and ours:
            read = ours["report"]["last_step"]["bytes_by_link"].get("nvme->dram", 0)
            io = mean([io_seconds(o) for _, o in pairs])
            bound = max(ram["compute"], io)
            print(f"{'contender':<48}{'s/forward':>11}{'vs bound':>10}{'peak RSS':>12}")
            for name, r in contenders.items():
                if not r:
                    print(f"{name:<48}{'failed':>11}")
                    continue
                t = mean([x["total"] for x in r["times"]])
                print(f"{name:<48}{t:>11.2f}{t / bound:>9.2f}x{gib(r['peak'] - r['base']):>12}")
            ratio = print_rounds(pairs, "forward")
            print(
                f"bound = max(compute, {gib(read)} read / the disk's read bandwidth), per round (the "
                f"table uses the means); tierrt / bound = {ratio:.2f}, the median over {len(pairs)} "
                f"paired rounds (goal <= {GOAL})"
            )
            print_memory(ours, ram)
            print(steady_line(ours))
            print(ours["report_text"])

    if "train" not in skip:
        print("\n== training step (forward, backward, SGD) ==")
        print(
            "accelerate's disk offload cannot train (its offloaded weights receive no gradients): "
            "not compared"
        )
        pairs = paired(args, "train")
        ram, ours = merge([r for r, _ in pairs]), merge([o for _, o in pairs])
        results["train"] = {"ram": ram, "tierrt": ours, "rounds": pairs}
        if ram and ours:
            step = ours["report"]["last_step"]["bytes_by_link"]
            read, written = step.get("nvme->dram", 0), step.get("dram->nvme", 0)
            t = mean([x["total"] for x in ours["times"]])
            print(
                f"in RAM {ram['compute']:.2f}s/step (peak RSS {gib(ram['peak'] - ram['base'])}); "
                f"tierrt {t:.2f}s/step "
                f"(peak RSS {gib(ours['peak'] - ours['base'])}, budget {gib(ours['budget'])})"
            )
            ratio = print_rounds(pairs, "step")
            print(
                f"bound = max(compute, I/O: {gib(read)} read + {gib(written)} written at the round's disk "
                f"bandwidth); tierrt / bound = {ratio:.2f}, the median over {len(pairs)} paired rounds "
                f"(goal <= {GOAL}); tierrt / in RAM = {t / ram['compute']:.2f}"
            )
            print_memory(ours, ram)
            print(steady_line(ours))
            print(ours["report_text"])
            results["train_compute"] = ram["compute"]

    if "adamw" not in skip:
        print("\n== full AdamW step (native kernel, states on NVMe) ==")
        read_bw, write_bw = disk_bandwidth(args.workdir, args.disk_probe_bytes)
        print(f"disk (O_DIRECT, 1MiB, QD32) just before: read {read_bw:.2f} GB/s, write {write_bw:.2f} GB/s")
        ours = run_worker(args, "tierrt", "adamw")
        results["adamw"] = ours
        ns = optimizer_ns_per_element()
        if ours:
            ours["disk"] = (read_bw, write_bw)
            compute = results.get("train_compute")
            step = ours["report"]["last_step"]["bytes_by_link"]
            read, written = step.get("nvme->dram", 0), step.get("dram->nvme", 0)
            io = io_seconds(ours)
            n_params = _param_count(cfg)
            opt_time = ns * n_params / 1e9
            terms = {"compute": compute or 0.0, "state I/O": io, "optimizer": opt_time}
            bound = max(terms.values())
            t = mean([x["total"] for x in ours["times"]])
            state = n_params * 16
            print(
                f"training state {gib(state)} (fp32 weights, grads, m, v); DRAM budget {gib(ours['budget'])}"
            )
            print(f"tierrt {t:.2f}s/step, peak RSS {gib(ours['peak'] - ours['base'])}")
            print(
                "bound = max(" + ", ".join(f"{k} {v:.2f}s" for k, v in terms.items()) + f") = {bound:.2f}s; "
                f"tierrt / bound = {t / bound:.2f} (goal <= {GOAL})  [{gib(read)} read, "
                f"{gib(written)} written; "
                f"optimizer kernel {ns:.2f} ns/element]"
            )
            print(steady_line(ours))
            print(ours["report_text"])
    with open(os.path.join(args.workdir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1, default=str)


def _param_count(cfg) -> int:
    h, i, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return layers * per_layer + 2 * v * h + h


if __name__ == "__main__":
    main()
