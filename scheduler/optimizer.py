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

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tierrt.errors import TierCapacityError, noted, restated
from tierrt.interrupts import HeldInterrupts
from tierrt.optim.updaters import HyperSnapshot, Updater
from tierrt.sizes import format_size

from .transfer import Span

if TYPE_CHECKING:
    from tierrt.grads import GradientStore
    from tierrt.store import BlockState, HostBuffer, KindState

    from .pipeline import Pipeline

log = logging.getLogger("tierrt.scheduler")

__all__ = ["PendingUpdate", "OptimizerPipeline"]


@dataclass
class PendingUpdate:
    """One block's update, recorded by ``step()`` and applied later."""

    block: int
    slots: list[int]
    hyper: HyperSnapshot
    muls: dict[int, list[float]]  # slot -> gradient multipliers (clip coefficients, 1/loss scale)
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
        self.managed: set[int] = set()  # blocks holding parameters of the optimizer
        self.members: set[int] | None = None  # id() of the optimizer's parameters (None: all)
        # Step transaction: NVMe-homed state changed by the open step keeps its previous extent until
        # every block's update is home (commit), so a failed write can restore the previous step.
        # Without an nvme tier every home is in memory: a step is undone from undo copies alone.
        self.transactional = updater.transactional
        self.step_open = False
        self.step_kinds: list[tuple[BlockState, str]] = []
        # Blocks of the open step whose changed state lives off NVMe in part (a DRAM or CXL home):
        # what their update changed there has no previous copy to go back to (see _not_undone).
        self.step_unprotected: list[BlockState] = []
        self.step_updated: set[int] = set()  # blocks of the open step whose update has run
        self.step_undo_lost: set[int] = set()  # ... whose DRAM undo copy found no room, or was let go
        self.step_number = 0
        self._snapshot: Any = None
        self._in_step_call = False  # inside step(), once the step's number is counted
        pipeline.on_write_error = self.rollback
        from .speculation import Speculator

        self.speculator = Speculator(self)

    # ---- kinds -----------------------------------------------------------------------------------
    def weight_kind(self, bs: BlockState) -> str:
        return "master" if "master" in bs.kinds else "weight"

    def input_kinds(self, bs: BlockState) -> list[str]:
        kinds = [self.weight_kind(bs), "grad"] + [k for k in self.updater.state_kinds if k in bs.kinds]
        if "master" in bs.kinds:
            kinds.append("weight")  # the compute-dtype copy the step writes
        return kinds

    # ---- recording -------------------------------------------------------------------------------
    def changed_kinds(self, bs: BlockState) -> list[str]:
        """Kinds an update rewrites."""
        kinds = [self.weight_kind(bs)] + [k for k in self.updater.state_kinds if k in bs.kinds]
        if "master" in bs.kinds:
            kinds.append("weight")
        return kinds

    def record(self, blocks: list[int], hyper: HyperSnapshot) -> None:
        """``step()``: one pending update per block that has gradients. Hyperparameters the update
        could not use raise :class:`~tierrt.errors.HyperparameterError` first, changing nothing."""
        self.updater.check_hyper(hyper)
        self.apply_all()  # a second step() before the first one's updates ran: finish those first
        self.commit()
        self.step_number += 1
        self._in_step_call = True  # a failure from here on is this step's, before step() returns
        try:
            self._record(blocks, hyper)
        finally:
            self._in_step_call = False

    def _record(self, blocks: list[int], hyper: HyperSnapshot) -> None:
        now = time.perf_counter()
        updatable = {index: self.updatable(index) for index in blocks}
        candidates = [index for index in blocks if updatable[index]]
        used_multipliers = any(key[0] in candidates for key in self.grads.muls)
        if self.transactional and candidates:
            self._open_step(candidates)
        self.pipeline.counters.block_updates += len(candidates)  # run now, in backward, or deferred
        for index in candidates:
            if self.speculator.commit(index, hyper):
                self.step_updated.add(index)
                continue  # updated during backward already
            slots = updatable[index]
            muls = {
                slot: list(self.grads.muls[(index, slot)])
                for slot in slots
                if (index, slot) in self.grads.muls
            }
            self.pending[index] = PendingUpdate(index, slots, hyper, muls, now)
            self.order.append(index)
        self.speculator.discard_all()
        self.speculator.on_step(used_multipliers)
        if not self.deferred:
            self.apply_all()
            self.commit()
        else:
            self.try_commit()  # every block speculated: the step is home already
            self.prefetch_next(None)

    def has_pending(self, index: int) -> bool:
        return index in self.pending

    def updatable(self, index: int) -> list[int]:
        """Slots of block ``index`` a step updates: those with a gradient whose parameter is the
        optimizer's (a trainable parameter left out of it keeps its value, as in torch)."""
        present = self.grads.present.get(index)
        if not present:
            return []
        if self.members is None:
            return sorted(present)
        slots = self.pipeline.blocks[index].spec.slots
        return sorted(i for i in present if id(slots[i].param) in self.members)

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

    def inputs_ready(self, bs: BlockState) -> bool:
        """Every input of ``bs``'s update is current in DRAM, no transfer in flight: applying it
        now does no I/O."""
        for kind in self.input_kinds(bs):
            ks = bs.kinds[kind]
            if ks.host is None or "dram" not in ks.valid or ks.inflight is not None:
                return False
        return True

    def apply(self, index: int) -> None:
        """Apply block ``index``'s pending update now (if it has one).

        The update stays pending until its inputs are in DRAM: an error while making room for them
        or reading them (:class:`~tierrt.errors.TierCapacityError`, an I/O error) leaves the block,
        its optimizer state and the pending update exactly as they were, so a later call applies
        it. Only the kernel changes state, and it runs once nothing can fail for lack of room. An
        exception the update itself raises (the user's torch optimizer, a kernel's argument check)
        ends the step: see :meth:`_update_failed`."""
        update = self.pending.get(index)
        if update is None:
            return
        pipeline = self.pipeline
        bs = pipeline.blocks[index]
        start = time.perf_counter()
        kinds = self.input_kinds(bs)
        wkind = self.weight_kind(bs)
        failure: Exception | None = None
        for kind in kinds:
            bs.kinds[kind].pins += 1
        with contextlib.ExitStack() as held:
            try:
                self._stage_inputs(bs, kinds)
                self.prefetch_next(index)
                if self.pending.get(index) is not update:
                    return  # rolled back while its inputs were read (a failed write of the open step)
                # From here on the update changes state: Ctrl-C waits until the block is updated and
                # accounted for (stopped half way, it was left neither before nor after the update).
                held.enter_context(HeldInterrupts(f"updating block {bs.name}"))
                del self.pending[index]  # it is no longer pending
                self.order.remove(index)
                if wkind == "weight" and bs.attached and pipeline.compute != "dram":
                    pipeline.detach(bs)
                try:
                    self._keep_dram_undo(bs)
                    self.updater.apply(pipeline.store, bs, wkind, update.slots, update.hyper, update.muls)
                    self.step_updated.add(index)
                except Exception as error:  # noqa: BLE001 - handled below, once the pins are released
                    failure = error
            finally:
                for kind in kinds:
                    bs.kinds[kind].pins -= 1
            if failure is not None:
                try:
                    raise self._update_failed(bs, failure)
                finally:
                    failure = None  # no cycle (error -> traceback -> this frame -> error) to wait for gc
            self._after_update(bs, wkind, kinds)
            end = time.perf_counter()
            pipeline.counters.optimizer_seconds += end - start
            pipeline.spans.add(Span(f"update {bs.name}", "optimizer", "optimizer", start, end))
            zero = self.zero_after.pop(index, None)
            if zero is not None:
                self.grads.zero_block(bs, zero)

    def _update_failed(self, bs: BlockState, error: Exception) -> Exception:
        """Block ``bs``'s update raised ``error`` after it stopped being pending. Every other
        pending update of the step is dropped (as torch's step() stops at its first error) and the
        runtime stays usable. With a transactional step, the step is rolled back: every block holds
        the previous step's values. Otherwise ``bs``'s DRAM copies are kept as the update left them
        (what torch's in-place arithmetic would leave) and written home. Returns the error to raise:
        the same exception with a note saying what happened to the step."""
        what = f"tierrt: the optimizer update of block {bs.name} in step {self.step_number} raised this"
        if self.step_open:
            note = self._rolled_back_message(what)
            self._undo_step()
        else:
            self._abandon_step(bs)
            note = (
                f"{what}; that step cannot be rolled back here (no NVMe tier with room for copy-on-write, "
                "or the torch optimizer's own step): as when torch's step() raises partway, blocks "
                "updated before this one keep their new values and the others the previous step's"
            )
        return noted(error, note)

    def _abandon_step(self, bs: BlockState) -> None:
        """End a non-transactional step at ``bs``'s failed update: the rest of its pending updates
        are dropped and ``bs``'s DRAM copies become current (written home)."""
        self.speculator.discard_all()
        self.pending.clear()
        self.order.clear()
        pipeline = self.pipeline
        if bs.attached and pipeline.compute != "dram":
            pipeline.detach(bs)
        for kind in self.changed_kinds(bs):
            if bs.kinds[kind].host is not None:
                pipeline.mark_modified(bs, kind, "dram")
                pipeline.flush(bs, kind, drop=kind != "weight")
        self._zero_deferred()

    def _stage_inputs(self, bs: BlockState, kinds: list[str]) -> None:
        """Give every input kind of ``bs``'s update a DRAM buffer and read it there.

        Each kind gets its own extent (largest first), so free room split into several extents
        serves as well as one. When the extents still do not fit, the block's own copies in DRAM
        are let go (written home first where they are the only current copy) and every buffer is
        placed again into the room that leaves. Raises TierCapacityError, naming the pending update,
        only when even that does not fit; nothing has changed then."""
        try:
            try:
                self._reserve_inputs(bs, kinds)
            except TierCapacityError:
                if not self._release_own_copies(bs, kinds):
                    raise
                self._reserve_inputs(bs, kinds)
            for kind in kinds:
                self.pipeline.ensure_host(bs, kind, protect={bs.index})
        except TierCapacityError as error:
            raise TierCapacityError(
                f"{error}. The optimizer update of block {bs.name} (step {self.step_number}) was not "
                "applied and is still pending: the block's weights and optimizer state are unchanged, "
                "and the update runs when the block is next needed",
                **error.details,
            ) from error

    def _reserve_inputs(self, bs: BlockState, kinds: list[str]) -> None:
        """A DRAM buffer for each input kind that has none, largest first (evicting other blocks)."""
        missing = [kind for kind in kinds if bs.kinds[kind].host is None]
        for kind in sorted(missing, key=lambda k: bs.kinds[k].nbytes, reverse=True):
            self.pipeline.room_for(bs.kinds[kind], "dram", True, {bs.index})

    def _release_own_copies(self, bs: BlockState, kinds: list[str]) -> bool:
        """Let go of the DRAM copies of ``bs``'s input kinds that are not their home, so that all of
        them can be placed again without the ones already there splitting the free room. Dirty copies
        are written home first. Returns False when there was nothing to let go."""
        pipeline = self.pipeline
        released = False
        for kind in kinds:
            ks = bs.kinds[kind]
            if ks.host is None or ks.home == "dram" or ks.pins > 1:
                continue
            if kind == "weight" and pipeline.compute == "dram" and (bs.refcount > 0 or bs.pinned):
                continue  # compute is using these weights (with a GPU it uses its own copy)
            if ks.inflight is not None:
                pipeline.wait(bs, kind)
            if ks.host is None:
                continue
            pipeline.evict(bs, kind, "dram")
            released = True
        return released

    def _after_update(self, bs: BlockState, wkind: str, kinds: list[str]) -> None:
        pipeline = self.pipeline
        if bs.attached and (pipeline.compute != "dram" or wkind == "master"):
            pipeline.detach(bs)  # the compute copy is stale now
        changed = [wkind] + [k for k in self.updater.state_kinds if k in bs.kinds]
        if wkind == "master":
            changed.append("weight")
        for kind in changed:
            pipeline.mark_modified(bs, kind, "dram")
        if pipeline.compute == "dram":
            pipeline.attach(bs)  # the parameters view the updated weights
        # Write home; the compute-dtype weights stay cached in DRAM for the next forward.
        for kind in changed:
            keep = kind == "weight"
            pipeline.flush(bs, kind, drop=not keep)

    # ---- step transactions ----------------------------------------------------------------------
    def _open_step(self, blocks: list[int]) -> None:
        store = self.pipeline.store
        kinds = [
            (self.pipeline.blocks[i], kind)
            for i in blocks
            for kind in self.changed_kinds(self.pipeline.blocks[i])
        ]
        nvme_kinds = [(bs, kind) for bs, kind in kinds if bs.kinds[kind].home == "nvme"]
        # Speculated blocks wrote their results already; the others need room to write copy-on-write.
        need = sum(bs.kinds[kind].nbytes for bs, kind in nvme_kinds if bs.index not in self.speculator.specs)
        free = int(store.nvme.allocator.stats()["free"]) if store.nvme is not None else 0
        if need > free:
            self.pending.clear()
            self.order.clear()
            number, self.step_number = self.step_number, self.step_number - 1  # the next step() retries it
            raise TierCapacityError(
                f"nvme tier is full: step {number} writes {format_size(need)} of optimizer state "
                f"copy-on-write but only {format_size(free)} is free; nothing was changed, the model and "
                "optimizer keep the previous step's values. Give the nvme tier more room",
                tier="nvme",
                requested=need,
                free=free,
            )
        for bs, kind in nvme_kinds:
            bs.kinds[kind].in_step = True
        self.step_kinds = nvme_kinds
        self.step_unprotected = sorted(
            {bs.index: bs for bs, kind in kinds if bs.kinds[kind].home != "nvme"}.values(),
            key=lambda bs: bs.index,
        )
        self.step_updated, self.step_undo_lost = set(), set()
        self._snapshot = self.updater.snapshot()
        self.step_open = True

    def commit(self) -> None:
        """Every update of the open step is home: release the previous step's extents."""
        if not self.step_open:
            return
        self.apply_all()
        for bs, kind in self.step_kinds:
            self.pipeline.wait(bs, kind)
        for bs, kind in self.step_kinds:
            self.pipeline.store.commit_kind(bs.kinds[kind])
        self.step_kinds = []
        self._end_dram_undo()
        self.step_open = False

    def try_commit(self) -> bool:
        """Commit the open step if every update of it has been applied and written home, without
        waiting for anything. Committing early frees the previous step's extents, which the next
        step's copy-on-write writes (speculative updates during backward) need. True when no step is
        open afterwards."""
        if not self.step_open:
            return True
        if self.pending:
            return False
        for bs, kind in self.step_kinds:
            transfer = bs.kinds[kind].inflight
            if transfer is not None and not transfer.done():
                return False
        for bs, kind in self.step_kinds:
            self.pipeline.wait(bs, kind)  # finished: applies its result, never stalls
            ks = bs.kinds[kind]
            if ks.home not in ks.valid:
                return False  # a value of this step exists only in DRAM so far
        self.commit()
        return True

    def rollback(self, error: BaseException) -> BaseException:
        """Writing the open step's state failed: put every block back to the previous step."""
        if not self.step_open:
            return error
        message = self._rolled_back_message(
            f"writing step {self.step_number}'s optimizer state failed ({error})"
        )
        self._undo_step()
        return restated(error, message)

    def _rolled_back_message(self, what: str) -> str:
        """``what`` failed and the open step is being rolled back: what that means for the user."""
        n = self.step_number
        counted = "counting the optimizer.step() calls since entering tierrt.offload()"
        before = f"step {n - 1}'s values" if n > 1 else "the values they had before step 1"
        kept = self._not_undone()
        every = "every offloaded parameter and its optimizer state"
        caveat = ""
        if kept:
            every = "every other offloaded parameter and its optimizer state"
            caveat = (
                f". Not undone: block(s) {', '.join(kept)} keep step {n}'s update of their state in DRAM "
                "(which has no copy-on-write extent on NVMe to go back to), while their state on NVMe is "
                "back at the previous step: load a checkpoint to continue exactly"
            )
        if self._in_step_call:
            return (
                f"{what}. Step {n} ({counted}) was rolled back before its step() returned: {every} "
                f"hold {before}, and the gradients it was to apply are kept: fix the cause and call "
                f"step() again{caveat}"
            )
        return (
            f"{what}. Step {n} ({counted}) was rolled back although its step() had already returned: "
            f"{every} hold {before} again, so the batches trained since then must be redone, starting "
            f"with the one whose gradients step {n} applied{caveat}"
        )

    def _not_undone(self) -> list[str]:
        """Names of the open step's blocks already updated whose changed state lives off NVMe in
        part and has no undo copy: a rollback cannot give those parts their previous values (a CXL
        home, or a DRAM home whose copy found no room). Blocks not updated yet only lose their
        pending update, and keep their values."""
        return [
            bs.name
            for bs in self.step_unprotected
            if bs.index in self.step_updated and not self._undoable(bs)
        ]

    # ---- undo copies of DRAM-homed state --------------------------------------------------------
    # A kind homed in DRAM is rewritten in place (or replaced by a speculative update's buffer), so a
    # step that must be rolled back needs its previous value kept apart: a copy in the arena (room
    # made by evicting clean copies of released blocks only), or the old buffer a speculative update
    # replaces. Copies go when the step commits, and whenever DRAM is needed (make_room lets them go
    # before it waits for anything): a block whose copy went is then reported as not undone.
    def _undoable(self, bs: BlockState) -> bool:
        if bs.index in self.step_undo_lost:
            return False
        for kind in self.changed_kinds(bs):
            ks = bs.kinds[kind]
            if ks.home != "nvme" and (ks.home != "dram" or ks.dram_undo is None):
                return False
        return True

    def keep_previous(self, bs: BlockState, ks: KindState, previous: HostBuffer | None) -> None:
        """``ks`` (homed in DRAM) is about to be replaced; ``previous`` holds its value. While a
        step is open, keep it as the step's undo copy (the first one counts)."""
        if not self.step_open or ks.home != "dram" or ks.dram_undo is not None:
            return
        if previous is None:
            self.step_undo_lost.add(bs.index)
            return
        ks.dram_undo = previous

    def _keep_dram_undo(self, bs: BlockState) -> None:
        """Before ``bs``'s update rewrites its DRAM-homed kinds in place: copy each into arena room,
        free or made by evicting clean copies of released blocks (nothing is written or waited for)."""
        if not self.step_open or bs.index in self.step_undo_lost:
            return
        pipeline = self.pipeline
        dram = pipeline.store.dram
        for kind in self.changed_kinds(bs):
            ks = bs.kinds[kind]
            if ks.home != "dram" or ks.dram_undo is not None:
                continue
            copy = None
            if ks.host is not None:
                copy = dram.try_alloc(ks.nbytes, transient=True)
                if copy is None and pipeline.make_room("dram", ks.nbytes, {bs.index}, demand=False):
                    copy = dram.try_alloc(ks.nbytes, transient=True)
            if copy is None:
                self.step_undo_lost.add(bs.index)
                self._drop_dram_undo(bs)
                return
            copy.flat.copy_(ks.host.flat)  # type: ignore[union-attr]
            ks.dram_undo = copy

    def release_undo(self) -> bool:
        """DRAM is needed: let the open step's undo copies go (their blocks can no longer be rolled
        back, and a rollback says so). True when anything was freed."""
        freed = False
        for bs in self.step_unprotected:
            if self._drop_dram_undo(bs):
                self.step_undo_lost.add(bs.index)
                freed = True
        return freed

    def _drop_dram_undo(self, bs: BlockState) -> bool:
        dropped = False
        for ks in bs.kinds.values():
            if ks.dram_undo is not None:
                ks.dram_undo = None  # the arena range returns once no tensor views it
                dropped = True
        return dropped

    def _restore_dram_undo(self, bs: BlockState) -> None:
        """Rollback: the undo copies become ``bs``'s DRAM homes again (every other copy of those
        kinds, the compute device's included, goes)."""
        pipeline = self.pipeline
        for ks in bs.kinds.values():
            if ks.dram_undo is None:
                continue
            if bs.attached:
                pipeline.detach(bs)  # the parameters view the copy that goes now
            if ks.gpu is not None and pipeline.store.gpu is not None:
                pipeline.store.gpu.release(ks.nbytes)
                ks.gpu = None
            ks.host, ks.dram_undo = ks.dram_undo, None
            ks.valid = {"dram"}
            ks.version += 1

    def _end_dram_undo(self) -> None:
        """The step is over (committed or rolled back): its undo copies and records go."""
        for bs in self.step_unprotected:
            self._drop_dram_undo(bs)
        self.step_unprotected, self.step_updated, self.step_undo_lost = [], set(), set()

    def _undo_step(self) -> None:
        """Put every block back to the previous step: the open step's writes are undone, its pending
        updates dropped, the updater's counters restored, the zero_grad() calls that waited for its
        updates carried out. The step no longer counts: the next step() has its number."""
        self.step_open = False
        self.speculator.discard_all()
        self.pending.clear()
        self.order.clear()
        pipeline = self.pipeline
        for bs, kind in self.step_kinds:
            try:
                pipeline.wait(bs, kind)
            except BaseException:  # noqa: BLE001 - the first error is the one reported
                pass
        for bs, kind in self.step_kinds:
            ks = bs.kinds[kind]
            if kind == "weight" and bs.attached:
                # Even a block in use: its copy is about to go, and the error ends that use.
                pipeline.detach(bs)
            if ks.gpu is not None and pipeline.store.gpu is not None:  # a copy of the new values
                pipeline.store.gpu.release(ks.nbytes)
                ks.gpu = None
            pipeline.store.rollback_kind(ks)
        for bs in self.step_unprotected:
            if bs.index in self.step_updated:
                self._restore_dram_undo(bs)
        self.step_kinds = []
        self._end_dram_undo()
        self.updater.restore(self._snapshot)
        self._zero_deferred()
        self.step_number -= 1

    def _zero_deferred(self) -> None:
        """Carry out the zero_grad() calls that waited for pending updates."""
        for index, set_to_none in list(self.zero_after.items()):
            self.grads.zero_block(self.pipeline.blocks[index], set_to_none)
        self.zero_after.clear()

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

    def close(self) -> None:
        self.speculator.close()
