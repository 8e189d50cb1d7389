"""Optimizer state in torch's own format, read from and written to the tiers.

Three ways in and one way out, all in the format of the optimizer's own ``state_dict()`` (for any
updater that keeps the state in the tiers: the native Adam/AdamW/SGD, or torch's step with its
state tensors homed there):

- :func:`check_torch_state` / :func:`import_torch_state`: on entering ``tierrt.offload()``, the
  state the optimizer already holds (steps taken before, ``load_state_dict`` of a checkpoint, an
  earlier ``offload()`` of the same model) moves into the tiers, so training continues exactly
  where it was; the torch-side tensors are then let go.
- :func:`load_native_state_dict`: ``optimizer.load_state_dict()`` inside the context.
- :func:`native_state_dict`: ``optimizer.state_dict()`` inside the context, and on exit (the state
  goes back to ``optimizer.state``).

Only the offloaded parameters that required grad on entry have state in the tiers; any other
parameter's state stays in ``optimizer.state`` as torch keeps it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from .updaters import Updater, step_count

if TYPE_CHECKING:
    from tierrt.scheduler.pipeline import Pipeline

    from ..store import BlockState
    from .blockwise import BlockwiseOptimizer

log = logging.getLogger("tierrt.optim")

__all__ = [
    "native_state_dict",
    "load_native_state_dict",
    "check_torch_state",
    "import_torch_state",
    "release_torch_state",
    "TieredState",
]

Entry = dict[str, Any]


def _params(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in opt.param_groups for p in group["params"]]


def _groups_of(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The param group of every parameter, in ``state_dict`` order."""
    return [group for group in opt.param_groups for _ in group["params"]]


# ---- checks -------------------------------------------------------------------------------------
def check_entry(
    updater: Updater, param: torch.Tensor, group: dict[str, Any], entry: Entry, name: str
) -> None:
    """Raise :class:`ConfigError` unless ``entry`` (torch's state of ``param``) can be continued by
    the native ``updater``: every key torch's optimizer needs, each state tensor shaped like the
    parameter, a whole step count."""
    missing = [key for key in updater.required_keys(group) if key not in entry]
    if missing:
        raise ConfigError(
            f"optimizer state of {name} lacks {', '.join(missing)} (it has {', '.join(entry) or 'nothing'}); "
            f"{type(updater.optimizer).__name__} with these options keeps "
            f"{', '.join(updater.required_keys(group))}. The state comes from an optimizer of another type "
            "or other options (amsgrad, momentum): load a matching state, or none"
        )
    if "step" in updater.required_keys(group):
        try:
            step_count(entry["step"])
        except ConfigError as exc:
            raise ConfigError(f"optimizer state of {name}: {exc}") from None
    for key in updater.state_kinds:
        value = entry.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"optimizer state of {name}: {key} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(param.shape):
            raise ConfigError(
                f"optimizer state of {name}: {key} has shape {list(value.shape)}, the parameter "
                f"{list(param.shape)}. The state belongs to another model or another order of "
                "parameters: load the state saved with this model's optimizer"
            )


def check_torch_state(
    bw: BlockwiseOptimizer, will_hold: Callable[[torch.Tensor], bool], name_of: Callable[[torch.Tensor], str]
) -> None:
    """Before anything moves: the state ``optimizer.state`` holds for every parameter whose state
    will live in the tiers (``will_hold``) can be continued natively (see :func:`check_entry`)."""
    opt = bw.optimizer
    if not bw.updater.state_in_tiers:
        return
    for p, group in zip(_params(opt), _groups_of(opt)):
        entry = opt.state.get(p)
        if entry and will_hold(p):
            check_entry(bw.updater, p, group, entry, name_of(p))


