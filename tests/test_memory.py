"""Peak memory of a run through tierrt: the DRAM budget, the activations, and a small constant.

Measured in subprocesses (so nothing else in the test session counts), with the kernel's own peak
RSS counter (VmHWM, reset before the measured phase).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import models
import torch

import tierrt

HERE = os.path.dirname(__file__)
MARGIN = 48 << 20  # tierrt's own memory outside its arenas (threads, Python objects) and allocator slack


def run_probe(mode: str, nvme_dir: str, budget: int, width: int = 512, env: dict | None = None) -> dict:
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "rss_probe.py"), mode, nvme_dir, str(budget), str(width)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_peak_rss_is_budget_plus_activations(nvme_dir, capsys):
    budget = 32 << 20
    plain = run_probe("plain", nvme_dir, budget)
    ours = run_probe("tierrt", nvme_dir, budget)
    model = plain["model_bytes"]
    assert budget < model / 2
    assert ours["streamed"] > 2 * model  # weights really came from NVMe every step
    # Plain: the loop adds gradients (the model's size) and the step's activations and temporaries to
    # the process as it was with the model built.
    activations = max(plain["peak"] - plain["built"] - model, 0)
    # Through tierrt the model's own memory is released on entry (it lives in the arena and on NVMe);
    # the loop may add the arena, the activations and tierrt's own small overhead.
    above = ours["peak"] - (ours["built"] - model)
    overhead = above - budget - activations
    with capsys.disabled():
        print(
            f"\n[memory] model {model / 2**20:.1f}MiB, budget {budget / 2**20:.0f}MiB, activations "
            f"{activations / 2**20:.1f}MiB; peak above the process without the model: plain "
            f"{(plain['peak'] - plain['built'] + model) / 2**20:.1f}MiB, tierrt {above / 2**20:.1f}MiB; "
            f"tierrt's own memory outside its arena {overhead / 2**20:.1f}MiB"
        )
    assert above <= budget + activations + MARGIN, (ours, plain)


def test_autocast_keeps_no_cast_weights(nvme_dir, capsys):
    """torch.autocast over fp32 offloaded weights: its cast cache and the casts autograd saves for
    backward would hold a bf16 copy of every weight (half the model) outside the budget. The peak
    under autocast stays at the fp32 run's (bf16 activations are smaller than fp32 ones)."""
    budget = 48 << 20
    # A fixed mmap threshold: glibc then maps every large buffer on its own and unmaps it when freed,
    # so the peak RSS follows live memory rather than what the heap kept of transient casts.
    env = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    fp32 = run_probe("tierrt", nvme_dir, budget, width=768, env=env)
    autocast = run_probe("tierrt-autocast", nvme_dir, budget, width=768, env=env)
    model = fp32["model_bytes"]
    assert model / 2 > 4 * (16 << 20)  # the casts would be far above the tolerance below

    def above(run: dict) -> int:
        return run["peak"] - (run["built"] - model)

    with capsys.disabled():
        print(
            f"\n[autocast memory] model {model / 2**20:.0f}MiB, budget {budget / 2**20:.0f}MiB; peak "
            f"above the process without the model: fp32 {above(fp32) / 2**20:.1f}MiB, autocast "
            f"{above(autocast) / 2**20:.1f}MiB"
        )
    assert above(autocast) <= above(fp32) + (16 << 20), (fp32, autocast)


def test_leaving_frees_the_tiers_while_the_runtime_is_kept(nvme_dir):
    """``with tierrt.offload(...) as rt:`` keeps ``rt`` bound after the block (for its report): the
    DRAM arena (reserved and populated on entry, sized to what the placement needs) must go back to
    the system on leaving anyway."""
    import psutil

    model = models.mlp(width=256)
    opt = torch.optim.AdamW(model.parameters())
    budget = 256 << 20
    process = psutil.Process()
    with tierrt.offload(model, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)], optimizer=opt) as rt:
        for batch in models.mlp_batches(2, width=256):
            models.mlp_loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
        inside = process.memory_info().rss
        reserved = rt.report().tiers["dram"]["reserved"]  # what the placement needs, within the budget
    after = process.memory_info().rss
    assert 64 << 20 <= reserved <= budget
    assert inside - after > 0.8 * reserved, (inside, after, reserved)
    report = rt.report()  # still answers, with the figures of the moment it closed
    assert report.tiers["dram"]["peak_in_use"] > 0
    assert "host arenas 0B" in str(report)
