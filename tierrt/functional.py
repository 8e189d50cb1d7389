"""``torch.func`` inside a :func:`tierrt.offload` context.

What works, bit for bit as without tierrt:

- ``torch.func.functional_call(model, params_and_buffers, args)`` runs the model on the tensors given
  (the user's own: per-sample models, ensembles, a perturbed copy) and on the offloaded values for
  the entries that are the module's own parameters (``dict(model.named_parameters())``, as MeZO-style
  code passes). Blocks are made resident by the hooks as in any forward; ``backward()`` through it
  sends gradients to the given tensors, and to the tiers for the module's own parameters. Entries
  that are ``p.detach()`` (or ``p.data``) of offloaded parameters read the parameters' current
  values (tierrt watches that forward, see :mod:`tierrt.access`).
- ``torch.func.vmap`` of the model or of such a ``functional_call`` (no gradient transform).
- ``torch.func.grad`` / ``grad_and_value`` / ``vjp`` / ``jacrev`` / ``hessian`` (and ``vmap`` of them,
  e.g. per-sample gradients) of a function whose tensors are the caller's own: typically
  ``functional_call(model, params, x)`` with ``params`` copies of the values
  (``{n: p.detach().clone() for n, p in model.named_parameters()}``). Torch refuses these transforms
  while saved-tensor hooks are installed; tierrt's (which stream the offloaded weights to backward)
  leave the stack for the time of the transform, which then saves only tensors it owns.
- ``torch.func.jvp`` / ``jacfwd`` (forward mode saves nothing) over the model's own weights too.

What cannot work raises :class:`~tierrt.errors.HookError` naming the fix, before the transform runs
anything (or before the offending module's forward): a gradient transform *through* offloaded
weights, i.e. given offloaded parameters (or ``p.detach()`` stand-ins of them) as inputs, or running
a forward that reads offloaded parameters the transform's backward would need (their blocks' memory
is reused once evicted, and no hook may stream them back inside the transform). Pass copies
instead, or take input gradients with ``torch.autograd.grad``, which tierrt streams.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch._functorch.eager_transforms as eager_transforms
import torch.nn.utils.stateless as stateless
from torch.utils._pytree import tree_leaves

from .errors import HookError, listed
from .patching import AttributePatch

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["FunctionalPatch", "in_grad_transform", "grad_transform_error"]

_ORIGINAL_FUNCTIONAL_CALL = stateless._functional_call
_ORIGINAL_GRAD = eager_transforms.grad_and_value_impl
_ORIGINAL_VJP = eager_transforms._vjp_with_argnums
_ORIGINAL_JVP = eager_transforms._jvp_with_argnums

_COPIES = "{n: p.detach().clone() for n, p in model.named_parameters()}"
_state = threading.local()  # .depth: gradient transforms running on this thread


def in_grad_transform() -> bool:
    """Whether a ``torch.func`` gradient transform (grad, vjp, jacrev, ...) is running on this thread."""
    return getattr(_state, "depth", 0) > 0


def grad_transform_error(model_name: str, names: list[str]) -> HookError:
    """The error for a forward inside a gradient transform that reads offloaded parameters."""
    shown = listed(names, 3)
    return HookError(
        f"a torch.func gradient transform (grad, vjp, jacrev, hessian) runs {model_name}'s forward over "
        f"offloaded parameters ({shown}): inside the transform tierrt cannot stream them to its "
        "backward (torch allows no saved-tensor hooks there, and a block's memory is reused once it "
        "is evicted). Pass every parameter the forward uses to torch.func.functional_call as copies, "
        f"params = {_COPIES}; for gradients of the inputs use torch.autograd.grad(loss, inputs), "
        "which tierrt streams",
        parameters=names,
    )


def _runtimes() -> list[Runtime]:
    return [rt for rt in FunctionalPatch.active if rt.active and rt.hooks is not None]


def _offloaded_inputs(values: Any) -> list[str]:
    """Names of the offloaded parameters among the tensors in ``values`` (a pytree), the parameters
    themselves or ``p.detach()`` / ``p.data`` stand-ins of them."""
    runtimes = _runtimes()
    names = []
    for leaf in tree_leaves(values):
        if isinstance(leaf, torch.Tensor):
            for runtime in runtimes:
                name = runtime.hooks.offloaded_name(leaf)  # type: ignore[union-attr]
                if name is not None:
                    names.append(name)
                    break
    return names


def _refuse_offloaded_inputs(transform: str, values: Any) -> None:
    names = _offloaded_inputs(values)
    if names:
        shown = listed(names, 3)
        raise HookError(
            f"torch.func.{transform} was given offloaded parameters ({shown}), or p.detach() of them, to "
            "differentiate: their data are tierrt's placeholders or block memory reused once evicted, "
            f"so the transform would see wrong values. Pass copies of their values, params = {_COPIES}, "
            "and run the model on them with torch.func.functional_call(model, params, args)",
            parameters=names,
        )


@functools.wraps(_ORIGINAL_FUNCTIONAL_CALL)
def _functional_call(module: torch.nn.Module, parameters_and_buffers: Any, *args: Any, **kwargs: Any) -> Any:
    """``functional_call`` while a runtime is active: a forward given ``p.detach()`` stand-ins of
    offloaded parameters is watched, so that each use of a stand-in reads the parameter's value."""
    runtimes = _runtimes()
    watched = [rt.hooks for rt in runtimes if rt.hooks.holds_standin(parameters_and_buffers)]  # type: ignore[union-attr]
    for hooks in watched:
        hooks.watching += 1
    try:
        return _ORIGINAL_FUNCTIONAL_CALL(module, parameters_and_buffers, *args, **kwargs)
    finally:
        for hooks in watched:
            hooks.watching -= 1


