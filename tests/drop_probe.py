"""Run in a subprocess by test_dropped_runtime.py: start a runtime around a model, train a step, drop
it without ``close()``, and print what the process holds (descriptors, threads, RSS) at each point
as JSON.

Modes: ``drop`` (the runtime and the model dropped, the garbage collector disabled: reference counts
alone must free everything), ``drop-gc`` (the same, then ``gc.collect()``), ``kept`` (the runtime
object dropped, the model and its optimizer kept: they go on training, then the model is given back
with ``tierrt.runtime_of(model).close()`` and compared with the plain run, then dropped)."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import threading
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))

import models  # noqa: E402
from rss_probe import rss  # noqa: E402

import tierrt  # noqa: E402

WIDTH, DEPTH = 1024, 8  # 32 MiB of fp32 weights, AdamW's state as much again twice
DRAM = "96MiB"  # the compute tier's arena (in RSS while the runtime lives); the rest on NVMe


def figures(nvme_dir: str) -> dict[str, Any]:
    """Descriptors (all, and the swap files among them), OS threads, Python threads, RSS (after
    giving freed heap memory back to the OS, so that it counts what is held)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used
            pass
    return {
        "fds": len(targets),
        "swap_fds": sum(1 for t in targets if t.startswith(nvme_dir) or ".swap" in t),
        "tasks": len(os.listdir("/proc/self/task")),
        "threads": sorted(t.name for t in threading.enumerate()),
        "rss": rss(),
        "swap_files": sorted(os.listdir(nvme_dir)),
    }


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(i))
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = models.mlp(0, width=WIDTH, depth=DEPTH)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def started(nvme_dir: str) -> tuple[tierrt.Runtime, torch.nn.Module, torch.optim.Optimizer]:
    """A model and its optimizer in a started runtime (``rt.__enter__()``, as a notebook cell does),
    two steps trained (the second overlaps updates with backward: the optimizer's threads run)."""
    model, opt = build()
    rt = tierrt.offload(model, tiers=[tierrt.dram(DRAM), tierrt.nvme(nvme_dir)], optimizer=opt)
    rt.__enter__()
    step(model, opt, 0)
    step(model, opt, 1)
    return rt, model, opt


def warm_up(nvme_dir: str) -> None:
    """One whole cycle first: torch's threads, lazily opened files and first-use caches."""
    rt, model, opt = started(nvme_dir)
    rt.close()
    del rt, model, opt
    gc.collect()


def main() -> None:
    mode, nvme_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    warm_up(nvme_dir)
    out = {"base": figures(nvme_dir)}
    if mode in ("drop", "drop-gc"):
        gc.disable()
        rt, model, opt = started(nvme_dir)
        out["started"] = figures(nvme_dir)
        del rt, model, opt
        if mode == "drop-gc":
            gc.collect()
        out["dropped"] = figures(nvme_dir)
    elif mode == "kept":
        rt, model, opt = started(nvme_dir)
        plain, plain_opt = build()
        step(plain, plain_opt, 0)
        step(plain, plain_opt, 1)
        del rt
        gc.collect()
        out["started"] = figures(nvme_dir)
        step(model, opt, 2)  # the model goes on training through its runtime
        step(plain, plain_opt, 2)
        held = tierrt.runtime_of(model)
        out["held"] = held is not None and held.active
        held.close()
        del held
        out["equal"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
        out["closed"] = figures(nvme_dir)
        gc.disable()
        del model, opt
        out["dropped"] = figures(nvme_dir)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
