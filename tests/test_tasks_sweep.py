"""Sweeps: grid syntax and checks, interrupted and resumed sweeps, the summary; the CLI."""

import json
import math
import os

import pytest

from awd_nonnormal.tasks import __main__ as cli
from awd_nonnormal.tasks import sweep as S
from awd_nonnormal.tasks import train as T

TINY = dict(task="copy", T=25, n_train=32, n_val=16, epochs=2)
TINY_FLAGS = ["--task", "copy", "--T", "25", "--n-train", "32", "--n-val", "16", "--epochs", "2",
              "--no-progress"]


# --------------------------------------------------------------------------------------------
# grids


def test_paper_grid_sizes(tmp_path):
    grid = S.grid_from_args()
    assert grid.lrs == (8e-4, 5e-4, 3e-4, 1e-4, 8e-5, 5e-5, 3e-5, 1e-5, 8e-6, 5e-6, 3e-6)
    assert grid.seeds == (1, 2, 3, 4, 5, 6)
    sizes = {m.name: grid.size(m) for m in grid.models}
    assert sizes == {"chain": 462, "fbchain": 462, "identity": 594, "orthogonal": 594}
    models = {m.name: m for m in grid.models}
    assert models["chain"].param == "alpha" and models["chain"].values == (0.99, 1.0, 1.01, 1.02, 1.03, 1.04, 1.05)
    assert models["fbchain"].param == "beta" and dict(models["fbchain"].fixed) == {"alpha": 0.99}
    assert models["identity"].values == (0.01, 0.96, 0.99, 1.0, 1.01, 1.02, 1.03, 1.04, 1.05)
    plan = S.plan_sweep(S.grid_from_args(models="fbchain", lrs="1e-4", seeds="3"), {"task": "copy"}, tmp_path)
    r = plan.runs[2]
    assert (r.config.init.spec, r.config.init.params["alpha"], r.config.init.params["beta"], r.config.lr, r.config.seed) == \
        ("fbchain", 0.99, 0.03, 1e-4, 3)
    assert r.run_dir == tmp_path / "fbchain" / "beta0.03-lr0.0001-seed3"


def test_list_syntax():
    assert S.parse_list("0.99:1.05:0.01", "x") == (0.99, 1.0, 1.01, 1.02, 1.03, 1.04, 1.05)
    assert S.parse_list("1:6", "s", integer=True) == (1, 2, 3, 4, 5, 6)
    assert S.parse_list("1e-3, 5e-4", "lr") == (1e-3, 5e-4)
    for text, match in [("abc", "not a number"), ("1:0", "backwards"), ("1,1", "given twice"),
                        ("1:2:0", "step must be > 0"), ("1::2", "bad range"), ("", "empty"),
                        ("nan", "not a finite")]:
        with pytest.raises(S.GridError, match=match):
            S.parse_list(text, "x")
    with pytest.raises(S.GridError, match="not an integer"):
        S.parse_list("1.5", "seeds", integer=True)


def test_grid_flags_and_file(tmp_path):
    g = S.grid_from_args(models="chain,identity,plain", lrs="1e-3", seeds="1,2",
                         values=["chain=1.0,1.02", "identity=0.5"])
    m = {x.name: x for x in g.models}
    assert m["chain"].values == (1.0, 1.02) and m["identity"].values == (0.5,)
    assert m["plain"].param is None and g.size(m["plain"]) == 2
    f = tmp_path / "grid.json"
    f.write_text(json.dumps({"lr": [1e-4], "seeds": [4],
                             "models": {"mine": {"init": "chain,input=normal", "scale": [1.0, 1.1]},
                                        "fbchain": {"beta": "0.02:0.03:0.01", "alpha": 1.0}}}))
    g = S.grid_from_args(grid_file=str(f), seeds="5")
    m = {x.name: x for x in g.models}
    assert g.seeds == (5,) and g.lrs == (1e-4,)
    assert m["mine"].init == "chain,input=normal" and m["mine"].values == (1.0, 1.1)
    assert m["fbchain"].values == (0.02, 0.03) and dict(m["fbchain"].fixed) == {"alpha": 1.0}


