"""bench/rnn_speed.py --task-step times each candidate in a child process (``--step-child``); this
runs each kind of child once, so that a change to the trainer's step that the benchmark builds on
(make_config, build_model, model_batch, the rules) shows up here and not only in a benchmark run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", [["this"], ["stock", "--system-malloc"]])
def test_step_child_prints_the_median_seconds_of_one_training_step(kind):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "rnn_speed.py"), "--step-child", *kind,
                          "--repeats", "1", "--warmup", "1", "--threads", "1"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    seconds = float(out.split()[-1])
    assert 0 < seconds < 30  # one copy-500 step of batch 16 and 100 units; about 12 ms on one core
