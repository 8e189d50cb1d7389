"""Per-block optimizer updates: the arithmetic of one step over one block's DRAM copies.

Three kinds of updater:

- :class:`NativeAdamUpdater` / :class:`NativeSGDUpdater` run tierrt's SIMD kernels
  (:mod:`tierrt.optim.kernels`) over fp32 master weights and optimizer state homed in the tiers
  ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer" kinds), writing compute-dtype
  weights in the same pass. Their results equal torch.optim.Adam/AdamW/SGD bit for bit.
- :class:`TieredTorchUpdater` runs the user's own torch optimizer (any of torch's per-parameter
  optimizers, in any mode: ``fused=True`` or ``foreach=True`` AdamW as a transformers ``Trainer``
  builds it, RMSprop, Adagrad, NAdam, ...) on just the block's parameters, with torch's own
  arithmetic, its per-parameter state tensors homed in the tiers like the native kinds.
  Another class (third-party, a subclass) is stepped the same way, the state kinds learned by a
  probe of its step (:mod:`tierrt.optim.learning`).
- :class:`TorchUpdater` runs an optimizer without state tensors shaped like the parameters (or one
  adopted without room for its state) the same way, its state kept by the optimizer in process
  memory.

Hyperparameters come from a :class:`HyperSnapshot` taken when ``optimizer.step()`` was called, so an
LR scheduler stepping right after does not change an update that runs later.
"""

from __future__ import annotations

import logging
import numbers
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, HookError, HyperparameterError
from .learning import LearnedState, learned_state, make_stepper, raw_step

if TYPE_CHECKING:
    from ..store import BlockState, TensorStore

log = logging.getLogger("tierrt.optim")

_ABSENT = object()

__all__ = [
    "HyperSnapshot",
    "Updater",
    "TorchUpdater",
    "TieredTorchUpdater",
    "NativeAdamUpdater",
    "NativeSGDUpdater",
    "choose_updater",
    "native_refusal",
    "torch_state_in_tiers",
    "step_count",
]


#: What ``GradScaler.step`` hands an optimizer that unscales inside its own step (torch's fused
#: ones, ``_step_supports_amp_scaling``) as attributes, for that one ``step()`` call.
AMP_ATTRIBUTES = ("grad_scale", "found_inf")


