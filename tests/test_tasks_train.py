"""The task trainer: learning, exact resume, run folders, checkpoints, divergence, configs."""

import gzip
import json
import math
import struct

import pytest
import torch

from awd_nonnormal import init as I
from awd_nonnormal.checkpoint import load_checkpoint
from awd_nonnormal.runs import LOCK_FILE
from awd_nonnormal.tasks import data as D
from awd_nonnormal.tasks import train as T

OPTS = T.RunOptions(progress=False, eval_batch_size=64)


def tiny(**kw):
    base = dict(task="copy", T=25, n_train=48, n_val=32, epochs=3, lr=1e-3, init="chain", seed=2)
    base.update(kw)
    return T.make_config(**base)


def test_chain_learns_a_short_copy_task(tmp_path):
    # T = 30 (baseline 10 ln 8 / 30 = 0.693); chain(1.0) gets below half of it in 384 steps
    # (seeds 1-5 all reached 0.05-0.16 with these settings).
    config = T.make_config(task="copy", T=30, n_train=1024, n_val=256, epochs=6, lr=1e-3,
                           init="chain", seed=1)
    out = T.train(config, tmp_path / "run", OPTS)
    r = out.result
    assert r["baseline"] == pytest.approx(10 * math.log(8) / 30)
    assert r["final_val_loss"] < 0.5 * r["baseline"] and r["success"] is True
    assert r["status"] == "completed" and r["epochs_run"] == 6


def test_model_and_init(tmp_path):
    c = tiny(init="chain", init_scale=1.02)
    m = T.build_model(c)
    assert isinstance(m.rnn, __import__("awd_nonnormal.rnn", fromlist=["RNN"]).RNN)
    assert m.rnn.nonlinearity == "elu" and m.rnn.hidden_size == 100
    w = m.rnn.weight_hh_l0.detach()
    assert torch.equal(w, I.chain_(torch.empty(100, 100), alpha=1.02))
    assert torch.equal(m.rnn.weight_ih_l0.detach(), 0.9 * torch.eye(100, 10))
    assert (m.rnn.bias_ih_l0 == 0).all() and (m.rnn.bias_hh_l0 == 0).all()
    assert m(torch.zeros(25, 2, 10)).shape == (25, 2, 9)  # copy reads out every step
    a = T.build_model(T.make_config(task="addition", T=10, init="identity", init_scale=0.5))
    assert a.rnn.nonlinearity == "relu" and a(torch.zeros(10, 2, 2)).shape == (2, 1)
    p = T.build_model(T.make_config(task="psmnist", init="orthogonal"))
    assert p.rnn.hidden_size == 25 and p.rnn.nonlinearity == "elu"
    # same seed, same weights (orthogonal and normal input draw from the run's generator)
    q = T.build_model(T.make_config(task="psmnist", init="orthogonal"))
    assert all(torch.equal(x, y) for x, y in zip(p.state_dict().values(), q.state_dict().values()))


