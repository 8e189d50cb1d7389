"""A user's torch optimizer, taken over for the offloaded parameters.

``optimizer.step()``, ``zero_grad()``, ``state_dict()`` and ``load_state_dict()`` of the optimizer
passed to :func:`tierrt.offload` are replaced (on that object only, restored on exit):

- Adam, AdamW and SGD with the options tierrt's kernels implement run natively: fp32 master weights
  and optimizer state live in the tiers, each block's update is one SIMD pass, and the results are
  those of torch's own optimizer bit for bit. ``state_dict()`` / ``load_state_dict()`` speak torch's
  format, so a state saved from tierrt loads into a plain torch optimizer and back.
- Any other of torch's per-parameter optimizers (and Adam/AdamW/SGD with ``fused=True`` or
  ``foreach=True``, as a transformers ``Trainer`` builds AdamW) is stepped block by block with
  torch's own arithmetic, its state tensors homed in the tiers all the same.
- Any other optimizer class (third-party, a subclass, transformers' Adafactor) is stepped block by
  block with torch's arithmetic too: what it keeps per parameter is learned by a probe of its step
  at entry (:mod:`tierrt.optim.learning`), which also refuses a step that block-by-block stepping
  would change (one that couples parameters). Its state tensors shaped like the parameters live
  in the tiers; with none (factored Adafactor), its state stays in ``optimizer.state``.
- LBFGS (which needs every parameter at once) is refused.

Hyperparameters live in ``param_groups`` as usual (LR schedulers keep working); step hooks run once
per ``step()``; a ``closure`` is evaluated first, as torch's optimizers do.
"""

from __future__ import annotations

import logging
import types
from collections import defaultdict
from collections.abc import Callable
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, HookError
from ..hooks import unfrozen_error
from ..interrupts import HeldInterrupts
from .updaters import HyperSnapshot, Updater, choose_updater

if TYPE_CHECKING:
    from tierrt.scheduler.optimizer import OptimizerPipeline
    from tierrt.scheduler.pipeline import Pipeline

    from ..grads import GradientStore
    from ..store import BlockState, TensorStore

log = logging.getLogger("tierrt.optim")

__all__ = ["BlockwiseOptimizer"]

_MISSING = object()
_PATCHED = ("step", "zero_grad", "state_dict", "load_state_dict", "add_param_group")


