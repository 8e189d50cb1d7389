"""``torch.amp.GradScaler`` on offloaded gradients.

Offloaded parameters have no ``.grad``, so GradScaler's own ``unscale_`` would neither check their
gradients for inf/NaN nor unscale them. While a :func:`tierrt.offload` context is active,
``GradScaler._unscale_grads_`` also covers them: the inf/NaN check is one fused pass per block (done
when the block's gradients are complete, so it needs no I/O), and the unscaling is recorded as a
gradient multiplier applied inside the optimizer's update, bit for bit like torch's in-place
``grad * inv_scale``. ``scaler.step(opt)`` then skips the step on overflow exactly as it does without
tierrt, and ``scaler.update()`` adjusts the scale. Offloaded fp16 gradients (a model whose parameters
are fp16, without ``compute_dtype``) are refused as torch refuses them, before anything is unscaled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.amp.grad_scaler import GradScaler

from .errors import ConfigError
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
    if not allow_fp16:
        _refuse_fp16_grads(params)
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


def _refuse_fp16_grads(params: list[torch.Tensor]) -> None:
    """Torch's own ``ValueError`` for fp16 gradients (it would see no offloaded one): unscaling them
    in fp16 gives inf/NaN weights."""
    for runtime in AmpPatch.active:
        for p in params:
            info = runtime.owns(p) and runtime.grad_info(p)
            if info and info[1] == torch.float16:
                raise ConfigError(
                    f"Attempting to unscale FP16 gradients: {runtime.name_of(p)} is an fp16 parameter, "
                    "and GradScaler needs fp32 gradients. Keep the parameters in fp32 and compute in "
                    "fp16 with torch.autocast or tierrt.offload(..., compute_dtype=torch.float16)"
                )


AmpPatch = AttributePatch((GradScaler, "_unscale_grads_", _unscale_grads_))