def test_copy_model_on_symbols_equals_the_model_on_one_hot_inputs():
    """The trainer feeds the copy model the symbols (model_batch); the layer looks up its input
    weights. Output, loss and every gradient equal those of the one-hot inputs of CopySet.batch,
    and the read-out is stored class-first for the fast softmax."""
    config = T.make_config(task="copy", T=30, n_train=8, n_val=8, seed=4, init="orthogonal")
    task = T.get_task("copy")
    train_set, _, _ = task.datasets(config, T.RunOptions(progress=False))
    index = torch.arange(8)
    symbols, y = T.model_batch(train_set, index, torch.device("cpu"))
    one_hot, y2 = train_set.batch(index, torch.device("cpu"))
    assert symbols.dtype == torch.long and symbols.shape == (30, 8) and torch.equal(y, y2)
    assert torch.equal(D.one_hot(symbols, one_hot.shape[-1]), one_hot)
    model = T.build_model(config)
    results = []
    for x in (symbols, one_hot):
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = task.loss(out, y)
        loss.backward()
        results.append((out.detach(), loss.detach(),
                        [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (out_s, loss_s, grads_s), (out_h, loss_h, grads_h) = results
    assert out_s.shape == (30, 8, task.output_size) and out_s.permute(2, 0, 1).is_contiguous()
    torch.testing.assert_close(out_s, out_h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_s, loss_h, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_s, grads_h, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _state(run_dir):
    ck = load_checkpoint(run_dir / T.CHECKPOINT_FILE, kind="task")
    return ck


@pytest.mark.parametrize("stop_at,nonlinearity", [((0, 1), "elu"), ((1, 2), "elu"), ((0, 1), "tanh")])
def test_resume_equals_uninterrupted(tmp_path, stop_at, nonlinearity):
    """Mid-epoch and at the last batch of an epoch; tanh as well, whose steps run NumPy's tanh."""
    c = tiny(init="orthogonal", init_scale=1.0, lr=3e-3, nonlinearity=nonlinearity)
    full = T.train(c, tmp_path / "full", OPTS)

    def hook(epoch, batch, loss):
        if (epoch, batch) == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(c, tmp_path / "cut", OPTS, on_batch=hook)
    ck = _state(tmp_path / "cut")
    assert (ck["epoch"], ck["batch"]) == (stop_at[0], stop_at[1] + 1)
    assert not (tmp_path / "cut" / T.RESULT_FILE).exists()
    resumed = T.train(c, tmp_path / "cut", OPTS)
    assert resumed.resumed_from == (stop_at[0], stop_at[1] + 1)
    a, b = _state(tmp_path / "full"), _state(tmp_path / "cut")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-6, atol=1e-7)
    for x, y in zip(full.metrics, resumed.metrics):
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-6)
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-6)
    assert full.result["final_val_loss"] == pytest.approx(resumed.result["final_val_loss"], rel=1e-6)


def _hard_interrupt_inside(monkeypatch, module, owner, name, at_call, checkpoints):
    """Make the ``at_call``-th call of ``owner.name`` update the weights and then meet a second
    Ctrl-C (``GracefulInterrupt.hard``) before it returns; records the checkpoint files' bytes
    at that moment in ``checkpoints``."""
    made, calls = [], []

    class Recording(module.GracefulInterrupt):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    original = getattr(owner, name)

    def update(self, *a, **kw):
        calls.append(1)
        if len(calls) == at_call:
            checkpoints.update({p: p.read_bytes() for p in checkpoints})
        out = original(self, *a, **kw)
        if len(calls) == at_call:
            made[-1].requested = made[-1].hard = True
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(module, "GracefulInterrupt", Recording)
    monkeypatch.setattr(owner, name, update)


def test_second_ctrl_c_inside_a_step_saves_nothing(tmp_path, monkeypatch):
    c = tiny(epochs=2)
    run = tmp_path / "run"
    n_batches = math.ceil(c.n_train / c.batch_size)
    kept = {run / T.CHECKPOINT_FILE: None}
    # the first step of epoch 2: the checkpoint holds the end of epoch 1
    _hard_interrupt_inside(monkeypatch, T, T.rules.RMSprop, "step", n_batches + 1, kept)
    with pytest.raises(KeyboardInterrupt):
        T.train(c, run, OPTS)
    assert kept[run / T.CHECKPOINT_FILE] is not None
    assert (run / T.CHECKPOINT_FILE).read_bytes() == kept[run / T.CHECKPOINT_FILE]
    assert (_state(run)["epoch"], _state(run)["batch"]) == (1, 0)


def test_run_folder_checkpoint_and_finished_run(tmp_path):
    c = tiny(epochs=2)
    run = tmp_path / "run"
    out = T.train(c, run, OPTS)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [LOCK_FILE, T.CONFIG_FILE, T.METRICS_FILE, T.CHECKPOINT_FILE, T.RESULT_FILE])
    cfg = json.loads((run / T.CONFIG_FILE).read_text())
    assert cfg["config"] == c.to_dict() and cfg["derived"]["seq_len"] == 25
    assert cfg["derived"]["baseline"] == pytest.approx(D.copy_baseline(25))
    lines = [json.loads(l) for l in (run / T.METRICS_FILE).read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert {"train_loss", "val_loss", "time"} <= set(lines[0])
    result = json.loads((run / T.RESULT_FILE).read_text())
    assert set(result) >= {"final_val_loss", "baseline", "success", "epochs_run", "status"}
    ck = load_checkpoint(run / T.CHECKPOINT_FILE, kind="task")
    assert ck["arch"]["rnn_type"] == "RNN" and ck["arch"]["nonlinearity"] == "elu"
    assert ck["arch"]["hidden_sizes"] == [100] and ck["arch"]["input_size"] == 10
    assert ck["result"] == result and ck["epoch"] == 2 and ck["config"] == c.to_dict()
    assert set(ck["initial_rnn"]) == {k for k in ck["model"] if k.startswith("rnn.")}
    assert torch.equal(ck["initial_rnn"]["rnn.weight_hh_l0"], I.chain_(torch.empty(100, 100)))
    layers = list(I.recurrent_layers(ck["model"]))
    assert len(layers) == 1 and layers[0].cell == "RNN"
    assert {"optimizer", "rng", "metrics", "best_val"} <= set(ck)
    # a finished run is recognised, not redone
    mtime = (run / T.RESULT_FILE).stat().st_mtime_ns
    again = T.train(c, run, OPTS)
    assert again.skipped and again.result == out.result
    assert (run / T.RESULT_FILE).stat().st_mtime_ns == mtime
    # another config in the same folder is refused
    with pytest.raises(T.RunConflict, match="lr: 0.001 vs 0.002"):
        T.train(tiny(epochs=2, lr=2e-3), run, OPTS)


def test_early_stop_and_nan(tmp_path):
    out = T.train(tiny(epochs=5, stop_loss=10.0), tmp_path / "stop", OPTS)
    assert out.result["status"] == "converged" and out.result["epochs_run"] == 1
    bad = T.train(tiny(lr=1e30, epochs=3), tmp_path / "nan", OPTS)
    r = bad.result
    assert r["status"] == "diverged" and r["success"] is False and r["final_val_loss"] is None
    assert "training loss became" in r["message"]
    assert json.loads((tmp_path / "nan" / T.RESULT_FILE).read_text())["status"] == "diverged"


@pytest.mark.parametrize("clip_mode", ["global", "tensor"])
def test_overflowing_gradient_norm(tmp_path, clip_mode):
    """chain(7) over 30 steps: the activity reaches ~7^29 * 0.9 ~ 1e24 and the loss stays finite,
    but the gradient's squared norm overflows float32, so clipping zeroes every gradient (as Keras'
    clipnorm does) and the step is skipped, in global and in tensor mode. The run goes on as long as that could pass; after a whole epoch of batches
    in a row without an update it is reported as diverged instead of trained on for nothing."""
    c = T.make_config(task="copy", T=30, n_train=48, n_val=32, epochs=3, lr=1e-3, init="chain",
                      init_scale=7.0, seed=2, clip_mode=clip_mode)
    seen = []
    r = T.train(c, tmp_path / "run", OPTS, on_batch=lambda e, b, loss: seen.append((e, b))).result
    n_batches = 3  # 48 sequences in batches of 16
    assert r["status"] == "diverged" and r["success"] is False
    assert f"overflowed in {n_batches} batches in a row" in r["message"]
    assert seen == [(0, 0), (0, 1)]  # the third overflowing batch ends the run before its step
    ck = load_checkpoint(tmp_path / "run" / T.CHECKPOINT_FILE, kind="task")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    # the zeroed updates left the weights where the init put them, every tensor (the read-out's
    # own gradient norms are finite: only the overflow verdict keeps them still)
    assert torch.equal(ck["model"]["rnn.weight_hh_l0"], I.chain_(torch.empty(100, 100), alpha=7.0))
    initial = T.build_model(c).state_dict()
    assert all(torch.equal(ck["model"][k], v) for k, v in initial.items())
    assert ck["optimizer"]["state"] == {}  # the step was skipped: RMSprop never ran


def test_addition_and_global_clip(tmp_path):
    c = T.make_config(task="addition", T=20, n_train=32, n_val=16, epochs=1, init="identity",
                      init_scale=1.0, clip_mode="global")
    r = T.train(c, tmp_path / "add", OPTS).result
    assert r["baseline"] == pytest.approx(1 / 6) and math.isfinite(r["final_val_loss"])


def _write_mnist(folder, n_train=20, n_test=10):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labs = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">iiii", 2051, n, 28, 28) + imgs.numpy().tobytes())
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + labs.numpy().tobytes())


