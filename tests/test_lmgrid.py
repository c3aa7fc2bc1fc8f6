"""A grid of language-model runs (python -m awd_nonnormal.lmgrid) on the local pool: lines parse,
finished runs are skipped, unfinished ones continue from their latest checkpoint, a failing run is
reported with its error."""

import json
from pathlib import Path

import pytest

from awd_nonnormal import lmgrid as G
from awd_nonnormal.checkpoint import load_checkpoint
from awd_nonnormal.lmgrid.__main__ import main as grid_main
from test_lm import write_corpus

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--model RNN --emsize 8 --nhid 8 --nlayers 1 --batch_size 4 --eval-batch-size 2 "
        "--test-batch-size 2 --bptt 8 --optimizer adam --lr 1e-3 --no-progress --device cpu")


def test_lines_parse_and_bad_lines_name_their_number(tmp_path):
    runs = G.parse_grid("# a comment\n\npython main.py --data d --save a/m.pt  # why\n"
                        "main.py --data d --save=b/m.pt --epochs 2\n--save c/m.pt\n")
    assert [r.line for r in runs] == [3, 4, 5]
    assert runs[0].args == ("--data", "d", "--save", "a/m.pt")
    assert runs[1].save == Path("b/m.pt") and runs[1].latest == Path("b/m.latest.pt")
    assert runs[2].log == Path("c/m.log")
    for text, message in [("--data d\n", "line 1: give --save"),
                          ("--save a.pt\n--save a.pt\n", "line 2: --save a.pt is also the run of line 1"),
                          ("--save a.pt --resume a.latest.pt\n", "leave out --resume"),
                          ("--save 'a.pt\n", "cannot split"), ("# nothing\n", "no run")]:
        with pytest.raises(G.GridLineError, match=message):
            G.parse_grid(text)


def test_grid_runs_skips_finished_and_continues_partial_runs(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    a, b = tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt"
    grid = tmp_path / "grid.txt"
    grid.write_text(f"python main.py --data {corpus} {TINY} --epochs 1 --seed 1 --save {a}\n"
                    f"main.py --data {corpus} {TINY} --epochs 1 --seed 2 --save {b}\n")
    assert grid_main([str(grid), "--workers", "2", "--main", str(ROOT / "main.py")]) == 0
    assert "2 run, 0 failed" in capsys.readouterr().out
    assert all("test" in load_checkpoint(p, kind="lm") for p in (a, b))
    mtime = a.stat().st_mtime_ns
    # b: two epochs now, and its best model gone: a partial run, continued with --resume
    b.unlink()
    grid.write_text(grid.read_text().replace("--epochs 1 --seed 2", "--epochs 2 --seed 2"))
    assert [G.status(r) for r in G.read_grid(grid)] == ["finished", "partial"]
    assert grid_main([str(grid), "--main", str(ROOT / "main.py")]) == 0
    assert "1 finished before, 1 run, 0 failed" in capsys.readouterr().out
    assert a.stat().st_mtime_ns == mtime  # not redone
    rows = [json.loads(l) for l in (tmp_path / "b" / "model.metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "--resume" in (tmp_path / "b" / "model.log").read_text()


def test_a_failing_run_is_reported_with_its_error(tmp_path, capsys):
    grid = tmp_path / "grid.txt"
    grid.write_text(f"--data {tmp_path / 'missing'} {TINY} --save {tmp_path / 'x' / 'model.pt'}\n")
    assert grid_main([str(grid), "--main", str(ROOT / "main.py")]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "exit status 1" in out and "main.py: error:" in out
