"""README's first command, ``tierrt demo``, run small: it trains through the tiers (state above the
DRAM budget), prints the loss going down and the report, and exits 0."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_trains_and_reports(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tierrt.cli", "demo", "--steps", "12", "--layers", "2", "--width", "64",
         "--seq", "32", "--dram", "2MiB", "--nvme", str(tmp_path / "swap"), "--lr", "3e-3"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    match = re.search(r"loss (\d+\.\d+) -> (\d+\.\d+) in 12 steps", out)
    assert match, out
    assert float(match.group(2)) < float(match.group(1))
    assert "nvme->dram" in out and "prefetch hits" in out
    assert re.search(r"training state [\d.]+\w+ = [\d.]+x the DRAM budget", out), out


def test_demo_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    """Each refused before training (they raised tracebacks: ZeroDivisionError for --steps 0 and
    --heads 0, a torch shape error for --width 100 --heads 8, a TypeError for --steps -3, a raw
    ConfigError for --dram 64parsecs, a TierPathError for --trace after the whole run)."""
    small = ["--steps", "1", "--layers", "1", "--width", "64", "--heads", "2", "--seq", "16"]
    cases = [
        (["--steps", "0"], "--steps"),
        (["--steps", "-3"], "--steps"),
        (["--heads", "0"], "--heads"),
        (["--batch", "0"], "--batch"),
        (["--lr", "nan"], "--lr"),
        (["--dram", "64parsecs"], "parsecs"),
        (["--dram", "0"], "--dram"),
        (["--width", "100", "--heads", "8"], "multiple of --heads"),
        (["--seq", "10000000"], "--seq"),
        (["--trace", str(tmp_path / "missing" / "t.json")], "--trace"),
        ([*small, "--dram", "1KiB"], "dram budget 1KiB"),
    ]
    from tierrt.cli import main

    for args, words in cases:
        try:
            status = main(["demo", *args])
        except SystemExit as exit:  # argparse's usage error
            status = exit.code
        stderr = capsys.readouterr().err
        errors = [line for line in stderr.splitlines() if "error" in line]
        assert status == 2, (args, stderr)
        assert len(errors) == 1 and words in errors[0], (args, stderr)


def test_demo_leaves_nothing_behind_on_sigterm_and_in_a_new_nvme_path(tmp_path):
    """--nvme naming directories that do not exist yet: they are created and removed again. A SIGTERM
    (``timeout``) while training exits through Python (status 143), giving the model back and
    removing the swap directory."""
    import os
    import signal
    import time

    parent = tmp_path / "a" / "b"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierrt.cli", "demo", "--steps", "100000", "--layers", "1", "--width", "64",
         "--heads", "2", "--seq", "16", "--dram", "1MiB", "--nvme", str(parent)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (parent.exists() and any(parent.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # into the training loop
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert not (tmp_path / "a").exists(), os.listdir(tmp_path / "a")
