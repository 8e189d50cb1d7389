"""The torch side of offloading: module hooks, saved-tensor hooks and gradient hooks.

Forward: a forward pre-hook on each hooked module acquires the blocks it needs (waiting only for a
fetch not yet finished) and the post-hook releases them.

Backward: autograd saves some parameters (or views of them) for backward. A saved-tensor pack hook
replaces every tensor that views a block's weights by a small reference; the unpack hook acquires
the block again (fetching it if it was evicted) and rebuilds the view. So backward fetches blocks
in reverse order exactly when they are needed, and no saved tensor pins a block's memory. A hook on
each hooked module's output also acquires its blocks when backward reaches that output, so
activation checkpointing works whether it recomputes the module through its hooks
(``checkpoint(layer, x)``) or not (``checkpoint(layer.forward, x)``, as transformers does). A block
acquired for backward is released once every trainable parameter in it has received its gradient,
or when later blocks show backward has moved on, and in any case when the backward pass ends. The
blocks a forward holds throughout (parameters used outside a call of their module) are held from
when backward reaches the model until the pass ends, since a recomputation reads them as the
forward did (DeBERTa hands ``rel_embeddings.weight`` to every checkpointed layer). Blocks held so
take room the placement gave the working set: when the rest of it no longer fits next to them with
the optimizer's pending updates running in the forward, those updates are applied before the blocks
are taken; when it does not fit even so, the forward that learns of them raises a
:class:`~tierrt.errors.TierCapacityError` with the budget that would fit (see :meth:`HookSet._learn_root`).

Gradients: ``register_post_accumulate_grad_hook`` moves each parameter's gradient to its block's
gradient buffer (adding to what earlier micro-batches left there) and frees it, so gradients never
pile up on the compute device. A gradient hook that runs before the accumulation first takes a
gradient assigned by hand (``p.grad = g``) into the buffer, replacing what it held.

Inside a ``torch.func`` gradient transform (grad, vjp, jacrev) the saved-tensor hooks step aside
(torch refuses them there) and the forward hooks refuse a forward that reads offloaded weights,
which the transform's backward could not have streamed back (see :mod:`tierrt.functional`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .access import ParameterAccess, pop_inert_modes
from .errors import HookError, TierCapacityError, listed
from .functional import grad_transform_error, in_grad_transform
from .sizes import format_size

if TYPE_CHECKING:
    from tierrt.scheduler.pipeline import Pipeline

    from .grads import GradientStore
    from .placement import HeldMode
    from .store import BlockState

log = logging.getLogger("tierrt.hooks")

__all__ = ["HookSet", "SavedWeightRef", "unfrozen_error"]


# Every installed HookSet (weakly), in installation order: see HookSet._pack.
_ACTIVE_HOOKSETS: list[weakref.ref[HookSet]] = []


def _versions_of(blocks: list[BlockState]) -> list[int]:
    """The version counters of the blocks' parameters (each in-place change of one bumps it)."""
    return [slot.param._version for bs in blocks for slot in bs.spec.slots]


class _OtherRuntimeRef:
    """A saved weight of another active runtime, packed by this one's hook: unpacked by its owner."""

    __slots__ = ("owner", "ref")

    def __init__(self, owner: HookSet, ref: Any) -> None:
        self.owner = owner
        self.ref = ref


def unfrozen_error(names: list[str]) -> HookError:
    """The error for parameters that did not require grad on entering tierrt.offload() and require
    it (or have a gradient) now."""
    shown = listed(names, 5)
    one = len(names) == 1
    what, it, now = ("parameter", "it", "it requires") if one else ("parameters", "them", "they require")
    return HookError(
        f"{what} {shown} did not require grad when tierrt.offload() was entered, so tierrt keeps no "
        f"gradient or optimizer state for {it} and cannot train {it}, but {now} grad now "
        "(requires_grad_(True) or add_param_group inside the with-block). Set requires_grad on every "
        "parameter to train before entering tierrt.offload(): leave the with-block, unfreeze, and "
        "enter again",
        parameters=names,
    )


_NO_FORWARD = object()


