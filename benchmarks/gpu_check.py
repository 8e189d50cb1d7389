"""GPU path check: the arena's pinned registration, host<->GPU bandwidth, and training through
tierrt.offload with the GPU as the compute tier, in under 5 minutes.

Baseline: torch's own pinned tensors (``torch.empty(..., pin_memory=True)``), measured in the same run.
Goal: an arena registered with CUDA moves data as fast as torch's pinned memory (ratio >= 0.95) and
near the PCIe peak of the link; pageable memory is shown for contrast.

Run on a machine with a CUDA GPU, from the repository root after
``pip install --no-build-isolation -e .`` (it builds the native extension and installs
``tierrt.scheduler``; the script says so and exits 2 when that was not done)::

    python benchmarks/gpu_check.py            # ~1 minute
    python benchmarks/gpu_check.py --quick    # ~20 s
    python benchmarks/gpu_check.py --json out.json --budget 150

Without a GPU it says so and exits 0 (``--require-gpu``: exit 3 instead).

The script is a list of sections (functions decorated with ``@section``); each prints its figures,
records them in ``ctx.results[name]``, and may fail without stopping the others: an exception is
printed with its traceback and the next section runs. A section whose time estimate does not fit in
what is left of ``--budget`` is skipped. Append new sections at the end of the file.
Exit status: 0 when every section that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MiB = 1 << 20
GiB = 1 << 30
GOAL_RATIO = 0.95  # arena-pinned GB/s over torch-pinned GB/s


@dataclass
class Context:
    args: argparse.Namespace
    torch: Any = None
    device: int = 0
    gpu: Any = None  # tierrt.topology.GpuInfo
    results: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # shared between sections (arena, ...)
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)


@dataclass
class Section:
    name: str
    estimate_s: float
    fn: Callable[[Context], Any]


SECTIONS: list[Section] = []


def section(name: str, estimate_s: float) -> Callable[[Callable[[Context], Any]], Callable[[Context], Any]]:
    """Register a check. ``estimate_s``: its expected run time, used against the budget."""

    def wrap(fn: Callable[[Context], Any]) -> Callable[[Context], Any]:
        SECTIONS.append(Section(name, estimate_s, fn))
        return fn

    return wrap


def fmt_size(n: int) -> str:
    from tierrt.sizes import format_size

    return format_size(n)


class Check(AssertionError):
    """A figure or property that misses what the section demands."""


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise Check(message)


# -------------------------------------------------------------------------------------------------- helpers


def host_arena_class() -> Any:
    try:
        from tierrt.arena import HostArena  # type: ignore[attr-defined]
    except ImportError:
        from tierrt._native import HostArena  # type: ignore[attr-defined,no-redef]
    return HostArena


def register(arena: Any) -> None:
    if hasattr(arena, "register_cuda"):
        expect(arena.register_cuda() is not False, "HostArena.register_cuda() found no CUDA device")
    else:
        arena.cuda_register()


def unregister(arena: Any) -> Any:
    for name in ("unregister_cuda", "cuda_unregister"):
        if hasattr(arena, name):
            return getattr(arena, name)()
    return None


def timed_copies(ctx: Context, dst: Any, src: Any, repeats: int) -> float:
    """Median wall-clock seconds of ``dst.copy_(src, non_blocking=True)`` on a side stream, to the
    stream's completion (wall clock rather than CUDA events, so pageable copies, which the driver stages
    on the CPU, are timed the same way as pinned ones)."""
    torch = ctx.torch
    stream = torch.cuda.Stream(device=ctx.device)
    times = []
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)  # warm-up
        stream.synchronize()
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            stream.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# -------------------------------------------------------------------------------------------------- sections


@section("environment", 5)
def environment(ctx: Context) -> dict[str, Any]:
    import tierrt
    from tierrt import topology
    from tierrt.sysinfo import format_info, info

    torch = ctx.torch
    props = torch.cuda.get_device_properties(ctx.device)
    gpus = topology.gpus()
    ctx.gpu = next((g for g in gpus if g.index == ctx.device), None)
    g = ctx.gpu
    print(f"tierrt {tierrt.__version__}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"cuda:{ctx.device}: {props.name}, {fmt_size(props.total_memory)}")
    if g is not None:
        peak = g.pcie_peak_gbps
        print(
            f"PCIe gen{g.pcie_gen} x{g.pcie_width} (now gen{g.pcie_gen_current} x{g.pcie_width_current}),"
            f" NUMA node {g.numa_node}, bus {g.pci_bus_id}, source {g.source}"
            + (f"; theoretical peak {peak:.1f} GB/s per direction" if peak else "")
        )
    print(format_info(info()))
    return {
        "name": props.name,
        "memory": props.total_memory,
        "pcie_gen": g.pcie_gen if g else None,
        "pcie_width": g.pcie_width if g else None,
        "numa_node": g.numa_node if g else None,
        "pcie_peak_gbps": g.pcie_peak_gbps if g else None,
    }


@section("arena registration", 20)
def arena_registration(ctx: Context) -> dict[str, Any]:
    """An arena on the GPU's NUMA node registers with CUDA (torch then sees its memory as pinned),
    data round-trips exactly through it, re-registering is harmless, and unregistering undoes it."""
    torch = ctx.torch
    size = ctx.args.arena_size
    node = ctx.gpu.numa_node if ctx.gpu is not None else None
    HostArena = host_arena_class()
    kw = {"nodes": [node], "policy": "bind"} if node is not None else {}
    t0 = time.perf_counter()
    arena = HostArena(size, name="gpu-check", **kw)
    created = time.perf_counter() - t0
    probe = torch.frombuffer(arena.alloc(4 * MiB), dtype=torch.uint8)
    pinned_at_creation = probe.is_pinned()  # the wrapper may register on creation when CUDA is up
    t0 = time.perf_counter()
    register(arena)
    reg_s = time.perf_counter() - t0
    expect(probe.is_pinned(), "arena memory is not pinned after register (cudaPointerGetAttributes)")
    ctx.state["arena"] = arena
    ctx.state["arena_node"] = node
    register(arena)  # idempotent
    print(
        f"arena {fmt_size(size)} on node {node}: created in {created:.2f} s"
        f" (pinned at creation: {pinned_at_creation}); register took {reg_s * 1e3:.1f} ms"
    )
    # exact round trip through the registered memory, asynchronously on a side stream
    n = 64 * MiB
    h = torch.frombuffer(arena.alloc(n), dtype=torch.uint8)
    back = torch.frombuffer(arena.alloc(n), dtype=torch.uint8)
    pattern = torch.randint(0, 256, (n,), dtype=torch.uint8)
    h.copy_(pattern)
    d = torch.empty(n, dtype=torch.uint8, device=f"cuda:{ctx.device}")
    stream = torch.cuda.Stream(device=ctx.device)
    with torch.cuda.stream(stream):
        d.copy_(h, non_blocking=True)
        d.add_(1)
        back.copy_(d, non_blocking=True)
    stream.synchronize()
    expect(torch.equal(back, pattern + 1), "H2D -> +1 -> D2H through the arena did not round-trip exactly")
    print("round trip of 64MiB through the registered arena: exact")
    return {
        "register_ms": reg_s * 1e3,
        "create_s": created,
        "pinned_at_creation": pinned_at_creation,
        "round_trip": "exact",
        "node": node,
    }


@section("H2D/D2H bandwidth: arena vs torch pinned vs pageable", 60)
def bandwidth(ctx: Context) -> dict[str, Any]:
    torch = ctx.torch
    arena = ctx.state.get("arena")
    expect(arena is not None, "no registered arena (the registration section failed)")
    sizes = [64 * MiB] if ctx.args.quick else [4 * MiB, 64 * MiB, 256 * MiB]
    sizes = [s for s in sizes if 2 * s <= ctx.args.arena_size - 2 * 64 * MiB - 8 * MiB] or [16 * MiB]
    repeats = 5 if ctx.args.quick else 10
    peak = ctx.gpu.pcie_peak_gbps if ctx.gpu is not None else None
    out: dict[str, Any] = {}
    failures = []
    print(
        f"{'size':>7}  {'dir':>4}  {'arena':>8}  {'torch':>8}  {'pageable':>8}  {'arena/torch':>11}  of peak"
    )
    for size in sizes:
        dev = torch.empty(size, dtype=torch.uint8, device=f"cuda:{ctx.device}")
        hosts = {
            "arena": torch.frombuffer(arena.alloc(size), dtype=torch.uint8),
            "torch": torch.empty(size, dtype=torch.uint8, pin_memory=True),
            "pageable": torch.empty(size, dtype=torch.uint8),
        }
        for t in hosts.values():
            t.fill_(1)
        for direction in ("h2d", "d2h"):
            figures = {}
            for kind, host in hosts.items():
                dst, src = (dev, host) if direction == "h2d" else (host, dev)
                figures[kind] = gbps(size, timed_copies(ctx, dst, src, repeats))
            ratio = figures["arena"] / figures["torch"]
            of_peak = f"{figures['arena'] / peak:.0%}" if peak else "-"
            print(
                f"{fmt_size(size):>7}  {direction:>4}  {figures['arena']:8.2f}  {figures['torch']:8.2f}"
                f"  {figures['pageable']:8.2f}  {ratio:11.2f}  {of_peak}"
            )
            out[f"{direction}_{fmt_size(size)}"] = {**figures, "ratio": ratio}
            if size >= 64 * MiB and ratio < GOAL_RATIO:
                failures.append(f"{direction} {fmt_size(size)}: arena/torch {ratio:.2f} < {GOAL_RATIO}")
        del hosts, dev, host, dst, src  # the arena ranges go back to the arena
    print(f"GB/s (decimal). Baseline: torch pinned. Goal: arena/torch >= {GOAL_RATIO} at >= 64MiB.")
    out["goal_met"] = not failures
    expect(not failures, "; ".join(failures))
    return out


@section("bidirectional H2D+D2H on two streams (arena)", 20)
def bidirectional(ctx: Context) -> dict[str, Any]:
    torch = ctx.torch
    arena = ctx.state.get("arena")
    expect(arena is not None, "no registered arena")
    size = 64 * MiB
    up_h = torch.frombuffer(arena.alloc(size), dtype=torch.uint8)
    down_h = torch.frombuffer(arena.alloc(size), dtype=torch.uint8)
    up_d = torch.empty(size, dtype=torch.uint8, device=f"cuda:{ctx.device}")
    down_d = torch.empty(size, dtype=torch.uint8, device=f"cuda:{ctx.device}")
    s1, s2 = torch.cuda.Stream(device=ctx.device), torch.cuda.Stream(device=ctx.device)
    reps = 5 if ctx.args.quick else 10
    torch.cuda.synchronize(ctx.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        with torch.cuda.stream(s1):
            up_d.copy_(up_h, non_blocking=True)
        with torch.cuda.stream(s2):
            down_h.copy_(down_d, non_blocking=True)
    torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - t0
    each = gbps(size * reps, seconds)
    print(
        f"{fmt_size(size)} x{reps} each way at once: {each:.2f} GB/s per direction, {2 * each:.2f} GB/s total"
    )
    return {"per_direction_gbps": each, "total_gbps": 2 * each}


@section("tierrt-probe GPU links (run_probe)", 30)
def probe_gpu(ctx: Context) -> dict[str, Any]:
    """The probe's own GPU measurement agrees with the sections above (same machine, same sizes)."""
    from tierrt.probe import run_probe

    prof = run_probe(quick=True, links=["gpu"], progress=False)
    print(prof.table())
    expect(prof.links, f"the probe measured no GPU link: {prof.skipped}")
    kinds = {(r.op, r.memory) for r in prof.links}
    expect(("h2d", "pinned-arena") in kinds, f"the probe did not measure the pinned arena: {prof.skipped}")
    return {f"{r.op}:{r.memory}": r.gbps for r in prof.links}


