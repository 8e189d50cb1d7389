"""Model weights in safetensors files, read and written one tensor at a time.

A model too large for RAM is built without memory (parameters on the meta device, e.g. under
``accelerate.init_empty_weights()``) and offloaded with ``weights=`` pointing at its checkpoint; each
tensor is then read straight into the block buffer it belongs to, so the model is never whole in
memory. ``Runtime.save(path)`` writes the trained values back the same way.

Accepted sources: a ``.safetensors`` file, a directory with ``model.safetensors`` or sharded files
listed in ``model.safetensors.index.json`` (what ``save_pretrained`` writes), or a directory of
``*.safetensors`` files.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .atomic import atomic_file
from .errors import ConfigError, CorruptStoreError, TierPathError

__all__ = ["TensorEntry", "SafetensorsIndex", "write_safetensors"]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: file, byte range, dtype and shape."""

    name: str
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int


class SafetensorsIndex:
    """Every tensor of a checkpoint, without reading any tensor data."""

    def __init__(self, source: str | os.PathLike) -> None:
        source = os.fspath(source)
        self.source = source
        self.entries: dict[str, TensorEntry] = {}
        for path in self._files(source):
            self._read_header(path)

    @staticmethod
    def _files(source: str) -> list[str]:
        if not os.path.exists(source):
            raise TierPathError(f"weights: {source} does not exist", path=source)
        if os.path.isfile(source):
            return [source]
        index = os.path.join(source, "model.safetensors.index.json")
        if os.path.exists(index):
            return SafetensorsIndex._shards(source, index)
        single = os.path.join(source, "model.safetensors")
        if os.path.exists(single):
            return [single]
        files = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(".safetensors"))
        if not files:
            raise TierPathError(f"weights: no .safetensors files in {source}", path=source)
        return files

    @staticmethod
    def _shards(source: str, index: str) -> list[str]:
        """The shard files a transformers index json names (each checked to exist)."""
        try:
            with open(index) as handle:
                weight_map = json.load(handle).get("weight_map", {})
        except (ValueError, AttributeError) as exc:  # not JSON, or not an object
            raise CorruptStoreError(f"weights: {index} is not a valid index: {exc}", path=index) from None
        except OSError as exc:
            raise TierPathError(
                f"weights: cannot read {index}: {exc.strerror or exc}", path=index, errno=exc.errno
            ) from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CorruptStoreError(f"weights: {index} has no valid weight_map", path=index)
        files = [os.path.join(source, f) for f in sorted(set(weight_map.values()))]
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise TierPathError(
                f"weights: {index} names {len(absent)} shard file(s) that do not exist: "
                f"{', '.join(os.path.basename(f) for f in absent[:3])}{' ...' if len(absent) > 3 else ''}",
                path=absent[0],
            )
        return files

    def _read_header(self, path: str) -> None:
        try:
            size = os.path.getsize(path)
            handle = open(path, "rb")  # noqa: SIM115 - closed by the with-block below
        except OSError as exc:
            raise TierPathError(
                f"weights: cannot read {path}: {exc.strerror or exc}", path=path, errno=exc.errno
            ) from None
        with handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise CorruptStoreError(f"weights: {path} is too short to be a safetensors file", path=path)
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CorruptStoreError(
                    f"weights: {path} has a corrupt header length {header_len}", path=path
                )
            try:
                header = json.loads(handle.read(header_len))
            except ValueError as exc:
                raise CorruptStoreError(f"weights: {path} has a corrupt header: {exc}", path=path) from None
        base = 8 + header_len
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(meta.get("dtype"))
            if dtype is None:
                raise CorruptStoreError(
                    f"weights: {name} in {path} has unsupported dtype {meta.get('dtype')}", path=path
                )
            begin, end = meta["data_offsets"]
            shape = tuple(int(d) for d in meta["shape"])
            numel = int(np.prod(shape)) if shape else 1
            if end - begin != numel * dtype.itemsize or base + end > size:
                raise CorruptStoreError(f"weights: {name} in {path} has a corrupt byte range", path=path)
            self.entries[name] = TensorEntry(name, path, dtype, shape, base + begin, end - begin)

    def find(self, names: Iterable[str]) -> TensorEntry | None:
        """The first of ``names`` (a parameter's aliases) present in the checkpoint."""
        for name in names:
            entry = self.entries.get(name)
            if entry is not None:
                return entry
        return None

    def read_into(self, entry: TensorEntry, dest: torch.Tensor) -> None:
        """Read ``entry`` into the CPU tensor ``dest`` (same shape; converting the dtype if needed)."""
        if tuple(dest.shape) != entry.shape:
            raise ConfigError(
                f"weights: {entry.name} has shape {list(entry.shape)} in {entry.path} but the model's "
                f"parameter has shape {list(dest.shape)}"
            )
        if dest.dtype == entry.dtype and dest.is_contiguous():
            target = dest
        else:
            target = torch.empty(entry.shape, dtype=entry.dtype)
        buffer = target.view(torch.uint8).reshape(-1).numpy() if target.numel() else np.empty(0, np.uint8)
        with open(entry.path, "rb", buffering=0) as handle:
            done = 0
            view = memoryview(buffer)
            while done < entry.nbytes:
                n = os.preadv(handle.fileno(), [view[done:]], entry.start + done)
                if n <= 0:
                    raise CorruptStoreError(
                        f"weights: short read of {entry.name} at offset {entry.start + done} of {entry.path}",
                        path=entry.path,
                        offset=entry.start + done,
                    )
                done += n
        if target is not dest:
            dest.copy_(target)


def write_safetensors(
    path: str | os.PathLike, tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], produce: callable
) -> str:  # type: ignore[valid-type]
    """Write a safetensors file of the named tensors, calling ``produce(name)`` for each one's value in
    order, so only one tensor is in memory at a time. Atomic: written to a temporary name, fsynced,
    then renamed; a path that cannot be written raises :class:`TierPathError` (path, errno) and
    leaves no partial file."""
    path = os.fspath(path)
    specs = list(tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt", "writer": "tierrt"}}
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in _NAMES:
            raise ConfigError(f"save: {name} has dtype {dtype}, which safetensors cannot store")
        nbytes = int(np.prod(shape)) * dtype.itemsize if shape else dtype.itemsize
        header[name] = {
            "dtype": _NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_file(path, "save") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, dtype, shape in specs:
            value = produce(name)
            if value.dtype != dtype or tuple(value.shape) != tuple(shape):
                raise ConfigError(f"save: {name} changed dtype or shape while being written")
            handle.write(value.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
    return path
