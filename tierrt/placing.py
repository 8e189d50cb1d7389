"""Placing an offloaded model again, and optimizers :func:`tierrt.offload` was not given.

Part of :class:`tierrt.runtime.Runtime` (a mixin, so that the runtime's module keeps to placing
and reading, and :mod:`tierrt.leaving` to leaving; this one holds what changes a placement while
the context is active):

- ``model.train()`` inside a context entered in eval mode: the model is placed again with room for
  gradients (:meth:`PlacingAgain._make_room_for_gradients`).
- An optimizer built inside the context is noted when it is constructed (:mod:`tierrt.adopt`),
  adopted at its first ``step()`` with its state in process memory
  (:meth:`PlacingAgain.adopt_optimizer`), and, at the first ``zero_grad()`` that leaves no
  gradients, the model is placed again with it so that its state lives in the tiers
  (:meth:`PlacingAgain.after_zero_grad`). A second optimizer takes over from an adopted one
  (:meth:`PlacingAgain._let_go_of_adopted`).

Placing again streams (:meth:`PlacingAgain._relocate`, :mod:`tierrt.relocation`): a new plan, new
swap files and new blocks in the same memory arenas, filled from the current placement one block at
a time, so process memory holds about one block beyond the budgets, however large the model; that
also works for a model whose values never were in memory (``weights=`` on the meta device,
``restore=False``). What the memory tiers hold is set aside in a scratch swap file meanwhile, and
the nvme tier holds the old and the new swap files for that moment: when it has no room for that
(checked first), the model is given back into memory and placed from there (``close()`` then
``start()``) where its values can come back, and otherwise stays placed as it was (a warning says
so). A failure part way puts the old placement back in use; Ctrl-C waits until one is whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import _native
from .errors import ConfigError, HookError, IOEngineError, TierCapacityError, TierrtError, noted
from .interrupts import HeldInterrupts
from .optim.blockwise import BlockwiseOptimizer
from .optim.updaters import native_refusal, torch_state_in_tiers
from .placement import Placement
from .relocation import NoRoomToPlaceAgain, Relocation, saved_bytes
from .sizes import format_size
from .store import HostTier, NvmeTierStore, TensorStore
from .tiers import CxlTier, DramTier, GpuTier, NvmeTier

if TYPE_CHECKING:
    from .blocks import Partition
    from .runtime import NvmeSizing

log = logging.getLogger("tierrt")

__all__ = ["PlacingAgain", "weak_callback"]


def weak_callback(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (bound to a runtime) as a callback that holds the runtime weakly, and does nothing
    once it is gone: an optimizer or a hook set given a callback must not keep its runtime (and the
    optimizer's state, the model's hooks) in a reference cycle after the runtime is closed."""
    ref = weakref.WeakMethod(method)

    def callback(*args: Any, **kwargs: Any) -> Any:
        bound = ref()
        return None if bound is None else bound(*args, **kwargs)

    return callback


@dataclass
class PlacedState:
    """A placement and what uses it, kept while placing again to go back to it on failure."""

    store: TensorStore
    engine: Any
    pipeline: Any
    partition: Partition
    placement: Placement
    step_atomic: bool
    blockwise: BlockwiseOptimizer | None
    planned_blockwise: BlockwiseOptimizer | None