class BlockwiseOptimizer:
    """Takes over one torch optimizer for the offloaded parameters of a model."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        block_of_param: dict[int, int],
        *,
        native: bool | None = None,
        state_in_tiers: bool = True,
        compute_dtype: torch.dtype | None = None,
        deferred: bool = True,
        on_step_end: Callable[[], None] | None = None,
    ) -> None:
        if isinstance(optimizer, torch.optim.LBFGS):
            raise HookError(
                "LBFGS needs every parameter at once in each step; tierrt cannot step it "
                "block by block. Use a per-parameter optimizer (SGD, Adam, AdamW, ...)"
            )
        self.optimizer = optimizer
        self.block_of_param = block_of_param
        self.on_step_end = on_step_end
        # called at the end of zero_grad(set_to_none): the runtime's safe point (see tierrt.adopt)
        self.on_zero_grad: Callable[[bool], None] | None = None
        self.deferred = deferred
        self.names: dict[int, str] = {}  # id(param) -> its name in the model, for messages
        self.updater: Updater = choose_updater(optimizer, native, state_in_tiers, compute_dtype)
        self.pipeline: Pipeline | None = None
        self.store: TensorStore | None = None
        self.grads: GradientStore | None = None
        self.updates: OptimizerPipeline | None = None
        self._saved_attrs: dict[str, Any] = {}
        # step pre-hooks recording a step that torch's own step() runs (record_in_torch_step)
        self._torch_step_hooks: list[Any] = []
        self._in_own_step = False
        self._in_closure = False  # a closure runs inside torch's own step() (record_in_torch_step)
        self._installed = False
        self.stepping_unmanaged = False  # torch's step() for parameters outside the model runs
        self._previous: dict[str, Any] = {}  # the optimizer's own attributes that install() replaced
        # Set by the runtime: calls write(copy) whenever ``copy`` (of optimizer state read through
        # ``optimizer.state``) is changed in place (see tierrt.access)
        self.watch_copy: Callable[[torch.Tensor, Callable[[torch.Tensor], None]], None] | None = None
        # id(param) -> (block, slot) of every offloaded parameter with a gradient buffer (it required
        # grad on entry); known once the blocks exist (bind)
        self._slots: dict[int, tuple[BlockState, int]] = {}
        self._index_params()
        if not self.managed_blocks:
            raise HookError(
                "the optimizer holds none of the offloaded model's parameters; build it over "
                "model.parameters()"
            )

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _index_params(self) -> None:
        """Learn the optimizer's parameters: which blocks it updates, which of its parameters are
        not offloaded (stepped plainly), and which group each is in. Again after add_param_group."""
        params = self._params()
        block_of_param = self.block_of_param
        self.managed_blocks = sorted({block_of_param[id(p)] for p in params if id(p) in block_of_param})
        self.unmanaged = [p for p in params if id(p) not in block_of_param]
        # offloaded parameters of the optimizer without a gradient buffer (frozen on entry)
        self.untrainable = [p for p in params if id(p) in block_of_param and id(p) not in self._slots]
        self.updater.index_groups()
        if self.updates is not None:
            self.updates.managed = set(self.managed_blocks)
            self.updates.members = {id(p) for p in params}

    def name_of(self, param: torch.Tensor) -> str:
        """``param``'s name in the model (for messages)."""
        return self.names.get(id(param)) or f"a parameter of shape {list(param.shape)}"

    def slot_of(self, param: torch.Tensor) -> tuple[BlockState, int]:
        """The block and slot holding ``param``'s gradient and optimizer state."""
        return self._slots[id(param)]

    def holds_state_of(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s optimizer state lives in the tiers (an updater that keeps it there,
        offloaded, required grad on entry); any other parameter's state stays in
        ``optimizer.state``."""
        return self.updater.state_in_tiers and bool(self.updater.state_kinds) and id(param) in self._slots

    # ---- state that exists before entering --------------------------------------------------------
    def check_existing_state(self) -> None:
        """Before anything moves: ``optimizer.state`` (steps taken before entering, a loaded
        checkpoint, an earlier offload()) fits the parameters whose state will live in the tiers.
        Raises :class:`ConfigError` naming the parameter otherwise."""
        from .state import check_torch_state

        def will_hold(p: torch.Tensor) -> bool:
            return bool(self.updater.state_kinds) and id(p) in self.block_of_param and p.requires_grad

        check_torch_state(self, will_hold, self.name_of)

    def bind(self, pipeline: Pipeline) -> None:
        """The blocks exist: learn where each parameter's gradient and state live."""
        self.pipeline = pipeline
        self._slots = {
            id(slot.param): (bs, slot.index)
            for bs in pipeline.blocks
            for slot in bs.spec.slots
            if bs.trains(slot.index)
        }
        self._index_params()

    def import_state(self) -> list[torch.nn.Parameter]:
        """Move ``optimizer.state`` of the parameters whose state lives in the tiers there (after
        placement, before the parameters let go of their values). Returns those parameters: call
        :meth:`release_imported` once the runtime is up to free their torch-side copies."""
        from .state import import_torch_state

        return import_torch_state(self)

    def release_imported(self, params: list[torch.nn.Parameter]) -> None:
        from .state import release_torch_state

        release_torch_state(self.optimizer, params)

    @property
    def state_kinds(self) -> dict[str, torch.dtype]:
        return dict(self.updater.state_kinds)

    def attach(self, pipeline: Pipeline, store: TensorStore, grads: GradientStore) -> None:
        """Connect to the runtime once the model is placed."""
        from tierrt.scheduler.optimizer import OptimizerPipeline

        if self.pipeline is not pipeline:
            self.bind(pipeline)
        self.store, self.grads = store, grads
        self.updates = OptimizerPipeline(
            pipeline, grads, self.updater, deferred=self.deferred, depth=max(pipeline.depth, 1)
        )
        self._index_params()
        pipeline.updates = self.updates
        grads.updates = self.updates

    # ---- installation ----------------------------------------------------------------------------
    def install(self) -> None:
        """Replace the optimizer's methods by tierrt's (on that object only, until :meth:`remove`).
        A bound method taken meanwhile (e.g. by a wrapper made inside the context) behaves as the
        method it replaced once the context is left."""
        opt = self.optimizer
        for name in _PATCHED:
            self._saved_attrs[name] = opt.__dict__.get(name, _MISSING)
        self._previous = dict(self._saved_attrs)
        from .state import CurrentState, TieredState

        self._saved_attrs["state"] = opt.__dict__.get("state", _MISSING)
        if self.updater.state_in_tiers and self.updater.state_kinds:
            # opt.state shows the state kept in the tiers (read on access), as torch's would hold it
            opt.state = TieredState(self, opt.state)
        else:
            # opt.state is the optimizer's own, read as the last step() left it (pending updates
            # applied first)
            opt.state = CurrentState(self, opt.state)
        self._installed = True
        owner = self

        def step(self: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
            if not owner._installed:
                return owner._replaced("step")(closure)
            return owner.step(closure)

        # LR schedulers wrap optimizer.step to check it runs before scheduler.step(); this step sets
        # the flag they look for (_opt_called) itself, so it counts as already wrapped for them.
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

        def zero_grad(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
            if not owner._installed:
                return owner._replaced("zero_grad")(set_to_none)
            owner.zero_grad(set_to_none)
            return None

        def state_dict(self: torch.optim.Optimizer) -> dict[str, Any]:
            if not owner._installed:
                return owner._replaced("state_dict")()
            return owner.state_dict()

        def load_state_dict(self: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
            if not owner._installed:
                return owner._replaced("load_state_dict")(state_dict)
            owner.load_state_dict(state_dict)
            return None

        def add_param_group(self: torch.optim.Optimizer, param_group: dict[str, Any]) -> None:
            if not owner._installed:
                return owner._replaced("add_param_group")(param_group)
            owner.add_param_group(param_group)
            return None

        for name, fn in (
            ("step", step),
            ("zero_grad", zero_grad),
            ("state_dict", state_dict),
            ("load_state_dict", load_state_dict),
            ("add_param_group", add_param_group),
        ):
            # torch.compile(opt.step) inside the context runs tierrt's step as it is, outside the
            # graph (dynamo cannot trace the block pipeline; it would fail inside it)
            setattr(opt, name, types.MethodType(torch.compiler.disable(fn), opt))

    def _replaced(self, name: str) -> Callable[..., Any]:
        """The optimizer's method ``name`` as it was before :meth:`install`."""
        previous = self._previous.get(name, _MISSING)
        if previous is _MISSING:
            return types.MethodType(getattr(type(self.optimizer), name), self.optimizer)
        return previous

    def take_over_step_in_progress(self) -> None:
        """Adopted from inside a ``step()`` call of the optimizer (by torch's global step pre-hook,
        see :mod:`tierrt.adopt`): that call goes on into torch's own step, which skips the offloaded
        parameters (they have no ``.grad``) and steps the others, then runs the post-hooks. The
        offloaded blocks' updates are recorded in it by :meth:`record_in_torch_step`."""
        self.record_in_torch_step()

    @property
    def in_own_step(self) -> bool:
        """Whether tierrt's ``step()`` (installed on the optimizer) is running."""
        return self._in_own_step

    @property
    def stepping(self) -> bool:
        """Whether a ``step()`` of the optimizer is running (tierrt's, or the closure of torch's own
        step): a ``zero_grad()`` inside a closure is not a point to place the model again at."""
        return self._in_own_step or self._in_closure

    def record_in_torch_step(self) -> None:
        """Torch's own ``step()`` of the optimizer is starting, not tierrt's: the optimizer was just
        adopted, or its step was reached through a bound method taken before tierrt replaced it (a
        GradScaler wrapper such as accelerate's swaps ``optimizer.step`` for one made at
        ``prepare()``). Torch's step skips the offloaded parameters (they have no ``.grad``) and
        steps the others; the offloaded blocks' updates are recorded by a step pre-hook of the
        optimizer's own, registered now and so run last, after the user's pre-hooks, as
        :meth:`step` would. A ``closure`` is evaluated there, once: torch's step then gets its loss
        back without computing it again. Called from torch's global step pre-hook, before the
        optimizer's own pre-hooks run."""
        for handle in self._torch_step_hooks:  # earlier ones (torch iterates them only later)
            handle.remove()
        self._torch_step_hooks.clear()
        fired = False

        def record_step_in_progress(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
            nonlocal fired
            if fired:
                return None
            fired = True
            self.check_trainable()
            result = None
            closure = args[1] if len(args) > 1 else kwargs.get("closure")
            if closure is not None:
                self._in_closure = True
                try:
                    with torch.enable_grad():
                        loss = closure()
                finally:
                    self._in_closure = False

                def evaluated() -> Any:
                    return loss

                if len(args) > 1:
                    result = ((args[0], evaluated, *args[2:]), kwargs)
                else:
                    result = (args, {**kwargs, "closure": evaluated})
            self._record()
            if self.on_step_end is not None:
                self.on_step_end()
            return result

        self._torch_step_hooks.append(self.optimizer.register_step_pre_hook(record_step_in_progress))

    def remove(self) -> None:
        for handle in self._torch_step_hooks:
            handle.remove()
        self._torch_step_hooks.clear()
        if self.updates is not None:
            self.updates.close()
        self._installed = False
        opt = self.optimizer
        from .state import TieredState

        if isinstance(opt.__dict__.get("state"), TieredState) and "state" in self._saved_attrs:
            # the state as it is now (torch's load_state_dict may have replaced the one wrapped)
            self._saved_attrs["state"] = opt.__dict__["state"].original
        for name, value in self._saved_attrs.items():
            if value is _MISSING:
                opt.__dict__.pop(name, None)
            else:
                setattr(opt, name, value)
        self._saved_attrs.clear()

    # ---- zero_grad -------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``: the stored gradients (and any assigned by hand to offloaded
        parameters) are cleared in the tiers, the other parameters' ``.grad`` as torch does."""
        assert self.grads is not None
        self.grads.zero(set_to_none, only=self.updates.members if self.updates is not None else None)
        for p in self.unmanaged:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()
        if self.on_zero_grad is not None:
            self.on_zero_grad(set_to_none)

    # ---- step ------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._in_own_step = True
        try:
            return self._step(closure)
        finally:
            self._in_own_step = False

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        assert self.updates is not None and self.pipeline is not None
        self.check_trainable()
        self._take_replaced_state()
        opt = self.optimizer
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        args: tuple[Any, ...] = (opt,)
        kwargs: dict[str, Any] = {}
        from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

        for pre_hook in chain(_global_optimizer_pre_hooks.values(), opt._optimizer_step_pre_hooks.values()):
            result = pre_hook(opt, args, kwargs)
            if result is not None:
                args, kwargs = result
        self._record()
        if any(p.grad is not None for p in self.unmanaged):
            self._step_unmanaged()
        opt._opt_called = True  # type: ignore[attr-defined]  # what LR schedulers look for
        if hasattr(opt, "_optimizer_step_code"):
            opt._optimizer_step_code()
        for post_hook in chain(
            opt._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()
        ):
            post_hook(opt, args, kwargs)
        if self.on_step_end is not None:
            self.on_step_end()
        return loss

    def _take_replaced_state(self) -> None:
        """``optimizer.state`` replaced by a new dict since the last step (``opt.state =
        defaultdict(dict)``, a reset as torch knows it): the new dict is the state from now on, its
        entries for offloaded parameters moved into the tiers (the others start fresh)."""
        from .state import TieredState, check_torch_state, import_torch_state, release_torch_state

        opt = self.optimizer
        current = opt.__dict__.get("state")
        if not self._installed or not self.updater.state_in_tiers or isinstance(current, TieredState):
            return
        replacement = current if isinstance(current, defaultdict) else defaultdict(dict, current or {})
        self.updates.apply_all()
        self.updates.commit()
        self.updates.speculator.discard_all()
        opt.state = replacement
        check_torch_state(self, self.holds_state_of, self.name_of)  # ConfigError: nothing changed yet
        self.updater.forget_counters()
        release_torch_state(opt, import_torch_state(self))
        opt.state = TieredState(self, replacement)
        log.info("tierrt: optimizer.state was replaced: the new state is used from this step on")

    def _record(self) -> None:
        """One pending update per offloaded block with gradients, with the hyperparameters of now.
        Gradients assigned by hand (``p.grad = g``, e.g. from ``torch.autograd.grad``) are taken
        into the tiers first, so the update uses them as torch's step would."""
        assert self.updates is not None and self.grads is not None
        self.grads.take_assigned()
        # A step is a transaction: Ctrl-C waits until every block has its update recorded (or
        # committed), so the model is never left with some blocks stepped and others not.
        with HeldInterrupts("recording the optimizer step"):
            self.updates.record(self.managed_blocks, HyperSnapshot.take(self.optimizer))

    def _step_unmanaged(self) -> None:
        """Parameters of the optimizer outside the offloaded model step plainly."""
        opt = self.optimizer
        self.stepping_unmanaged = True  # opt.state must not apply the updates just recorded
        raw = getattr(type(opt).step, "__wrapped__", type(opt).step)
        hidden: dict[torch.nn.Parameter, torch.Tensor | None] = {}
        managed = set(self.block_of_param)
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in managed and p.grad is not None:
                    hidden[p] = p.grad
                    p.grad = None
        try:
            raw(opt)
        finally:
            self.stepping_unmanaged = False
            for p, grad in hidden.items():
                p.grad = grad

    # ---- parameters frozen on entry ---------------------------------------------------------------
    def check_trainable(self) -> None:
        """Raise :class:`HookError` when a parameter of the optimizer that was frozen on entry (it
        has no gradient buffer or optimizer state in the tiers) requires grad or has a gradient now:
        tierrt could not train it, and must not skip it silently."""
        wrong = [p for p in self.untrainable if p.requires_grad or p.grad is not None]
        if wrong:
            raise unfrozen_error([self.name_of(p) for p in wrong])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``optimizer.add_param_group()`` inside the context. Offloaded parameters that required
        grad on entry are updated from the next step on (their state starts fresh, as in torch); one
        frozen on entry that requires grad now is refused (:class:`HookError`), as are options the
        native kernel did not lay out state for on entry (:class:`ConfigError`)."""
        opt = self.optimizer
        wrong = [
            p
            for p in _group_tensors(param_group)
            if id(p) in self.block_of_param and id(p) not in self._slots and p.requires_grad
        ]
        if wrong:
            raise unfrozen_error([self.name_of(p) for p in wrong])
        if self.updates is not None:
            self.updates.apply_all()  # pending updates were recorded with the old groups
        type(opt).add_param_group(opt, param_group)
        refusal = self.updater.refuses_group(opt.param_groups[-1])
        if refusal is not None:
            opt.param_groups.pop()
            raise ConfigError(
                f"add_param_group inside tierrt.offload(): {refusal}. Create the optimizer with every "
                "param group before entering"
            )
        self._index_params()

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's format: {"state": {index: {...}}, "param_groups": [...]} with every tensor read
        from the tiers (or, for the torch updater, the optimizer's own state)."""
        assert self.updates is not None
        self.updates.apply_all()
        opt = self.optimizer
        if not self.updater.state_in_tiers:
            return type(opt).state_dict(opt)
        from .state import native_state_dict

        return native_state_dict(self, opt)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        assert self.updates is not None
        self.updates.apply_all()
        self.updates.commit()
        # Updates computed during the last backward started from the state being replaced (and
        # from its step counts, which no version records): the next step() recomputes them.
        self.updates.speculator.discard_all()
        opt = self.optimizer
        if not self.updater.state_in_tiers:
            from .state import CurrentState

            type(opt).load_state_dict(opt, state_dict)  # replaces opt.state: show it as before
            if self._installed and not isinstance(opt.__dict__.get("state"), CurrentState):
                opt.state = CurrentState(self, opt.state)
            return
        from .state import load_native_state_dict

        load_native_state_dict(self, opt, state_dict)

    def finish(self) -> None:
        """Apply every pending update and commit the step (before leaving the context, saving, ...)."""
        if self.updates is not None:
            self.updates.apply_all()
            self.updates.commit()
            self.updates.speculator.discard_all()

    def export_state(self) -> None:
        """On exit: put the native state into ``optimizer.state`` in torch's format, on each
        parameter's device, so the optimizer keeps working on the restored model."""
        if not self.updater.state_in_tiers:
            return
        sd = self.state_dict()
        opt = self.optimizer
        params = [(p, group) for group in opt.param_groups for p in group["params"]]
        for index, state in sd["state"].items():
            p, group = params[index]
            opt.state[p] = {k: _as_torch_holds(p, group, k, v) for k, v in state.items()}


def _as_torch_holds(param: torch.Tensor, group: dict[str, Any], key: str, value: Any) -> Any:
    """A state value where torch's optimizer keeps it: tensors shaped like the parameter on its
    device; ``step`` where it is, except with ``fused`` or ``capturable`` (fp32 on the parameter's
    device, as torch's ``load_state_dict`` puts it)."""
    if not isinstance(value, torch.Tensor):
        return value
    if key == "step":
        if group.get("fused", False) or group.get("capturable", False):
            return value.to(dtype=torch.float32, device=param.device)
        return value
    return value.to(param.device) if value.dim() > 0 else value


def _group_tensors(param_group: dict[str, Any]) -> list[Any]:
    """The parameters of a group being added, as torch will read them: a tensor, or a list of
    tensors or of (name, tensor) pairs. An iterator is made a list in place (torch does the same),
    so reading it here does not use it up."""
    params = param_group["params"]
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, set):
        return []  # torch refuses sets (unordered) with its own error
    params = param_group["params"] = list(params)
    return [p[1] if isinstance(p, tuple) else p for p in params]


def check_optimizer_matches(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    groups = optimizer.param_groups
    saved = state_dict.get("param_groups")
    if not isinstance(saved, list) or len(saved) != len(groups):
        raise ConfigError("load_state_dict: the state dict has a different number of parameter groups")
    for group, saved_group in zip(groups, saved):
        if len(group["params"]) != len(saved_group["params"]):
            raise ConfigError("load_state_dict: a parameter group's size does not match the state dict")
