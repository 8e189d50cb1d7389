"""Partition of a model into Blocks: groups of parameters that move between tiers together.

By default every element of the model's layer lists (``nn.ModuleList``s holding most of the
parameters: the transformer layers) is one block, and every other module that directly owns
parameters (embeddings, final norm, head) is a block of its own. ``blocks=`` overrides this with a
list of modules or a predicate ``(qualified_name, module) -> bool``.

Hooks only run on modules that are called, so containers (``nn.ModuleList``, ``nn.ModuleDict``,
``nn.ParameterList``: no forward of their own) are looked through: a list of lists yields the inner
modules as blocks, a container block is hooked at the callable modules inside it, and parameters a
container holds directly are made resident by its nearest called ancestor (the model at the latest).

A block's parameters are packed back to back in one flat buffer per kind of state (weights,
gradients, optimizer states), each parameter at an aligned offset, so that one large transfer moves
the whole block and a parameter is a view into the buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError, HookError, TierCapacityError
from .sizes import format_size

__all__ = [
    "ParamSlot",
    "BlockSpec",
    "Partition",
    "partition_model",
    "check_separate_storage",
    "SLOT_ALIGN",
    "BUFFER_ALIGN",
]

SLOT_ALIGN = 256  # bytes between parameters inside a block buffer (SIMD and dtype views)
BUFFER_ALIGN = 4096  # every block buffer is a whole number of 4 KiB pages (O_DIRECT)

BlockSelector = Sequence[nn.Module] | Callable[[str, nn.Module], bool] | None


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass
class ParamSlot:
    """One parameter's place in its block."""

    name: str
    param: nn.Parameter
    shape: torch.Size
    dtype: torch.dtype
    numel: int
    index: int = 0  # position within the block

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class BlockSpec:
    """A block as partitioned: its name, root module and parameter slots."""

    index: int
    name: str
    root: nn.Module
    slots: list[ParamSlot] = field(default_factory=list)

    @property
    def trainable(self) -> list[ParamSlot]:
        return [s for s in self.slots if s.param.requires_grad]

    def layout(self, dtype: torch.dtype | None = None) -> tuple[list[int], int]:
        """Byte offset of every slot and the buffer size when every slot holds ``dtype`` (its own
        dtype when None). The size is a whole number of pages."""
        offsets: list[int] = []
        cursor = 0
        for slot in self.slots:
            itemsize = (dtype or slot.dtype).itemsize
            offsets.append(cursor)
            cursor = _align(cursor + slot.numel * itemsize, SLOT_ALIGN)
        return offsets, _align(max(cursor, 1), BUFFER_ALIGN)

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        return self.layout(dtype)[1]


