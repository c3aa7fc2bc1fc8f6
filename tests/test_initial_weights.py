"""Initial weights stored once per run: language-model checkpoints name a run-level file instead of
each holding a copy; analysis with --initial reads either kind, and a resumed older run moves its
embedded weights into the file."""

from __future__ import annotations

import json

import pytest
import torch

import analyze
from awd_nonnormal.checkpoint import CheckpointError, load_checkpoint, load_initial, save_checkpoint, save_initial
from awd_nonnormal.init import apply_init
from awd_nonnormal.lm import ModelConfig, TrainConfig, run
from awd_nonnormal.rnn import build_rnn
from tests.test_lm import configs, write_corpus


def _task_checkpoint(path, initial_rnn, *, embedded, initial_name="run.initial.pt"):
    """A task-style checkpoint whose trained weights are the initial ones plus a perturbation,
    with the initial weights embedded (older files) or in a file named beside it."""
    g = torch.Generator().manual_seed(5)
    model = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in initial_rnn.items()}
    extra = {"initial_rnn": initial_rnn} if embedded else {"initial_rnn_file": initial_name}
    if not embedded:
        save_initial(path.parent / initial_name, initial_rnn)
    n = initial_rnn["rnn.weight_hh_l0"].shape[0]
    return save_checkpoint(path, kind="task", arch={"rnn_type": "RNN", "nonlinearity": "tanh", "nlayers": 1,
                                                    "input_size": 2, "hidden_sizes": [n]},
                           config={"task": "copy", "init": "chain", "seed": 1}, model=model, **extra)


@pytest.fixture
def initial_rnn():
    m = build_rnn("RNN", 2, 12)
    apply_init(m, "chain", zero_bias=True, generator=torch.Generator().manual_seed(0))
    return {f"rnn.{k}": v.detach().clone() for k, v in m.state_dict().items()}


def _analyse_initial(path, tmp_path, name):
    out = tmp_path / name
    assert analyze.main([str(path), "--initial", "--no-figures", "--no-progress", "--out", str(out)]) == 0
    data = json.loads((out / "analysis.json").read_text())
    (rec,) = data["checkpoints"]
    return rec


def test_embedded_and_file_initial_weights_analyse_the_same(tmp_path, initial_rnn):
    old = _task_checkpoint(tmp_path / "old" / "run.pt", initial_rnn, embedded=True)
    new = _task_checkpoint(tmp_path / "new" / "run.pt", initial_rnn, embedded=False)
    assert "initial_rnn" not in torch.load(new, weights_only=True)
    rec_old = _analyse_initial(old, tmp_path, "a_old")
    rec_new = _analyse_initial(new, tmp_path, "a_new")
    assert rec_old["initial"] is not None and not rec_old["initial_missing"]
    assert rec_new["initial"] == rec_old["initial"] and rec_new["layers"] == rec_old["layers"]
    # chain init (11 ones below the diagonal, all eigenvalues 0): Henrici index sqrt(11), 1 when
    # normalised by the Frobenius norm (closed form); the trained (perturbed) weights give other
    # values, so the two were not mixed up
    initial_gate = rec_new["initial"][0]["gates"]["h"]
    assert initial_gate["henrici_raw"] == pytest.approx(11**0.5, rel=1e-6)
    assert initial_gate["henrici_normalized"] == pytest.approx(1.0, rel=1e-6)
    assert rec_new["layers"][0]["gates"]["h"]["henrici_normalized"] != pytest.approx(1.0, abs=1e-3)


def test_missing_initial_file_is_a_warning_not_a_failure(tmp_path, initial_rnn, capsys, caplog):
    path = _task_checkpoint(tmp_path / "run.pt", initial_rnn, embedded=False)
    (tmp_path / "run.initial.pt").unlink()
    with pytest.raises(CheckpointError, match="initial weights file .* is missing"):
        load_initial(torch.load(path, weights_only=True), path)
    rec = _analyse_initial(path, tmp_path, "a")
    assert rec["initial"] is None and rec["initial_missing"]
    assert "run.initial.pt is missing): its initial weights cannot be analysed" in caplog.text
    assert "1 checkpoint(s) hold or name no readable initial weights" in capsys.readouterr().out


def test_lm_run_writes_the_initial_weights_once_and_resumes_an_older_run(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    mc, tc = configs(tmp_path, corpus, "run", model=dict(rnn_type="RNN", nonlinearity="elu", init="chain"),
                     lr=2.0, epochs=1)
    first = run(mc, tc)
    initial_file = first.paths.initial
    stored = load_initial(load_checkpoint(first.paths.best), first.paths.best)
    for name in (first.paths.best, first.paths.latest):
        assert "initial_rnn" not in load_checkpoint(name)
    # an older run: its latest state embeds the initial weights and there is no run-level file
    latest = load_checkpoint(first.paths.latest)
    latest.pop("initial_rnn_file")
    latest["initial_rnn"] = stored
    base = {k: latest.pop(k) for k in ("kind", "arch", "config", "model")}
    for k in ("format", "version"):
        latest.pop(k)
    save_checkpoint(first.paths.latest, **base, **latest)
    initial_file.unlink()
    resumed = run(ModelConfig(), TrainConfig(epochs=2), resume=str(first.paths.latest),
                  explicit=frozenset({"epochs"}))
    assert resumed.epochs_done == 2 and initial_file.is_file()
    best = load_checkpoint(resumed.paths.best)
    assert best["initial_rnn_file"] == initial_file.name and "initial_rnn" not in best
    again = load_initial(best, resumed.paths.best)
    assert set(again) == set(stored) and all(torch.equal(again[k], stored[k]) for k in stored)
