"""Allocator and host-arena benchmark.

1. Footprint. Replays an allocation trace shaped like training steps of a 32-layer transformer
   (Llama-2-7B shapes: hidden 4096, FFN 11008, vocabulary 32000) through tierrt's best-fit allocator
   and prints peak reserved / peak requested (goal <= 1.02), beside the same trace under power-of-two
   rounding without splitting -- how PyTorch's pinned CachingHostAllocator behaves: every request is
   rounded up to the next power of two, freed blocks are cached by that rounded size and reused only
   for requests of the same rounded size, never split or merged, and the peak reserved is every byte
   ever obtained from the system. Also: the static planner on one step's lifetimes.

   Per step (micro-batch and sequence length vary, so activation sizes vary): forward fetches each
   layer's bf16 weights into a prefetch window of two layers and saves the layer's activations;
   backward fetches the weights again, produces bf16 gradients and frees the activations in reverse;
   the optimizer runs two layers behind backward (fp32 master, m, v staged per tensor, gradients
   freed, new bf16 weights written back). Embedding and LM head stay resident.

2. Latency of alloc and free from Python (per operation: median, p99), against torch.empty + del.

3. Creating a 4GiB arena, touched and locked (each contender in its own process so that memory is
   returned between them): tierrt HostArena against torch.empty + fill_(0) (goal: within 1.5x) and
   DeepSpeed's new_cpu_locked_tensor (posix_memalign + mlock) where its aio op builds.

    python benchmarks/bench_allocator.py            # full: >100k-op trace, 4GiB arenas
    python benchmarks/bench_allocator.py --quick    # smoke run: short trace, 1GiB arenas
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import statistics
import subprocess
import sys
import textwrap
import time

from tierrt.arena import Allocator, HostArena, plan_static
from tierrt.sizes import format_size, parse_size

HIDDEN, FFN, LAYERS, VOCAB, HEADS = 4096, 11008, 32, 32000, 32
LAYER_PARAMS = [HIDDEN * HIDDEN] * 4 + [FFN * HIDDEN] * 3 + [HIDDEN] * 2  # q k v o, gate up down, 2 norms
PREFETCH = 2  # layers of weights in flight
OPT_LAG = 2  # optimizer runs this many layers behind backward

# --------------------------------------------------------------------------------------------
# 1. trace


class Trace:
    """A list of (is_alloc, key, nbytes) operations."""

    def __init__(self) -> None:
        self.ops: list[tuple[bool, int, int]] = []
        self._next = 0

    def alloc(self, nbytes: int) -> int:
        self._next += 1
        self.ops.append((True, self._next, nbytes))
        return self._next

    def free(self, key: int) -> None:
        self.ops.append((False, key, 0))

    def free_all(self, keys: list[int]) -> None:
        for key in keys:
            self.free(key)


def activation_sizes(tokens: int) -> list[int]:
    """Bytes saved for backward by one layer (bf16; flash-attention logsumexp in fp32)."""
    h, f = tokens * HIDDEN * 2, tokens * FFN * 2
    # input, norm1 out, q, k, v, attention out, norm2 out | gate, up, act(gate)*up | logsumexp
    return [h] * 7 + [f] * 3 + [tokens * HEADS * 4]


def build_trace(steps: int, seed: int) -> tuple[Trace, list[tuple[int, int]]]:
    """The trace, and the (first op, last op) index range of each step."""
    rng = random.Random(seed)
    tr = Trace()
    # resident: embedding and LM head weights (bf16) with their fp32 master, m, v; the final norm
    for n in (VOCAB * HIDDEN, VOCAB * HIDDEN):
        tr.alloc(2 * n)
        for _ in range(3):
            tr.alloc(4 * n)
    tr.alloc(2 * HIDDEN)
    step_ranges = []
    for _ in range(steps):
        begin = len(tr.ops)
        micro_batch = rng.choice([1, 2, 4])
        seq = rng.randint(200, 4096)  # packed documents: any length
        tokens = micro_batch * seq
        staged: dict[int, list[int]] = {}
        acts: dict[int, list[int]] = {}
        grads: dict[int, list[int]] = {}

        def stage(layer: int, staged: dict[int, list[int]] = staged) -> None:
            if layer not in staged:
                staged[layer] = [tr.alloc(2 * n) for n in LAYER_PARAMS]

        def optimizer(layer: int, grads: dict[int, list[int]] = grads) -> None:
            states = [tr.alloc(4 * n) for n in LAYER_PARAMS for _ in range(3)]  # master, m, v
            tr.free_all(grads.pop(layer))
            written = [tr.alloc(2 * n) for n in LAYER_PARAMS]  # new bf16 weights on their way out
            tr.free_all(states)
            tr.free_all(written)

        embedded = tr.alloc(tokens * HIDDEN * 2)
        for layer in range(LAYERS):  # forward
            for ahead in range(layer, min(LAYERS, layer + PREFETCH)):
                stage(ahead)
            acts[layer] = [tr.alloc(n) for n in activation_sizes(tokens)]
            tr.free_all(staged.pop(layer))
        logits = tr.alloc(tokens * VOCAB * 4)
        dlogits = tr.alloc(tokens * VOCAB * 4)
        tr.free(logits)
        head_grad = tr.alloc(VOCAB * HIDDEN * 2)
        tr.free(dlogits)
        pending: list[int] = []
        for layer in reversed(range(LAYERS)):  # backward, optimizer trailing behind
            for ahead in range(layer, max(-1, layer - PREFETCH), -1):
                stage(ahead)
            grads[layer] = [tr.alloc(2 * n) for n in LAYER_PARAMS]
            tr.free_all(list(reversed(acts.pop(layer))))
            tr.free_all(staged.pop(layer))
            pending.append(layer)
            if len(pending) > OPT_LAG:
                optimizer(pending.pop(0))
        embed_grad = tr.alloc(VOCAB * HIDDEN * 2)
        tr.free(embedded)
        for layer in pending:
            optimizer(layer)
        tr.free(head_grad)
        tr.free(embed_grad)
        step_ranges.append((begin, len(tr.ops) - 1))
    return tr, step_ranges


def peak_requested(ops: list[tuple[bool, int, int]]) -> int:
    live: dict[int, int] = {}
    total = peak = 0
    for is_alloc, key, nbytes in ops:
        if is_alloc:
            live[key] = nbytes
            total += nbytes
            peak = max(peak, total)
        else:
            total -= live.pop(key)
    return peak


def replay_tierrt(ops: list[tuple[bool, int, int]]) -> tuple[int, list[int], list[int]]:
    """Peak reserved (high-water mark) and per-operation latencies (ns) of alloc and free."""
    allocator = Allocator(1 << 42, 4096, "trace")
    offsets: dict[int, int] = {}
    alloc_ns: list[int] = []
    free_ns: list[int] = []
    clock = time.perf_counter_ns
    alloc = allocator.alloc
    free = allocator.free
    for is_alloc, key, nbytes in ops:
        if is_alloc:
            t0 = clock()
            offset = alloc(nbytes)
            t1 = clock()
            offsets[key] = offset
            alloc_ns.append(t1 - t0)
        else:
            offset = offsets.pop(key)
            t0 = clock()
            free(offset)
            t1 = clock()
            free_ns.append(t1 - t0)
    return allocator.stats()["high_water"], alloc_ns, free_ns


def replay_pow2_caching(ops: list[tuple[bool, int, int]]) -> int:
    """Bytes obtained from the system by a power-of-two caching allocator without splitting."""
    cache: dict[int, int] = {}
    rounded: dict[int, int] = {}
    reserved = 0
    for is_alloc, key, nbytes in ops:
        if is_alloc:
            size = 1 << max(0, (nbytes - 1).bit_length())
            rounded[key] = size
            if cache.get(size):
                cache[size] -= 1
            else:
                reserved += size
        else:
            size = rounded.pop(key)
            cache[size] = cache.get(size, 0) + 1
    return reserved


def static_plan_of_step(ops: list[tuple[bool, int, int]], begin: int, end: int) -> tuple[int, int]:
    """(peak of plan_static, peak requested) for the buffers allocated and freed within one step."""
    first: dict[int, int] = {}
    size: dict[int, int] = {}
    last: dict[int, int] = {}
    for t in range(begin, end + 1):
        is_alloc, key, nbytes = ops[t]
        if is_alloc:
            first[key], size[key] = t, nbytes
        elif key in first:
            last[key] = t
    keys = [k for k in first if k in last]
    _, peak = plan_static([size[k] for k in keys], [first[k] for k in keys], [last[k] for k in keys])
    events = sorted([(first[k], 0, k) for k in keys] + [(last[k], 1, k) for k in keys])
    step_ops = [(kind == 0, k, size[k]) for _, kind, k in events]
    return peak, peak_requested(step_ops)


# --------------------------------------------------------------------------------------------
# 2. latency


def pct(values: list[int] | list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timer_overhead_ns() -> float:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(20000):
        t0 = clock()
        t1 = clock()
        samples.append(t1 - t0)
    return statistics.median(samples)


def pair_latencies(batch, rounds: int, per_batch: int) -> list[float]:
    """Per-pair latency (ns) of alloc followed by free: `batch()` runs `per_batch` pairs."""
    clock = time.perf_counter_ns
    out = []
    for _ in range(rounds):
        t0 = clock()
        batch()
        out.append((clock() - t0) / per_batch)
    return out


def latency_rows(quick: bool) -> list[tuple[str, list[float]]]:
    import torch

    rng = random.Random(3)
    rounds = 400 if quick else 4000
    allocator = Allocator(1 << 40, 4096, "bench")
    keep = [allocator.alloc(rng.randrange(4096, 64 << 20)) for _ in range(2000)]  # a populated tree
    for o in keep[::2]:
        allocator.free(o)
    sizes = [rng.randrange(4096, 8 << 20) for _ in range(50)]
    small = [s % (1 << 20) + 1 for s in sizes]
    arena = HostArena("64MiB", lock=False, name="bench")

    def allocator_batch(alloc=allocator.alloc, free=allocator.free, sizes=sizes) -> None:
        for n in sizes:
            free(alloc(n))

    def arena_batch(alloc=arena.native.alloc, sizes=small) -> None:
        for n in sizes:
            buf = alloc(n)
            del buf

    def torch_batch(empty=torch.empty, dtype=torch.uint8, sizes=small) -> None:
        for n in sizes:
            t = empty(n, dtype=dtype)
            del t

    return [
        ("Allocator.alloc + free (2000 extents in the tree)", pair_latencies(allocator_batch, rounds, 50)),
        ("HostArena.alloc + del (ArenaBuffer, <=1MiB)", pair_latencies(arena_batch, rounds, 50)),
        ("baseline: torch.empty + del (<=1MiB)", pair_latencies(torch_batch, rounds, 50)),
    ]


# --------------------------------------------------------------------------------------------
# 3. arena creation, one process per contender

CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    kind, nbytes = sys.argv[1], int(sys.argv[2])
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0
    extra = {}
    if kind.startswith("tierrt"):
        from tierrt.arena import HostArena
        t0 = time.perf_counter()
        arena = HostArena(nbytes, hugepages=(kind == "tierrt"), lock=True, populate=True)
        seconds = time.perf_counter() - t0
        extra = {"locked": arena.locked, "thp": arena.hugepage_bytes()}
    elif kind == "torch":
        import torch
        t0 = time.perf_counter()
        x = torch.empty(nbytes, dtype=torch.uint8)
        x.fill_(0)
        seconds = time.perf_counter() - t0
    elif kind == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import torch
        from deepspeed.ops.op_builder import AsyncIOBuilder
        handle = AsyncIOBuilder().load(verbose=False).aio_handle(1 << 20, 32, False, False, 1)
        t0 = time.perf_counter()
        x = handle.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
        seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "rss": status("VmRSS"), "locked_bytes": status("VmLck"), **extra}))
    """
)


