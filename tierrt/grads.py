"""Gradients of offloaded parameters, accumulated in their blocks' gradient buffers.

As autograd finishes a parameter's gradient, the gradient is copied (first micro-batch) or added
(later micro-batches) into the block's "grad" buffer in DRAM, with the same arithmetic as autograd's
own accumulation (``grad = g1``, then ``grad += g2``), so results match a run without tierrt bit for
bit. When a block's gradients are complete the buffer is written home (NVMe or CXL) and its DRAM
freed; the optimizer step reads it back.

``present`` tracks which parameters have a gradient, as ``p.grad is not None`` would: a parameter
that took part in no backward since the last ``zero_grad()`` is skipped by the optimizer, as in torch.

A gradient assigned by hand (``p.grad = g``, e.g. from ``torch.autograd.grad``, which fires no
accumulation hook) *replaces* the stored one, as in torch: it is taken into the store
(:meth:`GradientStore.take`) before anything reads or adds to the gradients (a backward reaching
the parameter, ``step()``, ``zero_grad()``, clipping, ``rt.grad()``, leaving the context), and
``p.grad`` goes back to None. Until then the user's tensor stays in ``p.grad``, holding its memory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from .blocks import ParamSlot
from .errors import HookError

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
        # Multipliers applied to a slot's gradient since it was computed (clip_grad_norm_, loss
        # scaling), kept as factors rather than applied, so no gradient I/O is needed for them.
        self.muls: dict[tuple[int, int], list[float]] = {}
        # Per-parameter gradient norms by norm type, computed when a block's gradients are complete
        # (for the norm types clip_grad_norm_ asked for before), so clipping needs no I/O.
        self.norms: dict[tuple[int, int, float], torch.Tensor] = {}
        self.tracked_norms: set[float] = set()
        self._generation: dict[int, int] = {}  # block -> changes to its gradients (speculation checks it)

    def generation(self, index: int) -> int:
        return self._generation.get(index, 0)

    def _changed(self, index: int) -> None:
        self._generation[index] = self._generation.get(index, 0) + 1
        if self.updates is not None:
            self.updates.speculator.discard(index)

    def has_any(self) -> bool:
        return any(self.present.values())

    def cleared(self) -> bool:
        """Whether no gradient is held once the pending updates have run: every block still holding
        gradients has them cleared (set to None) by a ``zero_grad()`` waiting for its update."""
        waiting = self.updates.zero_after if self.updates is not None else {}
        return all(not present or waiting.get(index) is True for index, present in self.present.items())

    def accumulate(self, bs: BlockState, slot: ParamSlot, grad: torch.Tensor) -> None:
        """Add ``grad`` (a parameter's fresh gradient) into the block's gradient buffer."""
        self._write(bs, slot, grad, replace=False)

    def assign(self, bs: BlockState, slot: ParamSlot, grad: torch.Tensor) -> None:
        """``param.grad = grad``: replace the parameter's stored gradient (if any) by ``grad``."""
        self._write(bs, slot, grad, replace=True)

    def _write(self, bs: BlockState, slot: ParamSlot, grad: torch.Tensor, replace: bool) -> None:
        """Copy (first gradient, or ``replace``) or add ``grad`` into ``slot``'s share of the buffer."""
        if self.updates is not None and self.updates.has_pending(bs.index):
            self.updates.apply(bs.index)  # it reads the gradients we are about to overwrite
        self._changed(bs.index)
        if replace:
            self.muls.pop((bs.index, slot.index), None)  # factors of the value being replaced
        if any(key[0] == bs.index for key in self.muls):
            self.realize(bs)  # the stored value is grad * factors: make it so before adding
        ks = bs.kinds["grad"]
        pipeline = self.pipeline
        if ks.inflight is not None:
            pipeline.wait(bs, "grad")
        present = self.present.setdefault(bs.index, set())
        for norm_type in self.tracked_norms:
            self.norms.pop((bs.index, slot.index, norm_type), None)
        add = slot.index in present and not replace
        kept = present - {slot.index} if replace else present  # stored values the buffer must keep
        if kept and "dram" not in ks.valid:
            pipeline.ensure_host(bs, "grad", demand=True)  # earlier micro-batches, sent home
        elif ks.host is None:
            pipeline.room_for(ks, "dram", True, {bs.index})
        view = self.store.slot_view(bs, ks, slot, "dram")
        with torch.no_grad():
            if add:
                view.add_(grad.to("cpu") if grad.device.type != "cpu" else grad)
            else:
                view.copy_(grad)  # from a GPU: one synchronous DMA straight into the pinned arena
        present.add(slot.index)
        ks.valid = {"dram"}
        self.pending_blocks.add(bs.index)

    def clear(self, bs: BlockState, slot_index: int) -> None:
        """``param.grad = None`` for one parameter: forget its stored gradient (the others in the
        block keep theirs). A pending update of the block, which reads it, is applied first."""
        if self.updates is not None and self.updates.has_pending(bs.index):
            self.updates.apply(bs.index)
        present = self.present.get(bs.index)
        if not present or slot_index not in present:
            return
        if present == {slot_index}:
            self.zero_block(bs, set_to_none=True)
            return
        ks = bs.kinds["grad"]
        if ks.inflight is not None:
            self.pipeline.wait(bs, "grad")
        self._changed(bs.index)
        present.discard(slot_index)
        self.muls.pop((bs.index, slot_index), None)
        for norm_type in self.tracked_norms:
            self.norms.pop((bs.index, slot_index, norm_type), None)

    # ---- gradients assigned by hand (p.grad = g) -------------------------------------------------
    def take(self, bs: BlockState, slot: ParamSlot) -> None:
        """Move a gradient assigned by hand to ``slot``'s parameter (``p.grad = g``) into the store,
        replacing what it held, as the assignment does in torch; ``p.grad`` is None afterwards (the
        stored copy is the gradient now). Nothing to do when ``p.grad`` is None. Raises
        :class:`HookError` (leaving ``p.grad`` as it is) for a gradient the store cannot hold."""
        grad = slot.param.grad
        if grad is None:
            return
        if grad.layout != torch.strided or tuple(grad.shape) != tuple(slot.shape):
            raise HookError(
                f"the gradient assigned to {slot.name} ({grad.layout}, shape {list(grad.shape)}) cannot "
                f"be stored by tierrt: offloaded gradients are dense tensors of the parameter's shape "
                f"{list(slot.shape)}",
                parameter=slot.name,
            )
        self.assign(bs, slot, grad.detach())
        slot.param.grad = None

    def take_assigned(self, drop: bool = False) -> None:
        """:meth:`take` every gradient assigned by hand to an offloaded parameter (those blocks'
        buffers are then sent home); with ``drop`` (``zero_grad(set_to_none=True)`` follows), only
        forget them."""
        for bs in self.pipeline.blocks:
            if "grad" not in bs.kinds:
                continue
            taken = False
            for slot in bs.spec.slots:
                if slot.param.grad is None or not bs.trains(slot.index):
                    continue
                if drop:
                    slot.param.grad = None
                else:
                    self.take(bs, slot)
                    taken = True
            if taken:
                self._send_home(bs)

    def block_complete(self, bs: BlockState) -> None:
        """Every trainable parameter of ``bs`` received its gradient: start its update ahead of
        ``step()`` if the loop's pattern allows (speculation), and send the buffer home."""
        if self.updates is not None:
            self.updates.speculator.start(bs)
        self._send_home(bs)

    def end_backward(self) -> None:
        if self.updates is not None:
            self.updates.speculator.on_backward_end()
        for index in sorted(self.pending_blocks):
            self._send_home(self.pipeline.blocks[index])

    def _send_home(self, bs: BlockState) -> None:
        self.pending_blocks.discard(bs.index)
        ks = bs.kinds["grad"]
        if self.tracked_norms and ks.host is not None and "dram" in ks.valid:
            self._compute_norms(bs)
        if ks.home == "dram" or ks.host is None:
            return
        self.pipeline.flush(bs, "grad", drop=True)

    def slot_grads(self, bs: BlockState) -> dict[int, torch.Tensor]:
        """Views of the present gradients of ``bs`` (its DRAM copy must be current)."""
        ks = bs.kinds["grad"]
        present = self.present.get(bs.index, set())
        return {i: self.store.slot_view(bs, ks, bs.spec.slots[i], "dram") for i in present}

    def zero(self, set_to_none: bool = True, only: set[int] | None = None) -> None:
        """``optimizer.zero_grad()`` for offloaded parameters.

        ``set_to_none=True`` forgets every gradient (no I/O). ``set_to_none=False`` keeps them as
        zeros, as torch does, so that a following step sees zero gradients. A block whose update is
        still pending keeps its gradients until that update ran. Gradients assigned by hand
        (``p.grad = g``) are cleared too. ``only`` (ids of parameters) limits it to those, as an
        optimizer's ``zero_grad()`` clears its own parameters' gradients and leaves the others."""
        self.take_assigned(drop=set_to_none and only is None)
        for bs in self.pipeline.blocks:
            present = self.present.get(bs.index)
            if "grad" not in bs.kinds or not present:
                continue
            if only is not None:
                slots = bs.spec.slots
                cleared = {i for i in present if id(slots[i].param) in only}
                if cleared != present:
                    self._zero_slots(bs, cleared, set_to_none)
                    continue
            if self.updates is not None and self.updates.on_zero_grad(bs, set_to_none):
                continue
            self.zero_block(bs, set_to_none)
        self.pending_blocks = {i for i in self.pending_blocks if self.present.get(i)}

    def _zero_slots(self, bs: BlockState, slot_indices: set[int], set_to_none: bool) -> None:
        """Clear some of ``bs``'s gradients and keep the others (parameters outside the optimizer
        whose ``zero_grad()`` this is)."""
        if not slot_indices:
            return
        if self.updates is not None and self.updates.has_pending(bs.index):
            self.updates.apply(bs.index)  # it reads these gradients
        ks = bs.kinds["grad"]
        for slot_index in sorted(slot_indices):
            if set_to_none:
                self.clear(bs, slot_index)
            else:
                slot = bs.spec.slots[slot_index]
                dtype = ks.layout.dtypes[ks.layout.slots.index(slot_index)]
                self.assign(bs, slot, torch.zeros(slot.shape, dtype=dtype))

    def zero_block(self, bs: BlockState, set_to_none: bool) -> None:
        self._forget_factors(bs)
        self._changed(bs.index)
        ks = bs.kinds["grad"]
        forgotten = False
        if ks.inflight is not None:
            if set_to_none and self.pipeline.is_writing_home(ks):
                self.pipeline.forget_write(bs, "grad")  # no need to wait for it
                forgotten = True
            else:
                self.pipeline.wait(bs, "grad")
        present = self.present.get(bs.index)
        if not present:
            return
        if set_to_none:
            present.clear()
            ks.valid = set()
            if ks.host is not None and ks.home != "dram":
                if forgotten:
                    ks.host = None  # the write in flight holds the buffer until it lands
                else:
                    self.store.drop(ks, "dram")
            self.pending_blocks.discard(bs.index)
        else:
            self.pipeline.ensure_host(bs, "grad", demand=True)
            for view in self.slot_grads(bs).values():
                view.zero_()
            ks.valid = {"dram"}
            self._send_home(bs)

    # ---- clipping support ----------------------------------------------------------------------
    def _forget_factors(self, bs: BlockState) -> None:
        for key in [k for k in self.muls if k[0] == bs.index]:
            del self.muls[key]
        for key in [k for k in self.norms if k[0] == bs.index]:
            del self.norms[key]

    def _compute_norms(self, bs: BlockState) -> None:
        grads = self.slot_grads(bs)
        for norm_type in self.tracked_norms:
            slots = [i for i in grads if (bs.index, i) not in self.muls]
            if slots:
                values = torch._foreach_norm([grads[i] for i in slots], norm_type)
                for i, value in zip(slots, values):
                    self.norms[(bs.index, i, norm_type)] = value

    def norm(self, bs: BlockState, slot_index: int, norm_type: float) -> torch.Tensor:
        """torch's norm of one parameter's gradient (as ``torch._foreach_norm`` computes it)."""
        self.tracked_norms.add(norm_type)
        key = (bs.index, slot_index, norm_type)
        factors = self.muls.get((bs.index, slot_index), [])
        if not factors and key in self.norms:
            return self.norms[key]
        with self._slot_grad(bs, slot_index) as grad:
            if factors:
                grad = grad.clone()
                for factor in factors:
                    grad.mul_(factor)
            value = torch._foreach_norm([grad], norm_type)[0]
        if not factors:
            self.norms[key] = value
        return value

    def nonfinite(self, bs: BlockState, slot_index: int) -> bool:
        """Whether one parameter's gradient holds inf or NaN (one fused pass, as GradScaler checks)."""
        from .optim import kernels

        with self._slot_grad(bs, slot_index) as grad:
            return kernels.grad_stats(grad).has_inf_or_nan

    @contextlib.contextmanager
    def _slot_grad(self, bs: BlockState, slot_index: int) -> Iterator[torch.Tensor]:
        """One parameter's current gradient in DRAM, held there while the caller reads it."""
        if self.updates is not None and self.updates.has_pending(bs.index):
            self.updates.apply(bs.index)
        ks = bs.kinds["grad"]
        self.pipeline.ensure_host(bs, "grad")
        ks.pins += 1
        try:
            yield self.store.slot_view(bs, ks, bs.spec.slots[slot_index], "dram")
        finally:
            ks.pins -= 1

    def read(self, bs: BlockState, slot_index: int) -> torch.Tensor | None:
        """A fresh CPU copy of one parameter's accumulated gradient (factors recorded by
        :meth:`scale` applied, as ``p.grad`` would show them), None when it has none."""
        # zero_grad() after step() waits for the block's pending update: its verdict counts now
        cleared = self.updates.zero_after.get(bs.index) if self.updates is not None else None
        if cleared or slot_index not in self.present.get(bs.index, ()):
            return None
        if cleared is False:  # zero_grad(set_to_none=False)
            ks = bs.kinds["grad"]
            dtype = ks.layout.dtypes[ks.layout.slots.index(slot_index)]
            return torch.zeros(bs.spec.slots[slot_index].shape, dtype=dtype)
        with self._slot_grad(bs, slot_index) as grad:
            value = grad.to(device="cpu", copy=True)
        for factor in self.muls.get((bs.index, slot_index), []):
            value.mul_(factor)
        return value

    def scale(self, bs: BlockState, slot_index: int, factor: float) -> None:
        """``grad.mul_(factor)`` for one parameter, recorded as a factor (applied at the update)."""
        self.muls.setdefault((bs.index, slot_index), []).append(factor)
        self._changed(bs.index)
        for norm_type in self.tracked_norms:
            self.norms.pop((bs.index, slot_index, norm_type), None)

    def realize(self, bs: BlockState) -> None:
        """Apply the recorded factors to the stored gradients of ``bs`` (in place, in order)."""
        keys = [k for k in self.muls if k[0] == bs.index]
        if not keys:
            return
        ks = bs.kinds["grad"]
        self.pipeline.ensure_host(bs, "grad")
        for key in keys:
            view = self.store.slot_view(bs, ks, bs.spec.slots[key[1]], "dram")
            for factor in self.muls.pop(key):
                view.mul_(factor)
        ks.valid = {"dram"}
        self.pending_blocks.add(bs.index)

    def clamp(self, bs: BlockState, slots: list[int], value: float) -> None:
        """``clip_grad_value_`` for some parameters of ``bs``."""
        if self.updates is not None and self.updates.has_pending(bs.index):
            self.updates.apply(bs.index)
        self.realize(bs)
        ks = bs.kinds["grad"]
        self.pipeline.ensure_host(bs, "grad")
        self._changed(bs.index)
        for slot_index in slots:
            self.store.slot_view(bs, ks, bs.spec.slots[slot_index], "dram").clamp_(min=-value, max=value)
            for norm_type in self.tracked_norms:
                self.norms.pop((bs.index, slot_index, norm_type), None)
        ks.valid = {"dram"}
        self._send_home(bs)
