"""Optimizer state in torch's own ``state_dict`` format, read from and written to the tiers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from .updaters import NativeAdamUpdater, NativeSGDUpdater

if TYPE_CHECKING:
    from .blockwise import BlockwiseOptimizer

__all__ = ["native_state_dict", "load_native_state_dict"]


def _slot_of(bw: BlockwiseOptimizer, param: torch.nn.Parameter) -> tuple[Any, int]:
    assert bw.pipeline is not None
    bs = bw.pipeline.blocks[bw.block_of_param[id(param)]]
    for slot in bs.spec.slots:
        if slot.param is param:
            return bs, slot.index
    raise AssertionError("parameter not in its block")


def _params(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in opt.param_groups for p in group["params"]]


def native_state_dict(bw: BlockwiseOptimizer, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What ``torch.optim.Adam/AdamW/SGD.state_dict()`` would return, tensors copied from the tiers."""
    assert bw.pipeline is not None
    pipeline = bw.pipeline
    updater = bw.updater
    cpu = torch.device("cpu")
    params = _params(opt)
    state: dict[int, dict[str, Any]] = {}
    for index, p in enumerate(params):
        if id(p) not in bw.block_of_param:
            if opt.state.get(p):
                state[index] = dict(opt.state[p])
            continue
        if not updater.has_state(p):
            continue
        bs, slot = _slot_of(bw, p)
        entry: dict[str, Any] = {}
        if isinstance(updater, NativeAdamUpdater):
            entry["step"] = torch.tensor(float(updater.steps[id(p)]), dtype=torch.get_default_dtype())
        for kind in updater.state_kinds:
            entry[kind] = pipeline.read_slot(bs, kind, slot, cpu)
        state[index] = entry
    groups = []
    start = 0
    for group in opt.param_groups:
        saved = {k: v for k, v in group.items() if k != "params"}
        saved["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append(saved)
    return {"state": state, "param_groups": groups}


def load_native_state_dict(
    bw: BlockwiseOptimizer, opt: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> None:
    """``load_state_dict`` for the native updaters: hyperparameters into ``param_groups``, state
    tensors into the tiers. Raises :class:`ConfigError` for a state dict that does not fit."""
    assert bw.pipeline is not None
    pipeline = bw.pipeline
    updater = bw.updater
    groups = opt.param_groups
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        raise ConfigError("load_state_dict: the state dict has a different number of parameter groups")
    for group, saved in zip(groups, saved_groups):
        if len(group["params"]) != len(saved["params"]):
            raise ConfigError("load_state_dict: a parameter group's size does not match the state dict")
    params = _params(opt)
    saved_index = {i: j for i, j in zip((i for g in saved_groups for i in g["params"]), range(len(params)))}
    loaded: dict[int, dict[str, Any]] = {}
    for key, value in state_dict.get("state", {}).items():
        position = saved_index.get(int(key))
        if position is None:
            raise ConfigError(f"load_state_dict: state for parameter index {key} matches no parameter")
        loaded[position] = value
    # Validate everything before changing anything.
    for position, entry in loaded.items():
        p = params[position]
        if id(p) not in bw.block_of_param:
            continue
        for kind in updater.state_kinds:
            if kind in entry and entry[kind] is not None and tuple(entry[kind].shape) != tuple(p.shape):
                raise ConfigError(
                    f"load_state_dict: {kind} of parameter {position} has shape "
                    f"{list(entry[kind].shape)}, the parameter {list(p.shape)}"
                )
        if isinstance(updater, NativeAdamUpdater):
            missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in entry]
            if updater.amsgrad and "max_exp_avg_sq" not in entry:
                missing.append("max_exp_avg_sq")
            if missing:
                raise ConfigError(f"load_state_dict: parameter {position} lacks {', '.join(missing)}")
    for group, saved in zip(groups, saved_groups):
        for key, value in saved.items():
            if key != "params":
                group[key] = value
    if isinstance(updater, NativeAdamUpdater):
        updater.steps.clear()
    elif isinstance(updater, NativeSGDUpdater):
        updater.has_buffer.clear()
    for position, entry in loaded.items():
        p = params[position]
        if id(p) not in bw.block_of_param:
            opt.state[p] = {
                k: (v.to(p.device) if isinstance(v, torch.Tensor) and v.dim() else v)
                for k, v in entry.items()
            }
            continue
        bs, slot = _slot_of(bw, p)
        for kind in updater.state_kinds:
            value = entry.get(kind)
            if value is None:
                continue
            pipeline.write_slot(bs, kind, slot, value.detach().to(torch.float32))
        if isinstance(updater, NativeAdamUpdater):
            updater.steps[id(p)] = int(float(entry["step"]))
        elif isinstance(updater, NativeSGDUpdater) and entry.get("momentum_buffer") is not None:
            updater.has_buffer.add(id(p))
    for bs in pipeline.blocks:
        for kind in updater.state_kinds:
            if kind in bs.kinds and bs.kinds[kind].host is not None:
                pipeline.flush(bs, kind, drop=True)
