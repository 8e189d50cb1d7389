"""An offloaded model runs on the thread that entered its context.

tierrt's torch-function mode and saved-tensor hooks belong to the thread that entered, and the
pipeline serves one thread: a forward from another thread (a training loop moved into a worker, an
evaluation thread running beside training) is refused with a HookError before it touches a block,
and the model is still given back whole. Entering the context inside the worker thread is the way,
and trains bit for bit like plain torch.
"""

from __future__ import annotations

import os
import signal
import threading

import models
import pytest
import torch
from test_offload_numerics import streaming_budget

import tierrt
from tierrt.errors import HookError


def _train(model, opt, data) -> None:
    for batch in data:
        models.mlp_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()


def _in_thread(fn) -> BaseException | None:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    worker = threading.Thread(target=body, name="trainer")
    worker.start()
    worker.join()
    return errors[0] if errors else None


def test_forward_on_another_thread_is_refused_and_the_model_survives(nvme_dir):
    data = models.mlp_batches(3)
    reference = models.mlp()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=1e-2)
    _train(reference, ref_opt, data[:2])

    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    tiers = [tierrt.dram(streaming_budget(model, adam=False)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(model, tiers=tiers, optimizer=opt):
        _train(model, opt, data[:2])
        error = _in_thread(lambda: _train(model, opt, data[2:]))
        assert isinstance(error, HookError)
        assert "'trainer'" in str(error) and "'MainThread'" in str(error)
        with torch.no_grad():  # the owner thread goes on as if nothing happened
            model(data[0][0])
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_entering_inside_the_worker_thread_trains_like_plain(nvme_dir):
    data = models.mlp_batches(3)
    reference = models.mlp()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    _train(reference, ref_opt, data)

    model = models.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def run() -> None:
        tiers = [tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]
        with tierrt.offload(model, tiers=tiers, optimizer=opt):
            _train(model, opt, data)

    assert _in_thread(run) is None
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forward_in_a_forked_child_raises_clearly(nvme_dir):
    """A child forked while the context is active (os.fork, multiprocessing's "fork") has neither
    the tiers' memory nor their I/O threads: its forward raises HookError (it used to wait forever
    for a fetch no thread would do); the parent trains on."""
    model = models.llama(layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = models.token_batches(1)[0]
    with tierrt.offload(
        model, tiers=[tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)], optimizer=opt
    ):
        models.lm_loss(model, ids).backward()
        opt.step()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what the forward did, never return into pytest
            message = b"no error"
            try:
                signal.alarm(60)
                with torch.no_grad():
                    models.lm_loss(model, ids)
            except tierrt.HookError as exc:
                message = str(exc).encode()
            except BaseException as exc:  # noqa: BLE001
                message = repr(exc).encode()
            finally:
                os.write(write, message[:4000])
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            message = pipe.read().decode()
        os.waitpid(pid, 0)
        assert "forked from process" in message and "spawn" in message, message
        models.lm_loss(model, ids).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
