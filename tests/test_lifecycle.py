"""Entering and leaving offload() many times: what a runtime holds (descriptors, threads) goes with
its context, also while the Runtime object is kept (for its report, say)."""

from __future__ import annotations

import os

import models
import pytest
import torch

import tierrt
import tierrt.io


def _descriptors() -> set[str]:
    """The targets of this process's open file descriptors."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used
            pass
    return found


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    torch.manual_seed(1)
    for _ in range(2):
        loss = model(torch.randn(4, 64)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("backend", ["io_uring", "threads"])
def test_kept_runtimes_hold_no_descriptors_or_threads(backend, nvme_dir):
    if backend not in tierrt.io.available_backends():
        pytest.skip(f"{backend} is not built here")
    model = models.mlp(0, width=64, depth=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def cycle() -> tierrt.runtime.Runtime:
        tiers = [tierrt.dram("160KiB"), tierrt.nvme(nvme_dir)]
        with tierrt.offload(model, tiers=tiers, optimizer=opt, io_backend=backend) as rt:
            assert rt.report().tiers["nvme"]["in_use"] > 0  # the model is streamed from the swap files
            _train(model, opt)
        return rt

    cycle()  # torch's own threads and lazily opened files
    fds, tasks = _descriptors(), set(os.listdir("/proc/self/task"))
    kept = [cycle() for _ in range(3)]
    assert {fd for fd in _descriptors() - fds if "anon_inode" in fd or ".swap" in fd} == set()
    assert set(os.listdir("/proc/self/task")) - tasks == set()
    assert all(rt.closed for rt in kept)
    assert all(torch.isfinite(p).all() for p in model.parameters())
