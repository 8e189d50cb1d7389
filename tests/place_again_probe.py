"""Run in a subprocess by test_place_again.py: enter ``tierrt.offload()`` with a model much larger
than its DRAM budget and no optimizer, build AdamW inside, and measure the process's peak RSS while
the first ``model.zero_grad()`` places the model again with it. Prints JSON: the model's and the
largest block's bytes, the budget, RSS before and peak during placing again (VmHWM after
``echo 5 > /proc/self/clear_refs``), and whether the optimizer's state lives in the tiers after.

Usage: python place_again_probe.py NVME_DIR BUDGET [WIDTH] [LAYERS] [--close-and-start]

``--close-and-start`` measures the fallback instead (what placing again was before it streamed: the
model given back into memory, then placed again from there).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from rss_probe import hwm, reset_hwm, rss  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    nvme_dir, budget = args[0], int(args[1])
    width = int(args[2]) if len(args) > 2 else 512
    layers = int(args[3]) if len(args) > 3 else 16
    torch.set_num_threads(1)
    logging.getLogger("tierrt").setLevel(logging.ERROR)  # the placing-again warning is expected
    import models

    import tierrt

    if "--close-and-start" in sys.argv:
        from tierrt.relocation import NoRoomToPlaceAgain
        from tierrt.runtime import Runtime

        def no_room(self) -> None:
            raise NoRoomToPlaceAgain("streaming turned off by the probe")

        Runtime._relocate = no_room

    model = models.llama(layers=layers, width=width)
    model_bytes = models.model_bytes(model)
    data = models.token_batches(2)
    with tierrt.offload(model, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)]) as rt:
        loss = models.lm_loss(model, data[0])  # a first step's forward and backward, no optimizer
        loss.backward()
        del loss
        model.zero_grad()
        largest = max(ks.nbytes for bs in rt.blocks for kind, ks in bs.kinds.items() if kind != "grad")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # noted: placed at the next zero_grad()
        before = rss()
        reset_hwm()
        model.zero_grad()  # the safe point: placing again
        peak = hwm()
        placed = rt.optimizer is opt and rt.blockwise is not None and rt.blockwise.updater.state_in_tiers
        models.lm_loss(model, data[1]).backward()
        opt.step()
        opt.zero_grad()
    out = {
        "model_bytes": model_bytes,
        "largest_block": largest,
        "budget": budget,
        "before": before,
        "peak": peak,
        "placed_with_state_in_tiers": placed,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
