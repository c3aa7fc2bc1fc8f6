"""Language-model training: smoke runs of every variant, resume equivalence, Ctrl-C, NaN, ASGD,
bad inputs and the command line. Tiny corpora in tmp_path and tiny models, one thread."""

import dataclasses
import importlib.util
import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from awd_nonnormal import lm
from awd_nonnormal.checkpoint import CheckpointError, load_checkpoint, load_initial, save_checkpoint
from awd_nonnormal.data import DataError
from awd_nonnormal.runs import GracefulInterrupt
from awd_nonnormal.init import InitOptions, recurrent_layers
from awd_nonnormal.lm import (NonFiniteLossError, ResumeError, RunExistsError, TrainConfig, RunPaths,
                              activation_regularization, averaged_weights, loss_units, run,
                              should_switch_to_asgd)
from awd_nonnormal.model import ModelConfig, RNNModel

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["chain", "fbchain", "identity", "orthogonal", "plain", "mixed"]
CELLS = [("LSTM", "tanh"), ("GRU", "tanh"), ("RNN", "tanh"), ("RNN", "relu"), ("RNN", "elu")]


def write_corpus(folder, seed=0, sizes=(600, 150, 150), vocab=20, pattern=None):
    """Random lines of `vocab` words (or a repeated `pattern`) as train/valid/test.txt."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), sizes):
        lines, count = [], 0
        while count < n:
            if pattern is not None:
                line = pattern
            else:
                line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
            lines.append(line)
            count += len(line.split()) + 1
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return str(folder)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def configs(tmp_path, corpus, name="run", model=None, **train):
    m = dict(rnn_type="LSTM", emsize=8, nhid=16, nlayers=2, dropout=0.2, dropouth=0.2,
             dropouti=0.2, dropoute=0.1, wdrop=0.2)
    m.update(model or {})
    m["init"] = InitOptions(m.pop("init", "plain"), m.pop("init_params", {}),
                            plugins=train.pop("init_plugins", ()))
    t = dict(data=corpus, batch_size=4, eval_batch_size=2, test_batch_size=2, bptt=8, lr=30.0,
             epochs=1, save=str(tmp_path / name / "model.pt"), progress=False, log_interval=1000)
    t.update(train)
    return ModelConfig(**m), TrainConfig(**t)


def metrics(result):
    return [json.loads(line) for line in result.paths.metrics.read_text().splitlines()]


@pytest.fixture
def trainers(monkeypatch):
    """Record every Trainer that run() builds (to compare its in-memory model with the files)."""
    made = []

    class Recording(lm.Trainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(lm, "Trainer", Recording)
    return made


def interrupt_at(monkeypatch, epoch, batch=None, in_validation=False):
    """Make the training loop see Ctrl-C once, after `batch` of `epoch` or during its validation."""
    original = lm.Trainer.check_interrupt
    fired = []

    def check(self):
        st = self.state
        hit = st.epoch == epoch and (
            (in_validation and st.pos >= self.train_data.size(0) - 2)
            or (not in_validation and st.batch == batch))
        if hit and not fired:
            fired.append(True)
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(lm.Trainer, "check_interrupt", check)
    return fired


# ---------------------------------------------------------------------------------- units

def test_loss_units():
    u = loss_units(math.log(91.1))
    assert u["ppl"] == pytest.approx(91.1) and u["bpt"] == pytest.approx(math.log2(91.1))
    assert loss_units(1e4)["ppl"] == math.inf


@pytest.mark.parametrize("history, val, nonmono, expected", [
    ([3.0, 2.5], 3.1, 1, True),     # worse than everything but the last epoch
    ([3.0, 2.5], 2.9, 1, False),
    ([3.0], 9.0, 1, False),         # not more than nonmono epochs yet
    ([3.0, 2.0, 2.1, 2.2], 2.05, 2, True),
    ([3.0, 2.0, 2.1, 2.2], 1.9, 2, False),
    ([2.0, 2.1], 2.05, 0, True),    # nonmono 0: any non-improvement
])
def test_nonmono_trigger(history, val, nonmono, expected):
    assert should_switch_to_asgd(history, val, nonmono) is expected


def test_activation_regularization_formulas():
    g = torch.Generator().manual_seed(0)
    raw, dropped = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    ar = 2.0 * dropped.pow(2).mean()
    tar = 1.0 * (raw[1:] - raw[:-1]).pow(2).mean()
    assert torch.allclose(activation_regularization(raw, dropped, 2.0, 1.0), ar + tar)
    assert torch.allclose(activation_regularization(raw, dropped, 0.0, 1.0), tar)
    assert activation_regularization(raw, dropped, 0.0, 0.0) == 0


def test_averaged_weights_swaps_in_the_average_and_restores():
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.ASGD([p], lr=1.0, t0=0, lambd=0.0)
    iterates = []
    for step in range(3):
        p.grad = torch.full((3,), -1.0 - step)
        opt.step()
        iterates.append(p.detach().clone())
    live = p.detach().clone()
    with averaged_weights(opt):
        # torch's ASGD with t0=0 averages the iterates from its second step on
        assert torch.equal(p, opt.state[p]["ax"]) and torch.allclose(p, torch.stack(iterates[1:]).mean(0))
    assert torch.equal(p, live)
    with pytest.raises(RuntimeError):
        with averaged_weights(opt):
            raise RuntimeError("boom")
    assert torch.equal(p, live)


@pytest.mark.parametrize("name", ["sgd", "adam", "asgd"])
def test_the_step_learning_rate_applies_to_that_very_step(name):
    """lm.set_step_lr(opt, lr) then opt.step(): the step is taken at lr, also under ASGD, which
    steps by a state["eta"] that its previous step set (once each batch took the previous batch's
    seq_len / bptt scaling). ASGD(t0=0, lambd=0) and SGD move by lr * grad; Adam's first step by
    lr * sign(grad)."""
    grad = torch.tensor([0.5, -2.0])
    p = nn.Parameter(torch.zeros(2))
    opt = lm._make_optimizer(name, [p], 1.0, 0.0)
    expected = torch.zeros(2)
    for lr in (1.0, 5 / 70, 1.0, 0.5, 0.01):
        lm.set_step_lr(opt, lr)
        p.grad = grad.clone()
        opt.step()
        if name == "adam":
            expected = expected - lr * grad.sign()  # the first step; then just check the lr reached it
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
            break
        expected = expected - lr * grad
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
        lm.set_step_lr(opt, 1.0)  # as the trainer restores the group's rate after each batch


def test_variable_bptt_draws(corpus, tmp_path):
    mc, tc = configs(tmp_path, corpus, bptt=70)
    data = lm.load_corpus(corpus)
    trainer = lm.Trainer(dataclasses.replace(mc, ntoken=len(data.dictionary)), tc, data, torch.device("cpu"),
                         RunPaths.from_save(tc.save))
    lens = [trainer._draw_seq_len() for _ in range(4000)]
    assert min(lens) >= 5
    half = sum(1 for n in lens if n < 52) / len(lens)  # 35 +- 3.4 sd vs 70 +- 3.4 sd
    assert 0.03 < half < 0.07
    assert abs(sum(n for n in lens if n >= 52) / sum(1 for n in lens if n >= 52) - 69.5) < 0.5


# ---------------------------------------------------------------------------------- smoke runs

@pytest.mark.parametrize("init", PRESETS)
@pytest.mark.parametrize("rnn_type, nonlinearity", CELLS)
def test_smoke_every_model_and_initializer(tmp_path, corpus, trainers, rnn_type, nonlinearity, init):
    # lr 30 (AWD-LSTM's) lets an unbounded elu chain explode on this corpus: that is the NaN test's job
    mc, tc = configs(tmp_path, corpus, model=dict(rnn_type=rnn_type, nonlinearity=nonlinearity, init=init), lr=2.0)
    result = run(mc, tc)
    assert result.test_loss is not None and math.isfinite(result.test_loss)
    assert result.epochs_done == 1 and not result.interrupted
    raw = torch.load(result.paths.best, map_location="cpu", weights_only=True)
    assert raw["kind"] == "lm" and raw["role"] == "best" and raw["test"]["loss"] == result.test_loss
    assert raw["arch"]["rnn_type"] == rnn_type
    # the initial weights are stored once per run, beside the checkpoints, which name the file
    assert "initial_rnn" not in raw and raw["initial_rnn_file"] == result.paths.initial.name
    assert set(load_initial(raw, result.paths.best)) == {k for k in raw["model"] if k.startswith("rnns.")}
    latest = torch.load(result.paths.latest, map_location="cpu", weights_only=True)
    assert "initial_rnn" not in latest and latest["initial_rnn_file"] == result.paths.initial.name
    # the rebuilt best model computes what the trained one computes (one epoch of SGD: the same)
    trained = trainers[0].model.eval()
    rebuilt = RNNModel.from_checkpoint(load_checkpoint(result.paths.best)).eval()
    x = trainers[0].val_data[:6]
    with torch.no_grad():
        assert torch.equal(trained(x, trained.init_hidden(2))[0], rebuilt(x, rebuilt.init_hidden(2))[0])
    assert lm.evaluate(rebuilt, trainers[0].val_data, 2, 8) == pytest.approx(result.val_loss, rel=1e-6)


def test_chain_init_is_in_the_run_before_training(tmp_path, corpus):
    mc, tc = configs(tmp_path, corpus, model=dict(rnn_type="RNN", nonlinearity="elu", init="chain",
                                                  init_params={"alpha": 0.9}, nlayers=3), lr=2.0)
    result = run(mc, tc)
    ckpt = load_checkpoint(result.paths.best)
    initial = list(recurrent_layers(load_initial(ckpt, result.paths.best)))
    assert [l.name for l in initial] == [f"rnns.{k}.weight_hh_l0_raw" for k in range(3)]
    for layer in initial:
        n = layer.weight_hh.shape[0]
        assert torch.allclose(layer.weight_hh, torch.diag(torch.full((n - 1,), 0.9), -1))
    trained = next(recurrent_layers(ckpt["model"]))
    assert not torch.equal(trained.weight_hh, initial[0].weight_hh)  # and training moved it


def test_init_plugin_is_loaded_before_the_spec_is_used(tmp_path, corpus):
    plugin = tmp_path / "my_inits.py"
    plugin.write_text(
        "import torch\nfrom awd_nonnormal.init import register\n\n"
        "@register('test_lm_half_identity', input_init='source', override=True)\n"
        "def half_identity_(w, scale: float = 0.5):\n"
        "    with torch.no_grad():\n"
        "        w.copy_(scale * torch.eye(w.shape[0]))\n"
        "    return w\n")
    mc, tc = configs(tmp_path, corpus, model=dict(rnn_type="RNN", init="test_lm_half_identity"),
                     init_plugins=(str(plugin),))
    result = run(mc, tc)
    for layer in recurrent_layers(load_initial(load_checkpoint(result.paths.best), result.paths.best)):
        assert torch.allclose(layer.weight_hh, 0.5 * torch.eye(layer.weight_hh.shape[0]))


def test_loss_decreases_on_a_learnable_corpus(tmp_path):
    data = write_corpus(tmp_path / "pattern", pattern="a b c d e f g h i j", sizes=(1200, 200, 200))
    mc, tc = configs(tmp_path, data, model=dict(dropout=0, dropouth=0, dropouti=0, dropoute=0, wdrop=0),
                     optimizer="adam", lr=1e-2, epochs=4, alpha=0, beta=0)
    result = run(mc, tc)
    vals = [m["val_loss"] for m in metrics(result)]
    assert all(b < a for a, b in zip(vals, vals[1:])), vals
    assert vals[-1] < 0.5 * math.log(11) and result.test_loss < 0.5 * math.log(11)


# ---------------------------------------------------------------------------------- optimisation

def test_lr_is_scaled_by_sequence_length(tmp_path, corpus, monkeypatch, trainers):
    seen = []
    real_get_batch = lm.get_batch

    def get_batch(source, i, seq_len):
        data, target = real_get_batch(source, i, seq_len)
        seen.append([data.size(0)])
        return data, target

    monkeypatch.setattr(lm, "get_batch", get_batch)
    real_step = torch.optim.SGD.step

    def step(self, *a, **kw):
        seen[-1].append(self.param_groups[0]["lr"])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    mc, tc = configs(tmp_path, corpus, lr=2.0, bptt=8)
    run(mc, tc)
    train = [s for s in seen if len(s) == 2]
    assert len({n for n, _ in train}) > 2  # variable lengths
    for n, lr in train:
        assert lr == pytest.approx(2.0 * n / 8)
    assert trainers[0].optimizer.param_groups[0]["lr"] == 2.0  # restored after every batch


def test_when_divides_the_lr_and_snapshots(tmp_path, corpus):
    mc, tc = configs(tmp_path, corpus, optimizer="adam", lr=1e-3, epochs=3, when=(1,))
    result = run(mc, tc)
    assert [m["lr"] for m in metrics(result)] == pytest.approx([1e-3, 1e-4, 1e-4])
    assert result.paths.snapshot(1).exists() and not result.paths.snapshot(2).exists()


def test_asgd_switch_when_validation_stops_improving(tmp_path, corpus, monkeypatch, trainers):
    scripted = iter([3.0, 2.5, 3.1, 2.4, 2.3, 2.2])  # 5 validations and the final test
    monkeypatch.setattr(lm, "evaluate", lambda *a, **kw: next(scripted))

    class WithParams(nn.Module):  # a criterion with a parameter of its own (like a split softmax)
        def __init__(self):
            super().__init__()
            self.temperature = nn.Parameter(torch.ones(()))

        def forward(self, logits, targets):
            return nn.functional.cross_entropy(logits / self.temperature, targets)

    monkeypatch.setattr(lm, "Trainer", _with_criterion(lm.Trainer, WithParams, trainers))
    mc, tc = configs(tmp_path, corpus, epochs=5, nonmono=1)
    result = run(mc, tc)
    assert [m["optimizer"] for m in metrics(result)] == ["sgd", "sgd", "sgd", "asgd", "asgd"]
    t = trainers[0]
    assert isinstance(t.optimizer, torch.optim.ASGD)
    in_opt = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in t.model.parameters()} | {id(t.criterion.temperature)}
    assert t.criterion.temperature.grad is not None
    assert load_checkpoint(result.paths.best)["epoch"] == 5


def test_a_run_resumed_into_another_save_takes_its_best_model_along(tmp_path, corpus, monkeypatch):
    """--resume OLD/model.latest.pt --save NEW/model.pt: the best model so far moves to NEW (as
    NEW's file, naming NEW's initial weights), so the run tests it even when no later epoch
    validates better (before, it ended with no model to test)."""
    scripted = iter([3.0, 2.5, 2.4, 9.0, 9.5, 2.45])  # epochs 1-2 and a test, then epochs 3-4 and the test
    monkeypatch.setattr(lm, "evaluate", lambda *a, **kw: next(scripted))
    mc, tc = configs(tmp_path, corpus, epochs=2)
    first = run(mc, tc)
    old_best = load_checkpoint(first.paths.best, kind="lm")
    new_save = tmp_path / "moved" / "model.pt"
    result = run(mc, dataclasses.replace(tc, epochs=4, save=str(new_save)), resume=str(first.paths.latest),
                 explicit=frozenset({"epochs", "save"}))
    assert result.best_epoch == 2 and result.test_loss == 2.45
    best = load_checkpoint(new_save, kind="lm")
    assert best["epoch"] == 2 and best["val_loss"] == 2.5 and best["test"]["loss"] == 2.45
    assert all(torch.equal(best["model"][k], old_best["model"][k]) for k in old_best["model"])
    assert best["config"]["train"]["save"] == str(new_save)
    assert best["initial_rnn_file"] == "model.initial.pt" and (new_save.parent / "model.initial.pt").is_file()
    assert load_initial(best, new_save).keys() == load_initial(old_best, first.paths.best).keys()


def _with_criterion(base, criterion_cls, made):
    class T(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, criterion=criterion_cls(), **kw)
            made.append(self)
    return T


def test_validation_under_asgd_uses_averaged_weights(tmp_path, corpus, monkeypatch, trainers):
    calls = []
    real = lm.evaluate

    def evaluate(model, *a, **kw):
        t = trainers[0]
        if model is t.model and isinstance(t.optimizer, torch.optim.ASGD):  # not the final test
            p = next(model.parameters())
            calls.append(torch.equal(p, t.optimizer.state[p]["ax"]))
        return real(model, *a, **kw)

    monkeypatch.setattr(lm, "evaluate", evaluate)
    mc, tc = configs(tmp_path, corpus, epochs=6, nonmono=1)
    result = run(mc, tc)
    assert "asgd" in [m["optimizer"] for m in metrics(result)]
    assert calls and all(calls)
    t = trainers[0]
    p = next(t.model.parameters())
    assert not torch.equal(p, t.optimizer.state[p]["ax"])  # live weights are back


# ---------------------------------------------------------------------------------- resume

def _val_history(result):
    return [m["val_loss"] for m in metrics(result)]


@pytest.mark.parametrize("optimizer, lr, stop_epoch", [
    # SGD with lr 30 and nonmono 1 on this corpus switches to ASGD after epoch 3:
    ("sgd", 30.0, 2),   # the switch happens after the resume
    ("sgd", 30.0, 4),   # the ASGD state is carried over
    ("adam", 3e-3, 2),
])
def test_resume_after_an_epoch_matches_an_uninterrupted_run(tmp_path, corpus, optimizer, lr, stop_epoch):
    epochs = 5
    mc, tc = configs(tmp_path, corpus, "full", optimizer=optimizer, lr=lr, epochs=epochs, nonmono=1)
    full = run(mc, tc)
    kinds = [m["optimizer"] for m in metrics(full)]
    if optimizer == "sgd":
        assert kinds == ["sgd"] * 3 + ["asgd"] * 2  # the construction this test relies on

    mc, tc = configs(tmp_path, corpus, "part", optimizer=optimizer, lr=lr, epochs=stop_epoch, nonmono=1)
    run(mc, tc)
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "part", moved)  # a run folder moved elsewhere keeps working
    resumed = run(ModelConfig(), TrainConfig(epochs=epochs), resume=str(moved / "model.latest.pt"),
                  explicit=frozenset({"epochs"}))
    assert resumed.paths.best == moved / "model.pt"
    assert _val_history(resumed) == pytest.approx(_val_history(full), rel=1e-5, abs=1e-6)
    assert [m["optimizer"] for m in metrics(resumed)] == kinds
    assert resumed.test_loss == pytest.approx(full.test_loss, rel=1e-5)


@pytest.mark.parametrize("optimizer, lr, epoch, in_validation", [
    ("sgd", 30.0, 2, False),
    ("sgd", 30.0, 4, False),  # mid-epoch under ASGD
    ("sgd", 30.0, 3, True),   # during the validation that triggers the switch
    ("adam", 3e-3, 2, False),
])
def test_ctrl_c_saves_state_tests_best_and_resume_matches(tmp_path, corpus, monkeypatch, optimizer, lr,
                                                          epoch, in_validation):
    epochs = 5
    mc, tc = configs(tmp_path, corpus, "full", optimizer=optimizer, lr=lr, epochs=epochs, nonmono=1)
    full = run(mc, tc)

    mc, tc = configs(tmp_path, corpus, "cut", optimizer=optimizer, lr=lr, epochs=epochs, nonmono=1)
    with monkeypatch.context() as mp:
        fired = interrupt_at(mp, epoch, batch=3, in_validation=in_validation)
        cut = run(mc, tc)
    assert fired and cut.interrupted
    assert cut.stopped_at.startswith(f"epoch {epoch}, batch ")
    latest = load_checkpoint(cut.paths.latest)
    assert latest["position"]["epoch"] == epoch and latest["epoch"] == epoch - 1
    # the early exit still tested the best model so far, as awd-lstm-lm's Ctrl-C path does
    assert cut.test_loss is not None and load_checkpoint(cut.paths.best)["test"]["loss"] == cut.test_loss
    assert len(metrics(cut)) == epoch - 1

    resumed = run(ModelConfig(), TrainConfig(), resume=str(cut.paths.latest))
    assert _val_history(resumed) == pytest.approx(_val_history(full), rel=1e-5, abs=1e-6)
    assert [m["optimizer"] for m in metrics(resumed)] == [m["optimizer"] for m in metrics(full)]


def test_first_ctrl_c_is_deferred_second_is_immediate():
    import signal
    before = signal.getsignal(signal.SIGINT)
    with GracefulInterrupt() as interrupts:
        assert signal.getsignal(signal.SIGINT) == interrupts._handler
        interrupts._handler(signal.SIGINT, None)  # first Ctrl-C: only a request
        assert interrupts.requested and not interrupts.hard
        with pytest.raises(KeyboardInterrupt):
            interrupts._handler(signal.SIGINT, None)  # second: at once
        assert interrupts.hard
    assert signal.getsignal(signal.SIGINT) == before


@pytest.mark.parametrize("hard", [False, True])
def test_interrupt_in_the_middle_of_a_batch_keeps_the_last_epochs_state(tmp_path, corpus, monkeypatch, hard):
    mc, tc = configs(tmp_path, corpus, epochs=3)
    real = lm.Trainer._loss
    saved = {}

    def loss(self, logits, targets):
        if (self.state.epoch, self.state.batch) == (2, 2):
            saved["latest"] = self.paths.latest.read_bytes()
            self.interrupts.hard = hard  # as after a second Ctrl-C
            raise KeyboardInterrupt
        return real(self, logits, targets)

    monkeypatch.setattr(lm.Trainer, "_loss", loss)
    if hard:
        with pytest.raises(KeyboardInterrupt):
            run(mc, tc)
        paths = RunPaths.from_save(tc.save)
    else:
        result = run(mc, tc)
        assert result.interrupted and result.test_loss is not None
        paths = result.paths
    assert paths.latest.read_bytes() == saved["latest"]  # a half-done batch is never saved
    assert load_checkpoint(paths.latest)["position"] is None


def test_ctrl_c_before_any_validation(tmp_path, corpus, monkeypatch):
    interrupt_at(monkeypatch, 1, batch=2)
    mc, tc = configs(tmp_path, corpus, epochs=3)
    result = run(mc, tc)
    assert result.interrupted and result.test_loss is None and not result.paths.best.exists()
    assert load_checkpoint(result.paths.latest)["position"]["batch"] == 2


def test_resume_refuses_mismatches(tmp_path, corpus):
    mc, tc = configs(tmp_path, corpus)
    result = run(mc, tc)
    latest = str(result.paths.latest)
    # settings are named by their flags; so are those that may change
    with pytest.raises(ResumeError, match="--nhid 32 .*checkpoint has 16.*only .*--eval-batch-size"):
        run(dataclasses.replace(mc, nhid=32), tc, resume=latest, explicit=frozenset({"nhid"}))
    with pytest.raises(ResumeError, match="--model 'GRU' .*--batch_size 3 "):
        run(dataclasses.replace(mc, rnn_type="GRU"), dataclasses.replace(tc, batch_size=3),
            resume=latest, explicit=frozenset({"rnn_type", "batch_size"}))
    with pytest.raises(ResumeError, match="lr"):
        run(mc, dataclasses.replace(tc, lr=1.0), resume=latest, explicit=frozenset({"lr"}))
    with pytest.raises(ResumeError, match="latest"):
        run(mc, tc, resume=str(result.paths.best))
    other = write_corpus(tmp_path / "other", vocab=25)
    with pytest.raises(DataError, match="different vocabulary"):
        run(mc, dataclasses.replace(tc, data=other), resume=latest, explicit=frozenset({"data"}))
    # same-valued explicit flags and the allowed changes are fine
    again = run(mc, dataclasses.replace(tc, epochs=2), resume=latest, explicit=frozenset({"nhid", "epochs", "lr"}))
    assert again.epochs_done == 2


def test_corrupt_or_foreign_resume_files(tmp_path, corpus):
    mc, tc = configs(tmp_path, corpus)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        run(mc, tc, resume=str(bad))
    task = save_checkpoint(tmp_path / "task.pt", kind="task", arch={}, config={}, model={})
    with pytest.raises(CheckpointError, match="task"):
        run(mc, tc, resume=str(task))
    assert not (tmp_path / "run").exists()


def test_bad_inputs_write_nothing(tmp_path, corpus):
    mc, tc = configs(tmp_path, corpus, data=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="getdata"):
        run(mc, tc)
    assert not (tmp_path / "run").exists()
    mc, tc = configs(tmp_path, corpus, model=dict(init="chain:alpha=oops"))
    with pytest.raises(ValueError, match="oops"):
        run(mc, tc)
    assert not (tmp_path / "run").exists()
    # --cutoffs beyond this corpus's vocabulary: an out-of-range flag, a usage error (exit 2)
    from awd_nonnormal import cli

    mc, tc = configs(tmp_path, corpus, model=dict(cutoffs=(10_000,)))
    with pytest.raises(ValueError, match="below the vocabulary size") as info:
        run(mc, tc)
    assert cli.exit_code(info.value) == cli.EXIT_USAGE == 2
    assert not (tmp_path / "run").exists()
    # a test batch size too large for the test split: found before training, not after it
    mc, tc = configs(tmp_path, corpus, test_batch_size=10_000)
    with pytest.raises(DataError, match=r"the test split: batch size 10000 is too large.*--test-batch-size"):
        run(mc, tc)
    assert not (tmp_path / "run").exists()
    mc, tc = configs(tmp_path, corpus)
    run(mc, tc)
    with pytest.raises(RunExistsError, match="--resume"):
        run(mc, tc)


# ---------------------------------------------------------------------------------- NaN

def _nan_after(monkeypatch, epoch, batch):
    real = lm.Trainer._loss

    def loss(self, logits, targets):
        value = real(self, logits, targets)
        st = self.state
        return value * float("nan") if (st.epoch, st.batch + 1) >= (epoch, batch) else value

    monkeypatch.setattr(lm.Trainer, "_loss", loss)


def _overflow_norm_at(monkeypatch, batches):
    """The gradient norm the trainer sees is inf at these 1-based batches of every epoch."""
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def clip(params, max_norm, *args, **kw):
        params = list(params)
        calls.append(1)
        norm = real(params, max_norm, *args, **kw)
        return torch.full_like(norm, math.inf) if len(calls) in batches else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    return calls


def test_overflowing_gradient_norm_skips_the_step_and_the_run_goes_on(tmp_path, corpus, monkeypatch):
    """The policy of awd_nonnormal.runs: the step is skipped (the weights do not move), counted,
    and the run goes on; max_skipped_steps of them in a row end it as diverged."""
    mc, tc = configs(tmp_path, corpus, epochs=1)
    _overflow_norm_at(monkeypatch, {1})
    seen = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: (seen.append(1), real_step(self, *a, **k))[1])
    result = run(mc, tc)
    ckpt = load_checkpoint(result.paths.latest)
    assert ckpt["non_finite"] == {"skipped": 1, "streak": 0}
    assert len(seen) == metrics(result)[0]["batches"] - 1 and result.val_loss is not None
    mc, tc = configs(tmp_path, corpus, name="stuck", epochs=1, max_skipped_steps=2)
    _overflow_norm_at(monkeypatch, {2, 3})
    with pytest.raises(NonFiniteLossError, match="2 batches in a row, up to epoch 1, batch 3"):
        run(mc, tc)


def test_nan_stops_and_keeps_the_last_good_checkpoints(tmp_path, corpus, monkeypatch):
    mc, tc = configs(tmp_path, corpus, epochs=1)
    good = run(mc, tc)
    before = {p: p.read_bytes() for p in (good.paths.best, good.paths.latest, good.paths.metrics)}
    _nan_after(monkeypatch, 2, 3)
    with pytest.raises(NonFiniteLossError, match="epoch 2, batch 3"):
        run(ModelConfig(), TrainConfig(epochs=3), resume=str(good.paths.latest), explicit=frozenset({"epochs"}))
    assert {p: p.read_bytes() for p in before} == before


def test_nan_exits_nonzero_from_main(tmp_path, corpus, monkeypatch, capsys):
    main = _load_main()
    _nan_after(monkeypatch, 1, 2)
    save = tmp_path / "nan" / "model.pt"
    rc = main.main(_tiny_argv(corpus, save))
    err = capsys.readouterr().err
    assert rc == 4 and "epoch 1, batch 2" in err  # diverged (awd_nonnormal.cli.EXIT_DIVERGED)
    assert not save.exists() and not save.with_name("model.latest.pt").exists()


def test_overwrite_removes_every_file_of_the_old_run(tmp_path, corpus, monkeypatch):
    mc, tc = configs(tmp_path, corpus, epochs=1)
    old = run(mc, tc)
    folder = old.paths.best.parent
    (folder / "model.e1.pt").write_bytes(old.paths.best.read_bytes())  # a snapshot of the old run
    (folder / "other.pt").write_bytes(b"not this run's")
    assert old.paths.latest.exists() and old.paths.initial.exists()

    class Killed(Exception):
        pass

    def killed(self):  # the new run dies before it writes anything
        raise Killed

    monkeypatch.setattr(lm.Trainer, "fit", killed)
    with pytest.raises(Killed):
        run(mc, dataclasses.replace(tc, overwrite=True, seed=7))
    # nothing of the old run is left for --resume NAME.latest.pt to continue by mistake
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["other.pt"]


def test_ctrl_c_exits_130_from_main(tmp_path, corpus, monkeypatch, capsys):
    main = _load_main()
    fired = interrupt_at(monkeypatch, 1, batch=2)
    save = tmp_path / "cut" / "model.pt"
    rc = main.main(_tiny_argv(corpus, save))
    assert fired and rc == 130  # interrupted (awd_nonnormal.cli.EXIT_INTERRUPTED), as the tasks
    assert "--resume" in capsys.readouterr().out and save.with_name("model.latest.pt").exists()


# ---------------------------------------------------------------------------------- command line

def _load_main():
    spec = importlib.util.spec_from_file_location("awd_main", ROOT / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exit_code(main, argv):
    """main(argv)'s exit status, returned or raised by argparse as SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _tiny_argv(corpus, save, *extra):
    return ["--data", corpus, "--emsize", "8", "--nhid", "16", "--nlayers", "2", "--batch_size", "4",
            "--bptt", "8", "--eval-batch-size", "2", "--test-batch-size", "2", "--epochs", "1",
            "--save", str(save), "--no-progress", *extra]


