"""Run folders and checkpoints written before the one-house refactor (checkpoint schema 1) still
resume and still analyse. The fixture in tests/fixtures/legacy_v1 was made with that code:

    cd tests/fixtures/legacy_v1
    python ../../../main.py --data corpus --model LSTM --emsize 8 --nhid 8 --nlayers 1 --epochs 1 \
        --batch_size 4 --bptt 5 --save lm/model.pt --no-progress --init chain --init-alpha 0.9 \
        --eval-batch-size 4 --test-batch-size 4
    python -m awd_nonnormal.tasks train --task copy --T 30 --n-train 32 --n-val 16 --epochs 2 \
        --hidden 8 --init chain --init-scale 1.0 --out task --no-progress --batch-size 16
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import analyze
import main
from awd_nonnormal.tasks import __main__ as tasks_cli

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_v1"


@pytest.fixture
def legacy(tmp_path, monkeypatch):
    folder = tmp_path / "legacy"
    shutil.copytree(FIXTURE, folder)
    monkeypatch.chdir(folder)
    return folder


def test_fixture_is_schema_1():
    for path in (FIXTURE / "lm" / "model.latest.pt", FIXTURE / "task" / "checkpoint.pt"):
        assert torch.load(path, weights_only=True)["version"] == 1


def test_old_lm_checkpoint_resumes_one_more_epoch(legacy):
    assert main.main(["--resume", "lm/model.latest.pt", "--epochs", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (legacy / "lm" / "model.metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "epoch" in r and "val_loss" in r][-2:] == [1, 2]
    state = torch.load(legacy / "lm" / "model.latest.pt", weights_only=True)
    assert state["epoch"] == 2


def test_old_task_run_extends(legacy, capsys):
    assert tasks_cli.main(["train", "--resume", "--out", "task", "--epochs", "3", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (legacy / "task" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    result = json.loads((legacy / "task" / "result.json").read_text())
    assert result["status"] == "completed" and result["epochs_run"] == 3


def test_old_task_run_is_finished_and_not_redone(legacy, capsys):
    assert tasks_cli.main(["train", "--resume", "--out", "task", "--no-progress"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_old_checkpoints_analyse(legacy):
    rc = analyze.main(["lm/model.pt", "task/checkpoint.pt", "--no-figures", "--out", "an",
                       "--no-progress"])
    assert rc == 0
    data = json.loads((legacy / "an" / "analysis.json").read_text())
    text = json.dumps(data)
    assert "chain" in text
