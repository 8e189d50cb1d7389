"""Any torch optimizer, stepped block by block over offloaded parameters.

``optimizer.step()`` is replaced (on that optimizer object only) by a loop over blocks: for each
block with gradients, its weights (fp32 master weights under mixed precision) and gradients are
brought into DRAM, the parameters are pointed at them, the optimizer's own update runs for just
those parameters, and the updated weights are written home while the next block is read. The
optimizer's state (e.g. Adam's ``exp_avg``) is kept by the optimizer itself, in DRAM; the native
optimizer path (``tierrt.optim.native``) keeps it in the tiers instead.

Per-parameter optimizers (SGD, Adam, AdamW, Adagrad, RMSprop, ...) give exactly the results they
give without tierrt. Optimizers that need every parameter at once in one step (LBFGS) are refused.
Hyperparameters live in ``param_groups`` as usual, so LR schedulers keep working; step hooks run
once per ``step()``.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch

from ..errors import HookError

if TYPE_CHECKING:
    from tierrt.scheduler.pipeline import Pipeline

    from ..grads import GradientStore
    from ..store import BlockState, TensorStore

log = logging.getLogger("tierrt.optim")

__all__ = ["BlockwiseOptimizer", "raw_step_function"]


def raw_step_function(optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
    """The optimizer class's ``step`` without torch's hook/profiling wrapper."""
    step = type(optimizer).step
    return getattr(step, "__wrapped__", step)


class BlockwiseOptimizer:
    """Takes over ``step`` and ``zero_grad`` of one torch optimizer for offloaded parameters."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        pipeline: Pipeline | None,
        store: TensorStore | None,
        grads: GradientStore | None,
        block_of_param: dict[int, int],
        on_step_end: Callable[[], None] | None = None,
    ) -> None:
        if isinstance(optimizer, torch.optim.LBFGS):
            raise HookError(
                "LBFGS needs every parameter at once in each step; tierrt cannot step it "
                "block by block. Use a per-parameter optimizer (SGD, Adam, AdamW, ...)"
            )
        self.optimizer = optimizer
        self.pipeline = pipeline
        self.store = store
        self.grads = grads
        self.block_of_param = block_of_param
        self.on_step_end = on_step_end
        self._raw_step = raw_step_function(optimizer)
        self._saved_attrs: dict[str, Any] = {}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.managed_blocks = sorted({block_of_param[id(p)] for p in params if id(p) in block_of_param})
        self.unmanaged = [p for p in params if id(p) not in block_of_param]
        if not self.managed_blocks:
            raise HookError(
                "the optimizer holds none of the offloaded model's parameters; build it over "
                "model.parameters()"
            )

    def attach(self, pipeline: Pipeline, store: TensorStore, grads: GradientStore) -> None:
        """Connect to the runtime's pipeline once the model is placed."""
        self.pipeline, self.store, self.grads = pipeline, store, grads

    # ---- installation ----------------------------------------------------------------------------
    def install(self) -> None:
        opt = self.optimizer
        for name in ("step", "zero_grad"):
            self._saved_attrs[name] = opt.__dict__.get(name, _MISSING)
        opt.step = types.MethodType(_bound_step(self), opt)  # type: ignore[method-assign]
        opt.zero_grad = types.MethodType(_bound_zero_grad(self), opt)  # type: ignore[method-assign]

    def remove(self) -> None:
        opt = self.optimizer
        for name, value in self._saved_attrs.items():
            if value is _MISSING:
                opt.__dict__.pop(name, None)
            else:
                setattr(opt, name, value)
        self._saved_attrs.clear()

    # ---- zero_grad -------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grads.zero(set_to_none)
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

    # ---- step ------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
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
        start = time.perf_counter()
        stashed = {p: p.grad for p in self.unmanaged if p.grad is not None}
        for p in stashed:
            p.grad = None
        try:
            self._step_blocks()
        finally:
            for p, grad in stashed.items():
                p.grad = grad
        if stashed:
            self._raw_step(opt)
        self.pipeline.counters.optimizer_seconds += time.perf_counter() - start
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

    def _weight_kind(self, bs: BlockState) -> str:
        return "master" if "master" in bs.kinds else "weight"

    def _step_blocks(self) -> None:
        pipeline, grads = self.pipeline, self.grads
        blocks = pipeline.blocks
        # Reverse order: the blocks the next forward needs first are stepped last and stay cached.
        order = [blocks[i] for i in reversed(self.managed_blocks) if grads.present.get(i)]
        for i, bs in enumerate(order):
            wkind = self._weight_kind(bs)
            for nxt in order[i + 1 : i + 2]:  # read the next block while this one is updated
                pipeline.ensure_host(nxt, "grad", demand=False, protect={bs.index})
                pipeline.ensure_host(nxt, self._weight_kind(nxt), demand=False, protect={bs.index})
            pipeline.ensure_host(bs, wkind)
            bs.kinds[wkind].pins += 1
            try:
                pipeline.ensure_host(bs, "grad")
                self._step_one(bs, wkind)
            finally:
                bs.kinds[wkind].pins -= 1
            pipeline.flush(bs, wkind, drop=False)
            if wkind == "master":
                pipeline.flush(bs, "weight", drop=False)

    def _step_one(self, bs: BlockState, wkind: str) -> None:
        store, pipeline = self.store, self.pipeline
        wks = bs.kinds[wkind]
        weights = dict(zip(wks.layout.slots, store.host_views(bs, wks)))
        slot_grads = self.grads.slot_grads(bs)
        touched = []
        for slot_index, grad in slot_grads.items():
            param = bs.spec.slots[slot_index].param
            param.data = weights[slot_index]
            param.grad = grad
            touched.append(param)
        try:
            self._raw_step(self.optimizer)
        finally:
            for param in touched:
                param.grad = None
        if wkind == "master":
            # New compute-dtype weights from the updated master weights.
            wk = bs.kinds["weight"]
            if wk.inflight is not None:
                pipeline.wait(bs, "weight")
            pipeline.ensure_host(bs, "weight")
            targets = dict(zip(wk.layout.slots, store.host_views(bs, wk)))
            for slot_index in slot_grads:
                targets[slot_index].copy_(weights[slot_index])
        if pipeline.compute != "dram" or wkind == "master":
            pipeline.detach(bs)  # the compute copy is stale now
        pipeline.mark_modified(bs, wkind, "dram")
        if wkind == "master":
            pipeline.mark_modified(bs, "weight", "dram")
        if pipeline.compute == "dram":
            pipeline._attach(bs)  # parameters view the updated DRAM weights
        # (otherwise detach() above pointed every parameter at its placeholder again)


_MISSING = object()


def _bound_step(owner: BlockwiseOptimizer) -> Callable[..., Any]:
    def step(self: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
        return owner.step(closure)

    # LR schedulers wrap optimizer.step to check it runs before scheduler.step(); this step sets the
    # flag they look for (_opt_called) itself, so mark it as already wrapped for them.
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    return step


def _bound_zero_grad(owner: BlockwiseOptimizer) -> Callable[..., Any]:
    def zero_grad(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
        owner.zero_grad(set_to_none)

    return zero_grad