@dataclass
class HyperSnapshot:
    """Hyperparameters of every param group at the time of ``step()`` (tensors cloned), and the
    GradScaler's ``grad_scale`` / ``found_inf`` the optimizer was given for that step."""

    groups: list[dict[str, Any]]
    amp: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def take(cls, optimizer: torch.optim.Optimizer) -> HyperSnapshot:
        groups = []
        for group in optimizer.param_groups:
            values = {}
            for key, value in group.items():
                if key == "params":
                    continue
                values[key] = value.clone() if isinstance(value, torch.Tensor) else value
            groups.append(values)
        amp = {
            name: value.clone()
            for name in AMP_ATTRIBUTES
            if isinstance(value := optimizer.__dict__.get(name), torch.Tensor)
        }
        return cls(groups, amp)

    def give_amp_to(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Set (or clear) ``optimizer``'s GradScaler attributes to this step's; returns what they
        were, for :meth:`take_amp_back`."""
        previous = {name: optimizer.__dict__.pop(name, _ABSENT) for name in AMP_ATTRIBUTES}
        optimizer.__dict__.update(self.amp)
        return previous

    @staticmethod
    def take_amp_back(optimizer: torch.optim.Optimizer, previous: dict[str, Any]) -> None:
        for name, value in previous.items():
            optimizer.__dict__.pop(name, None)
            if value is not _ABSENT:
                optimizer.__dict__[name] = value

    def same_as(self, other: HyperSnapshot) -> bool:
        if self.amp.keys() != other.amp.keys() or any(
            not torch.equal(value, other.amp[name]) for name, value in self.amp.items()
        ):
            return False
        if len(self.groups) != len(other.groups):
            return False
        for a, b in zip(self.groups, other.groups):
            if a.keys() != b.keys():
                return False
            for key in a:
                x, y = a[key], b[key]
                if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                    if not (
                        isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
                    ):
                        return False
                elif x != y:
                    return False
        return True


class Updater:
    """What one optimizer needs per block: which state kinds, and how to apply one step."""

    #: kinds of optimizer state homed in the tiers, with their dtype (trainable slots only; None:
    #: each parameter's own dtype, as torch's ``zeros_like(p)`` state)
    state_kinds: dict[str, torch.dtype | None] = {}
    #: runs on tierrt's kernels (not torch's step)
    native = False
    #: the state of the offloaded parameters lives in the tiers, read and written in torch's format
    #: (``state_dict``, ``load_state_dict``, ``optimizer.state``) by :mod:`tierrt.optim.state`
    state_in_tiers = False
    #: torch's step is running for one block (it reads ``optimizer.state``, which must not apply
    #: pending updates then: see :class:`tierrt.optim.state.CurrentState`)
    applying = False

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.group_of: dict[int, int] = {}
        self.index_groups()

    def index_groups(self) -> None:
        """(Re)learn which param group each parameter is in (after ``add_param_group``)."""
        self.group_of = {
            id(p): index for index, group in enumerate(self.optimizer.param_groups) for p in group["params"]
        }

    def describe(self) -> str:
        return type(self).__name__

    def apply(
        self,
        store: TensorStore,
        bs: BlockState,
        wkind: str,
        slots: list[int],
        hyper: HyperSnapshot,
        muls: dict[int, list[float]],
        buffers: dict[str, Any] | None = None,
        advance: bool = True,
        sources: dict[str, Any] | None = None,
    ) -> dict[int, Any]:
        """Update ``slots`` of ``bs`` (DRAM copies of every kind are current). ``muls``: multipliers
        (clip coefficients, inverse loss scales) applied to a slot's gradient first, in order, as
        torch's in-place multiplies would be. ``buffers``: update these copies of some kinds instead
        (a speculative update). ``sources``: read these kinds from the given buffers and write the
        result to ``buffers`` (an out-of-place update, which saves copying the inputs first; native
        updaters take the weights this way). ``advance=False`` leaves the per-parameter counters
        (Adam's step) as they are and returns the changes for :meth:`advance` to apply when the
        update is committed."""
        raise NotImplementedError

    def advance(self, changes: dict[int, Any]) -> None:
        """Apply counter changes returned by ``apply(..., advance=False)``."""
        return None

    def check_hyper(self, hyper: HyperSnapshot) -> None:
        """Raise :class:`HyperparameterError` when a group's hyperparameters cannot be stepped with
        (checked by ``step()`` before anything changes). The torch updater leaves this to torch."""
        return None

    def has_state(self, param: torch.nn.Parameter) -> bool:
        raise NotImplementedError

    #: whether a step can be undone (its counters snapshotted, its state written copy-on-write)
    transactional = False
    #: whether :meth:`apply` may run on a worker thread while the model runs backward (speculative
    #: updates): it touches nothing but the buffers it is given. Torch's own step is not: it reads
    #: and writes the parameters' ``.data``, ``.grad`` and the optimizer's ``state``.
    thread_safe = False

    def snapshot(self) -> Any:
        """Counters a step changes outside the tiers (undone by :meth:`restore` on rollback)."""
        return None

    def restore(self, snapshot: Any) -> None:
        pass

    # ---- torch's per-parameter state format (updaters with the state in the tiers) ---------------
    def state_keys(self, group: dict[str, Any], param: torch.Tensor | None = None) -> list[str]:
        """The state kinds torch keeps per parameter of ``group`` (tensors shaped like it); with
        ``param``, those its state holds (a kind made at its first step stays, as in torch)."""
        return []

    def required_keys(self, group: dict[str, Any]) -> list[str]:
        """Keys a torch state entry of a parameter of ``group`` must have to be continued here."""
        return []

    def counters_of(self, param: torch.nn.Parameter) -> dict[str, Any]:
        """The non-tensor-kind part of ``param``'s torch state entry (Adam's ``step``)."""
        return {}

    def load_counters(self, param: torch.nn.Parameter, entry: dict[str, Any]) -> None:
        """Continue ``param`` from a torch state entry (its kinds are written to the tiers apart)."""

    def forget_counters(self) -> None:
        """Every parameter starts from fresh state again (before loading a whole state dict)."""

    def forget_param(self, param: torch.nn.Parameter) -> None:
        """``param`` starts from fresh state again at its next step (``del optimizer.state[p]``)."""

    def refuses_group(self, group: dict[str, Any]) -> str | None:
        """Why a param group added after entering cannot be stepped here (None when it can)."""
        return None


def _scaled(grad: torch.Tensor, factors: list[float]) -> tuple[torch.Tensor, float]:
    """The gradient after all multipliers but the last (on a copy), and the last one."""
    if len(factors) > 1:
        grad = grad.clone()
        for factor in factors[:-1]:
            grad.mul_(factor)
    return grad, (factors[-1] if factors else 1.0)


def _views(
    store: TensorStore, bs: BlockState, kind: str, buffers: dict[str, Any] | None = None
) -> dict[int, torch.Tensor]:
    """Per-slot views of ``kind``: of ``buffers[kind]`` when given (a speculative copy), else of the
    kind's DRAM copy."""
    ks = bs.kinds[kind]
    buffer = buffers.get(kind) if buffers else None
    return dict(zip(ks.layout.slots, store.host_views(bs, ks, buffer)))


def _weights_in(
    store: TensorStore,
    bs: BlockState,
    wkind: str,
    slots: list[int],
    weights: dict[int, torch.Tensor],
    sources: dict[str, Any] | None,
) -> dict[int, torch.Tensor]:
    """Views of the weights an out-of-place update reads (empty for an in-place one). Parameters it
    does not update (frozen, or without a gradient) are copied over, so the result is whole."""
    if not sources or wkind not in sources:
        return {}
    source = _views(store, bs, wkind, sources)
    for slot_index, view in source.items():
        if slot_index not in slots:
            weights[slot_index].copy_(view)
    return source


def _weights_stepped_in_place(
    store: TensorStore,
    bs: BlockState,
    wkind: str,
    slots: list[int],
    buffers: dict[str, Any] | None,
    sources: dict[str, Any] | None,
) -> dict[int, torch.Tensor]:
    """Views of the weights torch's step updates in place; for an out-of-place update (``sources``)
    the inputs are copied in first."""
    weights = _views(store, bs, wkind, buffers)
    for slot_index, source in _weights_in(store, bs, wkind, slots, weights, sources).items():
        if slot_index in slots:
            weights[slot_index].copy_(source)
    return weights


def _refresh_compute_weights(
    store: TensorStore,
    bs: BlockState,
    wkind: str,
    slots: list[int],
    weights: dict[int, torch.Tensor],
    buffers: dict[str, Any] | None,
) -> None:
    """After torch stepped the fp32 master weights, the compute-dtype copy follows them."""
    if wkind != "master":
        return
    out = _views(store, bs, "weight", buffers)
    with torch.no_grad():
        for slot_index in slots:
            out[slot_index].copy_(weights[slot_index])


class TorchUpdater(Updater):
    """The user's torch optimizer, stepped for one block's parameters at a time."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(optimizer)
        self._raw_step: Callable[..., Any] = raw_step(optimizer)

    def describe(self) -> str:
        return f"torch {type(self.optimizer).__name__} (state in DRAM, stepped block by block)"

    def has_state(self, param: torch.nn.Parameter) -> bool:
        return bool(self.optimizer.state.get(param))

    def apply(
        self,
        store: TensorStore,
        bs: BlockState,
        wkind: str,
        slots: list[int],
        hyper: HyperSnapshot,
        muls: dict[int, list[float]],
        buffers: dict[str, Any] | None = None,
        advance: bool = True,
        sources: dict[str, Any] | None = None,
    ) -> dict[int, Any]:
        weights = _weights_stepped_in_place(store, bs, wkind, slots, buffers, sources)
        grads = _views(store, bs, "grad", buffers)
        touched = []
        for slot_index in slots:
            param = bs.spec.slots[slot_index].param
            grad, last = _scaled(grads[slot_index], muls.get(slot_index, []))
            if last != 1.0:
                grad = grad * last
            param.data = weights[slot_index]
            param.grad = grad
            touched.append(param)
        opt = self.optimizer
        current = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
        # Only this block's parameters step: others that hold a .grad now (parameters outside the
        # offloaded model, stepped by step() itself) must not be stepped a second time here.
        mine = {id(p) for p in touched}
        hidden = [
            (p, p.grad)
            for group in opt.param_groups
            for p in group["params"]
            if p.grad is not None and id(p) not in mine
        ]
        try:
            for p, _ in hidden:
                p.grad = None
            for group, values in zip(opt.param_groups, hyper.groups):
                group.update(values)
            amp = hyper.give_amp_to(opt)
            self.applying = True
            try:
                with torch.no_grad():
                    self._raw_step(opt)
            finally:
                self.applying = False
                hyper.take_amp_back(opt, amp)
        finally:
            for group, values in zip(opt.param_groups, current):
                group.update(values)
            for param in touched:
                param.grad = None
            for p, grad in hidden:
                p.grad = grad
        _refresh_compute_weights(store, bs, wkind, slots, weights, buffers)
        return {}


def _adam_keys(group: dict[str, Any]) -> list[str]:
    return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group.get("amsgrad", False) else [])


def _sgd_keys(group: dict[str, Any]) -> list[str]:
    return ["momentum_buffer"] if float(group.get("momentum", 0.0)) != 0.0 else []


def _rmsprop_keys(group: dict[str, Any]) -> list[str]:
    keys = ["square_avg"]
    if float(group.get("momentum", 0.0)) > 0.0:
        keys.append("momentum_buffer")
    if group.get("centered", False):
        keys.append("grad_avg")
    return keys


#: The state tensors (shaped like the parameter) each of torch's per-parameter optimizers keeps per
#: parameter, given its param group's options; every one also keeps a ``step`` counter but SGD.
_TORCH_STATE_KEYS: dict[type, Callable[[dict[str, Any]], list[str]]] = {
    torch.optim.Adam: _adam_keys,
    torch.optim.AdamW: _adam_keys,
    torch.optim.SGD: _sgd_keys,
    torch.optim.RMSprop: _rmsprop_keys,
    torch.optim.Adagrad: lambda group: ["sum"],
    torch.optim.Adamax: lambda group: ["exp_avg", "exp_inf"],
    torch.optim.NAdam: lambda group: ["exp_avg", "exp_avg_sq"],
    torch.optim.RAdam: lambda group: ["exp_avg", "exp_avg_sq"],
    torch.optim.Adadelta: lambda group: ["square_avg", "acc_delta"],
    torch.optim.Rprop: lambda group: ["prev", "step_size"],
    torch.optim.ASGD: lambda group: ["ax"],
    torch.optim.Muon: lambda group: ["momentum_buffer"],
}


def torch_state_keys(optimizer: torch.optim.Optimizer) -> Callable[[dict[str, Any]], list[str]] | None:
    """The per-group state keys of ``optimizer``'s class when tierrt knows them (torch's own
    optimizers, matched by exact type: a subclass may keep other state), else None."""
    return _TORCH_STATE_KEYS.get(type(optimizer))


class StateKeys:
    """Which state kinds (tensors shaped like the parameter, homed in the tiers) each param group of
    an optimizer keeps: from tierrt's table for torch's own optimizers, else learned by probing its
    step (:mod:`tierrt.optim.learning`)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._table = torch_state_keys(optimizer)
        self.learned: LearnedState | None = None if self._table is not None else learned_state(optimizer)
        # the learned kinds, fixed once the tiers are planned with them
        self._learned_kinds = self.learned.kinds() if self.learned is not None else {}

    @property
    def known(self) -> bool:
        """tierrt's table knows the class (no probe was needed)."""
        return self._table is not None

    def of(self, index: int, group: dict[str, Any]) -> list[str]:
        """The kinds param group ``index`` (whose values are ``group``) keeps."""
        if self._table is not None:
            return self._table(group)
        assert self.learned is not None
        return [key for key in self.learned.keys(index) if key in self._learned_kinds]

    def of_group(self, group: dict[str, Any]) -> list[str]:
        """The kinds of ``group``, one of the optimizer's param groups."""
        index = next((i for i, g in enumerate(self.optimizer.param_groups) if g is group), None)
        if index is None:  # not one of them (yet): the table's answer, or none learned
            return self._table(group) if self._table is not None else []
        return self.of(index, group)

    def kinds(self) -> dict[str, torch.dtype | None]:
        """Every group's kinds with their dtype (None: the parameter's own)."""
        if self._table is not None:
            keys = dict.fromkeys(key for group in self.optimizer.param_groups for key in self._table(group))
            return {key: None for key in keys}
        return dict(self._learned_kinds)

    def stochastic(self) -> bool:
        """A learned step draws random numbers."""
        return self.learned is not None and any(f.stochastic for f in self.learned.groups.values())

    def untried(self) -> str | None:
        """Why some group's state could not be learned (its state stays in memory), or None."""
        if self.learned is None:
            return None
        return next((f.unknown for f in self.learned.groups.values() if f.unknown), None)


