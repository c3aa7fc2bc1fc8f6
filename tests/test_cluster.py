"""Sweeps through Ray (awd_nonnormal.cluster): the same results as the process pool, and a run
whose worker dies is retried or reported, never lost. Ray is an optional extra: without it these
tests are skipped, except the one-line install hint."""

import json
import os
import sys
from pathlib import Path

import pytest

from awd_nonnormal.tasks import sweep as S
from awd_nonnormal.tasks import train as T
from awd_nonnormal.tasks.__main__ import main as tasks_main

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(task="copy", T=25, n_train=32, n_val=16, epochs=2)


def test_executor_ray_without_ray_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = tasks_main(["sweep", "--task", "copy", "--T", "25", "--models", "chain", "--lr", "1e-3",
                       "--seeds", "1", "--values", "chain=1.0", "--out", str(tmp_path),
                       "--executor", "ray", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and 'pip install -e ".[cluster]"' in err
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[cluster]"')
    old = os.environ.get("PYTHONPATH")
    # the workers import this checkout of the package, as the test does
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([old] if old else []))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = old


def _results(plan):
    out = {}
    for r in plan.runs:
        result = T.read_result(r.run_dir)
        assert result is not None, r.run_dir
        out[r.run_dir.relative_to(plan.out)] = (result["final_val_loss"], result["status"],
                                                [m["val_loss"] for m in T.read_metrics(r.run_dir)])
    return out


@pytest.mark.parametrize("ensemble", [1, 2])
def test_ray_sweep_equals_the_process_pool_and_skips_finished_runs(tmp_path, ray_session, ensemble):
    grid = S.grid_from_args(models="chain,orthogonal", lrs="1e-3", seeds="1,2",
                            values=["chain=1.0", "orthogonal=1.0"])
    pool = S.plan_sweep(grid, TINY, tmp_path / "pool")
    S.run_sweep(pool, workers=2, progress=False, ensemble=ensemble)
    on_ray = S.plan_sweep(grid, TINY, tmp_path / "ray")
    stats = S.run_sweep(on_ray, progress=False, executor="ray", ensemble=ensemble)
    assert stats["ran"] == 4 and not stats["errors"]
    assert _results(on_ray) == _results(pool)  # same seeds, one thread each: the same numbers
    again = S.run_sweep(on_ray, progress=False, executor="ray")
    assert again["skipped"] == 4 and again["ran"] == 0


@pytest.mark.parametrize("retries", [1, 0])
def test_a_killed_worker_is_retried_or_reported(tmp_path, ray_session, retries, killer_plugin):
    plugin = str(killer_plugin('test_cluster_killer'))
    grid = S.grid_from_args(models="test_cluster_killer", lrs="1e-3", seeds="1", plugins=(plugin,))
    plan = S.plan_sweep(grid, dict(TINY, init_plugins=[plugin]), tmp_path / "sweep")
    stats = S.run_sweep(plan, progress=False, executor="ray", max_retries=retries)
    assert (tmp_path / "killed").exists()  # the first attempt's worker did die
    (run,) = plan.runs
    if retries:
        assert not stats["errors"] and T.is_finished(run.run_dir)
    else:
        assert list(stats["errors"]) == [str(run.run_dir)]
        assert "lost" in stats["errors"][str(run.run_dir)]
        assert not T.is_finished(run.run_dir)
        again = S.run_sweep(plan, progress=False, executor="ray", max_retries=0)  # not lost
        assert again["ran"] == 1 and not again["errors"] and T.is_finished(run.run_dir)
    assert json.loads((run.run_dir / T.RESULT_FILE).read_text())["status"] in ("completed", "converged")


def test_language_model_grid_through_ray(tmp_path, ray_session):
    from awd_nonnormal import lmgrid as G
    from awd_nonnormal.checkpoint import load_checkpoint
    from test_lm import write_corpus
    corpus = write_corpus(tmp_path / "corpus")
    save = tmp_path / "run" / "model.pt"
    runs = G.parse_grid(f"python main.py --data {corpus} --model RNN --emsize 8 --nhid 8 "
                        f"--nlayers 1 --batch_size 4 --eval-batch-size 2 --test-batch-size 2 "
                        f"--bptt 8 --optimizer adam --lr 1e-3 --epochs 1 --no-progress "
                        f"--device cpu --save {save}\n")
    stats = G.run_grid(runs, ROOT / "main.py", executor="ray")
    assert stats["ran"] == 1 and not stats["errors"]
    assert "test" in load_checkpoint(save, kind="lm")
    assert G.run_grid(runs, ROOT / "main.py", executor="ray")["skipped"] == 1


def test_a_cancelled_language_model_run_lets_its_child_save(tmp_path, ray_session):
    # Ctrl-C under --executor ray cancels the task: its main.py child must get one SIGINT and the
    # time to save, not be killed 0.25 s later (nor, SIGINT blocked in the worker, never see it)
    from awd_nonnormal import lmgrid as G
    from test_lmgrid import _fake_main, _wait_for
    (run,) = G.parse_grid(f"--save {tmp_path / 'r' / 'model.pt'}\n")
    ref = ray_session.remote(G.run_line).options(max_retries=0).remote(run, str(_fake_main(tmp_path)))
    _wait_for(tmp_path / "r" / "model.started", 60)
    ray_session.cancel(ref)
    ready, _ = ray_session.wait([ref], timeout=20)
    assert ready  # the task ended once its child had saved
    with pytest.raises(ray_session.exceptions.TaskCancelledError):
        ray_session.get(ref)
    assert (tmp_path / "r" / "model.saved").read_text() == "1"
    assert not (tmp_path / "r" / "model.ended").exists()
