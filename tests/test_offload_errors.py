"""Bad input to tierrt.offload(): a clear tierrt error before anything moves, model untouched."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys

import models
import pytest
import torch
from torch import nn

import tierrt


def snapshot(model: nn.Module) -> list[tuple[str, int, torch.Tensor]]:
    return [(n, p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()]


def assert_untouched(model: nn.Module, before) -> None:
    after = snapshot(model)
    assert [n for n, _, _ in after] == [n for n, _, _ in before]
    for (name, ptr, value), (_, ptr2, value2) in zip(before, after):
        assert ptr == ptr2, f"{name} was moved"
        assert torch.equal(value, value2), f"{name} changed"


@contextlib.contextmanager
def tiny_mount(path: str, size: str = "1M"):
    os.makedirs(path, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "none", path], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=False)


@contextlib.contextmanager
def immutable_dir(path: str):
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["chattr", "+i", path], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (root ignores permission bits)")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", path], check=False)


def test_tiers_in_wrong_order(nvme_dir):
    model = models.mlp()
    before = snapshot(model)
    with pytest.raises(tierrt.ConfigError, match="fastest first"):
        tierrt.offload(model, tiers=[tierrt.nvme(nvme_dir), tierrt.dram("64MiB")])
    assert_untouched(model, before)


@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="needs a GPU index torch does not see")
def test_gpu_tier_torch_does_not_see(nvme_dir):
    model = models.mlp()
    before = snapshot(model)
    expected = "sees no CUDA device" if not torch.cuda.is_available() else "CUDA device"
    with pytest.raises(tierrt.ConfigError, match=expected):
        with tierrt.offload(model, tiers=[tierrt.gpu(3), tierrt.dram("64MiB"), tierrt.nvme(nvme_dir)]):
            pass
    assert_untouched(model, before)


def test_tiers_not_specs():
    with pytest.raises(tierrt.ConfigError, match="not a tier spec"):
        tierrt.offload(models.mlp(), tiers=["dram"])


def test_missing_dram_tier(nvme_dir):
    with pytest.raises(tierrt.ConfigError, match="dram tier is required"):
        tierrt.offload(models.mlp(), tiers=[tierrt.nvme(nvme_dir)])


def test_bad_sizes():
    with pytest.raises(tierrt.ConfigError, match="unknown unit"):
        tierrt.dram("64 parsecs")
    with pytest.raises(tierrt.ConfigError):
        tierrt.dram(-5)
    with pytest.raises(tierrt.ConfigError, match="cannot be negative"):
        tierrt.dram("-1GiB")
    with pytest.raises(tierrt.ConfigError, match="cannot read"):
        tierrt.dram("abc")


def test_budget_below_largest_block(nvme_dir):
    model = models.mlp(width=512)  # 1 MiB per Linear weight
    before = snapshot(model)
    with pytest.raises(tierrt.TierCapacityError, match="at least") as info:
        with tierrt.offload(model, tiers=[tierrt.dram("512KiB"), tierrt.nvme(nvme_dir)]):
            pass
    assert info.value.tier == "dram"
    assert info.value.requested > 512 * 1024
    assert_untouched(model, before)
    assert os.listdir(nvme_dir) == []


def test_nvme_path_without_room(tmp_path):
    model = models.mlp(width=512)
    before = snapshot(model)
    with tiny_mount(str(tmp_path / "small")) as small:
        with pytest.raises(tierrt.TierCapacityError, match="free") as info:
            with tierrt.offload(model, tiers=[tierrt.dram("4MiB"), tierrt.nvme(small)]):
                pass
        assert small in str(info.value)
        assert os.listdir(small) == []
    assert_untouched(model, before)


def test_nvme_budget_too_small(nvme_dir):
    model = models.mlp(width=512)
    with pytest.raises(tierrt.TierCapacityError, match="nvme budget"):
        with tierrt.offload(model, tiers=[tierrt.dram("4MiB"), tierrt.nvme(nvme_dir, budget="1MiB")]):
            pass


def test_unwritable_path(tmp_path):
    model = models.mlp(width=512)
    before = snapshot(model)
    with immutable_dir(str(tmp_path / "ro")) as ro:
        with pytest.raises(tierrt.TierPathError, match="not writable") as info:
            with tierrt.offload(model, tiers=[tierrt.dram("4MiB"), tierrt.nvme(ro)]):
                pass
        assert info.value.path == ro
    assert_untouched(model, before)


def test_path_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(tierrt.TierPathError, match="is a file, not a directory"):
        with tierrt.offload(models.mlp(width=512), tiers=[tierrt.dram("4MiB"), tierrt.nvme(str(target))]):
            pass


def test_model_without_parameters(nvme_dir):
    with pytest.raises(tierrt.HookError, match="no parameters"):
        with tierrt.offload(nn.ReLU(), tiers=[tierrt.dram("4MiB"), tierrt.nvme(nvme_dir)]):
            pass


def test_not_a_module():
    with pytest.raises(tierrt.ConfigError, match="nn.Module"):
        tierrt.offload(object(), tiers=[tierrt.dram("4MiB")])


def test_entering_twice(nvme_dir):
    model = models.mlp()
    rt = tierrt.offload(model, tiers=[tierrt.dram("8MiB"), tierrt.nvme(nvme_dir)])
    with rt:
        with pytest.raises(tierrt.HookError, match="already active"):
            rt.__enter__()
        # offloading the same model again through a second runtime is refused too
        with pytest.raises(tierrt.HookError, match="already offloaded"):
            with tierrt.offload(model, tiers=[tierrt.dram("8MiB"), tierrt.nvme(nvme_dir)]):
                pass
    # and after the first context closed the model is whole again
    assert all(p.is_contiguous() for p in model.parameters())


def test_parameter_shared_with_another_offloaded_model(nvme_dir):
    a = models.mlp()
    b = nn.Sequential(a[0], nn.Linear(128, 3))  # shares a's first layer
    with tierrt.offload(a, tiers=[tierrt.dram("8MiB"), tierrt.nvme(nvme_dir)]):
        before = [(n, p.detach().clone()) for n, p in b.named_parameters() if n.startswith("1.")]
        with pytest.raises(tierrt.HookError, match="shared"):
            with tierrt.offload(b, tiers=[tierrt.dram("8MiB"), tierrt.nvme(nvme_dir)]):
                pass
        for (name, value), (_, p) in zip(
            before, [(n, p) for n, p in b.named_parameters() if n.startswith("1.")]
        ):
            assert torch.equal(value, p), name


def test_optimizer_without_model_params(nvme_dir):
    model = models.mlp()
    other = nn.Linear(3, 3)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    before = snapshot(model)
    with pytest.raises(tierrt.HookError, match="none of the offloaded"):
        with tierrt.offload(model, tiers=[tierrt.dram("8MiB"), tierrt.nvme(nvme_dir)], optimizer=opt):
            pass
    assert_untouched_values(model, before)


def assert_untouched_values(model: nn.Module, before) -> None:
    for (name, _, value), (_, p) in zip(before, model.named_parameters()):
        assert torch.equal(value, p.detach()), name


def test_exception_in_block_restores_model(nvme_dir):
    model = models.mlp()
    before = snapshot(model)
    with pytest.raises(KeyError):
        with tierrt.offload(model, tiers=[tierrt.dram("8MiB"), tierrt.nvme(nvme_dir)]):
            model(torch.randn(2, 128))
            raise KeyError("user error")
    assert_untouched_values(model, before)
    assert os.listdir(nvme_dir) == []  # swap files removed


class _SparseEmbeddingNet(nn.Module):
    """An embedding (or embedding bag) with sparse gradients in front of two Linear layers."""

    def __init__(self, bag: bool = False, sparse: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        cls = nn.EmbeddingBag if bag else nn.Embedding
        self.emb = cls(500, 32, sparse=sparse)
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(2)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h if h.dim() == 2 else h.mean(1)
        for layer in self.layers:
            h = layer(h)
        return h


@pytest.mark.parametrize("bag", [False, True])
def test_sparse_gradient_module_is_refused_at_entry(bag, nvme_dir):
    """nn.Embedding(sparse=True) / nn.EmbeddingBag(sparse=True) being trained: a ConfigError naming
    the module before anything moves (backward used to fail with a raw RuntimeError)."""
    model = _SparseEmbeddingNet(bag=bag)
    before = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tiers = [tierrt.dram("4MiB"), tierrt.nvme(nvme_dir)]
    with pytest.raises(tierrt.ConfigError, match=r"module emb \(Embedding(Bag)?\) has sparse=True"):
        tierrt.offload(model, tiers=tiers, optimizer=opt).__enter__()
    assert_untouched(model, before)
    with pytest.raises(tierrt.ConfigError, match="sparse=True"):  # training mode, no optimizer
        tierrt.offload(model, tiers=tiers).__enter__()
    assert_untouched(model, before)


def test_sparse_embedding_frozen_or_in_eval_is_accepted(nvme_dir):
    """Sparse gradients never arise from a frozen embedding, or in eval mode without an optimizer."""
    model = _SparseEmbeddingNet()
    ids = torch.randint(0, 500, (4, 3), generator=torch.Generator().manual_seed(1))
    expected = model(ids)
    model.eval()
    with tierrt.offload(model, tiers=[tierrt.dram("4MiB"), tierrt.nvme(nvme_dir)]):
        assert torch.equal(model(ids), expected)
    model.train()
    model.emb.requires_grad_(False)
    opt = torch.optim.SGD(model.layers.parameters(), lr=0.1)
    with tierrt.offload(model, tiers=[tierrt.dram("4MiB"), tierrt.nvme(nvme_dir)], optimizer=opt):
        model(ids).sum().backward()
        opt.step()


def test_sparse_gradient_arriving_inside_the_context_is_a_hook_error(nvme_dir):
    """An embedding switched to sparse gradients after entering: backward raises a HookError
    naming the parameter, and the model is given back whole."""
    model = _SparseEmbeddingNet(sparse=False)
    before = snapshot(model)
    ids = torch.randint(0, 500, (4, 3), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(tierrt.HookError, match="emb.weight received a torch.sparse_coo gradient"):
        with tierrt.offload(model, tiers=[tierrt.dram("4MiB"), tierrt.nvme(nvme_dir)], optimizer=opt):
            model.emb.sparse = True
            model(ids).sum().backward()
    model.emb.sparse = False
    for (name, _, value), (_, p) in zip(before, model.named_parameters()):
        assert torch.equal(value, p), f"{name} changed"


_KILLED_INSIDE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import models, torch, tierrt
model = models.mlp()
opt = torch.optim.AdamW(model.parameters())
with tierrt.offload(model, tiers=[tierrt.dram("512KiB"), tierrt.nvme({nvme!r})], optimizer=opt):
    models.mlp_loss(model, models.mlp_batches(1)[0]).backward()
    opt.step()
    print("inside", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_inside_the_context_leaves_no_swap_file(nvme_dir):
    script = _KILLED_INSIDE.format(tests=os.path.dirname(__file__), nvme=nvme_dir)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert "inside" in result.stdout
    assert os.listdir(nvme_dir) == []


def test_runtime_never_closed_leaves_no_swap_file(nvme_dir):
    model = models.mlp()
    rt = tierrt.offload(model, tiers=[tierrt.dram("512KiB"), tierrt.nvme(nvme_dir)])
    rt.start()
    model(torch.randn(2, 128))
    assert rt.report().tiers["nvme"]["budget"] > 0
    assert os.listdir(nvme_dir) == []  # the swap file's name is gone as soon as it is open
    del rt
    gc.collect()
    assert os.listdir(nvme_dir) == []


def test_swap_directory_tierrt_created_is_removed_on_exit(tmp_path):
    missing = tmp_path / "made" / "by" / "tierrt"
    with tierrt.offload(models.mlp(), tiers=[tierrt.dram("512KiB"), tierrt.nvme(str(missing))]):
        assert missing.is_dir()
    assert os.listdir(tmp_path) == []


def test_swap_directory_with_other_files_is_kept(tmp_path):
    missing = tmp_path / "made"
    with tierrt.offload(models.mlp(), tiers=[tierrt.dram("512KiB"), tierrt.nvme(str(missing))]):
        (missing / "user.txt").write_text("mine")
    assert os.listdir(missing) == ["user.txt"]


def test_stale_swap_files_of_ended_runs_are_swept(nvme_dir):
    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    stale = os.path.join(nvme_dir, f"tierrt-{int(dead.stdout)}-0123abcd-0.swap")
    live = os.path.join(nvme_dir, f"tierrt-{os.getpid()}-0123abcd-0.swap")
    other = os.path.join(nvme_dir, "notes.swap")
    for path in (stale, live, other):
        with open(path, "wb") as f:
            f.write(b"old")
    with tierrt.offload(models.mlp(), tiers=[tierrt.dram("512KiB"), tierrt.nvme(nvme_dir)]):
        pass
    assert sorted(os.listdir(nvme_dir)) == sorted(os.path.basename(p) for p in (live, other))


_LEFT_OPEN = """
import sys
sys.path.insert(0, {tests!r})
import models, torch, tierrt
model = models.mlp()
opt = torch.optim.AdamW(model.parameters())
rt = tierrt.offload(model, tiers=[tierrt.dram("512KiB"), tierrt.nvme({nvme!r})], optimizer=opt)
rt.start()
models.mlp_loss(model, models.mlp_batches(1)[0]).backward()
opt.step()
"""


def test_interpreter_exit_with_a_runtime_left_open_is_clean(nvme_dir):
    script = _LEFT_OPEN.format(tests=os.path.dirname(__file__), nvme=nvme_dir)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.listdir(nvme_dir) == []