@pytest.mark.parametrize("kw,match", [
    (dict(models="chian"), "unknown initializer 'chian'"),
    (dict(lrs="-1e-3"), "learning rates must be > 0"),
    (dict(lrs="1e-3,x"), r"--lr: 'x' is not a number"),
    (dict(seeds="1,-2"), "seeds must be >= 0"),
    (dict(values=["chain=1,abc"]), "'abc' is not a number"),
    (dict(models="chain", values=["identity=1.0"]), "model 'identity' is not in the sweep"),
    (dict(models="identity", values=["identity.beta=0.1"]), "not accepted"),
    (dict(values=["chain:1.0"]), "MODEL"),
    (dict(models="chain,chain"), "named twice"),
    (dict(task="cpy"), "unknown task"),
])
def test_grid_errors(kw, match):
    with pytest.raises((S.GridError, T.TaskError), match=match):
        S.grid_from_args(**kw)


def test_grid_file_errors(tmp_path):
    f = tmp_path / "g.json"
    f.write_text("{")
    with pytest.raises(S.GridError, match="not valid JSON"):
        S.grid_from_args(grid_file=str(f))
    f.write_text(json.dumps({"lrs": [1]}))
    with pytest.raises(S.GridError, match="unknown key.*lrs"):
        S.grid_from_args(grid_file=str(f))
    f.write_text(json.dumps({"models": {"chain": {"alpha": [1.0], "beta": [0.1]}}}))
    with pytest.raises(S.GridError, match="one parameter per model"):
        S.grid_from_args(grid_file=str(f))
    with pytest.raises(S.GridError, match="cannot read"):
        S.grid_from_args(grid_file=str(tmp_path / "missing.json"))
    # a swept parameter that the model's own spec fixes would be ignored at every grid point
    f.write_text(json.dumps({"models": {"mine": {"init": "chain:alpha=1.02", "alpha": [0.99, 1.05]}}}))
    with pytest.raises(S.GridError, match="model mine: chain: alpha is 1.02 in the init spec"):
        S.grid_from_args(grid_file=str(f))


# --------------------------------------------------------------------------------------------
# running, interrupting, resuming


def test_sweep_interrupted_then_resumed(tmp_path):
    grid = S.grid_from_args(models="chain,orthogonal", lrs="1e-3", seeds="1,2",
                            values=["chain=1.0", "orthogonal=1.0"])
    plan = S.plan_sweep(grid, TINY, tmp_path)
    assert len(plan.runs) == 4
    done = []

    def stop_after_two(run_dir, result, error):
        assert error is None
        done.append(run_dir)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        S.run_sweep(plan, workers=1, progress=False, on_run_done=stop_after_two)
    finished = [r for r in plan.runs if T.is_finished(r.run_dir)]
    assert len(finished) == 2
    mtimes = {r.run_dir: (r.run_dir / T.RESULT_FILE).stat().st_mtime_ns for r in finished}

    ran = []
    stats = S.run_sweep(plan, workers=1, progress=False, on_run_done=lambda d, r, e: ran.append(d))
    assert stats["skipped"] == 2 and stats["ran"] == 2 and not stats["errors"]
    assert sorted(ran) == sorted(str(r.run_dir) for r in plan.runs if r.run_dir not in mtimes)
    for d, t in mtimes.items():
        assert (d / T.RESULT_FILE).stat().st_mtime_ns == t  # not redone
    # the table counts successes as the result files say
    summary = S.summarize(plan)
    for name, m in summary["models"].items():
        results = [T.read_result(r.run_dir) for r in plan.runs if r.model == name]
        assert m["runs"] == m["finished"] == 2
        assert m["successes"] == sum(r["success"] for r in results)
        finals = [r["final_val_loss"] for r in results]
        assert m["best"]["final_val_loss_mean"] == pytest.approx(sum(finals) / 2)
    # a second sweep into the same folder with other task settings is refused
    with pytest.raises(T.RunConflict, match="T: 25 vs 26"):
        S.plan_sweep(grid, dict(TINY, T=26), tmp_path)


def _fake_run(run_dir, final, status="completed", success=None, curve=None, baseline=1.0):
    run_dir.mkdir(parents=True)
    curve = curve if curve is not None else [final]
    (run_dir / T.METRICS_FILE).write_text("".join(
        json.dumps({"epoch": i + 1, "val_loss": v}) + "\n" for i, v in enumerate(curve)))
    result = {"status": status, "final_val_loss": final, "min_val_loss": min(curve) if curve else None,
              "baseline": baseline,
              "success": (final is not None and final < 0.5 * baseline) if success is None else success,
              "epochs_run": len(curve)}
    (run_dir / T.RESULT_FILE).write_text(json.dumps(result))


