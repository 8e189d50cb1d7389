"""tierrt: a memory-tiering runtime for PyTorch training.

Fine-tune models larger than your GPU (or your RAM) by placing their state across GPU memory, DRAM,
CXL memory and NVMe SSDs, moving blocks between tiers while the model computes::

    import tierrt
    with tierrt.offload(model, tiers=[tierrt.gpu(0), tierrt.dram("64GiB"), tierrt.nvme("/mnt/nvme0/x")],
                        optimizer=opt) as rt:
        ...  # your own training loop, unchanged
    print(rt.report())

See README.md for a tour.
"""

from __future__ import annotations

from .errors import (
    ConfigError,
    ConfigTypeError,
    CorruptStoreError,
    HookError,
    HyperparameterError,
    IOEngineError,
    TierCapacityError,
    TierPathError,
    TierrtError,
)
from .sizes import format_size, parse_size
from .tiers import cxl, dram, gpu, nvme, validate_tiers

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing tierrt stays cheap and does not need the extension
    if name in ("offload", "Runtime", "default_tiers", "runtime_of"):
        from . import runtime

        return getattr(runtime, name)
    if name == "Report":
        from .report import Report

        return Report
    if name in ("info", "format_info"):
        from . import sysinfo

        return getattr(sysinfo, name)
    raise AttributeError(f"module 'tierrt' has no attribute {name!r}")


__all__ = [
    "__version__",
    "offload",
    "Runtime",
    "Report",
    "default_tiers",
    "runtime_of",
    "info",
    "format_info",
    "gpu",
    "dram",
    "cxl",
    "nvme",
    "validate_tiers",
    "ConfigError",
    "ConfigTypeError",
    "CorruptStoreError",
    "HookError",
    "HyperparameterError",
    "IOEngineError",
    "TierCapacityError",
    "TierPathError",
    "TierrtError",
    "format_size",
    "parse_size",
]