@pytest.mark.parametrize("perm_seed,mnist_val", [(None, "test"), ("run", "holdout")])
def test_psmnist_run_saves_its_permutation(tmp_path, perm_seed, mnist_val):
    _write_mnist(tmp_path / "mnist")
    c = T.make_config(task="psmnist", n_train=8, n_val=4, epochs=1, init="chain", seed=7,
                      perm_seed=perm_seed, mnist_val=mnist_val)
    opts = T.RunOptions(progress=False, mnist_dir=str(tmp_path / "mnist"))
    r = T.train(c, tmp_path / "ps", opts).result
    assert r["baseline"] == pytest.approx(math.log(10)) and 0 <= r["val_acc"] <= 1
    seed = 92916 if perm_seed is None else 7
    perm = D.pixel_permutation(seed)
    ck = load_checkpoint(tmp_path / "ps" / T.CHECKPOINT_FILE)
    assert torch.equal(ck["permutation"], perm)
    cfg = json.loads((tmp_path / "ps" / T.CONFIG_FILE).read_text())
    assert cfg["derived"]["permutation"] == perm.tolist() and cfg["derived"]["perm_seed"] == seed
    assert cfg["config"]["perm_seed"] == (92916 if perm_seed is None else "run")


def test_psmnist_missing_data_is_a_clear_error(tmp_path):
    c = T.make_config(task="psmnist", epochs=1)
    with pytest.raises(D.IDXError, match="getdata.sh mnist"):
        T.train(c, tmp_path / "ps", T.RunOptions(progress=False, mnist_dir=str(tmp_path)))