@section("unregister", 5)
def unregister_arena(ctx: Context) -> dict[str, Any]:
    torch = ctx.torch
    arena = ctx.state.pop("arena", None)
    expect(arena is not None, "no registered arena")
    probe = torch.frombuffer(arena.alloc(4096), dtype=torch.uint8)
    expect(probe.is_pinned(), "arena not pinned before unregister")
    unregister(arena)
    expect(not probe.is_pinned(), "arena memory still pinned after unregister")
    print("unregistered: torch no longer sees the arena as pinned")
    return {"ok": True}


def _llama_on_meta(ctx: Context, hidden: int, layers: int, inter: int, heads: int, kv: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device, buffers (rotary frequencies) real
        model = LlamaForCausalLM(cfg)
    return model, cfg


def _step_figures(
    rt: Any, seconds: list[float], compute: float | None, read_gbps: float | None
) -> dict[str, Any]:
    report = rt.report()
    step = report.step
    links = dict(step.bytes_by_link)
    busy = dict(step.busy_by_link)
    # Transfers that end on the GPU: "dram->gpu0" and, staged, "nvme->dram->gpu0" (whose busy time
    # includes the NVMe read, so the figure is the effective rate into the GPU)
    h2d = [k for k in links if k.split("->")[-1].startswith("gpu")]
    h2d_bytes = sum(links[k] for k in h2d)
    h2d_gbps = h2d_bytes / sum(busy[k] for k in h2d) / 1e9 if h2d and sum(busy[k] for k in h2d) else 0.0
    nvme_read = links.get("nvme->dram", 0)
    io = nvme_read / (read_gbps * 1e9) if read_gbps else 0.0
    bound = max(compute or 0.0, io)
    mean = statistics.mean(seconds)
    print(report)
    print(
        f"step {mean:.2f}s; bound max(compute {compute or 0:.2f}s, NVMe read {io:.2f}s) = {bound:.2f}s "
        f"-> {mean / bound if bound else float('nan'):.2f}x; into the GPU {h2d_gbps:.1f} GB/s; stall "
        f"{100 * report.stall_fraction:.1f}%; optimizer {step.optimizer_seconds:.2f}s of which "
        f"{step.optimizer_overlap_seconds:.2f}s overlapped backward"
    )
    return {
        "step_s": mean,
        "bound_s": bound,
        "h2d_gbps": h2d_gbps,
        "stall_fraction": report.stall_fraction,
        "optimizer_s": step.optimizer_seconds,
        "overlap_s": step.optimizer_overlap_seconds,
    }


def _nvme_read_gbps(path: str) -> float | None:
    try:
        from tierrt.probe import run_probe

        prof = run_probe(path=path, quick=True, links=["nvme"], progress=False)
        return prof.bandwidth("nvme", "dram", op="read")
    except Exception as err:  # noqa: BLE001 - the figure is optional
        print(f"(NVMe bandwidth not measured: {err})")
        return None


@section("offload training ~1B through the GPU (SGD, parameters on NVMe)", 110)
def offload_1b(ctx: Context) -> dict[str, Any]:
    """tierrt.offload with [gpu, dram (below the model), nvme]: forward/backward on the GPU with blocks
    streamed NVMe -> DRAM -> GPU, gradients back, SGD step."""
    import tempfile

    import tierrt

    torch = ctx.torch
    dev = torch.device("cuda", ctx.device)
    layers = 8 if ctx.args.quick else 22
    tokens = 512
    swap = tempfile.mkdtemp(prefix="tierrt-gpu-check-")
    read_gbps = _nvme_read_gbps(swap)
    # Compute reference: the same shape fully on the GPU, plain torch.
    model, cfg = _llama_on_meta(ctx, 2048, layers, 5632, 32, 4)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=dev)
    plain = copy_to_device(ctx, model, dev)
    opt = torch.optim.SGD(plain.parameters(), lr=1e-4)
    compute = _time_steps(ctx, plain, opt, ids, 3)
    del plain, opt
    torch.cuda.empty_cache()
    weights = sum(p.numel() * 4 for p in model.parameters())
    # DRAM: a third of the weights, but at least what staging the largest blocks between NVMe and
    # the GPU needs (the embedding and head, 3 of them in flight plus 2 gradient buffers).
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    largest = 4 * max(cfg.vocab_size * cfg.hidden_size, layer)
    dram = max(weights // 3, 6 * largest)
    print(f"weights {fmt_size(weights)}; gpu budget {fmt_size(weights // 2)}, dram {fmt_size(dram)}")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    tiers = [tierrt.gpu(ctx.device, budget=weights // 2), tierrt.dram(dram), tierrt.nvme(swap)]
    with tierrt.offload(model, tiers=tiers, optimizer=opt, init=True) as rt:
        print(rt.describe())
        seconds = _time_steps(ctx, model, opt, ids, 3, keep=True)
        out = _step_figures(rt, seconds, statistics.mean(compute), read_gbps)
    return out


@section("bf16 AdamW: largest model for one 80GB GPU, 128GiB RAM, 64GiB disk (states on NVMe)", 150)
def offload_bf16_adamw(ctx: Context) -> dict[str, Any]:
    """A ~7B Llama in bf16 compute with fp32 master weights, Adam m and v: about 121GB of training state,
    placed in 60GiB of GPU (working set), 96GiB of DRAM and the rest on NVMe."""
    import tempfile

    import tierrt

    torch = ctx.torch
    dev = torch.device("cuda", ctx.device)
    if ctx.args.quick:
        shape = (2048, 8, 5632, 32, 4)
    else:
        shape = (4096, 32, 11008, 32, 32)  # Llama-2-7B
    model, cfg = _llama_on_meta(ctx, *shape)
    params = sum(p.numel() for p in model.parameters())
    swap = tempfile.mkdtemp(prefix="tierrt-gpu-check-")
    free_disk = shutil.disk_usage(swap).free
    print(
        f"{params / 1e9:.2f}B parameters, training state {fmt_size(params * 18)}; "
        f"disk free {fmt_size(free_disk)}"
    )
    read_gbps = _nvme_read_gbps(swap)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    tiers = [
        tierrt.gpu(ctx.device, budget=60 * GiB),
        tierrt.dram(96 * GiB if not ctx.args.quick else 16 * GiB),
        tierrt.nvme(swap),
    ]
    ids = torch.randint(0, cfg.vocab_size, (1, 1024), device=dev)
    with tierrt.offload(
        model, tiers=tiers, optimizer=opt, compute_dtype=torch.bfloat16, init=True, progress=True
    ) as rt:
        print(rt.describe())
        seconds = _time_steps(ctx, model, opt, ids, 2, keep=True)
        out = _step_figures(rt, seconds, None, read_gbps)
    out["params"] = params
    return out


def copy_to_device(ctx: Context, meta_model: Any, dev: Any) -> Any:
    """A real, randomly initialised copy of a meta model, on ``dev``."""
    import copy

    model = copy.deepcopy(meta_model).to_empty(device=dev)
    with ctx.torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        # to_empty leaves every buffer uninitialised too: the rotary frequencies are real on the meta
        # model (init_empty_weights keeps buffers), so copy them over.
        real = dict(meta_model.named_buffers())
        for name, buf in model.named_buffers():
            source = real.get(name)
            if source is not None and source.device.type != "meta":
                buf.copy_(source)
    return model


def _time_steps(ctx: Context, model: Any, opt: Any, ids: Any, steps: int, keep: bool = False) -> list[float]:
    torch = ctx.torch
    times = []
    for i in range(steps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        if i:  # the first step warms up (and traces the block order)
            times.append(time.perf_counter() - start)
    print("step times: " + ", ".join(f"{t:.2f}s" for t in times))
    return times


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument(
        "--budget", type=float, default=290.0, help="total seconds (sections that do not fit are skipped)"
    )
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.add_argument("--arena-size", default="1GiB", help="size of the registered arena (default 1GiB)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--only", help="comma-separated section names (substring match)")
    p.add_argument("--require-gpu", action="store_true", help="exit 3 (not 0) when there is no GPU")
    args = p.parse_args(argv)
    from tierrt.sizes import parse_size

    args.arena_size = parse_size(args.arena_size, what="--arena-size")
    ctx = Context(args=args)
    try:
        import torch
    except ImportError as err:
        print(f"gpu_check: torch is not importable ({err}); nothing to check")
        return 3 if args.require_gpu else 0
    if not torch.cuda.is_available():
        cuda = torch.version.cuda
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}, CUDA {cuda}): nothing to do")
        return 3 if args.require_gpu else 0
    try:
        import tierrt._native  # noqa: F401 - built by pip install
        import tierrt.scheduler  # noqa: F401 - mapped from scheduler/ by the installed package
    except ImportError as err:
        print(f"gpu_check: tierrt is not installed ({err}); first run: pip install --no-build-isolation -e .")
        return 2
    ctx.torch = torch
    ctx.device = args.device
    torch.cuda.set_device(args.device)
    torch.zeros(1, device=f"cuda:{args.device}")  # create the CUDA context before any registration
    status: dict[str, str] = {}
    for sec in SECTIONS:
        if args.only and not any(w.strip() and w.strip() in sec.name for w in args.only.split(",")):
            continue
        print(f"\n== {sec.name} ==", flush=True)
        if sec.estimate_s > ctx.left():
            status[sec.name] = f"SKIP (needs ~{sec.estimate_s:.0f} s, {ctx.left():.0f} s left)"
            print(status[sec.name])
            continue
        t0 = time.monotonic()
        try:
            ctx.results[sec.name] = sec.fn(ctx)
            status[sec.name] = f"PASS ({time.monotonic() - t0:.1f} s)"
        except Check as err:
            status[sec.name] = f"FAIL ({time.monotonic() - t0:.1f} s): {err}"
            ctx.results[sec.name] = {"error": str(err)}
        except Exception as err:  # noqa: BLE001 - one shot on an expensive machine: print and go on
            traceback.print_exc()
            status[sec.name] = f"ERROR ({time.monotonic() - t0:.1f} s): {type(err).__name__}: {err}"
            ctx.results[sec.name] = {"error": f"{type(err).__name__}: {err}"}
        print(status[sec.name], flush=True)
    print(f"\n== summary ({time.monotonic() - ctx.start:.0f} s of {args.budget:.0f} s budget) ==")
    for name, st in status.items():
        print(f"  {name}: {st}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"status": status, "results": ctx.results}, f, indent=2, default=str)
    ok = all(s.startswith(("PASS", "SKIP")) for s in status.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
