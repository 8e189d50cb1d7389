"""``model.load_state_dict()`` inside the context.

Inside the context a parameter's ``.data`` is real only while its block is resident (otherwise a NaN
placeholder that cannot be copied into), and a block's pending optimizer update would overwrite
values copied into its weights. So torch must not copy into offloaded parameters. Instead:

- a load pre-hook on every module that owns offloaded parameters takes their entries out of the
  state dict once torch's own checks pass (a tensor, the parameter's shape; otherwise the entry stays
  and torch reports it as usual), and a post-hook keeps those keys out of ``missing_keys``. Torch
  loads everything else (buffers, parameters outside the offloaded model, extra state), applies the
  user's hooks and ``strict``, and returns or raises exactly as it would;
- ``nn.Module.load_state_dict`` itself is wrapped while a runtime is active: when the load covers
  offloaded parameters and succeeds, the values taken are written into the tiers, block by block.
  Pending optimizer updates are applied first (in torch the step they belong to came before the
  load), then each value goes into the block's weights, home and cached copies alike (into the fp32
  master weights under ``compute_dtype``, the compute-dtype weights derived from them), so the next
  forward, ``rt.value()``, ``state_dict()`` and leaving the context all see it. A tied parameter
  (several keys) gets the value of its last key, as torch's successive copies give it. Gradients and
  optimizer state are untouched, as in torch.

A load that fails (a size mismatch, missing or unexpected keys with ``strict=True``) writes no
offloaded parameter and puts the persistent buffers it loaded back (torch itself leaves what it had
copied before raising); an error while writing (no room, an I/O error) leaves the blocks written
before it loaded. ``assign=True`` raises :class:`~tierrt.HookError` before loading anything:
it would replace the parameter objects tierrt holds. A load that does not go through
``nn.Module.load_state_dict`` (a direct ``_load_from_state_dict`` call) writes each module's values
as it reaches them.

``torch.optim.Optimizer.load_state_dict`` is wrapped too, for optimizers whose state torch keeps
(stepped block by block; one not passed to ``offload()`` and not adopted yet, as a ``Trainer``
resuming from a checkpoint loads it before its first step): torch casts the loaded state to each
parameter's dtype and device, and an offloaded parameter shows those of its compute copy (bf16 under
``compute_dtype``, the GPU), while its updates step the master weights in DRAM. During the load such
a parameter shows the dtype and device its updates use, so the state gets them, rounded as torch
rounds it for a plain model.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import HookError, TierCapacityError, restated
from .patching import AttributePatch
from .sizes import format_size

if TYPE_CHECKING:
    from tierrt.scheduler.pipeline import Pipeline

    from .runtime import Runtime
    from .store import BlockState

__all__ = ["LoadPatch", "StateDictLoader"]

_ORIGINAL = nn.Module.load_state_dict
_ORIGINAL_OPTIMIZER = torch.optim.Optimizer.load_state_dict

_ASSIGN = (
    "load_state_dict(assign=True) inside tierrt.offload() would replace the offloaded parameters "
    "(tierrt and the optimizer hold the parameter objects); load with assign=False (the default): "
    "the values are written into the tiers"
)


class StateDictLoader:
    """Loads state dict entries of one runtime's offloaded parameters into its tiers."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = weakref.ref(runtime)
        self._slot_index: dict[int, tuple[BlockState, int]] = runtime._slot_index
        self._handles: list[Any] = []
        self._open = 0  # nesting depth of wrapped load_state_dict calls in progress
        self._taken: dict[int, list[str]] = {}  # id(module) -> keys taken out in its current visit
        # id(param) -> (block, slot, value): what the load in progress writes when it succeeds
        self._staged: dict[int, tuple[BlockState, int, torch.Tensor]] = {}

    # ---- installation ----------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        """Hook every module of ``model`` that owns offloaded parameters itself."""
        loader = weakref.ref(self)

        def pre_hook(
            module: nn.Module,
            state_dict: dict[str, Any],
            prefix: str,
            metadata: dict[str, Any],
            strict: bool,
            missing_keys: list[str],
            unexpected_keys: list[str],
            error_msgs: list[str],
        ) -> None:
            owner = loader()
            if owner is not None:
                owner._take(module, state_dict, prefix, metadata, error_msgs)

        def post_hook(module: nn.Module, incompatible: Any) -> None:
            owner = loader()
            if owner is not None:
                owner._forget_taken(module, incompatible.missing_keys)

        for module in model.modules():
            if not any(id(p) in self._slot_index for p in module._parameters.values() if p is not None):
                continue
            self._handles.append(module._register_load_state_dict_pre_hook(pre_hook, with_module=True))
            handle = module.register_load_state_dict_post_hook(post_hook)
            # first among the module's post-hooks, so that the user's see torch's usual missing_keys
            module._load_state_dict_post_hooks.move_to_end(handle.id, last=False)
            self._handles.append(handle)

    def handle_ids(self) -> set[int]:
        """The ids of the load hooks (keys in the modules' hook dicts)."""
        return {handle.id for handle in self._handles}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._staged.clear()
        self._taken.clear()

    def holds(self, module: nn.Module) -> bool:
        """Whether ``module`` (or a module inside it) has parameters this loader's runtime offloads."""
        return any(id(p) in self._slot_index for p in module.parameters())

    @contextlib.contextmanager
    def as_stepped(self, params: list[torch.Tensor]) -> Iterator[None]:
        """For the time of the ``with``: the offloaded parameters among ``params`` that train (have
        a gradient buffer) are placeholders of the dtype their updates step them in (the master
        weights' when the block has them) on the CPU, where those updates run."""
        runtime = self._runtime()
        if runtime is None or not runtime.active:
            yield
            return
        placeholders = runtime.pipeline.placeholders
        cpu = torch.device("cpu")
        saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for p in params:
            entry = self._slot_index.get(id(p))
            if entry is None or id(p) in saved or not entry[0].trains(entry[1]):
                continue
            saved[id(p)] = (p, p.data)
            p.data = placeholders.get(p.shape, _stepped_dtype(*entry), cpu)
        try:
            yield
        finally:
            for p, data in saved.values():
                p.data = data

    # ---- one load --------------------------------------------------------------------------------
    def begin(self) -> None:
        """A wrapped ``load_state_dict`` starts: stage values until :meth:`end`."""
        self._open += 1

    def end(self, commit: bool) -> None:
        """The outermost wrapped ``load_state_dict`` ended: write the staged values if it succeeded,
        else drop them."""
        self._open -= 1
        if self._open:
            return
        staged, self._staged = self._staged, {}
        self._taken.clear()
        if commit:
            self._write(staged)

    def _take(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any, errors: list[str]
    ) -> None:
        """Load pre-hook: take the entries of ``module``'s offloaded parameters out of ``state_dict``
        (torch would copy them into placeholders) and stage them."""
        if metadata.get("assign_to_params_buffers"):
            raise HookError(_ASSIGN)
        taken = self._taken.setdefault(id(module), [])
        for name, param in module._parameters.items():
            key = prefix + name
            if param is None or id(param) not in self._slot_index or key not in state_dict:
                continue
            value = _checked_value(param, state_dict[key])
            if value is None:
                continue  # not a tensor, or another shape: torch reports it
            value = _real(value)
            del state_dict[key]
            taken.append(key)
            if value.is_meta:
                errors.append(
                    f'While copying the parameter named "{key}", whose dimensions in the model are '
                    f"{param.size()} and whose dimensions in the checkpoint are {value.size()}, an "
                    f"exception occurred : {('Cannot copy out of meta tensor; no data!',)}."
                )
                continue
            bs, slot_index = self._slot_index[id(param)]
            self._check_not_in_use(bs, key)
            self._staged[id(param)] = (bs, slot_index, value)
        if not self._open:  # not through nn.Module.load_state_dict: write as torch copies, now
            staged, self._staged = self._staged, {}
            self._write(staged)

    def _forget_taken(self, module: nn.Module, missing_keys: list[str]) -> None:
        """Load post-hook: the keys taken from ``module`` were loaded, not missing."""
        for key in self._taken.pop(id(module), []):
            if key in missing_keys:
                missing_keys.remove(key)

    def _check_not_in_use(self, bs: BlockState, key: str) -> None:
        """With a GPU, a block in use by a forward or backward computes on its GPU copy, which a
        load could not replace under it: refuse, before torch loads anything."""
        runtime = self._runtime()
        if runtime is None or runtime.pipeline.compute == "dram" or bs.refcount == 0:
            return
        raise HookError(
            f"load_state_dict() sets {key} while its block {bs.name} is in use on "
            f"{runtime.pipeline.compute} (inside a forward or backward); load between steps"
        )

    def _write(self, staged: dict[int, tuple[BlockState, int, torch.Tensor]]) -> None:
        """Write staged values into the tiers, after every pending optimizer update."""
        runtime = self._runtime()
        if not staged or runtime is None or not runtime.active:
            return
        if runtime.blockwise is not None:
            runtime.blockwise.finish()
        by_block: dict[int, tuple[BlockState, dict[int, torch.Tensor]]] = {}
        for bs, slot_index, value in staged.values():
            by_block.setdefault(bs.index, (bs, {}))[1][slot_index] = value
        pipeline = runtime.pipeline
        on_disk = [by_block[i] for i in sorted(by_block) if _homes(by_block[i][0]) == {"nvme"}]
        in_memory = [by_block[i] for i in sorted(by_block) if _homes(by_block[i][0]) != {"nvme"}]
        _LoadTransaction(pipeline, [bs for bs, _ in on_disk]).write(on_disk)
        for bs, values in in_memory:  # no I/O: written once every write to the disk has landed
            pipeline.write_values(bs, values)
        pipeline.drain()


