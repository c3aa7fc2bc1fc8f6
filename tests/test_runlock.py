"""One run folder, one writer; outputs checked before any work; divergence is not success;
leftover temporary files; a run's identity includes its data (issue: nothing corrupt, nothing
mixed)."""

import gzip
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import analyze
import main as lm_main
from awd_nonnormal import cli, runs
from awd_nonnormal.checkpoint import load_checkpoint
from awd_nonnormal.posthoc import discover
from awd_nonnormal.tasks import __main__ as tasks_main
from awd_nonnormal.tasks import data as D
from awd_nonnormal.tasks import sweep as S
from awd_nonnormal.tasks import train as T

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).parent / "fixtures" / "legacy_v1" / "corpus"
LM = ["--data", "corpus", "--emsize", "4", "--nhid", "4", "--nlayers", "1", "--epochs", "1",
      "--batch_size", "4", "--bptt", "8", "--eval-batch-size", "2", "--test-batch-size", "2",
      "--device", "cpu", "--no-progress"]
TASK = ["--task", "copy", "--T", "25", "--hidden", "4", "--n-train", "16", "--n-val", "8",
        "--epochs", "1", "--device", "cpu", "--no-progress"]
SWEEP = ["sweep", *TASK, "--models", "chain", "--lr", "1e-3", "--seeds", "1",
         "--values", "chain=1.0"]


@pytest.fixture(autouse=True)
def _in_tmp_with_a_corpus(tmp_path, monkeypatch):
    """Run in tmp_path, with a copy of the fixture corpus as ./corpus (its cache goes there)."""
    shutil.copytree(CORPUS, tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)


def _exit(fn, argv):
    try:
        return fn(argv)
    except SystemExit as exc:  # argparse
        return exc.code


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


HOLDER = """
import sys, time
from awd_nonnormal.runs import RunLock
with RunLock(sys.argv[1], "test"):
    print("locked", flush=True)
    time.sleep(600)
"""


