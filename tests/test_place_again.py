"""Placing the model again streams through the tiers, block by block.

Placing again (an optimizer built inside the context placed at its first ``zero_grad()`` that
leaves no gradients, ``model.train()`` inside a context entered in eval mode) builds a new placement
and fills it from the current one a block at a time, so process memory holds about one block more
than the budgets, and it works for models whose values never were in memory (``weights=`` on the
meta device, ``restore=False``). When the nvme tier has no room for the new swap files beside the
old ones, the model is given back into memory and placed from there, where its values can come
back; otherwise it stays placed as it was. Every case compares with the plain torch run bit for bit.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import subprocess
import sys

import models
import pytest
import torch
from test_adopted_state_in_tiers import PLACED, state_in_tiers
from test_late_optimizer import loop, tiers
from test_offload_errors import tiny_mount
from test_optimizer_offload import assert_state_equal, make_opt

import tierrt

HERE = os.path.dirname(__file__)
STREAMED = "placed again"  # the runtime's INFO line for a placement streamed from the last one
FALLBACK = "placing it again from process memory instead"


def meta_model_and_checkpoint(reference, directory) -> tuple[torch.nn.Module, str]:
    """``reference`` saved with ``save_pretrained``, and the same architecture on the meta device."""
    accelerate = pytest.importorskip("accelerate")
    reference.save_pretrained(directory, safe_serialization=True)
    with accelerate.init_empty_weights():
        model = models.llama()
    assert all(p.is_meta for p in model.parameters())
    return model, str(directory)


def values_of(rt: tierrt.Runtime, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: rt.value(name) for name, _ in model.named_parameters()}


def assert_values(reference: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    for name, p in reference.named_parameters():
        assert torch.equal(values[name], p), name


def assert_losses(expected: list, got: list) -> None:
    assert len(expected) == len(got)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), f"step {step}: {a} vs {b}"


@pytest.mark.parametrize("adopted_first", [False, True], ids=["noted", "adopted_one_step"])
def test_meta_model_with_weights_gets_its_optimizer_state_in_the_tiers(
    adopted_first, nvme_dir, tmp_path, caplog
):
    """(1) A model on the meta device loaded with ``weights=``, its optimizer built inside (and, in
    one case, stepped once adopted, its state in memory): the ``zero_grad()`` safe point places the
    model again from the tiers (it could not be given back into memory), the optimizer's state
    lives in the tiers from then on, and the run equals plain torch's bit for bit."""
    reference = models.llama()
    ours, checkpoint = meta_model_and_checkpoint(reference, tmp_path / "ckpt")
    data = models.token_batches(4)
    ref_opt = make_opt("adamw", reference.parameters())
    ref_values = loop(reference, ref_opt, data)

    with caplog.at_level(logging.INFO, logger="tierrt"):
        with tierrt.offload(ours, tiers=tiers(reference, nvme_dir), weights=checkpoint) as rt:
            opt = make_opt("adamw", ours.parameters())
            values = []
            if adopted_first:
                values = loop(ours, opt, data[:1])  # adopted at step(), placed at its zero_grad()
            else:
                ours.zero_grad()
            assert rt.optimizer is opt and state_in_tiers(rt)
            values += loop(ours, opt, data[len(values) :])
            final = values_of(rt, ours)
            state = opt.state_dict()
    assert caplog.text.count(PLACED) == 1 and STREAMED in caplog.text and FALLBACK not in caplog.text
    assert_losses(ref_values, values)
    assert_values(reference, final)
    assert_state_equal(ref_opt.state_dict(), state)
    assert all(p.is_meta for p in ours.parameters())  # meta in, meta out


