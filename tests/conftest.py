from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py


@pytest.fixture
def nvme_dir(tmp_path):
    """A directory on the real disk (ext4 here): O_DIRECT swap files go there."""
    path = tmp_path / "nvme"
    path.mkdir()
    return str(path)
