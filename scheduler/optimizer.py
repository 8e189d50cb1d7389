"""The optimizer pipeline: one step's update of every block, overlapped with I/O and compute.

``optimizer.step()`` records a *pending update* for each block with gradients: the hyperparameters
of that moment, the gradient multiplier (clip coefficient, inverse loss scale) and which parameters
have gradients. Updates then run block by block: while block i is updated, the state of the next
blocks is being read and the state of the previous ones written home.

With ``deferred=True`` (the default) ``step()`` returns after starting that pipeline, and a block's
update is applied at the latest when the block is next needed: the next forward pass acquires it
(the update's fresh weights are then already in DRAM, so they are not read again), or anything that
reads its values (``state_dict()``, ``save()``, leaving the context). The next forward thus waits for
a block's update only if it has not happened yet, and no computation ever sees stale weights: this
is the same result as updating every block inside ``step()``, in a different order of I/O.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tierrt.optim.updaters import HyperSnapshot, Updater

from .transfer import Span

if TYPE_CHECKING:
    from tierrt.grads import GradientStore
    from tierrt.store import BlockState

    from .pipeline import Pipeline

log = logging.getLogger("tierrt.scheduler")

__all__ = ["PendingUpdate", "OptimizerPipeline"]


@dataclass
class PendingUpdate:
    """One block's update, recorded by ``step()`` and applied later."""

    block: int
    slots: list[int]
    hyper: HyperSnapshot
    grad_mul: float
    recorded: float


class OptimizerPipeline:
    """Pending updates of one optimizer, their prefetching and their application."""

    def __init__(
        self,
        pipeline: Pipeline,
        grads: GradientStore,
        updater: Updater,
        deferred: bool = True,
        depth: int = 1,
    ) -> None:
        self.pipeline = pipeline
        self.grads = grads
        self.updater = updater
        self.deferred = deferred
        self.depth = max(depth, 1)
        self.pending: dict[int, PendingUpdate] = {}
        self.order: list[int] = []  # pending blocks in the order they will be applied
        self.zero_after: dict[int, bool] = {}  # block -> set_to_none of a zero_grad() that came meanwhile
        self.managed: set[int] = set()

    # ---- kinds -----------------------------------------------------------------------------------
    def weight_kind(self, bs: BlockState) -> str:
        return "master" if "master" in bs.kinds else "weight"

    def input_kinds(self, bs: BlockState) -> list[str]:
        kinds = [self.weight_kind(bs), "grad"] + [k for k in self.updater.state_kinds if k in bs.kinds]
        if "master" in bs.kinds:
            kinds.append("weight")  # the compute-dtype copy the step writes
        return kinds

    # ---- recording -------------------------------------------------------------------------------
    def record(self, blocks: list[int], hyper: HyperSnapshot, grad_mul: float) -> None:
        """``step()``: one pending update per block that has gradients."""
        self.apply_all()  # a second step() before the first one's updates ran: finish those first
        now = time.perf_counter()
        for index in blocks:
            present = self.grads.present.get(index)
            if not present:
                continue
            self.pending[index] = PendingUpdate(index, sorted(present), hyper, grad_mul, now)
            self.order.append(index)
        if not self.deferred:
            self.apply_all()
        else:
            self.prefetch_next(None)

    def has_pending(self, index: int) -> bool:
        return index in self.pending

    # ---- application -----------------------------------------------------------------------------
    def prefetch_next(self, current: int | None) -> None:
        """Start reading the inputs of the next pending updates (only into free room)."""
        pipeline = self.pipeline
        started = 0
        for index in self.order:
            if index == current:
                continue
            bs = pipeline.blocks[index]
            for kind in self.input_kinds(bs):
                if not pipeline.ensure_host(
                    bs, kind, demand=False, protect={index} | ({current} if current is not None else set())
                ):
                    return
            started += 1
            if started >= self.depth:
                return

    def prefetch_block(self, bs: BlockState, protect: set[int]) -> bool:
        """The forward's prefetcher reached a block with a pending update: read its inputs."""
        for kind in self.input_kinds(bs):
            if not self.pipeline.ensure_host(bs, kind, demand=False, protect=protect | {bs.index}):
                return False
        return True

    def apply(self, index: int) -> None:
        """Apply block ``index``'s pending update now (if it has one)."""
        update = self.pending.pop(index, None)
        if update is None:
            return
        self.order.remove(index)
        pipeline = self.pipeline
        bs = pipeline.blocks[index]
        start = time.perf_counter()
        kinds = self.input_kinds(bs)
        for kind in kinds:
            bs.kinds[kind].pins += 1
        try:
            for kind in kinds:
                pipeline.ensure_host(bs, kind, protect={index})
            self.prefetch_next(index)
            wkind = self.weight_kind(bs)
            if wkind == "weight" and bs.attached and pipeline.compute != "dram":
                pipeline.detach(bs)
            self.updater.apply(pipeline.store, bs, wkind, update.slots, update.hyper, update.grad_mul)
        finally:
            for kind in kinds:
                bs.kinds[kind].pins -= 1
        self._after_update(bs, wkind, kinds)
        end = time.perf_counter()
        pipeline.counters.optimizer_seconds += end - start
        pipeline.spans.add(Span(f"update {bs.name}", "optimizer", "optimizer", start, end))
        zero = self.zero_after.pop(index, None)
        if zero is not None:
            self.grads.zero_block(bs, zero)

    def _after_update(self, bs: BlockState, wkind: str, kinds: list[str]) -> None:
        pipeline = self.pipeline
        if pipeline.compute != "dram" or wkind == "master":
            pipeline.detach(bs)  # the compute copy is stale now
        changed = [wkind] + [k for k in self.updater.state_kinds if k in bs.kinds]
        if wkind == "master":
            changed.append("weight")
        for kind in changed:
            pipeline.mark_modified(bs, kind, "dram")
        if pipeline.compute == "dram":
            pipeline._attach(bs)  # the parameters view the updated weights
        # Write home; the compute-dtype weights stay cached in DRAM for the next forward.
        for kind in changed:
            keep = kind == "weight"
            pipeline.flush(bs, kind, drop=not keep)

    def apply_all(self) -> None:
        while self.order:
            self.apply(self.order[0])

    def on_zero_grad(self, bs: BlockState, set_to_none: bool) -> bool:
        """``zero_grad()`` while ``bs`` still has a pending update: its gradients are needed by that
        update, so they are cleared right after it. Returns True when deferred this way."""
        if bs.index in self.pending:
            self.zero_after[bs.index] = set_to_none
            return True
        return False