class PlacingAgain:
    """The runtime's methods that place the model again or adopt an optimizer (see the module). They
    use the :class:`~tierrt.runtime.Runtime`'s state (``model``, ``optimizer``, ``blockwise``,
    ``grads``, ``hooks``, ...) and its ``close()`` / ``start()``."""

    def _make_room_for_gradients(self) -> None:
        """``model.train()`` inside a context entered with the model in eval mode and no optimizer
        (a model from ``from_pretrained()`` handed to a ``Trainer``): the tiers were planned without
        gradients. Place the model again with room for them (one pass over its weights), so that
        the training that follows has its gradients in the tiers and its optimizer adopted."""
        if not self.active or self.grads is not None or self._train_requested:
            return
        if not any(p.requires_grad for p in self.model.parameters()):
            return
        if self.hooks is not None and self.hooks.in_forward():
            return
        self._train_requested = True
        optimizer = self._optimizer_to_place()
        if optimizer is not None:  # one pass for both: room for gradients and the optimizer's state
            self._place_again_with(optimizer, "model.train() inside a context entered in eval mode")
            return
        log.warning(
            "tierrt: model.train() inside a context entered in eval mode (no optimizer given): "
            "placing the model again with room for gradients (one pass over its weights). Call "
            "model.train() before tierrt.offload(), or pass optimizer=, to skip this"
        )
        try:
            self._place_again()
        except TierrtError as error:
            if not self.active:
                if not self.closed:
                    noted(error, self._given_back_note())
                raise
            log.warning(
                "tierrt: the model could not be placed again (%s): it has no room for gradients; "
                "call model.train() before entering",
                error,
            )

    def _why_not_placeable_again(self) -> str | None:
        """Why the model cannot be given back into process memory and placed again from there (its
        values would not come back: parameters from the meta device, ``restore=False``), or None
        when it can. Only the fallback of placing again needs that (see :meth:`_place_again`)."""
        if any(device.type == "meta" for device, _ in self._originals.values()):
            return "parameters from the meta device"
        if self.restore_on_exit is False:
            return "restore=False"
        return None

    def _place_again(self) -> None:
        """Place the model again with the optimizer and training mode set now, streamed from the
        current placement block by block (:meth:`_relocate`). When the nvme tier has no room for
        the new swap files beside the old ones, fall back to giving the model back into memory and
        placing it from there (``close()`` then ``start()``), where its values can come back; else
        raise :class:`~tierrt.errors.TierCapacityError` with the model placed as it was. A runtime
        that fallback left given back (its ``start()`` failed: see :meth:`_given_back_note`) is placed
        from process memory directly: its old placement is gone."""
        self._placing_again = True
        try:
            if not self.active:  # given back by this fallback before, and its start() failed
                self.start()
                return
            try:
                self._relocate()
                return
            except NoRoomToPlaceAgain as no_room:
                why_not = self._why_not_placeable_again()
                if why_not is not None:
                    raise TierCapacityError(
                        f"{no_room}; the model cannot be given back into memory to be placed again from "
                        f"there either ({why_not}), so it stays placed as it was",
                        **no_room.details,
                    ) from None
                log.warning(
                    "tierrt: %s; placing it again from process memory instead (the whole model comes "
                    "back into memory for that moment)",
                    no_room,
                )
            self._close_and_start()
        finally:
            self._placing_again = False

    def _close_and_start(self) -> None:
        """Give the model back and place it again (one pass over its weights, which are all in
        process memory for that moment). The values come from the parameters (given back by
        ``close()``), not from a ``weights=`` checkpoint."""
        self.close()
        self.closed = False
        self.blockwise = None
        self.weights_source = None
        self.start()

    def _relocate(self) -> None:
        """Place the model again from its current placement (see :mod:`tierrt.relocation`): a new
        plan, swap files and blocks in the same memory arenas, filled one old block at a time, then
        the old swap files freed. Checks first what can be known to fail (the plan, the budgets,
        room on the nvme tier: :class:`NoRoomToPlaceAgain`) and leaves everything as it was then;
        a failure later (an I/O error) puts the old placement back in use before raising. Ctrl-C
        waits until one placement or the other is whole."""
        assert self.store is not None and self.pipeline is not None
        old_store, compute_device = self.store, self.pipeline.device
        params = list(dict.fromkeys(self.model.parameters()))
        budgets = self._budgets_of(old_store)
        with self._as_given_back():
            partition, placement, blockwise = self._plan(self.model, params, self.pipeline.compute, budgets)
        if blockwise is not None:
            blockwise.names = {key: names[0] for key, names in self._aliases.items()}
            blockwise.check_existing_state()
        scratch_bytes = saved_bytes(old_store) if self._nvme_spec() is not None else 0
        sizing = self._nvme_sizing(placement, blockwise, reserved=scratch_bytes)
        self._check_room_to_place_again(sizing.size, scratch_bytes)
        log.info("tierrt placement (placed again): %s", placement.describe())
        with HeldInterrupts("placing the model again"):
            before = self._placed_state()
            relocation = self._set_aside(before, sizing, scratch_bytes, compute_device, placement)
            relocation.release()  # from here the memory tiers are the new placement's
            new_store = self.store
            assert new_store is not None
            self._fit_arenas(placement, (before.store, new_store))
            self.partition, self.placement = partition, placement
            self._relocation = relocation
            try:
                with self._as_given_back():
                    imported = self._fill(new_store, partition, placement, blockwise, compute_device)
            except BaseException as error:
                self._relocation = None
                self._go_back(before, relocation, new_store, compute_device, error)
                raise
            self._relocation = None
            before.pipeline.close()
            relocation.close()  # the old swap files and the scratch area
            self._let_go(new_store, compute_device)
            self._install(self.model, params, new_store, partition, blockwise, imported, compute_device)
        from .runtime import _trim_heap

        _trim_heap()

    @staticmethod
    def _fit_arenas(placement: Placement, stores: tuple[TensorStore, ...]) -> None:
        """An arena is sized to the placement it was made for (its budget at most); the new one may
        need more of it (room for gradients, optimizer state). The old placement's ranges were
        just released, so such an arena is made again at the new size, under the same budget; the
        old one returns to the system once nothing views it any more."""
        tiers = stores[0].host_tiers
        for name, tier in list(tiers.items()):
            size = placement.host_bytes(name, tier.budget)
            if size <= tier.size:
                continue
            registered = tier.registered_cuda
            tier.close()
            bigger = HostTier(tier.spec, tier.budget, size=size)
            if registered:
                bigger.register_cuda()
            for store in stores:
                store.host_tiers[name] = bigger
                if name == "dram":
                    store.dram = bigger

    def _go_back(
        self,
        before: PlacedState,
        relocation: Relocation,
        new_store: TensorStore,
        compute_device: torch.device,
        error: BaseException,
    ) -> None:
        """Filling the new placement failed with ``error``: free it and use the old one again (its
        memory-tier values come back from the scratch area). When even that fails, the runtime ends
        (nothing of it stays installed) and a HookError says the values are lost."""
        self._discard_placement(new_store)
        try:
            relocation.restore()
            relocation.close_scratch()
            self._put_back(before, compute_device)
        except BaseException as second:  # noqa: BLE001 - reported with the first below
            self._abandon(before, relocation)
            raise HookError(
                f"placing the model again failed ({error}), and so did putting the previous placement "
                f"back ({second}): the offloaded parameters' values are lost and the tierrt context is "
                "closed. Reload the model from a checkpoint"
            ) from second

    def _abandon(self, before: PlacedState, relocation: Relocation) -> None:
        """Free everything of a runtime whose values are lost (see :meth:`_go_back`)."""
        from .runtime import _OWNERS, _OWNERS_LOCK

        with _OWNERS_LOCK:
            for param in self.model.parameters():
                _OWNERS.pop(id(param), None)
        for close in (before.pipeline.close, relocation.close, before.store.close):
            try:
                close()
            except BaseException:  # noqa: BLE001
                log.exception("tierrt: freeing a runtime whose values are lost")
        self.active, self.closed = False, True

    @contextlib.contextmanager
    def _as_given_back(self) -> Iterator[None]:
        """For the time of the ``with``: every offloaded parameter shows the dtype and device that
        leaving would give it back with (a placeholder without memory; the CPU for one from the meta
        device), as planning and filling a placement read them (master weights, optimizer state
        dtypes); their ``.data`` is put back after."""
        assert self.pipeline is not None
        placeholders = self.pipeline.placeholders
        saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        try:
            for param in dict.fromkeys(self.model.parameters()):
                if id(param) not in self._originals:
                    continue
                device, dtype = self._originals[id(param)]
                saved.append((param, param.data))
                device = torch.device("cpu") if device.type == "meta" else device
                param.data = placeholders.get(param.shape, dtype, device)
            yield
        finally:
            for param, data in saved:
                param.data = data

    def _set_aside(
        self,
        before: PlacedState,
        sizing: NvmeSizing,
        scratch_bytes: int,
        compute_device: torch.device,
        placement: Placement,
    ) -> Relocation:
        """Take the runtime's hooks and patches down, make the new swap files (``self.store`` is then
        the new store, over the same arenas), and copy what the old placement holds in memory tiers
        to a scratch area. On failure the old placement is put back in use and the error raised."""
        errors: list[BaseException] = []
        self._settle(errors, keep_assigned=False)
        if errors:
            raise errors[0]  # nothing taken down yet: the runtime goes on as it was
        self._take_down(errors)
        if errors:
            raise errors[0]
        relocation = Relocation(before.store, before.pipeline)
        new_store = None
        try:
            self._restore_buffers()
            self._untie_standins()
            relocation.settle()
            try:
                new_store = self._make_store(sizing, {}, None, compute_device, placement, reuse=before.store)
                relocation.save(self._scratch_store(scratch_bytes))
            except (TierCapacityError, IOEngineError) as error:
                if isinstance(error, IOEngineError) and not error.is_no_space:
                    raise
                raise NoRoomToPlaceAgain(
                    f"placing the model again: no room for the new swap files on the nvme tier ({error})",
                    **error.details,
                ) from error
        except BaseException:
            relocation.close_scratch()
            if new_store is not None:
                self._discard_placement(new_store)
            self._put_back(before, compute_device)
            raise
        return relocation

    def _budgets_of(self, store: TensorStore) -> dict[str, int | None]:
        """The budgets ``store``'s tiers were made with, in the tiers' order (placing again keeps the
        arenas, and so their budgets)."""
        budgets: dict[str, int | None] = {}
        for spec in self.tier_specs:
            if isinstance(spec, GpuTier):
                assert store.gpu is not None
                budgets[spec.name] = store.gpu.budget
            elif isinstance(spec, (DramTier, CxlTier)):
                name = "dram" if isinstance(spec, DramTier) else spec.name
                budgets[name] = store.host_tiers[name].budget
            elif isinstance(spec, NvmeTier):
                budgets["nvme"] = None
        return budgets

    def _nvme_spec(self) -> NvmeTier | None:
        """The nvme tier among the tiers, or None."""
        return next((t for t in self.tier_specs if isinstance(t, NvmeTier)), None)

    def _check_room_to_place_again(self, size: int, scratch_bytes: int) -> None:
        """Raise :class:`NoRoomToPlaceAgain` unless every filesystem under the nvme tier has room for
        the new swap files (``size``) and the scratch area beside the files already there."""
        spec = self._nvme_spec()
        if spec is None or not (size or scratch_bytes):
            return
        count = len(spec.paths)
        share = -(-size // count) + -(-scratch_bytes // count) + 2 * spec.stripe + (1 << 20)
        from .runtime import _existing_ancestor

        need: dict[int, tuple[int, int, str]] = {}  # device -> (bytes needed, free, a path on it)
        for path in spec.paths:
            where = _existing_ancestor(path)
            usage, device = shutil.disk_usage(where), os.stat(where).st_dev
            needed = need.get(device, (0, usage.free, path))[0] + share
            need[device] = (needed, usage.free, path)
        for needed, free, path in need.values():
            if free < needed:
                raise NoRoomToPlaceAgain(
                    f"placing the model again needs {format_size(needed)} on the nvme tier at {path} "
                    f"for a moment (the new swap files beside the current ones, "
                    f"{format_size(scratch_bytes)} of it to set aside what the memory tiers hold) but "
                    f"{format_size(free)} is free there. Free space there, or pass the optimizer to "
                    "tierrt.offload(optimizer=) and call model.train() before entering (no placing again)",
                    tier="nvme",
                    path=path,
                    requested=needed,
                    free=free,
                )

    def _scratch_store(self, nbytes: int) -> NvmeTierStore | None:
        """Swap files of ``nbytes`` on the nvme tier to set the memory tiers' contents aside while
        placing again (None: no nvme tier or nothing to set aside; memory holds it then)."""
        spec = self._nvme_spec()
        if spec is None or not nbytes:
            return None
        engine = _native.IOEngine(self.io_backend, self.queue_depth, 1 << 20)
        try:
            return NvmeTierStore(spec, nbytes, engine)
        except BaseException:
            engine.close()
            raise

    def _untie_standins(self) -> None:
        """``w = p.detach()`` taken inside and still held: ``w`` gets a copy of ``p``'s value now
        (it viewed the old placement's memory), as after leaving and entering again."""
        if self.hooks is None:
            return
        for standin, param in self.hooks.standins_left:
            if id(param) in self._slot_index and standin.shape == param.shape:
                bs, slot_index = self._slot_index[id(param)]
                slot = bs.spec.slots[slot_index]
                standin.data = self._materialize(bs, slot, standin.device, standin.dtype)
            if "tierrt_standin_of" in standin.__dict__:
                del standin.tierrt_standin_of
        self.hooks.standins_left = []

    def _placed_state(self) -> PlacedState:
        """What :meth:`_put_back` needs to use the current placement again."""
        assert self.store is not None and self.partition is not None and self.placement is not None
        return PlacedState(
            store=self.store,
            engine=self.engine,
            pipeline=self.pipeline,
            partition=self.partition,
            placement=self.placement,
            step_atomic=getattr(self, "_step_atomic", False),
            blockwise=self.blockwise,
            planned_blockwise=self._planned_blockwise,
        )

    def _put_back(self, before: PlacedState, compute_device: torch.device) -> None:
        """Use the placement ``before`` again (placing again failed): its blocks attached as they
        were, hooks and patches installed, the optimizer it stepped connected."""
        self.store, self.engine, self.pipeline = before.store, before.engine, before.pipeline
        self.partition, self.placement = before.partition, before.placement
        self._step_atomic = before.step_atomic
        self.pipeline.updates = None
        params = list(dict.fromkeys(self.model.parameters()))
        self._let_go(before.store, compute_device)
        blockwise = before.blockwise
        self._install(self.model, params, before.store, before.partition, blockwise, [], compute_device)
        self._planned_blockwise = before.planned_blockwise

    def _discard_placement(self, store: TensorStore) -> None:
        """Free a placement made while placing again and not used: its pipeline's transfers, its
        blocks' buffers in the shared arenas, its swap files (the arenas stay)."""
        pipeline = self.pipeline
        if pipeline is not None and pipeline.store is store:
            try:
                pipeline.close()
            except BaseException:  # noqa: BLE001 - the error that brought us here is the one raised
                log.exception("tierrt: draining the transfers of a placement given up")
        for bs in store.blocks:
            for ks in bs.kinds.values():
                if ks.gpu is not None and store.gpu is not None:
                    store.gpu.release(ks.nbytes)
                ks.gpu, ks.host, ks.far = None, None, None
        store.blocks.clear()
        if store.nvme is not None:
            store.nvme.close()

    # ---- optimizers built inside the context (see tierrt.adopt) ------------------------------------
    def note_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer`` was just built over parameters this runtime offloads: remember it (weakly;
        the most recent one counts), to place the model again with it at the next safe point."""
        self._noted = weakref.ref(optimizer)

    def after_zero_grad(self, set_to_none: bool) -> None:
        """A ``zero_grad()`` of the model, of an optimizer over its parameters, or of the optimizer
        tierrt steps has run. When it left no gradient in the tiers and no forward, backward or step
        is running, this is a safe point: place the model again with an optimizer whose state the
        tiers can hold and do not hold yet (:meth:`_optimizer_to_place`)."""
        if not set_to_none or not self.active or self._placing_again:
            return
        if self.hooks is not None and self.hooks.in_forward():
            return
        if self.blockwise is not None and self.blockwise.stepping:
            return
        optimizer = self._optimizer_to_place()
        if optimizer is None or (self.grads is not None and not self.grads.cleared()):
            return
        self._place_again_with(optimizer, "zero_grad() left no gradients")

    def _optimizer_to_place(self) -> torch.optim.Optimizer | None:
        """The optimizer to place the model again with: the adopted one when the placement was not
        planned with it (its state is in process memory), else, when tierrt steps no optimizer yet,
        the one noted last. None when there is none, or placing again would not help or is not
        possible."""
        if self.optimizer is not None:
            adopted_in_memory = self._adopted and self.blockwise is not self._planned_blockwise
            candidate = self.optimizer if adopted_in_memory else None
        else:
            candidate = self._noted() if self._noted is not None else None
        if candidate is None or candidate in self._kept_in_memory:
            return None
        if not self._tiers_can_hold_state_of(candidate):
            return None
        return candidate

    def _tiers_can_hold_state_of(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether placing the model again with ``optimizer`` would home its state in the tiers (as
        passing it to ``offload()`` would): tierrt's native kernels step it (its options allow them,
        ``native_optimizer`` is not False), or torch's own step keeps its state tensors there (torch's
        optimizers, any mode, unless ``native_optimizer=True`` would refuse them)."""
        if self.native_optimizer is not False and native_refusal(optimizer) is None:
            return True
        return self.native_optimizer is not True and torch_state_in_tiers(optimizer)

    def _place_again_with(self, optimizer: torch.optim.Optimizer, occasion: str) -> None:
        """Place the model again with ``optimizer`` as the one tierrt steps (its state, also what
        torch made in adopted steps, goes into the tiers). When that fails (its state does not fit
        the budgets: passing it to ``offload()`` would have failed the same way), place the model
        again without it: it is adopted at its next ``step()`` with its state in memory, and not
        tried again."""
        name = type(optimizer).__name__
        log.warning(
            "tierrt: %s: placing the model again with %s, which was not passed to tierrt.offload(), so "
            "that its state lives in the tiers under their budgets and its updates overlap backward "
            "(one pass over the model's weights). Pass it to tierrt.offload(model, ..., optimizer=opt) "
            "(with a transformers Trainer: build opt first, Trainer(..., optimizers=(opt, None))) to "
            "skip this",
            occasion,
            name,
        )
        self._noted = None
        previous = (self.optimizer, self._adopted)
        self.optimizer, self._adopted = optimizer, True
        try:
            self._place_again()
        except Exception as error:  # noqa: BLE001 - any failure to place with it: go on without it
            if self.closed:
                raise  # failed giving the model back, not placing it: nothing to fall back to
            self._kept_in_memory.add(optimizer)
            # Still placed as before (placing again checks first, or puts the old placement back),
            # or, after the fallback gave the model back, not placed: then placed again without it.
            self.optimizer, self._adopted = previous if self.active else (None, False)
            placed = self.active and (self.grads is not None or not self._train_requested)
            log.warning(
                "tierrt: the model could not be placed with %s's state in the tiers (%s); %s, and %s "
                "is adopted at its next step() with its state in process memory, outside the tiers' "
                "budgets",
                name,
                error,
                "it stays placed as it was" if placed else "it is placed again without it",
                name,
            )
            if not placed:
                self._place_again_without(name)

    def _place_again_without(self, name: str) -> None:
        """Placing the model again with ``name`` (the optimizer) failed and left it without a usable
        placement: given back into process memory by the fallback of :meth:`_place_again` (whose
        ``start()`` then failed), or still placed without room for gradients. Place it again without
        that optimizer's state; when even that fails the error says where every value is."""
        try:
            self._place_again()
        except BaseException as error:
            if not self.active and not self.closed:
                noted(error, self._given_back_note(name))
            raise

    def _given_back_note(self, optimizer: str | None = None) -> str:
        """What a failure to place the model again means once the fallback of :meth:`_place_again`
        gave it back into process memory (``close()``) and placing it from there failed: nothing is
        lost, and nothing is offloaded any more."""
        state = f", {optimizer}'s state in its state" if optimizer is not None else ""
        return (
            "tierrt: placing the model again had given it back into process memory first (no room "
            "on the nvme tier for a second placement beside the first), and placing it from there "
            "failed: the model is no longer offloaded, and nothing is lost (its parameters hold their "
            f"current values on their own devices{state}). Leave the with-block, and enter "
            "tierrt.offload() again once the tiers have room"
        )

    # ---- adopting an optimizer not passed to offload() ----------------------------------------------
    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Take over ``optimizer``, which was not passed to :func:`offload` and is stepping this
        model's parameters (called from ``optimizer.step()`` by :mod:`tierrt.adopt`), as
        ``offload(optimizer=...)`` would have, from the step in progress on. Its updates are torch's
        own, applied block by block; its state stays in the optimizer (process memory), since the
        tiers were planned without it, until a safe point places the model again with it when the
        tiers can hold that state (:meth:`after_zero_grad`). Raises HookError / ConfigError when it
        cannot be adopted."""
        name = type(optimizer).__name__
        advice = (
            "pass the optimizer to tierrt.offload(model, ..., optimizer=opt) (with a transformers "
            "Trainer: build opt first, Trainer(..., optimizers=(opt, None)))"
        )
        if self.optimizer is not None and self._adopted:
            if optimizer in self._handed_back and self._stepped_once_since_adopted():
                self._take_turns(optimizer, self.optimizer)
            self._let_go_of_adopted(name)
            self._steps_since_takeover = 0
        if self.optimizer is not None:
            raise HookError(
                f"{name} steps parameters offloaded by a tierrt.offload() that steps them with another "
                f"optimizer ({type(self.optimizer).__name__}); tierrt steps an offloaded model with one "
                "optimizer: put every parameter group into the optimizer passed to offload()"
            )
        if self.grads is None:
            raise HookError(
                f"{name} was not passed to tierrt.offload(), and the model was in eval mode with no "
                "optimizer when the context was entered, so its gradients have no place in the tiers and "
                f"{name} would step nothing. Call model.train() before entering, or {advice}"
            )
        if self.native_optimizer:
            raise ConfigError(
                f"offload(native_optimizer=True) but {name} was created inside the context: only an "
                f"optimizer known when the model is placed runs on tierrt's kernels; {advice}"
            )
        assert self.partition is not None and self.store is not None
        self._state_in_master_dtype(optimizer)
        blockwise = BlockwiseOptimizer(
            optimizer,
            self.partition.block_of_param,
            native=False,
            state_in_tiers=False,  # the tiers were planned without its state
            deferred=self.deferred_step,
            on_step_end=weak_callback(self._on_step_end),
        )
        blockwise.names = {key: names[0] for key, names in self._aliases.items()}
        self._connect(blockwise)
        blockwise.take_over_step_in_progress()
        self.optimizer, self.blockwise = optimizer, blockwise
        self._adopted = True
        if self._optimizer_to_place() is optimizer:
            later = (
                "until the next zero_grad() that leaves no gradients, where tierrt places the model "
                "again with it (one pass over the weights); %s to skip that pass"
            )
        else:
            later = "and no update overlaps backward; %s to keep its state in the tiers"
        log.warning(
            "tierrt: adopted %s, which was not passed to tierrt.offload(): it now steps the offloaded "
            "parameters block by block (torch's arithmetic), with its state in process memory outside "
            f"the tiers' budgets {later}",
            name,
            advice,
        )

    def _state_in_master_dtype(self, optimizer: torch.optim.Optimizer) -> None:
        """State an optimizer built inside the context made over the parameters as they look there
        (``compute_dtype``, e.g. Adagrad's ``sum`` made in its ``__init__``) is held in the master
        weights' dtype, as it would be over the parameters the optimizer steps (the master
        weights): otherwise torch's first adopted step accumulates into a bf16 ``sum``."""
        if self.compute_dtype is None or self.partition is None:
            return
        slots = {id(s.param): s for spec in self.partition.blocks for s in spec.slots}
        for group in optimizer.param_groups:
            for p in group["params"]:
                slot = slots.get(id(p))
                entry = optimizer.state.get(p)
                if slot is None or not entry or slot.dtype == self.compute_dtype:
                    continue
                for key, value in entry.items():
                    if (
                        isinstance(value, torch.Tensor)
                        and value.dtype == self.compute_dtype
                        and value.shape == slot.shape
                    ):
                        entry[key] = value.to(slot.dtype)

    def _stepped_once_since_adopted(self) -> bool:
        """Whether the adopted optimizer has made one step at most since it was adopted (it took
        over from another one just for that step, rather than starting a training phase)."""
        return self._steps_since_takeover <= 1

    def _take_turns(self, optimizer: torch.optim.Optimizer, other: torch.optim.Optimizer) -> None:
        """``optimizer``, handed back when ``other`` took over, steps again: the two take turns
        (two optimizers over parts of the model, e.g. Muon for the matrices and AdamW for the rest,
        both built inside the context). Each takes over from the other at every step; placing the
        model again for either (one pass over its weights) would then happen at every step, so
        neither is placed with: both keep their state in process memory. Warned once."""
        if optimizer in self._kept_in_memory and other in self._kept_in_memory:
            return
        self._kept_in_memory.add(optimizer)
        self._kept_in_memory.add(other)
        log.warning(
            "tierrt: %s and %s take turns stepping this model's parameters; tierrt steps an offloaded "
            "model with one optimizer at a time, so each takes over from the other at every step "
            "(pending updates applied first). Their state stays in process memory, outside the "
            "tiers' budgets, and no update overlaps backward. To keep optimizer state in the tiers, "
            "use one optimizer with a param group per part (e.g. AdamW with two groups) and pass it "
            "to tierrt.offload(model, ..., optimizer=opt)",
            type(optimizer).__name__,
            type(other).__name__,
        )

    def _let_go_of_adopted(self, successor: str) -> None:
        """Another optimizer steps the model after one adopted earlier (a second ``Trainer``, a new
        training phase): the earlier one's pending updates are applied, it is handed back to torch
        with its state in its own ``state`` in torch's format (read from the tiers when the model
        was placed with it), and the new one is adopted in its place. Stepping the earlier one
        again adopts it back."""
        assert self.blockwise is not None and self.optimizer is not None
        previous = type(self.optimizer).__name__
        self.blockwise.finish()
        self.blockwise.remove()
        self.blockwise.export_state()  # state kept in the tiers: into optimizer.state (close()'s order)
        self._handed_back.add(self.optimizer)
        self.optimizer, self.blockwise, self._adopted = None, None, False
        log.info(
            "tierrt: %s steps the model now; %s, adopted earlier, is handed back to torch",
            successor,
            previous,
        )