def test_cli_flags_defaults_and_explicit_fields():
    main = _load_main()
    args = main.build_parser().parse_args([])
    m, t = main.configs_from_args(args)
    awd = dict(data="data/penn", model="LSTM", emsize=400, nhid=1150, nlayers=3, lr=30, clip=0.25,
               epochs=8000, batch_size=80, bptt=70, dropout=0.4, dropouth=0.3, dropouti=0.65,
               dropoute=0.1, wdrop=0.5, seed=1111, nonmono=5, log_interval=200, alpha=2, beta=1,
               wdecay=1.2e-6, optimizer="sgd", when=[-1], tied=True, resume=None, device="auto",
               init="plain")
    assert {k: getattr(args, k) for k in awd} == awd
    assert m.init.params == {} and t.save.startswith("runs") and t.save.endswith("model.pt")
    args = main.build_parser().parse_args(["--no-tied", "--init-alpha", "1.02", "--init-plugin", "a",
                                           "--init-plugin", "b", "--when", "3", "5"])
    m, t = main.configs_from_args(args)
    assert not m.tied and m.init.params == {"alpha": 1.02} and m.init.plugins == ("a", "b") and t.when == (3, 5)
    assert main.explicit_fields(["--epochs", "3", "--init-beta", "0.1", "--no-progress", "--model", "GRU"]) \
        == {"epochs", "init.params", "progress", "rnn_type"}
    # a value equal to its default still counts as given (it must agree with a resumed run)
    assert main.explicit_fields(["--nlayers", "3", "-v", "--init-plugin", "a"]) == {"nlayers", "init.plugins"}


