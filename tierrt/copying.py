"""``copy.deepcopy`` (and pickling) of an offloaded model, or of any module in it, inside the context.

An EMA or SWA model (``torch.optim.swa_utils.AveragedModel(model)``), a frozen reference model
(DPO) or a teacher (distillation) is often made with ``copy.deepcopy(model)`` in the training loop.
Done plainly, that copies tierrt's hooks, which lead to the runtime and its arenas (it raised
``TypeError: cannot pickle 'HostArena'``), and the parameters' placeholders (NaN) or stale views.

While a runtime is active, every module tierrt touches (the model, the modules it hooks, the
modules owning offloaded parameters) has an instance-level ``__deepcopy__`` that copies it as the
plain module it is: the copy has no tierrt hooks or wrappers, and each offloaded parameter is a new
``nn.Parameter`` holding its current value (pending updates applied, evicted blocks read from their
tiers), in its original dtype, on the device it came from; buffers moved to the GPU come back to
their own device. This is what the same deepcopy of the model gives without tierrt, bit for bit.
The copy is independent: the original model keeps training in the context unchanged. Pickling such
a module (``torch.save(model)``) stores that plain copy, made for the time of the call.

Example::

    with tierrt.offload(model, tiers=tiers, optimizer=opt):
        for step, batch in enumerate(loader):
            ...
            if step == warmup:
                teacher = copy.deepcopy(model).eval()   # a plain model with today's weights
"""

from __future__ import annotations

import copy
import multiprocessing.context
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["DeepcopyPatch"]


class _PlainCopy:
    """A module's instance-level ``__deepcopy__`` while tierrt is active."""

    __slots__ = ("patch", "module")

    def __init__(self, patch: DeepcopyPatch, module: nn.Module) -> None:
        self.patch = patch
        self.module = weakref.ref(module)

    def __call__(self, memo: dict[int, Any] | None = None) -> nn.Module:
        module = self.module()
        assert module is not None  # it holds this object
        return self.patch.copy_module(module, {} if memo is None else memo)

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None  # never part of a copy (copy_module leaves it out; this is for a stray reference)


class _PlainPickle:
    """A module's instance-level ``__reduce_ex__`` while tierrt is active: ``torch.save(model)`` and
    ``pickle`` store the plain copy :class:`_PlainCopy` makes (tierrt's hooks lead to the runtime and
    its arenas, which cannot be pickled, and the parameters hold placeholders). So does
    ``multiprocessing`` (a model passed to a "spawn" or "forkserver" process): the other process gets a
    plain model with the current values, not memory shared with the offloaded one."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)

    def __call__(self, protocol: int) -> Any:
        module = self.module()
        assert module is not None  # it holds this object
        plain = copy.deepcopy(module)
        popen = multiprocessing.context.get_spawning_popen()
        if popen is not None:
            # A process being started ("spawn", "forkserver") receives the copy's tensors as file
            # descriptors passed when it starts: the copy must live until then, as the model does
            # in plain torch (freed, its descriptors would be closed: "bad value(s) in fds_to_keep")
            popen.__dict__.setdefault("_tierrt_plain_copies", []).append(plain)
        return plain.__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None


class DeepcopyPatch:
    """Installs the plain ``__deepcopy__`` on the modules of one runtime, and makes the copies."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = weakref.ref(runtime)
        self.modules: list[weakref.ref[nn.Module]] = []  # weakly, as the runtime holds the model

    def install(self) -> None:
        runtime = self.runtime()
        assert runtime is not None and runtime.partition is not None
        for module in self._touched(runtime):
            if "__deepcopy__" in module.__dict__ or "__reduce_ex__" in module.__dict__:
                continue  # the module's own (another library's): leave it alone
            module.__dict__["__deepcopy__"] = _PlainCopy(self, module)
            module.__dict__["__reduce_ex__"] = _PlainPickle(module)
            self.modules.append(weakref.ref(module))

    def remove(self) -> None:
        # ``is not None``, not truthiness: a module may define ``__len__`` (torch.compile's
        # OptimizedModule forwards it to a model that has none, raising TypeError)
        for module in (m for ref in self.modules if (m := ref()) is not None):
            if isinstance(module.__dict__.get("__deepcopy__"), _PlainCopy):
                del module.__dict__["__deepcopy__"]
            if isinstance(module.__dict__.get("__reduce_ex__"), _PlainPickle):
                del module.__dict__["__reduce_ex__"]
        self.modules.clear()

    @staticmethod
    def _touched(runtime: Runtime) -> Iterator[nn.Module]:
        """The model, the modules tierrt hooks and every module owning an offloaded parameter."""
        assert runtime.partition is not None
        seen: set[int] = set()
        owners = (m for m in runtime.model.modules() if any(runtime.owns(p) for p in m._parameters.values()))
        hooked = (module for module, _ in runtime.partition.hook_targets)
        for module in (runtime.model, *hooked, *owners):
            if id(module) not in seen:
                seen.add(id(module))
                yield module

    # ---- the copy ---------------------------------------------------------------------------------
    def copy_module(self, module: nn.Module, memo: dict[int, Any]) -> nn.Module:
        """What ``copy.deepcopy`` of the plain module gives: a new instance of its class with a deep
        copy of its state, minus tierrt's, and real values for its offloaded parameters."""
        runtime = self.runtime()
        state = module.__getstate__()
        state.pop("__deepcopy__", None)
        state.pop("__reduce_ex__", None)
        cls = type(module)
        new = cls.__new__(cls)
        memo[id(module)] = new
        if runtime is not None and runtime.active:
            self._prime(runtime, module, memo)
            state = self._without_tierrt(runtime, module, state)
        new.__setstate__(copy.deepcopy(state, memo))
        return new

    @staticmethod
    def _prime(runtime: Runtime, module: nn.Module, memo: dict[int, Any]) -> None:
        """Enter the copies of the module's offloaded parameters and moved buffers in ``memo``, so
        the deepcopy of its state takes them."""
        for param in module._parameters.values():
            if param is not None and runtime.owns(param) and id(param) not in memo:
                memo[id(param)] = runtime.plain_parameter(param)
        for name, buf in module._buffers.items():
            device = runtime.buffer_home(module, name)
            if buf is not None and device is not None and id(buf) not in memo:
                memo[id(buf)] = buf.detach().to(device, copy=True).requires_grad_(buf.requires_grad)

    @staticmethod
    def _without_tierrt(runtime: Runtime, module: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        """The module's state as it is without tierrt: no tierrt hooks, its own ``forward`` and
        ``zero_grad`` (tierrt wraps or replaces them on the instance)."""
        ours = runtime.hook_ids()
        for key, value in list(state.items()):
            if "hooks" in key and isinstance(value, dict) and any(k in ours for k in value):
                kept = type(value)()
                kept.update((k, v) for k, v in value.items() if k not in ours)
                state[key] = kept
        for name in ("forward", "zero_grad", "train"):
            if name in state:
                original = runtime.instance_original(module, name, state[name])
                if original is None:
                    del state[name]
                else:
                    state[name] = original
        return state


def plain_parameter(param: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    """A new parameter like ``copy.deepcopy(param)`` of a plain one gives, holding ``value``."""
    cls = type(param) if type(param).__deepcopy__ is nn.Parameter.__deepcopy__ else nn.Parameter
    return cls(value, param.requires_grad)
