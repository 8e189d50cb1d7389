"""Optimizers that :func:`tierrt.offload` was not given: noted when built, placed or adopted.

Offloaded parameters have no ``.grad`` (their gradients live in the tiers), so a torch optimizer that
tierrt does not know would step nothing and the model would silently not train. That is what
happens when ``offload()`` wraps a loop that builds its own optimizer, e.g. a transformers
``Trainer``'s ``train()``. While a runtime is active, tierrt watches such optimizers in three ways:

- ``torch.optim.Optimizer.__init__`` is wrapped: an optimizer built over parameters an active
  runtime offloads is *noted* by that runtime (a weak reference; the most recent one counts).
  Nothing else happens there (a subclass's ``__init__`` goes on after the base class's).
- A global optimizer step pre-hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``)
  watches every ``step()``: an unknown optimizer whose parameters include offloaded ones is
  *adopted* by the runtime that owns them, and its very first step already updates the offloaded
  parameters. It is stepped by torch, block by block, which gives torch's results bit for bit; its
  state stays in the optimizer, in process memory, for now (the placement was made without it).
- At a *safe point* — a ``zero_grad(set_to_none=True)`` (the model's, the optimizer's, or that of
  an optimizer tierrt adopted) after which no gradient is held, outside forward and backward — the
  runtime places the model again with a noted or adopted optimizer whose state its tiers can hold
  (torch's own optimizers, in any mode, e.g. the ``Trainer``'s fused AdamW; Adam, AdamW and SGD on
  tierrt's kernels when their options allow; a third-party optimizer or a subclass whose state
  tensors a probe of its step learned, see :mod:`tierrt.optim.learning`): one pass over the
  weights, streamed from the current placement block by block (see :mod:`tierrt.placing`; models
  from the meta device and ``restore=False`` too), after which the optimizer is stepped as if it had
  been passed to ``offload(optimizer=...)``, its state (also what the adopted steps made) homed in
  the tiers under their budgets. A ``Trainer`` calls
  ``model.zero_grad()`` before its first step, so its optimizer's state is in the tiers from the
  first step on. When the state does not fit the budgets, the model is placed again without it and
  the optimizer stays adopted with its state in memory (a warning says why); so it does when the
  nvme tier has no room for a second placement's swap files beside the first and the model cannot
  come back into memory to be placed from there (the meta device, ``restore=False``).

Cases tierrt cannot adopt raise :class:`~tierrt.errors.HookError` (or
:class:`~tierrt.errors.ConfigError`) from ``step()``, naming the fix, instead of training nothing.

``zero_grad()`` of such an optimizer, also before its first ``step()`` (a ``Trainer`` clears the
gradients before the first backward), clears the offloaded parameters' gradients in the tiers as it
clears ``p.grad`` of the others: while a runtime is active ``torch.optim.Optimizer.zero_grad`` is
wrapped to do so for an optimizer that holds offloaded parameters (an optimizer class that
overrides ``zero_grad`` without calling ``Optimizer.zero_grad`` is not covered until adopted).

Passing the optimizer to ``offload()`` skips the extra pass over the weights:
``offload(model, ..., optimizer=opt)``, with a ``Trainer`` also ``Trainer(optimizers=(opt, None))``.

Example::

    with tierrt.offload(model, tiers=tiers) as rt:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)   # created inside: noted
        model.zero_grad()                                      # safe point: placed with opt
        for batch in loader:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .errors import HookError
from .patching import AttributePatch

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("tierrt")

__all__ = ["OptimizerAdoption"]


_ORIGINAL_ZERO_GRAD = torch.optim.Optimizer.zero_grad
_ORIGINAL_INIT = torch.optim.Optimizer.__init__


class OptimizerAdoption:
    """Installs the global step pre-hook that adopts unknown optimizers, and the wrapped
    ``Optimizer.__init__`` and ``Optimizer.zero_grad``, while a runtime is active."""

    active: list[Runtime] = []
    _handle: Any = None

    @classmethod
    def install(cls, runtime: Runtime) -> None:
        cls.active.append(runtime)
        if cls._handle is None:
            cls._handle = register_optimizer_step_pre_hook(_adopt_unknown)
        _ZERO_GRAD_PATCH.install(runtime)
        _INIT_PATCH.install(runtime)

    @classmethod
    def remove(cls, runtime: Runtime) -> None:
        if runtime in cls.active:
            cls.active.remove(runtime)
        _ZERO_GRAD_PATCH.remove(runtime)
        _INIT_PATCH.remove(runtime)
        if not cls.active and cls._handle is not None:
            cls._handle.remove()
            cls._handle = None


@functools.wraps(_ORIGINAL_ZERO_GRAD)
def _zero_grad(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    """``Optimizer.zero_grad`` while a runtime is active: an optimizer whose ``zero_grad`` tierrt
    has not taken over (one not adopted yet) also clears the gradients in the tiers of the
    offloaded parameters it holds; then each such runtime is at a safe point to place its model again
    with a noted optimizer (:meth:`~tierrt.runtime.Runtime.after_zero_grad`)."""
    params = [p for group in self.param_groups for p in group["params"]]
    owners = [
        runtime
        for runtime in list(OptimizerAdoption.active)
        if runtime.optimizer is not self and any(runtime.owns(p) for p in params)
    ]
    for runtime in owners:
        runtime.zero_grads(set_to_none)
    _ORIGINAL_ZERO_GRAD(self, set_to_none)
    for runtime in owners:
        runtime.after_zero_grad(set_to_none)


@functools.wraps(_ORIGINAL_INIT)
def _init(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
    """``Optimizer.__init__`` while a runtime is active: an optimizer built over parameters a runtime
    offloads is noted by it (placed with at the runtime's next safe point, see the module's
    docstring). Nothing more happens here: a subclass's ``__init__`` goes on after this returns."""
    _ORIGINAL_INIT(self, *args, **kwargs)
    params = [p for group in getattr(self, "param_groups", ()) for p in group.get("params", ())]
    for runtime in list(OptimizerAdoption.active):
        if any(runtime.owns(p) for p in params):
            runtime.note_optimizer(self)


