"""Bad input to tierrt.offload(): a clear tierrt error before anything moves, model untouched."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys

import models
import pytest
import torch
from test_offload_numerics import streaming_budget
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


@pytest.mark.parametrize("size", ["1e400", float("inf"), float("nan"), 10**30, 2**63, "1e30 PiB", "1e-30GiB"])
def test_sizes_out_of_range_are_config_errors(size):
    with pytest.raises(tierrt.ConfigError):
        tierrt.parse_size(size)
    with pytest.raises(tierrt.ConfigError):
        tierrt.dram(size)


@pytest.mark.parametrize("size", ["1.5", "0.5", "4096.7", 1.5])
def test_fractional_bytes_are_refused(size):
    with pytest.raises(tierrt.ConfigError, match="whole number of bytes"):
        tierrt.parse_size(size)


def test_fractions_with_a_unit_are_read_exactly():
    assert tierrt.parse_size("1.5GiB") == 3 << 29
    assert tierrt.parse_size("0.5KiB") == 512
    assert tierrt.parse_size("1.5KB") == 1500
    assert tierrt.parse_size("4096.0") == 4096
    assert tierrt.parse_size("1e-3GiB") == (1 << 30) // 1000  # rounded down to whole bytes
    assert tierrt.parse_size(2**63 - 1) == 2**63 - 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: tierrt.nvme(b"/tmp/x"),
        lambda: tierrt.nvme(None),
        lambda: tierrt.nvme(123),
        lambda: tierrt.nvme(["/tmp/x", 5]),
        lambda: tierrt.dram("1MiB", node=1.5),
        lambda: tierrt.dram("1MiB", node="0"),
        lambda: tierrt.cxl("1MiB", node=[0, None]),
        lambda: tierrt.gpu("0"),
        lambda: tierrt.parse_size(None),
        lambda: tierrt.parse_size(True),
    ],
)
def test_arguments_of_the_wrong_type_are_config_type_errors(make):
    with pytest.raises(tierrt.ConfigTypeError) as info:
        make()
    assert isinstance(info.value, tierrt.ConfigError) and isinstance(info.value, TypeError)


def test_nvme_refuses_one_directory_given_twice(tmp_path):
    d = str(tmp_path / "d")
    os.symlink(d, tmp_path / "alias")
    for paths in ([d, d], [d, d + "/"], [d, str(tmp_path / "alias")], [d, d + "/./"]):
        with pytest.raises(tierrt.ConfigError, match="same directory"):
            tierrt.nvme(paths)
    assert tierrt.nvme([d + "/a", d + "/b"]).paths == (d + "/a", d + "/b")


def test_nvme_stripe_is_bounded_at_spec_time():
    with pytest.raises(tierrt.ConfigError, match="at most 1GiB"):
        tierrt.nvme("/tmp/x", stripe="2GiB")
    with pytest.raises(tierrt.ConfigError):
        tierrt.nvme("/tmp/x", stripe=10**30)
    assert tierrt.nvme("/tmp/x", stripe="1GiB").stripe == 1 << 30


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


class _ParameterListNet(nn.Module):
    """Six 64KiB parameters in one ParameterList, all read by the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ps = nn.ParameterList(nn.Parameter(torch.randn(128, 128) * 0.05) for _ in range(6))
        self.out = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.ps:
            x = torch.tanh(x @ p)
        return self.out(x)


