"""A swap file damaged between steps: the error raised *during training* names what it hit.

Besides the swap file, offset and size, a CorruptStoreError from a failed integrity check says
which block, which of its parameters (a few, then "and N more") and which kind of state (weights,
gradients, an optimizer state) the damaged bytes held, and what to do about it; the same facts are
its ``block``, ``parameters`` and ``kind`` attributes.
"""

from __future__ import annotations

import pytest
import torch
from test_offload_numerics import streaming_budget
from test_swap_integrity import _damage
from torch import nn

import tierrt
from tierrt.errors import CorruptStoreError
from tierrt.store import ExtentOwner

WIDTH = 96


class SixParamLayers(nn.Module):
    """Every block (one layer) holds six parameters: Linear, LayerNorm, Linear."""

    def __init__(self, depth: int = 5) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH))
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_error_during_training_names_block_parameters_and_kind(nvme_dir):
    torch.manual_seed(0)
    model = SixParamLayers()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tiers = [tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]
    names = {
        f"layers.{i}": [n for n, _ in model.layers[i].named_parameters(prefix=f"layers.{i}")]
        for i in range(5)
    }
    with pytest.raises(CorruptStoreError):  # leaving reports the lost parameters (tested elsewhere)
        with tierrt.offload(model, tiers=tiers, optimizer=opt):
            for seed in range(2):
                _step(model, opt, seed)
            files = _damage(nvme_dir)
            with pytest.raises(CorruptStoreError) as step:
                _step(model, opt, 2)
            error = step.value
            message = str(error)
            # where: file, offset, size (as before)
            assert error.path in files and error.path in message and error.nbytes > 0
            assert f"offset {error.offset} of {error.path}" in message
            # whose: the block, its parameters (four, then how many more), the kind of state
            assert error.block in names and error.parameters == names[error.block]
            assert f"block {error.block} (" in message
            assert ", ".join(error.parameters[:4]) + " and 2 more" in message
            assert error.kind in ("weight", "grad", "exp_avg", "exp_avg_sq")
            assert ExtentOwner(error.block, error.kind, tuple(error.parameters)).kind_name in message
            # what to do
            assert "checkpoint" in message
            raise error


def test_every_extent_is_named_by_its_owner(nvme_dir):
    torch.manual_seed(0)
    model = SixParamLayers(depth=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tiers = [tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(model, tiers=tiers, optimizer=opt) as rt:
        _step(model, opt, 0)
        rt.pipeline.drain()
        seen = 0
        for bs in rt.blocks:
            for kind, ks in bs.kinds.items():
                if ks.extent is None:
                    continue
                owner = rt.store.extent_owner(ks.extent)
                slots = [bs.spec.slots[index].name for index in ks.layout.slots]
                assert owner == ExtentOwner(bs.name, kind, tuple(slots))
                seen += 1
        assert seen
        assert rt.store.extent_owner(rt.store.nvme.size + 4096) is None  # nobody's extent


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("weight", "the weights of block"),
        ("master", "the fp32 master weights of block"),
        ("grad", "the gradients of block"),
        ("exp_avg", "the exp_avg (optimizer state) of block"),
        ("momentum_buffer", "the momentum_buffer (optimizer state) of block"),
    ],
)
def test_owner_in_words(kind, words):
    owner = ExtentOwner("model.layers.3", kind, tuple(f"p{i}" for i in range(7)))
    assert owner.describe() == f"{words} model.layers.3 (p0, p1, p2, p3 and 3 more)"
    assert ExtentOwner("head", kind, ("head.weight",)).describe().endswith("head (head.weight)")
