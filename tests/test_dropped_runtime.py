"""A runtime started and dropped without ``close()`` (``rt.__enter__()`` in a notebook cell run again).

- Dropped with its model: nothing can use it any more; reference counts alone free everything
  (threads joined, I/O engine and swap files closed, arenas unmapped), with a warning.
- Dropped while the model is kept: the model's hooks hold the runtime (it holds the model's values);
  the model trains on, ``tierrt.runtime_of(model).close()`` gives it back, and a second
  ``offload()`` of it says so.

The process-wide figures (descriptors, threads, RSS) are measured in a subprocess (drop_probe.py).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import weakref

import models
import pytest
import torch

import tierrt

MiB = 1 << 20


def _probe(mode: str, nvme_dir: str) -> tuple[dict, str]:
    script = os.path.join(os.path.dirname(__file__), "drop_probe.py")
    done = subprocess.run(
        [sys.executable, script, mode, nvme_dir], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _same_resources(now: dict, base: dict) -> None:
    for key in ("fds", "swap_fds", "tasks", "threads", "swap_files"):
        assert now[key] == base[key], (key, now[key], base[key])


@pytest.mark.parametrize("mode", ["drop", "drop-gc"])
def test_a_runtime_dropped_with_its_model_frees_everything(mode, nvme_dir):
    out, stderr = _probe(mode, nvme_dir)
    base, started, dropped = out["base"], out["started"], out["dropped"]
    # while it lives: its I/O threads, the engine's descriptors and swap files, the DRAM arena
    tierrt_threads = {"tierrt-fetch", "tierrt-flush", "tierrt-optimizer", "tierrt-optimizer-write"}
    assert tierrt_threads <= set(started["threads"])
    assert started["swap_fds"] > 0 and started["tasks"] >= base["tasks"] + 5  # and the I/O engine's
    assert started["rss"] > base["rss"] + 64 * MiB
    # dropped ("drop": with the garbage collector disabled): all of it gone
    _same_resources(dropped, base)
    assert dropped["rss"] < base["rss"] + 16 * MiB, (dropped["rss"] - base["rss"]) / MiB
    assert "was not closed" in stderr and "rt.close()" in stderr


def test_a_kept_model_keeps_its_runtime_and_trains_on(nvme_dir):
    out, stderr = _probe("kept", nvme_dir)
    assert out["held"] and out["equal"]  # trained on after `del rt`, given back by runtime_of().close()
    _same_resources(out["closed"], out["base"])
    _same_resources(out["dropped"], out["base"])
    assert "was not closed" not in stderr


def _tiers(nvme_dir: str) -> list:
    return [tierrt.dram("1MiB"), tierrt.nvme(nvme_dir)]


def test_a_second_offload_of_a_model_whose_runtime_was_dropped_names_the_fix(nvme_dir):
    model = models.mlp(0, width=64, depth=4)
    before = [p.detach().clone() for p in model.parameters()]
    rt = tierrt.offload(model, tiers=_tiers(nvme_dir))
    rt.__enter__()
    del rt  # the cell is run again: its runtime object is gone, the model holds the runtime
    gc.collect()
    again = tierrt.offload(model, tiers=_tiers(nvme_dir))
    with pytest.raises(tierrt.HookError, match=r"tierrt\.runtime_of\(model\)\.close\(\)"):
        again.__enter__()
    held = tierrt.runtime_of(model)
    assert held is not None and held.active and held.model is model
    held.close()
    assert tierrt.runtime_of(model) is None
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with again:  # given back: it can be offloaded again
        assert tierrt.runtime_of(model) is again


def test_the_runtime_object_holds_its_model(nvme_dir):
    x = torch.randn(2, 64)
    expected = models.mlp(0, width=64, depth=4)(x)
    with tierrt.offload(models.mlp(0, width=64, depth=4), tiers=_tiers(nvme_dir)) as rt:
        gc.collect()
        assert torch.equal(rt.model(x), expected)  # only `rt` holds the model
    assert "Runtime of Sequential, closed" in repr(rt)


def test_an_optimizer_kept_after_its_model_was_dropped_is_its_own_again(nvme_dir, caplog):
    model = models.mlp(0, width=64, depth=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rt = tierrt.offload(model, tiers=_tiers(nvme_dir), optimizer=opt)
    rt.__enter__()
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    core = weakref.ref(rt._runtime)
    with caplog.at_level(logging.WARNING, logger="tierrt"):
        del rt, model
    assert "was not closed" in caplog.text
    assert core() is None or not core().active
    assert "step" not in opt.__dict__ and "zero_grad" not in opt.__dict__  # tierrt's patches are gone
    assert not tierrt.runtime_of(torch.nn.Linear(1, 1))
    opt.step()  # its parameters have no gradients (nor values): nothing happens


def test_a_runtime_dropped_on_another_thread_is_freed_and_its_stacks_cleaned_up_later(nvme_dir, caplog):
    """The last reference goes on a worker thread: the runtime is freed there; its torch-function
    mode and saved-tensor hooks (the entering thread's) pass everything through until the next
    runtime started on that thread takes them off."""
    import threading

    model = models.mlp(0, width=64, depth=4)
    rt = tierrt.offload(model, tiers=_tiers(nvme_dir))
    rt.__enter__()
    core = weakref.ref(rt._runtime)
    box = [rt, model]
    del rt, model
    with caplog.at_level(logging.WARNING, logger="tierrt"):
        worker = threading.Thread(target=box.clear)
        worker.start()
        worker.join()
    assert "was not closed" in caplog.text and "freed on another one" in caplog.text
    assert core() is None or not core().active
    assert torch._C._len_torch_function_stack() == 1  # inert: calls pass through
    plain = models.mlp(0, width=64, depth=4)
    x = torch.randn(2, 64)
    expected = plain(x)
    other = models.mlp(0, width=64, depth=4)
    with tierrt.offload(other, tiers=_tiers(nvme_dir)):
        assert torch.equal(other(x), expected)
    assert torch._C._len_torch_function_stack() == 0
    assert torch._C._autograd._top_saved_tensors_default_hooks(True) is None
