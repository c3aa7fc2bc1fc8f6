"""``--init-scale`` is the parameter the paper sweeps (chain alpha, fbchain beta, identity and
orthogonal lambda) on every command line: main.py, the tasks' train and sweep. Each test builds
the model a command line asks for and reads the recurrent matrix back."""

import dataclasses

import pytest
import torch

import main
from awd_nonnormal import init as I
from awd_nonnormal.model import RNNModel
from awd_nonnormal.tasks import __main__ as cli
from awd_nonnormal.tasks import sweep as S
from awd_nonnormal.tasks import train as T

N = 6


def expected_fbchain(n, alpha, beta):
    w = torch.zeros(n, n)
    for i in range(1, n):
        w[i, i - 1] = alpha  # feed-forward i-1 -> i
        w[i - 1, i] = beta   # feedback i -> i-1
    return w


# (init, --init-scale, expected recurrent block)
CASES = [
    ("fbchain", 0.05, expected_fbchain(N, 0.99, 0.05)),
    ("chain", 1.03, expected_fbchain(N, 1.03, 0.0)),
    ("identity", 0.96, 0.96 * torch.eye(N)),
]


def _lm_weight(argv):
    args = main.build_parser().parse_args(argv)
    model_cfg, _ = main.configs_from_args(args)
    model = RNNModel(dataclasses.replace(model_cfg, ntoken=11))
    (layer,) = [l for l in I.recurrent_layers(model) if l.name.startswith("rnns.0.")]
    return layer.weight_hh.detach()


@pytest.mark.parametrize("init,scale,want", CASES)
def test_main_py(init, scale, want):
    w = _lm_weight(["--model", "RNN", "--nhid", str(N), "--emsize", "4", "--nlayers", "1",
                    "--no-tied", "--init", init, "--init-scale", str(scale)])
    assert torch.allclose(w, want)


def test_main_py_lstm_every_gate():
    w = _lm_weight(["--model", "LSTM", "--nhid", str(N), "--emsize", "4", "--nlayers", "1",
                    "--no-tied", "--init", "fbchain", "--init-scale", "0.05"])
    for block in w.chunk(4, dim=0):
        assert torch.allclose(block, expected_fbchain(N, 0.99, 0.05))


@pytest.mark.parametrize("init,scale,want", CASES)
def test_tasks_train(init, scale, want, tmp_path):
    args = cli.build_parser().parse_args(["train", "--task", "copy", "--hidden", str(N), "--init", init,
                                          "--init-scale", str(scale), "--out", str(tmp_path)])
    config, _ = cli._train_config(args)
    assert torch.allclose(T.build_model(config).rnn.weight_hh_l0.detach(), want)


def test_tasks_sweep(tmp_path):
    """The sweep's fbchain values are beta (the paper's grid), as is its generic scale (below)."""
    grid = S.grid_from_args(models="fbchain", lrs="1e-3", seeds="1", values=["fbchain=0.05"])
    plan = S.plan_sweep(grid, {"task": "copy", "hidden": N}, tmp_path)
    assert len(plan.runs) == 1
    assert torch.allclose(T.build_model(plan.runs[0].config).rnn.weight_hh_l0.detach(),
                          expected_fbchain(N, 0.99, 0.05))


def test_tasks_sweep_scale_values(tmp_path):
    grid = S.grid_from_args(models="fbchain", lrs="1e-3", seeds="1", values=["fbchain.scale=0.06"])
    plan = S.plan_sweep(grid, {"task": "copy", "hidden": N}, tmp_path)
    assert [r.config.init.params["scale"] for r in plan.runs] == [0.06]
    assert torch.allclose(T.build_model(plan.runs[0].config).rnn.weight_hh_l0.detach(),
                          expected_fbchain(N, 0.99, 0.06))


def test_gain_is_named_in_one_place():
    assert {n: I.gain_param(n) for n in ("chain", "fbchain", "identity", "orthogonal")} == \
        {"chain": "alpha", "fbchain": "beta", "identity": "scale", "orthogonal": "scale"}
    # the sweep's paper grid sweeps the same parameters (its folder names keep "scale" for lambda)
    for name, (param, _, _) in S.PAPER_MODELS.items():
        assert I.gain_param(name) == param


def test_main_py_takes_direction_in_the_spec():
    argv = ["--model", "LSTM", "--nhid", str(N), "--emsize", "4", "--nlayers", "1", "--no-tied"]
    fwd = _lm_weight(argv + ["--init", "mixed"])
    rev = _lm_weight(argv + ["--init", "mixed:direction=reverse"])
    for f, r in zip(fwd.chunk(4, dim=0), rev.chunk(4, dim=0)):
        assert torch.equal(r, f.T) and not torch.equal(f, f.T)
