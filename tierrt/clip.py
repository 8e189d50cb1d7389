"""``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_`` on offloaded gradients.

Offloaded parameters have no ``.grad`` (their gradients live in the tiers), so torch's own clipping
would see nothing to clip. While a :func:`tierrt.offload` context is active these functions are
replaced — in ``torch.nn.utils``, in ``torch.nn.utils.clip_grad`` and in every already-imported
module that holds a direct reference (``from torch.nn.utils import clip_grad_norm_``) — by versions
that include the offloaded gradients and return the same total norm as torch, bit for bit on the
CPU: the per-parameter norms are computed with torch's own kernels on the same values (when a
block's gradients are complete, so clipping costs no extra I/O), stacked in torch's order, and the
clip coefficient is applied inside the optimizer step exactly as torch's in-place multiply would.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.utils.clip_grad as clip_grad_module

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["ClipPatch"]

_ORIGINAL_NORM = clip_grad_module.clip_grad_norm_
_ORIGINAL_VALUE = clip_grad_module.clip_grad_value_


class ClipPatch:
    """Installs tierrt-aware clipping functions while a runtime is active."""

    active: list[Runtime] = []
    _replaced: list[tuple[Any, str, Any]] = []

    @classmethod
    def install(cls, runtime: Runtime) -> None:
        cls.active.append(runtime)
        if len(cls.active) > 1:
            return
        replacements = {_ORIGINAL_NORM: clip_grad_norm_, _ORIGINAL_VALUE: clip_grad_value_}
        for module in list(sys.modules.values()):
            if not isinstance(module, types.ModuleType):
                continue
            namespace = getattr(module, "__dict__", None)
            if not namespace:
                continue
            for name, value in list(namespace.items()):
                new = replacements.get(value) if _hashable(value) else None
                if new is not None:
                    cls._replaced.append((module, name, value))
                    setattr(module, name, new)

    @classmethod
    def remove(cls, runtime: Runtime) -> None:
        if runtime in cls.active:
            cls.active.remove(runtime)
        if cls.active:
            return
        for module, name, value in reversed(cls._replaced):
            setattr(module, name, value)
        cls._replaced.clear()


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _owner(param: torch.Tensor) -> Runtime | None:
    for runtime in ClipPatch.active:
        if runtime.owns(param):
            return runtime
    return None


def _items(parameters: Any) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    return list(parameters)


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, including gradients offloaded by tierrt."""
    params = _items(parameters)
    owners = [_owner(p) for p in params]
    if not any(owners):
        return _ORIGINAL_NORM(params, max_norm, norm_type, error_if_nonfinite, foreach)
    norm_type = float(norm_type)
    # torch: grads = [p.grad for p in parameters if p.grad is not None], grouped by (device, dtype)
    # in order of first appearance, one norm per grad, stacked on the first grad's device.
    entries: list[tuple[torch.device, torch.dtype, Any]] = []
    for p, runtime in zip(params, owners):
        if runtime is not None:
            info = runtime.grad_info(p)
            if info is not None:
                entries.append((info[0], info[1], (runtime, p)))
        elif p.grad is not None:
            entries.append((p.grad.device, p.grad.dtype, p.grad))
    if not entries:
        return torch.tensor(0.0)
    first_device = entries[0][0]
    groups: dict[tuple[torch.device, torch.dtype], list[Any]] = {}
    for device, dtype, item in entries:
        groups.setdefault((device, dtype), []).append(item)
    norms: list[torch.Tensor] = []
    with torch.no_grad():
        for items in groups.values():
            plain = [item for item in items if isinstance(item, torch.Tensor)]
            plain_norms = iter(torch._foreach_norm(plain, norm_type)) if plain else iter(())
            for item in items:
                if isinstance(item, torch.Tensor):
                    norms.append(next(plain_norms))
                else:
                    runtime, p = item
                    norms.append(runtime.grad_norm(p, norm_type))
        total_norm = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)
        if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
                "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
                "anyway, set `error_if_nonfinite=False`"
            )
        clip_coef = float(max_norm) / (total_norm + 1e-6)
        clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
        plain_grads = [p.grad for p, runtime in zip(params, owners) if runtime is None and p.grad is not None]
        for g in plain_grads:
            g.mul_(clip_coef_clamped.to(g.device))
        scale = float(clip_coef_clamped)
        for runtime in {id(r): r for r in owners if r is not None}.values():
            runtime.scale_grads([p for p, r in zip(params, owners) if r is runtime], scale)
    return total_norm


def clip_grad_value_(
    parameters: Iterable[torch.Tensor] | torch.Tensor, clip_value: float, foreach: bool | None = None
) -> None:
    """torch.nn.utils.clip_grad_value_, including gradients offloaded by tierrt."""
    params = _items(parameters)
    owners = [_owner(p) for p in params]
    plain = [p for p, runtime in zip(params, owners) if runtime is None]
    if plain:
        _ORIGINAL_VALUE(plain, clip_value, foreach)
    for runtime in {id(r): r for r in owners if r is not None}.values():
        runtime.clamp_grads([p for p, r in zip(params, owners) if r is runtime], float(clip_value))
