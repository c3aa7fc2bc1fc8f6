"""Batched ensembles: each member is the run the single-run trainer makes of its config."""

import math

import pytest
import torch

from awd_nonnormal.checkpoint import load_checkpoint
from awd_nonnormal.rnn import rnn_reference
from awd_nonnormal.tasks import ensemble as E
from awd_nonnormal.tasks import train as T

OPTS = T.RunOptions(progress=False, eval_batch_size=64)


def tiny(task="copy", **kw):
    base = dict(task=task, T=22 if task == "copy" else 12, n_train=40, n_val=24, epochs=2, init="chain", clip=1.0)
    base.update(kw)
    return T.make_config(**base)


# Members that differ in everything a member may: initializer and its gain, lr, seed, clipping.
MEMBERS = [dict(lr=1e-3, seed=1, init_scale=1.0, clip_mode="tensor"),
           dict(lr=3e-3, seed=2, init_scale=1.02, clip_mode="global"),
           dict(lr=2e-3, seed=3, init="orthogonal", init_scale=0.99, clip_mode="global"),
           dict(lr=5e-4, seed=1, init="identity", init_scale=1.0, clip_mode="tensor")]


def _ckpt(run_dir):
    return load_checkpoint(run_dir / T.CHECKPOINT_FILE, kind="task")


def _assert_same_run(a, b, run_a, run_b):
    assert a.result["status"] == b.result["status"]
    assert a.result["epochs_run"] == b.result["epochs_run"]
    for ra, rb in zip(a.metrics, b.metrics, strict=True):
        assert ra["epoch"] == rb["epoch"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-4)
    ca, cb = _ckpt(run_a), _ckpt(run_b)
    assert set(ca) == set(cb)  # the same checkpoint entries (analyze.py, --resume read them)
    assert ca["config"] == cb["config"] and ca["arch"] == cb["arch"]
    assert ca["derived"] == cb["derived"] and ca.get("result", {}).get("status") == \
        cb.get("result", {}).get("status")
    assert set(ca["model"]) == set(cb["model"])
    for k in cb["model"]:
        # RMSprop divides by the root of the gradient's running square: where that is at rounding
        # level (a relu unit at its kink), rounding moves a weight by up to a step (lr 3e-3 here)
        torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=1e-4, atol=1e-4)
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert set(sa) == set(sb)
    for k in sb:
        assert float(sa[k]["step"]) == float(sb[k]["step"])
        torch.testing.assert_close(sa[k]["square_avg"], sb[k]["square_avg"], rtol=1e-4, atol=1e-9)
    assert ca["optimizer"]["param_groups"] == cb["optimizer"]["param_groups"]
    for k in cb["initial_rnn"]:
        assert torch.equal(ca["initial_rnn"][k], cb["initial_rnn"][k])
    assert (ca["epoch"], ca["batch"]) == (cb["epoch"], cb["batch"])


@pytest.mark.parametrize("task", ["copy", "addition"])
def test_member_equals_the_same_run_alone(tmp_path, task):
    configs = [tiny(task, **m) for m in MEMBERS]
    dirs = [tmp_path / f"ens{i}" for i in range(len(configs))]
    outcomes = E.train_ensemble(configs, dirs, OPTS)
    singles = [T.train(c, tmp_path / f"single{i}", OPTS) for i, c in enumerate(configs)]
    for i in range(len(configs)):
        _assert_same_run(outcomes[i], singles[i], dirs[i], tmp_path / f"single{i}")
        assert (dirs[i] / T.RESULT_FILE).is_file() and (dirs[i] / T.CONFIG_FILE).is_file()
        assert T.read_metrics(dirs[i]) == outcomes[i].metrics
        assert T.stored_config(dirs[i]) == configs[i].to_dict()
    # the members really differ: every pair of single runs ends in other weights
    finals = [_ckpt(tmp_path / f"single{i}")["model"]["rnn.weight_hh_l0"] for i in range(4)]
    assert all(not torch.allclose(finals[i], finals[j], atol=1e-4)
               for i in range(4) for j in range(i + 1, 4))


