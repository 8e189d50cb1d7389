"""What an optimizer tierrt does not know keeps per parameter, learned from a probe of its step.

tierrt steps an optimizer block by block: torch's ``step()`` runs on one block's parameters at a
time (:class:`tierrt.optim.updaters.TieredTorchUpdater`). For torch's own optimizers tierrt knows
which state tensors each keeps (a table in :mod:`tierrt.optim.updaters`). For any other class (a
third-party optimizer, transformers' ``Adafactor``, a subclass of ``AdamW``, torch's ``Adafactor``)
it learns them at entry, by running the optimizer's own step on small stand-ins on the CPU, two
steps on a copy of each param group, once per rank and dtype of the group's parameters:

- A state key whose value is a tensor shaped like the parameter, for every parameter of the group,
  is a *state kind*: homed in the tiers under their budgets like Adam's moments. Anything else the
  step keeps (``step`` counters, Adafactor's factored row and column statistics, a key only some
  ranks get) stays per parameter in process memory, small next to the parameters.
- Stepping two parameters together must give, bit for bit, what stepping each alone gives: else
  the step couples parameters (a norm over every gradient, a count of the parameters) and
  block-by-block stepping would silently change its results. Such an optimizer is refused with a
  :class:`~tierrt.errors.HookError` before anything moves, as LBFGS is.
- A step that changes a value of its param group on every step (an adaptive learning rate
  estimated as it trains: Prodigy's or D-Adaptation's ``d``, schedule-free's ``k``) is refused the
  same way: tierrt's blocks each get the hyperparameters of the ``step()`` call, so that value
  would never move on.
- A step that draws random numbers cannot be checked for coupling (two runs differ anyway); it is
  stepped block by block all the same, never on a worker thread during backward (where its draws
  would interleave with the model's dropout), and said so in the log.
- A step that changes attributes of the optimizer object itself on every step gets a warning:
  tierrt runs the step on a copy per block, so the optimizer's own attributes keep their values.

The probe runs the user's code on tensors of a few dozen elements, a few times; it never touches the
optimizer's parameters, state or param groups. When the probe's step raises (the optimizer needs a
closure, or refuses the stand-ins' shapes), nothing is learned: the optimizer keeps its state in
``optimizer.state`` in process memory, as before, and the log says why.
"""

from __future__ import annotations

import copy
import logging
import math
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import HookError

log = logging.getLogger("tierrt.optim")

__all__ = ["GroupFindings", "LearnedState", "learned_state", "make_stepper"]

#: Attributes of an optimizer a step may set without it meaning anything to the user: torch's step
#: bookkeeping, GradScaler's handover.
_BOOKKEEPING = frozenset(
    {
        "state",
        "param_groups",
        "_opt_called",
        "grad_scale",
        "found_inf",
        "_step_supports_amp_scaling",
        "_optimizer_step_pre_hooks",
        "_optimizer_step_post_hooks",
    }
)


def make_stepper(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], state: dict[Any, dict[str, Any]]
) -> torch.optim.Optimizer:
    """A shallow copy of ``optimizer`` that steps ``groups`` with ``state`` and nothing else: the
    user's step hooks are not run from it (they run once per ``step()``, on the optimizer), and
    containers among its attributes are copied, so a step that appends to one leaves the user's
    optimizer as it was."""
    stepper = object.__new__(type(optimizer))
    for name, value in optimizer.__dict__.items():
        if name in ("state", "param_groups"):
            continue
        stepper.__dict__[name] = copy.copy(value) if isinstance(value, (list, dict, set)) else value
    stepper.param_groups = groups
    stepper.state = state
    for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        if hooks in stepper.__dict__:
            stepper.__dict__[hooks] = OrderedDict()
    return stepper