@dataclass
class Partition:
    """The blocks of a model and which blocks each hooked module needs resident."""

    blocks: list[BlockSpec]
    # module -> indices of the blocks that must be resident while it runs
    hook_targets: list[tuple[nn.Module, list[int]]]
    block_of_param: dict[int, int]  # id(param) -> block index

    def largest_block(self, dtype: torch.dtype | None = None) -> BlockSpec:
        return max(self.blocks, key=lambda b: b.nbytes(dtype))

    def largest_acquisition(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the largest set of blocks that one hooked module needs at once."""
        sizes = [b.nbytes(dtype) for b in self.blocks]
        return max((sum(sizes[i] for i in set(needed)) for _, needed in self.hook_targets), default=0)


def _layer_lists(model: nn.Module, total: int) -> list[nn.ModuleList]:
    """Outermost ModuleLists of >= 2 parameterised children holding >= 5% of the parameters."""
    chosen: list[nn.ModuleList] = []
    chosen_ids: set[int] = set()
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            if id(module) in chosen_ids:  # inside a list already chosen (e.g. experts in a layer)
                continue
            children = [c for c in module if any(True for _ in c.parameters())]
            count = sum(p.numel() for p in _unique_params(module.parameters()))
            if len(children) >= 2 and total and count >= 0.05 * total:
                chosen.append(module)
                chosen_ids.update(id(m) for m in module.modules())
    return chosen


def _is_container(module: nn.Module) -> bool:
    """A module that is never called, only indexed (ModuleList, ModuleDict, ParameterList, ...): it
    has no forward of its own, so a hook on it would never run."""
    return type(module).forward is nn.Module.forward


def _callable_units(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``module`` itself if it can be called, else the callable modules inside it that hold
    parameters (containers are looked through, recursively)."""
    if not _is_container(module):
        return [(name, module)]
    units: list[tuple[str, nn.Module]] = []
    for child_name, child in module.named_children():
        if any(True for _ in child.parameters()):
            units.extend(_callable_units(f"{name}.{child_name}" if name else child_name, child))
    return units


def _callable_owner(name: str, named: dict[str, nn.Module]) -> nn.Module:
    """The nearest module at or above ``name`` that is called (the model itself at the latest): the
    one to hook for parameters held directly by a container (e.g. an ``nn.ParameterList``)."""
    while name and _is_container(named[name]):
        name = name.rpartition(".")[0]
    return named[name]


def _unique_params(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _select_roots(model: nn.Module, blocks: BlockSelector, total: int) -> list[tuple[str, nn.Module]]:
    names = {id(m): n for n, m in model.named_modules()}
    if blocks is None:
        roots = []
        for layer_list in _layer_lists(model, total):
            prefix = names[id(layer_list)]
            for i, child in enumerate(layer_list):
                if any(True for _ in child.parameters()):
                    # A nested list (layers grouped in stages) is looked through to its layers.
                    roots.extend(_callable_units(f"{prefix}.{i}" if prefix else str(i), child))
        return roots
    if callable(blocks) and not isinstance(blocks, nn.Module):
        roots = []
        covered: set[int] = set()
        for name, module in model.named_modules():
            if id(module) in covered:
                continue
            if blocks(name, module):
                roots.append((name, module))
                covered.update(id(m) for m in module.modules())
        return roots
    if isinstance(blocks, nn.Module):
        blocks = [blocks]
    roots = []
    for module in blocks:
        if not isinstance(module, nn.Module):
            raise ConfigError(f"blocks=: expected modules of the model or a predicate, got {module!r}")
        if id(module) not in names:
            raise ConfigError(f"blocks=: {type(module).__name__} is not a submodule of the model")
        roots.append((names[id(module)], module))
    return roots


def partition_model(
    model: nn.Module, blocks: BlockSelector = None, max_block_bytes: int | None = None
) -> Partition:
    """Split ``model``'s parameters into blocks (see the module docstring).

    ``max_block_bytes``: a block larger than this is split into its children (recursively), so a
    layer too large for the budget streams in parts; a single parameter larger than it raises
    :class:`~tierrt.TierCapacityError`-style :class:`ConfigError` naming the tensor.
    """
    params = _unique_params(model.parameters())
    if not params:
        raise HookError(f"{type(model).__name__} has no parameters: there is nothing to offload")
    total = sum(p.numel() for p in params)
    names = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        names.setdefault(id(p), name)

    roots = _select_roots(model, blocks, total)
    if max_block_bytes is not None:
        roots = _split_large(roots, max_block_bytes)

    assigned: dict[int, int] = {}
    specs: list[BlockSpec] = []
    hook_targets: list[tuple[nn.Module, list[int]]] = []

    def new_block(name: str, root: nn.Module, members: Iterable[nn.Parameter]) -> int | None:
        slots = []
        for p in members:
            if id(p) in assigned:
                continue
            assigned[id(p)] = len(specs)
            slots.append(ParamSlot(names[id(p)], p, p.shape, p.dtype, p.numel(), index=len(slots)))
        if not slots:
            return None
        specs.append(BlockSpec(len(specs), name or type(root).__name__, root, slots))
        return len(specs) - 1

    root_ids = set()
    for name, root in roots:
        new_block(name, root, root.parameters())
        root_ids.add(id(root))

    inside_roots: set[int] = set()
    for _, root in roots:
        inside_roots.update(id(m) for m in root.modules())

    # Every other module that directly owns parameters gets a block for those it owns first.
    rest_modules: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if id(module) in inside_roots:
            continue
        direct = list(module.parameters(recurse=False))
        if direct:
            new_block(name or type(module).__name__, module, direct)
            rest_modules.append((name, module))

    for p in params:  # defensive: a parameter reachable only through a removed duplicate path
        if id(p) not in assigned:
            raise HookError(f"parameter {names.get(id(p), '?')} could not be assigned to a block")

    # Hooks go on modules that are called: a container block root is hooked at the callable modules
    # inside it, and parameters held directly by a container at its nearest called ancestor.
    named = dict(model.named_modules())
    needed_by: dict[int, tuple[nn.Module, set[int]]] = {}

    def hook(module: nn.Module, blocks: Iterable[int]) -> None:
        needed_by.setdefault(id(module), (module, set()))[1].update(blocks)

    for name, root in roots:
        needed = {assigned[id(p)] for p in root.parameters()}
        for _, unit in _callable_units(name, root) or [(name, root)]:
            hook(unit, needed)
    for name, module in rest_modules:
        hook(_callable_owner(name, named), {assigned[id(p)] for p in module.parameters(recurse=False)})
    hook_targets.extend((module, sorted(needed)) for module, needed in needed_by.values())

    for spec in specs:
        for slot in spec.slots:
            if slot.param.is_sparse or slot.param.layout != torch.strided:
                raise HookError(
                    f"parameter {slot.name} is not a dense strided tensor; tierrt cannot offload it"
                )
            if slot.param.is_complex():
                raise HookError(f"parameter {slot.name} is complex; tierrt offloads real tensors only")
    if max_block_bytes is not None:
        for spec in specs:
            for slot in spec.slots:
                if slot.nbytes > max_block_bytes:
                    raise TierCapacityError(
                        f"parameter {slot.name} ({format_size(slot.nbytes)}) is larger than the largest "
                        f"block the budget allows ({format_size(max_block_bytes)}): a single tensor cannot "
                        "be split; raise the budget",
                        tensor=slot.name,
                        requested=slot.nbytes,
                    )
    return Partition(specs, hook_targets, assigned)


def _byte_range(tensor: torch.Tensor) -> tuple[tuple[torch.device, int], int, int] | None:
    """The storage ``tensor`` views and the bytes ``[start, end)`` of it that it can reach, or None
    for a tensor without memory (meta device, no elements)."""
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return None
    reach = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr()
    return (
        (tensor.device, tensor.untyped_storage().data_ptr()),
        start,
        start + (reach + 1) * tensor.element_size(),
    )


def _overlapping(tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, str]]:
    """Pairs of names whose tensors reach common bytes of one storage (by byte ranges: two strided
    views that interleave count as overlapping), each pair once, in the order of ``tensors``."""
    by_storage: dict[tuple[torch.device, int], list[tuple[int, int, int]]] = {}
    for order, (_, tensor) in enumerate(tensors):
        reach = _byte_range(tensor)
        if reach is not None:
            by_storage.setdefault(reach[0], []).append((reach[1], reach[2], order))
    pairs: set[tuple[int, int]] = set()
    for ranges in by_storage.values():
        ranges.sort()
        for i, (_, end, first) in enumerate(ranges):
            for start, _, second in ranges[i + 1 :]:
                if start >= end:
                    break
                pairs.add((min(first, second), max(first, second)))
    return [(tensors[a][0], tensors[b][0]) for a, b in sorted(pairs)]


def check_separate_storage(model: nn.Module) -> None:
    """Raise :class:`HookError` when two distinct parameters of ``model`` (or a buffer and a
    parameter) share memory: a parameter made as a view of another's storage
    (``nn.Parameter(base[:4])`` beside ``nn.Parameter(base)``), or a buffer viewing a parameter.

    tierrt gives every parameter its own slot in its block's buffer, so such sharing cannot be kept:
    training would update each copy on its own and silently diverge from torch. Tied weights (one
    Parameter object reached from two modules) are one parameter and pass. Call it before anything
    moves; it only reads the model."""
    params = _unique_params(model.parameters())
    names = {id(p): name for name, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    tensors: list[tuple[str, torch.Tensor]] = [(f"parameter {names[id(p)]}", p) for p in params]
    param_ids = {id(p) for p in params}
    tensors += [(f"buffer {n}", b) for n, b in model.named_buffers() if id(b) not in param_ids]
    pairs = [(a, b) for a, b in _overlapping(tensors) if a.startswith("parameter")]
    if not pairs:
        return
    first, second = pairs[0]
    more = f" (and {len(pairs) - 1} more such pairs)" if len(pairs) > 1 else ""
    if second.startswith("buffer"):
        advice = (
            f"store a copy in the buffer (.clone()), or compute it from {first} in forward; a buffer "
            "keeps its own memory while the parameter lives in the tiers"
        )
    else:
        advice = (
            "make them separate parameters (nn.Parameter(t.clone()) for each), or, if they are meant to "
            "be one weight, tie them as the same Parameter object (module.b = module.a)"
        )
    raise HookError(
        f"{first} and {second} share memory (views of one storage){more}: tierrt gives every "
        f"parameter memory of its own in the tiers, so the sharing would be lost and training would "
        f"silently diverge; {advice}. Nothing was moved",
        parameters=list(
            dict.fromkeys(n.split(" ", 1)[1] for p in pairs for n in p if n.startswith("parameter"))
        ),
        buffers=list(dict.fromkeys(n.split(" ", 1)[1] for p in pairs for n in p if n.startswith("buffer"))),
    )


def _split_large(roots: list[tuple[str, nn.Module]], max_block_bytes: int) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, root in roots:
        size = sum(p.numel() * p.element_size() for p in _unique_params(root.parameters()))
        children = [
            unit
            for n, c in root.named_children()
            if any(True for _ in c.parameters())
            for unit in _callable_units(f"{name}.{n}", c)
        ]
        if size > max_block_bytes and children:
            # The root's own direct parameters become a rest-block at the root; children split further.
            out.extend(_split_large(children, max_block_bytes))
        else:
            out.append((name, root))
    return out