def _homes(bs: BlockState) -> set[str]:
    """Where the kinds a load writes (master weights, weights) of ``bs`` live."""
    return {bs.kinds[kind].home for kind in _LOADED_KINDS if kind in bs.kinds}


_LOADED_KINDS = ("master", "weight")


class _LoadTransaction:
    """Writes loaded values into blocks homed on NVMe all or nothing.

    Each block's new values go to new extents (copy-on-write); the extents holding the previous
    values are kept, as in an optimizer step's transaction, until every write has landed. A failure
    on the way (an I/O error, no room to stage a block in DRAM) puts every block written so far
    back to its previous values and raises; room for the new extents is checked before anything
    is written."""

    def __init__(self, pipeline: Pipeline, blocks: list[BlockState]) -> None:
        self.pipeline = pipeline
        self.kinds = [bs.kinds[kind] for bs in blocks for kind in _LOADED_KINDS if kind in bs.kinds]
        self.blocks = blocks

    def write(self, work: list[tuple[BlockState, dict[int, torch.Tensor]]]) -> None:
        if not work:
            return
        pipeline = self.pipeline
        store = pipeline.store
        assert store.nvme is not None
        need = sum(ks.nbytes for ks in self.kinds)
        free = int(store.nvme.allocator.stats()["free"])
        if need > free:
            raise TierCapacityError(
                f"load_state_dict() writes {format_size(need)} to the nvme tier copy-on-write (the "
                f"previous values are kept until the load is complete) but only {format_size(free)} is "
                "free; nothing was loaded. Give the nvme tier more room, or load before "
                "tierrt.offload()",
                tier="nvme",
                requested=need,
                free=free,
            )
        pipeline.drain()  # earlier writes land under the rules they were started with
        saved_handler = pipeline.on_write_error
        pipeline.on_write_error = lambda error: error  # a failed write is raised, and undone below
        for ks in self.kinds:
            ks.in_step = True
        written: list[BlockState] = []
        try:
            for bs, values in work:
                pipeline.write_values(bs, values)  # changes nothing when it raises
                written.append(bs)
            pipeline.drain()
        except BaseException as error:
            self._roll_back(written)
            raise _rolled_back(error) from error
        finally:
            pipeline.on_write_error = saved_handler
        for ks in self.kinds:
            store.commit_kind(ks)

    def _roll_back(self, written: list[BlockState]) -> None:
        pipeline = self.pipeline
        try:
            pipeline.drain()
        except BaseException:  # noqa: BLE001 - the first error is the one reported
            pass
        for ks in self.kinds:
            ks.in_step = False  # (rollback_kind below clears it again for the blocks written)
        for bs in written:
            if bs.attached:
                pipeline.detach(bs)  # it views the DRAM copy that goes now
            for kind in _LOADED_KINDS:
                ks = bs.kinds.get(kind)
                if ks is None:
                    continue
                if ks.gpu is not None and pipeline.store.gpu is not None:
                    pipeline.store.gpu.release(ks.nbytes)
                    ks.gpu = None
                pipeline.store.rollback_kind(ks)
                ks.version += 1


