"""Small real models for the runtime tests, each built deterministically from a seed."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

VOCAB = 96
SEQ = 16


def gpt2(seed: int = 0, layers: int = 4, width: int = 64) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


def llama(
    seed: int = 0, layers: int = 4, width: int = 64, vocab: int = VOCAB, intermediate: int | None = None
) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=intermediate or 2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg)


def mlp(seed: int = 0, width: int = 128, depth: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class TiedLM(nn.Module):
    """Embedding and output projection share one weight (one storage)."""

    def __init__(self, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(self.norm(x))


def tied(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TiedLM()


class CheckpointedLM(TiedLM):
    """Each layer runs under torch.utils.checkpoint (recomputed in backward)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.head.weight = nn.Parameter(self.embed.weight.detach().clone())  # untied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = x + torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=self.reentrant)
        return self.head(self.norm(x))


def checkpointed(seed: int = 0, reentrant: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return CheckpointedLM(reentrant)


class SelfCheckpointingLayer(nn.Sequential):
    """A layer that checkpoints its own ``forward`` (as transformers' GradientCheckpointingLayer
    does, to keep module hooks outside the checkpoint): backward recomputes it without any hook."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)


def checkpointed_forward(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TiedLM()
    for i, layer in enumerate(model.layers):
        model.layers[i] = SelfCheckpointingLayer(*layer)
    return model


def llama_gradient_checkpointing(seed: int = 0) -> nn.Module:
    """transformers' own activation checkpointing (it checkpoints each layer's ``forward``)."""
    model = llama(seed)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def token_batches(count: int, batch: int = 2, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, SEQ), generator=gen) for _ in range(count)]


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def mlp_batches(count: int, seed: int = 1, width: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, width, generator=gen), torch.randint(0, 10, (8,), generator=gen))
        for _ in range(count)
    ]


def mlp_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in dict.fromkeys(model.parameters()))


def tiny_trainer(model: nn.Module, output_dir: str, optimizer=None, **arguments):
    """A transformers ``Trainer`` over six token sequences for 3 steps on the CPU (deterministic:
    seed 0, no workers, no saving), logging every step. ``optimizer`` is passed as
    ``optimizers=(optimizer, None)`` (None: the Trainer builds its own, ``arguments["optim"]``);
    other ``arguments`` override the ``TrainingArguments``. Returns ``(trainer, logs)``, ``logs``
    the list of ``(loss, grad_norm)`` logged."""
    import transformers

    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = token_batches(6, batch=1)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.ids[i][0], "labels": self.ids[i][0]}

    logs: list = []

    class Logs(transformers.TrainerCallback):
        def on_log(self, args, state, control, **kw):
            entry = kw.get("logs")
            if entry and "loss" in entry:
                logs.append((entry["loss"], entry.get("grad_norm")))

    settings = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        warmup_steps=1,
        max_grad_norm=1.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    settings.update(arguments)
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**settings),
        train_dataset=Tokens(),
        callbacks=[Logs()],
        optimizers=(optimizer, None),
    )
    return trainer, logs
