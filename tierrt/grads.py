"""Gradients of offloaded parameters, accumulated in their blocks' gradient buffers.

As autograd finishes a parameter's gradient, the gradient is copied (first micro-batch) or added
(later micro-batches) into the block's "grad" buffer in DRAM, with the same arithmetic as autograd's
own accumulation (``grad = g1``, then ``grad += g2``), so results match a run without tierrt bit for
bit. When a block's gradients are complete the buffer is written home (NVMe or CXL) and its DRAM
freed; the optimizer step reads it back.

``present`` tracks which parameters have a gradient, as ``p.grad is not None`` would: a parameter
that took part in no backward since the last ``zero_grad()`` is skipped by the optimizer, as in torch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from .blocks import ParamSlot

if TYPE_CHECKING:
    from tierrt.scheduler.pipeline import Pipeline

    from .store import BlockState, TensorStore

log = logging.getLogger("tierrt.grads")

__all__ = ["GradientStore"]


class GradientStore:
    """Accumulation, flushing and zeroing of the "grad" kind of every block."""

    def __init__(self, pipeline: Pipeline, store: TensorStore) -> None:
        self.pipeline = pipeline
        self.store = store
        self.present: dict[int, set[int]] = {}  # block index -> slot indices holding a gradient
        self.pending_blocks: set[int] = set()  # blocks whose DRAM gradient buffer is not yet home
        self.updates: Any = None  # the optimizer's pending updates (they still need these gradients)

    def has_any(self) -> bool:
        return any(self.present.values())

    def accumulate(self, bs: BlockState, slot: ParamSlot, grad: torch.Tensor) -> None:
        """Add ``grad`` (a parameter's fresh gradient) into the block's gradient buffer."""
        if self.updates is not None and self.updates.has_pending(bs.index):
            self.updates.apply(bs.index)  # it reads the gradients we are about to overwrite
        ks = bs.kinds["grad"]
        pipeline = self.pipeline
        if ks.inflight is not None:
            pipeline.wait(bs, "grad")
        present = self.present.setdefault(bs.index, set())
        if present and "dram" not in ks.valid:
            pipeline.ensure_host(bs, "grad", demand=True)  # earlier micro-batches, sent home
        elif ks.host is None:
            pipeline._room_for(ks, "dram", True, {bs.index})
        view = self.store.slot_view(bs, ks, slot, "dram")
        if grad.device.type != "cpu":
            grad = grad.to("cpu")
        if slot.index in present:
            view.add_(grad)
        else:
            view.copy_(grad)
        present.add(slot.index)
        ks.valid = {"dram"}
        self.pending_blocks.add(bs.index)

    def block_complete(self, bs: BlockState) -> None:
        """Every trainable parameter of ``bs`` received its gradient: send the buffer home."""
        self._send_home(bs)

    def end_backward(self) -> None:
        for index in sorted(self.pending_blocks):
            self._send_home(self.pipeline.blocks[index])

    def _send_home(self, bs: BlockState) -> None:
        self.pending_blocks.discard(bs.index)
        ks = bs.kinds["grad"]
        if ks.home == "dram" or ks.host is None:
            return
        self.pipeline.flush(bs, "grad", drop=True)

    def slot_grads(self, bs: BlockState) -> dict[int, torch.Tensor]:
        """Views of the present gradients of ``bs`` (its DRAM copy must be current)."""
        ks = bs.kinds["grad"]
        present = self.present.get(bs.index, set())
        return {i: self.store.slot_view(bs, ks, bs.spec.slots[i], "dram") for i in present}

    def zero(self, set_to_none: bool = True) -> None:
        """``optimizer.zero_grad()`` for offloaded parameters.

        ``set_to_none=True`` forgets every gradient (no I/O). ``set_to_none=False`` keeps them as
        zeros, as torch does, so that a following step sees zero gradients. A block whose update is
        still pending keeps its gradients until that update ran."""
        for bs in self.pipeline.blocks:
            if "grad" not in bs.kinds or not self.present.get(bs.index):
                continue
            if self.updates is not None and self.updates.on_zero_grad(bs, set_to_none):
                continue
            self.zero_block(bs, set_to_none)
        self.pending_blocks = {i for i in self.pending_blocks if self.present.get(i)}

    def zero_block(self, bs: BlockState, set_to_none: bool) -> None:
        ks = bs.kinds["grad"]
        if ks.inflight is not None:
            self.pipeline.wait(bs, "grad")
        present = self.present.get(bs.index)
        if not present:
            return
        if set_to_none:
            present.clear()
            ks.valid = set()
            if ks.host is not None and ks.home != "dram":
                self.store.drop(ks, "dram")
            self.pending_blocks.discard(bs.index)
        else:
            self.pipeline.ensure_host(bs, "grad", demand=True)
            for view in self.slot_grads(bs).values():
                view.zero_()
            ks.valid = {"dram"}
            self._send_home(bs)