def run_child(kind: str, nbytes: int, timeout: float) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    command = [sys.executable, "-c", CHILD, kind, str(nbytes)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def deepspeed_status() -> str | None:
    """None when DeepSpeed's aio op loads (building it if needed), else why not."""
    code = (
        "import os; os.environ.setdefault('DS_ACCELERATOR', 'cpu')\n"
        "from deepspeed.ops.op_builder import AsyncIOBuilder\n"
        "b = AsyncIOBuilder()\n"
        "assert b.is_compatible(verbose=False), 'AsyncIOBuilder is not compatible (libaio missing?)'\n"
        "b.load(verbose=False)\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=1200,
            env=dict(os.environ, DS_ACCELERATOR="cpu"),
        )
    except subprocess.TimeoutExpired:
        return "building DeepSpeed's aio op took over 20 minutes"
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return lines[-1] if lines else f"exit {proc.returncode}"
    return None


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short trace and 1GiB arenas")
    parser.add_argument("--steps", type=int, default=None, help="training steps in the trace (default 22)")
    parser.add_argument("--arena-size", default=None, help="arena size for the creation test (default 4GiB)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per creation contender (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-creation", action="store_true")
    parser.add_argument("--skip-deepspeed", action="store_true")
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.quick else 22)
    arena_bytes = parse_size(args.arena_size or ("1GiB" if args.quick else "4GiB"))
    repeat = args.repeat or (1 if args.quick else 3)

    # 1. footprint
    trace, step_ranges = build_trace(steps, args.seed)
    ops = trace.ops
    requested = peak_requested(ops)
    reserved, alloc_ns, free_ns = replay_tierrt(ops)
    pow2 = replay_pow2_caching(ops)
    plan_peak, plan_requested = static_plan_of_step(ops, *step_ranges[0])
    ok = reserved / requested <= 1.02
    print(
        f"== footprint: {LAYERS}-layer transformer (hidden {HIDDEN}, FFN {FFN}), {steps} steps, "
        f"{len(ops):,} operations =="
    )
    print(f"{'allocator':<52}{'peak reserved':>15}{'peak requested':>16}{'ratio':>8}  goal")
    print(
        f"{'tierrt best fit, 4KiB alignment':<52}{format_size(reserved):>15}{format_size(requested):>16}"
        f"{reserved / requested:>8.3f}  <= 1.02 {'met' if ok else 'MISSED'}"
    )
    print(
        f"{'baseline: pow2 rounding, no split (CachingHostAlloc.)':<52}{format_size(pow2):>15}"
        f"{format_size(requested):>16}{pow2 / requested:>8.3f}"
    )
    print(
        f"{'tierrt plan_static, step 1 lifetimes':<52}{format_size(plan_peak):>15}"
        f"{format_size(plan_requested):>16}{plan_peak / plan_requested:>8.3f}"
    )
    print(f"tierrt needs {reserved / pow2:.2f}x the host memory of the pow2 caching allocator on this trace")

    # 2. latency
    overhead = timer_overhead_ns()
    print(f"\n== latency from Python, ns per operation (timer overhead ~{overhead:.0f}ns included) ==")
    print(f"{'operation':<54}{'median':>10}{'p99':>10}")

    def row(name: str, values: list[int] | list[float]) -> None:
        print(f"{name:<54}{statistics.median(values):>10.0f}{pct(values, 0.99):>10.0f}")

    row("Allocator.alloc, trace replay", alloc_ns)
    row("Allocator.free, trace replay", free_ns)
    pair_median = statistics.median(alloc_ns) + statistics.median(free_ns)
    print(f"{'alloc + free, trace replay (sum of medians)':<54}{pair_median:>10.0f}")
    rows = latency_rows(args.quick)
    for name, values in rows:
        row(name, values)
    median_pair = statistics.median(rows[0][1])
    verdict = "met" if median_pair < 2000 else "MISSED"
    print(f"goal: alloc + free median well under 2us: {median_pair / 1000:.2f}us {verdict}")

    if args.skip_creation:
        return
    # 3. creation
    size = format_size(arena_bytes)
    print(f"\n== creating a {size} arena, touched and locked (own process each, median of {repeat}) ==")
    contenders = [
        ("torch", "baseline: torch.empty + fill_(0)"),
        ("tierrt", "tierrt HostArena (THP, parallel populate, mlock)"),
        ("tierrt-4k", "tierrt HostArena, no huge pages"),
    ]
    if not args.skip_deepspeed:
        why = deepspeed_status()
        if why is None:
            contenders.append(("deepspeed", "DeepSpeed new_cpu_locked_tensor"))
        else:
            print(f"DeepSpeed new_cpu_locked_tensor: not measured ({why})")
    # Rounds go through every contender in turn, so a noisy moment on a shared machine does not
    # land on one contender only.
    runs: dict[str, list[dict]] = {kind: [] for kind, _ in contenders}
    failures: dict[str, str] = {}
    for _ in range(repeat):
        for kind, _label in contenders:
            if kind in failures:
                continue
            try:
                runs[kind].append(run_child(kind, arena_bytes, timeout=600))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                failures[kind] = str(exc)
    results: dict[str, float] = {}
    print(f"{'contender':<52}{'median s':>9}{'best s':>8}{'GiB/s':>7}{'vs torch':>10}{'locked':>9}")
    for kind, label in contenders:
        if kind in failures:
            print(f"{label:<52} failed: {failures[kind]}")
            continue
        times = [r["seconds"] for r in runs[kind]]
        seconds = statistics.median(times)
        results[kind] = seconds
        ratio = f"{seconds / results['torch']:.2f}x" if "torch" in results else "-"
        print(
            f"{label:<52}{seconds:>9.3f}{min(times):>8.3f}{arena_bytes / seconds / 2**30:>7.1f}{ratio:>10}"
            f"{format_size(runs[kind][-1]['locked_bytes']):>9}"
        )
    for kind, label in (("tierrt", "tierrt (default, THP)"), ("tierrt-4k", "tierrt without huge pages")):
        if kind in results and "torch" in results:
            r = results[kind] / results["torch"]
            verdict = "met" if r <= 1.5 else "MISSED"
            print(f"goal: {label} within 1.5x of torch.empty + fill_: {r:.2f}x {verdict}")
    if free_page_reporting():
        print(
            "note: this is a VM whose balloon reports free pages to the host (virtio-balloon free page\n"
            "      reporting): free 2MiB blocks are given back to the host, so every huge page is faulted\n"
            "      in again on the host side and THP population costs more than 4KiB pages, which come\n"
            "      from host-backed fragments. On bare metal THP population is the cheaper of the two."
        )


def free_page_reporting() -> bool:
    """True inside a VM with a virtio balloon that has free page reporting (feature bit 5)."""
    for device in glob.glob("/sys/bus/virtio/devices/*"):
        try:
            with open(os.path.join(device, "device")) as f:
                kind = f.read().strip()
            with open(os.path.join(device, "features")) as f:
                features = f.read().strip()
        except OSError:
            continue
        if kind == "0x0005" and len(features) > 5 and features[5] == "1":
            return True
    return False


if __name__ == "__main__":
    main()
