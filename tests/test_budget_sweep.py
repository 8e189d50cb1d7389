"""Every DRAM budget the planner accepts works; every other one fails at entry.

The planner gave the room left after the working set to pinned weights and then, once every block
was pinned, handed the same room out again to gradients and optimizer state in DRAM (it did not
deduct the pinned weights): 8 x Linear(256) with SGD or RMSprop at 3.9MiB or 4MiB planned 4.06MiB of
DRAM homes and failed placing them, while 3.5MiB and 4.1MiB worked. Here a fine sweep of budgets
checks the plan's arithmetic, and a training run at the tightest budget of every distinct plan
equals plain torch bit for bit or fails at entry with TierCapacityError, the model untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tierrt
from tierrt.blocks import partition_model
from tierrt.errors import TierCapacityError
from tierrt.optim.updaters import choose_updater
from tierrt.placement import Placement, plan_placement

KIB = 1024
MIB = 1024 * KIB

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3),
}


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])


def plan(model: nn.Module, opt: torch.optim.Optimizer, budget: int) -> Placement | None:
    """The placement tierrt.offload() makes for ``budget`` (None: refused)."""
    updater = choose_updater(opt, None)
    try:
        return plan_placement(
            partition_model(model),
            compute="dram",
            budgets={"dram": budget, "nvme": None},
            compute_dtype=None,
            depth=None,
            state_kinds=updater.state_kinds,
            speculate=updater.transactional,
        )
    except TierCapacityError:
        return None


def signature(placement: Placement) -> tuple:
    homes = tuple(tuple(sorted((kind, p.home) for kind, p in kinds.items())) for kinds in placement.kinds)
    return (tuple(sorted(placement.pinned)), placement.depth, placement.update_reserve, homes)


@pytest.mark.parametrize("opt_kind", list(OPTIMIZERS))
def test_planned_dram_homes_and_working_set_fit_the_budget(opt_kind):
    """8KiB steps from 1MiB to 12MiB: DRAM homes plus the working set never exceed the budget,
    and the room left over is smaller than anything that could still have been homed in DRAM."""
    model = build()
    opt = OPTIMIZERS[opt_kind](model.parameters())
    for budget in range(1 * MIB, 12 * MIB + 1, 8 * KIB):
        placement = plan(model, opt, budget)
        if placement is None:
            continue
        used = placement.needed.get("dram", 0) + placement.working_set
        assert used <= budget, f"{budget / MIB:.4f}MiB: plans {used} bytes"
        candidates = [
            p.layout.nbytes
            for i, kinds in enumerate(placement.kinds)
            for kind, p in kinds.items()
            if p.home != "dram" and (kind == "weight" or i in placement.pinned)
        ]
        if candidates:
            assert budget - used < min(candidates), f"{budget / MIB:.4f}MiB: room left unused"


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for _ in range(2):
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.detach().clone())
    with torch.no_grad():
        out.append(model(x))
    return out


@pytest.mark.parametrize("opt_kind", list(OPTIMIZERS))
def test_every_accepted_budget_trains_bitwise_and_others_fail_at_entry(opt_kind, nvme_dir):
    """The tightest budget of every distinct plan between 1MiB and 12MiB (16KiB steps), the
    budgets of the report, and the largest refused one: bitwise, or TierCapacityError at entry
    with the model untouched."""
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    reference = build()
    ref_values = _train(reference, OPTIMIZERS[opt_kind](reference.parameters()), x)

    probe = build()
    probe_opt = OPTIMIZERS[opt_kind](probe.parameters())
    budgets: dict[tuple | None, int] = {}
    refused = 0
    for budget in range(1 * MIB, 12 * MIB + 1, 16 * KIB):
        placement = plan(probe, probe_opt, budget)
        if placement is None:
            refused = budget
        else:
            budgets.setdefault(signature(placement), budget)
    reported = [int(3.9 * MIB), 4 * MIB, int(4.1 * MIB)]
    chosen = sorted({*budgets.values(), *reported, *([refused] if refused else [])})

    for budget in chosen:
        model = build()
        opt = OPTIMIZERS[opt_kind](model.parameters())
        before = copy.deepcopy(model.state_dict())
        tiers = [tierrt.dram(budget), tierrt.nvme(nvme_dir)]
        try:
            runtime = tierrt.offload(model, tiers=tiers, optimizer=opt).__enter__()
        except TierCapacityError:
            assert budget == refused, f"{budget / MIB:.4f}MiB was planned but failed at entry"
            for key, value in model.state_dict().items():
                assert torch.equal(value, before[key]), f"{key} changed by a refused entry"
            continue
        try:
            values = _train(model, opt, x)
        finally:
            runtime.__exit__(None, None, None)
        for i, (a, b) in enumerate(zip(ref_values, values, strict=True)):
            # Seen once in CI under load (rmsprop, 1MiB), never reproduced: say enough to tell why.
            assert torch.equal(a, b), (
                f"{budget / MIB:.4f}MiB: value {i} differs by up to {(a - b).abs().max().item():.3g} "
                f"(torch threads {torch.get_num_threads()}); the run:\n{runtime.report()}"
            )
        for (name, a), b in zip(reference.named_parameters(), model.parameters(), strict=True):
            assert torch.equal(a, b), f"{budget / MIB:.4f}MiB: {name} differs"
