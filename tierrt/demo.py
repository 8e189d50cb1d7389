"""``tierrt demo``: fine-tune a GPT-style model whose training state is several times the DRAM budget.

The model is a decoder-only transformer (pre-norm blocks, causal self-attention, GELU MLP, tied
input/output embeddings) over bytes, trained on the text of Python's own documentation (the
``pydoc_data.topics`` module that ships with every Python). Its tiers are ``dram(budget)`` and
``nvme(a temporary directory)``, with the GPU first when there is one. It prints the loss as it
goes down and tierrt's report at the end.

Run ``tierrt demo --help`` for the knobs; the defaults finish in a few minutes on a 2-core laptop.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["TinyGPT", "load_corpus", "main", "build_parser"]


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT-2-style decoder over a byte vocabulary (256 tokens)."""

    def __init__(self, layers: int = 8, width: int = 512, heads: int = 8, context: int = 256) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(256, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def load_corpus() -> torch.Tensor:
    """The text of Python's documentation topics as a tensor of bytes."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def batches(corpus: torch.Tensor, batch: int, seq: int, seed: int) -> Any:
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, corpus.numel() - seq - 1, (batch,), generator=gen)
        chunk = torch.stack([corpus[s : s + seq + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def _count(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _rate(text: str) -> float:
    """An argparse type: a finite number > 0 (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _size(text: str) -> int:
    """An argparse type: a size such as 96MiB (a malformed one is a one-line usage error)."""
    from .errors import ConfigError
    from .sizes import parse_size

    try:
        value = parse_size(text, what="a size")
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if value == 0:
        raise argparse.ArgumentTypeError("the DRAM budget must be above 0")
    return value


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="tierrt demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dram", default="96MiB", type=_size, help="DRAM budget (default: 96MiB)")
    parser.add_argument("--nvme", default=None, help="directory for swap files (default: a temporary one)")
    parser.add_argument("--steps", type=_count, default=40, help="training steps (default: 40)")
    parser.add_argument("--layers", type=_count, default=8, help="transformer blocks (default: 8)")
    parser.add_argument(
        "--width", type=_count, default=512, help="model width, a multiple of --heads (default: 512)"
    )
    parser.add_argument("--heads", type=_count, default=8, help="attention heads (default: 8)")
    parser.add_argument("--seq", type=_count, default=128, help="tokens per sequence (default: 128)")
    parser.add_argument("--batch", type=_count, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--lr", type=_rate, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the batches (default: 0)")
    parser.add_argument("--no-gpu", action="store_true", help="do not use a GPU even if there is one")
    parser.add_argument("--trace", default=None, help="write a Chrome/Perfetto trace to this file")
    return parser


def _check(args: argparse.Namespace, corpus: torch.Tensor) -> None:
    """What the parser cannot check alone; a ConfigError / TierPathError names the flag."""
    import tierrt

    if args.width % args.heads:
        raise tierrt.ConfigError(f"--width {args.width} is not a multiple of --heads {args.heads}")
    if args.seq >= corpus.numel() - 1:
        raise tierrt.ConfigError(f"--seq {args.seq} is longer than the corpus ({corpus.numel()} bytes)")
    if args.trace is not None:
        parent = os.path.dirname(os.path.abspath(args.trace))
        if not os.path.isdir(parent):
            raise tierrt.TierPathError(
                f"--trace {args.trace}: the directory {parent} does not exist", path=parent
            )


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """Run the demo. Exit status: 0 the loss went down, 1 it did not, 2 bad input (one line on
    stderr: a flag's value, a budget too small for the model, an unusable path)."""
    from .errors import ConfigError, TierCapacityError, TierPathError

    args = args or build_parser().parse_args(argv)
    try:
        with _terminated_as_exit():
            return _run(args)
    except (ConfigError, TierCapacityError, TierPathError) as error:
        print(f"tierrt demo: error: {error}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _terminated_as_exit() -> Iterator[None]:
    """SIGTERM (``timeout``, ``kill``) while the demo runs exits through Python (status 143), so the
    model is given back and the swap directory removed, as on Ctrl-C. Only on the main thread (the
    only one a signal handler can be set on); the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _swap_directory(parent: str | None) -> Iterator[str]:
    """Where the demo's swap files go: a temporary directory, under ``parent`` (``--nvme``) when
    given. tierrt.nvme() creates a directory that does not exist yet (and the levels above it) and
    removes what it created on leaving, so nothing the demo made is left behind."""
    if parent is None:
        with tempfile.TemporaryDirectory(prefix="tierrt-demo-") as swap:
            yield swap
        return
    yield os.path.join(parent, f"tierrt-demo-{os.getpid()}")


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    import tierrt

    corpus = load_corpus()
    _check(args, corpus)
    torch.manual_seed(args.seed)
    model = TinyGPT(args.layers, args.width, args.heads, context=max(args.seq, 16))
    params = sum(p.numel() for p in model.parameters())
    budget = args.dram if isinstance(args.dram, int) else tierrt.parse_size(args.dram, what="--dram")
    state = params * 4 * 4  # fp32 weights, gradients, Adam m and v
    use_gpu = torch.cuda.is_available() and not args.no_gpu
    print(
        f"tierrt demo: a {args.layers}-layer GPT ({params / 1e6:.1f}M parameters) on "
        f"{corpus.numel() / 1e6:.2f}MB of Python documentation"
    )
    print(
        f"  training state {tierrt.format_size(state)} = {state / budget:.1f}x the DRAM budget "
        f"{tierrt.format_size(budget)}; compute on {'the GPU' if use_gpu else 'the CPU'}"
    )
    with _swap_directory(args.nvme) as swap:
        tiers = ([tierrt.gpu(0)] if use_gpu else []) + [tierrt.dram(budget), tierrt.nvme(swap)]
        if use_gpu:
            model = model.cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / 5) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        )
        data = batches(corpus, args.batch, args.seq, args.seed)
        device = "cuda" if use_gpu else "cpu"
        first = last = None
        start = time.perf_counter()
        with tierrt.offload(model, tiers=tiers, optimizer=opt, progress=True) as rt:
            print(f"  placement: {rt.describe().splitlines()[0]}")
            bar = tqdm(range(args.steps), desc="training", unit="step")
            for step in bar:
                x, y = next(data)
                x, y = x.to(device), y.to(device)
                logits = model(x)
                loss = nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad()
                value = loss.item()
                first = value if first is None else first
                last = value
                bar.set_postfix(loss=f"{value:.3f}")
                if step % max(1, args.steps // 8) == 0 or step == args.steps - 1:
                    tqdm.write(f"  step {step:4d}  loss {value:.4f}")
            bar.close()
            report = rt.report()
            if args.trace:
                rt.trace(args.trace)
                print(f"  trace written to {args.trace}")
        elapsed = time.perf_counter() - start
    print(report)
    print(f"tierrt demo: loss {first:.3f} -> {last:.3f} in {args.steps} steps, {elapsed:.1f}s")
    return 0 if last is not None and first is not None and last < first else 1


if __name__ == "__main__":
    raise SystemExit(main())
