"""Placing a model again without bringing it back into memory: the old placement as a source.

Placing again (see :mod:`tierrt.placing`) makes a new placement (new plan, blocks and swap files)
and fills it block by block from the one it replaces, as :meth:`~tierrt.runtime.Runtime.start`
fills a placement from the parameters or a ``weights=`` checkpoint. A :class:`Relocation` is the
old placement while that happens:

1. :meth:`Relocation.settle`: every value the old placement holds is current in its home (dirty
   DRAM copies of NVMe-homed kinds written home), and every block is detached.
2. :meth:`Relocation.save`: the kinds homed in memory tiers (DRAM, CXL, the GPU: pinned weights,
   master weights or optimizer state that had room there) are copied to a *scratch* area, a swap
   file of their size on the nvme tier (or, without one, process memory: then the whole model was
   in memory tiers anyway); the old swap files keep everything else.
3. :meth:`Relocation.release`: the old placement lets go of every buffer in the memory tiers, so
   the new placement can have the same arenas (they stay reserved; an arena sized for the old
   placement that the new one outgrows is made again at the new size, under the same budget, once
   it is empty).
4. :meth:`Relocation.read_into`: the new placement reads each parameter's value (its master
   weights when the block has them, else its weights) from there, one old block's kind at a time
   through one staging buffer outside the budgets (the only memory placing again adds).
5. :meth:`Relocation.close` frees the old swap files and the scratch area; or, when filling the
   new placement failed, :meth:`Relocation.restore` gives the old placement its buffers and values
   back so that it can be used again.

The old swap files and the scratch area are only read once saved, so the old placement's values
stay whole until :meth:`close`: the nvme tier needs room for the new swap files and the scratch
area beside the old files for that moment (:func:`saved_bytes` says how much scratch).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from . import _native
from .errors import HookError, TierCapacityError
from .sizes import format_size
from .store import BlockState, HostBuffer, KindState, NvmeTierStore, TensorStore

if TYPE_CHECKING:
    from tierrt.scheduler.pipeline import Pipeline

log = logging.getLogger("tierrt")

__all__ = ["NoRoomToPlaceAgain", "Relocation", "saved_bytes"]


class NoRoomToPlaceAgain(TierCapacityError):
    """The nvme tier has no room for a second placement's swap files beside the current ones;
    raised before anything changes (placing again then falls back, see :mod:`tierrt.placing`)."""


def _saved_kinds(store: TensorStore) -> list[tuple[BlockState, str, KindState]]:
    """The kinds of ``store`` whose home is a memory tier (gradients excepted: placing again happens
    when none is held)."""
    return [
        (bs, kind, ks)
        for bs in store.blocks
        for kind, ks in bs.kinds.items()
        if kind != "grad" and ks.home != "nvme"
    ]


def saved_bytes(store: TensorStore) -> int:
    """Bytes of scratch :meth:`Relocation.save` writes for ``store``."""
    return sum(ks.nbytes for _, _, ks in _saved_kinds(store))


def _value_kind(bs: BlockState) -> str:
    """The kind that holds the block's parameters' values: the master weights when it has them (the
    compute-dtype weights derive from them), else the weights."""
    return "master" if "master" in bs.kinds else "weight"


def _one_off_buffer(nbytes: int) -> HostBuffer:
    """A page-aligned buffer of ``nbytes`` outside every tier's arena (O_DIRECT can read into it)."""
    size = max(-(-nbytes // 4096) * 4096, 4096)
    arena = _native.HostArena(size, hugepages=False, lock=False, populate=False, name="relocation")
    return HostBuffer(None, arena.alloc(size))


class Relocation:
    """The placement being replaced (its ``store`` and ``pipeline``) as the source of the values of
    the new one; see the module for the order of its steps."""

    def __init__(self, store: TensorStore, pipeline: Pipeline) -> None:
        self.store = store
        self.pipeline = pipeline
        self.scratch: NvmeTierStore | None = None
        # (block index, kind) -> its bytes: an extent of the scratch swap file, or a copy in memory
        self._saved: dict[tuple[int, str], int | torch.Tensor] = {}
        self._slot_of = {id(slot.param): (bs, slot) for bs in store.blocks for slot in bs.spec.slots}
        self._staging: HostBuffer | None = None
        self._staged: tuple[int, str] | None = None  # what the staging buffer holds now
        self.released = False

    # ---- 1-3: the old placement lets go of the memory tiers ------------------------------------------
    def settle(self) -> None:
        """Make the home copy of every kind current (dirty DRAM copies of NVMe-homed kinds are
        written home) and detach every block (its parameters view placeholders)."""
        pipeline = self.pipeline
        pipeline.drain()
        for bs in self.store.blocks:
            for kind, ks in bs.kinds.items():
                if kind != "grad" and ks.home == "nvme" and ks.valid and "nvme" not in ks.valid:
                    if "dram" not in ks.valid:
                        raise HookError(
                            f"placing again: {bs.name}.{kind} is current only on "
                            f"{', '.join(sorted(ks.valid))}, which tierrt cannot write home from"
                        )
                    pipeline.flush(bs, kind, drop=False)
        pipeline.drain()
        for bs in self.store.blocks:
            if bs.attached:
                pipeline.detach(bs)

    def save(self, scratch: NvmeTierStore | None) -> None:
        """Copy every kind homed in a memory tier to ``scratch`` (a swap file with room for
        :func:`saved_bytes`), or to process memory without one."""
        self.scratch = scratch
        for bs, kind, ks in _saved_kinds(self.store):
            source = self._current_copy(bs, kind, ks)
            if source is None:
                continue  # never written (state of an optimizer that has not stepped): nothing to keep
            if scratch is None:
                self._saved[(bs.index, kind)] = source.flat[: ks.nbytes].clone()
                continue
            extent = scratch.allocator.alloc(ks.nbytes)
            scratch.write(extent, source, ks.nbytes).wait()
            self._saved[(bs.index, kind)] = extent
        if self._saved:
            where = "a scratch swap file" if scratch is not None else "process memory"
            log.info(
                "tierrt: placing again: %s of state homed in memory tiers set aside in %s",
                format_size(sum(ks.nbytes for _, _, ks in _saved_kinds(self.store))),
                where,
            )

    def _current_copy(self, bs: BlockState, kind: str, ks: KindState) -> HostBuffer | None:
        """A host buffer holding the current bytes of ``bs.kind`` (the staging buffer for a copy on
        the GPU), or None when the kind holds no value."""
        if not ks.valid:
            return None
        if "dram" in ks.valid and ks.host is not None:
            return ks.host
        if ks.far is not None and ks.home in ks.valid:
            return ks.far
        if ks.gpu is not None:
            staging = self._staging_for(ks.nbytes)
            staging.flat[: ks.nbytes].copy_(ks.gpu)
            self._staged = None
            return staging
        self.pipeline.ensure_host(bs, kind)
        assert ks.host is not None
        return ks.host

    def release(self) -> None:
        """Let go of every DRAM, CXL and GPU buffer of the old placement (the arena ranges return
        once nothing views them); NVMe extents stay, for :meth:`read_into`."""
        store = self.store
        for bs in store.blocks:
            for ks in bs.kinds.values():
                assert ks.inflight is None, "release() with a transfer in flight"
                if ks.gpu is not None and store.gpu is not None:
                    store.gpu.release(ks.nbytes)
                ks.gpu, ks.host, ks.far = None, None, None
                ks.valid = {"nvme"} & ks.valid if ks.home == "nvme" else set()
        self.released = True

    # ---- 4: reading values ---------------------------------------------------------------------
    def read_into(self, param: torch.Tensor, view: torch.Tensor) -> None:
        """Copy ``param``'s value in the old placement into ``view`` (cast to its dtype), as
        ``view.copy_(param)`` of the parameter given back would."""
        bs, slot = self._slot_of[id(param)]
        kind = _value_kind(bs)
        ks = bs.kinds[kind]
        buffer = self._load(bs, kind, ks)
        position = ks.layout.position(slot.index)
        assert position is not None
        source = buffer.view(ks.layout.offsets[position], ks.layout.dtypes[position], slot.shape, slot.numel)
        view.copy_(source)

    def _load(self, bs: BlockState, kind: str, ks: KindState) -> HostBuffer:
        """The staging buffer holding ``bs.kind``'s bytes (read from the scratch area or the old
        swap files unless it holds them already)."""
        key = (bs.index, kind)
        staging = self._staging_for(ks.nbytes)
        if self._staged == key:
            return staging
        self._staged = None
        self._fill(staging, bs, kind, ks)
        self._staged = key
        return staging

    def _fill(self, target: HostBuffer, bs: BlockState, kind: str, ks: KindState) -> None:
        """Put the bytes of ``bs.kind`` saved or kept in the old swap files into ``target``."""
        saved = self._saved.get((bs.index, kind))
        if isinstance(saved, torch.Tensor):
            target.flat[: ks.nbytes].copy_(saved)
        elif saved is not None:
            assert self.scratch is not None
            self.scratch.read(saved, target, ks.nbytes).wait()
        elif ks.home == "nvme" and "nvme" in ks.valid:
            assert self.store.nvme is not None and ks.extent is not None
            self.store.nvme.read(ks.extent, target, ks.nbytes).wait()
        else:
            raise HookError(f"placing again: {bs.name}.{kind} holds no value to place again")

    def _staging_for(self, nbytes: int) -> HostBuffer:
        """The staging buffer, grown to ``nbytes`` when smaller (it holds one kind of one block)."""
        if self._staging is None or self._staging.nbytes < nbytes:
            self._staging, self._staged = None, None
            self._staging = _one_off_buffer(max(nbytes, self._largest_value_kind()))
        return self._staging

    def _largest_value_kind(self) -> int:
        return max(bs.kinds[_value_kind(bs)].nbytes for bs in self.store.blocks)

    # ---- 5: the end, one way or the other -------------------------------------------------------
    def restore(self) -> None:
        """Filling the new placement failed: give the old one its memory-tier homes back, with the
        values saved from them (the swap files were never changed), so that it can be used again."""
        store = self.store
        for bs in store.blocks:
            for kind, ks in bs.kinds.items():
                if ks.home == "nvme":
                    continue
                store.allocate_home(ks)
                ks.valid = set()
                key = (bs.index, kind)
                if key in self._saved:
                    self._put_home(bs, kind, ks)
                    ks.valid = {ks.home}
                elif ks.host is not None:
                    ks.host.flat.zero_()  # a cleared gradient's home: no leftover bytes
        self.released = False

    def _put_home(self, bs: BlockState, kind: str, ks: KindState) -> None:
        """Read the saved bytes of ``bs.kind`` into its (just allocated) home buffer."""
        if ks.host is not None or ks.far is not None:
            home = ks.host if ks.host is not None else ks.far
            assert home is not None
            self._fill(home, bs, kind, ks)
            return
        assert ks.gpu is not None
        staging = self._staging_for(ks.nbytes)
        self._staged = None
        self._fill(staging, bs, kind, ks)
        ks.gpu.copy_(staging.flat[: ks.nbytes])

    def close(self) -> None:
        """Free the old swap files, the scratch area and the staging buffer (the memory tiers are the
        new placement's now, or were given back by :meth:`restore`)."""
        self._staging, self._staged = None, None
        self._saved.clear()
        try:
            if self.scratch is not None:
                self.scratch.close()
        finally:
            self.scratch = None
            if self.store.nvme is not None:
                self.store.nvme.close()

    def close_scratch(self) -> None:
        """Free the scratch area and the staging buffer only (the old placement goes on)."""
        self._staging, self._staged = None, None
        self._saved.clear()
        if self.scratch is not None:
            scratch, self.scratch = self.scratch, None
            scratch.close()
