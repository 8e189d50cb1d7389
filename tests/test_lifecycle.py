"""Entering and leaving offload() many times: what a runtime holds (descriptors, threads) goes with
its context, also while the Runtime object is kept (for its report, say)."""

from __future__ import annotations

import os
import signal
import threading

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


def test_a_closed_runtime_holds_its_optimizer_in_no_reference_cycle(nvme_dir):
    """After leaving the context, dropping the runtime, the model and the optimizer frees them
    (the optimizer's state too) by reference counting alone."""
    import gc
    import weakref

    def trained() -> tuple[weakref.ref, weakref.ref, weakref.ref]:
        model = models.mlp(0, width=64, depth=4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with tierrt.offload(model, tiers=[tierrt.dram("160KiB"), tierrt.nvme(nvme_dir)], optimizer=opt) as rt:
            _train(model, opt)
        assert rt.closed
        return weakref.ref(rt), weakref.ref(model), weakref.ref(opt)

    trained()  # first uses (torch keeps a frame of its first optimizer built until a collection)
    gc.collect()
    gc.disable()
    try:
        runtime, model, opt = trained()
        assert runtime() is None and model() is None and opt() is None
    finally:
        gc.enable()


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


# ---- Ctrl-C ------------------------------------------------------------------------------------
# SIGINT is raised (signal.raise_signal, as a Ctrl-C would arrive) at a chosen point inside tierrt;
# the model must come back with the weights of a whole step (before or after it), never a mix, and
# a new context on it must train on exactly like the plain run.


def _plain_states(steps: int) -> list[dict[str, torch.Tensor]]:
    """The plain run's weights (and AdamW's step count) after 0, 1, ... ``steps`` steps."""
    model = models.mlp(0, width=64, depth=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    for i in range(steps):
        _one_step(model, opt, i)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def _one_step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(i))
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _which_step(model: torch.nn.Module, states: list[dict[str, torch.Tensor]]) -> int | None:
    now = model.state_dict()
    return next((k for k, s in enumerate(states) if all(torch.equal(now[n], s[n]) for n in s)), None)


def _interrupt_on_call(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, call: int) -> list[int]:
    """Make the ``call``-th call of ``owner.name`` on the main thread (the one signals interrupt)
    raise SIGINT in the middle (after it started)."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args: object, **kwargs: object) -> object:
        calls[0] += threading.current_thread() is threading.main_thread()
        if calls[0] == call:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.mark.parametrize(
    "where",
    [
        ("tierrt.optim.updaters.NativeAdamUpdater", "apply", 3),  # one block's update
        ("tierrt.scheduler.speculation.Speculator", "commit", 3),  # step() recording the blocks
        ("tierrt.hooks.HookSet", "install", 1),  # entering
        ("tierrt.runtime.Runtime", "_restore_slot", 3),  # leaving
    ],
    ids=["update", "record", "enter", "exit"],
)
def test_ctrl_c_leaves_a_whole_step_and_a_usable_model(where, monkeypatch, nvme_dir):
    import importlib

    states = _plain_states(5)
    module_name, class_name = where[0].rsplit(".", 1)
    owner = getattr(importlib.import_module(module_name), class_name)
    model = models.mlp(0, width=64, depth=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tiers = [tierrt.dram("160KiB"), tierrt.nvme(nvme_dir)]
    done = 0
    _interrupt_on_call(monkeypatch, owner, where[1], where[2])
    with pytest.raises(KeyboardInterrupt):
        with tierrt.offload(model, tiers=tiers, optimizer=opt):
            for i in range(3):
                _one_step(model, opt, i)
                done = i + 1
    monkeypatch.undo()
    k = _which_step(model, states)
    assert k in (done, done + 1), f"the weights are not those of step {done} or {done + 1}"
    opt.zero_grad()
    with tierrt.offload(model, tiers=tiers, optimizer=opt):  # the model can be offloaded again
        for i in range(k, k + 2):
            _one_step(model, opt, i)
    assert _which_step(model, states) == k + 2


def test_report_and_trace_before_entering(tmp_path):
    import json

    rt = tierrt.offload(models.mlp(0, width=64, depth=4), tiers=[tierrt.dram("160KiB")])
    assert rt.report().total.steps == 0
    trace = json.loads(open(rt.trace(tmp_path / "t.json")).read())  # it raised AttributeError
    assert [e["ph"] for e in trace["traceEvents"]] == ["M"]
