"""bench/rnn_speed.py --task-step times each candidate in a child process (``--step-child``); this
runs each kind of child once, so that a change to the trainer's step that the benchmark builds on
(make_config, build_model, model_batch, the rules) shows up here and not only in a benchmark run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", [["this"], ["stock", "--system-malloc"]])
def test_step_child_prints_the_median_seconds_of_one_training_step(kind):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "rnn_speed.py"), "--step-child", *kind,
                          "--repeats", "1", "--warmup", "1", "--threads", "1"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    seconds = float(out.split()[-1])
    assert 0 < seconds < 30  # one copy-500 step of batch 16 and 100 units; about 12 ms on one core


def test_rule_check_times_numpy_where_the_layer_may_use_it(monkeypatch):
    """The rule check's step rows offer NumPy exactly up to NUMPY_MAX_WORK, name as the rule's
    pick what the layer itself picks (layer_path), and report NumPy's CPU share; the
    whole-sequence rows offer only torch.addmm and oneDNN."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import rnn_speed
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from awd_nonnormal.rnn import NUMPY_MAX_WORK, ONEDNN_MIN_WORK, onednn_available

    if not onednn_available(torch.device("cpu"), torch.float32):
        pytest.skip("the rule check runs only with oneDNN")
    monkeypatch.setattr(rnn_speed, "RULE_GRID", [(16, 100), (16, 128), (16, 129), (64, 128)])
    monkeypatch.setattr(rnn_speed, "SHAPES", {"tiny": rnn_speed.Shape("tiny", T=3, B=2, N=5, d=2,
                                                                      input_grad=False)})
    monkeypatch.setattr(rnn_speed, "_many", lambda fn, calls: fn)  # one call per timing
    rows = rnn_speed.rule_check(1)
    steps = {label: row for label, *row in rows if label.startswith("step")}
    assert list(steps) == ["step B=16 N=100", "step B=16 N=128", "step B=16 N=129", "step B=64 N=128"]
    expected_rule = {"step B=16 N=100": "NumPy", "step B=16 N=128": "NumPy",
                     "step B=16 N=129": "addmm", "step B=64 N=128": "oneDNN"}
    for label, (b, n, _, times, rule, share) in steps.items():
        assert rule == expected_rule[label]
        assert ("NumPy" in times) == (b * n * n <= NUMPY_MAX_WORK)
        assert (share is not None) == ("NumPy" in times)
        assert all(t > 0 for t in times.values())
    assert 64 * 128 * 128 >= ONEDNN_MIN_WORK
    others = [row for row in rows if not row[0].startswith("step")]
    assert [row[0] for row in others] == ["tiny input projection", "tiny grad input",
                                          "tiny grad W_ih", "tiny grad W_hh"]
    assert all(set(row[4]) == {"addmm", "oneDNN"} and row[6] is None for row in others)