def test_restore_false_model_is_placed_again(nvme_dir, caplog):
    """``restore=False``: the values are not given back on leaving, so placing again could not go
    through memory; it streams, and training equals plain torch's."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    ref_opt = make_opt("adamw", reference.parameters())
    ref_values = loop(reference, ref_opt, data)
    with caplog.at_level(logging.INFO, logger="tierrt"):
        with tierrt.offload(ours, tiers=tiers(ours, nvme_dir), restore=False) as rt:
            opt = make_opt("adamw", ours.parameters())
            values = loop(ours, opt, data)
            assert rt.optimizer is opt and state_in_tiers(rt)
            final = values_of(rt, ours)
    assert STREAMED in caplog.text and FALLBACK not in caplog.text
    assert_losses(ref_values, values)
    assert_values(reference, final)


def test_meta_model_in_eval_mode_gets_room_for_gradients(nvme_dir, tmp_path, caplog):
    """A ``weights=`` model entered in eval mode (as from ``from_pretrained()``): ``model.train()``
    inside places it again with room for gradients, which it used to refuse (meta device)."""
    reference = models.llama()
    ours, checkpoint = meta_model_and_checkpoint(reference, tmp_path / "ckpt")
    ours.eval()
    data = models.token_batches(3)
    with torch.no_grad():
        expected_eval = reference.eval()(data[0]).logits
    reference.train()
    ref_opt = make_opt("adamw", reference.parameters())
    ref_values = loop(reference, ref_opt, data)
    with caplog.at_level(logging.INFO, logger="tierrt"):
        with tierrt.offload(ours, tiers=tiers(reference, nvme_dir), weights=checkpoint) as rt:
            with torch.no_grad():
                assert torch.equal(ours(data[0]).logits, expected_eval)
            ours.train()
            assert rt.grads is not None
            opt = make_opt("adamw", ours.parameters())
            values = loop(ours, opt, data)
            assert state_in_tiers(rt)
            final = values_of(rt, ours)
    assert caplog.text.count(STREAMED) == 2  # room for gradients, then the optimizer's state
    assert_losses(ref_values, values)
    assert_values(reference, final)


def run_probe(nvme_dir: str, budget: int, width: int, layers: int, *flags: str) -> dict:
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "place_again_probe.py"), nvme_dir, str(budget), str(width)]
        + [str(layers), *flags],
        # glibc then maps every large buffer on its own and unmaps it when freed: RSS follows live memory
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a subprocess that imports transformers: ~30 s on a loaded machine
def test_placing_again_holds_about_one_block_beyond_the_budget(nvme_dir, capsys):
    """(2) A model twice the DRAM budget, placed again with AdamW built inside: the peak RSS while
    placing again stays within the RSS before it (which holds the budget's arena) plus two blocks
    and a margin; going through memory would have added the whole model."""
    budget = 40 << 20
    out = run_probe(nvme_dir, budget, 384, 16)
    model, block = out["model_bytes"], out["largest_block"]
    margin = 16 << 20
    assert out["placed_with_state_in_tiers"]
    assert model > 2 * budget and model > 2 * block + margin + (32 << 20)  # the test can tell
    added = out["peak"] - out["before"]
    with capsys.disabled():
        print(
            f"\n[placing again] model {model / 2**20:.0f}MiB, budget {budget / 2**20:.0f}MiB, largest "
            f"block {block / 2**20:.1f}MiB: peak RSS {added / 2**20:.1f}MiB above the RSS before"
        )
    assert added <= 2 * block + margin, out


def test_no_room_for_a_second_copy_places_through_memory(tmp_path, caplog):
    """(3) The nvme tier (a small tmpfs) has room for one placement's swap files, not for a second
    beside them: placing again falls back to giving the model back into memory and placing it from
    there, and the run equals plain torch's."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    ref_opt = make_opt("adamw", reference.parameters())
    ref_values = loop(reference, ref_opt, data)
    with tiny_mount(str(tmp_path / "nvme"), "100M") as mount:
        with caplog.at_level(logging.INFO, logger="tierrt"):
            with tierrt.offload(ours, tiers=tiers(ours, mount)) as rt:
                assert rt.store.nvme.size * 2 > 100 << 20  # room for one copy only
                opt = make_opt("adamw", ours.parameters())
                ours.zero_grad()
                assert rt.optimizer is opt and state_in_tiers(rt)
                values = loop(ours, opt, data)
    assert FALLBACK in caplog.text and f"on the nvme tier at {mount}" in caplog.text  # path, sizes
    assert_losses(ref_values, values)
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


def test_no_room_for_a_second_copy_of_a_meta_model_keeps_it_placed(tmp_path, caplog):
    """(3) As above, for a model from the meta device, which cannot come back into memory: it stays
    placed as it was (a warning says why), the optimizer is adopted with its state in memory, and
    the run still equals plain torch's."""
    reference = models.llama()
    ours, checkpoint = meta_model_and_checkpoint(reference, tmp_path / "ckpt")
    data = models.token_batches(3)
    ref_opt = make_opt("adamw", reference.parameters())
    ref_values = loop(reference, ref_opt, data)
    with tiny_mount(str(tmp_path / "nvme"), "100M") as mount:
        with caplog.at_level(logging.WARNING, logger="tierrt"):
            with tierrt.offload(ours, tiers=tiers(reference, mount), weights=checkpoint) as rt:
                blocks_before = [bs.kinds.keys() for bs in rt.blocks]
                opt = make_opt("adamw", ours.parameters())
                ours.zero_grad()
                assert rt.active and rt.optimizer is None
                assert [bs.kinds.keys() for bs in rt.blocks] == blocks_before
                values = loop(ours, opt, data)
                assert rt.optimizer is opt and not rt.blockwise.updater.state_in_tiers
                final = values_of(rt, ours)
    assert "stays placed as it was" in caplog.text and "meta device" in caplog.text
    assert caplog.text.count(PLACED) == 1  # tried once
    assert_losses(ref_values, values)
    assert_values(reference, final)


def test_an_io_error_while_placing_again_keeps_the_previous_placement(nvme_dir, caplog):
    """Reading the current placement fails part way (EIO, after the memory tiers were handed to the
    new placement): the new one is freed, the old one gets its memory-tier values back from the
    scratch area and is used again; the optimizer is adopted with its state in memory, and the run
    equals plain torch's."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    ref_opt = make_opt("adamw", reference.parameters())
    ref_values = loop(reference, ref_opt, data)
    with caplog.at_level(logging.WARNING, logger="tierrt"):
        with tierrt.offload(ours, tiers=tiers(ours, nvme_dir)) as rt:
            store = rt.store
            assert any(ks.home == "dram" for bs in store.blocks for ks in bs.kinds.values())
            opt = make_opt("adamw", ours.parameters())
            rt.engine.inject_fault(op="read", errno=errno.EIO, count=1)
            ours.zero_grad()
            assert rt.active and rt.store is store and rt.optimizer is None
            values = loop(ours, opt, data)
            assert rt.optimizer is opt and not rt.blockwise.updater.state_in_tiers
    assert "stays placed as it was" in caplog.text and "Input/output error" in caplog.text
    assert_losses(ref_values, values)
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


def test_without_an_nvme_tier_the_memory_tiers_are_set_aside_in_memory(caplog):
    """Only a DRAM tier (the whole model fits its budget): what it holds is set aside in process
    memory while the new placement is filled in the same arena; the run equals plain torch's."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    ref_opt = make_opt("adamw", reference.parameters())
    ref_values = loop(reference, ref_opt, data)
    with caplog.at_level(logging.INFO, logger="tierrt"):
        with tierrt.offload(ours, tiers=[tierrt.dram("64MiB")]) as rt:
            arena = rt.store.dram.arena
            opt = make_opt("adamw", ours.parameters())
            values = loop(ours, opt, data)
            assert rt.optimizer is opt and state_in_tiers(rt) and rt.store.dram.arena is arena
    assert STREAMED in caplog.text and "set aside in process memory" in caplog.text
    assert_losses(ref_values, values)
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())


def test_an_arena_sized_for_the_first_placement_grows_for_the_second(nvme_dir, caplog):
    """A roomy DRAM budget: the arena is made for what the first placement needs (weights only,
    eval mode on entry), far below the budget; placing again with gradients and AdamW's state needs
    more, so the arena is made again at the new size (still under the budget), and training equals
    plain torch bit for bit."""
    reference = models.llama()
    ours = copy.deepcopy(reference)
    data = models.token_batches(3)
    ref_opt = make_opt("adamw", reference.parameters())
    ref_values = loop(reference, ref_opt, data)
    budget = 4 << 30
    ours.eval()
    with tierrt.offload(ours, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)]) as rt:
        first = rt.report().tiers["dram"]["reserved"]
        ours.train()
        opt = make_opt("adamw", ours.parameters())
        ours.zero_grad()
        assert state_in_tiers(rt)
        second = rt.report().tiers["dram"]["reserved"]
        assert first < second <= budget and rt.store.dram.arena.nbytes == second
        values = loop(ours, opt, data)
    assert_losses(ref_values, values)
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert_state_equal(ref_opt.state_dict(), opt.state_dict())
