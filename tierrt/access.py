"""Offloaded parameters used where no hook made them real: the torch-function mode that keeps such
uses exact.

Inside the context an offloaded parameter's ``.data`` is real only while its block is attached;
otherwise it is a placeholder (NaN, no memory), and a block can hold weights an optimizer update has
not reached yet. :class:`ParameterAccess` sees every torch call on the thread that entered the
context and makes each such use read (or write) the parameter's current value:

- During the first two forwards, a parameter used outside a call of the module that holds it
  (``F.linear(x, self.embed.weight)`` in a parent's forward) has its block fetched on the spot and
  kept resident for every whole forward from then on (:meth:`HookSet._used`), and through each
  backward pass (:meth:`HookSet._hold_root_for_backward`). Backward needs the hooks for that: the
  autograd engine runs it without the thread's torch-function modes, so this mode sees nothing of
  a checkpointed layer's recomputation. Later forwards of the model are not watched: the mode
  leaves the stack while they run (:meth:`ParameterAccess.suspend`), so they cost nothing.
- Anywhere else (between steps: a weight norm logged, an EMA or an L2 penalty written by hand,
  ``nn.init`` or ``p.mul_()`` under ``no_grad``), the parameter's block is held resident for that one
  call, its pending optimizer update applied first, and released after. The call runs on the real
  parameter, so autograd records it as in plain torch (a penalty's gradient reaches the tiers). A
  call that changes a parameter in place (``p.mul_(0.5)``, ``nn.init.normal_(p)``, ``p[0] = 1``,
  ``out=p``, ``p.data = x``) writes the new value home, into the master weights too.
- The memory of a block that is not in use is handed out again once it is evicted, so nothing may
  keep viewing it: an output that views a parameter (``p.view(-1)``, ``p[0]``, ``p.t()``) is returned
  as a copy (reading it is exact; writing into it does not reach the parameter), and ``p.data`` and
  ``p.detach()`` return a stand-in tied to the parameter: every later call on the stand-in reads or
  writes the parameter's current value, as the alias would in plain torch.
- Optimizer state read through ``optimizer.state`` is a copy too; a change made in place to it (or
  to a view of it) is written into the tiers (:meth:`ParameterAccess.watch_copy`).
- Calls that only read metadata (``p.shape``, ``p.numel()``, ``p.requires_grad_()``) and calls made by
  tierrt itself pass straight through. ``_foreach_`` calls over many blocks run block by block, so a
  hand-written EMA over the whole model holds one block at a time.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import HookError

if TYPE_CHECKING:
    from .hooks import HookSet
    from .store import BlockState

log = logging.getLogger("tierrt")

__all__ = ["ParameterAccess"]

# Calls that only read metadata or set flags, valid on a placeholder: no reason to fetch for them.
METADATA = frozenset(
    {"__get__", "__set__", "size", "dim", "numel", "nelement", "ndimension", "stride", "storage_offset",
     "is_floating_point", "is_complex", "element_size", "is_contiguous", "__len__", "__hash__",
     "data_ptr", "untyped_storage", "storage", "_typed_storage", "is_pinned", "is_shared", "get_device",
     "requires_grad_", "retain_grad", "register_hook", "register_post_accumulate_grad_hook", "_is_view",
     "is_set_to", "__setstate__"}
)  # fmt: skip

_INPLACE_DUNDERS = frozenset(
    {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
     "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__", "__setitem__"}
)  # fmt: skip

# The keyword naming what an in-place call changes when no argument is positional
# (torch.nn.init's functions hand torch-function modes ``tensor=``).
_INPLACE_KEYWORDS = ("tensor", "input", "self")

# Autograd's entry points: backward fetches the blocks it needs itself (holding every block whose
# parameters are among ``inputs`` at once would not fit a streaming budget).
_AUTOGRAD_ENTRIES = frozenset({torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward})

# Calls whose output is the parameter itself under another name: a stand-in takes its place.
_ALIASES = frozenset({"detach"})

_PACKAGE = __name__.rpartition(".")[0] + "."
_TORCH_OPTIMIZER = torch.optim.Optimizer.__module__  # its step() wrapper, zero_grad(), state_dict()


def _attribute(func: Any) -> str | None:
    """The attribute a property getter or setter call is about (``p.data`` -> "data")."""
    return getattr(getattr(func, "__self__", None), "__name__", None)


def _mutates_in_place(name: str) -> bool:
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))


def _called_by_tierrt() -> bool:
    """Whether tierrt itself is on the stack (an optimizer update, a state_dict, a hook: its calls
    handle placeholders themselves), or a torch optimizer's ``step()`` (tierrt steps the offloaded
    parameters of every optimizer that holds them, passed, adopted or wrapped: torch's own step
    must see them without gradients and step only the others)."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if (module.startswith(_PACKAGE) and module != __name__) or module == _TORCH_OPTIMIZER:
            return True
        frame = frame.f_back
    return False