# ---- writing into the tiers ---------------------------------------------------------------------
def _write_kind(
    pipeline: Pipeline, bs: BlockState, kind: str, values: list[tuple[int, torch.Tensor]]
) -> None:
    """Set some slots of ``bs.kind`` (copying from any dtype or device) and write the kind home. A
    kind never written before starts as zeros, so no slot holds leftover arena memory."""
    if pipeline.updates is not None and pipeline.updates.has_pending(bs.index):
        pipeline.updates.apply(bs.index)
    ks = bs.kinds[kind]
    fresh = not ks.valid
    pipeline.ensure_host(bs, kind)
    assert ks.host is not None
    ks.pins += 1
    try:
        if fresh:
            ks.host.flat.zero_()
        for slot_index, value in values:
            view = pipeline.store.slot_view(bs, ks, bs.spec.slots[slot_index], "dram")
            view.copy_(value.detach())
    finally:
        ks.pins -= 1
    pipeline.mark_modified(bs, kind, "dram")
    pipeline.flush(bs, kind, drop=True)


def _store_entries(bw: BlockwiseOptimizer, entries: dict[torch.nn.Parameter, Entry]) -> None:
    """Write the state tensors of ``entries`` (checked already) into the tiers, one block and kind
    at a time (so DRAM holds at most one kind's buffer for it), and set the updater's counters."""
    pipeline = bw.pipeline
    assert pipeline is not None
    by_block: dict[int, list[tuple[int, torch.nn.Parameter, Entry]]] = {}
    for p, entry in entries.items():
        bs, slot_index = bw.slot_of(p)
        by_block.setdefault(bs.index, []).append((slot_index, p, entry))
    for index in sorted(by_block):
        bs = pipeline.blocks[index]
        items = by_block[index]
        for kind in bw.updater.state_kinds:
            values = [(slot, entry[kind]) for slot, _, entry in items if entry.get(kind) is not None]
            if values:
                _write_kind(pipeline, bs, kind, values)
        for _, p, entry in items:
            bw.updater.load_counters(p, entry)
    pipeline.drain()  # a failed write is reported here, not at some later step


def import_torch_state(bw: BlockwiseOptimizer) -> list[torch.nn.Parameter]:
    """On entering: move the state ``optimizer.state`` holds for parameters whose state lives in the
    tiers there (checked by :func:`check_torch_state` before). Returns those parameters; the caller
    drops their torch-side state once the runtime is up (:func:`release_torch_state`)."""
    opt = bw.optimizer
    if not bw.updater.state_in_tiers:
        return []
    entries = {p: opt.state[p] for p in _params(opt) if opt.state.get(p) and bw.holds_state_of(p)}
    extra = {key for entry in entries.values() for key in entry} - {"step", *bw.updater.state_kinds}
    if extra and bw.updater.native:  # torch's own step keeps them (with its step counter)
        log.warning(
            "tierrt: optimizer state keys %s are not used by the native %s and are dropped",
            ", ".join(sorted(extra)),
            type(opt).__name__,
        )
    _store_entries(bw, entries)
    return list(entries)