class _DirectForward:
    """A hooked module's instance-level ``forward`` while tierrt is active (see
    :meth:`HookSet._wrap_forward`)."""

    def __init__(self, module: nn.Module, inner: Callable[..., Any], hooks: weakref.ref[HookSet]) -> None:
        # The module holds this object: it holds the module weakly (and its class's forward unbound),
        # so that hooking a module does not make it a reference cycle only a garbage collection frees
        self._module = weakref.ref(module)
        bound = getattr(inner, "__self__", None) is module
        self._function = inner.__func__ if bound else None  # type: ignore[attr-defined]
        self._inner = None if bound else inner  # an instance-level forward (accelerate's): kept as is
        self.hooks = hooks
        functools.update_wrapper(self, inner)  # name, doc, and __wrapped__: inspect.signature() is inner's
        if bound:
            del self.__wrapped__  # the bound method held the module: signature() below instead
            self.__signature__ = inspect.signature(inner)

    @property
    def module(self) -> nn.Module:
        module = self._module()
        assert module is not None  # it holds this object
        return module

    def inner(self, *args: Any, **kwargs: Any) -> Any:
        """The forward tierrt wrapped."""
        if self._function is not None:
            return self._function(self.module, *args, **kwargs)
        assert self._inner is not None
        return self._inner(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hooks = self.hooks()
        module = self.module
        key = id(module)
        direct = hooks._direct.get(key) if hooks is not None else None
        if direct is None or hooks._in_call.get(key, 0) > 0:  # type: ignore[union-attr]
            return self.inner(*args, **kwargs)
        before, after = direct
        try:
            before(module, args)
            output = self.inner(*args, **kwargs)
        except BaseException:
            after(module, args, None)
            raise
        after(module, args, output)
        return output

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """``copy.deepcopy(model)`` inside the context: the copy gets its class's own forward (not
        a wrapper that would run the original module)."""
        import types

        copied = memo.get(id(self.module))
        if copied is None:
            return self
        return types.MethodType(type(copied).forward, copied)


@dataclass(frozen=True)
class SavedWeightRef:
    """What autograd keeps instead of a tensor that views a block's weights."""

    block: int
    version: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int


@dataclass(frozen=True)
class SavedCastRef(SavedWeightRef):
    """What autograd keeps instead of ``torch.autocast``'s cast of an offloaded weight (or a view of
    that cast): the weight (parameter ``slot`` of the block) is cast to ``dtype`` again when
    backward needs it, bit for bit the same."""

    slot: int


def _ref_fields(bs: BlockState, tensor: torch.Tensor) -> tuple[Any, ...]:
    """The fields of a :class:`SavedWeightRef` to ``tensor``, a view of (a cast of) ``bs``'s weights."""
    layout = (tuple(tensor.size()), tuple(tensor.stride()), tensor.storage_offset())
    return (bs.index, bs.kinds["weight"].version, tensor.dtype, *layout)


class HookSet:
    """Installs and removes every hook of one offloaded model."""

    def __init__(
        self,
        model: nn.Module,
        pipeline: Pipeline,
        grads: GradientStore | None,
        hook_targets: list[tuple[nn.Module, list[int]]],
    ) -> None:
        self._model = weakref.ref(model)  # the model holds its hooks (and through them this set)
        self.pipeline = pipeline
        self.grads = grads
        self.hook_targets = hook_targets  # until install(): then let go (the modules hold the hooks)
        self._handles: list[Any] = []
        self._saved_hooks: Any = None
        self._owners: dict[int, BlockState] = {}  # storage data_ptr -> block whose weights live there
        self._bwd_held: list[BlockState] = []
        self._callback_tasks: set[int] = set()
        self._grad_counts: dict[int, int] = {}
        self.on_forward_start: Callable[[], None] | None = None
        # What the model must keep alive through its hooks while they are installed (its runtime,
        # which holds the parameters' values); let go of on remove()
        self.owner: Any = None
        # Parameters used outside any call of a module holding them (see tierrt.access).
        self._slot_of: dict[int, tuple[BlockState, Any]] = {}  # id(param) -> (block, ParamSlot)
        self._access: ParameterAccess | None = None
        # (stand-in, parameter): ``p.detach()`` / ``p.data`` results still held when the mode left
        self.standins_left: list[tuple[torch.Tensor, nn.Parameter]] = []
        self._root_running = False  # between the model's forward pre-hook and its post-hook
        # The first forwards are watched for parameters used outside a call of the module holding
        # them (tierrt.access); later ones are not (the torch-function mode passes straight through)
        self._forwards_to_watch = 2
        self.quiet_forward = False  # a forward of the model is running and is not watched
        self.watching = 0  # > 0: forwards are watched (a functional_call given p.detach() stand-ins)
        self._root_blocks: list[BlockState] = []  # learned: acquired for the whole model forward
        # How pending updates run next to them (see Placement.held_mode): "defer" (in the pass),
        # "apply_first" (before they are taken), or None: they do not fit, and every forward raises
        # (a copy of) _root_error, which says so
        self._root_mode: HeldMode | None = "defer"
        self._root_error: TierCapacityError | None = None
        self._root_held: list[BlockState] = []
        # The same blocks held through a backward pass, which may recompute forward code (see
        # _hold_root_for_backward), and the graph task that took them
        self._root_bwd_held: list[BlockState] = []
        self._root_bwd_task = -1
        self._warned: set[int] = set()
        self._autocast_warned = False
        self._internal = 0  # > 0 while tierrt's own hooks run
        # The thread that entered the context: the only one whose forwards the hooks serve
        self._thread, self._thread_name = threading.get_ident(), threading.current_thread().name
        self._pid = os.getpid()  # a child forked from it has neither the tiers' memory nor I/O threads
        # Hooked modules' instance-level forward wrappers (see _wrap_forward), and how many calls
        # through module(...) are running per module (id) while their forward runs
        self._wrapped: list[tuple[weakref.ref[nn.Module], Any, Callable[..., Any]]] = []  # (weakly)
        self._in_call: dict[int, int] = {}
        # id(module) -> per running call (innermost last): the blocks its pre-hook acquired and its
        # parameters' versions then (see _write_changed), or None when the pre-hook failed
        self._calls: dict[int, list[tuple[list[BlockState], list[int] | None] | None]] = {}
        self._direct: dict[int, tuple[Callable[..., None], Callable[..., None]]] = {}  # id -> pre, post
        # (name, param) of parameters without a gradient buffer (frozen on entry) while training
        self.untrained: list[tuple[str, nn.Parameter]] = []

    # ---- installation --------------------------------------------------------------------------
    def install(self) -> None:
        blocks = self.pipeline.blocks
        for module, needed in self.hook_targets:
            needed_blocks = [blocks[i] for i in needed]
            pre, post = self._make_pre(needed_blocks), self._make_post(needed_blocks)
            self._handles.append(module.register_forward_pre_hook(pre))
            self._handles.append(module.register_forward_hook(post, always_call=True))
            self._wrap_forward(module, pre, post)
        model = self._model()
        assert model is not None
        self._handles.append(model.register_forward_pre_hook(self._root_pre))
        self._handles.append(model.register_forward_hook(self._root_post, always_call=True))
        self.hook_targets = []
        for bs in blocks:
            for slot in bs.spec.slots:
                self._slot_of[id(slot.param)] = (bs, slot)
        if self.grads is not None:
            for bs in blocks:
                for slot in bs.spec.slots:
                    if bs.trains(slot.index):
                        self._handles.append(slot.param.register_hook(self._make_assigned_hook(bs, slot)))
                        self._handles.append(
                            slot.param.register_post_accumulate_grad_hook(self._make_grad_hook(bs, slot))
                        )
                    else:
                        self.untrained.append((slot.name, slot.param))
        _pop_inert_entries()  # what a runtime freed from another thread left on this thread's stacks
        self._access = ParameterAccess(self)
        self._access.push()
        self._saved_hooks = _weak_saved_tensors_hooks(self)
        self._saved_hooks.__enter__()
        _ACTIVE_HOOKSETS.append(weakref.ref(self))
        self.pipeline.on_attach = self._on_attach
        self.pipeline.on_detach = self._on_detach
        for bs in blocks:
            if bs.attached:
                self._on_attach(bs)

    def _wrap_forward(self, module: nn.Module, pre: Callable[..., None], post: Callable[..., None]) -> None:
        """Cover calls of ``module.forward(...)`` that bypass ``module(...)`` and so its hooks
        (``for layer in self.layers: h = layer.forward(h)``, a recompute of ``layer.forward``): an
        instance-level ``forward`` runs the same pre- and post-hook around such a call. A call
        through ``module(...)`` passes straight through (its hooks ran already), and so does every
        call once the hooks are removed: the wrapper holds the hook set only weakly, so a wrapper
        that outlives the context (wrapped again by another library) pins no tier memory."""
        saved = module.__dict__.get("forward", _NO_FORWARD)  # an instance-level forward (accelerate)
        inner = module.forward
        self._direct[id(module)] = (pre, post)
        forward = _DirectForward(module, inner, weakref.ref(self))
        module.forward = forward  # type: ignore[method-assign]
        self._wrapped.append((weakref.ref(module), saved, forward))

    def handle_ids(self) -> set[int]:
        """The ids of tierrt's hooks (keys in the modules' and parameters' hook dicts)."""
        return {handle.id for handle in self._handles}

    def original_forward(self, module: nn.Module, current: Any) -> Any:
        """``module``'s instance-level ``forward`` as it is without tierrt: the one tierrt wrapped,
        or None when it had none (its class's). ``current`` is returned when tierrt did not put it
        there."""
        for wrapped, saved, forward in self._wrapped:
            if wrapped() is module and current is forward:
                return None if saved is _NO_FORWARD else saved
        return current

    def remove(self) -> None:
        own_thread = threading.get_ident() == self._thread
        if not own_thread:
            log.warning(
                "tierrt: a runtime entered on thread %r is freed on another one: its torch-function mode "
                "and saved-tensor hooks stay on that thread's stacks, passing everything through, until "
                "a runtime is next started there",
                self._thread_name,
            )
        if self._root_held:
            self._root_post(self._model(), (), None)
        self._release_root_backward()
        if self._access is not None:
            self._access.pop(own_thread)
            self.standins_left = self._access.left
            self._access = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module_ref, saved, forward in self._wrapped:
            module = module_ref()
            if module is None or module.__dict__.get("forward") is not forward:
                continue  # wrapped again since (it passes through to the original from now on)
            if saved is _NO_FORWARD:
                del module.__dict__["forward"]
            else:
                module.forward = saved  # type: ignore[method-assign]
        self._wrapped.clear()
        self._direct.clear()
        self._in_call.clear()
        self._calls.clear()
        _ACTIVE_HOOKSETS[:] = [ref for ref in _ACTIVE_HOOKSETS if ref() not in (None, self)]
        if self._saved_hooks is not None:
            top = torch._C._autograd._top_saved_tensors_default_hooks(True)
            if top is not None and top[0] is self._saved_hooks.pack_hook:
                self._saved_hooks.__exit__(None, None, None)
            elif own_thread:  # pushed since and left open (by the user's code), or another thread's stack
                log.warning(
                    "tierrt's saved-tensor hooks are not the innermost on exit (hooks contexts exited out "
                    "of order); they stay, passing every tensor through"
                )
            self._saved_hooks = None
        self.pipeline.on_attach = None
        self.pipeline.on_detach = None
        self._owners.clear()
        self.owner = None

    # ---- forward -------------------------------------------------------------------------------
    def _root_pre(self, module: nn.Module, args: Any) -> None:
        if torch._C._current_graph_task_id() >= 0:
            self._hold_root_for_backward()  # the whole model recomputed (checkpoint(model, x))
            return
        if threading.get_ident() != self._thread or os.getpid() != self._pid:
            self._refuse_thread(module)
        if self.untrained and torch.is_grad_enabled():
            self.check_untrained()
        if in_grad_transform():
            self._refuse_in_grad_transform(module, recurse=True)
        if self.on_forward_start is not None:
            self.on_forward_start()
        if self._root_held:  # a previous forward raised before its post-hook: start clean
            self._root_post(module, args, None)
        self._release_root_backward()  # held by a backward pass that raised (no end callback ran)
        self._root_running = True
        self.quiet_forward = self._forwards_to_watch <= 0 and not self.watching
        self._forwards_to_watch -= 1
        if self.quiet_forward and self._access is not None:
            self._access.suspend()  # no Python call per torch call in the model's forward
        self._before_root_blocks()
        for bs in self._root_blocks:
            self.pipeline.acquire(bs, "fwd")
            self._root_held.append(bs)

    def _root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._root_running = False
        self.quiet_forward = False
        if self._access is not None:
            self._access.resume()
        while self._root_held:
            self.pipeline.release(self._root_held.pop())
        if self._root_blocks and torch.is_grad_enabled() and torch._C._current_graph_task_id() < 0:
            self._hold_root_when_backward_reaches(output)

    def _hold_root_when_backward_reaches(self, output: Any) -> None:
        """Hold the blocks this forward held throughout as soon as backward reaches the model's
        output (any of its tensors), before any node of the model's graph runs backward: a
        recomputation that reads them before it calls a hooked module is covered too."""

        def on_model_output_grad(grad: torch.Tensor) -> None:
            self._hold_root_for_backward()

        for tensor in _tensors_requiring_grad(output):
            tensor.register_hook(on_model_output_grad)

    def _hold_root_for_backward(self) -> None:
        """Make the blocks held for the whole forward (parameters used outside a call of their
        module, see :meth:`_used`) resident until this backward pass ends.

        Backward may run forward code again: activation checkpointing recomputes a layer (reentrant
        or not, through the module's hooks or around its raw ``forward``, as transformers'
        ``GradientCheckpointingLayer`` does), and that code reads those parameters as the forward
        did, often handed in as arguments (DeBERTa passes ``rel_embeddings.weight`` to every layer).
        No root hook runs for it, and neither does the torch-function mode that caught those uses
        in forward (the autograd engine runs backward without the thread's torch-function modes),
        so nothing else would fetch them: the recomputation would read the evicted placeholder.
        The recomputed tensors saved for backward view the blocks' memory until their nodes have
        run, so the blocks stay held until the pass ends, taken and counted against the budget as
        the forward takes them, and released by :meth:`end_backward`."""
        task = torch._C._current_graph_task_id()
        if not self._root_blocks or self._root_bwd_held or task < 0:
            return
        self._note_backward()
        self._root_bwd_task = task
        self._internal += 1  # tierrt's own work (e.g. a deferred update) is not a user's use
        try:
            for bs in self._root_blocks:
                self.pipeline.acquire(bs, "bwd")  # a synchronous fetch if it was evicted
                self._root_bwd_held.append(bs)
        finally:
            self._internal -= 1

    def _release_root_backward(self) -> None:
        """Give back the blocks :meth:`_hold_root_for_backward` took."""
        while self._root_bwd_held:
            self.pipeline.release(self._root_bwd_held.pop())
        self._root_bwd_task = -1

    def _refuse_in_grad_transform(self, module: nn.Module, recurse: bool) -> None:
        """Inside a ``torch.func`` gradient transform, refuse a forward that reads offloaded
        parameters (bound in ``module`` or, with ``recurse``, below it): the transform's backward
        would need their blocks, which no hook may stream back in there (see tierrt.functional)."""
        names = [
            self._slot_of[id(p)][1].name for p in module.parameters(recurse=recurse) if id(p) in self._slot_of
        ]
        if names:
            raise grad_transform_error(type(module).__name__, names)

    def offloaded_name(self, tensor: torch.Tensor) -> str | None:
        """The name of the offloaded parameter ``tensor`` is, or is a ``p.detach()`` stand-in of."""
        entry = self._slot_of.get(id(tensor))
        if entry is not None:
            return entry[1].name
        standin = self._access.standin_slot(tensor) if self._access is not None else None
        return None if standin is None else standin[0].spec.slots[standin[1]].name

    def holds_standin(self, values: Any) -> bool:
        """Whether a ``p.detach()`` stand-in of an offloaded parameter is among ``values`` (a pytree)."""
        from torch.utils._pytree import tree_leaves

        access = self._access
        return access is not None and any(
            access.standin_slot(leaf) is not None
            for leaf in tree_leaves(values)
            if isinstance(leaf, torch.Tensor)
        )

    def _refuse_thread(self, module: nn.Module) -> None:
        """A forward on a thread other than the one that entered the context: its torch-function
        mode and saved-tensor hooks are that thread's, and the pipeline serves one thread, so the
        call could neither see offloaded values nor keep blocks consistent with the other thread's."""
        if os.getpid() != self._pid:
            raise HookError(
                f"{type(module).__name__}'s forward ran in process {os.getpid()}, forked from process "
                f"{self._pid}, which entered its tierrt.offload() context: a forked child (os.fork, "
                "multiprocessing's 'fork', a DataLoader worker) has neither the tiers' memory nor their "
                "I/O threads. Run the offloaded model in that process, or give the child a plain copy "
                "(copy.deepcopy(model) made before forking, or a 'spawn' process given the model)"
            )
        here = threading.current_thread().name
        raise HookError(
            f"{type(module).__name__}'s forward ran on thread {here!r}, but its tierrt.offload() context "
            f"was entered on thread {self._thread_name!r}. A runtime serves the thread that entered "
            "it: enter `with tierrt.offload(...)` in the thread that runs the model (its training "
            "loop, its evaluation), and do not run an offloaded model from two threads at once"
        )

    def in_forward(self) -> bool:
        """A forward of the model or of a hooked module is running, or a backward pass."""
        return (
            self._root_running
            or any(count > 0 for count in self._in_call.values())
            or torch._C._current_graph_task_id() >= 0
        )

    def _used(self, func: Any, values: list[torch.Tensor]) -> None:
        """A torch function is called on ``values`` (the offloaded parameters among its arguments,
        found by :class:`~tierrt.access.ParameterAccess`) during a watched forward: make the block
        of each resident if no running module holds it."""
        if self._internal:
            return
        for value in values:
            entry = self._slot_of.get(id(value))
            if entry is None:
                continue  # a stand-in or any other tensor
            bs, name = entry[0], entry[1].name
            if bs.refcount > 0 or bs.pinned:
                continue
            if id(value) not in self._warned:
                self._warned.add(id(value))
                log.warning(
                    "parameter %s is used outside a call of the module that holds it (by %s); tierrt "
                    "now keeps its block %s resident for the whole forward and backward. To stream it "
                    "with its module instead, use it inside that module's forward, or share the "
                    "Parameter object with the module that uses it (e.g. head.weight = embed.weight).",
                    name,
                    getattr(func, "__name__", func),
                    bs.name,
                )
            if bs not in self._root_blocks:
                self._learn_root(bs, name)
            self._internal += 1
            try:
                self.pipeline.acquire(bs, "fwd")  # a synchronous fetch if it was evicted
            finally:
                self._internal -= 1
            self._root_held.append(bs)

    def _learn_root(self, bs: BlockState, name: str) -> None:
        """Block ``bs`` (parameter ``name`` used outside a call of its module) is held for every
        forward and backward from now on. Decide how pending optimizer updates run next to the held
        blocks (:meth:`Placement.held_mode`); in this forward, which may have updates pending for
        blocks it has not reached yet, those are applied now, before ``bs`` is taken, as far as room
        allows. When the budget cannot hold the working set next to the held blocks at all, raise
        the :class:`TierCapacityError` that says so, before anything is changed (every later
        forward raises it too: no forward may run with those blocks evicted under it)."""
        self._root_blocks.append(bs)
        placement = self.pipeline.placement
        if placement is None:
            return
        held = {b.index for b in self._root_blocks}
        mode = self._root_mode = placement.held_mode(held)
        if mode is None:
            self._root_error = self._held_error(bs, name, held)
            self._raise_root_error()
        if mode == "apply_first":
            try:
                self._apply_pending_updates()
            except TierCapacityError as error:  # still pending: each runs when its block is acquired
                log.debug("tierrt: pending updates not applied before holding %s: %s", bs.name, error)

    def _held_error(self, bs: BlockState, name: str, held: set[int]) -> TierCapacityError:
        """The error for blocks ``held`` (the latest ``bs``, for parameter ``name``) that the compute
        tier's budget cannot hold through each pass next to the working set."""
        placement = self.pipeline.placement
        assert placement is not None
        tier, held_bytes = placement.compute, placement.held_bytes(held)
        need = placement.held_need(held, deferred=False)
        budget = placement.budget_for_held(held)
        names = ", ".join(self.pipeline.blocks[i].name for i in sorted(held))
        wanted = f" to {format_size(budget, round_up=True)}" if budget else ""
        raise_to = f"raise the {tier} budget{wanted}"
        module = name.rpartition(".")[0] or "the model"
        return TierCapacityError(
            f"parameter {name} is used outside a call of its module {module}, so tierrt keeps its block "
            f"{bs.name} resident through every forward and backward (blocks held so: {names}, "
            f"{format_size(held_bytes)}); the {tier} budget {format_size(placement.budget)} leaves "
            f"{format_size(placement.room)} for the working set, which needs {format_size(need)} next to "
            f"them. Either {raise_to}, or use {name} inside {module}'s forward (call the module), or share "
            "the Parameter object with the module that uses it (e.g. head.weight = embed.weight). Nothing "
            "was changed: the model's weights, gradients and optimizer state (pending updates included) "
            "are as they were, and leaving the with-block gives them back",
            tier=tier,
            requested=need,
            budget=placement.budget,
            needed_budget=budget,
            block=bs.name,
            held_blocks=names.split(", "),
            parameter=name,
        )

    def _before_root_blocks(self) -> None:
        """At the start of a forward, before the blocks held for all of it are taken: raise the
        error that says they do not fit, or apply the pending updates first when only that fits
        (:meth:`_learn_root`)."""
        if self._root_blocks and self._root_mode is None:
            self._raise_root_error()
        if self._root_blocks and self._root_mode == "apply_first":
            self._apply_pending_updates()

    def _raise_root_error(self) -> None:
        """Raise a fresh copy of the error saying the held blocks do not fit (see :meth:`_learn_root`)."""
        error = self._root_error
        assert error is not None
        raise TierCapacityError(error.message, **error.details)

    def _apply_pending_updates(self) -> None:
        """Apply every pending optimizer update now (tierrt's own work: not a user's use)."""
        updates = self.pipeline.updates
        if updates is None:
            return
        self._internal += 1
        try:
            updates.apply_all()
        finally:
            self._internal -= 1

    def check_untrained(self) -> None:
        """Raise :class:`HookError` when a parameter frozen on entry requires grad now: it has no
        gradient buffer or optimizer state, so it would be silently left untrained."""
        wrong = [name for name, p in self.untrained if p.requires_grad]
        if wrong:
            raise unfrozen_error(wrong)

    def _make_pre(self, needed: list[BlockState]) -> Callable[..., None]:
        pipeline = self.pipeline

        def pre_hook(module: nn.Module, args: Any) -> None:
            in_backward = torch._C._current_graph_task_id() >= 0
            self._in_call[id(module)] = self._in_call.get(id(module), 0) + 1
            calls = self._calls.setdefault(id(module), [])
            acquired: list[BlockState] = []
            try:
                if not in_backward and (threading.get_ident() != self._thread or os.getpid() != self._pid):
                    self._refuse_thread(module)
                phase = "bwd" if in_backward else "fwd"
                if in_backward:
                    self._note_backward()
                    self._hold_root_for_backward()  # a recomputation (activation checkpointing)
                elif in_grad_transform():
                    self._refuse_in_grad_transform(module, recurse=True)
                self._internal += 1  # tierrt's own work (e.g. a deferred update) is not a user's use
                try:
                    for bs in needed:
                        pipeline.acquire(bs, phase)
                        acquired.append(bs)
                finally:
                    self._internal -= 1
            except BaseException:
                for bs in acquired:
                    pipeline.release(bs)
                calls.append(None)  # the post-hook (always called) has nothing to give back
                raise
            # versions after any pending update: what the module's own forward changes shows
            calls.append((acquired, None if in_backward else _versions_of(needed)))

        return pre_hook

    def _make_post(self, needed: list[BlockState]) -> Callable[..., None]:
        pipeline = self.pipeline

        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            self._in_call[id(module)] = self._in_call.get(id(module), 1) - 1
            calls = self._calls.get(id(module))
            call = calls.pop() if calls else None
            if call is None:
                return  # its pre-hook failed: nothing was acquired, the forward did not run
            acquired, versions = call
            if versions is not None:
                self._write_changed(needed, versions)
            for bs in acquired:
                pipeline.release(bs)
            if torch.is_autocast_enabled(pipeline.device.type):
                self._drop_autocast_casts(needed)
            if torch.is_grad_enabled() and torch._C._current_graph_task_id() < 0:
                self._acquire_when_backward_reaches(output, needed)

        return post_hook

    def _write_changed(self, needed: list[BlockState], before: list[int]) -> None:
        """Parameters the module's forward changed in place (``nn.Embedding(max_norm=...)``
        renormalises the rows it looks up): write them into the tiers, master weights too, as
        plain torch would keep the change. Seen by the parameters' version counters."""
        after = _versions_of(needed)
        if after == before:
            return
        position = 0
        for bs in needed:
            changed = {}
            for slot in bs.spec.slots:
                if after[position] != before[position]:
                    changed[slot.index] = slot.param.data
                position += 1
            if changed:
                self._internal += 1
                try:
                    self.pipeline.write_values(bs, changed)
                finally:
                    self._internal -= 1

    def _drop_autocast_casts(self, needed: list[BlockState]) -> None:
        """Under ``torch.autocast``, fp32 weights are cast to the lower precision once per autocast
        region and the casts are cached until the region ends: a copy of every weight of the model,
        beyond every budget. The cache is cleared as each module finishes, so casts live only while
        their block is in use (a later use casts again). What backward needs of a trainable weight's
        cast is kept as a reference and cast again (:class:`SavedCastRef`).

        The cast of a frozen fp32 weight has no autograd history to recognise it by, so autograd
        keeps it until backward: a warning says so once (``compute_dtype`` avoids the casts)."""
        if not torch.is_autocast_cache_enabled():
            return
        torch.clear_autocast_cache()
        if self._autocast_warned or not torch.is_grad_enabled():
            return
        frozen = [
            slot.name
            for bs in needed
            for slot in bs.spec.slots
            if slot.dtype == torch.float32 and not slot.param.requires_grad
        ]
        if frozen:
            self._autocast_warned = True
            lower = str(torch.get_autocast_dtype(self.pipeline.device.type)).removeprefix("torch.")
            log.warning(
                "torch.autocast to %s over frozen fp32 offloaded weights (%s, ...): autograd keeps their "
                "%s casts from forward to backward, outside tierrt's budgets. Pass "
                "compute_dtype=torch.%s to tierrt.offload() to keep %s weights in the tiers and cast nothing",
                lower,
                frozen[0],
                lower,
                lower,
                lower,
            )

    def _acquire_when_backward_reaches(self, output: Any, needed: list[BlockState]) -> None:
        """Make ``needed`` resident as soon as backward reaches this module's output, before any
        node inside the module runs backward. Saved-tensor hooks alone do not cover activation
        checkpointing that recomputes ``module.forward`` directly (transformers does, to keep module
        hooks outside the checkpoint): the recomputation reads the parameters with no hook run."""
        tensor = _first_tensor_requiring_grad(output)
        if tensor is None:
            return

        def on_output_grad(grad: torch.Tensor) -> None:
            self._hold_root_for_backward()
            for bs in needed:
                self._backward_acquire(bs)

        tensor.register_hook(on_output_grad)

    # ---- saved tensors -------------------------------------------------------------------------
    def _on_attach(self, bs: BlockState) -> None:
        self._owners[self._storage_ptr(bs)] = bs

    def _on_detach(self, bs: BlockState) -> None:
        ptr = self._storage_ptr(bs)
        if self._owners.get(ptr) is bs:
            del self._owners[ptr]

    def _storage_ptr(self, bs: BlockState) -> int:
        ks = bs.kinds["weight"]
        if self.pipeline.compute == "dram":
            assert ks.host is not None
            return ks.host.flat.data_ptr()
        assert ks.gpu is not None
        return ks.gpu.data_ptr()

    def _pack(self, tensor: torch.Tensor) -> Any:
        """The saved-tensor pack hook. Only the innermost saved-tensor hooks run, so with two
        models offloaded at once (a teacher and a student, a generator and a discriminator) each
        runtime's hook also packs the other active runtimes' weights (for their own unpacking)."""
        packed = self._pack_own(tensor)
        if packed is not tensor or len(_ACTIVE_HOOKSETS) < 2:
            return packed
        for ref in reversed(_ACTIVE_HOOKSETS):
            other = ref()
            if other is None or other is self:
                continue
            packed = other._pack_own(tensor)
            if packed is not tensor:
                return _OtherRuntimeRef(other, packed)
        return tensor

    def _pack_own(self, tensor: torch.Tensor) -> Any:
        if not self._owners:
            return tensor
        try:
            ptr = tensor.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # sparse, nested, functional wrappers
            return tensor
        bs = self._owners.get(ptr)
        if bs is None:
            # Autocast casts down: only a half-precision tensor can be a cast of an fp32 weight.
            # (torch.is_autocast_enabled() reads False inside the ops whose saved tensors these are.)
            if tensor.dtype in (torch.bfloat16, torch.float16):
                return self._pack_cast(tensor)
            return tensor
        return SavedWeightRef(*_ref_fields(bs, tensor))

    def _pack_cast(self, tensor: torch.Tensor) -> Any:
        """A cast of an offloaded weight that autocast made (``ToCopyBackward0`` straight from the
        weight's ``AccumulateGrad``), or a view of one (a transpose for ``linear``): keep a reference
        instead of the copy. Any other tensor is kept as it is."""
        fn = tensor.grad_fn
        if fn is None:
            return tensor
        if type(fn).__name__ != "ToCopyBackward0":
            if not tensor._is_view() or not fn.next_functions:
                return tensor
            fn = fn.next_functions[0][0]  # the view's source
            if fn is None or type(fn).__name__ != "ToCopyBackward0":
                return tensor
        source = fn.next_functions[0][0] if fn.next_functions else None
        param = getattr(source, "variable", None)
        entry = self._slot_of.get(id(param)) if param is not None else None
        if entry is None:
            return tensor
        bs, slot = entry
        if tensor.device != param.device:
            return tensor  # a copy to another device (the reference casts on the weight's own)
        if tensor.untyped_storage().nbytes() != slot.numel * tensor.element_size():
            return tensor  # not a plain contiguous cast of the whole weight
        return SavedCastRef(*_ref_fields(bs, tensor), slot.index)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _OtherRuntimeRef):
            return packed.owner._unpack(packed.ref)
        if not isinstance(packed, SavedWeightRef):  # a SavedCastRef is one too
            return packed
        bs = self.pipeline.blocks[packed.block]
        ks = bs.kinds["weight"]
        if ks.version != packed.version:
            raise HookError(
                f"the weights of block {bs.name} were modified between forward and backward (an "
                "optimizer step or a load_state_dict() between them?); the backward pass needs the "
                "values the forward used"
            )
        self._backward_acquire(bs)
        if isinstance(packed, SavedCastRef):
            weight = bs.spec.slots[packed.slot].param.detach()
            cast = weight.to(packed.dtype, memory_format=torch.contiguous_format)
            return cast.as_strided(packed.size, packed.stride, packed.storage_offset)
        flat = ks.host.flat if self.pipeline.compute == "dram" else ks.gpu  # type: ignore[union-attr]
        return flat.view(packed.dtype).as_strided(packed.size, packed.stride, packed.storage_offset)

    # ---- backward ------------------------------------------------------------------------------
    def _note_backward(self) -> None:
        """Once per backward pass: queue the callback that runs when it ends."""
        task = torch._C._current_graph_task_id()
        if task < 0 or task in self._callback_tasks:
            return
        self._callback_tasks.add(task)

        def on_backward_end(task: int = task) -> None:
            self._callback_tasks.discard(task)
            self.end_backward(task)

        torch.autograd.Variable._execution_engine.queue_callback(on_backward_end)

    def _backward_acquire(self, bs: BlockState) -> None:
        self._note_backward()
        if bs in self._bwd_held:
            return
        # Backward has moved on to another block: let go of all but the most recent one (a wrong
        # guess only costs a fetch when a later node unpacks the block again).
        while len(self._bwd_held) > 1:
            self.pipeline.release(self._bwd_held.pop(0))
        self.pipeline.acquire(bs, "bwd")
        self._bwd_held.append(bs)

    def _release_backward(self, bs: BlockState) -> None:
        if bs in self._bwd_held:
            self._bwd_held.remove(bs)
            self.pipeline.release(bs)

    def end_backward(self, task: int | None = None) -> None:
        """Release what backward held and send the finished gradients home. ``task`` is the graph
        task that ended: the blocks held for recomputation stay until the pass that took them ends
        (a reentrant checkpoint runs a nested pass inside each recomputation)."""
        while self._bwd_held:
            self.pipeline.release(self._bwd_held.pop())
        if task is None or task == self._root_bwd_task:
            self._release_root_backward()
        self._grad_counts.clear()
        if self.grads is not None:
            self.grads.end_backward()

    # ---- gradients -----------------------------------------------------------------------------
    def _make_assigned_hook(self, bs: BlockState, slot: Any) -> Callable[[torch.Tensor], None]:
        """A hook run before autograd accumulates into ``slot``'s parameter: a gradient assigned by
        hand (``p.grad = g``) goes into the store first, so that accumulation adds to it there (in
        torch, ``p.grad = g`` replaces the gradient and backward then adds to ``g``)."""
        grads = self.grads
        assert grads is not None

        def assigned_hook(grad: torch.Tensor) -> None:
            if slot.param.grad is not None:
                grads.take(bs, slot)

        return assigned_hook

    def _make_grad_hook(self, bs: BlockState, slot: Any) -> Callable[[torch.Tensor], None]:
        grads = self.grads
        assert grads is not None
        trainable = len(bs.spec.trainable)

        def grad_hook(param: torch.Tensor) -> None:
            self._note_backward()
            grad = param.grad
            if grad is None:
                return
            if grad.layout != torch.strided:
                raise HookError(
                    f"parameter {slot.name} received a {grad.layout} gradient (a sparse embedding, "
                    "F.embedding(..., sparse=True)); tierrt keeps dense gradients only: compute it "
                    "with sparse=False",
                    parameter=slot.name,
                )
            param.grad = None
            grads.accumulate(bs, slot, grad)
            count = self._grad_counts.get(bs.index, 0) + 1
            if count >= trainable:
                self._grad_counts.pop(bs.index, None)
                grads.block_complete(bs)
                self._release_backward(bs)
            else:
                self._grad_counts[bs.index] = count

        return grad_hook


