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