class TieredTorchUpdater(TorchUpdater):
    """The user's torch optimizer stepped block by block with torch's own arithmetic (any mode:
    ``fused``, ``foreach``, single-tensor), its per-parameter state tensors homed in the tiers.

    A block's update runs torch's step on a *stepper*: a shallow copy of the optimizer whose param
    groups hold stand-ins for the block's parameters (the views of their DRAM weights, with the
    gradients as ``.grad``) under the step's hyperparameters, and whose ``state`` holds their state
    tensors as views of the block's DRAM copies of the state kinds. Torch's step updates them in
    place (a tensor it creates or replaces, as on a parameter's first step, is copied in). Nothing
    the user holds is touched (not the parameters, not ``optimizer.state``), so the update may run
    on a worker thread during backward as the native kernels do. The rest of a state entry
    (``step`` and other scalars) is kept here, per parameter."""

    state_in_tiers = True
    transactional = True
    thread_safe = True

    def __init__(self, optimizer: torch.optim.Optimizer, keys: StateKeys | None = None) -> None:
        super().__init__(optimizer)
        self.keys = keys if keys is not None else StateKeys(optimizer)
        # torch's own optimizers keep a step counter (SGD does not); a learned one: its kinds only
        self._has_step = self.keys.known and not isinstance(optimizer, torch.optim.SGD)
        self.state_kinds = self.keys.kinds()
        # random draws on a worker thread would interleave with the model's own (dropout)
        self.thread_safe = not self.keys.stochastic()
        self.counters: dict[int, dict[str, Any]] = {}  # id(param) -> its entry's other values

    def describe(self) -> str:
        how = "" if self.keys.known else ", learned from a probe of its step"
        return f"torch {type(self.optimizer).__name__} (state in the tiers{how}, stepped block by block)"

    def has_state(self, param: torch.nn.Parameter) -> bool:
        return id(param) in self.counters

    def state_keys(self, group: dict[str, Any], param: torch.Tensor | None = None) -> list[str]:
        return self.keys.of_group(group)

    def required_keys(self, group: dict[str, Any]) -> list[str]:
        return (["step"] if self._has_step else []) + self.keys.of_group(group)

    def counters_of(self, param: torch.nn.Parameter) -> dict[str, Any]:
        return _copied(self.counters[id(param)])

    def load_counters(self, param: torch.nn.Parameter, entry: dict[str, Any]) -> None:
        self.counters[id(param)] = _copied({k: v for k, v in entry.items() if k not in self.state_kinds})

    def forget_counters(self) -> None:
        self.counters.clear()

    def forget_param(self, param: torch.nn.Parameter) -> None:
        self.counters.pop(id(param), None)

    def snapshot(self) -> Any:
        return {key: _copied(entry) for key, entry in self.counters.items()}

    def restore(self, snapshot: Any) -> None:
        self.counters = {key: _copied(entry) for key, entry in snapshot.items()}

    def advance(self, changes: dict[int, Any]) -> None:
        self.counters.update(changes)

    def check_hyper(self, hyper: HyperSnapshot) -> None:
        """A group whose options now need a state kind no group needed on entering (``amsgrad``
        switched on, ``centered`` RMSprop): the tiers hold no room for it."""
        for index, values in enumerate(hyper.groups):
            missing = [key for key in self.keys.of(index, values) if key not in self.state_kinds]
            if missing:
                raise HyperparameterError(
                    f"param group {index}: its options now need {', '.join(missing)}, which no group "
                    f"needed on entering tierrt.offload(), so the tiers hold no room for it. {_UNCHANGED} "
                    "Set these options before entering",
                    group=index,
                    key=missing[0],
                )

    def refuses_group(self, group: dict[str, Any]) -> str | None:
        missing = [key for key in self.keys.of_group(group) if key not in self.state_kinds]
        if missing:
            return (
                f"the new group's options need {', '.join(missing)}, which no group needed on entering, "
                "so the tiers hold no room for it"
            )
        return None

    def apply(
        self,
        store: TensorStore,
        bs: BlockState,
        wkind: str,
        slots: list[int],
        hyper: HyperSnapshot,
        muls: dict[int, list[float]],
        buffers: dict[str, Any] | None = None,
        advance: bool = True,
        sources: dict[str, Any] | None = None,
    ) -> dict[int, Any]:
        weights = _weights_stepped_in_place(store, bs, wkind, slots, buffers, sources)
        grads = _views(store, bs, "grad", buffers)
        views = {kind: _views(store, bs, kind, buffers) for kind in self.state_kinds if kind in bs.kinds}
        groups: dict[int, dict[str, Any]] = {}
        block_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        standins: dict[int, torch.Tensor] = {}
        for slot_index in slots:
            param = bs.spec.slots[slot_index].param
            index = self.group_of[id(param)]
            standin = standins[slot_index] = weights[slot_index]
            grad, last = _scaled(grads[slot_index], muls.get(slot_index, []))
            standin.grad = grad * last if last != 1.0 else grad
            group = groups.setdefault(index, {**hyper.groups[index], "params": []})
            group["params"].append(standin)
            if id(param) in self.counters:  # else its first step: torch creates the state
                entry = _copied(self.counters[id(param)])
                for kind in self.keys.of(index, group):
                    entry[kind] = views[kind][slot_index]
                block_state[standin] = entry
        stepper = make_stepper(self.optimizer, list(groups.values()), block_state)
        hyper.give_amp_to(stepper)  # a fused step unscales (and skips on inf) inside, as in torch
        try:
            with torch.no_grad():
                self._raw_step(stepper)
        finally:
            for standin in standins.values():
                standin.grad = None
        _refresh_compute_weights(store, bs, wkind, slots, weights, buffers)
        changes: dict[int, Any] = {}
        for slot_index, standin in standins.items():
            entry = block_state.get(standin)
            if not entry:
                continue  # torch's step made no state for it (it keeps its state as it was)
            for kind in self.state_kinds:
                value = entry.get(kind)
                if value is None:
                    continue
                view = views[kind][slot_index]
                if value is not view:  # created (first step) or replaced by torch's step
                    view.copy_(value)
            changes[id(bs.spec.slots[slot_index].param)] = {
                k: v for k, v in entry.items() if k not in self.state_kinds
            }
        if advance:
            self.advance(changes)
        return changes


