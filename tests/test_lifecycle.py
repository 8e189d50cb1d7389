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


def test_nested_offload_of_the_same_model_says_so(nvme_dir):
    model = models.mlp(0, width=64, depth=4)
    before = [p.detach().clone() for p in model.parameters()]
    tiers = [tierrt.dram("160KiB"), tierrt.nvme(nvme_dir)]
    with tierrt.offload(model, tiers=tiers):
        with pytest.raises(tierrt.HookError, match="Sequential is already offloaded by an active"):
            with tierrt.offload(model, tiers=tiers):
                pass
        with torch.no_grad():
            model(torch.randn(2, 64))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with tierrt.offload(model, tiers=tiers):  # the model can be offloaded again
        pass


def test_span_log_keeps_the_latest_spans_within_its_limit():
    from tierrt.scheduler.transfer import Span, SpanLog

    log = SpanLog(limit=100)
    for i in range(1000):  # a long run: the log's memory stops growing at its limit
        log.add(Span(f"step {i}", "transfer", "nvme->dram", float(i), i + 0.5, 4096))
    spans = log.snapshot()
    assert len(spans) == 100 and log.dropped == 900
    assert [s.name for s in spans] == [f"step {i}" for i in range(900, 1000)]  # a trace shows the latest
