"""A class attribute that tierrt replaces while at least one runtime is active.

Some torch APIs read what tierrt keeps elsewhere (gradients in the tiers, values of evicted
parameters): ``GradScaler._unscale_grads_``, ``AveragedModel.update_parameters``. Each is replaced by
a tierrt-aware version for as long as any runtime is active; the replacement serves every active
runtime (``patch.active``) and passes through to the original for everything else. The last runtime
to leave puts the original back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["AttributePatch"]


class AttributePatch:
    """Each ``(owner, name, replacement)``: ``owner.name`` replaced while a runtime is active."""

    def __init__(self, *targets: tuple[Any, str, Any]) -> None:
        # (owner, name, replacement, original)
        self.targets = [(owner, name, new, getattr(owner, name)) for owner, name, new in targets]
        self.active: list[Runtime] = []

    def install(self, runtime: Runtime) -> None:
        self.active.append(runtime)
        for owner, name, replacement, _ in self.targets:
            setattr(owner, name, replacement)

    def remove(self, runtime: Runtime) -> None:
        if runtime in self.active:
            self.active.remove(runtime)
        if not self.active:
            for owner, name, _, original in self.targets:
                setattr(owner, name, original)
