"""The run layer shared by both trainers: resume-conflict check, metrics policy, JSON cleaning,
atomic writes and the non-finite policy."""

import json
import math
import os

import pytest

from awd_nonnormal.runs import (Diverged, MetricsLog, NonFiniteGuard, ResumeConflict, check_resume,
                                differences, json_clean, read_json, write_json, write_text)


def test_check_resume_keeps_stored_and_applies_allowed_changes():
    stored = {"lr": 1e-3, "epochs": 5, "when": [3], "device": "cpu"}
    merged = check_resume(stored, {"epochs": 9, "lr": 1e-3, "when": (3,)}, may_change={"epochs"})
    assert merged == {"lr": 1e-3, "epochs": 9, "when": [3], "device": "cpu"}
    assert stored["epochs"] == 5  # not modified in place


def test_check_resume_lists_every_conflict():
    with pytest.raises(ResumeConflict) as exc:
        check_resume({"lr": 1e-3, "seed": 1, "epochs": 5}, {"lr": 2e-3, "seed": 2, "epochs": 6},
                     may_change={"epochs"}, where="run x")
    text = str(exc.value)
    assert "--lr 0.002 (run has 0.001)" in text and "--seed 2 (run has 1)" in text
    assert "run x" in text and "only --epochs may change" in text and "\n" not in text


def test_check_resume_setting_missing_from_the_stored_run():
    with pytest.raises(ResumeConflict, match="--new-thing 1 \\(run has None\\)"):
        check_resume({}, {"new_thing": 1})


def test_differences():
    assert differences({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b: 2 vs 3", "c: None vs 4"]


def test_json_clean():
    cleaned = json_clean({"a": float("nan"), 1: (1.5, float("inf"), [float("-inf")]), "s": "x"})
    assert cleaned == {"a": None, "1": [1.5, None, [None]], "s": "x"}
    json.dumps(cleaned, allow_nan=False)


def test_write_json_is_atomic_and_readable(tmp_path):
    path = tmp_path / "deep" / "x.json"
    write_json(path, {"v": float("nan"), "t": (1, 2)})
    assert read_json(path) == {"v": None, "t": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert read_json(tmp_path / "missing.json") is None
    write_text(tmp_path / "bad.json", "{")
    assert read_json(tmp_path / "bad.json") is None


def test_metrics_log_appends_and_resets_to_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    assert log.read() == []
    rows = [{"epoch": k, "loss": 1.0 / k} for k in (1, 2, 3)]
    log.reset()
    for r in rows:
        log.append(r)
    assert log.read() == rows
    log.reset(rows[:2])   # resuming from the checkpoint of epoch 2 drops the row of epoch 3
    assert log.read() == rows[:2]
    log.append({"epoch": 3, "loss": float("nan")})
    assert log.read()[-1] == {"epoch": 3, "loss": None}


def test_metrics_log_leaves_out_a_last_line_cut_by_a_kill(tmp_path, caplog):
    """A process killed while appending leaves a line without its newline; reading (a sweep's
    summary, the plots) still works and leaves it out with a warning."""
    log = MetricsLog(tmp_path / "m.jsonl")
    log.reset([{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}])
    with open(log.path, "a", encoding="utf-8") as fh:
        fh.write('{"epoch": 3, "lo')
    with caplog.at_level("WARNING"):
        assert log.read() == [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}]
    assert "last line is incomplete" in caplog.text
    log.reset(log.read())  # a resume rewrites the file whole
    assert log.path.read_text().endswith("\n") and len(log.read()) == 2


def test_guard_skips_non_finite_norms_and_ends_a_run_of_them():
    g = NonFiniteGuard(max_skipped=3)
    assert g.allow_step(1.0, "a")
    assert not g.allow_step(math.inf, "b") and not g.allow_step(math.nan, "c")
    assert g.allow_step(2.0, "d")            # a finite step ends the streak
    assert (g.skipped, g.streak) == (2, 0)
    assert not g.allow_step(math.inf, "e") and not g.allow_step(math.inf, "f")
    with pytest.raises(Diverged, match="3 batches in a row, up to g"):
        g.allow_step(math.inf, "g")
    h = NonFiniteGuard(max_skipped=3)
    h.load(g.state())
    assert (h.skipped, h.streak) == (5, 3)


def test_guard_non_finite_loss_ends_the_run():
    g = NonFiniteGuard(max_skipped=10)
    g.check_loss(0.5, "training loss", "here")
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(Diverged, match="training loss became .* at epoch 2"):
            g.check_loss(bad, "training loss", "epoch 2")