def _own_saved_hooks_top() -> bool:
    top = torch._C._autograd._top_saved_tensors_default_hooks(True)
    return top is not None and getattr(top[0], "tierrt", False)


class _SavedHooksAside:
    """tierrt's saved-tensor hooks off this thread's stack (they are the innermost ones while a
    context is active), put back in the same order after."""

    def __init__(self) -> None:
        self.taken: list[tuple[Any, Any]] = []

    def __enter__(self) -> _SavedHooksAside:
        while _own_saved_hooks_top():
            self.taken.append(torch._C._autograd._top_saved_tensors_default_hooks(True))
            torch._C._autograd._pop_saved_tensors_default_hooks()
        return self

    def __exit__(self, *exc: object) -> None:
        for pack, unpack in reversed(self.taken):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


def _grad_transform(transform: str, inputs: Iterator[Any], call: Any) -> Any:
    """Run ``call`` (a torch.func gradient transform) after checking ``inputs``, without tierrt's
    saved-tensor hooks, with :func:`in_grad_transform` true (the hooks refuse offloaded weights)."""
    if not _runtimes():
        return call()
    _refuse_offloaded_inputs(transform, list(inputs))
    with _SavedHooksAside():
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            return call()
        finally:
            _state.depth -= 1


@functools.wraps(_ORIGINAL_GRAD)
def _grad_and_value_impl(func: Any, argnums: Any, has_aux: bool, args: Any, kwargs: Any) -> Any:
    return _grad_transform(
        "grad", iter((args, kwargs)), lambda: _ORIGINAL_GRAD(func, argnums, has_aux, args, kwargs)
    )


@functools.wraps(_ORIGINAL_VJP)
def _vjp_with_argnums(func: Any, *primals: Any, argnums: Any = None, has_aux: bool = False) -> Any:
    return _grad_transform(
        "vjp", iter(primals), lambda: _ORIGINAL_VJP(func, *primals, argnums=argnums, has_aux=has_aux)
    )


@functools.wraps(_ORIGINAL_JVP)
def _jvp_with_argnums(func: Any, primals: Any, tangents: Any, argnums: Any, *args: Any, **kwargs: Any) -> Any:
    """Forward mode saves nothing for a backward: the model's own weights may be used inside; only
    offloaded parameters given as primals or tangents are refused (functorch would wrap their
    placeholders)."""
    if _runtimes():
        _refuse_offloaded_inputs("jvp", (primals, tangents))
    return _ORIGINAL_JVP(func, primals, tangents, argnums, *args, **kwargs)


FunctionalPatch = AttributePatch(
    (stateless, "_functional_call", _functional_call),
    (eager_transforms, "grad_and_value_impl", _grad_and_value_impl),
    (eager_transforms, "_vjp_with_argnums", _vjp_with_argnums),
    (eager_transforms, "_jvp_with_argnums", _jvp_with_argnums),
)
