"""The pipeline: which block is where, when it moves, and what waits for what.

Compute asks for a block with :meth:`Pipeline.acquire` (made resident on the compute tier and its
parameters attached) and gives it back with :meth:`Pipeline.release`. Released blocks stay attached
as a cache until their memory is needed; then they are *evicted*: parameters detached (pointed at a
zero-size placeholder), dirty state written home, the copy dropped.

After each acquisition the pipeline looks up the next blocks in the learned trace and starts their
fetches, as far ahead as ``depth`` blocks and only into free memory (or memory held by released
blocks that are not needed sooner): a fetch never waits for room, so a window of one block cannot
deadlock. A block needed but not fetched in time is fetched synchronously (a *miss*).

Other kinds of state (gradients, master weights, optimizer states) move through the same
primitives: :meth:`ensure_host` brings a kind into DRAM, :meth:`flush` writes it home.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from tierrt.errors import TierCapacityError
from tierrt.placement import Placement
from tierrt.report import Counters
from tierrt.sizes import format_size
from tierrt.store import BlockState, HostBuffer, KindState, TensorStore

from .trace import Event, SuccessorTrace
from .transfer import Span, SpanLog, Transfer, TransferShare, TransferWorker

log = logging.getLogger("tierrt.scheduler")

__all__ = ["Pipeline", "Placeholders"]

OnReap = Callable[[BaseException | None], BaseException | None]


class _Forgotten(Exception):
    """Returned by the reap callback of a write whose value nobody wants any more (see
    :meth:`Pipeline.forget_write`): its failure is not raised."""


FORGOTTEN = _Forgotten()


def _outside_inference_mode(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` with inference mode off. What it creates (arena views, parameters' ``.data``,
    placeholders, optimizer state) outlives the user's ``torch.inference_mode()`` block: made inside
    it they would be inference tensors, which autograd refuses to save in a later training step."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return method(*args, **kwargs)
        return method(*args, **kwargs)

    return wrapper


class Placeholders:
    """Zero-memory stand-ins for detached parameters: the right shape, dtype and device, backed by
    a single NaN element (so a use outside tierrt's hooks shows up as NaN, not as silent zeros)."""

    def __init__(self) -> None:
        self._bases: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @_outside_inference_mode
    def get(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (device, dtype)
        base = self._bases.get(key)
        if base is None:
            fill = float("nan") if dtype.is_floating_point else 0
            base = torch.full((), fill, dtype=dtype, device=device)
            self._bases[key] = base
        return base.expand(shape)


class Pipeline:
    """Residency, prefetch, eviction and the transfers between tiers for one offloaded model."""

    def __init__(
        self,
        store: TensorStore,
        compute_tier: str,
        compute_device: torch.device,
        depth: int,
        counters: Counters,
        spans: SpanLog,
    ) -> None:
        self.store = store
        self.compute = compute_tier  # "dram" or "gpuN"
        self.device = compute_device
        self.depth = max(0, int(depth))
        self.counters = counters
        self.spans = spans
        self.trace = SuccessorTrace()
        self.placeholders = Placeholders()
        self.fetcher = TransferWorker("fetch", spans)
        self.flusher = TransferWorker("flush", spans)
        self._inflight: dict[int, tuple[BlockState, str]] = {}
        self._clock = 0
        self._step_first: Event | None = None  # the first block acquired in the current step
        self._new_step = True
        self.closed = False
        # True until the model is first used (a block acquired for compute or held for an access):
        # until then waits are the placement's (see _waited).
        self.placing = True
        # Called after a block's parameters are attached / before they are detached (the saved-tensor
        # hooks keep an index of which storage belongs to which block).
        self.on_attach: Callable[[BlockState], None] | None = None
        self.on_detach: Callable[[BlockState], None] | None = None
        # The optimizer's pending updates (scheduler.optimizer.OptimizerPipeline), applied before a
        # block is used again.
        self.updates: Any = None
        # Called when writing state of an open optimizer step fails; returns the error to raise.
        self.on_write_error: Callable[[BaseException], BaseException] | None = None
        # DRAM that prefetching leaves free while updates may run during backward (placement's
        # ``update_reserve``): without it, fetches fill the budget and no block is ever speculated.
        self.update_reserve = 0
        # The plan this pipeline serves: how much room the working set has (see Placement.held_mode)
        self.placement: Placement | None = None

    @property
    def blocks(self) -> list[BlockState]:
        return self.store.blocks

    # ---- transfers -------------------------------------------------------------------------------
    def _submit(
        self,
        bs: BlockState,
        kind: str,
        steps: list[Callable[[], Any]],
        link: str,
        on_reap: OnReap,
        worker: TransferWorker,
    ) -> Transfer:
        ks = bs.kinds[kind]
        assert ks.inflight is None, f"{bs.name}.{kind}: a transfer is already in flight"
        transfer = Transfer(f"{bs.name}.{kind}", link, ks.nbytes, steps)
        ks.inflight = transfer
        ks.on_reap = on_reap
        self._inflight[id(ks)] = (bs, kind)
        worker.submit(transfer)
        return transfer

    def adopt_write(
        self, bs: BlockState, kind: str, transfer: Transfer | TransferShare, new_extent: int
    ) -> None:
        """Track a write of ``bs.kind``'s DRAM copy to ``new_extent``, submitted elsewhere (a
        speculative update's), as the kind's transfer in flight: what waits for the kind waits for
        it, and it lands like any write home (see :meth:`flush`)."""
        ks = bs.kinds[kind]
        assert ks.inflight is None, f"{bs.name}.{kind}: a transfer is already in flight"
        ks.inflight = transfer
        ks.on_reap = self._write_landed(ks, new_extent, drop=False)
        self._inflight[id(ks)] = (bs, kind)

    def forget_write(self, bs: BlockState, kind: str) -> None:
        """The value of ``bs.kind`` being written home is no longer wanted (gradients that
        ``zero_grad(set_to_none=True)`` forgets): let the write run on instead of waiting for it.
        When it lands its extent is kept as the kind's (stale) home, or freed if it failed; nothing
        is marked current and a failure is logged, not raised."""
        ks = bs.kinds[kind]
        assert self.is_writing_home(ks), f"{bs.name}.{kind}: no write home in flight"
        landed = ks.on_reap

        def on_reap(error: BaseException | None) -> BaseException | None:
            if landed is not None:
                landed(error)  # extent bookkeeping: the new extent is kept or freed
            ks.valid.discard(ks.home)
            if error is not None:
                log.warning("%s.%s: a write of a forgotten value failed: %s", bs.name, kind, error)
            return FORGOTTEN

        ks.on_reap = on_reap

    def _reap(self, bs: BlockState, kind: str, wait: bool) -> bool:
        """Apply a finished transfer of ``bs.kind``; with ``wait``, wait for it first (a stall).

        Returns False when a transfer is still running (only without ``wait``). Re-raises the
        transfer's error after undoing its effect."""
        ks = bs.kinds[kind]
        transfer = ks.inflight
        if transfer is None:
            return True
        if not transfer.done():
            if not wait:
                return False
            start = time.perf_counter()
            transfer._done.wait()
            self._waited(f"{bs.name}.{kind}", start, time.perf_counter())
        ks.inflight = None
        on_reap, ks.on_reap = ks.on_reap, None
        self._inflight.pop(id(ks), None)
        hops = transfer.link.split("->")
        for src, dst in zip(hops, hops[1:]):
            self.counters.record_transfer(
                f"{src}->{dst}", kind, transfer.nbytes, transfer.finished - transfer.started
            )
        replacement = on_reap(transfer.error) if on_reap is not None else None
        if transfer.error is not None and replacement is not FORGOTTEN:
            if replacement is not None and replacement is not transfer.error:
                raise replacement from transfer.error
            raise transfer.error
        return True

    def _waited(self, what: str, start: float, end: float) -> None:
        """Count a wait for a transfer of ``what``: a stall of compute while the model is in use;
        while it is placed or given back, a wait of that phase (no step's stall), on its own lane
        of the trace."""
        seconds, counters = end - start, self.counters
        if self.store.overflow:  # set while the model is given back
            counters.leaving_wait_seconds += seconds
            lane = "giving back"
        elif self.placing:
            counters.placing_wait_seconds += seconds
            lane = "placing"
        else:
            counters.stall_seconds += seconds
            counters.stall_events += 1
            lane = "compute"
        self.spans.add(Span(f"wait {what}", "wait", lane, start, end))

    def reap_all(self) -> None:
        """Apply every finished transfer (cheap; called at each acquisition)."""
        for bs, kind in list(self._inflight.values()):
            self._reap(bs, kind, wait=False)
        if self.updates is not None:
            self.updates.speculator.reap()

    def poll(self, bs: BlockState, kind: str) -> bool:
        """Apply the transfer of ``bs.kind`` if it has finished; False while it still runs."""
        return self._reap(bs, kind, wait=False)

    def wait(self, bs: BlockState, kind: str) -> None:
        """Wait for the transfer of ``bs.kind`` in flight, if any."""
        self._reap(bs, kind, wait=True)

    def drain(self) -> None:
        """Wait for every transfer in flight; raise the first error after applying all of them."""
        first: BaseException | None = None
        while self._inflight:
            bs, kind = next(iter(self._inflight.values()))
            try:
                self._reap(bs, kind, wait=True)
            except BaseException as exc:  # noqa: BLE001
                first = first or exc
        if first is not None:
            raise first

    # ---- weights on the compute tier ------------------------------------------------------------
    def resident(self, bs: BlockState) -> bool:
        return self.compute in bs.kinds["weight"].valid

    @_outside_inference_mode
    def acquire(self, bs: BlockState, phase: str) -> None:
        """Make ``bs`` resident and attached; count a hit or a miss; prefetch what comes next."""
        self.placing = False
        self._apply_pending(bs)
        event: Event = (phase, bs.index)
        self.trace.observe(event)
        if self._new_step:
            self._step_first, self._new_step = event, False
        self._clock += 1
        bs.last_use = self._clock
        ks = bs.kinds["weight"]
        # A pinned block is counted only when its copy on the compute tier was dropped (with a
        # GPU, an optimizer update changed its weights in DRAM) and is not back yet.
        if not bs.pinned or self.compute not in ks.valid:
            if self.compute in ks.valid:  # resident (a write home may still be going on: reads are fine)
                self.counters.prefetch_hits += 1
            elif ks.inflight is not None and self._is_fetch(ks):
                self.counters.prefetch_hits += 1
            else:
                self.counters.prefetch_misses += 1
        self._attach_held(bs)
        self._prefetch_after(event)

    @_outside_inference_mode
    def hold(self, bs: BlockState) -> None:
        """Make ``bs`` resident and attached for a use outside the traced schedule (a parameter
        read or written between steps): as :meth:`acquire` (pending update applied first, a
        synchronous fetch if it is not resident), but nothing is traced, counted or prefetched and
        the block keeps its place in the eviction order. Give it back with :meth:`release`."""
        self.placing = False
        self._apply_pending(bs)
        self._attach_held(bs)

    def _apply_pending(self, bs: BlockState) -> None:
        """Land finished transfers, then apply ``bs``'s pending optimizer update (if any)."""
        self.reap_all()
        if self.updates is not None and self.updates.has_pending(bs.index):
            self.updates.apply(bs.index)

    def _attach_held(self, bs: BlockState) -> None:
        """Take a reference on ``bs`` and make it resident and attached (no reference is left
        when that fails)."""
        bs.refcount += 1
        try:
            self._make_resident(bs)
        except BaseException:
            bs.refcount -= 1
            raise
        if not bs.attached:
            self.attach(bs)

    def release(self, bs: BlockState) -> None:
        """Give ``bs`` back; it stays attached as a cache until its memory is needed."""
        if bs.refcount > 0:
            bs.refcount -= 1

    def is_writing_home(self, ks: KindState) -> bool:
        """A write of ``ks``'s DRAM copy home is in flight (it only reads that copy)."""
        transfer = ks.inflight
        return transfer is not None and transfer.link.startswith("dram->")

    def _is_fetch(self, ks: KindState) -> bool:
        transfer = ks.inflight
        return transfer is not None and transfer.link.endswith(self.compute)

    def _make_resident(self, bs: BlockState) -> None:
        ks = bs.kinds["weight"]
        if self.compute in ks.valid:
            return  # compute only reads the weights, so a write home in flight need not finish first
        if ks.inflight is not None:
            self.wait(bs, "weight")
        if self.compute in ks.valid:
            return
        if not self._start_weight_fetch(bs, demand=True):
            raise AssertionError("demand fetch did not start")
        self.wait(bs, "weight")
        assert self.compute in ks.valid

    def _start_weight_fetch(self, bs: BlockState, demand: bool, protect: Iterable[int] = ()) -> bool:
        """Start bringing ``bs``'s weights to the compute tier. Without ``demand`` only into room that
        is free or held by blocks outside ``protect``; returns False when there is none."""
        ks = bs.kinds["weight"]
        if self.compute in ks.valid or ks.inflight is not None:
            return True
        protect = set(protect) | {bs.index}
        if self.compute == "dram":
            if not self.room_for(ks, "dram", demand, protect):
                return False
            steps = self.store.read_steps(ks)
            link = f"{ks.home}->dram"
        else:
            need_stage = "dram" not in ks.valid
            if need_stage and not self.room_for(ks, "dram", demand, protect):
                return False
            if not self.room_for(ks, self.compute, demand, protect):
                if need_stage and ks.host is not None and ks.home != "dram":
                    self.store.drop(ks, "dram")
                return False
            steps = (self.store.read_steps(ks) if need_stage else []) + self.store.h2d_steps(ks)
            link = f"{ks.home}->dram->{self.compute}" if need_stage else f"dram->{self.compute}"

        def on_reap(
            error: BaseException | None, ks: KindState = ks, need_dram: bool = self.compute == "dram"
        ) -> BaseException | None:
            if error is not None:
                # The destination holds nothing usable; the home copy is untouched.
                if self.compute != "dram" and ks.gpu is not None:
                    self.store.drop(ks, self.compute)
                if ks.host is not None and ks.home != "dram" and "dram" not in ks.valid:
                    ks.host = None
                return self._read_failed(bs, "weight", demand, error)
            if need_dram:
                ks.valid.add("dram")
            else:
                if ks.host is not None:
                    ks.valid.add("dram")
                ks.valid.add(self.compute)

        self._submit(bs, "weight", steps, link, on_reap, self.fetcher)
        return True

    def step_boundary(self) -> None:
        """An optimizer step ended: start bringing in the blocks the next step begins with, as
        the last one began (their updates first), while the loop loads its next batch."""
        first, self._new_step = self._step_first, True
        if first is None or self.depth == 0:
            return
        window = [first[1]] + [b for _, b in self.trace.predict(first, self.depth - 1)]
        self._prefetch(window, set(window))

    def _prefetch_after(self, event: Event) -> None:
        if self.depth == 0:
            return
        window = [b for _, b in self.trace.predict(event, self.depth)]
        self._prefetch(window, set(window) | {event[1]})

    def _prefetch(self, window: list[int], protect: set[int]) -> None:
        """Start the fetches (and reads of update inputs) of ``window``'s blocks, in order, as long
        as there is room without evicting ``protect``."""
        applied_ahead = False
        for block_index in window:
            bs = self.blocks[block_index]
            if self.updates is not None and self.updates.has_pending(block_index):
                if not self.updates.prefetch_block(bs, protect):
                    break
                if self.compute == "dram" or applied_ahead or not self.updates.inputs_ready(bs):
                    continue
                # With a GPU, apply one upcoming block's update now, on the CPU, while the GPU runs
                # the kernels queued before it, so its copy to the GPU can start ahead of its use.
                applied_ahead = True
                try:
                    self.updates.apply(block_index)
                except TierCapacityError:
                    break  # the update stays pending (nothing changed); its use applies it
            if not self._start_weight_fetch(bs, demand=False, protect=protect):
                break

    def attach(self, bs: BlockState) -> None:
        ks = bs.kinds["weight"]
        views = self.store.host_views(bs, ks) if self.compute == "dram" else self.store.gpu_views(bs, ks)
        for pos, slot_index in enumerate(ks.layout.slots):
            param = bs.spec.slots[slot_index].param
            param.data = views[pos]
        bs.attached = True
        if self.on_attach is not None:
            self.on_attach(bs)

    def detach(self, bs: BlockState) -> None:
        """Point ``bs``'s parameters at placeholders (no memory); the block's copy can then go."""
        if self.on_detach is not None:
            self.on_detach(bs)
        ks = bs.kinds["weight"]
        for pos, slot_index in enumerate(ks.layout.slots):
            slot = bs.spec.slots[slot_index]
            slot.param.data = self.placeholders.get(slot.shape, ks.layout.dtypes[pos], self.device)
        bs.attached = False

    # ---- room ------------------------------------------------------------------------------------
    def room_for(self, ks: KindState, tier: str, demand: bool, protect: set[int]) -> bool:
        """Give ``ks`` a buffer on ``tier`` ("dram" or the GPU), evicting if needed."""
        alloc = self.store.try_host if tier == "dram" else self.store.try_gpu
        keep = self._reserve_for(ks, tier, demand)  # room a fetch that is not demanded leaves free
        if keep and ks.host is None:
            wanted = ks.nbytes + keep
            if not (self._fits(tier, wanted) or self.make_room(tier, wanted, protect, demand=False)):
                return False
        if alloc(ks):
            return True
        if self.make_room(tier, ks.nbytes, protect, demand=demand) and alloc(ks):
            return True
        if demand and tier == "dram" and self._collect_unreachable() and alloc(ks):
            return True
        if tier == "dram" and self.store.may_overflow() and demand:
            # giving the model back: outside the budget, never failing
            self.store.alloc_overflow(ks, self._held_outside())
            return True
        if demand:
            self._raise_no_room(tier, ks)
        return False

    def _collect_unreachable(self) -> bool:
        """DRAM held outside tierrt may be held by garbage only the cycle collector frees: a caught
        exception's traceback whose frames viewed blocks' buffers (a failed update, a failed
        speculative update). Collect it; True when that freed any DRAM."""
        if not self._held_outside():
            return False
        before = self.store.dram.largest_free()
        gc.collect()
        return self.store.dram.largest_free() > before

    def _reserve_for(self, ks: KindState, tier: str, demand: bool) -> int:
        """DRAM a fetch that is not demanded must leave free: room for one speculative update."""
        if demand or tier != "dram" or not self.update_reserve or self.updates is None:
            return 0
        return self.update_reserve if self.updates.speculator.enabled else 0

    def make_room(self, tier: str, nbytes: int, protect: set[int], demand: bool = True) -> bool:
        """Evict copies on ``tier`` until ``nbytes`` fit. Without ``demand``, only released blocks
        outside ``protect`` are evicted and nothing is waited for."""
        while not self._fits(tier, nbytes):
            victim = self._pick_victim(tier, protect, False)  # released clean copies first
            if victim is None and demand:
                if self.updates is not None and tier == "dram" and self.updates.release_undo():
                    continue  # the open step's undo copies go before any copy about to be used
                victim = self._pick_victim(tier, protect, True)
            if victim is not None:
                self.evict(victim[0], victim[1], tier)
                continue
            if not demand:
                return False
            if self.updates is not None and self.updates.speculator.release_memory():
                continue
            pending = [(bs, kind) for bs, kind in self._inflight.values()]
            if not pending:
                return False
            for bs, kind in pending:  # finished flushes free their DRAM copies
                self.wait(bs, kind)
        return True

    def _fits(self, tier: str, nbytes: int) -> bool:
        if tier == "dram":
            return self.store.dram.largest_free() >= nbytes
        assert self.store.gpu is not None
        return self.store.gpu.free_bytes() >= nbytes

    def _pick_victim(self, tier: str, protect: set[int], demand: bool) -> tuple[BlockState, str] | None:
        """The copy on ``tier`` to evict: released blocks not about to be used, least recently used
        first; with ``demand`` also blocks in the prefetch window (farthest first) and dirty copies
        (they are written home first)."""
        best: tuple[tuple[int, int], BlockState, str] | None = None
        for bs in self.blocks:
            for kind, ks in bs.kinds.items():
                if not self._holds(ks, tier) or ks.home == tier or ks.inflight is not None:
                    continue
                if kind == "weight" and (bs.refcount > 0 or (bs.pinned and tier == self.compute)):
                    continue  # a pinned block's DRAM staging copy (GPU compute) may go
                if ks.pins > 0:
                    continue
                clean = bool(ks.valid - {tier})
                if not clean and not demand:
                    continue
                protected = bs.index in protect
                if protected and not demand:
                    continue
                # rank: unprotected before protected, clean before dirty, then least recently used
                rank = (int(protected) * 2 + int(not clean), bs.last_use)
                if best is None or rank < best[0]:
                    best = (rank, bs, kind)
        return None if best is None else (best[1], best[2])

    def _holds(self, ks: KindState, tier: str) -> bool:
        return (ks.host is not None) if tier == "dram" else (ks.gpu is not None)

    def evict(self, bs: BlockState, kind: str, tier: str) -> None:
        """Drop ``bs.kind``'s copy on ``tier``, detaching parameters and writing it home first if it
        is the only current copy."""
        ks = bs.kinds[kind]
        if kind == "weight" and bs.attached and tier == self.compute:
            self.detach(bs)
        if ks.valid == {tier}:
            self.flush(bs, kind, drop=False)
            self.wait(bs, kind)
        self.store.drop(ks, tier)
        self.counters.evictions += 1

    def _raise_no_room(self, tier: str, ks: KindState) -> None:
        stats = self.store.dram.stats() if tier == "dram" else self.store.gpu.stats()  # type: ignore[union-attr]
        held = [bs.name for bs in self.blocks if bs.refcount > 0]
        outside = self._held_outside() if tier == "dram" else 0
        raise TierCapacityError(
            f"{tier}: no room for {format_size(ks.nbytes)} of {ks.layout.kind} "
            f"(budget {format_size(stats.get('capacity', stats.get('budget', 0)))}, "
            f"free {format_size(stats.get('free', 0))}, largest free extent "
            f"{format_size(stats.get('largest_free', stats.get('free', 0)))}); blocks in use now: "
            f"{', '.join(held) or 'none'}"
            + (
                f"; {format_size(outside)} of it is held by tensors outside tierrt that still view "
                "blocks' memory (e.g. param.detach() or param.data kept from inside the context): "
                "let go of them"
                if outside
                else ""
            )
            + f". Raise the {tier} budget or split the model into smaller blocks",
            tier=tier,
            requested=ks.nbytes,
            free=stats.get("free"),
            largest_free=stats.get("largest_free"),
        )

    def _held_outside(self) -> int:
        """Bytes of the DRAM arena in use that no copy of a block (nor an undo copy of its state,
        nor a speculative update's buffer) accounts for: ranges kept alive by tensors outside
        tierrt that still view them."""
        buffers: dict[int, HostBuffer] = {}
        for bs in self.blocks:
            for ks in bs.kinds.values():
                for buf in (ks.host, ks.dram_undo):
                    if buf is not None and buf.tier is self.store.dram:  # not one outside the budget
                        buffers[id(buf)] = buf
        if self.updates is not None:
            for spec in self.updates.speculator.specs.values():
                buffers.update((id(buf), buf) for buf in spec.buffers.values())
        in_use = int(self.store.dram.stats().get("in_use", 0))
        return max(in_use - sum(buf.nbytes for buf in buffers.values()), 0)

    # ---- other kinds -----------------------------------------------------------------------------
    def ensure_host(
        self, bs: BlockState, kind: str, *, demand: bool = True, protect: Iterable[int] = ()
    ) -> bool:
        """Make ``bs.kind`` current in DRAM (reading it from home if needed). Without ``demand`` it
        only starts the read when there is room, and returns at once."""
        ks = bs.kinds[kind]
        if ks.inflight is not None and demand:
            self.wait(bs, kind)
        if "dram" in ks.valid:
            return True
        if ks.inflight is not None:
            return True
        if not self.room_for(ks, "dram", demand, set(protect) | {bs.index}):
            return False
        if not ks.valid:  # never written: nothing to read (fresh gradients, new optimizer state)
            return True

        def on_reap(error: BaseException | None, ks: KindState = ks) -> BaseException | None:
            if error is None:
                ks.valid.add("dram")
                return None
            if ks.home != "dram":
                ks.host = None
            return self._read_failed(bs, kind, demand, error)

        self._submit(bs, kind, self.store.read_steps(ks), f"{ks.home}->dram", on_reap, self.fetcher)
        if demand:
            self.wait(bs, kind)
        return True

    def _read_failed(
        self, bs: BlockState, kind: str, demand: bool, error: BaseException
    ) -> BaseException | None:
        """What a failed read of ``bs.kind`` raises, once its effect is undone (the home copy is
        untouched, the destination holds nothing): a read someone asked for raises its error; a
        prefetch's failure is only logged (returns FORGOTTEN), whoever reaps it. The copy is then
        simply not there, and whatever needs it reads it again: a device that recovered meanwhile
        serves that read, one still failing raises a fresh error to the code that needs the data."""
        if demand:
            return None
        # str(error): a log record must not keep the error (and what its traceback holds) alive.
        log.warning("%s.%s: a prefetch failed (it is read again when needed): %s", bs.name, kind, str(error))
        return FORGOTTEN

    def flush(self, bs: BlockState, kind: str, drop: bool) -> None:
        """Write the DRAM copy of ``bs.kind`` home when it is the only current copy; with ``drop``,
        free the DRAM copy once it is safely home."""
        ks = bs.kinds[kind]
        if ks.inflight is not None:
            self.wait(bs, kind)
        if ks.home == "dram" or ks.host is None:
            return
        if ks.home in ks.valid:
            if drop:
                self.store.drop(ks, "dram")
            return
        while True:
            try:
                steps, new_extent = self.store.write_steps(ks)
                break
            except TierCapacityError as exc:  # no NVMe extent free: wait for writes in flight to finish
                writes = [(b, k) for b, k in self._inflight.values() if self.is_writing_home(b.kinds[k])]
                if writes:
                    for b, k in writes:
                        self.wait(b, k)
                    continue
                if ks.in_step and self.on_write_error is not None:
                    raise self.on_write_error(exc) from exc
                raise

        self._submit(
            bs, kind, steps, f"dram->{ks.home}", self._write_landed(ks, new_extent, drop), self.flusher
        )

    def _write_landed(self, ks: KindState, new_extent: int | None, drop: bool) -> OnReap:
        """What reaping a write of ``ks`` home does: the new extent becomes home (with ``drop``, the
        DRAM copy goes, unless it was pinned meanwhile: then it stays, a clean copy); if the write
        failed, the extent is freed, the old home copy and the DRAM copy stay, and a write of an open
        optimizer step rolls the step back."""

        def on_reap(error: BaseException | None) -> BaseException | None:
            if error is not None:
                self.store.abort_write(new_extent)
                if ks.in_step and self.on_write_error is not None:
                    return self.on_write_error(error)
                return None
            self.store.commit_write(ks, new_extent)
            if drop and ks.host is not None and ks.pins == 0:  # a pinned copy is being worked on
                self.store.drop(ks, "dram")
            return None

        return on_reap

    def read_slot(
        self,
        bs: BlockState,
        kind: str,
        slot_index: int,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """A fresh tensor with the current value of one parameter's share of ``bs.kind``."""
        if self.updates is not None and self.updates.has_pending(bs.index):
            self.updates.apply(bs.index)
        ks = bs.kinds[kind]
        slot = bs.spec.slots[slot_index]
        self.ensure_host(bs, kind)
        ks.pins += 1
        try:
            view = self.store.slot_view(bs, ks, slot, "dram")
            return view.to(device=device, dtype=dtype or view.dtype, copy=True)
        finally:
            ks.pins -= 1

    def write_values(self, bs: BlockState, values: dict[int, torch.Tensor]) -> None:
        """Set some parameters of ``bs`` (slot index -> a tensor of the parameter's shape, any dtype
        or device) as ``param.copy_(value)`` does in plain torch: into the master weights when the
        block has them, the compute-dtype weights then derived from those (as after an update), else
        into the weights. Other parameters keep their values; the gradients and optimizer state are
        untouched. A pending update of the block is applied first. Nothing changes when the block's
        copies cannot be brought into DRAM (no room, an I/O error).

        The new values are written home (the compute-dtype weights stay cached in DRAM) and every
        other copy (on the GPU, an older one on NVMe) stops counting as current."""
        if self.updates is not None and self.updates.has_pending(bs.index):
            self.updates.apply(bs.index)
        kinds = [kind for kind in ("master", "weight") if kind in bs.kinds]
        for kind in kinds:
            bs.kinds[kind].pins += 1
        try:
            for kind in kinds:
                self.ensure_host(bs, kind)
            with torch.no_grad():
                for slot_index, value in values.items():
                    source = value
                    for kind in kinds:
                        ks = bs.kinds[kind]
                        if ks.layout.position(slot_index) is None:
                            continue
                        view = self.store.slot_view(bs, ks, bs.spec.slots[slot_index], "dram")
                        view.copy_(source)
                        source = view  # the compute-dtype weights follow the master weights
        finally:
            for kind in kinds:
                bs.kinds[kind].pins -= 1
        for kind in kinds:
            self.mark_modified(bs, kind, "dram")
        for kind in kinds:
            self.flush(bs, kind, drop=kind != "weight")

    def mark_modified(self, bs: BlockState, kind: str, tier: str = "dram") -> None:
        """The copy on ``tier`` was changed in place: it is now the only current copy."""
        ks = bs.kinds[kind]
        ks.valid = {tier}
        ks.version += 1
        if kind == "weight" and self.compute != tier and self.store.gpu is not None and ks.gpu is not None:
            if bs.attached and bs.refcount == 0:
                self.detach(bs)
            if not bs.attached:
                self.store.gpu.release(ks.nbytes)
                ks.gpu = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.drain()
        finally:
            self.fetcher.close()
            self.flusher.close()