def raw_step(optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
    """The class's ``step`` without torch's hook-running wrapper."""
    step = type(optimizer).step
    return getattr(step, "__wrapped__", step)


@dataclass
class GroupFindings:
    """What the probe of one param group learned."""

    #: state keys shaped like every parameter of the group -> their dtype (None: the parameter's)
    kinds: dict[str, torch.dtype | None] = field(default_factory=dict)
    #: why nothing could be learned (the probe's step raised), else None
    unknown: str | None = None
    #: the step draws random numbers (it then runs on the thread that calls step(), in order)
    stochastic: bool = False


class LearnedState:
    """The state kinds of an optimizer tierrt does not know, per param group, learned by probing
    its step (see the module). ``keys(index)`` probes group ``index`` the first time it is asked
    (a group added later by ``add_param_group`` too)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)
        self.name = type(optimizer).__name__
        self.groups: dict[int, GroupFindings] = {}

    def findings(self, index: int) -> GroupFindings:
        if index not in self.groups:
            optimizer = self._optimizer()
            assert optimizer is not None
            self.groups[index] = probe_group(optimizer, index)
        return self.groups[index]

    def keys(self, index: int) -> list[str]:
        """The param-shaped state keys group ``index`` keeps (not all of them need be kinds)."""
        return list(self.findings(index).kinds)

    def probe_all(self) -> None:
        """Probe every param group (raises HookError for a step block-by-block stepping would
        change)."""
        optimizer = self._optimizer()
        assert optimizer is not None
        for index in range(len(optimizer.param_groups)):
            self.findings(index)

    def kinds(self) -> dict[str, torch.dtype | None]:
        """The kinds every param group with parameters keeps, in one dtype. A key only some groups
        keep (transformers' Adafactor keeps a full second moment for vectors only, which its
        Trainer puts in a group of their own) stays in memory with the other per-parameter values:
        a kind has room for every trained parameter, and moving it for parameters that do not
        use it would cost a copy of the model in the tiers and its I/O every step."""
        optimizer = self._optimizer()
        assert optimizer is not None
        voting = [
            self.findings(index).kinds
            for index, group in enumerate(optimizer.param_groups)
            if group["params"]
        ]
        return _agreed(voting[0], voting[1:]) if voting else {}


_LEARNED: weakref.WeakKeyDictionary[torch.optim.Optimizer, LearnedState] = weakref.WeakKeyDictionary()


def learned_state(optimizer: torch.optim.Optimizer) -> LearnedState:
    """The :class:`LearnedState` of ``optimizer``, every current group probed (once per optimizer:
    the same object answers the runtime's planning and its updater). Raises :class:`HookError` when
    block-by-block stepping would change the optimizer's results."""
    learned = _LEARNED.get(optimizer)
    if learned is None:
        learned = _LEARNED[optimizer] = LearnedState(optimizer)
    learned.probe_all()
    return learned


# ---- the probe ----------------------------------------------------------------------------------
_STEPS = 2


def _shape(ndim: int, first: bool) -> tuple[int, ...]:
    """A small shape of rank ``ndim``, every dimension >= 3; the two stand-ins differ in shape."""
    start = 3 if first else 4
    return tuple(start + (i % 3) for i in range(ndim))


@dataclass
class _Run:
    params: list[torch.Tensor]
    states: list[dict[str, Any]]
    groups: list[dict[str, Any]]  # the group's values after each step
    attributes: list[dict[str, Any]]  # the stepper's own attributes after each step


def _run(
    optimizer: torch.optim.Optimizer,
    hyper: dict[str, Any],
    batches: list[list[int]],
    params: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    seed: int,
) -> _Run:
    """Step copies of ``params`` with ``grads`` (one list per step), each batch of indices as one
    param group in its own step() call, as tierrt's blocks are stepped."""
    standins = [p.clone() for p in params]
    states: list[dict[str, Any]] = [{} for _ in params]
    groups: list[dict[str, Any]] = []
    attributes: list[dict[str, Any]] = []
    step = raw_step(optimizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for grads_of_step in grads:
            for batch in batches:
                members = [standins[i] for i in batch]
                group = {**_cloned(hyper), "params": members}
                state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
                for i in batch:
                    if states[i]:
                        state[standins[i]] = states[i]
                stepper = make_stepper(optimizer, [group], state)
                for i in batch:
                    standins[i].grad = grads_of_step[i].clone()
                try:
                    with torch.no_grad():
                        step(stepper)
                finally:
                    for member in members:
                        member.grad = None
                for i in batch:
                    states[i] = state.get(standins[i], {})
            groups.append({k: _cloned_value(v) for k, v in group.items() if k != "params"})
            attributes.append(
                {k: _cloned_value(v) for k, v in stepper.__dict__.items() if k not in _BOOKKEEPING}
            )
    return _Run(standins, states, groups, attributes)


def _cloned(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _cloned_value(v) for k, v in values.items() if k != "params"}


def _cloned_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, dict, set, tuple)):
        try:
            return copy.deepcopy(value)
        except Exception:  # noqa: BLE001 - a value that cannot be copied is compared as it is
            return value
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal bit for bit (NaNs in the same places count as equal)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that do not compare are taken as different
        return a is b


def _same_runs(a: _Run, b: _Run) -> bool:
    return all(_same(x, y) for x, y in zip(a.params, b.params)) and all(
        _same(x, y) for x, y in zip(a.states, b.states)
    )


def _changing(values: list[dict[str, Any]], before: dict[str, Any]) -> list[str]:
    """Keys whose value changes from one step to the next (or at the first step, for a key that
    was there before it)."""
    changing = []
    first, last = values[0], values[-1]
    for key in sorted(set(first) | set(last), key=str):
        if key in before and not _same(before[key], first.get(key, _GONE)):
            changing.append(str(key))
        elif not _same(first.get(key, _GONE), last.get(key, _GONE)):
            changing.append(str(key))
    return changing


_GONE = object()


def probe_group(optimizer: torch.optim.Optimizer, index: int) -> GroupFindings:
    """Learn what group ``index`` of ``optimizer`` keeps per parameter (see the module)."""
    name = type(optimizer).__name__
    group = optimizer.param_groups[index]
    hyper = _cloned(group)
    kinds_per_case: list[tuple[int, dict[str, torch.dtype | None]]] = []
    cases = sorted({(p.dim(), p.dtype) for p in group["params"]}, key=str)
    attributes: set[str] = set()
    stochastic = False
    for ndim, dtype in cases:
        gen = torch.Generator().manual_seed(1234 + ndim)
        shapes = [_shape(ndim, True), _shape(ndim, False)]
        params = [(0.5 * torch.randn(s, generator=gen)).to(dtype) for s in shapes]
        grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(_STEPS)]
        try:
            together = _run(optimizer, hyper, [[0, 1]], params, grads, seed=0)
            alone = _run(optimizer, hyper, [[0], [1]], params, grads, seed=0)
            reseeded = _run(optimizer, hyper, [[0, 1]], params, grads, seed=1)
        except Exception as error:  # noqa: BLE001 - the user's step on stand-ins: anything it raises
            why = f"its step() on {ndim}-d {dtype} stand-ins raised {type(error).__name__}: {error}"
            log.info(
                "tierrt: cannot learn what %s keeps per parameter (%s); its state stays in memory", name, why
            )
            return GroupFindings(unknown=why)
        _check_group_values(name, index, together, hyper)
        attributes.update(_changing_attributes(optimizer, together))
        if not _same_runs(together, reseeded):
            stochastic = True
            log.info(
                "tierrt: %s's step() draws random numbers, so tierrt cannot check that it updates each "
                "parameter on its own; it is stepped block by block (one step() call per block)",
                name,
            )
        elif not _same_runs(together, alone):
            raise HookError(
                f"{name}'s step() does not update each parameter on its own: stepping two parameters "
                "together gives other values than stepping each alone (it couples them, e.g. through a "
                "norm over all gradients or the number of parameters). tierrt steps the optimizer block "
                "by block, which would silently change its results. Use a per-parameter optimizer (SGD, "
                "Adam, AdamW, Adafactor, ...), or train this model without offload"
            )
        kinds_per_case.append((ndim, _param_shaped(together)))
    if attributes:
        log.warning(
            "tierrt: %s's step() changes %s on the optimizer itself every step; tierrt steps the "
            "optimizer block by block on a copy, so those attributes of the optimizer keep their "
            "values while it trains",
            name,
            ", ".join(f"self.{k}" for k in sorted(attributes)),
        )
    return GroupFindings(kinds=_common_kinds(kinds_per_case), stochastic=stochastic)