def test_summary_counts_best_config_and_curves(tmp_path):
    grid = S.grid_from_args(models="chain", lrs="1e-3,1e-4", seeds="1,2", values=["chain=1.0,1.02"])
    plan = S.plan_sweep(grid, TINY, tmp_path)
    base = plan.baseline
    d = {(r.value, r.lr, r.seed): r.run_dir for r in plan.runs}
    _fake_run(d[1.0, 1e-3, 1], 0.1 * base, baseline=base, curve=[0.5 * base, 0.1 * base])
    _fake_run(d[1.0, 1e-3, 2], 0.3 * base, baseline=base, curve=[0.9 * base, 0.6 * base, 0.3 * base])
    _fake_run(d[1.02, 1e-3, 1], 0.01 * base, baseline=base)           # best single run...
    _fake_run(d[1.02, 1e-3, 2], None, status="diverged", curve=[])     # ...but its config diverged
    _fake_run(d[1.0, 1e-4, 1], 0.9 * base, baseline=base)
    _fake_run(d[1.0, 1e-4, 2], 0.001, status="converged", baseline=base, curve=[0.2, 0.001])
    # (1.02, 1e-4) not run at all
    s = S.summarize(plan)
    m = s["models"]["chain"]
    assert (m["runs"], m["finished"], m["successes"], m["diverged"]) == (8, 6, 4, 1)
    best = m["best"]
    assert (best["value"], best["lr"]) == (1.0, 1e-3)
    assert best["final_val_loss_mean"] == pytest.approx(0.2 * base)
    assert best["final_val_loss_sem"] == pytest.approx(0.1 * base)  # std(ddof=1)/sqrt(2)
    c = m["best_curve"]
    assert c["epoch"] == [1, 2, 3] and c["count"] == [2, 2, 1]
    assert c["mean"][0] == pytest.approx(0.7 * base) and c["mean"][2] == pytest.approx(0.3 * base)
    # a run that stopped by converging keeps its last value in the curve
    plan_min = S.summarize(plan, rank_by="min")
    assert plan_min["models"]["chain"]["best"]["lr"] in (1e-3, 1e-4)
    paths = S.write_summary(s, tmp_path)
    assert {p.name for p in paths} == {"summary.csv", "summary.json", "best_curves.png", "success_counts.png"}
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[0].startswith("model,param,value,lr")
    table = S.format_summary(s)
    assert "4/8" in table and "alpha=1 lr=0.001" in table


# --------------------------------------------------------------------------------------------
# command line