def test_config_defaults_and_errors():
    c = T.make_config(task="copy")
    assert (c.T, c.hidden, c.nonlinearity, c.copy_layout, c.perm_seed) == (500, 100, "elu", "paper", None)
    assert (c.batch_size, c.n_train, c.n_val, c.epochs, c.clip, c.clip_mode) == (16, 60000, 10000, 100, 10.0, "global")
    assert (c.rho, c.opt_eps, c.stop_loss) == (0.9, 1e-7, 0.0025)
    a = T.make_config(task="addition", perm_seed=5, copy_layout="arjovsky")
    assert (a.T, a.nonlinearity, a.perm_seed, a.copy_layout) == (750, "relu", None, None)
    p = T.make_config(task="psmnist")
    assert (p.T, p.hidden, p.perm_seed, p.mnist_val) == (784, 25, 92916, "test")
    assert T.get_task("copy").baseline(T.make_config(task="copy", copy_layout="arjovsky")) == \
        pytest.approx(10 * math.log(8) / 520)
    with pytest.raises(T.TaskError, match="unknown task 'cpy'; valid tasks: addition, copy, psmnist"):
        T.make_config(task="cpy")
    with pytest.raises(I.InitSpecError, match="unknown initializer 'chian'"):
        T.make_config(init="chian")
    with pytest.raises(I.InitSpecError, match="not accepted"):
        T.make_config(init="identity", init_beta=0.1)
    with pytest.raises(I.InitSpecError, match="alpha is 1.02 in the init spec"):  # --init-scale sets alpha
        T.make_config(init="chain:alpha=1.02", init_scale=1.05)
    with pytest.raises((T.TaskError, I.InitSpecError), match="non-empty string"):  # --init= is not the default
        T.make_config(init="")
    for kw, match in [(dict(lr=-1), "lr must be"), (dict(T=10), "T >= 21"),
                      (dict(clip_mode="x"), "clip mode"), (dict(task="psmnist", perm_seed="x"), "perm-seed"),
                      (dict(task="psmnist", T=100), "fixed length"), (dict(n_train=0), "n-train"),
                      (dict(nonlinearity="sigmoid"), "nonlinearity")]:
        with pytest.raises(T.TaskError, match=match):
            T.make_config(**kw)


