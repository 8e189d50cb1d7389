"""Placing an offloaded model again, and optimizers :func:`tierrt.offload` was not given.

Part of :class:`tierrt.runtime.Runtime` (a mixin, so that the runtime's module keeps to placing,
leaving and reading; this one holds what changes a placement while the context is active):

- ``model.train()`` inside a context entered in eval mode: the model is placed again with room for
  gradients (:meth:`PlacingAgain._make_room_for_gradients`).
- An optimizer built inside the context is noted when it is constructed (:mod:`tierrt.adopt`),
  adopted at its first ``step()`` with its state in process memory
  (:meth:`PlacingAgain.adopt_optimizer`), and, at the first ``zero_grad()`` that leaves no
  gradients, the model is placed again with it so that its state lives in the tiers
  (:meth:`PlacingAgain.after_zero_grad`). A second optimizer takes over from an adopted one
  (:meth:`PlacingAgain._let_go_of_adopted`).

Placing again is ``close()`` then ``start()``: one pass over the weights, which come back to process
memory for that moment (a model with parameters from the meta device cannot be placed again).
"""

from __future__ import annotations

import logging
import weakref

import torch

from .errors import ConfigError, HookError
from .optim.blockwise import BlockwiseOptimizer
from .optim.updaters import native_refusal, torch_state_in_tiers

log = logging.getLogger("tierrt")

__all__ = ["PlacingAgain"]


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
        why_not = self._why_not_placeable_again()
        if why_not is not None:
            log.warning(
                "tierrt: model.train() inside a context entered in eval mode, but the model cannot be "
                "placed again (%s): it has no room for gradients; call model.train() before entering",
                why_not,
            )
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
        self._place_again()

    def _why_not_placeable_again(self) -> str | None:
        """Why the model cannot be given back and placed again (its values would not come back:
        parameters from the meta device, ``restore=False``), or None when it can."""
        if any(device.type == "meta" for device, _ in self._originals.values()):
            return "parameters from the meta device"
        if self.restore_on_exit is False:
            return "restore=False"
        return None

    def _place_again(self) -> None:
        """Give the model back and place it again (one pass over its weights) with the optimizer and
        training mode set now. The values come from the parameters (given back by ``close()``), not
        from a ``weights=`` checkpoint."""
        self._placing_again = True
        try:
            self.close()
            self.closed = False
            self.blockwise = None
            self.weights_source = None
            self.start()
        finally:
            self._placing_again = False

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
        if not self._tiers_can_hold_state_of(candidate) or self._why_not_placeable_again() is not None:
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
        self.optimizer, self._adopted = optimizer, True
        try:
            self._place_again()
        except Exception as error:  # noqa: BLE001 - any failure to place with it: place without it
            if self.active or self.closed:
                raise  # failed giving the model back, not placing it: nothing to fall back to
            self._kept_in_memory.add(optimizer)
            self.optimizer, self._adopted = None, False
            log.warning(
                "tierrt: the model could not be placed with %s's state in the tiers (%s); it is placed "
                "again without it, and %s is adopted at its next step() with its state in process "
                "memory, outside the tiers' budgets",
                name,
                error,
                name,
            )
            self._place_again()

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
            self._let_go_of_adopted(name)
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
            on_step_end=self._on_step_end,
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
        self.optimizer, self.blockwise, self._adopted = None, None, False
        log.info(
            "tierrt: %s steps the model now; %s, adopted earlier, is handed back to torch",
            successor,
            previous,
        )
