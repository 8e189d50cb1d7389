"""Sizes as people write them: "64GiB", "1.5 GB", "512MiB", or plain integers of bytes.

Binary units (KiB, MiB, GiB, TiB) are powers of 1024; decimal units (KB, MB, GB, TB) are powers of
1000; "K", "M", "G", "T" alone are read as binary, as ``free -h`` and most ML tooling print them.

>>> parse_size("64GiB")
68719476736
>>> format_size(3 * 2**30)
'3GiB'
"""

from __future__ import annotations

import re

from .errors import ConfigError

__all__ = ["parse_size", "format_size", "Size"]

Size = int | str

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
    "p": 1 << 50,
    "pib": 1 << 50,
    "pb": 10**15,
}

_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: Size, *, what: str = "size") -> int:
    """Return ``value`` in bytes. Accepts a non-negative int or a string such as "64GiB".

    Raises :class:`ConfigError` naming ``what`` for anything else (negative, unknown unit, bool,
    fractional bytes).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size such as '64GiB' or an int of bytes, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: a size cannot be negative, got {value}")
        return value
    if isinstance(value, float):
        if value < 0 or value != int(value):
            raise ConfigError(f"{what}: expected a whole number of bytes, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected a size such as '64GiB' or an int of bytes, got {value!r}")
    match = _PATTERN.match(value)
    if match is None and value.strip().startswith("-"):
        raise ConfigError(f"{what}: a size cannot be negative, got {value!r}")
    if match is None:
        raise ConfigError(f"{what}: cannot read {value!r} as a size (examples: '64GiB', '512MiB', 4096)")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ConfigError(
            f"{what}: unknown unit {unit!r} in {value!r} (use B, KiB, MiB, GiB, TiB or KB, MB, GB, TB)"
        )
    nbytes = float(number) * factor
    if nbytes != int(nbytes) and nbytes > 1:
        nbytes = int(nbytes)  # "1.5KB" style fractions round down to whole bytes
    return int(nbytes)


def format_size(nbytes: int | float) -> str:
    """Format bytes with binary units, trimming needless decimals: 1536 -> "1.5KiB"."""
    value = float(nbytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            if unit == "B":
                return f"{sign}{int(value)}B"
            text = f"{value:.2f}".rstrip("0").rstrip(".")
            return f"{sign}{text}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