def test_clip_0_is_no_clipping(tmp_path):
    # as for language models (main.py --clip 0): the same training as --clip-mode none
    c = tiny(clip=0, epochs=1)
    assert (c.clip, c.clip_mode) == (0.0, "none")
    assert T.config_from_dict(c.to_dict()) == c  # a stored run reads back
    a = T.train(c, tmp_path / "zero", OPTS)
    b = T.train(tiny(clip_mode="none", epochs=1), tmp_path / "none", OPTS)
    assert [m["train_loss"] for m in a.metrics] == [m["train_loss"] for m in b.metrics]
    wa, wb = _state(tmp_path / "zero")["model"], _state(tmp_path / "none")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(T.TaskError, match="--clip 0 means no clipping"):
        T.make_config(clip=0, clip_mode="global")
    with pytest.raises(T.TaskError, match="clip must be"):
        T.make_config(clip=-1)


def test_run_name_is_stable_and_distinct():
    assert T.run_name(tiny()) == T.run_name(tiny())
    assert T.run_name(tiny()) != T.run_name(tiny(T=26))
    assert T.run_name(tiny(init="chain", init_scale=1.02), digest=False) == "copy-chain-scale1.02-lr0.001-seed2"


def test_extending_a_finished_run_equals_a_longer_run(tmp_path):
    """`--resume --epochs M` reopens a finished run: 2 epochs, then extended to 3, give the
    3-epoch run's numbers."""
    long = T.train(tiny(epochs=3), tmp_path / "long", OPTS)
    short = T.train(tiny(epochs=2), tmp_path / "short", OPTS)
    assert short.result["epochs_run"] == 2
    with pytest.raises(T.TaskError, match="more than that"):
        T.extend_run(tmp_path / "short", 2)
    config = T.extend_run(tmp_path / "short", 3)
    assert config == tiny(epochs=3) and not T.is_finished(tmp_path / "short")
    extended = T.train(config, tmp_path / "short", OPTS)
    assert extended.resumed_from == (2, 0) and extended.result["epochs_run"] == 3
    assert [m["val_loss"] for m in extended.metrics] == pytest.approx(
        [m["val_loss"] for m in long.metrics], rel=1e-6)
    # a run that stopped early has nothing to extend
    T.train(tiny(epochs=5, stop_loss=10.0), tmp_path / "stop", OPTS)
    with pytest.raises(T.TaskError, match="converged"):
        T.extend_run(tmp_path / "stop", 9)


def test_cli_resume_with_more_epochs(tmp_path, capsys):
    from awd_nonnormal.tasks.__main__ import main

    flags = ["--task", "copy", "--T", "25", "--n-train", "48", "--n-val", "32", "--lr", "1e-3",
             "--seed", "2", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(flags + ["--epochs", "1"]) == 0
    # another flag that disagrees is refused before anything changes
    assert main(["--resume", "--out", str(tmp_path / "run"), "--epochs", "2", "--lr", "5e-3"]) == 2
    assert T.is_finished(tmp_path / "run")
    assert main(["--resume", "--out", str(tmp_path / "run"), "--epochs", "2", "--no-progress"]) == 0
    assert T.read_result(tmp_path / "run")["epochs_run"] == 2
    assert "after 2 epoch(s)" in capsys.readouterr().out
