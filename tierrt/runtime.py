"""``tierrt.offload()``: the context manager around a user's own training loop.

Example (no GPU: DRAM is the compute tier, NVMe below it)::

    model = transformers.AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with tierrt.offload(model, tiers=[tierrt.dram("4GiB"), tierrt.nvme("/mnt/nvme/tierrt")],
                        optimizer=opt) as rt:
        for batch in loader:                   # the loop is unchanged
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        print(rt.report())
    # here the model is whole again, on the device it came from, with its trained values

Entering moves every parameter into its home tier (one flat aligned buffer per block and kind of
state) and frees the original memory; leaving gives the model back, also when the loop raised.

Without a ``with`` (``rt = tierrt.offload(...); rt.start()``, a notebook cell), ``rt.close()`` gives
the model back. References: :func:`offload` returns a handle holding the :class:`Runtime` and the
model; the runtime holds the model only weakly, and the model's hooks hold the runtime (it holds
the model's values). So a started runtime lives while either is held: dropping ``rt`` alone leaves
the model offloaded (:func:`runtime_of` finds its runtime to close it), and dropping both frees the
runtime at once, by reference counting alone (a ``weakref.finalize`` on the model), with a warning.
Nothing tierrt keeps after ``close()`` holds the model or the optimizer in a reference cycle.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch import nn

from . import _native
from .blocks import BlockSelector, Partition, check_separate_storage, partition_model
from .errors import ConfigError, HookError, TierCapacityError, listed
from .grads import GradientStore
from .hooks import HookSet
from .interrupts import HeldInterrupts
from .leaving import GivingBack
from .loading import LoadPatch, StateDictLoader
from .optim.blockwise import BlockwiseOptimizer
from .optim.wrappers import unwrap_optimizer
from .options import check_offload_options, check_path
from .placement import Placement, plan_placement
from .placing import PlacingAgain, weak_callback
from .relocation import Relocation
from .report import Counters, Report, write_chrome_trace
from .sizes import format_size
from .store import (
    BlockState,
    HostTier,
    KindState,
    NvmeTierStore,
    TensorStore,
    check_nvme_paths,
    gpu_device,
    remove_empty_dirs,
)
from .tiers import CxlTier, DramTier, GpuTier, NvmeTier, TierSpec, validate_tiers

log = logging.getLogger("tierrt")

__all__ = ["offload", "Runtime", "default_tiers", "runtime_of"]

# id(param) -> the Runtime offloading it (so a parameter cannot be offloaded twice). Reentrant: a
# dropped runtime is freed from a weakref callback, which may run while this thread holds it.
_OWNERS: dict[int, weakref.ReferenceType[Runtime]] = {}
_OWNERS_LOCK = threading.RLock()


@dataclass(frozen=True)
class NvmeSizing:
    """The swap files a placement asks for: ``size`` bytes (0: no nvme tier needed), of which
    ``step_bytes`` keep a step's previous optimizer state until the new one is home; ``atomic``
    when that room is there, or when nothing is homed on NVMe (a step's state homed in memory tiers
    is kept by undo copies: see :class:`tierrt.scheduler.optimizer.OptimizerPipeline`)."""

    size: int
    step_bytes: int
    atomic: bool


def default_tiers() -> list[TierSpec]:
    """The GPU if there is one, DRAM at half of the available memory, NVMe under the user's cache
    directory (``$XDG_CACHE_HOME/tierrt/swap`` or ``~/.cache/tierrt/swap``)."""
    from .tiers import dram, gpu, nvme

    tiers: list[TierSpec] = []
    if torch.cuda.is_available():
        tiers.append(gpu(torch.cuda.current_device()))
    available = psutil.virtual_memory().available
    tiers.append(dram(max(available // 2, 256 << 20)))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tiers.append(nvme(os.path.join(cache, "tierrt", "swap")))
    return tiers


def offload(
    model: nn.Module,
    tiers: Sequence[TierSpec] | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    blocks: BlockSelector = None,
    prefetch: int | None = None,
    compute_dtype: torch.dtype | None = None,
    progress: bool | None = None,
    io_backend: str = "auto",
    queue_depth: int = 32,
    weights: str | os.PathLike | None = None,
    init: bool = False,
    restore: bool | None = None,
    native_optimizer: bool | None = None,
    deferred_step: bool = True,
    overlap_backward: bool = True,
) -> Runtime:
    """Offload ``model`` across ``tiers`` for the duration of a ``with`` block.

    Args:
        model: any ``nn.Module`` with parameters (on the CPU, or on the GPU named in ``tiers``).
        tiers: tier specs fastest first, e.g. ``[tierrt.gpu(0), tierrt.dram("64GiB"),
            tierrt.nvme("/mnt/nvme0/x")]``; ``None`` picks :func:`default_tiers`.
        optimizer: a torch optimizer built over ``model.parameters()``; its ``step()`` and
            ``zero_grad()`` then work on the offloaded parameters, Adam/AdamW/SGD on tierrt's
            kernels with their state in the tiers, torch's other optimizers (and fused / foreach
            Adam, AdamW, SGD) stepped by torch block by block, their state in the tiers too. An
            optimizer not passed here (e.g. created inside
            the context, as a transformers ``Trainer`` wrapped by ``offload()`` does) is *adopted*
            at its first ``step()`` (see :mod:`tierrt.adopt`): it steps the offloaded parameters with
            torch's own arithmetic, block by block, its state in process memory; at the first
            ``zero_grad()`` that leaves no gradients (a ``Trainer`` calls ``model.zero_grad()``
            before its first step), the model is placed again with it (one pass over the weights, a
            warning says so) when its state can live in the tiers (torch's own optimizers, any mode,
            as above), and it goes on as if passed here. Passing it here skips
            that pass: ``opt = AdamW(model.parameters()); Trainer(..., optimizers=(opt, None))`` and
            ``offload(model, ..., optimizer=opt)``. An optimizer that cannot be adopted (a second
            one, ``native_optimizer=True``, a model entered in eval mode) raises from ``step()``.
            A wrapper that delegates to a torch optimizer (accelerate's ``AcceleratedOptimizer``
            from ``accelerator.prepare``) may be passed too: tierrt steps the optimizer inside it,
            and the wrapper's own policy (no step while accumulating, a GradScaler) is kept.
        blocks: how to group parameters into blocks: a list of modules or a predicate
            ``(name, module) -> bool``; default: each layer of the model's layer list, plus one
            block per other module that owns parameters.
        prefetch: blocks fetched ahead of compute (default 2, fewer when the budget is tight).
        compute_dtype: dtype to compute in (e.g. ``torch.bfloat16``); parameters keep their own
            dtype as fp32 master weights that the optimizer updates.
        progress: show a progress bar while the model is placed (default: when it is large).
        io_backend: "auto", "io_uring" or "threads" for NVMe I/O.
        queue_depth: NVMe requests kept in flight.
        weights: a safetensors checkpoint (file or ``save_pretrained`` directory) to load the
            parameters from, tensor by tensor straight into their tiers: with it, a model built on
            the meta device (e.g. under ``accelerate.init_empty_weights()``) is never whole in memory.
        init: give parameters that are on the meta device (and not in ``weights``) fresh values
            with their modules' own initializers, block by block (training from scratch a model
            too large to build in memory).
        restore: on exit, give the parameters back as ordinary tensors with their trained values on
            the device they came from. Default: yes, except for parameters that came from the meta
            device (they stay there; save them with :meth:`Runtime.save` first).
        native_optimizer: run Adam/AdamW/SGD on tierrt's kernels with their state in the tiers
            (default: when the optimizer's options allow; ``True`` insists, ``False`` keeps torch's
            arithmetic: its step, block by block, with the state tensors of torch's optimizers in the
            tiers, any other optimizer's in ``optimizer.state``).
        deferred_step: ``optimizer.step()`` returns once the update pipeline is started; each block's
            update completes at the latest when the block is next used (same results, less I/O).
        overlap_backward: when the loop runs one backward per ``optimizer.step()`` (learned from the
            previous step), start each block's update during backward as soon as its gradients are
            complete, and let ``step()`` commit it if nothing it used has changed (same results; the
            gradients are not read back from NVMe). ``False`` runs every update from ``step()`` on.

    Returns:
        A :class:`Runtime`; use it as a context manager. Errors in the arguments, budgets or paths
        raise a :class:`~tierrt.TierrtError` before anything moves, leaving the model untouched.

    Lifetime: a started runtime lives as long as the object returned here or the model is held (the
    model's hooks hold its runtime: the runtime holds the model's values). Dropping the runtime
    object without ``close()`` leaves the model offloaded and working;
    ``tierrt.runtime_of(model).close()`` gives it back later. Once both are dropped, the runtime is
    freed at once (threads, I/O engine, files, tier memory; the values it held are discarded) with a
    warning that it was not closed.
    """
    runtime = Runtime(
        model,
        tiers,
        optimizer=optimizer,
        blocks=blocks,
        prefetch=prefetch,
        compute_dtype=compute_dtype,
        progress=progress,
        io_backend=io_backend,
        queue_depth=queue_depth,
        weights=weights,
        init=init,
        restore=restore,
        native_optimizer=native_optimizer,
        deferred_step=deferred_step,
        overlap_backward=overlap_backward,
    )
    return _RuntimeHandle(runtime, model)


def runtime_of(model: nn.Module) -> Runtime | None:
    """The runtime that offloads ``model`` now (started and not closed), or None.

    For a runtime whose object was dropped without ``close()`` (a notebook cell run again)::

        tierrt.runtime_of(model).close()   # the model is whole again, with its trained values
    """
    with _OWNERS_LOCK:
        for param in model.parameters():
            owner = _OWNERS.get(id(param))
            runtime = owner() if owner is not None else None
            if runtime is not None and runtime.active and runtime._model_ref() is model:
                return runtime.handle(model)
    return None


class Runtime(PlacingAgain, GivingBack):
    """One offloaded model: its tiers, blocks, hooks and counters. Made by :func:`offload`."""

    def __init__(
        self,
        model: nn.Module,
        tiers: Sequence[TierSpec] | None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        blocks: BlockSelector = None,
        prefetch: int | None = None,
        compute_dtype: torch.dtype | None = None,
        progress: bool | None = None,
        io_backend: str = "auto",
        queue_depth: int = 32,
        weights: str | os.PathLike | None = None,
        init: bool = False,
        restore: bool | None = None,
        native_optimizer: bool | None = None,
        deferred_step: bool = True,
        overlap_backward: bool = True,
    ) -> None:
        blocks = check_offload_options(  # every option, type and value, before anything moves
            model,
            optimizer=optimizer,
            blocks=blocks,
            prefetch=prefetch,
            compute_dtype=compute_dtype,
            progress=progress,
            io_backend=io_backend,
            queue_depth=queue_depth,
            weights=weights,
            init=init,
            restore=restore,
            native_optimizer=native_optimizer,
            deferred_step=deferred_step,
            overlap_backward=overlap_backward,
        )
        # Weak: once started, the model's hooks hold the runtime, and the runtime must not hold the
        # model back (both could then only go by a garbage collection). :func:`offload` returns a
        # handle that holds both.
        self._model_ref = weakref.ref(model)
        self._handle_ref: weakref.ref[_RuntimeHandle] | None = None
        self._finalizer: weakref.finalize | None = None
        self._discarding = False  # freed because the model was dropped: nothing is given back
        self.tier_specs = validate_tiers(default_tiers() if tiers is None else tiers)
        # The torch optimizer that steps (under a wrapper such as accelerate's AcceleratedOptimizer,
        # which the user keeps calling: its step() and zero_grad() reach this one's)
        self.optimizer = None if optimizer is None else unwrap_optimizer(optimizer)
        self.block_selector = blocks
        self.prefetch = prefetch
        self.compute_dtype = compute_dtype
        self.progress = progress
        self.io_backend = io_backend
        self.queue_depth = queue_depth
        self.restore_on_exit = restore
        self.native_optimizer = native_optimizer
        self.deferred_step = deferred_step
        self.overlap_backward = bool(overlap_backward)
        self.weights_source = None if weights is None else os.fspath(weights)
        self.init_meta = bool(init)
        self.weights_index: Any = None
        self._trained = False
        self.active = False
        self.closed = False
        self.counters = Counters()
        self._step_mark = Counters()
        self._last_step = Counters()
        self._step_started = time.perf_counter()
        self._created = time.perf_counter()
        self.partition: Partition | None = None
        self.placement: Placement | None = None
        self.store: TensorStore | None = None
        self.pipeline: Any = None
        self.hooks: HookSet | None = None
        self.grads: GradientStore | None = None
        self.blockwise: BlockwiseOptimizer | None = None
        self._originals: dict[int, tuple[torch.device, torch.dtype]] = {}
        # name -> (the model's own instance attribute or None, tierrt's): zero_grad, train
        self._patched_methods: dict[str, tuple[Any, Any]] = {}
        self._train_requested = False  # model.train() inside a context entered in eval mode
        self._adopted = False  # self.optimizer was adopted (not passed to offload())
        # the BlockwiseOptimizer the placement was planned with (None: planned without an optimizer)
        self._planned_blockwise: BlockwiseOptimizer | None = None
        # the optimizer most recently built inside the context over the model's parameters (tierrt.adopt)
        self._noted: weakref.ref[torch.optim.Optimizer] | None = None
        # optimizers whose state did not fit the tiers: adopted with their state in memory, not retried
        self._kept_in_memory: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        # adopted optimizers another one took over from (see PlacingAgain._let_go_of_adopted)
        self._handed_back: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._steps_since_takeover = 0  # optimizer steps since an adopted one took over from another
        self._placing_again = False
        # the placement being replaced while placing again streams from it (tierrt.relocation)
        self._relocation: Relocation | None = None
        self._state_dict_handles: list[Any] = []
        # id(state dict being filled) -> {id(param): (weak reference to its value, block versions)}
        self._state_dict_reads: tuple[int, dict[int, tuple[weakref.ref, tuple[int, ...]]]] = (0, {})
        self.loader: StateDictLoader | None = None
        from tierrt.scheduler.transfer import SpanLog

        self.spans = SpanLog()  # transfers and waits, for trace() (empty until entered)

    @property
    def model(self) -> nn.Module:
        """The offloaded model."""
        model = self._model_ref()
        if model is None:
            raise HookError(
                "the model of this tierrt runtime was dropped, and the runtime freed with it; keep a "
                "reference to the model (or to the object tierrt.offload() returned) while using it"
            )
        return model

    def handle(self, model: nn.Module) -> _RuntimeHandle:
        """The object :func:`offload` returned for this runtime (a new one when it was dropped)."""
        handle = self._handle_ref() if self._handle_ref is not None else None
        return handle if handle is not None else _RuntimeHandle(self, model)

    # ---- context manager -------------------------------------------------------------------------
    def __enter__(self) -> Runtime:
        already = self.active
        try:
            self.start()
        except BaseException:
            if self.active and not already:  # an interrupt held while entering, raised once entered:
                self.close()  # no with-block will call __exit__, so the model is given back here
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            self.close()
        except KeyboardInterrupt:  # held while the model was given back: it is back
            raise
        except BaseException as close_error:
            # Parameters whose values are lost must not pass unnoticed behind the block's own error
            # (that error stays attached as the context of this one).
            if exc is None or getattr(close_error, "lost_parameters", None):
                raise
            self._note_failed_leaving(exc, close_error)  # told on the block's error, not only logged
        return False

    # ---- start -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Place the model in its tiers and install the hooks (what ``with`` does on entry)."""
        if self.active:
            raise HookError("this tierrt runtime is already active: enter it once")
        if self.closed:
            raise HookError("this tierrt runtime was closed; call tierrt.offload() again")
        model = self.model
        params = list(dict.fromkeys(model.parameters()))
        if not params:
            raise HookError(f"{type(model).__name__} has no parameters: there is nothing to offload")
        with _OWNERS_LOCK:
            for name, p in model.named_parameters():
                owner = _OWNERS.get(id(p))
                if owner is not None and owner() is not None and owner() is not self:
                    if owner().model is model:  # type: ignore[union-attr]
                        raise HookError(
                            f"{type(model).__name__} is already offloaded by an active tierrt.offload() "
                            "(a nested offload() of the same model, or a runtime started and never closed, "
                            "e.g. by a notebook cell run again): use the runtime that holds it, or give the "
                            "model back first with rt.close() (tierrt.runtime_of(model).close() when that "
                            "runtime object is gone)"
                        )
                    raise HookError(
                        f"parameter {name} is already offloaded by another active tierrt.offload() "
                        "(a parameter shared between two offloaded models); offload the models together "
                        "as one module"
                    )
        check_separate_storage(model)  # parameters viewing one another's memory: refused
        compute_spec = next((t for t in self.tier_specs if isinstance(t, GpuTier)), None)
        compute_device = gpu_device(compute_spec) if compute_spec else torch.device("cpu")
        for name, p in model.named_parameters():
            if p.device.type not in ("cpu", "meta") and p.device != compute_device:
                raise ConfigError(
                    f"parameter {name} is on {p.device}; tierrt takes models on the CPU or on "
                    f"the compute device {compute_device}"
                )
        self._check_sources(model, compute_device)
        if self._training(params):
            _check_dense_gradients(model)
        compute = compute_spec.name if compute_spec else "dram"

        budgets = self._budgets(compute_spec)
        if self.optimizer is not None and not any(p.requires_grad for p in params):
            raise HookError("an optimizer was given but no parameter of the model requires grad")
        partition, placement, blockwise = self._plan(model, params, compute, budgets)
        self.partition, self.placement = partition, placement
        if blockwise is not None:
            blockwise.names = {key: names[0] for key, names in self._aliases.items()}
            blockwise.check_existing_state()  # state from before entering: fits, or fail now
        log.info("tierrt placement: %s", placement.describe())

        # Create tiers: paths are checked (and swap files preallocated) before anything moves.
        sizing = self._nvme_sizing(placement, blockwise)
        store = self._make_store(sizing, budgets, compute_spec, compute_device, placement)
        try:
            imported = self._fill(store, partition, placement, blockwise, compute_device)
        except BaseException:
            self._unplace_after_failure()  # Ctrl-C included: the parameters still hold their values
            raise
        # From here on the parameters view the tiers: Ctrl-C waits until the runtime is whole (and
        # __enter__ then closes it again).
        with HeldInterrupts("entering the tierrt context"):
            try:
                self._let_go(store, compute_device)
            except BaseException:
                self._unplace_after_failure()
                raise
            self._install(model, params, store, partition, blockwise, imported, compute_device)

    def _nvme_sizing(
        self, placement: Placement, blockwise: BlockwiseOptimizer | None, reserved: int = 0
    ) -> NvmeSizing:
        """How large the swap files of ``placement`` are made: its NVMe homes, room to write blocks
        copy-on-write, and (when the disk has room for it beside ``reserved`` bytes that something
        else is about to take there) room to keep a step's previous optimizer state until the new
        one is home. Raises TierCapacityError when an nvme budget is below the minimum."""
        need_nvme = placement.needed.get("nvme", 0)
        if not need_nvme:
            return NvmeSizing(0, 0, True)
        nvme_spec = self._nvme_spec()
        assert nvme_spec is not None
        largest = max(k.layout.nbytes for kinds in placement.kinds for k in kinds.values())
        minimal = need_nvme + 4 * largest + (64 << 20)  # headroom for copy-on-write writes
        # A step keeps the previous step's optimizer state until the new one is home.
        step_bytes = 0
        if blockwise is not None and blockwise.updater.transactional:
            changed = {"weight", "master", *blockwise.state_kinds}
            step_bytes = sum(
                k.layout.nbytes
                for kinds in placement.kinds
                for name, k in kinds.items()
                if name in changed and k.home == "nvme"
            )
        size = minimal + step_bytes
        if nvme_spec.budget is not None:
            if nvme_spec.budget < minimal:
                raise TierCapacityError(
                    f"nvme budget {format_size(nvme_spec.budget)} is below the "
                    f"{format_size(minimal, round_up=True)} the placement needs there "
                    f"({format_size(need_nvme)} of "
                    "state plus room to write blocks copy-on-write)",
                    tier="nvme",
                    requested=minimal,
                    budget=nvme_spec.budget,
                )
            size = nvme_spec.budget
        else:
            free = min(shutil.disk_usage(_existing_ancestor(p)).free for p in nvme_spec.paths)
            if (free * len(nvme_spec.paths) - reserved) < size * 1.02 and step_bytes:
                size = minimal
        # Atomic when the previous step's state homed on NVMe has room (none homed there: always).
        return NvmeSizing(size, step_bytes, size >= minimal + step_bytes)

    def _make_store(
        self,
        sizing: NvmeSizing,
        budgets: dict[str, int | None],
        compute_spec: GpuTier | None,
        compute_device: torch.device,
        placement: Placement,
        reuse: TensorStore | None = None,
    ) -> TensorStore:
        """A store for a new placement: swap files of ``sizing.size`` (paths checked, files
        preallocated) and the host arenas and GPU tier of ``reuse`` (placing again: the arenas stay
        reserved, under the same budgets) or new ones. Sets ``self.store``, ``self.engine`` and
        ``self._step_atomic``; on failure what it made is freed again."""
        nvme_spec = self._nvme_spec()
        nvme_store = None
        engine = None
        try:
            if not sizing.size and nvme_spec is not None:
                # Not needed by this placement, checked all the same (a path that does not work
                # fails here, not once the model outgrows the memory tiers); what it made goes again.
                remove_empty_dirs(check_nvme_paths(nvme_spec.paths, 0))
            if sizing.size:
                assert nvme_spec is not None
                engine = _native.IOEngine(self.io_backend, self.queue_depth, 1 << 20)
                nvme_store = NvmeTierStore(nvme_spec, sizing.size, engine)  # checks the paths first
                if sizing.step_bytes and not sizing.atomic:
                    log.warning(
                        "tierrt: the nvme tier (%s) has no room to keep the previous step's optimizer "
                        "state while writing the next (%s more); a failed write then loses "
                        "step atomicity (each block stays whole)",
                        format_size(sizing.size),
                        format_size(sizing.step_bytes),
                    )
            if reuse is not None:
                store = TensorStore(reuse.host_tiers, nvme_store, reuse.gpu)
            else:
                store = TensorStore(self._host_tiers(budgets, placement), nvme_store, None)
                if compute_spec is not None:
                    from .store import GpuTierStore

                    gpu_budget = budgets[compute_spec.name]
                    assert gpu_budget is not None
                    store.gpu = GpuTierStore(compute_spec, gpu_budget, compute_device)
                    store.host_tiers["dram"].register_cuda()
        except BaseException:
            if nvme_store is not None:
                nvme_store.close()  # and its engine
            elif engine is not None:
                engine.close()
            raise
        self.store = store
        self.engine = engine
        self._step_atomic = sizing.atomic
        return store

    def _host_tiers(self, budgets: dict[str, int | None], placement: Placement) -> dict[str, HostTier]:
        """A new arena for every DRAM and CXL tier, of what ``placement`` needs there (its budget
        at most)."""
        host_tiers: dict[str, HostTier] = {}
        try:
            for spec in self.tier_specs:
                if isinstance(spec, (DramTier, CxlTier)):
                    name = "dram" if isinstance(spec, DramTier) else spec.name
                    budget = budgets[name]
                    assert budget is not None
                    host_tiers[name] = HostTier(spec, budget, size=placement.host_bytes(name, budget))
        except BaseException:
            for tier in host_tiers.values():
                tier.close()
            raise
        return host_tiers

    def _fill(
        self,
        store: TensorStore,
        partition: Partition,
        placement: Placement,
        blockwise: BlockwiseOptimizer | None,
        compute_device: torch.device,
    ) -> list[nn.Parameter]:
        """Give every block its homes in ``store``, make the pipeline over it, copy every value in
        (:meth:`_place`) and import the optimizer's state. Returns the parameters whose optimizer
        state was imported (see :meth:`_import_optimizer_state`)."""
        from tierrt.scheduler.pipeline import Pipeline

        self._build_blocks(store, partition, placement)
        compute = store.gpu.name if store.gpu is not None else "dram"
        self.pipeline = Pipeline(store, compute, compute_device, placement.depth, self.counters, self.spans)
        self.pipeline.update_reserve = placement.update_reserve
        self.pipeline.placement = placement
        self._place(store, partition, placement, compute_device)
        return self._import_optimizer_state(blockwise)

    def _install(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        store: TensorStore,
        partition: Partition,
        blockwise: BlockwiseOptimizer | None,
        imported: Any,
        compute_device: torch.device,
    ) -> None:
        """The rest of :meth:`start`, once the parameters view the tiers: owners, hooks, patches."""
        with _OWNERS_LOCK:
            for p in params:
                _OWNERS[id(p)] = weakref.ref(self)
        self._move_buffers(model, compute_device)
        trains = any("grad" in bs.kinds for bs in store.blocks)
        self.grads = GradientStore(self.pipeline, store) if trains else None
        self.hooks = HookSet(model, self.pipeline, self.grads, partition.hook_targets)
        self.hooks.on_forward_start = weak_callback(self._on_forward_start)
        self.hooks.owner = self  # the model's hooks hold its runtime (which holds the model's values)
        self.hooks.install()
        if blockwise is not None:
            self._connect(blockwise)
            if imported:
                blockwise.release_imported(imported)  # the tiers hold that state now
                _trim_heap()
            self.blockwise = blockwise
        self._planned_blockwise = blockwise
        self._slot_index = {id(slot.param): (bs, slot.index) for bs in store.blocks for slot in bs.spec.slots}
        self._patch_model()
        from .clip import ClipPatch

        ClipPatch.install(self)
        from .amp import AmpPatch

        AmpPatch.install(self)
        from .averaging import AveragingPatch

        AveragingPatch.install(self)
        LoadPatch.install(self)
        from .adopt import OptimizerAdoption

        OptimizerAdoption.install(self)
        from .functional import FunctionalPatch

        FunctionalPatch.install(self)
        self.active = True
        from .copying import DeepcopyPatch

        self._deepcopy_patch = DeepcopyPatch(self)
        self._deepcopy_patch.install()  # after active: it asks owns()
        self._step_started = time.perf_counter()
        self._step_mark = self.counters.copy()
        if self._finalizer is not None:
            self._finalizer.detach()  # placed again: one finalizer per runtime
        self._finalizer = weakref.finalize(model, _free_dropped, weakref.ref(self), type(model).__name__)
        self._finalizer.atexit = False  # at exit the process's end frees it all (workers stop first)

    def _plan(
        self, model: nn.Module, params: list[nn.Parameter], compute: str, budgets: dict[str, int | None]
    ) -> tuple[Partition, Placement, BlockwiseOptimizer | None]:
        """Partition and place; a layer too large for the compute tier's budget is split into its
        sub-modules (attention, MLP, ... then single layers) until the blocks fit."""

        def attempt(max_block: int | None) -> tuple[Partition, Placement, BlockwiseOptimizer | None]:
            partition = partition_model(model, self.block_selector, max_block)
            blockwise = None
            if self.optimizer is not None:  # checked now: a wrong optimizer fails before anything moves
                blockwise = BlockwiseOptimizer(
                    self.optimizer,
                    partition.block_of_param,
                    native=self.native_optimizer,
                    compute_dtype=self.compute_dtype,
                    deferred=self.deferred_step,
                    on_step_end=weak_callback(self._on_step_end),
                )
            placement = plan_placement(
                partition,
                compute=compute,
                budgets=budgets,
                compute_dtype=self.compute_dtype,
                depth=self.prefetch,
                train=self._training(params),
                state_kinds=blockwise.state_kinds if blockwise is not None else None,
                speculate=self.overlap_backward
                and blockwise is not None
                and blockwise.updater.transactional
                and blockwise.updater.thread_safe
                and "nvme" in budgets,
            )
            return partition, placement, blockwise

        try:
            result = attempt(None)
        except TierCapacityError as first:
            if self.block_selector is not None or first.details.get("tier") != compute:
                raise
            budget = budgets[compute] or 0
            result = None
            # The block the budget is short for, while split attempts fail on it unchanged.
            unsplittable = first.details.get("block")
            stuck = 0
            for divisor in (4, 8, 16, 32):
                try:
                    result = attempt(max(budget // divisor, 4096))
                    log.info(
                        "tierrt: blocks split to at most %s to fit the %s budget",
                        format_size(budget // divisor),
                        compute,
                    )
                    break
                except TierCapacityError as error:
                    if error.details.get("block") == unsplittable:
                        stuck += 1
                    elif error.details.get("block") is not None:
                        unsplittable = None  # splitting changed the largest block
                    if error.details.get("tensor") and not (unsplittable and stuck):
                        raise TierCapacityError(
                            f"{str(first).rstrip('. ')}. Splitting layers does not help: {error}",
                            **{**first.details, **error.details},
                        ) from None
            if result is None and unsplittable is not None and stuck:
                raise TierCapacityError(
                    f"{str(first).rstrip('. ')}. Block {unsplittable} cannot be split: "
                    f"{_why_unsplittable(model, unsplittable)}",
                    **first.details,
                ) from None
            if result is None:
                raise
        if result[2] is not None:
            log.info("tierrt optimizer: %s", result[2].updater.describe())
        return result

    def _training(self, params: list[nn.Parameter]) -> bool:
        """Whether gradients need homes: an optimizer was given, or the model is in training mode
        with trainable parameters (``model.eval()`` before entering saves their room)."""
        if not any(p.requires_grad for p in params):
            return False
        return self.optimizer is not None or self.model.training or self._train_requested

    def _check_sources(self, model: nn.Module, compute_device: torch.device) -> None:
        """Every parameter must have a value: in memory, or in the ``weights`` checkpoint."""
        from .weights import SafetensorsIndex

        self._aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._aliases.setdefault(id(p), []).append(name)
        index = SafetensorsIndex(self.weights_source) if self.weights_source is not None else None
        self.weights_index = index
        missing = []
        for name, p in model.named_parameters():
            if p.device.type == "meta" and (index is None or index.find(self._aliases[id(p)]) is None):
                missing.append(name)
        if self.init_meta:
            missing = []
        if missing:
            shown = listed(missing, 5)
            where = (
                f"the weights file {self.weights_source} does not provide them"
                if index is not None
                else "no weights= checkpoint was given"
            )
            raise HookError(
                f"{len(missing)} parameters are on the meta device (no values) and {where}: {shown}. "
                + (_untied_advice(model, missing) if index is not None else "")
                + "Pass weights= a safetensors checkpoint, init=True to initialise them, or build the model "
                "on the CPU"
            )
        for name, buf in model.named_buffers():
            if buf.device.type == "meta":
                raise HookError(
                    f"buffer {name} is on the meta device; build the model with its buffers real (e.g. "
                    "accelerate.init_empty_weights(include_buffers=False), the default)"
                )
            if buf.device.type not in ("cpu",) and buf.device != compute_device:
                raise ConfigError(f"buffer {name} is on {buf.device}, not on the CPU or {compute_device}")

    def _budgets(self, compute_spec: GpuTier | None) -> dict[str, int | None]:
        budgets: dict[str, int | None] = {}
        for spec in self.tier_specs:
            if isinstance(spec, GpuTier):
                budget = spec.budget
                if budget is None:
                    free, _ = torch.cuda.mem_get_info(spec.index)
                    budget = int(free * 0.5)
                budgets[spec.name] = budget
            elif isinstance(spec, DramTier):
                budget = spec.budget
                if budget is None:
                    budget = max(psutil.virtual_memory().available // 2, 256 << 20)
                budgets["dram"] = budget
            elif isinstance(spec, CxlTier):
                if spec.budget is None:
                    raise ConfigError("cxl(): give a budget (the size of the arena to reserve there)")
                budgets[spec.name] = spec.budget
            elif isinstance(spec, NvmeTier):
                budgets["nvme"] = None  # sized to the placement below, checked against free space
        return budgets

    def _build_blocks(self, store: TensorStore, partition: Partition, placement: Placement) -> None:
        for spec, kinds in zip(partition.blocks, placement.kinds):
            bs = BlockState(spec)
            for kind, plan in kinds.items():
                bs.kinds[kind] = KindState(plan.layout, plan.home)
            bs.pinned = spec.index in placement.pinned
            store.blocks.append(bs)
        for bs in store.blocks:
            for ks in bs.kinds.values():
                store.allocate_home(ks)

    def _place_kind(self, store: TensorStore, bs: BlockState, kind: str, ks: KindState) -> None:
        """Load ``bs``'s values of ``kind`` into a DRAM buffer and send it home. Its own method so
        that no view of the buffer outlives it: the next block's room_for() would count a view
        still held as memory used outside tierrt, which cannot be freed (an eval-mode model at a
        budget of one block and a half failed to enter so)."""
        pipeline = self.pipeline
        if ks.host is None:
            pipeline.room_for(ks, "dram", True, {bs.index})
        views = dict(zip(ks.layout.slots, store.host_views(bs, ks)))
        with torch.no_grad():
            for slot_index, view in views.items():
                self._load_value(bs.spec.slots[slot_index], view)
        ks.valid = {"dram"}
        if ks.home != "dram":
            keep = kind == "weight" and pipeline.compute == "dram" and bs.pinned
            pipeline.flush(bs, kind, drop=not keep)

    def _place(
        self, store: TensorStore, partition: Partition, placement: Placement, compute_device: torch.device
    ) -> None:
        """Copy every parameter into its block's home buffers (:meth:`_let_go` then drops the
        originals).

        The original tensors are dropped only after every block is safely home, so a failure part way
        (a full disk, an I/O error) leaves the model exactly as it was."""
        from tqdm.auto import tqdm

        total = sum(ks.nbytes for bs in store.blocks for kind, ks in bs.kinds.items() if kind != "grad")
        show = self.progress if self.progress is not None else total >= (1 << 30)
        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="tierrt: placing model",
            disable=not show,
            leave=False,
        )
        pipeline = self.pipeline
        try:
            for bs in store.blocks:
                for slot in bs.spec.slots:  # as first placed (placing again sees placeholders)
                    self._originals.setdefault(id(slot.param), (slot.param.device, slot.param.dtype))
                initialized = self._init_block(bs) if self.init_meta else []
                for kind, ks in bs.kinds.items():
                    if kind != "grad":
                        self._place_kind(store, bs, kind, ks)
                        bar.update(ks.nbytes)
                for param, shape, dtype in initialized:  # back to no memory: the values are home
                    _swap_tensor(param, torch.empty(shape, dtype=dtype, device="meta"))
            pipeline.drain()
        finally:
            bar.close()
        _trim_heap()  # temporaries of the placement (initialised blocks) go back to the OS

    def _import_optimizer_state(self, blockwise: BlockwiseOptimizer | None) -> list[nn.Parameter]:
        """The optimizer's state from before entering (steps taken, a loaded checkpoint, an earlier
        offload()) goes into the tiers, so training continues where it was. Runs while the
        parameters still hold their values, so a failure leaves everything as it was."""
        if blockwise is None:
            return []
        blockwise.bind(self.pipeline)
        return blockwise.import_state()

    def _let_go(self, store: TensorStore, compute_device: torch.device) -> None:
        """Everything is home: parameters now view their block (resident) or a placeholder. A meta
        parameter first becomes a real one (same Python object, so optimizers and modules keep it)."""
        pipeline = self.pipeline
        for bs in store.blocks:
            for slot in bs.spec.slots:
                if slot.param.is_meta:
                    _swap_tensor(slot.param, torch.empty((), dtype=slot.dtype, device=compute_device))
        for bs in store.blocks:
            if pipeline.compute == "dram" and "dram" in bs.kinds["weight"].valid:
                pipeline.attach(bs)
            else:
                pipeline.detach(bs)

    def _init_block(self, bs: BlockState) -> list[tuple[nn.Parameter, torch.Size, torch.dtype]]:
        """``init=True``: give the block's meta parameters values with their modules' own
        initializers (the model's ``_init_weights`` for transformers models, else each module's
        ``reset_parameters``), one block at a time. Returns what was materialised."""
        mine = {id(slot.param) for slot in bs.spec.slots if slot.param.is_meta}
        if not mine:
            return []
        done: list[tuple[nn.Parameter, torch.Size, torch.dtype]] = []
        init_module = getattr(self.model, "_init_weights", None)
        covered: set[int] = set()
        with torch.no_grad():
            for module in bs.spec.root.modules():
                direct = [p for p in module.parameters(recurse=False) if id(p) in mine]
                if not direct:
                    continue
                for p in direct:
                    done.append((p, p.shape, p.dtype))
                    _swap_tensor(p, torch.empty(p.shape, dtype=p.dtype))
                if callable(init_module):
                    init_module(module)
                elif hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                else:
                    names = ", ".join(self._aliases[id(p)][0] for p in direct)
                    raise HookError(
                        f"init=True: {type(module).__name__} ({names}) has no reset_parameters(); pass "
                        "weights= a checkpoint for it"
                    )
                covered.update(id(p) for p in direct)
        missing = mine - covered
        if missing:
            names = ", ".join(self._aliases[i][0] for i in missing)
            raise HookError(f"init=True: no module of block {bs.name} owns {names}; pass weights= for them")
        return done

    def _load_value(self, slot: Any, view: torch.Tensor) -> None:
        """Fill ``view`` with the parameter's starting value: from the placement being replaced
        while placing again (:mod:`tierrt.relocation`), from the weights file when there is one and
        it holds the parameter, else from the parameter itself."""
        if self._relocation is not None:
            self._relocation.read_into(slot.param, view)
            return
        entry = None
        if self.weights_index is not None:
            entry = self.weights_index.find(self._aliases[id(slot.param)])
        if entry is not None:
            self.weights_index.read_into(entry, view)
        else:
            view.copy_(slot.param.detach())

    def _unplace_after_failure(self) -> None:
        """Placement failed part way: the parameters still hold their values; free the tiers."""
        store = self.store
        if store is None:
            return
        try:
            if self.pipeline is not None:
                self.pipeline.close()
        except BaseException:  # noqa: BLE001
            log.exception("tierrt: draining transfers after a failed placement")
        store.close()
        self.store = None

    # ---- steps -----------------------------------------------------------------------------------

    def _connect(self, blockwise: BlockwiseOptimizer) -> None:
        """Attach ``blockwise`` to the placed model's pipeline and patch its optimizer's methods."""
        assert self.grads is not None and self.store is not None
        blockwise.attach(self.pipeline, self.store, self.grads)
        assert blockwise.updates is not None
        blockwise.updates.speculator.allowed = self.overlap_backward
        blockwise.on_zero_grad = weak_callback(self.after_zero_grad)  # the optimizer holds it
        blockwise.watch_copy = weak_callback(self._watch_copy)
        if not getattr(self, "_step_atomic", False):
            blockwise.updates.transactional = False
        blockwise.install()

    def _watch_copy(self, copy: torch.Tensor, write: Callable[[torch.Tensor], None]) -> None:
        """Call ``write(copy)`` whenever ``copy`` changes in place on this thread (a copy of
        optimizer state read through ``optimizer.state``: see :mod:`tierrt.access`)."""
        access = self.hooks._access if self.hooks is not None else None
        if access is not None:
            access.watch_copy(copy, write)

    def _on_forward_start(self) -> None:
        if self.blockwise is None:
            self._step_boundary()

    def _on_step_end(self) -> None:
        self._trained = True
        self._steps_since_takeover += 1
        self._step_boundary()
        if self.pipeline is not None:
            self.pipeline.step_boundary()

    def _step_boundary(self) -> None:
        now = time.perf_counter()
        self.counters.wall_seconds += now - self._step_started
        self.counters.steps += 1
        self._step_started = now
        self._last_step = self.counters.minus(self._step_mark)
        self._step_mark = self.counters.copy()

    # ---- model patches ---------------------------------------------------------------------------
    def _patch_model(self) -> None:
        model = self.model
        grads = self.grads
        runtime = weakref.ref(self)

        def zero_grad(module_self: nn.Module, set_to_none: bool = True) -> None:
            if grads is not None:
                grads.zero(set_to_none)  # also gradients assigned by hand to offloaded parameters
            type(module_self).zero_grad(module_self, set_to_none)
            rt = runtime()
            if rt is not None:
                rt.after_zero_grad(set_to_none)  # a safe point to place with a noted optimizer

        def train(module_self: nn.Module, mode: bool = True) -> nn.Module:
            rt = runtime()
            if mode and rt is not None:
                rt._make_room_for_gradients()
            own = rt._patched_methods.get("train", (None, None))[0] if rt is not None else None
            return own(mode) if own is not None else type(module_self).train(module_self, mode)

        for name, method in (("zero_grad", zero_grad), ("train", train)):
            original = model.__dict__.get(name)
            setattr(model, name, _ModelMethod(method, model))
            self._patched_methods[name] = (original, model.__dict__[name])

        def state_dict_post_hook(
            module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
        ) -> None:
            rt = runtime()
            if rt is not None:
                rt._state_dict_post_hook(module, state_dict, prefix, local_metadata)

        # On every module that owns offloaded parameters itself, so that the state_dict() of any
        # submodule has real values too, and each module's entries are replaced right after it saved
        # them (they view the blocks' buffers, which must not stay held while other blocks are read).
        for module in model.modules():
            if any(id(p) in self._slot_index for p in module._parameters.values() if p is not None):
                self._state_dict_handles.append(module.register_state_dict_post_hook(state_dict_post_hook))
        # load_state_dict() writes the offloaded parameters' values into the tiers (see tierrt.loading)
        self.loader = StateDictLoader(self)
        self.loader.install(model)

    def _unpatch_model(self) -> None:
        model = self._model_ref()
        for name, (original, patched) in self._patched_methods.items():
            if model is None or model.__dict__.get(name) is not patched:
                continue  # replaced since by someone else: theirs stays
            if original is None:
                model.__dict__.pop(name, None)
            else:
                setattr(model, name, original)
        self._patched_methods.clear()
        for handle in self._state_dict_handles:
            handle.remove()
        self._state_dict_handles.clear()
        if self.loader is not None:
            self.loader.remove()
            self.loader = None

    def _state_dict_post_hook(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
    ) -> None:
        """``state_dict()`` of a module inside the context: real values of the parameters it owns
        itself, read from the tiers (a submodule's own hook handles the submodule's)."""
        if not self.active or self.partition is None:
            return
        entries = []
        for name, param in module._parameters.items():
            key = prefix + name
            if param is None or id(param) not in self._slot_index or key not in state_dict:
                continue
            if state_dict[key] is param:
                # state_dict(keep_vars=True): the parameter itself, as torch gives (its uses go
                # through tierrt.access, which reads and writes the tiers)
                continue
            bs, slot_index = self._slot_index[id(param)]
            entries.append((key, bs, bs.spec.slots[slot_index]))
            # Let go of the saved view first: it holds the block's buffer, which reading other
            # blocks (or applying their pending updates) may need room in place of.
            state_dict[key] = None
        if self._state_dict_reads[0] != id(state_dict):
            self._state_dict_reads = (id(state_dict), {})
        reads = self._state_dict_reads[1]
        for key, bs, slot in entries:
            # A tied parameter (an LM head sharing the embedding) is one tensor in torch's state
            # dict too: read it once per state_dict() call, so savers see the tie.
            version = tuple(ks.version for ks in bs.kinds.values())
            earlier = reads.get(id(slot.param))
            value = earlier[0]() if earlier is not None and earlier[1] == version else None
            if value is None:
                value = self._materialize(bs, slot, device=torch.device("cpu"))
                reads[id(slot.param)] = (weakref.ref(value), tuple(ks.version for ks in bs.kinds.values()))
            state_dict[key] = value

    # ---- copy.deepcopy inside the context (see tierrt.copying) ----------------------------------------
    def plain_parameter(self, param: nn.Parameter) -> nn.Parameter:
        """What ``copy.deepcopy(param)`` gives without tierrt: a new parameter holding its current
        value, in its original dtype, on the device it came from (the CPU for a meta one)."""
        from .copying import plain_parameter

        return plain_parameter(param, self.value(param, self.original_device(param)))

    def original_device(self, param: nn.Parameter) -> torch.device:
        """The device an offloaded parameter came from (the CPU for one built on the meta device)."""
        device = self._originals[id(param)][0]
        return torch.device("cpu") if device.type == "meta" else device

    def buffer_home(self, module: nn.Module, name: str) -> torch.device | None:
        """The device a buffer came from when entering moved it to the compute device, else None."""
        for owner, buf_name, device in getattr(self, "_buffer_devices", []):
            if owner() is module and buf_name == name:
                return device
        return None

    def hook_ids(self) -> set[int]:
        """The ids of every hook tierrt registered on the model's modules and parameters."""
        ids = {handle.id for handle in self._state_dict_handles}
        if self.loader is not None:
            ids |= self.loader.handle_ids()
        return ids | (self.hooks.handle_ids() if self.hooks is not None else set())

    def instance_original(self, module: nn.Module, name: str, current: Any) -> Any:
        """``module``'s instance attribute ``name`` ("forward", "zero_grad", "train") as it is without
        tierrt (None: it has none), given its value now."""
        if name == "forward" and self.hooks is not None:
            return self.hooks.original_forward(module, current)
        if name in self._patched_methods and module is self.model:
            original, patched = self._patched_methods[name]
            return original if current is patched else current
        return current

    def _materialize(
        self,
        bs: BlockState,
        slot: Any,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """A fresh tensor holding ``slot``'s current value (master weights when there are some)."""
        kind = (
            "master"
            if "master" in bs.kinds and bs.kinds["master"].layout.position(slot.index) is not None
            else "weight"
        )
        return self.pipeline.read_slot(bs, kind, slot.index, device, dtype)

    def _move_buffers(self, model: nn.Module, compute_device: torch.device) -> None:
        """Buffers (BatchNorm statistics, rotary frequencies, masks) are not tiered: they move with
        their module to the compute device, as ``model.to(device)`` would, and back on leaving."""
        # (module, weakly: the runtime does not hold the model, name, device the buffer came from)
        self._buffer_devices: list[tuple[weakref.ref[nn.Module], str, torch.device]] = []
        if compute_device.type == "cpu":
            return
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != compute_device:
                    self._buffer_devices.append((weakref.ref(module), name, buf.device))
                    module._buffers[name] = buf.to(compute_device)

    def synchronize(self) -> None:
        """Wait until every transfer in flight has finished (raising the first failure), the
        optimizer updates overlapped with backward and their writes home included."""
        if self.pipeline is not None:
            self.pipeline.drain()
            if self.blockwise is not None:
                self.blockwise.updates.speculator.settle()

    # ---- reading values inside the context -----------------------------------------------------------
    def value(self, param: torch.Tensor | str, device: torch.device | str | None = None) -> torch.Tensor:
        """A fresh copy of an offloaded parameter's current value, in its original dtype (the fp32
        master value under ``compute_dtype``), on ``device`` (default: the CPU).

        Using ``param`` itself works too (:mod:`tierrt.access` makes each torch call on it see the
        current value); this method gives a detached CPU copy, by name as well. ``param`` is the
        parameter or its name in the model. A pending update of its block is applied first.

        Example::

            with tierrt.offload(model, tiers=tiers, optimizer=opt) as rt:
                ...
                w = rt.value("lm_head.weight")        # or rt.value(model.lm_head.weight)
        """
        bs, slot_index = self._resolve(param)
        slot = bs.spec.slots[slot_index]
        dtype = self._originals[id(slot.param)][1]
        return self._materialize(bs, slot, torch.device(device or "cpu"), dtype)

    def grad(
        self, param: torch.Tensor | str, device: torch.device | str | None = None
    ) -> torch.Tensor | None:
        """A fresh copy of an offloaded parameter's accumulated gradient (what ``param.grad`` holds
        in a plain run), or None when it has none (no backward since the last ``zero_grad()``, or
        frozen). Gradients live in the tiers; reading ``param.grad`` between steps gives a copy
        of the same value (see :mod:`tierrt.access`), this method one on the CPU, by name as well
        (a gradient assigned by hand, ``param.grad = g``, is taken into the tiers when read).

        Example::

            loss.backward()
            g = rt.grad(model.lm_head.weight)
            print(g.norm())
        """
        bs, slot_index = self._resolve(param)
        if self.grads is None or "grad" not in bs.kinds:
            return None
        self._take_assigned(bs, slot_index)
        value = self.grads.read(bs, slot_index)
        if value is None or device is None:
            return value
        return value.to(device)

    def name_of(self, param: torch.Tensor) -> str:
        """``param``'s name in the model (for messages)."""
        names = self._aliases.get(id(param))
        return names[0] if names else f"a parameter of shape {list(param.shape)}"

    def named_grads(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, gradient copy)`` for every offloaded parameter that holds a gradient now, one
        at a time (each copy is made when its turn comes), like iterating ``named_parameters()``
        for ``p.grad`` in a plain run."""
        if self.grads is None:
            return
        for name, param in self.model.named_parameters():
            if id(param) in self._slot_index:
                value = self.grad(param)
                if value is not None:
                    yield name, value

    def _resolve(self, param: torch.Tensor | str) -> tuple[BlockState, int]:
        if not self.active:
            raise HookError("value()/grad() read the tiers: call them inside the with-block")
        if isinstance(param, str):
            found = next((key for key, names in self._aliases.items() if param in names), None)
            if found is None or found not in self._slot_index:
                raise HookError(f"the offloaded model has no parameter named {param!r}")
            return self._slot_index[found]
        if id(param) not in self._slot_index:
            raise HookError(
                f"a tensor of shape {list(param.shape)} is not a parameter this tierrt.offload() "
                "holds; pass one of model.parameters() or its name"
            )
        return self._slot_index[id(param)]

    # ---- gradients (clip_grad_norm_ and friends) ---------------------------------------------------
    def owns(self, param: torch.Tensor) -> bool:
        """True when ``param`` is one of the parameters this active runtime offloads."""
        return self.active and id(param) in self._slot_index

    def _slot(self, param: torch.Tensor) -> tuple[BlockState, int]:
        return self._slot_index[id(param)]

    def zero_grads(self, set_to_none: bool = True) -> None:
        """``zero_grad()`` for every offloaded parameter (the gradients in the tiers, and any
        assigned by hand): what an optimizer's or the model's ``zero_grad`` does inside the context."""
        if self.grads is not None:
            self.grads.zero(set_to_none)

    def take_assigned_grads(self, params: Iterable[torch.Tensor]) -> None:
        """Take gradients assigned by hand (``p.grad = g``) to those of ``params`` this runtime
        offloads into the tiers (before something reads the gradients)."""
        for p in params:
            if p.grad is not None and self.owns(p):
                self._take_assigned(*self._slot(p))

    def _take_assigned(self, bs: BlockState, slot_index: int) -> None:
        if self.grads is not None and bs.trains(slot_index):
            self.grads.take(bs, bs.spec.slots[slot_index])

    def grad_info(self, param: torch.Tensor) -> tuple[torch.device, torch.dtype] | None:
        """(device, dtype) of ``param``'s offloaded gradient as clipping sees it, None without one."""
        if self.grads is None:
            return None
        bs, slot_index = self._slot(param)
        self._take_assigned(bs, slot_index)
        updates = self.pipeline.updates
        if updates is not None and bs.index in updates.zero_after and updates.has_pending(bs.index):
            # zero_grad() came after the block's update, which is still pending (the block sat out
            # this step's forward): run it now, so the gradients it used are cleared as zero_grad() said
            updates.apply(bs.index)
        if slot_index not in self.grads.present.get(bs.index, ()):
            return None
        ks = bs.kinds["grad"]
        return torch.device("cpu"), ks.layout.dtypes[ks.layout.slots.index(slot_index)]

    def grad_norm(self, param: torch.Tensor, norm_type: float) -> torch.Tensor:
        assert self.grads is not None
        bs, slot_index = self._slot(param)
        return self.grads.norm(bs, slot_index, norm_type)

    def grad_nonfinite(self, param: torch.Tensor) -> bool:
        assert self.grads is not None
        bs, slot_index = self._slot(param)
        return self.grads.nonfinite(bs, slot_index)

    def scale_grads(self, params: list[torch.Tensor], factor: float) -> None:
        assert self.grads is not None
        for p in params:
            if self.grad_info(p) is not None:
                bs, slot_index = self._slot(p)
                self.grads.scale(bs, slot_index, factor)

    def clamp_grads(self, params: list[torch.Tensor], value: float) -> None:
        assert self.grads is not None
        by_block: dict[int, list[int]] = {}
        for p in params:
            if self.grad_info(p) is not None:
                bs, slot_index = self._slot(p)
                by_block.setdefault(bs.index, []).append(slot_index)
        for index, slots in by_block.items():
            self.grads.clamp(self.store.blocks[index], slots, value)  # type: ignore[union-attr]

    # ---- saving ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> str:
        """Write the model's current values (parameters in their original dtype, persistent buffers)
        to a safetensors file, one tensor in memory at a time. Atomic (temporary file, fsync, rename).
        Loadable with ``safetensors.torch.load_file`` or back into tierrt with ``weights=``.

        Tied parameters (one tensor under several names, e.g. an embedding shared with the LM head)
        are stored once, under their first name, as safetensors requires; ``transformers``'
        ``from_pretrained`` and tierrt's ``weights=`` re-tie them. A plain
        ``model.load_state_dict(load_file(path))`` of a tied model needs ``strict=False`` (the
        missing keys are the tied aliases), or ``safetensors.torch.load_model(model, path)``.

        Example::

            with tierrt.offload(model, tiers=tiers, optimizer=opt) as rt:
                train(model, opt)
                rt.save("checkpoint.safetensors")
        """
        from .weights import write_safetensors

        path = check_path("rt.save(path)", path)
        if not self.active:
            raise HookError("save() needs an active tierrt context (inside the with-block)")
        self.pipeline.drain()
        where: dict[str, tuple[BlockState, Any]] = {}
        specs = []
        for bs in self.store.blocks:  # type: ignore[union-attr]
            for slot in bs.spec.slots:
                name = self._aliases[id(slot.param)][0]
                where[name] = (bs, slot)
                specs.append((name, self._originals[id(slot.param)][1], tuple(slot.shape)))
        buffers = {}
        for module_name, module in self.model.named_modules():
            for buf_name, buf in module._buffers.items():
                if buf is not None and buf_name not in module._non_persistent_buffers_set:
                    key = f"{module_name}.{buf_name}" if module_name else buf_name
                    buffers[key] = buf
                    specs.append((key, buf.dtype, tuple(buf.shape)))

        def produce(name: str) -> torch.Tensor:
            if name in buffers:
                return buffers[name].detach().cpu()
            bs, slot = where[name]
            return self._materialize(bs, slot, torch.device("cpu"), self._originals[id(slot.param)][1])

        return write_safetensors(path, specs, produce)

    # ---- observability ---------------------------------------------------------------------------
    def report(self) -> Report:
        """Figures for the last completed step and in total (see :mod:`tierrt.report`)."""
        total = self.counters.copy()
        total.wall_seconds += time.perf_counter() - self._step_started if self.active else 0.0
        tiers: dict[str, dict[str, Any]] = {}
        if self.store is not None:
            store = self.store
            if store.gpu is not None:
                tiers[store.gpu.name] = store.gpu.stats()
            for name, tier in store.host_tiers.items():
                stats = tier.stats()
                tiers[name] = {
                    "budget": tier.budget,
                    "reserved": tier.size,
                    "in_use": stats.get("in_use", 0),
                    "peak_in_use": stats.get("peak_in_use", 0),
                    "free": stats.get("free", 0),
                    "largest_free": stats.get("largest_free", 0),
                }
            if store.nvme is not None:
                stats = store.nvme.stats()
                tiers["nvme"] = {
                    "budget": store.nvme.spec.budget or store.nvme.size,
                    "reserved": store.nvme.size,
                    "in_use": stats.get("in_use", 0),
                    "peak_in_use": stats.get("peak_in_use", 0),
                    "free": stats.get("free", 0),
                    "direct": stats.get("direct"),
                }
        return Report(self._last_step, total, tiers, self._overhead())

    def _overhead(self) -> dict[str, int]:
        """The process's memory and what of it the arenas account for."""
        tiers = self.store.host_tiers.values() if self.store is not None else ()
        arenas = sum(t.size for t in tiers if t.arena is not None)  # a closed runtime holds none
        return {"process RSS": psutil.Process().memory_info().rss, "host arenas": arenas}

    def trace(self, path: str | os.PathLike) -> str:
        """Write a Chrome/Perfetto trace of transfers and waits so far to ``path``."""
        path = check_path("rt.trace(path)", path)
        return write_chrome_trace(path, self.spans.snapshot(), origin=self._created)

    @property
    def blocks(self) -> list[BlockState]:
        return [] if self.store is None else self.store.blocks

    def describe(self) -> str:
        """The placement in words."""
        return "" if self.placement is None else self.placement.describe()


class _RuntimeHandle(Runtime):
    """What :func:`offload` returns: the runtime, also holding its model.

    The runtime holds its model weakly and the model's hooks hold the runtime, so that dropping
    both frees everything at once, without waiting for a garbage collection. This handle gives the
    strong reference back to its holder (``with tierrt.offload(build_model(), ...) as rt:`` then
    keeps the model through ``rt.model``). Every attribute and method is the runtime's own."""

    _OWN = frozenset({"_runtime", "_held_model", "__class__", "__enter__", "__exit__", "__repr__"})

    def __init__(self, runtime: Runtime, model: nn.Module) -> None:
        # Runtime.__init__ is not called: this object has no state of its own beyond these two
        object.__setattr__(self, "_runtime", runtime)
        object.__setattr__(self, "_held_model", model)
        runtime._handle_ref = weakref.ref(self)

    def __getattribute__(self, name: str) -> Any:
        if name in _RuntimeHandle._OWN:
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "_runtime"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._runtime, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._runtime, name)

    def __enter__(self) -> Runtime:
        self._runtime.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return self._runtime.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        runtime = self._runtime
        state = "active" if runtime.active else "closed" if runtime.closed else "not started"
        return f"<tierrt.Runtime of {type(self._held_model).__name__}, {state}>"


class _ModelMethod:
    """A method tierrt sets on the model instance (``zero_grad``, ``train``) for the time of the
    context. It holds the model weakly: a bound method in the model's own ``__dict__`` would make
    the model a reference cycle, freed only by a garbage collection."""

    __slots__ = ("_func", "_model", "__signature__")

    def __init__(self, func: Any, model: nn.Module) -> None:
        import inspect

        self._func = func
        self._model = weakref.ref(model)
        signature = inspect.signature(func)  # as the bound method's: without the module
        self.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._func(self._model(), *args, **kwargs)


def _free_dropped(runtime_ref: weakref.ref[Runtime], model_name: str) -> None:
    """The model of a runtime that was never closed has been dropped, and its runtime object too
    (it held the model): nothing the user holds can use the runtime. Free everything now."""
    runtime = runtime_ref()
    if runtime is None or not runtime.active:
        return
    log.warning(
        "tierrt: a runtime offloading a %s was not closed, and the model and the runtime were dropped: "
        "its threads, files and tier memory are freed now and the values it held are discarded. Leave "
        "the with-block, or call rt.close(), to get the model back with its values",
        model_name,
    )
    try:
        runtime._discard()
    except BaseException:  # noqa: BLE001 - a weakref callback has nobody to raise to
        log.exception("tierrt: freeing a runtime whose model was dropped")


def _untied_advice(model: nn.Module, missing: list[str]) -> str:
    """For a transformers model whose tied weights are missing from its checkpoint because the model
    was built without tying them (``accelerate.init_empty_weights()`` leaves ``lm_head.weight``
    apart from the embedding; ``from_pretrained`` ties it): what to call first. Empty otherwise."""
    tied = getattr(model, "_tied_weights_keys", None)
    if not callable(getattr(model, "tie_weights", None)) or not tied:
        return ""
    sources = tied if isinstance(tied, dict) else {}
    untied = [name for name in missing if name in tied]
    if not untied:
        return ""
    pairs = ", ".join(f"{name} to {sources[name]}" if name in sources else name for name in untied[:3])
    return (
        f"The model ties {pairs}, but they are separate tensors now (built without tying, e.g. under "
        "accelerate.init_empty_weights()): call model.tie_weights() before tierrt.offload(), as "
        "from_pretrained does, and build the optimizer after it. "
    )


def _check_dense_gradients(model: nn.Module) -> None:
    """Refuse a trained module that produces sparse gradients (``nn.Embedding(sparse=True)``,
    ``nn.EmbeddingBag(sparse=True)``): the tiers hold dense gradient buffers only."""
    for name, module in model.named_modules():
        if getattr(module, "sparse", False) is not True:
            continue
        trained = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if trained:
            label = name or "the model"
            raise ConfigError(
                f"module {label} ({type(module).__name__}) has sparse=True: its gradients are sparse "
                "tensors, and tierrt keeps dense gradient buffers in its tiers. Build it with "
                "sparse=False (and a dense optimizer such as Adam instead of SparseAdam), freeze it "
                f"({label}.requires_grad_(False)) before entering, or offload a submodule without it",
                module=label,
            )


def _why_unsplittable(model: nn.Module, block: str) -> str:
    """Why splitting layers left ``block`` whole: its parameters belong to one module directly."""
    module = dict(model.named_modules()).get(block)
    kind = f" ({type(module).__name__})" if module is not None else ""
    return (
        f"its parameters are held directly by module {block}{kind} and are used together by the forward "
        "that reads them, so they move as one block. Raise the budget to the size above, or hold the "
        "parameters in submodules each called on its own (a ModuleList of modules streams one at a time)"
    )


def _swap_tensor(param: nn.Parameter, value: torch.Tensor) -> None:
    """Make ``param`` (the same Python object) hold ``value``, even across device types that
    ``param.data = value`` refuses (meta <-> cpu). Its attributes and ``requires_grad`` stay."""
    replacement = nn.Parameter(value, requires_grad=param.requires_grad)
    replacement.__dict__.update(param.__dict__)
    torch.utils.swap_tensors(param, replacement)


def _existing_ancestor(path: str) -> str:
    """``path`` or its nearest existing parent (where a directory about to be made will live)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps freed blocks under 32MiB mapped)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
