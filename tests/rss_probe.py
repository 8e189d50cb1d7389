"""Run in a subprocess by test_memory.py: train a model plainly or through tierrt and print memory
figures as JSON. Peak RSS is read from VmHWM after resetting it (echo 5 > /proc/self/clear_refs)."""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    mode, nvme_dir, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    width = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    torch.set_num_threads(1)
    import models

    import tierrt

    base = rss()  # torch and transformers imported, model not built
    model = models.llama(layers=8, width=width)
    model_bytes = models.model_bytes(model)
    data = models.token_batches(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    autocast = mode.endswith("-autocast")  # fp32 weights, bf16 compute under torch.autocast

    def loop() -> None:
        for ids in data:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = models.lm_loss(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad()

    out = {"model_bytes": model_bytes, "budget": budget, "base": base, "built": rss()}
    if mode.startswith("plain"):
        reset_hwm()
        loop()
        out.update(peak=hwm())
    else:
        with tierrt.offload(model, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)], optimizer=opt) as rt:
            out.update(entered=rss())
            reset_hwm()
            loop()
            out.update(peak=hwm())
            report = rt.report()
        out.update(streamed=report.total.bytes_by_link.get("nvme->dram", 0))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