def test_both_clip_modes_matter_and_reach_their_member(tmp_path):
    # The same config under the two clip modes trains differently (clipping is active at
    # clip 0.1), and an ensemble holding both gives each member its own mode.
    configs = [tiny(clip=0.1, clip_mode=mode, lr=1e-3) for mode in ("tensor", "global")]
    singles = [T.train(c, tmp_path / f"s{i}", OPTS) for i, c in enumerate(configs)]
    assert singles[0].metrics[-1]["val_loss"] != pytest.approx(singles[1].metrics[-1]["val_loss"],
                                                                rel=1e-4)
    outcomes = E.train_ensemble(configs[::-1], [tmp_path / "e1", tmp_path / "e0"], OPTS)
    _assert_same_run(outcomes[1], singles[0], tmp_path / "e0", tmp_path / "s0")
    _assert_same_run(outcomes[0], singles[1], tmp_path / "e1", tmp_path / "s1")


def test_psmnist_members_with_their_own_permutations(tmp_path):
    from test_tasks_train import _write_mnist

    _write_mnist(tmp_path / "mnist")
    opts = T.RunOptions(progress=False, eval_batch_size=64, mnist_dir=str(tmp_path / "mnist"))
    base = dict(task="psmnist", n_train=20, n_val=8, epochs=2, init="chain", clip=1.0)
    configs = [T.make_config(**base, seed=7, lr=1e-3, perm_seed="run"),
               T.make_config(**base, seed=8, lr=2e-3, perm_seed="run", clip_mode="global"),
               T.make_config(**base, seed=7, lr=5e-4)]  # the fixed permutation
    outs = E.train_ensemble(configs, [tmp_path / f"e{i}" for i in range(3)], opts)
    for i, c in enumerate(configs):
        alone = T.train(c, tmp_path / f"s{i}", opts)
        _assert_same_run(outs[i], alone, tmp_path / f"e{i}", tmp_path / f"s{i}")
        assert outs[i].metrics[-1]["val_acc"] == alone.metrics[-1]["val_acc"]
        assert torch.equal(_ckpt(tmp_path / f"e{i}")["permutation"], _ckpt(tmp_path / f"s{i}")["permutation"])
        assert T.stored_config(tmp_path / f"e{i}") == T.stored_config(tmp_path / f"s{i}")


def test_ensemble_layer_matches_the_reference_loop():
    # The hand-written batched BPTT against plain autograd over each member on its own.
    gen = torch.Generator().manual_seed(0)
    M, T_, B, d, N = 3, 7, 4, 5, 6
    x = torch.randn(M, T_, B, d, generator=gen)
    w_ih = torch.randn(M, N, d, generator=gen).requires_grad_()
    w_hh = (0.5 * torch.randn(M, N, N, generator=gen)).requires_grad_()
    b = torch.randn(M, N, generator=gen).requires_grad_()
    seed = torch.randn(M, T_, B, N, generator=gen)
    for nl in ("elu", "relu", "tanh", "linear"):
        h = E.ensemble_rnn(x, w_ih, w_hh, b, nl)
        grads = torch.autograd.grad((h * seed).sum(), (w_ih, w_hh, b))
        for m in range(M):
            wi, wh, bm = (t.detach()[m].clone().requires_grad_() for t in (w_ih, w_hh, b))
            ref, _ = rnn_reference(x[m], torch.zeros(1, B, N), [(wi, wh, bm, None)], nl)
            torch.testing.assert_close(h[m], ref, rtol=1e-5, atol=1e-5)
            ref_grads = torch.autograd.grad((ref * seed[m]).sum(), (wi, wh, bm))
            for g, r in zip(grads, ref_grads):
                torch.testing.assert_close(g[m], r, rtol=1e-4, atol=1e-4)


def test_nan_in_one_member_leaves_the_others_alone(tmp_path):
    good = [tiny(**MEMBERS[i]) for i in range(3)]
    bad = tiny(lr=1e-3, seed=5, init_scale=1e30)  # chain alpha 1e30: the activity overflows

    def record(into):
        return lambda epoch, batch, losses: into.append(
            {k.rsplit("/", 1)[-1]: v for k, v in losses.items()})

    with_bad, without = [], []
    outs = E.train_ensemble(good[:2] + [bad] + good[2:], [tmp_path / n for n in ("a", "b", "x", "c")],
                            OPTS, on_batch=record(with_bad))
    ref = E.train_ensemble(good, [tmp_path / "ref" / n for n in ("a", "b", "c")], OPTS,
                           on_batch=record(without))
    assert not math.isfinite(with_bad[0]["x"])
    assert all("x" not in row for row in with_bad[1:])  # it left the batch
    assert [{k: v for k, v in row.items() if k != "x"} for row in with_bad] == without
    losses = lambda o: [(r["train_loss"], r["val_loss"]) for r in o.metrics]  # noqa: E731
    assert [losses(o) for o in (outs[0], outs[1], outs[3])] == [losses(o) for o in ref]
    assert outs[2].result["status"] == "diverged" and outs[2].result["success"] is False
    assert "training loss became" in outs[2].result["message"]
    # its files are those the single-run trainer writes for the same run
    single = T.train(bad, tmp_path / "single-bad", OPTS)
    assert single.result["status"] == "diverged"
    assert {k: v for k, v in single.result.items() if k != "time"} == \
        {k: v for k, v in outs[2].result.items() if k != "time"}
    _assert_same_run(outs[2], single, tmp_path / "x", tmp_path / "single-bad")


