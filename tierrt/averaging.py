"""``torch.optim.swa_utils.AveragedModel.update_parameters`` over an offloaded model.

An EMA or SWA of the weights (``ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))``
then ``ema.update_parameters(model)`` after each step) reads ``model.parameters()`` directly. Inside
the context an offloaded parameter is only real while its block is resident, so the average would
take in placeholders. While a runtime is active, ``update_parameters`` reads each offloaded
parameter's current value instead (as :meth:`tierrt.Runtime.value` does: pending updates applied,
evicted blocks read from their tiers) and averages exactly what it averages without tierrt, bit for
bit. The values are read one parameter at a time, but ``update_parameters`` itself keeps all of them
until it has averaged them: a transient copy of the model's parameters, next to the averaged copy
the ``AveragedModel`` holds anyway.

Example::

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))   # inside or outside
    with tierrt.offload(model, tiers=tiers, optimizer=opt):
        for batch in loader:
            ...
            opt.step()
            ema.update_parameters(model)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .patching import AttributePatch

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["AveragingPatch"]

_ORIGINAL = AveragedModel.update_parameters


class _RealValues:
    """Stands for an offloaded model in ``update_parameters``: the parameters it yields hold real
    values (fresh copies for the offloaded ones); buffers are the model's own."""

    def __init__(self, model: nn.Module, runtimes: list[Runtime]) -> None:
        self.model = model
        self.runtimes = runtimes

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        for param in self.model.parameters(recurse):
            owner = next((rt for rt in self.runtimes if rt.owns(param)), None)
            if owner is None:
                yield param
            else:
                yield owner.value(param, device=owner.original_device(param))

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        return self.model.buffers(recurse)


def _update_parameters(self: AveragedModel, model: nn.Module) -> Any:
    runtimes = [rt for rt in AveragingPatch.active if any(rt.owns(p) for p in model.parameters())]
    if not runtimes:
        return _ORIGINAL(self, model)
    return _ORIGINAL(self, _RealValues(model, runtimes))  # type: ignore[arg-type]


AveragingPatch = AttributePatch((AveragedModel, "update_parameters", _update_parameters))