def _copied(entry: dict[str, Any]) -> dict[str, Any]:
    """A state entry's non-kind values, tensors cloned (torch's step updates ``step`` in place)."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in entry.items()}


class NativeAdamUpdater(Updater):
    """torch.optim.Adam / AdamW arithmetic on tierrt's kernels, state in the tiers."""

    native = True
    state_in_tiers = True
    thread_safe = True

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(optimizer)
        from . import kernels

        self.kernels = kernels
        self.decoupled = isinstance(optimizer, torch.optim.AdamW)
        self.amsgrad = any(g.get("amsgrad", False) for g in optimizer.param_groups)
        self.state_kinds = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32}
        if self.amsgrad:
            self.state_kinds["max_exp_avg_sq"] = torch.float32
        self.steps: dict[int, int] = {}  # id(param) -> torch's state["step"]
        # id(param) of those whose state holds max_exp_avg_sq (torch makes it at the first step with
        # amsgrad and keeps it when amsgrad is turned off later)
        self.with_max: set[int] = set()

    transactional = True

    def snapshot(self) -> Any:
        return dict(self.steps), set(self.with_max)

    def restore(self, snapshot: Any) -> None:
        steps, with_max = snapshot
        self.steps, self.with_max = dict(steps), set(with_max)

    def describe(self) -> str:
        return f"native {type(self.optimizer).__name__} (SIMD kernel, states in the tiers)"

    def has_state(self, param: torch.nn.Parameter) -> bool:
        return id(param) in self.steps

    def state_keys(self, group: dict[str, Any], param: torch.Tensor | None = None) -> list[str]:
        kept = param is not None and id(param) in self.with_max
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group.get("amsgrad", False) or kept else [])

    def required_keys(self, group: dict[str, Any]) -> list[str]:
        return ["step", *self.state_keys(group)]

    def counters_of(self, param: torch.nn.Parameter) -> dict[str, Any]:
        return {"step": torch.tensor(float(self.steps[id(param)]), dtype=torch.get_default_dtype())}

    def load_counters(self, param: torch.nn.Parameter, entry: dict[str, Any]) -> None:
        self.steps[id(param)] = step_count(entry["step"])
        if "max_exp_avg_sq" in entry and "max_exp_avg_sq" in self.state_kinds:
            self.with_max.add(id(param))
        else:
            self.with_max.discard(id(param))

    def forget_counters(self) -> None:
        self.steps.clear()
        self.with_max.clear()

    def forget_param(self, param: torch.nn.Parameter) -> None:
        self.steps.pop(id(param), None)
        self.with_max.discard(id(param))

    def refuses_group(self, group: dict[str, Any]) -> str | None:
        if group.get("amsgrad", False) and "max_exp_avg_sq" not in self.state_kinds:
            return (
                "amsgrad=True in a new group, but no group had it on entering, so the tiers hold no "
                "max_exp_avg_sq"
            )
        return group_refusal(group)

    def check_hyper(self, hyper: HyperSnapshot) -> None:
        for index, group in enumerate(hyper.groups):
            for key in ("lr", "eps", "weight_decay"):
                _check_real(group, index, key)
            _check_betas(group, index)
            if group.get("amsgrad", False) and "max_exp_avg_sq" not in self.state_kinds:
                raise HyperparameterError(
                    f"param group {index}: amsgrad=True, but no group had it on entering "
                    f"tierrt.offload(), so the tiers hold no max_exp_avg_sq for it. {_UNCHANGED} "
                    "Set amsgrad before entering",
                    group=index,
                    key="amsgrad",
                )

    def _arguments(self, group: dict[str, Any]) -> dict[str, Any]:
        """The kernel's hyperparameter arguments for a param group (raises before any change)."""
        return {
            "lr": float(group["lr"]),
            "betas": (float(group["betas"][0]), float(group["betas"][1])),
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "amsgrad": bool(group.get("amsgrad", False)),
            "maximize": bool(group.get("maximize", False)),
        }

    def apply(
        self,
        store: TensorStore,
        bs: BlockState,
        wkind: str,
        slots: list[int],
        hyper: HyperSnapshot,
        muls: dict[int, list[float]],
        buffers: dict[str, Any] | None = None,
        advance: bool = True,
        sources: dict[str, Any] | None = None,
    ) -> dict[int, Any]:
        # Every slot's arguments first: a hyperparameter that cannot be used raises before any change.
        arguments = {
            slot_index: self._arguments(hyper.groups[self.group_of[id(bs.spec.slots[slot_index].param)]])
            for slot_index in slots
        }
        weights = _views(store, bs, wkind, buffers)
        grads = _views(store, bs, "grad", buffers)
        m = _views(store, bs, "exp_avg", buffers)
        v = _views(store, bs, "exp_avg_sq", buffers)
        vmax = _views(store, bs, "max_exp_avg_sq", buffers) if self.amsgrad else {}
        out = _views(store, bs, "weight", buffers) if wkind == "master" else {}
        weights_in = _weights_in(store, bs, wkind, slots, weights, sources)
        changes: dict[int, Any] = {}
        for slot_index in slots:
            param = bs.spec.slots[slot_index].param
            args = arguments[slot_index]
            fresh = id(param) not in self.steps
            step = self.steps.get(id(param), 0) + 1
            if fresh:  # no state yet: torch starts from zeros
                m[slot_index].zero_()
                v[slot_index].zero_()
                if self.amsgrad:
                    vmax[slot_index].zero_()
            grad, last = _scaled(grads[slot_index], muls.get(slot_index, []))
            self.kernels.adam_step_(
                weights[slot_index],
                grad,
                m[slot_index],
                v[slot_index],
                step=step,
                decoupled=self.decoupled,
                max_exp_avg_sq=vmax.get(slot_index) if args["amsgrad"] else None,
                grad_scale=last,
                out=out.get(slot_index),
                param_in=weights_in.get(slot_index),
                **args,
            )
            changes[id(param)] = (step, args["amsgrad"])
        if advance:
            self.advance(changes)
        return changes

    def advance(self, changes: dict[int, Any]) -> None:
        for key, (step, amsgrad) in changes.items():
            self.steps[key] = step
            if amsgrad:
                self.with_max.add(key)