def release_torch_state(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Forget the torch-side state of ``params`` (it lives in the tiers now)."""
    for p in params:
        opt.state.pop(p, None)


# ---- torch's state_dict -------------------------------------------------------------------------
def native_state_dict(bw: BlockwiseOptimizer, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What ``torch.optim.Adam/AdamW/SGD.state_dict()`` would return, tensors copied from the tiers."""
    pipeline = bw.pipeline
    assert pipeline is not None
    updater = bw.updater
    cpu = torch.device("cpu")
    state: dict[int, Entry] = {}
    for index, (p, group) in enumerate(zip(_params(opt), _groups_of(opt))):
        if bw.holds_state_of(p) and updater.has_state(p):
            bs, slot = bw.slot_of(p)
            entry = updater.counters_of(p)
            for kind in updater.state_keys(group, p):
                entry[kind] = pipeline.read_slot(bs, kind, slot, cpu)
            state[index] = entry
        elif opt.state.get(p):  # not offloaded, or frozen on entry: torch's own state
            state[index] = dict(opt.state[p])
    groups = []
    start = 0
    for group in opt.param_groups:
        saved = {k: v for k, v in group.items() if k != "params"}
        saved["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append(saved)
    return {"state": state, "param_groups": groups}


def _loaded_entries(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[int, Entry]:
    """The state dict's entries by position in ``opt``'s parameters; ConfigError if the state dict
    does not have ``opt``'s shape of groups."""
    groups = opt.param_groups
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        raise ConfigError("load_state_dict: the state dict has a different number of parameter groups")
    for group, saved in zip(groups, saved_groups):
        if len(group["params"]) != len(saved["params"]):
            raise ConfigError("load_state_dict: a parameter group's size does not match the state dict")
    saved_ids = [i for g in saved_groups for i in g["params"]]
    position_of = {saved_id: position for position, saved_id in enumerate(saved_ids)}
    loaded: dict[int, Entry] = {}
    for key, value in state_dict.get("state", {}).items():
        position = position_of.get(int(key))
        if position is None:
            raise ConfigError(f"load_state_dict: state for parameter index {key} matches no parameter")
        loaded[position] = value
    return loaded


def load_native_state_dict(
    bw: BlockwiseOptimizer, opt: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> None:
    """``load_state_dict`` for the native updaters: hyperparameters into ``param_groups``, state
    tensors into the tiers. Raises :class:`ConfigError` for a state dict that does not fit."""
    loaded = _loaded_entries(opt, state_dict)
    params = _params(opt)
    saved_groups = state_dict["param_groups"]
    # Validate everything before changing anything (with the hyperparameters being loaded).
    for position, entry in loaded.items():
        p = params[position]
        if bw.holds_state_of(p):
            group = saved_groups[_group_index(opt, position)]
            check_entry(bw.updater, p, group, entry, f"{bw.name_of(p)} (index {position})")
    for group, saved in zip(opt.param_groups, saved_groups):
        for key, value in saved.items():
            if key != "params":
                group[key] = value
    bw.updater.forget_counters()
    tiered: dict[torch.nn.Parameter, Entry] = {}
    for p in params:
        opt.state.pop(p, None)
    for position, entry in loaded.items():
        p = params[position]
        if bw.holds_state_of(p):
            tiered[p] = entry
        else:
            opt.state[p] = {k: _on_device(v, p.device) for k, v in entry.items()}
    _store_entries(bw, tiered)


def _on_device(value: Any, device: torch.device) -> Any:
    """A state value as torch keeps it: tensors shaped like the parameter on its device (the step
    stays where it is)."""
    return value.to(device) if isinstance(value, torch.Tensor) and value.dim() else value


def _group_index(opt: torch.optim.Optimizer, position: int) -> int:
    """The index of the param group holding parameter number ``position``."""
    for index, group in enumerate(opt.param_groups):
        if position < len(group["params"]):
            return index
        position -= len(group["params"])
    raise IndexError(position)


# ---- optimizer.state inside the context ---------------------------------------------------------
class TieredState(defaultdict):
    """``optimizer.state`` while tierrt's kernels step the optimizer with its state in the tiers.

    Reading a parameter's entry (``opt.state[p]``, ``.get``, ``.items()``, ``len``) gives what torch's
    own optimizer would hold (``step``, ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``), read from
    the tiers as CPU copies. Writes reach the tiers, so the next ``step()`` uses them as torch's
    would: a change made in place to such a copy (``opt.state[p]["exp_avg"].zero_()``, also through a
    view of it), a value assigned into an entry (``opt.state[p]["exp_avg"] = t``), a whole entry
    assigned (``opt.state[p] = {...}``), and ``del opt.state[p]`` / ``pop`` / ``clear()``, after which
    the parameter starts from fresh state at its next step. Every other parameter's entry is the
    optimizer's own ``state`` as torch keeps it, and so is an offloaded parameter's entry still
    there (torch-side state not moved into the tiers yet, see :func:`import_torch_state`)."""

    def __init__(self, bw: BlockwiseOptimizer, original: defaultdict) -> None:
        super().__init__(dict)
        self.bw = bw
        self.original = original

    # entries in the tiers
    def _current(self) -> None:
        """Apply pending updates: the state is read as the last ``step()`` left it. Not while an
        update is being applied or the optimizer's own ``step`` runs (torch's step reads the state
        it is updating)."""
        bw = self.bw
        if bw.updates is not None and not bw.updater.applying and not bw.stepping_unmanaged:
            bw.updates.apply_all()

    def _holds(self, p: Any) -> bool:
        return isinstance(p, torch.Tensor) and self.bw.holds_state_of(p)

    def _tiered(self, p: Any) -> Entry | None:
        bw = self.bw
        if not self._holds(p):
            return None
        self._current()
        if not bw.updater.has_state(p):
            return None
        assert bw.pipeline is not None
        bs, slot = bw.slot_of(p)
        entry = TieredEntry(self, p)
        values = bw.updater.counters_of(p)
        for kind in bw.updater.state_keys(self._group_of(p), p):
            values[kind] = bw.pipeline.read_slot(bs, kind, slot, torch.device("cpu"))
        for key, value in values.items():
            dict.__setitem__(entry, key, value)
            if isinstance(value, torch.Tensor) and bw.watch_copy is not None:
                bw.watch_copy(value, lambda copy, p=p, key=key: self._write_value(p, key, copy))
        return entry

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.bw.optimizer.param_groups if any(q is p for q in g["params"]))

    def _tiered_params(self) -> list[torch.nn.Parameter]:
        self._current()
        bw = self.bw
        return [p for p in _params(bw.optimizer) if bw.holds_state_of(p) and bw.updater.has_state(p)]

    def __getitem__(self, p: Any) -> Any:
        entry = self._tiered(p)
        if entry is not None:
            return entry
        if self._holds(p) and p not in self.original:
            return TieredEntry(self, p)  # no state yet: an empty entry, which a complete assignment fills
        return self.original[p]

    def get(self, p: Any, default: Any = None) -> Any:
        entry = self._tiered(p)
        return entry if entry is not None else self.original.get(p, default)

    def __contains__(self, p: object) -> bool:
        return any(q is p for q in self._tiered_params()) or p in self.original

    def __iter__(self) -> Any:
        tiered = self._tiered_params()
        seen = {id(p) for p in tiered}
        return iter([*tiered, *(p for p in self.original if id(p) not in seen)])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def keys(self) -> Any:  # type: ignore[override]
        return list(iter(self))

    def items(self) -> Any:  # type: ignore[override]
        return [(p, self[p]) for p in self]

    def values(self) -> Any:  # type: ignore[override]
        return [self[p] for p in self]

    def __bool__(self) -> bool:
        return len(self) > 0

    def __repr__(self) -> str:
        return f"TieredState({len(self)} entries, those of offloaded parameters read from the tiers)"

    # writes
    def __setitem__(self, p: Any, value: Any) -> None:
        if not self._holds(p) or p in self.original:
            self.original[p] = value
            return
        if not value:
            self._forget(p)
            return
        self._store(p, dict(value))

    def __delitem__(self, p: Any) -> None:
        if not self._holds(p) or p in self.original:
            del self.original[p]
            return
        if not self.bw.updater.has_state(p):
            raise KeyError(p)
        self._forget(p)

    def pop(self, p: Any, *default: Any) -> Any:
        if not self._holds(p) or p in self.original:
            return self.original.pop(p, *default)
        entry = self._tiered(p)
        if entry is None:
            if default:
                return default[0]
            raise KeyError(p)
        self._forget(p)
        return dict(entry)

    def setdefault(self, p: Any, default: Any = None) -> Any:
        if not self._holds(p) or p in self.original:
            return self.original.setdefault(p, default)
        if p not in self:
            self[p] = default if default is not None else {}
        return self[p]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for p, value in dict(*args, **kwargs).items():
            self[p] = value

    def clear(self) -> None:
        for p in self._tiered_params():
            self._forget(p)
        self.original.clear()

    def copy(self) -> defaultdict:
        copied: defaultdict = defaultdict(dict)
        copied.update(self.items())
        return copied

    def __reduce__(self) -> Any:
        return (defaultdict, (dict,), None, None, iter(self.items()))

    # ---- writing into the tiers ----------------------------------------------------------------
    def _before_write(self, p: torch.Tensor) -> tuple[BlockState, int]:
        """Pending updates applied, and no update computed during backward from the state about to
        change kept for the next step (it recomputes)."""
        bw = self.bw
        self._current()
        bs, slot = bw.slot_of(p)
        if bw.updates is not None:
            bw.updates.speculator.discard(bs.index)
        return bs, slot

    def _forget(self, p: torch.Tensor) -> None:
        """``p`` starts from fresh state at its next step, as torch's optimizer does for a parameter
        without an entry."""
        self._before_write(p)
        self.bw.updater.forget_param(p)
        self.original.pop(p, None)

    def _store(self, p: torch.Tensor, entry: Entry) -> None:
        """A whole entry assigned: checked as a loaded one (:func:`check_entry`), then stored."""
        bw = self.bw
        check_entry(bw.updater, p, self._group_of(p), entry, bw.name_of(p))
        self._before_write(p)
        _store_entries(bw, {p: entry})

    def _write_value(self, p: torch.Tensor, key: str, value: Any) -> None:
        """One value of ``p``'s entry changed (assigned, or a copy read from it changed in place)."""
        bw = self.bw
        if not bw.updater.has_state(p):
            raise ConfigError(
                f"optimizer state of {bw.name_of(p)} was reset since this value was read; assign the "
                "whole entry (optimizer.state[p] = {...}) to give it state again"
            )
        bs, slot = self._before_write(p)
        if key in bw.updater.state_keys(self._group_of(p), p):
            _check_state_value(p, key, value, bw.name_of(p))
            assert bw.pipeline is not None
            _write_kind(bw.pipeline, bs, key, [(slot, value)])
            bw.pipeline.drain()  # a failed write is reported here, not at some later step
            return
        entry = bw.updater.counters_of(p)
        entry[key] = value
        if key == "step":
            step_count(value)  # ConfigError for a step that is not a whole number >= 0
        bw.updater.load_counters(p, entry)


class TieredEntry(dict):
    """One parameter's entry of :class:`TieredState`: a dict of copies read from the tiers, whose
    assignments and deletions are written into the tiers (``opt.state[p]["exp_avg"] = t``). An
    entry of a parameter without state collects the values assigned to it and is stored once it
    holds every key the optimizer needs (``step`` and its state tensors)."""

    def __init__(self, owner: TieredState, param: torch.Tensor) -> None:
        super().__init__()
        self._owner = owner
        self._param = param

    def __setitem__(self, key: str, value: Any) -> None:
        owner, p = self._owner, self._param
        if owner.bw.updater.has_state(p):
            owner._write_value(p, key, value)
            dict.__setitem__(self, key, value)
            return
        dict.__setitem__(self, key, value)
        required = owner.bw.updater.required_keys(owner._group_of(p))
        if all(k in self for k in required):
            owner._store(p, dict(self))

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        owner = self._owner
        dict.__delitem__(self, key)
        if not self:
            owner._forget(self._param)
        elif owner.bw.updater.has_state(self._param):
            raise ConfigError(
                f"del optimizer.state[p][{key!r}] for {owner.bw.name_of(self._param)}: torch's step "
                "would fail without it. Delete the whole entry (del optimizer.state[p]) to start "
                "the parameter from fresh state"
            )

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        if key not in self:
            if default:
                return default[0]
            raise KeyError(key)
        value = dict.__getitem__(self, key)
        del self[key]
        return value

    def clear(self) -> None:
        dict.clear(self)
        self._owner._forget(self._param)

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


def _check_state_value(p: torch.Tensor, key: str, value: Any, name: str) -> None:
    if not isinstance(value, torch.Tensor) or value.shape != p.shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(
            f"optimizer.state[{name}][{key!r}] must be a tensor shaped like the parameter "
            f"{tuple(p.shape)}, got {got}"
        )


class CurrentState(TieredState):
    """``optimizer.state`` while tierrt steps the optimizer with its state in process memory (torch
    stepping it block by block, e.g. an optimizer adopted inside the context, or one that keeps no
    state tensor shaped like the parameters): the optimizer's own ``state``, read as the last
    ``step()`` left it (pending block updates are applied first), as torch's own optimizer would
    hold it."""

    def _holds(self, p: Any) -> bool:
        return False  # every entry, and every write, is the optimizer's own

    def _tiered(self, p: Any) -> Entry | None:
        self._current()
        return None

    def _tiered_params(self) -> list[torch.nn.Parameter]:
        self._current()
        return []

    def __repr__(self) -> str:
        return f"CurrentState({len(self)} entries, pending updates applied on read)"