def test_overflowing_member_follows_the_single_run_rule(tmp_path):
    # chain(7) over 30 steps: a finite loss whose gradient's squared norm overflows float32, so
    # clipping zeroes its updates until a whole epoch of them ends it as diverged (the rule of
    # the single-run trainer); its neighbour trains on untouched.
    over = T.make_config(task="copy", T=30, n_train=48, n_val=32, epochs=3, lr=1e-3,
                         init="chain", init_scale=7.0, seed=2)
    fine = T.make_config(task="copy", T=30, n_train=48, n_val=32, epochs=3, lr=1e-3,
                         init="chain", init_scale=1.0, seed=2)
    outs = E.train_ensemble([over, fine], [tmp_path / "over", tmp_path / "fine"], OPTS)
    for i, c in enumerate((over, fine)):
        alone = T.train(c, tmp_path / f"alone{i}", OPTS)
        _assert_same_run(outs[i], alone, tmp_path / ("over", "fine")[i], tmp_path / f"alone{i}")
        assert outs[i].result.get("message") == alone.result.get("message")
    assert outs[0].result["status"] == "diverged" and "overflowed in 3 batches" in outs[0].result["message"]
    assert outs[1].result["status"] == "completed"


def test_early_stop_per_member(tmp_path):
    # A member whose stop threshold is above its first validation loss stops after epoch 1
    # and leaves; the other trains on, exactly as alone.
    stop = tiny(lr=1e-3, seed=1, stop_loss=100.0, epochs=3)
    go = tiny(lr=1e-3, seed=2, epochs=3)
    outs = E.train_ensemble([stop, go], [tmp_path / "stop", tmp_path / "go"], OPTS)
    assert outs[0].result["status"] == "converged" and outs[0].result["epochs_run"] == 1
    assert outs[1].result["status"] == "completed" and outs[1].result["epochs_run"] == 3
    _assert_same_run(outs[0], T.train(stop, tmp_path / "s-stop", OPTS), tmp_path / "stop",
                     tmp_path / "s-stop")
    _assert_same_run(outs[1], T.train(go, tmp_path / "s-go", OPTS), tmp_path / "go",
                     tmp_path / "s-go")


@pytest.mark.parametrize("stop_at", [(0, 1), (0, 2), (1, 0)])  # (0, 2): an epoch's last batch
def test_interrupted_ensemble_resumes_exactly(tmp_path, stop_at):
    configs = [tiny(**m, epochs=3) for m in MEMBERS[:3]]
    full = E.train_ensemble(configs, [tmp_path / "full" / str(i) for i in range(3)], OPTS)

    def stop(epoch, batch, losses):
        if (epoch, batch) == stop_at:
            raise KeyboardInterrupt

    dirs = [tmp_path / "cut" / str(i) for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        E.train_ensemble(configs, dirs, OPTS, on_batch=stop)
    assert not any(T.is_finished(d) for d in dirs)
    # the first member finishes alone with the single-run trainer, the rest as an ensemble
    alone = T.train(configs[0], dirs[0], OPTS)
    rest = E.train_ensemble(configs, dirs, OPTS)
    assert rest[0].skipped and rest[0].result == alone.result
    assert all(o.resumed_from is not None for o in rest[1:])
    for i in range(3):
        a, b = full[i].metrics, T.read_metrics(dirs[i])
        assert [r["val_loss"] for r in a] == pytest.approx([r["val_loss"] for r in b], rel=1e-5)
        assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-5)
        for k, v in _ckpt(dirs[i])["model"].items():
            torch.testing.assert_close(v, _ckpt(tmp_path / "full" / str(i))["model"][k],
                                       rtol=1e-4, atol=1e-6)