class NativeSGDUpdater(Updater):
    """torch.optim.SGD arithmetic on tierrt's kernels, momentum buffers in the tiers."""

    native = True
    state_in_tiers = True
    thread_safe = True

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(optimizer)
        from . import kernels

        self.kernels = kernels
        self.momentum = any(float(g.get("momentum", 0.0)) != 0.0 for g in optimizer.param_groups)
        self.state_kinds = {"momentum_buffer": torch.float32} if self.momentum else {}
        self.has_buffer: set[int] = set()

    transactional = True

    def snapshot(self) -> Any:
        return set(self.has_buffer)

    def restore(self, snapshot: Any) -> None:
        self.has_buffer = set(snapshot)

    def describe(self) -> str:
        return "native SGD (SIMD kernel" + (", momentum in the tiers)" if self.momentum else ")")

    def check_hyper(self, hyper: HyperSnapshot) -> None:
        for index, group in enumerate(hyper.groups):
            for key in ("lr", "momentum", "dampening", "weight_decay"):
                _check_real(group, index, key)
            if float(group.get("momentum", 0.0)) != 0.0 and not self.momentum:
                raise HyperparameterError(
                    f"param group {index}: momentum={group['momentum']!r}, but no group had momentum "
                    f"on entering tierrt.offload(), so the tiers hold no momentum_buffer for it. "
                    f"{_UNCHANGED} Set momentum before entering",
                    group=index,
                    key="momentum",
                )

    def _arguments(self, group: dict[str, Any]) -> dict[str, Any]:
        """The kernel's hyperparameter arguments for a param group (raises before any change)."""
        return {
            "lr": float(group["lr"]),
            "momentum": float(group.get("momentum", 0.0)),
            "dampening": float(group.get("dampening", 0.0)),
            "nesterov": bool(group.get("nesterov", False)),
            "weight_decay": float(group.get("weight_decay", 0.0)),
            "maximize": bool(group.get("maximize", False)),
        }

    def has_state(self, param: torch.nn.Parameter) -> bool:
        return id(param) in self.has_buffer

    def state_keys(self, group: dict[str, Any], param: torch.Tensor | None = None) -> list[str]:
        return ["momentum_buffer"] if self.momentum else []

    def load_counters(self, param: torch.nn.Parameter, entry: dict[str, Any]) -> None:
        if self.momentum and entry.get("momentum_buffer") is not None:
            self.has_buffer.add(id(param))

    def forget_counters(self) -> None:
        self.has_buffer.clear()

    def forget_param(self, param: torch.nn.Parameter) -> None:
        self.has_buffer.discard(id(param))

    def refuses_group(self, group: dict[str, Any]) -> str | None:
        if float(group.get("momentum", 0.0)) != 0.0 and not self.momentum:
            return (
                "momentum in a new group, but no group had it on entering, so the tiers hold no "
                "momentum_buffer"
            )
        return group_refusal(group)

    def apply(
        self,
        store: TensorStore,
        bs: BlockState,
        wkind: str,
        slots: list[int],
        hyper: HyperSnapshot,
        muls: dict[int, list[float]],
        buffers: dict[str, Any] | None = None,
        advance: bool = True,
        sources: dict[str, Any] | None = None,
    ) -> dict[int, Any]:
        # Every slot's arguments first: a hyperparameter that cannot be used raises before any change.
        arguments = {
            slot_index: self._arguments(hyper.groups[self.group_of[id(bs.spec.slots[slot_index].param)]])
            for slot_index in slots
        }
        weights = _views(store, bs, wkind, buffers)
        grads = _views(store, bs, "grad", buffers)
        bufs = _views(store, bs, "momentum_buffer", buffers) if self.momentum else {}
        out = _views(store, bs, "weight", buffers) if wkind == "master" else {}
        weights_in = _weights_in(store, bs, wkind, slots, weights, sources)
        changes: dict[int, Any] = {}
        for slot_index in slots:
            param = bs.spec.slots[slot_index].param
            args = arguments[slot_index]
            first = id(param) not in self.has_buffer
            grad, last = _scaled(grads[slot_index], muls.get(slot_index, []))
            self.kernels.sgd_step_(
                weights[slot_index],
                grad,
                bufs.get(slot_index) if args["momentum"] else None,
                first_step=first,
                grad_scale=last,
                out=out.get(slot_index),
                param_in=weights_in.get(slot_index),
                **args,
            )
            if args["momentum"]:
                changes[id(param)] = True
        if advance:
            self.advance(changes)
        return changes

    def advance(self, changes: dict[int, Any]) -> None:
        self.has_buffer.update(changes)