def test_parameter_list_above_the_budget_says_why_it_is_not_split(nvme_dir):
    model = _ParameterListNet()
    opt = torch.optim.AdamW(model.parameters())
    before = snapshot(model)
    with pytest.raises(tierrt.TierCapacityError, match="Block ps cannot be split") as info:
        with tierrt.offload(model, tiers=[tierrt.dram("512KiB"), tierrt.nvme(nvme_dir)], optimizer=opt):
            pass
    message = str(info.value)
    assert "ParameterList" in message and "would fit" in message and "does not help" not in message
    assert info.value.tier == "dram" and info.value.block == "ps" and info.value.requested > 512 * 1024
    assert_untouched(model, before)


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
import gc, os, sys
sys.path.insert(0, {tests!r})
import models, torch, tierrt
model = models.mlp()
opt = torch.optim.AdamW(model.parameters())
rt = tierrt.offload(model, tiers=[tierrt.dram("512KiB"), tierrt.nvme({nvme!r})], optimizer=opt)
rt.start()
models.mlp_loss(model, models.mlp_batches(1)[0]).backward()
opt.step()
print("while open:", os.listdir({nvme!r}))
del rt
gc.collect()
print("after del:", os.listdir({nvme!r}), flush=True)
"""


def test_a_runtime_never_closed_leaves_no_swap_file_and_exits_cleanly(nvme_dir):
    """Deleted without close, then the interpreter exits (in a subprocess: an open runtime keeps
    its patches of torch installed)."""
    script = _LEFT_OPEN.format(tests=os.path.dirname(__file__), nvme=nvme_dir)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]  # no abort in finalisation
    assert "while open: []" in result.stdout and "after del: []" in result.stdout
    assert os.listdir(nvme_dir) == []


def test_trace_and_save_to_unwritable_paths_raise_tier_path_errors(nvme_dir, tmp_path):
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = models.mlp_batches(2)
    missing = str(tmp_path / "no" / "such" / "dir" / "out")
    with tierrt.offload(model, tiers=[tierrt.dram("512KiB"), tierrt.nvme(nvme_dir)], optimizer=opt) as rt:
        models.mlp_loss(model, batches[0]).backward()
        opt.step()
        for write in (rt.trace, rt.save):
            with pytest.raises(tierrt.TierPathError, match="does not exist") as info:
                write(missing)
            assert info.value.path == missing and info.value.errno == errno.ENOENT
            with pytest.raises(tierrt.TierPathError, match="is a directory") as info:
                write(tmp_path)
            assert info.value.errno == errno.EISDIR
        with immutable_dir(str(tmp_path / "ro")) as ro:
            for write in (rt.trace, rt.save):
                target = os.path.join(ro, "out")
                with pytest.raises(tierrt.TierPathError, match=target) as info:
                    write(target)
                assert info.value.errno in (errno.EPERM, errno.EACCES)
            assert os.listdir(ro) == []
        models.mlp_loss(model, batches[1]).backward()  # the run goes on
        opt.step()
    assert sorted(os.listdir(tmp_path)) == ["nvme", "ro"]  # nothing half-written


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from tierrt.atomic import atomic_file

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(KeyError):
        with atomic_file(target, "save") as handle:
            handle.write(b"half of the new")
            raise KeyError("the data could not be produced")
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert target.read_bytes() == b"previous"


class _ViewParams(nn.Module):
    """Two layers and two parameters ``a`` and ``b`` made by ``make(base)`` from one tensor."""

    def __init__(self, make) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])
        base = torch.randn(8, 16)
        self.a, self.b = make(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return (x @ self.a.t()).sum() + (x @ self.b.t()).sum()


@pytest.mark.parametrize(
    "make",
    [
        lambda base: (nn.Parameter(base), nn.Parameter(base[:4])),  # b views the start of a
        lambda base: (nn.Parameter(base[:5]), nn.Parameter(base[3:])),  # partial overlap
        lambda base: (nn.Parameter(base), nn.Parameter(base.data)),  # two objects, same memory
        lambda base: (nn.Parameter(base[:, ::2]), nn.Parameter(base[:, 1::2])),  # interleaved
    ],
    ids=["view", "partial", "same-memory", "interleaved"],
)
def test_parameters_sharing_memory_are_refused_at_entry(make, nvme_dir):
    model = _ViewParams(make)
    before = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(tierrt.HookError, match="parameter a and parameter b share memory") as info:
        with tierrt.offload(model, tiers=[tierrt.dram("1MiB"), tierrt.nvme(nvme_dir)], optimizer=opt):
            pass
    assert "make them separate parameters" in str(info.value) and "same Parameter object" in str(info.value)
    assert info.value.parameters == ["a", "b"]
    assert_untouched(model, before)
    assert model.a.untyped_storage().data_ptr() == model.b.untyped_storage().data_ptr()  # still shared
    assert os.listdir(nvme_dir) == []


def test_buffer_viewing_a_parameter_is_refused_at_entry(nvme_dir):
    model = models.mlp()
    model[0].register_buffer("row", model[0].weight.data[0])
    before = snapshot(model)
    with pytest.raises(tierrt.HookError, match=r"parameter 0.weight and buffer 0.row share memory") as info:
        with tierrt.offload(model, tiers=[tierrt.dram("8MiB"), tierrt.nvme(nvme_dir)]):
            pass
    assert ".clone()" in str(info.value) and info.value.buffers == ["0.row"]
    assert_untouched(model, before)


def test_tied_and_disjoint_views_are_accepted_and_train_like_torch(nvme_dir):
    """The same Parameter object in two places (tied) is one parameter; views of one tensor that
    reach no common byte (``base[:4]``, ``base[4:]``) are separate memory: both train as in torch."""

    def make(base):
        a = nn.Parameter(base[:4])
        return a, nn.Parameter(base[4:])

    reference, model = _ViewParams(make), _ViewParams(make)
    for m in (reference, model):
        m.layers[1].weight = m.layers[0].weight  # tied
    x = torch.randn(2, 16)

    def train(m: nn.Module) -> None:
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(3):
            m(x).backward()
            opt.step()
            opt.zero_grad()

    train(reference)
    with tierrt.offload(model, tiers=[tierrt.dram("1MiB"), tierrt.nvme(nvme_dir)]):
        train(model)
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    assert model.layers[1].weight is model.layers[0].weight


def _generator_of_layers(model: nn.Module):
    return (m for m in model if isinstance(m, nn.Linear))


@pytest.mark.parametrize(
    "options, error, words",
    [
        (dict(blocks=42), tierrt.ConfigTypeError, "blocks=...): expected a list of the model's modules"),
        (dict(blocks="0"), tierrt.ConfigTypeError, "blocks="),
        (dict(blocks=[nn.Linear(2, 2)]), tierrt.ConfigError, "not a submodule"),
        (dict(blocks=["0"]), tierrt.ConfigTypeError, "expected modules of the model, got '0'"),
        (dict(prefetch="2"), tierrt.ConfigTypeError, "prefetch=...): expected an int >= 0 or None, got '2'"),
        (dict(prefetch=True), tierrt.ConfigTypeError, "prefetch="),
        (dict(prefetch=-1), tierrt.ConfigError, "prefetch=...): expected an int >= 0, got -1"),
        (dict(compute_dtype="bf16"), tierrt.ConfigTypeError, "compute_dtype=...): expected a floating"),
        (dict(compute_dtype=torch.int8), tierrt.ConfigError, "expected a floating dtype, got torch.int8"),
        (dict(progress="yes"), tierrt.ConfigTypeError, "progress=...): expected True, False or None"),
        (
            dict(io_backend="bogus"),
            tierrt.ConfigError,
            "io_backend=...): expected one of auto, io_uring, threads",
        ),
        (dict(io_backend=None), tierrt.ConfigTypeError, "io_backend="),
        (
            dict(queue_depth="32"),
            tierrt.ConfigTypeError,
            "queue_depth=...): expected an int from 1 to 4096, got '32'",
        ),
        (dict(queue_depth=0), tierrt.ConfigError, "queue_depth=...): expected an int from 1 to 4096, got 0"),
        (dict(queue_depth=5000), tierrt.ConfigError, "got 5000"),
        (dict(queue_depth=32.0), tierrt.ConfigTypeError, "queue_depth="),
        (dict(weights=42), tierrt.ConfigTypeError, "weights=...): expected a file path"),
        (dict(init="yes"), tierrt.ConfigTypeError, "init=...): expected True or False, got 'yes'"),
        (dict(restore="no"), tierrt.ConfigTypeError, "restore=...): expected True, False or None, got 'no'"),
        (
            dict(native_optimizer=1),
            tierrt.ConfigTypeError,
            "native_optimizer=...): expected True, False or None",
        ),
        (
            dict(deferred_step=None),
            tierrt.ConfigTypeError,
            "deferred_step=...): expected True or False, got None",
        ),
        (dict(overlap_backward="off"), tierrt.ConfigTypeError, "overlap_backward="),
        (dict(optimizer=[]), tierrt.ConfigTypeError, "optimizer=...): expected a torch.optim.Optimizer"),
        (dict(tiers=42), tierrt.ConfigTypeError, "tiers: expected a list of tier specs"),
        (dict(tiers="dram"), tierrt.ConfigTypeError, "tiers: expected a list of tier specs"),
    ],
)
def test_every_option_is_checked_when_offload_is_called(options, error, words, nvme_dir):
    """Type and value of each option of offload(), named in the error with what it got and what is
    accepted, raised by offload() itself (io_backend= and queue_depth= also when nothing goes to
    NVMe here), before anything moves."""
    model = models.mlp()
    before = snapshot(model)
    kwargs = dict(tiers=[tierrt.dram("64MiB"), tierrt.nvme(nvme_dir)])
    with pytest.raises(error) as info:
        tierrt.offload(model, **{**kwargs, **options})
    assert words in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError) == (
        error is tierrt.ConfigTypeError
    )
    assert_untouched(model, before)
    assert os.listdir(nvme_dir) == []


def test_numpy_integers_are_counts(nvme_dir):
    """prefetch= and queue_depth= read from a config as numpy integers are taken as ints."""
    import numpy as np

    model = models.mlp()
    tiers = [tierrt.dram(streaming_budget(model, adam=False)), tierrt.nvme(nvme_dir)]
    with tierrt.offload(model, tiers=tiers, prefetch=np.int64(1), queue_depth=np.int32(16)) as rt:
        assert torch.isfinite(models.mlp_loss(model, models.mlp_batches(1)[0]))
        assert rt.pipeline.depth == 1


def test_io_uring_asked_for_where_it_is_missing_is_refused_up_front(nvme_dir, monkeypatch):
    import tierrt.io

    monkeypatch.setattr(tierrt.io, "io_uring_status", lambda: (False, "built without liburing"))
    with pytest.raises(
        tierrt.ConfigError, match=r"io_uring is not available here \(built without liburing\)"
    ):
        tierrt.offload(models.mlp(), tiers=[tierrt.dram("64MiB")], io_backend="io_uring")


def test_blocks_given_as_a_generator_are_kept_for_placing_again(nvme_dir):
    model = models.mlp()
    with tierrt.offload(
        model, tiers=[tierrt.dram("64MiB"), tierrt.nvme(nvme_dir)], blocks=_generator_of_layers(model)
    ) as rt:
        linears = [m for m in model if isinstance(m, nn.Linear)]
        assert rt.block_selector == linears  # a list: read again when the model is placed again
        assert [b.spec.root for b in rt.blocks] == linears


@pytest.mark.parametrize("write", ["trace", "save"])
def test_trace_and_save_of_a_non_path_are_config_type_errors(write, nvme_dir):
    model = models.mlp()
    with tierrt.offload(model, tiers=[tierrt.dram("64MiB"), tierrt.nvme(nvme_dir)]) as rt:
        for bad in (None, 42, b"/tmp/x", ""):
            with pytest.raises(tierrt.ConfigTypeError, match=rf"rt.{write}\(path\): expected a file path"):
                getattr(rt, write)(bad)


def test_an_unusable_nvme_path_is_refused_also_when_the_model_fits_in_dram(tmp_path):
    """The nvme tier is not needed by this placement (everything fits the DRAM budget), and its path
    cannot work (under a file): refused all the same, so a script fails where it is written, not
    once the model outgrows memory; the model is untouched and nothing is left on disk."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    model = models.mlp()
    before = snapshot(model)
    with pytest.raises(tierrt.TierPathError, match="cannot create directory"):
        with tierrt.offload(model, tiers=[tierrt.dram("64MiB"), tierrt.nvme(blocker / "swap")]):
            pass
    assert_untouched(model, before)
    good = tmp_path / "new" / "swap"
    with tierrt.offload(model, tiers=[tierrt.dram("64MiB"), tierrt.nvme(good)]) as rt:
        assert rt.pipeline.store.nvme is None  # not needed: checked, then removed again
    assert not (tmp_path / "new").exists()
