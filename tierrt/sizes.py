"""Sizes as people write them: "64GiB", "1.5 GB", "512MiB", or plain integers of bytes.

Binary units (KiB, MiB, GiB, TiB) are powers of 1024; decimal units (KB, MB, GB, TB) are powers of
1000; "K", "M", "G", "T" alone are read as binary, as ``free -h`` and most ML tooling print them.

>>> parse_size("64GiB")
68719476736
>>> format_size(3 * 2**30)
'3GiB'
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from .errors import ConfigError, ConfigTypeError

__all__ = ["parse_size", "format_size", "Size", "MAX_SIZE"]

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


# The largest size tierrt takes: what a signed 64-bit byte count holds (8 EiB), the native layer's limit.
MAX_SIZE = (1 << 63) - 1


def parse_size(value: Size, *, what: str = "size") -> int:
    """Return ``value`` in bytes. Accepts a non-negative int or a string such as "64GiB".

    A plain number of bytes must be whole ("4096"; "1.5" is refused); with a unit, a fraction is
    read exactly and rounded down to whole bytes ("1.5GiB", "0.5KiB", "1e-3GiB"). Raises
    :class:`ConfigError` naming ``what`` for anything else (negative, fractional bytes, unknown
    unit, not finite, above :data:`MAX_SIZE`), and :class:`ConfigTypeError` for a value that is not
    a size at all (bool, None, bytes, ...).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigTypeError(f"{what}: expected a size such as '64GiB' or an int of bytes, got {value!r}")
    if isinstance(value, float):
        return _checked(_float_bytes(value, what), value, what)
    if isinstance(value, int):
        return _checked(value, value, what)
    return _checked(_string_bytes(value, what), value, what)


def _float_bytes(value: float, what: str) -> int:
    if not math.isfinite(value):
        raise ConfigError(f"{what}: expected a finite number of bytes, got {value!r}")
    if value != int(value):
        raise ConfigError(f"{what}: expected a whole number of bytes, got {value!r}")
    return int(value)


def _string_bytes(value: str, what: str) -> int:
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
    mantissa, _, exponent = number.lower().partition("e")
    if Fraction(mantissa) == 0:
        return 0
    if int(exponent or 0) > 40:  # far beyond MAX_SIZE whatever the unit: do not build a 10**400
        raise ConfigError(f"{what}: {value!r} is larger than {format_size(MAX_SIZE)}, the most tierrt takes")
    if int(exponent or 0) < -40:
        raise ConfigError(f"{what}: {value!r} is less than one byte")
    nbytes = Fraction(number) * factor
    if nbytes.denominator != 1 and factor == 1:
        raise ConfigError(
            f"{what}: {value!r} is not a whole number of bytes; give whole bytes or a unit ('1.5KiB')"
        )
    if 0 < nbytes < 1:
        raise ConfigError(f"{what}: {value!r} is less than one byte")
    return math.floor(nbytes)  # with a unit, a fraction of a byte rounds down


def _checked(nbytes: int, value: Size, what: str) -> int:
    if nbytes < 0:
        raise ConfigError(f"{what}: a size cannot be negative, got {value!r}")
    if nbytes > MAX_SIZE:
        raise ConfigError(f"{what}: {value!r} is larger than {format_size(MAX_SIZE)}, the most tierrt takes")
    return nbytes


def format_size(nbytes: int | float, round_up: bool = False) -> str:
    """Format bytes with binary units, trimming needless decimals: 1536 -> "1.5KiB".

    ``round_up``: round up to the two decimals shown, for a size that must be at least ``nbytes``
    when the text is given back (a budget an error says would fit): 20478670 -> "19.53MiB", which
    :func:`parse_size` reads as at least 20478670.
    """
    value = float(nbytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            if unit == "B":
                return f"{sign}{math.ceil(value) if round_up else int(value)}B"
            if round_up:
                value = math.ceil(round(value * 100, 6)) / 100
            text = f"{value:.2f}".rstrip("0").rstrip(".")
            return f"{sign}{text}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
