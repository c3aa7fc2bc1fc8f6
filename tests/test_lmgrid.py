"""A grid of language-model runs (python -m awd_nonnormal.lmgrid) on the local pool: lines parse,
finished runs are skipped, unfinished ones (a run stopped by Ctrl-C among them) continue from their
latest checkpoint, a failing run is reported with its error, Ctrl-C stops the grid at once and
lets each running child save."""

import _thread
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from awd_nonnormal import lmgrid as G
from awd_nonnormal.checkpoint import load_checkpoint, save_checkpoint
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


def test_a_run_stopped_before_its_last_epoch_is_continued_not_skipped(tmp_path, capsys):
    # main.py tests the best model after Ctrl-C too, so NAME.pt holds a test result although the
    # run stopped early: here a run of --epochs 2 that stopped after epoch 1 (trained with
    # --epochs 1, its line then asking for 2 epochs, is on disk what Ctrl-C leaves)
    corpus = write_corpus(tmp_path / "corpus")
    save = tmp_path / "r" / "model.pt"
    grid = tmp_path / "grid.txt"
    grid.write_text(f"--data {corpus} {TINY} --epochs 1 --save {save}\n")
    assert grid_main([str(grid), "--main", str(ROOT / "main.py")]) == 0
    assert "test" in load_checkpoint(save, kind="lm")
    grid.write_text(grid.read_text().replace("--epochs 1", "--epochs 2"))
    (run,) = G.read_grid(grid)
    assert G.status(run) == "partial"
    capsys.readouterr()
    assert grid_main([str(grid), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("partial ")
    assert grid_main([str(grid), "--main", str(ROOT / "main.py")]) == 0
    assert "0 finished before, 1 run, 0 failed" in capsys.readouterr().out
    rows = [json.loads(l) for l in (tmp_path / "r" / "model.metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert G.status(run) == "finished"
    # a line without --epochs is measured against the epochs its checkpoint was trained for
    (bare,) = G.parse_grid(f"--data {corpus} {TINY} --save {save}\n")
    assert G.status(bare) == "finished"
    latest = load_checkpoint(run.latest, kind="lm")
    latest["config"]["train"]["epochs"] = 5
    save_checkpoint(run.latest, kind="lm", arch=latest.pop("arch"), config=latest.pop("config"),
                    model=latest.pop("model"),
                    **{k: v for k, v in latest.items() if k not in ("format", "version", "kind")})
    assert G.status(bare) == "partial"


# A stand-in for main.py: it saves (half a second) and exits on its first SIGINT and writes how
# many SIGINTs it had by then (a second one would make main.py abort without saving).
FAKE_MAIN = '''
import signal, sys, time
from pathlib import Path
save = Path(sys.argv[sys.argv.index("--save") + 1])
got = []
def on_sigint(signum, frame):
    got.append(signum)
    if len(got) == 1:
        time.sleep(0.5)
        save.with_suffix(".saved").write_text(str(len(got)))
        sys.exit(130)
signal.signal(signal.SIGINT, on_sigint)
save.with_suffix(".started").write_text("")
time.sleep(30)
save.with_suffix(".ended").write_text("")
'''


def _fake_main(tmp_path) -> Path:
    path = tmp_path / "fake_main.py"
    path.write_text(FAKE_MAIN)
    return path


def _wait_for(path: Path, seconds: float = 30) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize("to", ["group", "driver"])
def test_ctrl_c_stops_a_local_grid_at_once_and_starts_no_queued_run(tmp_path, to):
    # "group": a terminal's Ctrl-C; "driver": SIGINT to the command alone
    fake = _fake_main(tmp_path)
    grid = tmp_path / "grid.txt"
    grid.write_text("".join(f"--save {tmp_path / f'r{i}' / 'model.pt'}\n" for i in (1, 2, 3)))
    proc = subprocess.Popen([sys.executable, "-m", "awd_nonnormal.lmgrid", str(grid), "--main",
                             str(fake)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(tmp_path / "r1" / "model.started")
        (os.killpg if to == "group" else os.kill)(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, out  # within communicate's 20 s (before: after every queued run)
    assert (tmp_path / "r1" / "model.saved").read_text() == "1"  # one SIGINT: saved, not aborted
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()  # never started


def test_an_interrupted_run_line_lets_its_child_save_even_with_sigint_blocked(tmp_path):
    # What a cancelled Ray task sees: its thread blocks SIGINT (inherited by a child across exec)
    # and the cancel's KeyboardInterrupt is only raised when Python code runs, not in a wait
    (run,) = G.parse_grid(f"--save {tmp_path / 'r' / 'model.pt'}\n")
    started = tmp_path / "r" / "model.started"
    threading.Thread(target=lambda: (_wait_for(started), _thread.interrupt_main()), daemon=True).start()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with pytest.raises(KeyboardInterrupt):
            G.run_line(run, str(_fake_main(tmp_path)))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert (tmp_path / "r" / "model.saved").read_text() == "1"
    assert not (tmp_path / "r" / "model.ended").exists()  # stopped, not waited for to its end
