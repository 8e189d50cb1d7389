"""tierrt: a memory-tiering runtime for PyTorch training."""

from __future__ import annotations

from .errors import (
    ConfigError,
    CorruptStoreError,
    HookError,
    IOEngineError,
    TierCapacityError,
    TierPathError,
    TierrtError,
)
from .sizes import format_size, parse_size

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ConfigError",
    "CorruptStoreError",
    "HookError",
    "IOEngineError",
    "TierCapacityError",
    "TierPathError",
    "TierrtError",
    "format_size",
    "parse_size",
]