def _param_shaped(run: _Run) -> dict[str, torch.dtype | None]:
    """The state keys that are tensors shaped like their parameter for both stand-ins -> their
    dtype (None: the parameter's)."""
    shaped: list[dict[str, torch.dtype | None]] = []
    for param, state in zip(run.params, run.states):
        here: dict[str, torch.dtype | None] = {}
        for key, value in state.items():
            if (
                isinstance(key, str)
                and isinstance(value, torch.Tensor)
                and value is not param
                and value.shape == param.shape
                and value.device.type == "cpu"
                and (value.is_floating_point() or value.is_complex())
                and not value.requires_grad
            ):
                here[key] = None if value.dtype == param.dtype else value.dtype
        shaped.append(here)
    return _agreed(shaped[0], shaped[1:]) if shaped else {}


def _common_kinds(
    cases: list[tuple[int, dict[str, torch.dtype | None]]],
) -> dict[str, torch.dtype | None]:
    """The keys every case (rank and dtype of the group's parameters) keeps shaped like the
    parameter, in one dtype. A 0-d parameter's probe tells nothing on its own (a ``step`` counter
    is 0-d too): it has no vote, but a kind must be there for it as well."""
    voting = [kinds for ndim, kinds in cases if ndim > 0]
    if not voting:
        return {}
    return _agreed(voting[0], voting[1:] + [kinds for ndim, kinds in cases if ndim == 0])


def _agreed(first: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """The entries of ``first`` that every one of ``others`` has too, with the same value."""
    return {k: v for k, v in first.items() if all(other.get(k, _GONE) == v for other in others)}


def _check_group_values(name: str, index: int, run: _Run, before: dict[str, Any]) -> None:
    changing = _changing(run.groups, before)
    if changing:
        raise HookError(
            f"{name}'s step() changes param group {index}'s {', '.join(repr(k) for k in changing)} on "
            "every step (a value it estimates as it trains). tierrt steps the optimizer block by "
            "block, each block with the hyperparameters of the step() call, so that value would never "
            "move on and the results would silently differ. Use an optimizer that keeps such values in "
            "its per-parameter state, or train this model without offload"
        )


def _changing_attributes(optimizer: torch.optim.Optimizer, run: _Run) -> list[str]:
    """The optimizer's own attributes the step changes every step."""
    before = {k: v for k, v in optimizer.__dict__.items() if k not in _BOOKKEEPING}
    return _changing(run.attributes, before)