def test_cli_train_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["--task", "copy", "--T", "25", "--n-train", "32", "--n-val", "16", "--epochs", "1",
                   "--init", "chain", "--init-scale", "1.02", "--lr", "5e-5", "--seed", "3",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "final validation loss" in text and "random baseline 0.83178" in text
    assert json.loads((out / T.CONFIG_FILE).read_text())["config"]["init"]["params"]["scale"] == 1.02
    assert cli.main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert cli.main(["train", "--resume", "--out", str(out), "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.001 (run has 5e-05)" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,match", [
    (["--task", "cpy"], "unknown task 'cpy'; valid tasks: addition, copy, psmnist"),
    (["--task", "copy", "--init", "chian"], "unknown initializer 'chian'"),
    (["--lr", "abc"], "invalid float value"),
    (["--task", "psmnist", "--perm-seed", "x"], "perm-seed"),
    (["sweep", "--lr", "1e-3,x"], "--lr: 'x' is not a number"),
    (["sweep", "--models", "chain", "--values", "chain=1,abc"], "'abc' is not a number"),
    (["sweep", "--seeds", "1:0"], "runs backwards"),
    (["sweep", "--task", "nope"], "unknown task"),
    (["--task", "psmnist", "--mnist-dir", "/nonexistent", "--epochs", "1"], "getdata.sh mnist"),
])
def test_cli_errors_are_one_line(argv, match, capsys, tmp_path):
    # a missing data file is a data error (exit 1, awd_nonnormal.cli.EXIT_CODES), the rest usage (2)
    expected = 1 if "--mnist-dir" in argv else 2
    if argv[0] != "sweep":
        argv = argv + ["--out", str(tmp_path / "x")]
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors (a value of the wrong type)
        rc = exc.code
    assert rc == expected
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_sweep_with_worker_processes(tmp_path, capsys):
    argv = ["sweep", "--models", "chain", "--lr", "1e-3", "--seeds", "1,2", "--values", "chain=1.0",
            "--workers", "2", "--out", str(tmp_path), *TINY_FLAGS]
    assert cli.main(argv + ["--dry-run"]) == 0
    plan_text = capsys.readouterr().out
    assert "2 runs (0 finished)" in plan_text and "alpha in 1" in plan_text
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "chain" in text and "best config" in text and "summary.csv" in text
    for seed in (1, 2):
        assert T.is_finished(tmp_path / "chain" / f"alpha1-lr0.001-seed{seed}")
    assert json.loads((tmp_path / "sweep.json").read_text())["settings"]["T"] == 25
    assert math.isfinite(json.loads((tmp_path / "summary.json").read_text())
                         ["models"]["chain"]["best"]["final_val_loss_mean"])


def test_cli_sweep_with_a_failed_run_exits_1_without_a_traceback(tmp_path, capsys, caplog, monkeypatch):
    from awd_nonnormal.checkpoint import CheckpointError
    train = T.train

    def broken(config, run_dir, *a, **kw):
        if config.seed == 2:
            raise CheckpointError(f"{run_dir}/checkpoint.pt is damaged")
        return train(config, run_dir, *a, **kw)

    monkeypatch.setattr(T, "train", broken)
    argv = ["sweep", "--models", "chain", "--lr", "1e-3", "--seeds", "1,2", "--values", "chain=1.0",
            "--out", str(tmp_path), *TINY_FLAGS]
    assert cli.main(argv) == 1  # a data/checkpoint error (awd_nonnormal.cli.EXIT_ERROR)
    assert T.is_finished(tmp_path / "chain" / "alpha1-lr0.001-seed1")
    failed = [r for r in caplog.records if "failed" in r.getMessage() and "seed2" in r.getMessage()]
    assert failed and "is damaged" in failed[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records)  # one line, no traceback
    # an unknown error (a bug) keeps its traceback
    monkeypatch.setattr(T, "train", lambda *a, **kw: 1 / 0)
    caplog.clear()
    assert cli.main(argv) == 1
    assert any(r.exc_info is not None for r in caplog.records)


def test_psmnist_dry_run_needs_no_mnist_files(tmp_path, capsys):
    argv = ["sweep", "--task", "psmnist", "--models", "chain", "--lr", "1e-3", "--seeds", "1",
            "--values", "chain=1.0", "--mnist-dir", str(tmp_path / "none"), "--out",
            str(tmp_path / "s"), "--dry-run"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "1 runs (0 finished)" in out and "getdata.sh mnist" in out
    assert not (tmp_path / "s").exists()


def test_each_written_summary_file_is_reported_once(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    argv = ["sweep", "--models", "chain", "--lr", "1e-3", "--seeds", "1", "--values", "chain=1.0",
            "--out", str(tmp_path), *TINY_FLAGS]
    assert cli.main(argv) == 0
    said = capsys.readouterr().out + caplog.text
    for name in ("summary.csv", "summary.json", "best_curves.png", "success_counts.png"):
        assert said.count(f"wrote {tmp_path / name}") == 1, name


def _files(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
            if p.is_file()}


def test_summarize_uses_the_stored_sweep(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--models", "chain,identity", "--lr", "1e-3", "--seeds", "1,2", "--values",
            "chain=1.0", "--values", "identity=1.0", "--out", str(out), *TINY_FLAGS]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out.split("\nwrote ")[0]
    assert "chain" in table and "identity" in table
    before = _files(out)
    assert {"summary.csv", "summary.json", "sweep.json", "best_curves.png",
            "success_counts.png"} <= set(before)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("summary.csv", "summary.json", "sweep.json"):  # an ordinary file's mode
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask
    run = out / "chain" / "alpha1-lr0.001-seed1"
    assert {p.stat().st_mode & 0o777 for p in run.iterdir()} == {0o666 & ~umask}

    # Without any task or grid flag, or with flags that agree with the stored sweep: the same
    # table byte for byte, and the files left as they were.
    agreeing = [[], ["--task", "copy", "--T", "25", "--lr", "1e-3", "--seeds", "1:2"],
                ["--models", "chain,identity", "--values", "chain=1.0", "--epochs", "2"]]
    for flags in agreeing:
        assert cli.main(["sweep", "--summarize", "--out", str(out), *flags]) == 0, flags
        text = capsys.readouterr().out
        assert text.split("\nsummary files in ")[0] == table and "unchanged" in text
        assert _files(out) == before

    # A flag that disagrees is refused in one line, and nothing is written.
    refused = [(["--T", "26"], "--T 26 (the sweep has 25)"),
               (["--task", "addition"], "--task 'addition'"),
               (["--lr", "1e-4"], "--lr: lr [0.0001] (the sweep has [0.001])"),
               (["--models", "chain"], "--models/--values"),
               (["--values", "chain=1.02"], "--models/--values")]
    for flags, match in refused:
        assert cli.main(["sweep", "--summarize", "--out", str(out), *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err
        assert _files(out) == before

    # No stored sweep: one line. A real change (another ranking) is written.
    assert cli.main(["sweep", "--summarize", "--out", str(tmp_path / "none")]) == 2
    assert "holds no sweep" in capsys.readouterr().err
    assert cli.main(["sweep", "--summarize", "--out", str(out), "--rank-by", "min"]) == 0
    assert "wrote" in capsys.readouterr().out
    after = _files(out)
    assert after["summary.json"][0] != before["summary.json"][0]
    assert after["sweep.json"] == before["sweep.json"]


# --------------------------------------------------------------------------------------------
# dead processes, interrupted summaries, dry runs without data


def test_a_killed_worker_fails_its_runs_and_the_sweep_writes_its_summary(tmp_path, capsys, caplog, killer_plugin):
    plugin = str(killer_plugin('test_sweep_killer'))
    out = tmp_path / "sweep"
    argv = ["sweep", "--task", "copy", "--T", "25", "--hidden", "4", "--n-train", "16", "--n-val",
            "8", "--epochs", "1", "--no-progress", "--models", "test_sweep_killer", "--lr",
            "1e-3,1e-2,1e-1", "--seeds", "1", "--init-plugin", plugin, "--workers", "2",
            "--out", str(out)]
    assert cli.main(argv) == 1  # no BrokenProcessPool traceback: failed runs, exit status 1
    assert (tmp_path / "killed").exists()  # a worker did die
    err = capsys.readouterr().err.strip()
    assert "run(s) failed" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "worker process died" in caplog.text and (out / "summary.json").is_file()
    assert all(r.exc_info is None for r in caplog.records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["test_sweep_killer"]["finished"] < 3
    # the same command runs the failed runs again (the marker keeps the workers alive now)
    assert cli.main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["models"]["test_sweep_killer"]["finished"] == 3


def _children(pid):
    kids = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                text = open(f"/proc/{stat}/stat").read()
            except OSError:
                continue
            if int(text.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat))
    return kids


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")
def test_workers_stop_and_exit_when_the_sweep_process_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from awd_nonnormal.runs import LOCK_FILE, RunLock
    out = tmp_path / "sweep"
    log = tmp_path / "log"
    argv = ["sweep", "--task", "copy", "--T", "25", "--hidden", "4", "--n-train", "240000",
            "--n-val", "8", "--epochs", "1", "--no-progress", "--models", "chain", "--values",
            "chain=1.0", "--lr", "1e-3,1e-2", "--seeds", "1", "--workers", "2", "--out", str(out)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(log, "w") as fh:
        main = subprocess.Popen([sys.executable, "-m", "awd_nonnormal.tasks", *argv], cwd=root,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    workers = []
    try:
        runs = [out / "chain" / f"alpha1-lr{lr}-seed1" for lr in ("0.001", "0.01")]
        deadline = time.time() + 120
        while not all((r / T.CHECKPOINT_FILE).exists() for r in runs) and time.time() < deadline:
            time.sleep(0.2)
        workers.extend(_children(main.pid))
        assert len(workers) >= 2 and main.poll() is None, log.read_text()
        time.sleep(1)  # inside the training loop
        main.kill()  # SIGKILL: no chance to tell its workers
        main.wait()
        deadline = time.time() + 30
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), log.read_text()
    finally:
        main.kill()
        for w in workers:  # (old code: workers left behind)
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    text = log.read_text()
    assert text.count("checkpoint saved") == 2 and "is gone" in text, text
    for r in runs:  # not finished, and free for the rerun
        assert not T.is_finished(r)
        with RunLock(r / LOCK_FILE, str(r)):
            pass


def test_a_summary_stopped_while_drawing_is_drawn_again(tmp_path, monkeypatch):
    from awd_nonnormal import plots
    grid = S.grid_from_args(models="chain", lrs="1e-3,1e-4", seeds="1", values=["chain=1.0"])
    plan = S.plan_sweep(grid, TINY, tmp_path)
    _fake_run(plan.runs[0].run_dir, 0.8, curve=[0.9, 0.8])
    assert S.write_summary(S.summarize(plan), tmp_path)
    _fake_run(plan.runs[1].run_dir, 0.3, curve=[0.5, 0.3])  # a new best config
    draw = plots.task_loss_curves

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "task_loss_curves", killed)
    with pytest.raises(KeyboardInterrupt):
        S.write_summary(S.summarize(plan), tmp_path)
    monkeypatch.setattr(plots, "task_loss_curves", draw)
    written = S.write_summary(S.summarize(plan), tmp_path)  # not "unchanged": drawn again
    assert {p.name for p in written} == {"summary.csv", "summary.json", "best_curves.png",
                                         "success_counts.png"}
    assert S.write_summary(S.summarize(plan), tmp_path) == []


def test_an_old_best_curves_figure_goes_when_no_model_has_a_best_curve(tmp_path):
    grid = S.grid_from_args(models="chain", lrs="1e-3,1e-4", seeds="1", values=["chain=1.0"])
    plan = S.plan_sweep(grid, TINY, tmp_path)
    for r in plan.runs:
        _fake_run(r.run_dir, 0.8, curve=[0.9, 0.8])
    assert S.write_summary(S.summarize(plan), tmp_path)
    assert (tmp_path / "best_curves.png").is_file()
    # every run diverged: no best curve, and the old figure does not stay beside the new texts
    for r in plan.runs:
        (r.run_dir / T.RESULT_FILE).write_text(json.dumps(
            {"status": "diverged", "final_val_loss": None, "min_val_loss": None, "baseline": 1.0,
             "success": False, "epochs_run": 1}))
    written = S.write_summary(S.summarize(plan), tmp_path)
    assert written and not (tmp_path / "best_curves.png").exists()
    assert (tmp_path / "success_counts.png").is_file()
    assert S.write_summary(S.summarize(plan), tmp_path) == []


def test_psmnist_dry_run_without_data_beside_a_stored_psmnist_sweep(tmp_path, capsys):
    from test_tasks_train import _write_mnist
    _write_mnist(tmp_path / "mnist")
    argv = ["sweep", "--task", "psmnist", "--hidden", "4", "--n-train", "8", "--n-val", "4",
            "--epochs", "1", "--models", "chain", "--lr", "1e-3", "--seeds", "1", "--values",
            "chain=1.0", "--no-progress", "--out", str(tmp_path / "s")]
    assert cli.main(argv + ["--mnist-dir", str(tmp_path / "mnist")]) == 0
    capsys.readouterr()
    stored = (tmp_path / "s" / S.SWEEP_FILE).read_text()
    assert cli.main(argv + ["--mnist-dir", str(tmp_path / "none"), "--dry-run"]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert "1 runs (0 finished)" in out and "getdata.sh mnist" in out
    assert (tmp_path / "s" / S.SWEEP_FILE).read_text() == stored  # a dry run writes nothing
    # with the data the plan counts the finished run; other settings are still refused
    assert cli.main(argv + ["--mnist-dir", str(tmp_path / "mnist"), "--dry-run"]) == 0
    assert "1 runs (1 finished)" in capsys.readouterr().out
    argv[argv.index("--epochs") + 1] = "2"
    assert cli.main(argv + ["--mnist-dir", str(tmp_path / "none"), "--dry-run"]) == 3
    assert "epochs: 1 vs 2" in capsys.readouterr().err


def test_one_damaged_run_does_not_keep_its_ensemble_mates_from_training(tmp_path):
    """--ensemble 3 with one damaged run folder: that run fails (exit 1) and the other five
    finish, as without --ensemble; before, its whole ensemble failed on every rerun."""
    out = tmp_path / "sw"
    damaged = out / "chain" / "alpha1-lr0.001-seed1"
    damaged.mkdir(parents=True)
    (damaged / T.CONFIG_FILE).write_text('{"config": {"task": "copy"}}')
    argv = ["sweep", "--task", "copy", "--T", "25", "--hidden", "4", "--n-train", "16", "--n-val", "8",
            "--epochs", "1", "--models", "chain", "--lr", "1e-3,1e-2,1e-1", "--seeds", "1,2",
            "--values", "chain=1.0", "--threads", "1", "--no-progress", "--ensemble", "3", "--out", str(out)]
    assert cli.main(argv) == 1
    finished = sorted(p.parent.name for p in out.glob("chain/*/result.json"))
    assert len(finished) == 5 and damaged.name not in finished
