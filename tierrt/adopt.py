"""Optimizers that :func:`tierrt.offload` was not given: adopted at their first ``step()``.

Offloaded parameters have no ``.grad`` (their gradients live in the tiers), so a torch optimizer that
tierrt does not know would step nothing and the model would silently not train. That is what
happens when ``offload()`` wraps a loop that builds its own optimizer, e.g. a transformers
``Trainer``'s ``train()``. While a runtime is active, a global optimizer step pre-hook
(``torch.optim.optimizer.register_optimizer_step_pre_hook``) watches every ``step()``: an unknown
optimizer whose parameters include offloaded ones is *adopted* by the runtime that owns them, as if
it had been passed as ``offload(optimizer=...)``, and its very first step already updates the
offloaded parameters. It is stepped by torch, block by block (its own state stays in the optimizer,
in process memory, outside the tiers' budgets: the placement was made without it), which gives
torch's results bit for bit. Cases tierrt cannot adopt raise :class:`~tierrt.errors.HookError` (or
:class:`~tierrt.errors.ConfigError`) from ``step()``, naming the fix, instead of training nothing.

``zero_grad()`` of such an optimizer, also before its first ``step()`` (a ``Trainer`` clears the
gradients before the first backward), clears the offloaded parameters' gradients in the tiers as it
clears ``p.grad`` of the others: while a runtime is active ``torch.optim.Optimizer.zero_grad`` is
wrapped to do so for an optimizer that holds offloaded parameters (an optimizer class that
overrides ``zero_grad`` without calling ``Optimizer.zero_grad`` is not covered until adopted).

Example::

    with tierrt.offload(model, tiers=tiers) as rt:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)   # created inside: adopted at step()
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


class OptimizerAdoption:
    """Installs the global step pre-hook that adopts unknown optimizers, and the wrapped
    ``Optimizer.zero_grad``, while a runtime is active."""

    active: list[Runtime] = []
    _handle: Any = None

    @classmethod
    def install(cls, runtime: Runtime) -> None:
        cls.active.append(runtime)
        if cls._handle is None:
            cls._handle = register_optimizer_step_pre_hook(_adopt_unknown)
        _ZERO_GRAD_PATCH.install(runtime)

    @classmethod
    def remove(cls, runtime: Runtime) -> None:
        if runtime in cls.active:
            cls.active.remove(runtime)
        _ZERO_GRAD_PATCH.remove(runtime)
        if not cls.active and cls._handle is not None:
            cls._handle.remove()
            cls._handle = None


@functools.wraps(_ORIGINAL_ZERO_GRAD)
def _zero_grad(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    """``Optimizer.zero_grad`` while a runtime is active: an optimizer whose ``zero_grad`` tierrt
    has not taken over (one not adopted yet) also clears the gradients in the tiers of the
    offloaded parameters it holds."""
    params = [p for group in self.param_groups for p in group["params"]]
    for runtime in list(OptimizerAdoption.active):
        if runtime.optimizer is not self and any(runtime.owns(p) for p in params):
            runtime.zero_grads(set_to_none)
    _ORIGINAL_ZERO_GRAD(self, set_to_none)


_ZERO_GRAD_PATCH = AttributePatch((torch.optim.Optimizer, "zero_grad", _zero_grad))


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