def _rolled_back(error: BaseException) -> BaseException:
    message = (
        f"load_state_dict() failed while writing into the tiers ({error}); nothing was loaded: every "
        "offloaded parameter keeps its previous value"
    )
    told = restated(error, message)
    return told if told is not error else HookError(message)


def _stepped_dtype(bs: BlockState, slot_index: int) -> torch.dtype:
    """The dtype an update steps the parameter in: its master weights' if the block has them."""
    layout = bs.kinds["master" if "master" in bs.kinds else "weight"].layout
    position = layout.position(slot_index)
    assert position is not None
    return layout.dtypes[position]


def _real(value: torch.Tensor) -> torch.Tensor:
    """``value``, or a copy of its current value when it is itself an offloaded parameter (e.g.
    ``model.load_state_dict(dict(model.named_parameters()))``): its ``.data`` may be a placeholder,
    or change before the staged values are written."""
    for runtime in LoadPatch.active:
        if runtime.owns(value):
            return runtime.value(value)
    return value


def _checked_value(param: nn.Parameter, value: Any) -> torch.Tensor | None:
    """``value`` as torch would copy it into ``param``, or None when torch's own checks refuse it
    (not a tensor, another shape), so that torch reports it with its usual message."""
    if not torch.overrides.is_tensor_like(value):
        return None
    if param.dim() == 0 and value.dim() == 1 and value.shape[0] == 1:
        value = value[0]  # torch's backward compatibility: a 1-element vector into a scalar
    if value.shape != param.shape:
        return None
    return value


