"""Placement: which tier is home to each kind of each block's state, within every budget.

The compute tier (the GPU, or DRAM without one) first keeps a *working set*: the largest set of
blocks one module needs at once, the blocks in flight for prefetch, and the gradient buffer of the
block in backward. What is left of the budget holds blocks permanently (*pinned*: never fetched
again), spread evenly over the model so that their compute time overlaps the fetches of their
neighbours. Everything else is homed in the next tiers down (DRAM, CXL, NVMe), fastest first.

A budget too small for the working set of the largest block fails here, before anything moves, with
the budget that would fit.

A parameter used outside a call of its module keeps its block resident for every forward and backward
(learned in the first forwards, see :mod:`tierrt.hooks`): :meth:`Placement.held_mode` says whether the
working set still fits next to such blocks, and :meth:`Placement.budget_for_held` the budget at which
it would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .blocks import Partition
from .errors import TierCapacityError
from .sizes import format_size
from .store import KindLayout, make_layout

__all__ = ["HeldMode", "KindPlan", "Placement", "plan_placement"]

# How pending optimizer updates run next to blocks held through a whole pass (see Placement.held_mode)
HeldMode = Literal["defer", "apply_first"]
_ALIGN = 4096


@dataclass
class KindPlan:
    """The layout and home of one kind of one block."""

    layout: KindLayout
    home: str


@dataclass
class Placement:
    """Homes for every (block, kind), pinned blocks, prefetch depth and the bytes needed per tier."""

    kinds: list[dict[str, KindPlan]]
    pinned: set[int]
    depth: int
    working_set: int
    needed: dict[str, int] = field(default_factory=dict)  # tier -> bytes of homes
    # DRAM kept free by prefetching for one block's optimizer update during backward (speculation)
    update_reserve: int = 0
    compute: str = "dram"
    # with a GPU: DRAM that stages the blocks moving between the lower tiers and the GPU
    staging: int = 0
    # What the working set on the compute tier is made of: the room a forward or backward pass
    # streams through (the largest acquisition and, with DRAM compute, a gradient buffer), the room
    # one block's optimizer update takes (DRAM compute: it runs there), the slack against
    # fragmentation, and the room the compute tier has for them (its budget less what is homed or
    # pinned there for good)
    pass_need: int = 0
    update_need: int = 0
    slack: int = 0
    room: int = 0
    budget: int = 0  # the compute tier's
    weights: list[int] = field(default_factory=list)  # per block, on the compute tier
    # plan_placement's arguments, to plan the same model at another compute budget (at_budget)
    inputs: Callable[[int], Placement] | None = field(default=None, repr=False, compare=False)

    def held_need(self, held: set[int], deferred: bool) -> int:
        """The room a pass needs on the compute tier when blocks ``held`` (indices) stay resident
        through it (blocks of parameters used outside a call of their module). ``deferred``: a
        block's pending optimizer update runs in the pass (when the block is first acquired), next
        to the held blocks; otherwise every pending update is applied before they are taken. Each
        held block may split the free room once more: it adds a block's slack where it is held."""
        held_bytes = self.held_bytes(held)
        if not held_bytes:
            return max(self.pass_need, self.update_need) + self.slack
        held_slack = self.slack * sum(1 for i in held if i not in self.pinned)
        if deferred:
            return max(self.pass_need, self.update_need) + held_bytes + held_slack + self.slack
        return max(self.pass_need + held_bytes + held_slack, self.update_need) + self.slack

    def held_mode(self, held: set[int]) -> HeldMode | None:
        """Whether the working set fits next to blocks ``held`` (indices), kept resident through
        each pass: "defer" (pending updates run in the pass, as without them), "apply_first" (every
        pending update is applied before the held blocks are taken, while they can still be
        evicted; a pass then needs room for the held blocks only next to its streaming), or None
        when neither fits the compute tier's room."""
        if self.room >= self.held_need(held, deferred=True):
            return "defer"
        if self.room >= self.held_need(held, deferred=False):
            return "apply_first"
        return None

    def held_bytes(self, held: set[int]) -> int:
        """Bytes blocks ``held`` (indices) add to the compute tier: pinned ones are there anyway."""
        return sum(self.weights[i] for i in held if i not in self.pinned)

    def at_budget(self, budget: int) -> Placement | None:
        """The placement of the same model with ``budget`` on the compute tier (None when that
        budget cannot place it)."""
        if self.inputs is None:
            return None
        try:
            return self.inputs(budget)
        except TierCapacityError:
            return None

    def budget_for_held(self, held: set[int]) -> int | None:
        """About the smallest compute budget (rounded up to a step of a few KiB at most a
        32nd of the shortfall) with which ``offload()`` places the same model so that blocks ``held``
        (indices) fit through each pass next to the working set; None when none was found."""
        shortfall = max(self.held_need(held, deferred=False) - self.room, 0)
        step = _aligned(max(_ALIGN, shortfall // 32))
        start = _aligned(self.budget + shortfall)
        for k in range(1024):
            budget = start + k * step
            plan = self.at_budget(budget)
            if plan is not None and plan.held_mode(held) is not None:
                return budget
        return None

    def host_bytes(self, tier: str, budget: int) -> int:
        """What host tier ``tier`` (with ``budget``) is made with: its homes, the working set (CPU
        compute) or the staging (GPU compute) on DRAM, and headroom for buffers in flight (state
        reads, copy-on-write), never above the budget. A model whose state fits well inside the
        budget then takes what it needs, not the whole budget: the budget is a limit, not a
        reservation."""
        need = self.needed.get(tier, 0)
        if tier == "dram":
            need += self.working_set if self.compute == "dram" else self.staging
        largest = max((k.layout.nbytes for kinds in self.kinds for k in kinds.values()), default=0)
        headroom = 4 * largest + max(64 << 20, need // 4)
        return min(budget, need + headroom)

    def describe(self) -> str:
        reserve = self.update_reserve
        lines = [
            f"prefetch depth {self.depth}, working set {format_size(self.working_set)}"
            + (f" (with {format_size(reserve)} for updates during backward)" if reserve else "")
            + f", {len(self.pinned)} of {len(self.kinds)} blocks pinned on the compute tier"
        ]
        for tier, nbytes in self.needed.items():
            lines.append(f"  {tier}: {format_size(nbytes)} of homes")
        return "\n".join(lines)


def _kinds_for(
    partition: Partition, compute_dtype: torch.dtype | None, train: bool, state_kinds: dict[str, torch.dtype]
) -> list[dict[str, KindLayout]]:
    out = []
    for spec in partition.blocks:
        kinds: dict[str, KindLayout] = {"weight": make_layout(spec, "weight", compute_dtype)}
        trainable = any(s.param.requires_grad for s in spec.slots)
        differs = compute_dtype is not None and any(s.dtype != compute_dtype for s in spec.slots)
        if differs:  # every parameter keeps its own dtype there (frozen ones too: exact restore)
            kinds["master"] = make_layout(spec, "master", None)
        if trainable and train:
            kinds["grad"] = make_layout(spec, "grad", None, trainable_only=True)
            for kind, dtype in state_kinds.items():
                kinds[kind] = make_layout(spec, kind, dtype, trainable_only=True)
        out.append(kinds)
    return out


def plan_placement(
    partition: Partition,
    *,
    compute: str,
    budgets: dict[str, int | None],
    compute_dtype: torch.dtype | None,
    depth: int | None,
    train: bool = True,
    state_kinds: dict[str, torch.dtype] | None = None,
    speculate: bool = False,
) -> Placement:
    """Choose homes for every kind of every block.

    ``compute``: "dram" or the GPU tier's name. ``budgets``: bytes per tier name in hierarchy order
    ("gpu0", "dram", "cxl", "nvme"); ``None`` means unbounded (NVMe sized to fit). ``depth``: blocks
    to prefetch ahead (None: 2, or fewer when the budget is tight). ``speculate``: the optimizer may
    update a block during backward (copy-on-write into DRAM buffers of the kinds it changes); with
    DRAM compute the working set then keeps room for one such update, when the budget allows.
    """
    state_kinds = dict(state_kinds or {})
    arguments: dict[str, Any] = {
        "partition": partition,
        "compute": compute,
        "budgets": budgets,
        "compute_dtype": compute_dtype,
        "depth": depth,
        "train": train,
        "state_kinds": state_kinds,
        "speculate": speculate,
    }
    layouts = _kinds_for(partition, compute_dtype, train, state_kinds)
    weights = [k["weight"].nbytes for k in layouts]
    grads = [k["grad"].nbytes if "grad" in k else 0 for k in layouts]
    masters = [k["master"].nbytes if "master" in k else 0 for k in layouts]
    acquisitions = [sum(weights[i] for i in set(needed)) for _, needed in partition.hook_targets]
    max_acq = max(acquisitions, default=max(weights))
    states = [sum(k[name].nbytes for name in state_kinds if name in k) for k in layouts]
    max_w, max_g, max_m, max_s = max(weights), max(grads), max(masters), max(states)

    compute_budget = budgets[compute]
    assert compute_budget is not None
    # In backward a block's weights and gradient buffer are both in DRAM; the optimizer holds a
    # block's master weights and gradients with its compute weights.
    pass_need, update_need, slack = max_acq, 0, 0
    if compute == "dram":
        pass_need = max_acq + max_g
        update_need = max_w + max_g + max_m + max_s + (max_w if max_m else 0)
        if max_g:
            # Slack so that buffers of different lifetimes cannot fragment the working set out of room.
            slack = max(max_w, max_g, max_m)
    minimum = max(pass_need, update_need) + slack
    wanted_depth = 2 if depth is None else max(0, depth)
    if compute_budget < minimum:
        biggest = max(range(len(layouts)), key=lambda i: weights[i] + grads[i])
        name = partition.blocks[biggest].name
        raise TierCapacityError(
            f"{compute} budget {format_size(compute_budget)} is below what the largest block needs: "
            f"block {name} holds {format_size(weights[biggest])} of weights"
            + (f" and {format_size(grads[biggest])} of gradients" if grads[biggest] else "")
            + f"; a {compute} budget of at least {format_size(minimum, round_up=True)} would fit "
            f"({format_size(minimum + wanted_depth * max_w, round_up=True)} to prefetch {wanted_depth} "
            "blocks ahead; "
            "more when a parameter is used outside a call of its module, whose block then stays resident "
            "through each pass: the first forward says how much)",
            tier=compute,
            requested=minimum,
            budget=compute_budget,
            block=name,
        )
    # Depth that fits next to the minimum working set.
    fit_depth = (compute_budget - minimum) // max_w if max_w else wanted_depth
    depth_used = int(min(wanted_depth, fit_depth))
    working = minimum + depth_used * max_w + (max_g if compute == "dram" and grads else 0)
    reserve = 0
    if speculate and compute == "dram" and max_g:
        # The kinds an update rewrites: the fp32 weights (or master and compute weights) and states.
        reserve = max(weights[i] + masters[i] + states[i] for i in range(len(layouts)))
        if working + reserve > compute_budget:
            reserve = 0  # no room: blocks are simply updated in step() (their gradients go home)
        working += reserve
    working = min(working, compute_budget)

    # Tiers below compute, in order; DRAM is among them when compute is a GPU.
    order = [name for name in budgets if name != compute]
    free = {name: budgets[name] for name in order}
    needed = {name: 0 for name in budgets}
    homes: list[dict[str, str]] = [{} for _ in layouts]
    staging = 0
    if compute != "dram":
        # DRAM stages what moves between NVMe and the GPU, and holds the optimizer's working blocks.
        staging = (depth_used + 1) * max_w + 2 * (max_g + max_m + max_s)
        dram_budget = budgets.get("dram")
        if dram_budget is not None and dram_budget < staging:
            raise TierCapacityError(
                f"dram budget {format_size(dram_budget)} is below the "
                f"{format_size(staging, round_up=True)} needed to stage "
                f"the largest blocks between the tiers and the GPU",
                tier="dram",
                requested=staging,
                budget=dram_budget,
            )
        if dram_budget is not None:
            free["dram"] = dram_budget - staging

    # Pinned blocks: weights that stay on the compute tier. Spread evenly.
    spare = compute_budget - working
    pinned: set[int] = set()
    total_weights = sum(weights)
    if spare >= total_weights:
        pinned = set(range(len(layouts)))
        spare -= total_weights
    elif spare > 0:
        count = _count_fitting(sorted(weights), spare)
        for i in _spread(len(layouts), count):
            if weights[i] <= spare:
                pinned.add(i)
                spare -= weights[i]
    if compute == "dram":
        for i in pinned:
            homes[i]["weight"] = "dram"
            needed["dram"] += weights[i]
        # With CPU compute, gradients and master weights may live in DRAM too if room is left.
        compute_left = spare
        state_sizes = {name: [k[name].nbytes if name in k else 0 for k in layouts] for name in state_kinds}
        for kind, sizes in (("grad", grads), ("master", masters), *state_sizes.items()):
            for i in range(len(layouts)):
                if sizes[i] and kind in layouts[i] and sizes[i] <= compute_left and "weight" in homes[i]:
                    homes[i][kind] = "dram"
                    needed["dram"] += sizes[i]
                    compute_left -= sizes[i]

    # Everything else: fastest lower tier with room.
    for i, kinds in enumerate(layouts):
        for kind, layout in kinds.items():
            if kind in homes[i]:
                continue
            for tier in order:
                if compute == "dram" and tier == "dram":
                    continue  # DRAM's spare room was handed out above
                room = free[tier]
                if room is None or room >= layout.nbytes:
                    homes[i][kind] = tier
                    needed[tier] += layout.nbytes
                    if room is not None:
                        free[tier] = room - layout.nbytes
                    break
            else:
                lower = [t for t in order if not (compute == "dram" and t == "dram")]
                raise TierCapacityError(
                    f"the model's state does not fit: {kind} of block {partition.blocks[i].name} "
                    f"({format_size(layout.nbytes)}) has no room in "
                    f"{', '.join(lower) or 'any tier below ' + compute}; total state "
                    f"{format_size(sum(k.nbytes for ks in layouts for k in ks.values()))}. Add an nvme tier "
                    "or raise a budget",
                    tier=lower[-1] if lower else compute,
                    requested=layout.nbytes,
                )
    plans = [
        {kind: KindPlan(layout, homes[i][kind]) for kind, layout in kinds.items()}
        for i, kinds in enumerate(layouts)
    ]
    permanent = needed[compute] if compute == "dram" else sum(weights[i] for i in pinned)
    return Placement(
        plans,
        pinned,
        depth_used,
        working,
        {k: v for k, v in needed.items() if v},
        reserve,
        compute=compute,
        staging=0 if compute == "dram" else staging,
        pass_need=pass_need,
        update_need=update_need,
        slack=slack,
        room=compute_budget - permanent,
        budget=compute_budget,
        weights=weights,
        inputs=functools.partial(_plan_at, arguments),
    )


def _plan_at(arguments: dict[str, Any], budget: int) -> Placement:
    """:func:`plan_placement` with ``arguments`` and ``budget`` on the compute tier."""
    budgets = {**arguments["budgets"], arguments["compute"]: budget}
    return plan_placement(**{**arguments, "budgets": budgets})


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _count_fitting(sorted_sizes: list[int], room: int) -> int:
    count = 0
    for size in sorted_sizes:
        if size > room:
            break
        room -= size
        count += 1
    return count


def _spread(n: int, count: int) -> list[int]:
    """``count`` indices spread evenly over range(n)."""
    if count <= 0:
        return []
    if count >= n:
        return list(range(n))
    return sorted({int((k + 0.5) * n / count) for k in range(count)})
