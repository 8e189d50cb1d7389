"""The GPU path's scheduling, checked on a machine without a GPU.

With a GPU tier the compute tier is separate from DRAM: weights are staged NVMe -> DRAM -> GPU,
pinned blocks keep a copy on the GPU, optimizer updates run on DRAM copies and make the GPU copy
stale. That logic is the same whatever memory backs the GPU tier, so these tests back it with host
memory (``GpuTierStore`` on a CPU device: copies are plain synchronous copies, no CUDA streams) and
check that the GPU path gives bit for bit the results of plain torch and of the DRAM path. They do
not check streams, events or speed: benchmarks/gpu_check.py does, on a real GPU.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
from test_late_optimizer import loop

import tierrt
from tierrt import runtime


@pytest.fixture
def gpu_tier_in_host_memory(monkeypatch):
    """Make ``tierrt.gpu(0)`` a compute tier backed by host memory."""
    monkeypatch.setattr(runtime, "gpu_device", lambda spec: torch.device("cpu"))


def _train(model, tiers, data, make_opt, **kwargs):
    opt = make_opt(model.parameters())
    with tierrt.offload(model, tiers=tiers, optimizer=opt, **kwargs) as rt:
        losses = loop(model, opt, data)
        report = rt.report()
    return losses, [p.detach().clone() for p in model.parameters()], report


def _plain(model, data, make_opt):
    losses = loop(model, make_opt(model.parameters()), data)
    return losses, [p.detach().clone() for p in model.parameters()]


def _sgd(params):
    return torch.optim.SGD(params, lr=1e-2, momentum=0.9)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _sgd_plain(params):
    return torch.optim.SGD(params, lr=1e-2)


@pytest.mark.parametrize(
    ("gpu_share", "dram_share", "make_opt"),
    [(1 / 3, 3.0, _sgd), (0.5, 1.0, _sgd), (4.0, 0.8, _sgd_plain)],
    ids=["gpu_evicts", "dram_stages_from_nvme", "all_pinned_small_dram"],
)
def test_gpu_path_equals_plain_torch(gpu_tier_in_host_memory, nvme_dir, gpu_share, dram_share, make_opt):
    """SGD through GPU, DRAM and NVMe tiers: losses and weights equal plain torch's.

    The budgets (shares of the model's weights) cover a GPU that evicts blocks, a DRAM tier that
    stages blocks homed on NVMe, and a GPU holding every block pinned while DRAM is smaller than the
    model: the pinned blocks' staging copies in DRAM must then give way."""
    reference = models.llama(layers=8, width=128)
    ours = copy.deepcopy(reference)
    data = models.token_batches(4)
    weights = models.model_bytes(reference)
    tiers = [
        tierrt.gpu(0, budget=int(weights * gpu_share)),
        tierrt.dram(int(weights * dram_share)),
        tierrt.nvme(nvme_dir),
    ]
    ref_losses, ref_params = _plain(reference, data, make_opt)
    losses, params, report = _train(ours, tiers, data, make_opt)
    assert _equal(losses, ref_losses)
    assert _equal(params, ref_params)
    assert report.total.bytes_by_link  # blocks really moved between the tiers


def test_gpu_path_bf16_master_weights_equals_dram_path(gpu_tier_in_host_memory, tmp_path):
    """AdamW with bf16 compute and fp32 master weights: the GPU path equals the DRAM path."""
    base = models.llama(layers=6)
    data = models.token_batches(3)
    weights = models.model_bytes(base)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dram_only = _train(
        copy.deepcopy(base),
        [tierrt.dram(weights * 2), tierrt.nvme(str(tmp_path / "a"))],
        data,
        _adamw,
        compute_dtype=torch.bfloat16,
    )
    with_gpu = _train(
        copy.deepcopy(base),
        [tierrt.gpu(0, budget=weights // 4), tierrt.dram(weights * 2), tierrt.nvme(str(tmp_path / "b"))],
        data,
        _adamw,
        compute_dtype=torch.bfloat16,
    )
    assert _equal(with_gpu[0], dram_only[0])
    assert _equal(with_gpu[1], dram_only[1])


def test_load_state_dict_of_a_block_in_use_on_the_gpu_is_refused(gpu_tier_in_host_memory, nvme_dir):
    """A block computing on its GPU copy cannot take loaded values under it: HookError, nothing
    loaded; the same load between steps works."""
    model = models.llama(layers=2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    weights = models.model_bytes(model)
    tiers = [tierrt.gpu(0, budget=weights * 2), tierrt.dram(weights * 4), tierrt.nvme(nvme_dir)]
    layer = model.model.layers[0]
    errors = []

    def load_inside(module, args):
        with pytest.raises(tierrt.HookError, match="in use on gpu0") as info:
            layer.load_state_dict(
                {k.removeprefix("model.layers.0."): v for k, v in saved.items() if "layers.0." in k}
            )
        errors.append(info.value)

    with tierrt.offload(model, tiers=tiers) as rt:
        handle = layer.self_attn.register_forward_pre_hook(load_inside)
        models.lm_loss(model, models.token_batches(1)[0])
        handle.remove()
        model.load_state_dict(saved)
        assert torch.equal(
            rt.value("model.layers.0.mlp.up_proj.weight"), saved["model.layers.0.mlp.up_proj.weight"]
        )
    assert len(errors) == 1