@functools.wraps(_ORIGINAL)
def load_state_dict(
    self: nn.Module, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
) -> Any:
    loaders = [
        loader
        for runtime in LoadPatch.active
        if (loader := runtime.loader) is not None and loader.holds(self)
    ]
    if not loaders:
        return _ORIGINAL(self, state_dict, strict=strict, assign=assign)
    if assign:
        raise HookError(_ASSIGN)
    buffers = _persistent_buffers(self)
    for loader in loaders:
        loader.begin()
    try:
        result = _ORIGINAL(self, state_dict, strict=strict, assign=assign)
    except BaseException:
        _put_back(buffers)
        for loader in loaders:
            loader.end(commit=False)
        raise
    _commit(loaders)
    return result


def _commit(loaders: list[StateDictLoader]) -> None:
    """End the load for every loader (each writes its values), raising the first failure after."""
    first: BaseException | None = None
    for loader in loaders:
        try:
            loader.end(commit=True)
        except BaseException as exc:  # noqa: BLE001 - the others still end their load
            first = first or exc
    if first is not None:
        raise first


@functools.wraps(_ORIGINAL_OPTIMIZER)
def optimizer_load_state_dict(self: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    params = [p for group in self.param_groups for p in group["params"]]
    with contextlib.ExitStack() as stack:
        for runtime in list(LoadPatch.active):
            loader = runtime.loader
            if loader is not None:
                stack.enter_context(loader.as_stepped(params))
        _ORIGINAL_OPTIMIZER(self, state_dict)


Saved = list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]


def _persistent_buffers(root: nn.Module) -> Saved:
    """(module, name, buffer, copy of its value) of every persistent buffer a load may change."""
    saved = []
    for module in root.modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                saved.append((module, name, buf, buf.detach().clone()))
    return saved


def _put_back(saved: Saved) -> None:
    """Give the buffers of a failed load their values from before it."""
    with torch.no_grad():
        for module, name, buf, value in saved:
            module._buffers[name] = buf
            buf.copy_(value)


# nn.Module.load_state_dict and torch.optim.Optimizer.load_state_dict, wrapped while a runtime is
# active (see the module docstring)
LoadPatch = AttributePatch(
    (nn.Module, "load_state_dict", load_state_dict),
    (torch.optim.Optimizer, "load_state_dict", optimizer_load_state_dict),
)