@pytest.mark.parametrize("argv, message", [
    (["--init", "chain:alpha=x"], "not a number"),
    (["--init", "nosuch"], "unknown initializer"),
    (["--model", "RNN", "--init", "g=chain"], "gate"),
    (["--init", "chain", "--init-beta", "0.3"], "beta"),
    (["--init-plugin", "no_such_module_xyz"], "no_such_module_xyz"),
    (["--dropout", "1.5"], "dropout"),
    (["--cuda"], "--device"),
])
def test_cli_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path):
    main = _load_main()
    assert _exit_code(main.main, argv + ["--save", str(tmp_path / "x" / "model.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_on_a_cpu_machine(capsys, tmp_path):
    assert _exit_code(_load_main().main, ["--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_main_end_to_end_subprocess(tmp_path, corpus):
    save = tmp_path / "cli" / "model.pt"
    env_cmd = [sys.executable, str(ROOT / "main.py"), *_tiny_argv(corpus, save, "--model", "RNN", "--init", "chain")]
    proc = subprocess.run(env_cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "loss (nats)" in out and "perplexity" in out and "bits/token" in out
    assert "valid" in out and "test" in out and str(save) in out
    assert save.exists() and save.with_name("model.latest.pt").exists()
    assert len(save.with_name("model.metrics.jsonl").read_text().splitlines()) == 1

    bad = subprocess.run([sys.executable, str(ROOT / "main.py"), "--init", "chain:beta=1", "--data", corpus],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "beta" in lines[0] and "Traceback" not in bad.stderr
    assert not (tmp_path / "runs").exists()
