"""Architectures from transformers beyond GPT-2 and Llama, trained through tierrt at a DRAM budget
below the model: losses, weights and greedy generations equal the plain run's bit for bit.

Each brings a shape the hooks must handle: two layer lists and a relative position bias computed
in the first layer only (T5), a mixture of experts whose experts are called data-dependently and
some not at all (Mixtral), post-norm encoders with token-type embeddings and an MLM head tied to the
input embedding (BERT), an encoder-decoder with a shared embedding (BART), tied embeddings in a
grouped-query decoder (Qwen2), and patch embeddings with a CLS token (ViT).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_offload_numerics import streaming_budget

import tierrt

transformers = pytest.importorskip("transformers")
VOCAB = 512


def _configs() -> dict:
    tf = transformers
    small = dict(num_attention_heads=4)
    return {
        "t5": (
            tf.T5Config(
                vocab_size=VOCAB, d_model=64, d_ff=128, num_layers=3, num_heads=4, d_kv=16,
                decoder_start_token_id=0, pad_token_id=0,
            ),
            tf.AutoModelForSeq2SeqLM,
        ),
        "mixtral": (
            tf.MixtralConfig(
                vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **small,
            ),
            tf.AutoModelForCausalLM,
        ),
        "bert": (
            tf.BertConfig(
                vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, **small
            ),
            tf.AutoModelForMaskedLM,
        ),
        "bart": (
            tf.BartConfig(
                vocab_size=VOCAB, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2,
                decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            ),
            tf.AutoModelForSeq2SeqLM,
        ),
        "qwen2_tied": (
            tf.Qwen2Config(
                vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_key_value_heads=2, tie_word_embeddings=True, **small,
            ),
            tf.AutoModelForCausalLM,
        ),
        "vit": (
            tf.ViTConfig(
                image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_labels=10, **small,
            ),
            tf.AutoModelForImageClassification,
        ),
    }  # fmt: skip


def _batch(kind: str, step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    if kind == "vit":
        return {
            "pixel_values": torch.randn(2, 3, 32, 32, generator=gen),
            "labels": torch.randint(0, 10, (2,)),
        }
    ids = torch.randint(0, VOCAB, (2, 16), generator=gen)
    if kind in ("t5", "bart"):
        return {"input_ids": ids, "labels": torch.randint(0, VOCAB, (2, 8), generator=gen)}
    return {"input_ids": ids, "labels": ids}


def _train(kind: str, model, opt, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(123)  # the same dropout masks in both runs
    losses = []
    for step in range(steps):
        loss = model(**_batch(kind, step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())
    return losses


def _generate(kind: str, model) -> torch.Tensor | None:
    if kind in ("bert", "vit"):
        return None
    model.eval()
    with torch.no_grad():
        out = model.generate(_batch(kind, 9)["input_ids"][:1, :4], max_new_tokens=5, do_sample=False)
    model.train()
    return out


@pytest.mark.parametrize("kind", list(_configs()))
def test_architecture_trains_bitwise(kind, nvme_dir):
    transformers.logging.set_verbosity_error()
    config, auto = _configs()[kind]
    torch.manual_seed(0)
    extra = {} if kind == "vit" else {"attn_implementation": "eager"}
    reference = auto.from_config(config, **extra).train()
    ours = copy.deepcopy(reference)
    ref_losses = _train(kind, reference, torch.optim.AdamW(reference.parameters(), lr=1e-3))
    ref_generated = _generate(kind, reference)

    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    budget = streaming_budget(ours, extra_blocks=1)
    state = 4 * sum(p.numel() * p.element_size() for p in ours.parameters())  # weights, grads, Adam
    assert budget < 0.6 * state, (budget, state)  # the training state does not fit
    with tierrt.offload(ours, tiers=[tierrt.dram(budget), tierrt.nvme(nvme_dir)], optimizer=opt) as rt:
        losses = _train(kind, ours, opt)
        generated = _generate(kind, ours)
        assert rt.report().total.bytes_by_link["nvme->dram"] > 0

    for step, (a, b) in enumerate(zip(ref_losses, losses, strict=True)):
        assert torch.equal(a, b), f"{kind}: loss of step {step} differs: {a.item()} vs {b.item()}"
    for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{kind}: {name} differs"
    if ref_generated is not None:
        assert torch.equal(ref_generated, generated), kind