def _storage_address(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, nested, functional wrappers
        return None


# Calls through which ``Module._apply`` moves a parameter to another device (``module.to()``,
# ``.cuda()``, ``.cpu()``, ``.to_empty()``).
_MOVES = frozenset({"to", "cuda", "cpu", "empty_like"})
_MODULE_FILE = nn.Module._apply.__code__.co_filename


def _in_module_apply() -> bool:
    """Whether the call comes from ``nn.Module._apply`` (through its conversion function)."""
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return False
        if frame.f_code.co_name == "_apply" and frame.f_code.co_filename == _MODULE_FILE:
            return True
        frame = frame.f_back
    return False


def _target_device(name: str, args: Any, kwargs: dict[str, Any]) -> torch.device | None:
    """Where a move call sends its tensor, or None when it names no device (a dtype change)."""
    try:
        if name == "cpu":
            return torch.device("cpu")
        if name == "cuda":
            index = args[1] if len(args) > 1 else kwargs.get("device")
            return (
                torch.device("cuda", index)
                if isinstance(index, int) or index is None
                else torch.device(index)
            )
        if name == "to":
            device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
            return None if device is None else torch.device(device)
        device = kwargs.get("device")
        return None if device is None else torch.device(device)
    except (TypeError, RuntimeError, ValueError):  # arguments torch itself will refuse
        return None


def _same_device(target: torch.device, current: torch.device) -> bool:
    return target.type == current.type and (target.index is None or target.index == current.index)


def pop_inert_modes() -> None:
    """Take off this thread's torch-function mode stack the innermost tierrt modes that no longer
    work (left there by a runtime freed from another thread)."""
    stack = torch.overrides._get_current_function_mode_stack()
    while stack and isinstance(stack[-1], ParameterAccess) and not stack[-1].enabled:
        torch._C._pop_torch_function_stack()
        stack = torch.overrides._get_current_function_mode_stack()


def _register_by_storage(registry: dict[int, tuple[Any, ...]], copy: torch.Tensor, *payload: Any) -> None:
    """``registry[storage address of copy] = (weak reference to copy, *payload)``, the entry removed
    once the copy is gone (unless a newer copy took the address meanwhile)."""
    ptr = _storage_address(copy)
    if ptr is None:
        return

    def forget(_: Any, ptr: int = ptr) -> None:
        entry = registry.get(ptr)
        if entry is not None and entry[0]() is None:
            del registry[ptr]

    registry[ptr] = (weakref.ref(copy, forget), *payload)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            if isinstance(item, torch.Tensor):
                yield item


class ParameterAccess(torch.overrides.TorchFunctionMode):
    """Pushed while a runtime is active (see the module docstring)."""

    def __init__(self, hooks: HookSet) -> None:
        super().__init__()
        self.hooks = hooks
        self.pipeline = hooks.pipeline
        self.enabled = True
        self._suspended = False
        # id(stand-in) -> (weak reference, block, slot index): ``p.data`` / ``p.detach()`` results
        self._standins: dict[int, tuple[weakref.ref, BlockState, int]] = {}
        # id(copy) -> (weak reference, block, slot index): gradients read through ``p.grad``
        self._grad_copies: dict[int, tuple[weakref.ref, BlockState, int]] = {}
        # (block, slot index) -> (weak reference, what the copy was read at): ``p.grad`` read twice
        # gives the same tensor while the stored gradient has not changed, as in plain torch
        self._grad_reads: dict[tuple[int, int], tuple[weakref.ref, tuple[Any, ...]]] = {}
        self.left: list[tuple[torch.Tensor, nn.Parameter]] = []  # see pop()
        # storage address of a copy -> (weak reference, the call that took the view, its block):
        # a view of a parameter taken between steps is a copy; a change made in place to the copy
        # (or to a view of it: ``p.view(-1)[:4].zero_()``) is written into the parameter's view
        self._view_copies: dict[int, tuple[weakref.ref, Callable[[], torch.Tensor], BlockState, int]] = {}
        # storage address of a copy -> (weak reference, what writes it): other copies whose in-place
        # changes tierrt writes into the tiers (optimizer state read through ``optimizer.state``)
        self._watched: dict[int, tuple[weakref.ref, Callable[[torch.Tensor], None]]] = {}

    # ---- dispatch ------------------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        hooks = self.hooks
        if hooks.quiet_forward or hooks._internal or not self.enabled:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__"):
            attribute = _attribute(func) if args else None
            if attribute == "data":
                return self._data(name, func, args)
            if attribute == "grad":
                return self._grad(name, func, args)
            return func(*args, **kwargs)
        if name in METADATA or func in _AUTOGRAD_ENTRIES:
            return func(*args, **kwargs)
        found = self._find(args, kwargs)
        grads_changed: list[int] = []
        views_changed: list[int] = []
        if self._grad_copies or self._view_copies or self._watched:
            changed = self._changed(name, args, kwargs)
            grads_changed = [id(tensor) for tensor in changed if id(tensor) in self._grad_copies]
            addresses = [_storage_address(tensor) for tensor in changed]
            views_changed = [ptr for ptr in addresses if ptr in self._view_copies]
            watched = [ptr for ptr in addresses if ptr in self._watched]
            if watched and not hooks.in_forward():
                result = func(*args, **kwargs)
                for ptr in dict.fromkeys(watched):
                    self._write_watched(ptr)
                return result
        if views_changed and not hooks.in_forward():
            result = func(*args, **kwargs)
            for ptr in dict.fromkeys(views_changed):
                self._write_view(ptr)
            return result
        if not found and not grads_changed:
            return func(*args, **kwargs)
        if hooks.in_forward():
            if not any(key in self._standins for key in found):
                if hooks._root_running:  # a watched forward of the model (not backward)
                    hooks._used(func, [value for _, _, value in found.values()])
                return func(*args, **kwargs)
        elif _called_by_tierrt():
            return func(*args, **kwargs)
        if found and name in _MOVES and _in_module_apply():
            self._refuse_move(name, args, kwargs)
        if not found:
            result = func(*args, **kwargs)
        elif name.startswith("_foreach_") and len({bs.index for bs, _, _ in found.values()}) > 1:
            result = self._per_block(func, name, args, kwargs)
        else:
            result = self._run(func, name, args, kwargs, found)
        for key in grads_changed:
            self._write_grad(key)
        return result

    def _refuse_move(self, name: str, args: Any, kwargs: dict[str, Any]) -> None:
        """``model.to(device)`` / ``.cuda()`` / ``.to_empty()``: torch would replace each offloaded
        parameter with a new one on the other device, which the hooks do not know, and the next
        forward would fail deep in torch. Refuse it with the parameter's name and what to do. A
        move to the device the parameters are on (``.cpu()`` on the CPU) goes on as usual."""
        param = args[0] if args else None
        entry = self.hooks._slot_of.get(id(param))
        target = _target_device(name, args, kwargs)
        if entry is None or target is None or _same_device(target, param.device):
            return
        slot = entry[1]
        call = "to_empty" if name == "empty_like" else name
        raise HookError(
            f"`.{call}()` would move {slot.name} to {target} inside the offload context: tierrt keeps "
            f"the parameters in its tiers and computes on {param.device}. Move the model before "
            "tierrt.offload(), or after the with-block (it is given back where it came from)",
            parameter=slot.name,
        )

    @staticmethod
    def _changed(name: str, args: Any, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The tensors a call changes in place (its first argument, ``out=``)."""
        changed = list(_tensors(kwargs.get("out"))) if "out" in kwargs else []
        if _mutates_in_place(name):
            if args:
                changed.extend(_tensors(args[0]))
            else:  # passed by keyword, as torch.nn.init's functions do: uniform_(tensor=p, ...)
                for keyword in _INPLACE_KEYWORDS:
                    if keyword in kwargs:
                        changed.extend(_tensors(kwargs[keyword]))
                        break
        return changed

    def _find(self, args: Any, kwargs: dict[str, Any]) -> dict[int, tuple[BlockState, int, torch.Tensor]]:
        """The offloaded parameters and stand-ins among a call's arguments: id -> (block, slot
        index, the argument). Looked up by id: a live object's id is unique, and every offloaded
        parameter and registered stand-in is alive (this runs for every torch call: no isinstance)."""
        found: dict[int, tuple[BlockState, int, torch.Tensor]] = {}
        slot_of = self.hooks._slot_of
        standins = self._standins
        for value in (*args, *kwargs.values()) if kwargs else args:
            kind = type(value)
            for item in value if kind is list or kind is tuple else (value,):
                key = id(item)
                entry = slot_of.get(key)
                if entry is not None:
                    found[key] = (entry[0], entry[1].index, item)
                elif standins and key in standins:
                    _, bs, slot_index = standins[key]
                    found[key] = (bs, slot_index, item)
        return found

    # ---- one call on real parameters ----------------------------------------------------------------
    def _run(
        self,
        func: Any,
        name: str,
        args: Any,
        kwargs: dict[str, Any],
        found: dict[int, tuple[BlockState, int, torch.Tensor]],
    ) -> Any:
        blocks = list({bs.index: bs for bs, _, _ in found.values()}.values())
        held: list[BlockState] = []
        try:
            for bs in blocks:
                self.pipeline.hold(bs)
                held.append(bs)
            real = {key: self._real(bs, slot_index) for key, (bs, slot_index, value) in found.items()
                    if not isinstance(value, nn.Parameter)}  # fmt: skip
            call_args = tuple(self._substitute(value, real) for value in args)
            call_kwargs = {key: self._substitute(value, real) for key, value in kwargs.items()}
            if name == "__reduce_ex__" and args and id(args[0]) in found:
                return self._reduce_copy(args[0], call_args)
            result = func(*call_args, **call_kwargs)
            self._write_back(name, args, kwargs, found)

            def retake() -> torch.Tensor:
                # substituted again at each call: a closure over ``real`` would keep the block's
                # memory alive for as long as the copy lives
                now = {key: self._real(bs, slot_index) for key, (bs, slot_index, value) in found.items()
                       if not isinstance(value, nn.Parameter)}  # fmt: skip
                return func(
                    *(self._substitute(value, now) for value in args),
                    **{key: self._substitute(value, now) for key, value in kwargs.items()},
                )

            return self._detached(name, result, found, args, real, held, retake)
        finally:
            for bs in held:
                self.pipeline.release(bs)

    @staticmethod
    def _reduce_copy(original: torch.Tensor, call_args: tuple[Any, ...]) -> Any:
        """Pickling (``torch.save``, ``pickle``) of a parameter or stand-in: the reduction of a
        copy of its value. The parameter's own would name the block's storage, which ``torch.save``
        reads only after every object is pickled, when the block may have been evicted."""
        value = call_args[0].detach().clone()
        if isinstance(original, nn.Parameter):
            value = nn.Parameter(value, requires_grad=original.requires_grad)
        return value.__reduce_ex__(*call_args[1:])

    def _real(self, bs: BlockState, slot_index: int) -> torch.Tensor:
        """The parameter's ``.data`` while its block is held (a view of the block's memory)."""
        return bs.spec.slots[slot_index].param.data

    @staticmethod
    def _substitute(value: Any, real: dict[int, torch.Tensor]) -> Any:
        if not real:
            return value
        if isinstance(value, torch.Tensor):
            return real.get(id(value), value)
        if isinstance(value, list | tuple) and any(id(item) in real for item in value):
            return type(value)(real.get(id(item), item) for item in value)
        return value

    def _write_back(
        self,
        name: str,
        args: Any,
        kwargs: dict[str, Any],
        found: dict[int, tuple[BlockState, int, torch.Tensor]],
    ) -> None:
        """Write home the parameters the call changed in place."""
        by_block: dict[int, tuple[BlockState, dict[int, torch.Tensor]]] = {}
        for tensor in self._changed(name, args, kwargs):
            entry = found.get(id(tensor))
            if entry is None:
                continue
            bs, slot_index, _ = entry
            by_block.setdefault(bs.index, (bs, {}))[1][slot_index] = self._real(bs, slot_index)
        for bs, values in by_block.values():
            self.pipeline.write_values(bs, values)

    def _detached(
        self,
        name: str,
        result: Any,
        found: dict[int, tuple[BlockState, int, torch.Tensor]],
        args: Any,
        real: dict[int, torch.Tensor],
        held: list[BlockState],
        retake: Callable[[], torch.Tensor] | None = None,
    ) -> Any:
        """``result`` with nothing viewing a held block's memory: the argument itself where the call
        returned it (in place), a stand-in for an alias of a whole parameter, a copy for a view
        (``retake`` takes the view again, on the held block: what in-place changes of the copy are
        written through)."""
        storages = {self.hooks._storage_ptr(bs) for bs in held}
        returned_by_key = {id(tensor): key for key, tensor in real.items()}

        def one(item: Any) -> Any:
            if not isinstance(item, torch.Tensor) or id(item) in found:
                return item  # the parameter itself (p.to(p.dtype), an in-place call)
            if id(item) in returned_by_key:
                return found[returned_by_key[id(item)]][2]  # an in-place call on a stand-in: the stand-in
            try:
                ptr = item.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):
                return item
            if ptr not in storages:
                return item
            if name in _ALIASES and args:
                entry = found.get(id(args[0]))
                if entry is not None and item.shape == args[0].shape:
                    return self._standin(entry[0], entry[1])
            copy = item.clone()
            if retake is not None and len(found) == 1 and isinstance(result, torch.Tensor):
                bs, slot_index, _ = next(iter(found.values()))
                self._register_view(copy, retake, bs, slot_index)
            return copy

        if isinstance(result, list | tuple) and any(isinstance(item, torch.Tensor) for item in result):
            items = [one(item) for item in result]
            return type(result)(*items) if hasattr(result, "_fields") else type(result)(items)
        return one(result)

    def _per_block(self, func: Any, name: str, args: Any, kwargs: dict[str, Any]) -> Any:
        """A ``_foreach_`` call over parameters of several blocks, run on consecutive runs of
        positions that touch the same blocks (its lists are elementwise)."""
        lists = [value for value in (*args, *kwargs.values()) if isinstance(value, list | tuple)]
        count = len(lists[0])
        if any(len(value) != count for value in lists):
            raise HookError(f"{name}: argument lists of different lengths")
        keys: list[tuple[int, ...]] = []
        for position in range(count):
            blocks = set()
            for value in lists:
                entry = self._find((value[position],), {})
                blocks.update(bs.index for bs, _, _ in entry.values())
            keys.append(tuple(sorted(blocks)))
        results: list[Any] = []
        start = 0
        while start < count:
            end = start + 1
            while end < count and keys[end] == keys[start]:
                end += 1

            def part(value: Any, start: int = start, end: int = end) -> Any:
                return value[start:end] if isinstance(value, list | tuple) and len(value) == count else value

            part_args = tuple(part(value) for value in args)
            part_kwargs = {key: part(value) for key, value in kwargs.items()}
            found = self._find(part_args, part_kwargs)
            out = (
                self._run(func, name, part_args, part_kwargs, found)
                if found
                else func(*part_args, **part_kwargs)
            )
            if isinstance(out, list | tuple):
                results.extend(out)
            start = end
        return results if results else None

    # ---- p.grad ------------------------------------------------------------------------------------
    def _grad(self, name: str, func: Any, args: Any) -> Any:
        """``p.grad`` outside forward and backward reads the gradient stored in the tiers (a copy on
        the parameter's device, whose in-place changes are written back); ``p.grad = None``
        forgets it. A gradient assigned by hand (``p.grad = g``) is taken by tierrt's own hooks."""
        param = args[0]
        entry = self.hooks._slot_of.get(id(param)) if isinstance(param, nn.Parameter) else None
        grads = self.hooks.grads
        if entry is None or grads is None or not entry[0].trains(entry[1].index):
            return func(*args)
        if name == "__set__" and args[1] is not None:
            return func(*args)
        if self.hooks.in_forward() or _called_by_tierrt():
            return func(*args)
        bs, slot = entry
        if name == "__set__":
            func(*args)  # a gradient assigned by hand and not yet taken goes too
            grads.clear(bs, slot.index)
            return None
        assigned = func(*args)
        if assigned is not None:
            return assigned
        key = (bs.index, slot.index)
        version = self._grad_version(bs)
        cached = self._grad_reads.get(key)
        if cached is not None and cached[1] == version:
            copy = cached[0]()
            if copy is not None:
                return copy
        value = grads.read(bs, slot.index)
        if value is None:
            return None
        if value.device != param.device:
            value = value.to(param.device)
        self._register_grad(value, bs, slot.index)
        self._grad_reads[key] = (weakref.ref(value), self._grad_version(bs))
        return value

    def _grad_version(self, bs: BlockState) -> tuple[Any, ...]:
        grads = self.hooks.grads
        assert grads is not None
        updates = self.pipeline.updates
        zeroed = updates.zero_after.get(bs.index) if updates is not None else None
        return (grads.generation(bs.index), zeroed)

    def _register_grad(self, copy: torch.Tensor, bs: BlockState, slot_index: int) -> None:
        key = id(copy)
        copies = self._grad_copies

        def forget(_: Any, key: int = key) -> None:
            copies.pop(key, None)

        copies[key] = (weakref.ref(copy, forget), bs, slot_index)

    def _register_view(
        self, copy: torch.Tensor, retake: Callable[[], torch.Tensor], bs: BlockState, slot_index: int
    ) -> None:
        _register_by_storage(self._view_copies, copy, retake, bs, slot_index)

    def watch_copy(self, copy: torch.Tensor, write: Callable[[torch.Tensor], None]) -> None:
        """Call ``write(copy)`` after each call that changes ``copy`` (or a view of it) in place,
        for as long as ``copy`` lives."""
        _register_by_storage(self._watched, copy, write)

    def _write_watched(self, ptr: int) -> None:
        ref, write = self._watched[ptr]
        copy = ref()
        if copy is not None:
            write(copy)

    def _write_view(self, ptr: int) -> None:
        """A copy of a view of a parameter was changed in place: write it into the parameter (the
        view taken again on the held block) and home, as a change through the view would be."""
        ref, retake, bs, slot_index = self._view_copies[ptr]
        copy = ref()
        if copy is None:
            return
        self.pipeline.hold(bs)
        try:
            view = retake()
            if view.shape != copy.shape or _storage_address(view) != _storage_address(
                bs.spec.slots[slot_index].param.data
            ):
                return  # the call no longer gives a view of the parameter
            with torch.no_grad():
                view.copy_(copy)
            self.pipeline.write_values(bs, {slot_index: self._real(bs, slot_index)})
        finally:
            self.pipeline.release(bs)

    def _write_grad(self, key: int) -> None:
        """A call changed a gradient read through ``p.grad`` in place: store the new value."""
        ref, bs, slot_index = self._grad_copies[key]
        copy = ref()
        grads = self.hooks.grads
        if copy is None or grads is None or copy.shape != bs.spec.slots[slot_index].shape:
            return
        grads.assign(bs, bs.spec.slots[slot_index], copy.detach())
        read = self._grad_reads.get((bs.index, slot_index))
        if read is not None and read[0]() is copy:
            self._grad_reads[(bs.index, slot_index)] = (read[0], self._grad_version(bs))

    # ---- p.data ------------------------------------------------------------------------------------
    def _data(self, name: str, func: Any, args: Any) -> Any:
        """``p.data`` (a stand-in outside forward) and ``p.data = x`` (a write of x's values)."""
        param = args[0]
        if name == "__get__" and id(param) in self._grad_copies:  # p.grad.data: the same gradient
            alias = func(*args)
            _, bs, slot_index = self._grad_copies[id(param)]
            self._register_grad(alias, bs, slot_index)
            return alias
        entry = self.hooks._slot_of.get(id(param)) if isinstance(param, nn.Parameter) else None
        if entry is None or self.hooks.in_forward() or _called_by_tierrt():
            return func(*args)
        bs, slot = entry
        if name == "__get__":
            return self._standin(bs, slot.index)
        value = args[1]
        if not isinstance(value, torch.Tensor) or value.shape != param.shape or value.dtype != param.dtype:
            raise HookError(
                f"`{slot.name}.data = ...` with a tensor of another shape or dtype inside the offload "
                "context: tierrt keeps the parameter's storage in its tiers. Assign a tensor of shape "
                f"{tuple(param.shape)} and dtype {param.dtype} (its values are written home), or change "
                "the model before tierrt.offload()"
            )
        source = self._standins.get(id(value))
        source_entry = (source[1], source[2]) if source is not None else None
        if source_entry is None and id(value) in self.hooks._slot_of:
            owner, owner_slot = self.hooks._slot_of[id(value)]
            source_entry = (owner, owner_slot.index)
        if source_entry == (bs, slot.index):
            return None  # ``p.data += x``: the stand-in's change is written already
        if source_entry is not None:
            other = source_entry[0].spec.slots[source_entry[1]].name
            raise HookError(
                f"`{slot.name}.data = <{other}>` inside the offload context: in torch the two parameters "
                "would share one storage (tied), which tierrt cannot do once they are placed. Tie them "
                f"before tierrt.offload() (assign the Parameter: module.weight = other.weight), or assign "
                f"a copy ({other}.data.clone())",
                parameter=slot.name,
            )
        held = False
        try:
            self.pipeline.hold(bs)
            held = True
            self.pipeline.write_values(bs, {slot.index: value})
        finally:
            if held:
                self.pipeline.release(bs)
        return None

    def _standin(self, bs: BlockState, slot_index: int) -> torch.Tensor:
        """A tensor of the parameter's shape, dtype and device and no memory of its own, tied to
        the parameter: calls on it are calls on the parameter's current value."""
        param = bs.spec.slots[slot_index].param
        standin = self.pipeline.placeholders.get(param.shape, param.dtype, param.device)
        # A Python attribute gives it pickle state: torch then pickles it through the torch-function
        # modes (plain tensors skip them), so this mode pickles a copy of the value (_reduce_copy).
        standin.tierrt_standin_of = bs.spec.slots[slot_index].name
        key = id(standin)
        standins = self._standins

        def forget(_: Any, key: int = key) -> None:
            standins.pop(key, None)

        standins[key] = (weakref.ref(standin, forget), bs, slot_index)
        return standin

    def standin_slot(self, tensor: torch.Tensor) -> tuple[BlockState, int] | None:
        """(block, slot index) of the parameter ``tensor`` is a ``p.detach()`` stand-in of, or None."""
        entry = self._standins.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1], entry[2]

    # ---- lifetime ------------------------------------------------------------------------------------
    def push(self) -> None:
        self.__enter__()
        self._suspended = False

    def suspend(self) -> None:
        """Leave the mode stack for a forward that is not watched (put back by :meth:`resume`).
        Stays on it, passing calls through, when a mode entered later is still above it."""
        if self._suspended or not self.enabled:
            return
        stack = torch.overrides._get_current_function_mode_stack()
        if stack and stack[-1] is self:
            torch._C._pop_torch_function_stack()
            self._suspended = True

    def resume(self) -> None:
        if self._suspended:
            torch._C._push_on_torch_function_stack(self)
            self._suspended = False

    def pop(self, own_thread: bool = True) -> None:
        """Leave the mode stack. Modes the user's code pushed inside the context and left open
        stay; this one then only passes calls through. Not on the thread whose stack holds it
        (``own_thread`` False: a runtime freed from another thread), it only stops working there;
        the next runtime started on that thread takes it off (:func:`pop_inert_entries`)."""
        if not own_thread:
            self.enabled = False
            self._standins.clear()
            self._grad_copies.clear()
            self._grad_reads.clear()
            return
        self.resume()
        self.enabled = False
        self.left = [  # stand-ins still held by the user: tied to the restored parameters on exit
            (standin, bs.spec.slots[slot_index].param)
            for ref, bs, slot_index in self._standins.values()
            if (standin := ref()) is not None
        ]
        self._standins.clear()
        self._grad_copies.clear()
        self._grad_reads.clear()
        stack = torch.overrides._get_current_function_mode_stack()
        if stack and stack[-1] is self:
            self.__exit__(None, None, None)
        else:
            log.warning(
                "tierrt's parameter-access mode is not the innermost torch function mode on exit (a mode "
                "entered inside the offload context is still open); it stays on the stack, inert"
            )
