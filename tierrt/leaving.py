"""Leaving :func:`tierrt.offload`: the model given back whole, and every tier freed.

Part of :class:`tierrt.runtime.Runtime` (a mixin, as :mod:`tierrt.placing` is: the runtime's module
keeps to entering and reading values inside the context; this one holds what ``close()`` does):

- the last step's pending updates are applied and every transfer lands (:meth:`GivingBack._settle`);
- what entering put on the model, its optimizer and torch is taken off (:meth:`GivingBack._take_down`);
- buffers, optimizer state, parameters (their trained values, in their dtype, on the device they
  came from) and gradients not cleared come back, each on its own, so that one failure does not keep
  the others from coming back (:meth:`GivingBack._give_back`); a parameter whose value cannot be read
  back holds NaN and the error names it;
- a runtime whose model was dropped without ``close()`` frees everything and gives nothing back
  (:meth:`GivingBack._discard`);
- when the with-block's own error is propagating, an error of giving the model back (the last
  step rolled back because its state could not be written home) is added to it as a note
  (:meth:`GivingBack._note_failed_leaving`), so that what the model holds is not told in a log only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from .errors import HookError, listed, noted, restated
from .interrupts import HeldInterrupts
from .loading import LoadPatch
from .sizes import format_size

if TYPE_CHECKING:
    from .store import BlockState

log = logging.getLogger("tierrt")


class GivingBack:
    """``close()`` and what it does (see the module's docstring). They use the
    :class:`~tierrt.runtime.Runtime`'s state (``store``, ``pipeline``, ``blockwise``, ``grads``,
    ``hooks``, ``_originals``, ...)."""

    def close(self) -> None:
        """Give the model back (trained values, original devices) and free every tier. A Ctrl-C
        meanwhile is raised once the model is back (stopping half way would leave it neither
        offloaded nor whole)."""
        if self.closed:
            return
        if not self.active:
            self.closed = True
            return
        if self._finalizer is not None:
            self._finalizer.detach()  # closed: nothing left for the model's end to free
        with HeldInterrupts("giving the model back"):
            self._give_back()

    def _note_failed_leaving(self, error: BaseException, close_error: BaseException) -> None:
        """Leaving the with-block after ``error`` (the block's own, which goes on propagating) met
        ``close_error`` while giving the model back, which does not propagate: e.g. the last step,
        whose ``step()`` had returned, rolled back because its state could not be written home
        (its message says which step's values the model holds). Called from ``__exit__``; the
        model is back as far as ``close_error`` says (lost parameters raise instead)."""
        log.exception("tierrt: restoring the model after an error in the with-block failed")
        told = _told(close_error)
        noted(
            error,
            f"tierrt: leaving the with-block after this error, giving the model back met another: {told}",
        )

    def _discard(self) -> None:
        """Free everything of a runtime whose model was dropped without ``close()``: hooks and
        patches, threads, the I/O engine, files and tier memory. Nothing is given back (the values
        are discarded); parameters something still holds (an optimizer) are left on the meta device."""
        if not self.active:
            return
        self._discarding = True
        self.restore_on_exit = False
        self._give_back()

    def _give_back(self) -> None:
        errors: list[BaseException] = []
        # Giving the model back must not fail for want of DRAM room (memory still viewed by tensors
        # kept from inside the context): what does not fit in the arena goes outside the budget.
        self.store.overflow = True  # type: ignore[union-attr]
        self._settle(errors, keep_assigned=self._restores_values())
        self._end_open_step(errors)
        self._take_down(errors)
        for restore in (
            self._restore_buffers,
            self._export_optimizer_state,
            self._restore_all,
            self._tie_standins,
        ):
            try:  # each on its own: a lost optimizer state does not keep the weights from coming back
                restore()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        try:
            if self._restores_values():
                self._restore_grads()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        from .runtime import _OWNERS, _OWNERS_LOCK

        with _OWNERS_LOCK:
            for bs in self.store.blocks:  # type: ignore[union-attr]
                for slot in bs.spec.slots:
                    _OWNERS.pop(id(slot.param), None)
        try:
            self.pipeline.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        self._let_go_of_updates()
        self.store.close()  # type: ignore[union-attr]
        self.active = False
        self.closed = True
        if errors:
            raise _first_of(errors)

    def _settle(self, errors: list[BaseException], keep_assigned: bool) -> None:
        """Apply the last step's pending updates, let every transfer land, and take gradients
        assigned by hand into the tiers (dropped unless ``keep_assigned``). Failures are added to
        ``errors``: what follows goes on regardless."""
        try:
            if self.blockwise is not None and not self._discarding:  # pending updates of the last step
                self.store.within_budget_first(self.blockwise.finish)  # type: ignore[union-attr]
            self.pipeline.drain()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        try:
            if self.grads is not None:  # p.grad = g by hand: given back with the others
                self.grads.take_assigned(drop=not keep_assigned)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def _end_open_step(self, errors: list[BaseException]) -> None:
        """After :meth:`_settle` failed part way (e.g. the writes that make room for the last step's
        pending updates failed): finish that step once more, and when it stays open, roll it back
        (the wording of a step rolled back on a failed write), so that every value is whole before
        anything is read to be given back. Otherwise the first read that applies a pending update
        could roll the step back half way through giving back: the value it was reading, or the
        optimizer state being exported, would be lost though the rollback left it whole."""
        updates = self.blockwise.updates if self.blockwise is not None else None
        if updates is None or self._discarding or not (updates.pending or updates.step_open):
            return
        try:
            self.blockwise.finish()  # type: ignore[union-attr]
            self.pipeline.drain()
        except BaseException as exc:  # noqa: BLE001
            errors.append(updates.rollback(exc))  # exc itself when no step is open (any more)

    def _take_down(self, errors: list[BaseException]) -> None:
        """Remove what :meth:`_install` put on the model, its optimizer and torch (hooks, method
        patches, the optimizer's replaced methods); the values stay where they are, in the tiers.
        Each removal on its own: one that fails (added to ``errors``) does not keep the others, or
        the model's values, from coming back."""
        from .adopt import OptimizerAdoption
        from .amp import AmpPatch
        from .averaging import AveragingPatch
        from .clip import ClipPatch
        from .functional import FunctionalPatch

        removals = [
            self.hooks.remove if self.hooks is not None else None,
            self.blockwise.remove if self.blockwise is not None else None,
            self._unpatch_model,
            self._deepcopy_patch.remove,
            lambda: ClipPatch.remove(self),
            lambda: AmpPatch.remove(self),
            lambda: AveragingPatch.remove(self),
            lambda: LoadPatch.remove(self),
            lambda: OptimizerAdoption.remove(self),
            lambda: FunctionalPatch.remove(self),
        ]
        for remove in removals:
            if remove is None:
                continue
            try:
                remove()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    def _let_go_of_updates(self) -> None:
        """Once the model is back and the pipeline closed: the pipeline and the gradient store let go
        of the optimizer's updates (which hold the pipeline, the optimizer and its state), so that a
        closed runtime keeps them in no reference cycle until a garbage collection. Not earlier:
        giving the model back reads through them (a failed step's blocks read as committed)."""
        for holder in (self.pipeline, self.grads):
            if holder is not None:
                holder.updates = None
        if self.pipeline is not None:
            self.pipeline.on_write_error = None

    def _restore_buffers(self) -> None:
        for module_ref, name, device in getattr(self, "_buffer_devices", []):
            module = module_ref()
            buf = module._buffers.get(name) if module is not None else None
            if buf is not None:
                module._buffers[name] = buf.to(device)
        self._buffer_devices = []

    def _restores_values(self) -> bool:
        """Whether leaving gives parameters real values (not for meta models unless restore=True)."""
        if self.restore_on_exit is False:
            return False
        if self.restore_on_exit:
            return True
        return any(device.type != "meta" for device, _ in self._originals.values())

    def _tie_standins(self) -> None:
        """``w = p.detach()`` (or ``p.data``) taken inside and still held: after the model is back,
        ``w`` views ``p``'s memory, as the alias it is in torch."""
        if self.hooks is None:
            return
        for standin, param in self.hooks.standins_left:
            if not param.is_meta and standin.shape == param.shape and standin.dtype == param.dtype:
                standin.data = param.data
            if "tierrt_standin_of" in standin.__dict__:
                del standin.tierrt_standin_of
        self.hooks.standins_left = []

    def _export_optimizer_state(self) -> None:
        if self.blockwise is not None and self._restores_values():
            self.blockwise.export_state()  # the optimizer keeps working on the restored model

    def _restore_all(self) -> None:
        if self._discarding:
            pass  # the model was dropped: its runtime's warning said so
        elif self.restore_on_exit is False:
            log.warning(
                "tierrt: restore=False: the model's parameters are left without values (meta); "
                "their values are discarded with the tiers"
            )
        elif self.restore_on_exit is None:
            meta = sum(1 for dev, _ in self._originals.values() if dev.type == "meta")
            if meta and self._trained:
                log.warning(
                    "tierrt: %d parameters came from the meta device and stay there: their trained "
                    "values are discarded with the tiers unless saved with rt.save(path) first",
                    meta,
                )
        lost: list[tuple[str, BaseException]] = []
        for bs in self.store.blocks:  # type: ignore[union-attr]
            for slot in bs.spec.slots:
                try:
                    self._restore_slot(bs, slot)
                except Exception as exc:  # noqa: BLE001 - its value cannot be read back (I/O, corrupt)
                    lost.append((slot.name, exc))
                    device, dtype = self._originals[id(slot.param)]
                    slot.param.data = torch.full(
                        slot.shape,
                        float("nan"),
                        dtype=dtype,
                        device="cpu" if device.type == "meta" else device,
                    )
            bs.attached = False
        if self.optimizer is not None:
            self._move_optimizer_state()
        if lost:
            names = listed([name for name, _ in lost], 8)
            first = lost[0][1]
            message = (
                f"tierrt could not give back {len(lost)} of the model's parameters ({names}): their "
                f"stored values could not be read ({first}). They now hold NaN; every other parameter "
                "holds its trained value. Reload the lost ones from a checkpoint"
            )
            error = restated(first, message)
            if error is first:
                error = HookError(message)
            error.lost_parameters = [name for name, _ in lost]  # type: ignore[attr-defined]
            raise error from first

    def _restore_slot(self, bs: BlockState, slot: Any) -> None:
        device, dtype = self._originals[id(slot.param)]
        if (device.type == "meta" and not self.restore_on_exit) or self.restore_on_exit is False:
            from .runtime import _swap_tensor

            _swap_tensor(slot.param, torch.empty(slot.shape, dtype=dtype, device="meta"))
            return
        slot.param.data = self._materialize(
            bs,
            slot,
            device=torch.device("cpu") if device.type == "meta" else device,
            dtype=dtype,
        )

    def _restore_grads(self) -> None:
        """Gradients still in the tiers (accumulated and not cleared by ``zero_grad()``, stepped or
        not) go back to ``p.grad`` on the restored parameters, in their dtype and on their device,
        as a run without tierrt would hold them; an ``optimizer.step()`` after the with-block then
        applies them. Parameters without one keep ``p.grad`` None. Runs after every value is back."""
        if self.grads is None:
            return
        count = nbytes = 0
        for bs in self.store.blocks:  # type: ignore[union-attr]
            for slot in bs.spec.slots:
                param = slot.param
                if not bs.trains(slot.index) or param.is_meta:
                    continue
                value = self.grads.read(bs, slot.index)
                if value is not None:
                    param.grad = value.to(device=param.device, dtype=param.dtype)
                    count, nbytes = count + 1, nbytes + param.grad.nbytes
        if count:
            log.info(
                "tierrt: gradients not cleared by zero_grad() are given back in p.grad: %d parameters, %s",
                count,
                format_size(nbytes),
            )

    def _move_optimizer_state(self) -> None:
        """Optimizer state made during blockwise steps lives on the CPU; follow the parameters."""
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if not state:
                    continue
                for key, value in state.items():
                    if (
                        isinstance(value, torch.Tensor)
                        and value.shape == p.shape
                        and value.device != p.device
                    ):
                        state[key] = value.to(p.device)


def _rolled_back(error: BaseException) -> bool:
    """Whether ``error`` is a step's rollback (:mod:`tierrt.scheduler.optimizer` words every one so:
    "Step N (...) was rolled back ..."), which says which step's values the model holds."""
    return ") was rolled back " in str(error)


def _told(error: BaseException) -> str:
    """``error`` for a note: its class, message and notes."""
    return "\n".join([f"{type(error).__name__}: {error}", *getattr(error, "__notes__", [])])


def _first_of(errors: list[BaseException]) -> BaseException:
    """The error to raise of those giving the model back met: lost parameters first (what the user
    must act on), then a step rolled back (which step's values the model holds), with each other
    one added to it as a note (and logged), so that none is told in a log only."""
    errors.sort(key=lambda error: (not getattr(error, "lost_parameters", None), not _rolled_back(error)))
    first = errors[0]
    for other in errors[1:]:
        if other is first:
            continue
        log.error("tierrt: while giving the model back: %s", other)
        noted(first, f"tierrt: giving the model back also met: {_told(other)}")
    return first
