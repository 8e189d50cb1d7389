"""Optimizer wrappers that delegate to a torch optimizer they hold (accelerate's
``AcceleratedOptimizer``, DeepSpeed-style wrappers).

Such a wrapper is a ``torch.optim.Optimizer`` subclass that never runs ``Optimizer.__init__``: it has
no step hooks or state of its own and forwards ``param_groups``, ``state``, ``step()`` and
``zero_grad()`` to ``wrapper.optimizer``, adding its own policy around them (accelerate skips both
while gradients are being accumulated, and steps through a ``GradScaler``). tierrt takes over the
innermost torch optimizer; the user keeps calling the wrapper, whose policy is unchanged and whose
calls reach tierrt's ``step()`` and ``zero_grad()`` through the inner optimizer.

Example::

    model, opt, loader = accelerator.prepare(model, opt, loader)
    with tierrt.offload(model, tiers=tiers, optimizer=opt):   # opt: an AcceleratedOptimizer
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                opt.step()
                opt.zero_grad()
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["unwrap_optimizer"]


def _initialized(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``Optimizer.__init__`` ran on ``optimizer`` (it has its own hooks and groups)."""
    return "_optimizer_step_pre_hooks" in vars(optimizer)


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that ``optimizer`` steps: itself, or the innermost optimizer of a chain of
    delegating wrappers. Raises :class:`ConfigError` for a wrapper tierrt cannot see through (no
    inner optimizer, or parameter groups of its own)."""
    seen: set[int] = set()
    current = optimizer
    while not _initialized(current):
        seen.add(id(current))
        inner = vars(current).get("optimizer")
        name = type(current).__name__
        if not isinstance(inner, torch.optim.Optimizer) or id(inner) in seen:
            raise ConfigError(
                f"offload(optimizer=): {name} is a torch.optim.Optimizer that never ran "
                "Optimizer.__init__ and holds no torch optimizer in .optimizer, so tierrt cannot step "
                "it; pass the torch optimizer it wraps"
            )
        if current.param_groups is not inner.param_groups:
            raise ConfigError(
                f"offload(optimizer=): {name} wraps {type(inner).__name__} but keeps parameter groups "
                f"of its own, so stepping the {type(inner).__name__} would not do what {name} does; "
                "pass the torch optimizer that holds the parameter groups"
            )
        current = inner
    return current