_UNCHANGED = "This step() changed nothing: the weights, optimizer state and gradients are as before."


def _is_real(value: Any) -> bool:
    """A number torch's arithmetic takes as a hyperparameter: an int or float (not a string), or a
    one-element tensor."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, numbers.Real)


def _check_real(group: dict[str, Any], index: int, key: str) -> None:
    if key in group and not _is_real(group[key]):
        raise HyperparameterError(
            f"param group {index}: {key}={group[key]!r} is not a real number, which the optimizer's "
            f"arithmetic needs (torch's own step() raises a TypeError too). {_UNCHANGED} Set {key} "
            "to a number and call step() again",
            group=index,
            key=key,
        )


def _check_betas(group: dict[str, Any], index: int) -> None:
    betas = group.get("betas")
    try:
        pair = len(betas) == 2 and all(_is_real(beta) for beta in betas)  # type: ignore[arg-type]
    except TypeError:  # no len(): a number, None
        pair = False
    if not pair or isinstance(betas, (str, bytes)):
        raise HyperparameterError(
            f"param group {index}: betas={betas!r} is not a pair of real numbers (beta1, beta2). "
            f"{_UNCHANGED} Set betas to two numbers, e.g. (0.9, 0.999), and call step() again",
            group=index,
            key="betas",
        )


def step_count(value: Any) -> int:
    """Adam's ``state["step"]`` (a tensor or a number) as an int; ConfigError if it is not a whole
    number >= 0."""
    try:
        number = float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: a tensor of several values
        raise ConfigError(f"step {value!r} is not a number") from exc
    if not number.is_integer() or number < 0:
        raise ConfigError(f"step {value!r} is not a whole number >= 0")
    return int(number)


def choose_updater(
    optimizer: torch.optim.Optimizer,
    native: bool | None,
    state_in_tiers: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> Updater:
    """The native updater for Adam, AdamW and SGD with options it implements; else torch's own
    optimizer, with its state in the tiers when tierrt knows its state (torch's optimizers, any
    mode), in process memory otherwise.

    ``native=True`` insists (a clear error says why not), ``False`` always steps with torch's
    arithmetic. ``state_in_tiers=False`` (an optimizer adopted after the tiers were planned without
    its state) steps with torch's arithmetic, its state in ``optimizer.state``. ``compute_dtype``
    is the dtype the kernel would write the computing weights in (``offload(compute_dtype=)``); the
    kernel writes fp32, bf16 and fp16 only.
    """
    if not state_in_tiers:
        if torch_state_keys(optimizer) is None:
            learned_state(optimizer)  # refuses a step that block-by-block stepping would change
        return TorchUpdater(optimizer)
    from .kernels import OUT_DTYPES

    reason = native_refusal(optimizer)
    if reason is None and compute_dtype is not None and compute_dtype not in OUT_DTYPES:
        reason = f"compute_dtype={compute_dtype} (the native kernel writes fp32, bf16 or fp16 weights)"
    if native is not False and reason is None:
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return NativeAdamUpdater(optimizer)
        return NativeSGDUpdater(optimizer)
    if native:
        raise ConfigError(f"native optimizer step unavailable: {reason}")
    if native is None:
        log.info("tierrt: %s; stepping the torch optimizer block by block instead", reason)
    return torch_updater(optimizer)


def torch_updater(optimizer: torch.optim.Optimizer) -> Updater:
    """Torch's own step, block by block: its state in the tiers when it keeps state tensors shaped
    like the parameters (known for torch's optimizers, learned by a probe for any other class),
    else in ``optimizer.state``. Raises HookError for an optimizer whose results block-by-block
    stepping would change (:mod:`tierrt.optim.learning`)."""
    keys = StateKeys(optimizer)
    if keys.kinds() and keys.untried() is None:
        return TieredTorchUpdater(optimizer, keys)
    return TorchUpdater(optimizer)


def torch_state_in_tiers(optimizer: torch.optim.Optimizer) -> bool:
    """Whether torch's own step of ``optimizer`` can keep its state in the tiers: it keeps state
    tensors shaped like the parameters (see :func:`torch_updater`). False for an optimizer that
    block-by-block stepping cannot step at all (its adoption says why)."""
    try:
        keys = StateKeys(optimizer)
    except HookError:
        return False
    return bool(keys.kinds()) and keys.untried() is None


def native_refusal(optimizer: torch.optim.Optimizer) -> str | None:
    """Why tierrt's kernels cannot step ``optimizer`` (None when they can)."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD):
        return f"{type(optimizer).__name__} has no native kernel (Adam, AdamW and SGD do)"
    for group in optimizer.param_groups:
        reason = group_refusal(group)
        if reason is not None:
            return reason
    return None


def group_refusal(group: dict[str, Any]) -> str | None:
    """Why the native kernel cannot step this param group (None when it can)."""
    for flag in ("fused", "foreach"):
        if group.get(flag):
            return f"{flag}=True asks for torch's own {flag} arithmetic"
    for flag in ("capturable", "differentiable"):
        if group.get(flag):
            return f"{flag}=True is not supported by the native kernel"
    for key, value in group.items():
        if key != "params" and isinstance(value, torch.Tensor):
            return f"tensor-valued hyperparameter {key}"
        if key == "betas" and any(isinstance(b, torch.Tensor) for b in value):
            return "tensor-valued betas"
    for p in group["params"]:
        if p.dtype != torch.float32 and not p.is_meta:
            return (
                f"parameters in {p.dtype} (the native kernel keeps fp32 master weights; pass "
                "compute_dtype= for low-precision compute)"
            )
    return None