def test_second_ctrl_c_inside_an_update_saves_nothing(tmp_path, monkeypatch):
    from test_tasks_train import _hard_interrupt_inside
    configs = [tiny(**m) for m in MEMBERS[:2]]
    dirs = [tmp_path / "a", tmp_path / "b"]
    n_batches = math.ceil(configs[0].n_train / configs[0].batch_size)
    kept = {d / T.CHECKPOINT_FILE: None for d in dirs}
    _hard_interrupt_inside(monkeypatch, E, E.Ensemble, "update", n_batches + 1, kept)
    with pytest.raises(KeyboardInterrupt):
        E.train_ensemble(configs, dirs, OPTS)
    for d in dirs:  # each checkpoint still holds the end of epoch 1
        assert kept[d / T.CHECKPOINT_FILE] is not None
        assert (d / T.CHECKPOINT_FILE).read_bytes() == kept[d / T.CHECKPOINT_FILE]
        assert (_ckpt(d)["epoch"], _ckpt(d)["batch"]) == (1, 0)


def test_members_must_share_the_task_settings(tmp_path):
    with pytest.raises(T.TaskError, match="T: 22 vs 23"):
        E.train_ensemble([tiny(), tiny(T=23)], [tmp_path / "a", tmp_path / "b"], OPTS)
    with pytest.raises(T.TaskError, match="share a run folder"):
        E.train_ensemble([tiny(), tiny(seed=3)], [tmp_path / "a", tmp_path / "a"], OPTS)
    # a folder of another run is refused as by the single-run trainer
    T.train(tiny(seed=4), tmp_path / "c", OPTS)
    with pytest.raises(T.RunConflict):
        E.train_ensemble([tiny(seed=5)], [tmp_path / "c"], OPTS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_cuda_ensemble_matches_cpu(tmp_path):
    configs = [tiny(**m) for m in MEMBERS]
    cpu = E.train_ensemble(configs, [tmp_path / "cpu" / str(i) for i in range(4)], OPTS)
    gpu_opts = T.RunOptions(device="cuda", progress=False, eval_batch_size=64)
    gpu = E.train_ensemble(configs, [tmp_path / "gpu" / str(i) for i in range(4)], gpu_opts)
    for a, b in zip(cpu, gpu):
        assert [r["val_loss"] for r in a.metrics] == pytest.approx(
            [r["val_loss"] for r in b.metrics], rel=1e-3)


# --------------------------------------------------------------------------------------------
# in the sweep

SWEEP_FLAGS = ["sweep", "--task", "copy", "--T", "22", "--n-train", "64", "--n-val", "16",
               "--models", "chain", "--values", "chain=1.0", "--lr", "1e-3,2e-3", "--seeds", "1,2",
               "--no-progress"]


def test_killed_ensemble_sweep_restarts_without_redoing_finished_runs(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from awd_nonnormal.tasks import __main__ as cli

    out = tmp_path / "sweep"
    argv = SWEEP_FLAGS + ["--epochs", "40", "--ensemble", "2", "--out", str(out)]
    dirs = [out / "chain" / f"alpha1-lr{lr}-seed{s}" for s in (1, 2) for lr in ("0.001", "0.002")]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.Popen([sys.executable, "-m", "awd_nonnormal.tasks", *argv], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill it (no chance to save) once the first ensemble has finished and the second runs
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if all(T.is_finished(d) for d in dirs[:2]) and all(
                    (d / T.CHECKPOINT_FILE).exists() for d in dirs[2:]):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(T.is_finished(d) for d in dirs[:2])
    assert not any(T.is_finished(d) for d in dirs[2:]), "the sweep ended before it was killed"
    stamps = {d: (d / T.RESULT_FILE).stat().st_mtime_ns for d in dirs[:2]}
    cut = {d: len(T.read_metrics(d)) for d in dirs[2:]}

    ran = []
    plan_runs = []
    orig = E.train_ensemble

    def spy(configs, run_dirs, options, **kw):
        plan_runs.append(list(map(str, run_dirs)))
        outcomes = orig(configs, run_dirs, options, **kw)
        ran.extend(o.run_dir for o in outcomes if not o.skipped)
        return outcomes

    E.train_ensemble = spy
    try:
        assert cli.main(argv) == 0
    finally:
        E.train_ensemble = orig
    assert plan_runs == [[str(d) for d in dirs[2:]]]  # only the unfinished runs were handed out
    for d, stamp in stamps.items():
        assert (d / T.RESULT_FILE).stat().st_mtime_ns == stamp
    for d in dirs[2:]:
        assert T.is_finished(d)
        epochs = [r["epoch"] for r in T.read_metrics(d)]
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= cut[d]
    # the resumed runs are the runs made in one go (over 40 epochs the rounding differences
    # between a batched and a single run grow beyond float tolerance at lr 2e-3, so the
    # reference is the same ensemble, uninterrupted)
    stored = [T.config_from_dict(T.stored_config(d)) for d in dirs[2:]]
    whole = E.train_ensemble(stored, [tmp_path / "whole" / str(i) for i in range(2)], OPTS)
    for d, o in zip(dirs[2:], whole):
        assert [r["val_loss"] for r in T.read_metrics(d)] == pytest.approx(
            [r["val_loss"] for r in o.metrics], rel=1e-6)


def test_sweep_ensemble_flag(tmp_path, capsys):
    from awd_nonnormal.tasks import __main__ as cli
    from awd_nonnormal.tasks import sweep as S

    for bad in ("0", "two"):
        assert cli.main(SWEEP_FLAGS + ["--epochs", "1", "--ensemble", bad, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert "--ensemble must be a positive integer or 'auto'" in err and len(err.splitlines()) == 1
    # auto on a CPU: the worker pool (no ensemble) for N = 100, where ensembles are not faster;
    # every run finishes as in a plain sweep
    grid = S.grid_from_args(models="chain", lrs="1e-3", seeds="1,2", values=["chain=1.0"])
    plan = S.plan_sweep(grid, dict(task="copy", T=22, n_train=32, n_val=16, epochs=1), tmp_path)
    stats = S.run_sweep(plan, T.RunOptions(device="cpu"), progress=False, ensemble="auto")
    assert stats["ensemble"] == 1 and not stats["errors"]
    assert all(T.is_finished(r.run_dir) for r in plan.runs)
    assert E.auto_members("cpu", plan.runs[0].config, 100) == 1
    narrow = T.make_config(task="copy", T=22, hidden=25)
    assert E.auto_members("cpu", narrow, 100) == 16 and E.auto_members("cpu", narrow, 3) == 3


def test_keras_loss_member_and_exact_member(tmp_path):
    # The loss kind is the member's own: a Keras-loss member and an exact-loss member in one
    # ensemble each equal their single runs.
    configs = [tiny(loss="keras", lr=2e-3, seed=1), tiny(loss="exact", lr=2e-3, seed=1)]
    outs = E.train_ensemble(configs, [tmp_path / "k", tmp_path / "x"], OPTS)
    for out, c, name in zip(outs, configs, ("k", "x")):
        _assert_same_run(out, T.train(c, tmp_path / f"s{name}", OPTS), tmp_path / name,
                         tmp_path / f"s{name}")
    # a trained model whose bias is one vector, as the single run's (b_hh frozen at zero)
    model = _ckpt(tmp_path / "k")["model"]
    assert torch.equal(model["rnn.bias_hh_l0"], torch.zeros(100))
    assert model["rnn.bias_ih_l0"].abs().max() > 0


def test_a_member_that_cannot_start_leaves_its_ensemble_mates_training(tmp_path):
    """isolate=True (the sweeps): a damaged run folder gives that member an error outcome and the
    others train exactly as an ensemble without it; by default the problem is raised. Before, the
    whole ensemble failed on every rerun."""
    good = [tiny(**MEMBERS[i]) for i in range(2)]
    bad_dir = tmp_path / "x"
    bad_dir.mkdir()
    (bad_dir / T.CONFIG_FILE).write_text('{"config": {"task": "copy"}}')  # damaged
    dirs = [tmp_path / "a", bad_dir, tmp_path / "b"]
    configs = [good[0], tiny(lr=1e-3, seed=7), good[1]]
    with pytest.raises(Exception):
        E.train_ensemble(configs, dirs, OPTS)
    outs = E.train_ensemble(configs, dirs, OPTS, isolate=True)
    assert outs[1].result is None and outs[1].error and outs[1].run_dir == bad_dir
    assert [outs[0].result["status"], outs[2].result["status"]] == ["completed", "completed"]
    assert outs[0].error is None and outs[2].error is None
    ref = E.train_ensemble(good, [tmp_path / "ref" / n for n in ("a", "b")], OPTS)
    losses = lambda o: [(r["train_loss"], r["val_loss"]) for r in o.metrics]  # noqa: E731
    assert [losses(outs[0]), losses(outs[2])] == [losses(o) for o in ref]
