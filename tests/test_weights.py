"""Loading a checkpoint straight into the tiers (meta-device models) and saving trained values."""

from __future__ import annotations

import copy
import os

import models
import pytest
import torch
from test_offload_numerics import streaming_budget, train

import tierrt


def save_pretrained(model, directory) -> str:
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


def test_meta_model_loads_from_checkpoint_and_trains_like_plain(nvme_dir, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    reference = models.llama()
    ckpt = save_pretrained(reference, tmp_path / "ckpt")
    with accelerate.init_empty_weights():
        ours = models.llama()
    assert all(p.is_meta for p in ours.parameters())
    data = models.token_batches(3)
    ref_losses = train(reference, torch.optim.SGD(reference.parameters(), lr=0.05), data, models.lm_loss)
    opt = torch.optim.SGD(ours.parameters(), lr=0.05)
    with tierrt.offload(
        ours, tiers=[tierrt.dram(streaming_budget(ours)), tierrt.nvme(nvme_dir)], optimizer=opt, weights=ckpt
    ) as rt:
        losses = train(ours, opt, data, models.lm_loss)
        saved = rt.save(tmp_path / "trained.safetensors")
    for a, b in zip(ref_losses, losses):
        assert torch.equal(a, b)
    assert all(p.is_meta for p in ours.parameters())  # meta in, meta out: values went to the file
    from safetensors.torch import load_file

    values = load_file(saved)
    for name, p in reference.named_parameters():
        assert torch.equal(values[name], p), name


def test_saved_file_round_trips_into_a_cpu_model(nvme_dir, tmp_path):
    model = models.gpt2()
    expected = copy.deepcopy(model)
    with tierrt.offload(model, tiers=[tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)]) as rt:
        path = rt.save(tmp_path / "m.safetensors")
    fresh = models.gpt2(seed=5)
    with tierrt.offload(
        fresh, tiers=[tierrt.dram(streaming_budget(fresh)), tierrt.nvme(nvme_dir)], weights=path
    ):
        pass
    for (name, a), b in zip(expected.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


def test_meta_model_without_weights_is_refused(nvme_dir):
    with torch.device("meta"):
        model = models.mlp()
    with pytest.raises(tierrt.HookError, match="meta device") as info:
        with tierrt.offload(model, tiers=[tierrt.dram("8MiB"), tierrt.nvme(nvme_dir)]):
            pass
    assert "and no weights= checkpoint was given:" in str(info.value)


def test_corrupt_checkpoint(nvme_dir, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    model = models.mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(tierrt.CorruptStoreError, match="corrupt header"):
        with tierrt.offload(model, tiers=[tierrt.dram("8MiB"), tierrt.nvme(nvme_dir)], weights=bad):
            pass
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    assert os.listdir(nvme_dir) == []


def test_checkpoint_shape_mismatch(nvme_dir, tmp_path):
    small = models.mlp(width=64)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = models.mlp(width=128)
    with pytest.raises(tierrt.ConfigError, match="shape"):
        with tierrt.offload(
            model, tiers=[tierrt.dram("8MiB"), tierrt.nvme(nvme_dir)], weights=tmp_path / "w.safetensors"
        ):
            pass


def test_init_trains_a_meta_model_never_built_in_memory(nvme_dir, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        model = models.llama()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = models.token_batches(8)
    with tierrt.offload(
        model, tiers=[tierrt.dram(streaming_budget(model)), tierrt.nvme(nvme_dir)], optimizer=opt, init=True
    ) as rt:
        losses = [train(model, opt, data[:1], models.lm_loss)[0] for _ in range(8)]
        saved = rt.save(tmp_path / "init.safetensors")
    assert losses[-1] < losses[0]  # it learns (the same batch, repeatedly)
    from safetensors.torch import load_file

    values = load_file(saved)
    weight = values["model.layers.0.mlp.up_proj.weight"]
    assert 0.005 < weight.std().item() < 0.1  # the model's own initializer (normal, std 0.02), trained a bit
    assert torch.count_nonzero(values["model.norm.weight"]) > 0
    assert all(p.is_meta for p in model.parameters())


def test_init_refuses_parameters_without_an_initializer(nvme_dir):
    class Bare(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.scale

    with torch.device("meta"):
        model = Bare()
    with pytest.raises(tierrt.HookError, match="reset_parameters"):
        with tierrt.offload(model, tiers=[tierrt.dram("4MiB"), tierrt.nvme(nvme_dir)], init=True):
            pass


def _sharded_gpt2(directory) -> tuple[object, str]:
    """A GPT-2 config and a checkpoint of it in several shards with transformers' index."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(cfg).save_pretrained(directory, max_shard_size="100KB")
    return cfg, str(directory)


def _empty_gpt2(cfg):
    from accelerate import init_empty_weights
    from transformers import GPT2LMHeadModel

    with init_empty_weights():
        return GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("damage", ["missing_shard", "index_not_json"])
def test_broken_sharded_checkpoint_is_a_tierrt_error(damage, nvme_dir, tmp_path):
    """A shard the index names but that is gone, or an index that is not JSON: a tierrt error
    naming the file (they were a raw FileNotFoundError / JSONDecodeError), nothing placed."""
    cfg, checkpoint = _sharded_gpt2(tmp_path / "ckpt")
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if damage == "missing_shard":
        shard = sorted(f for f in os.listdir(checkpoint) if f.endswith(".safetensors"))[-1]
        os.remove(os.path.join(checkpoint, shard))
        expected, match = tierrt.TierPathError, f"do not exist: {shard}"
    else:
        with open(index, "w") as handle:
            handle.write("{not json")
        expected, match = tierrt.CorruptStoreError, "is not a valid index"
    model = _empty_gpt2(cfg)
    with pytest.raises(expected, match=match):
        with tierrt.offload(model, tiers=[tierrt.dram("8MiB"), tierrt.nvme(nvme_dir)], weights=checkpoint):
            pass
    assert all(p.is_meta for p in model.parameters())
    assert os.listdir(nvme_dir) == []


def test_untied_head_of_an_empty_model_names_tie_weights(nvme_dir, tmp_path):
    """accelerate's init_empty_weights() leaves GPT-2's lm_head apart from the embedding it is tied
    to (from_pretrained ties them): the checkpoint stores the embedding only, and the error says to
    call model.tie_weights(); after it the model loads and trains."""
    cfg, checkpoint = _sharded_gpt2(tmp_path / "ckpt")
    model = _empty_gpt2(cfg)
    if model.lm_head.weight is model.transformer.wte.weight:
        pytest.skip("this transformers ties the weights under init_empty_weights already")
    tiers = [tierrt.dram("8MiB"), tierrt.nvme(nvme_dir)]
    with pytest.raises(tierrt.HookError, match=r"call model.tie_weights\(\) before tierrt.offload"):
        with tierrt.offload(model, tiers=tiers, weights=checkpoint):
            pass
    model.tie_weights()
    with tierrt.offload(model, tiers=tiers, weights=checkpoint):
        ids = torch.randint(0, 256, (1, 16))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