def _pop_inert_entries() -> None:
    """Take off this thread's stacks the innermost tierrt torch-function modes and saved-tensor
    hooks that no longer work (left by a runtime freed from another thread)."""
    pop_inert_modes()
    while True:
        top = torch._C._autograd._top_saved_tensors_default_hooks(True)
        if top is None or not getattr(top[0], "tierrt", False) or not top[0].inert():
            return
        torch._C._autograd._pop_saved_tensors_default_hooks()


def _weak_saved_tensors_hooks(hooks: HookSet) -> torch.autograd.graph.saved_tensors_hooks:
    """``saved_tensors_hooks`` running ``hooks._pack`` and ``hooks._unpack``, holding the hook set
    weakly: the hooks stack belongs to the thread, and must not keep a dropped runtime alive. Once
    the set is gone they pass every tensor through (what they packed went with its runtime)."""
    ref = weakref.ref(hooks)

    def pack(tensor: torch.Tensor) -> Any:
        owner = ref()
        return tensor if owner is None else owner._pack(tensor)

    pack.tierrt = True  # type: ignore[attr-defined]  # tierrt.functional takes these off the stack
    pack.inert = lambda: (owner := ref()) is None or owner._saved_hooks is None  # type: ignore[attr-defined]

    def unpack(packed: Any) -> torch.Tensor:
        owner = ref()
        if owner is None:
            if isinstance(packed, SavedWeightRef | _OtherRuntimeRef):
                raise HookError(
                    "backward needs weights of an offloaded model whose tierrt runtime was closed or "
                    "freed since the forward; run backward inside the with-block that ran the forward"
                )
            return packed
        return owner._unpack(packed)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _tensors_requiring_grad(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors requiring grad (with a ``grad_fn``) in a module's output (tensors, tuples, lists,
    dicts and transformers' ModelOutput, which is a dict), looked through three levels deep."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad and value.grad_fn is not None:
            yield value
        return
    if depth > 3:
        return
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
    for item in items:
        yield from _tensors_requiring_grad(item, depth + 1)


def _first_tensor_requiring_grad(value: Any) -> torch.Tensor | None:
    """The first tensor requiring grad in a module's output (see :func:`_tensors_requiring_grad`)."""
    return next(_tensors_requiring_grad(value), None)
