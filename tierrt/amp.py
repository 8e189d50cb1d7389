"""``torch.amp.GradScaler`` on offloaded gradients.

Offloaded parameters have no ``.grad``, so GradScaler's own ``unscale_`` would neither check their
gradients for inf/NaN nor unscale them. While a :func:`tierrt.offload` context is active,
``GradScaler._unscale_grads_`` also covers them: the inf/NaN check is one fused pass per block (done
when the block's gradients are complete, so it needs no I/O), and the unscaling is recorded as a
gradient multiplier applied inside the optimizer's update, bit for bit like torch's in-place
``grad * inv_scale``. ``scaler.step(opt)`` then skips the step on overflow exactly as it does without
tierrt, and ``scaler.update()`` adjusts the scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.amp.grad_scaler import GradScaler

from .patching import AttributePatch

__all__ = ["AmpPatch"]

_ORIGINAL = GradScaler._unscale_grads_


def _unscale_grads_(
    self: GradScaler,
    optimizer: torch.optim.Optimizer,
    inv_scale: torch.Tensor,
    found_inf: torch.Tensor,
    allow_fp16: bool,
) -> dict[torch.device, torch.Tensor]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for runtime in AmpPatch.active:  # p.grad = g by hand: into the tiers, unscaled there once
        runtime.take_assigned_grads(params)
    result: dict[torch.device, Any] = _ORIGINAL(self, optimizer, inv_scale, found_inf, allow_fp16)
    for runtime in AmpPatch.active:
        mine = [p for p in params if runtime.owns(p) and runtime.grad_info(p) is not None]
        if not mine:
            continue
        nonfinite = any(runtime.grad_nonfinite(p) for p in mine)
        runtime.scale_grads(mine, float(inv_scale))
        flag = result.get(found_inf.device)
        if flag is None:
            flag = result[found_inf.device] = found_inf
        if nonfinite:
            flag.fill_(1.0)
    return result


AmpPatch = AttributePatch((GradScaler, "_unscale_grads_", _unscale_grads_))