_ZERO_GRAD_PATCH = AttributePatch((torch.optim.Optimizer, "zero_grad", _zero_grad))
_INIT_PATCH = AttributePatch((torch.optim.Optimizer, "__init__", _init))


def _adopt_unknown(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The global pre-hook: adopt ``optimizer`` if it steps offloaded parameters tierrt was not
    given an optimizer for; raise when it cannot be adopted. Returns None (args unchanged)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    owners = [rt for rt in OptimizerAdoption.active if any(rt.owns(p) for p in params)]
    if not owners:
        return None
    if len(owners) > 1:
        raise HookError(
            f"{type(optimizer).__name__} holds parameters of {len(owners)} different offloaded models; "
            "tierrt steps each offloaded model with one optimizer of its own. Offload the models "
            "together as one module, or give each model its own optimizer"
        )
    (runtime,) = owners
    if torch.compiler.is_compiling():
        raise HookError(
            f"torch.compile is tracing {type(optimizer).__name__}.step over offloaded parameters, "
            "which tierrt steps itself outside any graph: call optimizer.step() uncompiled, or "
            "compile it inside the tierrt.offload() context from an optimizer passed to "
            "offload(optimizer=) (tierrt's step then runs uncompiled)"
        )
    if runtime.optimizer is optimizer:
        blockwise = runtime.blockwise
        if blockwise is not None and not blockwise.in_own_step:
            # torch's own step(), reached through a bound method taken before tierrt's replaced it
            # (e.g. the one accelerate's GradScaler path swaps in): record the offloaded updates in it
            blockwise.record_in_torch_step()
        return None  # given to offload() or adopted already: its step() is tierrt's
    runtime.adopt_optimizer(optimizer)
    return None