def _hold(lock_path):
    """A process that holds the lock ``lock_path`` (as a running writer does) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# --------------------------------------------------------------------------------------------
# One writer
# --------------------------------------------------------------------------------------------

def test_lock_is_exclusive_nested_in_one_process_and_free_after_kill_9(tmp_path):
    lock = tmp_path / "run" / runs.LOCK_FILE
    holder = _hold(lock)
    try:
        with pytest.raises(runs.RunLocked, match=f"pid {holder.pid}"):
            with runs.RunLock(lock, "the run"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kill -9 released it: this process takes it, and may take it again inside
    with runs.RunLock(lock, "the run"):
        with runs.RunLock(lock, "the run"):
            pass
        probe = subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(600)", "pass"),
                                str(lock)], cwd=ROOT, capture_output=True, text=True)
        assert probe.returncode != 0 and "RunLocked" in probe.stderr  # still held after the inner exit
    again = subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(600)", "pass"),
                            str(lock)], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr


def test_a_failed_start_leaves_no_folder_behind(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError):
        with runs.RunLock(tmp_path / "x" / "a" / "b" / runs.LOCK_FILE, "the run"):
            raise ValueError("bad input")
    assert list((tmp_path / "x").iterdir()) == []


# (command, argv, lock file, files the refused writer must not have written)
WRITERS = {
    "lm": (lm_main.main, LM + ["--save", "{d}/model.pt"], "{d}/.model.lock",
           ["model.pt", "model.latest.pt", "model.metrics.jsonl"]),
    "task": (tasks_main.main, ["train", *TASK, "--out", "{d}"], "{d}/.lock",
             ["config.json", "checkpoint.pt", "metrics.jsonl", "result.json"]),
    "sweep": (tasks_main.main, [*SWEEP, "--out", "{d}"], "{d}/.lock",
              ["sweep.json", "chain", "summary.csv"]),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_second_writer_is_refused_in_one_line_and_a_killed_one_does_not_block(kind, tmp_path, capsys):
    fn, argv, lock, files = WRITERS[kind]
    d = tmp_path / "out"
    argv = [a.replace("{d}", str(d)) for a in argv]
    holder = _hold(lock.replace("{d}", str(d)))
    try:
        assert _exit(fn, argv) == cli.EXIT_RUN_EXISTS
        line = _one_line(capsys)
        assert "being written by another process" in line and f"pid {holder.pid}" in line
        assert not any((d / f).exists() for f in files)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _exit(fn, argv) == cli.EXIT_OK, capsys.readouterr().err
    assert all((d / f).exists() for f in files[:2])


def test_a_sweep_run_locked_by_another_process_is_an_error_of_that_run_only(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = [*SWEEP[:-1], "chain=1.0,1.01", "--out", str(out)]
    holder = _hold(out / "chain" / "alpha1-lr0.001-seed1" / runs.LOCK_FILE)
    try:  # the other runs go on; the sweep then exits 1 for the run it could not train
        assert _exit(tasks_main.main, argv) == cli.EXIT_ERROR
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert T.is_finished(out / "chain" / "alpha1.01-lr0.001-seed1")
    assert not T.is_finished(out / "chain" / "alpha1-lr0.001-seed1")


def test_default_lm_run_folder_is_unique_per_process():
    code = "import main; print(main._default_save())"
    a, b = (subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip() for _ in range(2))
    assert a != b and a.startswith("runs/") and a.endswith("/model.pt")


# --------------------------------------------------------------------------------------------
# Outputs checked before any work
# --------------------------------------------------------------------------------------------

def _file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


# name -> (command, argv with {bad}, words); {bad} lies under a regular file or in /proc
UNWRITABLE = {
    "main.py --save": (lm_main.main, lambda bad: [*LM, "--data", "no/such/corpus",
                                                  "--save", f"{bad}/model.pt"]),
    "main.py --resume --save": (lm_main.main, lambda bad: ["--resume", "no/such/model.latest.pt",
                                                            "--save", f"{bad}/model.pt"]),
    "tasks --out": (tasks_main.main, lambda bad: ["train", *TASK, "--task", "psmnist",
                                                  "--mnist-dir", "no/such/mnist", "--out", bad]),
    "sweep --out": (tasks_main.main, lambda bad: [*SWEEP, "--out", bad]),
    "analyze.py --out": (analyze.main, lambda bad: ["no/such/checkpoint.pt", "--out", bad]),
    "analyze.py --json": (analyze.main, lambda bad: ["no/such/checkpoint.pt", "--no-figures",
                                                     "--json", f"{bad}/a.json"]),
}


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
@pytest.mark.parametrize("name", sorted(UNWRITABLE))
def test_an_unwritable_output_is_refused_before_the_data_are_read(name, where, tmp_path, capsys):
    fn, argv = UNWRITABLE[name]
    bad = str(_file(tmp_path) / "sub") if where == "under a file" else "/proc/awd-nonnormal-test/x"
    # the data named are missing: the error must be about the output, so it came first
    assert _exit(fn, argv(bad)) == cli.EXIT_USAGE
    line = _one_line(capsys)
    assert bad in line and ("a file, not a folder" in line if where == "under a file"
                            else "cannot write in /proc" in line), line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into a read-only folder anyway")
def test_a_read_only_folder_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert _exit(tasks_main.main, ["train", *TASK, "--out", str(ro / "run")]) == cli.EXIT_USAGE
    assert "cannot write in" in _one_line(capsys)


def test_an_output_file_that_is_a_folder(tmp_path):
    empty = tmp_path / "x"
    empty.mkdir()
    with pytest.raises(runs.OutputError, match="is a folder, not a file"):
        runs.check_output_file(empty, "--json")
    runs.check_output_file(empty / "new" / "deeper" / "a.json", "--json")  # may be created
    assert list(empty.iterdir()) == []  # the check creates nothing


# --------------------------------------------------------------------------------------------
# Divergence is not success
# --------------------------------------------------------------------------------------------

def _model(run_dir):
    return load_checkpoint(Path(run_dir) / T.CHECKPOINT_FILE, kind="task")["model"]


def test_a_finite_absurd_validation_loss_is_diverged_and_the_checkpoint_is_the_last_good_one(
        tmp_path, monkeypatch):
    config = T.make_config(task="copy", T=25, hidden=4, n_train=16, n_val=8, epochs=3, lr=1e-3)
    opts = T.RunOptions(progress=False)
    T.train(T.make_config(**{**config.to_dict(), "epochs": 1}), tmp_path / "one", opts)
    real = T.evaluate
    calls = []

    def absurd_second_epoch(*a, **kw):
        calls.append(1)
        out = real(*a, **kw)
        return {**out, "loss": 1e21} if len(calls) == 2 else out

    monkeypatch.setattr(T, "evaluate", absurd_second_epoch)
    r = T.train(config, tmp_path / "run", opts).result
    assert r["status"] == "diverged" and r["success"] is False and r["final_val_loss"] is None
    assert "validation loss reached 1e+21" in r["message"] and r["epochs_run"] == 2
    ck = load_checkpoint(tmp_path / "run" / T.CHECKPOINT_FILE, kind="task")
    assert ck["epoch"] == 1 and ck["result"]["status"] == "diverged"
    good = _model(tmp_path / "one")  # a one-epoch run: the same first epoch
    assert all(torch.equal(ck["model"][k], good[k]) for k in good)


def test_a_loss_below_the_limit_is_not_divergence():
    guard = runs.NonFiniteGuard(max_skipped=1)
    guard.check_loss(999.0, "loss", "here", limit=1000.0)
    with pytest.raises(runs.Diverged, match="above the divergence limit"):
        guard.check_loss(1001.0, "loss", "here", limit=1000.0)


def test_an_overflowing_task_run_exits_diverged_with_its_initial_state_kept(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--task", "copy", "--T", "30", "--n-train", "48", "--n-val", "32",
            "--epochs", "3", "--lr", "1e-3", "--init", "chain", "--init-scale", "7", "--seed", "2",
            "--out", str(out), "--no-progress", "--device", "cpu"]
    assert _exit(tasks_main.main, argv) == cli.EXIT_DIVERGED
    assert "diverged" in capsys.readouterr().out
    model = _model(out)
    config = T.stored_config(out)
    fresh = T.build_model(T.config_from_dict(config)).state_dict()
    assert all(torch.equal(model[k], fresh[k]) for k in fresh)


# --------------------------------------------------------------------------------------------
# Leftover temporary files
# --------------------------------------------------------------------------------------------

def test_leftover_temporaries_are_removed_on_the_next_start(tmp_path, capsys):
    out = tmp_path / "task"
    argv = ["train", *TASK, "--epochs", "2", "--out", str(out)]
    out.mkdir()  # a run killed in the middle of its writes left these
    left = [out / ".checkpoint.pt.k2j4_x9a.tmp", out / ".metrics.jsonl.abcdefgh.tmp"]
    kept = [out / "notes.tmp", out / ".notes.tmp"]
    for f in left + kept:
        f.write_text("half")
    assert _exit(tasks_main.main, argv) == cli.EXIT_OK
    assert not any(f.exists() for f in left) and all(f.exists() for f in kept)

    lm_dir = tmp_path / "lm"
    lm_dir.mkdir()
    mine = [lm_dir / ".model.latest.pt.q1w2e3r4.tmp", lm_dir / ".model.e3.pt.zzzzzzzz.tmp"]
    other = [lm_dir / ".model2.pt.q1w2e3r4.tmp", lm_dir / ".model.v2.pt.q1w2e3r4.tmp"]
    for f in mine + other:
        f.write_text("half")
    assert _exit(lm_main.main, [*LM, "--save", str(lm_dir / "model.pt")]) == cli.EXIT_OK
    assert not any(f.exists() for f in mine) and all(f.exists() for f in other)


def test_folder_listings_skip_leftover_temporaries(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".checkpoint.pt.abcdefgh.tmp").write_text("half")
    (tmp_path / "run" / "checkpoint.pt").write_text("x")
    found = discover([str(tmp_path)], patterns=("*.pt*", "*.tmp"))
    assert [c.path.name for c in found] == ["checkpoint.pt"]
    found = discover([str(tmp_path / "run" / "*")])
    assert [c.path.name for c in found] == ["checkpoint.pt"]


# --------------------------------------------------------------------------------------------
# A run's identity includes its data
# --------------------------------------------------------------------------------------------

def _write_mnist(folder, seed, gz=True):
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", 12), ("t10k", 6)):
        imgs = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labs = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        data = {"images-idx3": struct.pack(">iiii", 2051, n, 28, 28) + imgs.numpy().tobytes(),
                "labels-idx1": struct.pack(">ii", 2049, n) + labs.numpy().tobytes()}
        for kind, raw in data.items():
            name = folder / f"{split}-{kind}-ubyte"
            if gz:
                with gzip.open(f"{name}.gz", "wb") as fh:
                    fh.write(raw)
            else:
                name.write_bytes(raw)
    return folder


PSMNIST = ["train", "--task", "psmnist", "--hidden", "4", "--n-train", "8", "--n-val", "4",
           "--epochs", "1", "--no-progress", "--device", "cpu"]


def test_mnist_fingerprint_is_the_data_not_the_files(tmp_path):
    a = D.mnist_fingerprint(_write_mnist(tmp_path / "a", seed=1))
    raw = D.mnist_fingerprint(_write_mnist(tmp_path / "a-raw", seed=1, gz=False))
    b = D.mnist_fingerprint(_write_mnist(tmp_path / "b", seed=2))
    assert a == raw != b and len(a) == 64
    # holdout reads no t10k: its fingerprint leaves it out
    assert D.mnist_fingerprint(tmp_path / "a", ("train",)) != a


def test_the_same_psmnist_command_on_two_idx_sets_trains_twice(tmp_path, capsys):
    sets = {k: _write_mnist(tmp_path / k, seed) for k, seed in (("a", 1), ("b", 2))}
    heads = {}
    for k in ("a", "b", "a"):
        assert _exit(tasks_main.main, [*PSMNIST, "--mnist-dir", str(sets[k])]) == cli.EXIT_OK
        heads.setdefault(k, []).append(capsys.readouterr().out.splitlines()[0])
    assert "completed" in heads["a"][0] and "completed" in heads["b"][0]
    assert "already finished" in heads["a"][1]
    folders = sorted((tmp_path / "runs" / "tasks").iterdir())
    assert len(folders) == 2
    prints = {json.loads((f / T.CONFIG_FILE).read_text())["config"]["data_fingerprint"] for f in folders}
    assert prints == {D.mnist_fingerprint(sets["a"]), D.mnist_fingerprint(sets["b"])}


def test_resuming_a_psmnist_run_on_other_data_is_refused(tmp_path, capsys):
    a, b = _write_mnist(tmp_path / "a", 1), _write_mnist(tmp_path / "b", 2)
    out = tmp_path / "run"
    assert _exit(tasks_main.main, [*PSMNIST, "--mnist-dir", str(a), "--out", str(out)]) == 0
    capsys.readouterr()
    argv = ["train", "--resume", "--out", str(out), "--epochs", "2", "--no-progress"]
    # a data error, exit 1, as main.py's refusal to resume a language model on another corpus
    assert _exit(tasks_main.main, [*argv, "--mnist-dir", str(b)]) == cli.EXIT_ERROR
    assert "other data" in _one_line(capsys)
    assert len(T.read_metrics(out)) == 1 and T.is_finished(out)  # untouched


def test_a_psmnist_sweep_on_other_data_trains_again_beside_the_first(tmp_path, capsys):
    sets = {k: _write_mnist(tmp_path / k, seed) for k, seed in (("a", 1), ("b", 2))}
    prints = {k: D.mnist_fingerprint(v) for k, v in sets.items()}
    assert prints["a"][:8] != prints["b"][:8]
    out = tmp_path / "s"
    sweep = ["sweep", *PSMNIST[1:], "--models", "chain", "--lr", "1e-3", "--seeds", "1",
             "--values", "chain=1.0", "--out", str(out)]
    for k in ("a", "b"):
        assert _exit(tasks_main.main, [*sweep, "--dry-run", "--mnist-dir", str(sets[k])]) == cli.EXIT_OK
        assert "(0 finished)" in capsys.readouterr().out  # the other data's run is not this one's
        assert _exit(tasks_main.main, [*sweep, "--mnist-dir", str(sets[k])]) == cli.EXIT_OK
        capsys.readouterr()
        summary = json.loads((out / "summary.json").read_text())
        (row,) = summary["models"]["chain"]["configs"]
        assert row["seeds_finished"] == 1 and len(row["run_dirs"]) == 1
        # the summary and sweep.json describe this data set only
        assert row["run_dirs"][0].endswith(f"-data{prints[k][:8]}")
        assert json.loads((out / S.SWEEP_FILE).read_text())["settings"]["data_fingerprint"] == prints[k]
    # both data sets' runs are there, each with its own data in its config
    runs_by_data = {T.stored_config(r)["data_fingerprint"]: r for r in (out / "chain").iterdir()}
    assert set(runs_by_data) == set(prints.values())
    for k, fp in prints.items():
        assert runs_by_data[fp].name == f"alpha1-lr0.001-seed1-data{fp[:8]}"
        assert T.is_finished(runs_by_data[fp]) and len(T.read_metrics(runs_by_data[fp])) == 1
    # the first data again: its run is finished, nothing trains
    before = {fp: T.read_metrics(r) for fp, r in runs_by_data.items()}
    assert _exit(tasks_main.main, [*sweep, "--dry-run", "--mnist-dir", str(sets["a"])]) == cli.EXIT_OK
    assert "(1 finished)" in capsys.readouterr().out
    assert _exit(tasks_main.main, [*sweep, "--mnist-dir", str(sets["a"])]) == cli.EXIT_OK
    capsys.readouterr()
    assert {fp: T.read_metrics(r) for fp, r in runs_by_data.items()} == before
    (row,) = json.loads((out / "summary.json").read_text())["models"]["chain"]["configs"]
    assert row["run_dirs"] == [str(runs_by_data[prints["a"]])]
    # other task settings in the same folder are still refused
    assert _exit(tasks_main.main, [*sweep, "--mnist-dir", str(sets["a"]), "--hidden", "5"]) == cli.EXIT_RUN_EXISTS
    assert "hidden" in _one_line(capsys)


def test_a_psmnist_sweep_stored_without_a_fingerprint_keeps_its_folders(tmp_path, capsys, caplog):
    mnist = _write_mnist(tmp_path / "a", 1)
    out = tmp_path / "s"
    sweep = ["sweep", *PSMNIST[1:], "--models", "chain", "--lr", "1e-3", "--seeds", "1",
             "--values", "chain=1.0", "--out", str(out), "--mnist-dir", str(mnist)]
    assert _exit(tasks_main.main, sweep) == cli.EXIT_OK
    capsys.readouterr()
    (run,) = (out / "chain").iterdir()
    # as written before sweeps recorded their data: plain run folders, no fingerprint stored
    record = json.loads((out / S.SWEEP_FILE).read_text())
    del record["settings"]["data_fingerprint"]
    (out / S.SWEEP_FILE).write_text(json.dumps(record))
    plain = run.with_name("alpha1-lr0.001-seed1")
    run.rename(plain)
    metrics = T.read_metrics(plain)
    for _ in range(2):  # and it stays so: the second time warns again, nothing trains
        with caplog.at_level(logging.WARNING):
            assert _exit(tasks_main.main, sweep) == cli.EXIT_OK
        capsys.readouterr()
        assert "records no data fingerprint" in caplog.text
        caplog.clear()
        assert [p.name for p in (out / "chain").iterdir()] == [plain.name]
        assert T.read_metrics(plain) == metrics
    assert "data_fingerprint" not in json.loads((out / S.SWEEP_FILE).read_text())["settings"]


def test_a_run_stored_without_a_fingerprint_still_counts_and_resumes(tmp_path, capsys, caplog):
    mnist = _write_mnist(tmp_path / "a", 1)
    out = tmp_path / "old"
    argv = [*PSMNIST, "--mnist-dir", str(mnist), "--out", str(out)]
    assert _exit(tasks_main.main, argv) == cli.EXIT_OK
    # as written before runs recorded their data: no fingerprint in the config or the checkpoint
    record = json.loads((out / T.CONFIG_FILE).read_text())
    del record["config"]["data_fingerprint"]
    (out / T.CONFIG_FILE).write_text(json.dumps(record))
    ck = load_checkpoint(out / T.CHECKPOINT_FILE)
    del ck["config"]["data_fingerprint"]
    torch.save(ck, out / T.CHECKPOINT_FILE)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert _exit(tasks_main.main, argv) == cli.EXIT_OK
    assert "already finished" in capsys.readouterr().out
    assert "records no data fingerprint" in caplog.text
    # --resume with more epochs goes on training it
    assert _exit(tasks_main.main, ["train", "--resume", "--out", str(out), "--epochs", "2",
                                   "--mnist-dir", str(mnist), "--no-progress"]) == cli.EXIT_OK
    assert len(T.read_metrics(out)) == 2


def test_a_language_model_resumes_only_on_its_own_text(tmp_path, capsys, caplog):
    save = tmp_path / "lm" / "model.pt"
    assert _exit(lm_main.main, [*LM, "--save", str(save)]) == cli.EXIT_OK
    latest = str(save.with_name("model.latest.pt"))
    ck = load_checkpoint(latest)
    assert len(ck["data_fingerprint"]) == 64
    # one more line of known words at the end of the test split: the same vocabulary, other text
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "valid", "test"):
        text = (CORPUS / f"{split}.txt").read_text()
        if split == "test":
            text += (CORPUS / "train.txt").read_text().splitlines()[0] + "\n"
        (other / f"{split}.txt").write_text(text)
    capsys.readouterr()
    argv = ["--resume", latest, "--epochs", "2", "--no-progress", "--device", "cpu"]
    assert _exit(lm_main.main, [*argv, "--data", str(other)]) == cli.EXIT_ERROR
    assert "another text" in _one_line(capsys)
    # a checkpoint written before checkpoints recorded the text resumes with a warning
    old = dict(ck)
    del old["data_fingerprint"]
    torch.save(old, latest)
    with caplog.at_level(logging.WARNING):
        assert _exit(lm_main.main, argv) == cli.EXIT_OK
    assert "records no data fingerprint" in caplog.text


def test_an_ensemble_locks_every_member_folder(tmp_path):
    from awd_nonnormal.tasks import ensemble as E
    configs = [T.make_config(task="copy", T=25, hidden=4, n_train=16, n_val=8, epochs=1, lr=lr)
               for lr in (1e-3, 2e-3)]
    dirs = [tmp_path / "e1", tmp_path / "e2"]
    holder = _hold(dirs[1] / runs.LOCK_FILE)
    try:
        with pytest.raises(runs.RunLocked, match="e2"):
            E.train_ensemble(configs, dirs, T.RunOptions(progress=False, device="cpu"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not (dirs[0] / T.CONFIG_FILE).exists()  # refused before anything was written
    outs = E.train_ensemble(configs, dirs, T.RunOptions(progress=False, device="cpu"))
    assert [o.result["status"] for o in outs] == ["completed", "completed"]
