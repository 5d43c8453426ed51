"""Running the command line in a subprocess, and a folder holding a model file and a plan for it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MODEL_FILE = '''
import torch.nn as nn

def small():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

def other():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
'''


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dpcompress.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def error_line(result):
    """The one line a user error prints: exit status 2, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "nets.py").write_text(MODEL_FILE)
    (tmp_path / "plan.json").write_text(json.dumps({"activations": [], "boundaries": [0, 3]}))
    return tmp_path
