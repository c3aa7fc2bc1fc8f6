"""Tests of the checkpoint analysis (awd_nonnormal/posthoc.py and analyze.py): networks whose
profile and Henrici index are known in closed form, aggregation against numpy, discovery,
filters, and clean failures on files that are not our checkpoints."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import analyze
from awd_nonnormal import posthoc
from awd_nonnormal.checkpoint import CheckpointError, save_checkpoint, save_initial
from awd_nonnormal.init import apply_init, fbchain_
from awd_nonnormal.posthoc import AnalysisError, PosthocConfig
from awd_nonnormal.regularize import WeightDrop
from awd_nonnormal.rnn import build_rnn

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def layer_module(rnn_type, d, n, spec, *, nonlinearity="tanh", seed=0, num_layers=1):
    m = build_rnn(rnn_type, d, n, num_layers=num_layers, nonlinearity=nonlinearity)
    apply_init(m, spec, zero_bias=True, generator=torch.Generator().manual_seed(seed))
    return m


def save_task(path, module, *, nonlinearity="tanh", init="chain", seed=1, success=None, initial=True,
              perturb=0.0, task="addition"):
    """A task-style checkpoint (CONVENTIONS.md): the layer under ``rnn.``, a read-out, a result."""
    rnn_type = {4: "LSTM", 3: "GRU", 1: "RNN"}[module.weight_hh_l0.shape[0] // module.weight_hh_l0.shape[1]]
    initial_rnn = {f"rnn.{k}": v.clone() for k, v in module.state_dict().items()}
    if perturb:
        with torch.no_grad():
            module.weight_hh_l0.add_(perturb * torch.randn(module.weight_hh_l0.shape,
                                                           generator=torch.Generator().manual_seed(seed)))
    model = {f"rnn.{k}": v for k, v in module.state_dict().items()}
    model["readout.weight"] = torch.zeros(1, module.weight_hh_l0.shape[1])
    extra = {}
    if initial:
        extra["initial_rnn"] = initial_rnn
    if success is not None:
        extra["result"] = {"final_val_loss": 0.01 if success else 0.5, "baseline": 1 / 6, "success": success,
                           "epochs_run": 1}
    n = module.weight_hh_l0.shape[1]
    return save_checkpoint(path, kind="task",
                           arch={"rnn_type": rnn_type, "nonlinearity": nonlinearity if rnn_type == "RNN" else None,
                                 "nlayers": 1, "input_size": module.weight_ih_l0.shape[1], "hidden_sizes": [n]},
                           config={"task": task, "init": init, "seed": seed, "lr": 1e-4}, model=model, **extra)


def analyse(paths, tmp_path, **kw):
    kw.setdefault("figures", False)
    kw.setdefault("out", str(tmp_path / "analysis"))
    return posthoc.run([str(p) for p in paths], PosthocConfig(**kw))


def gate_of(report, gate, layer=0, ckpt=0, which="layers"):
    return report.data["checkpoints"][ckpt][which][layer]["gates"][gate]


def profile_dict(entry):
    return dict(zip(entry["offsets"], entry["profile"]))


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "analyze.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------------
# networks with known answers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nonlinearity", ["linear", "relu", "elu"])
@pytest.mark.parametrize("d", [1, 3])
def test_untrained_chain_profile_peaks_at_plus_one(tmp_path, nonlinearity, d):
    n, alpha = 12, 1.0
    m = layer_module("RNN", d, n, "chain", nonlinearity=nonlinearity)
    path = save_task(tmp_path / "c.pt", m, nonlinearity=nonlinearity)
    entry = gate_of(analyse([path], tmp_path), "h")
    prof = profile_dict(entry)
    assert max(prof, key=prof.get) == 1
    assert entry["henrici_raw"] == pytest.approx(math.sqrt(n - 1) * alpha)
    assert entry["henrici_normalized"] == pytest.approx(1.0)
    assert entry["spectral_radius"] == pytest.approx(0.0, abs=1e-12)
    if d == 1:
        # one source unit: unit k first (and only) fires at step k, so the order is the index
        # order and the profile is exactly the chain: alpha at i - j = +1, zero elsewhere
        layer = analyse([path], tmp_path).data["checkpoints"][0]["layers"][0]
        assert layer["order"] == list(range(n))
        assert layer["peak_times"] == list(range(n))
        assert prof[1] == pytest.approx(alpha)
        assert all(v == 0 for k, v in prof.items() if k != 1)


def test_ramp_lstm_gates_have_monotonic_profiles(tmp_path):
    n, eps = 16, 0.01
    for spec in ("mixed", "i=ramp,f=ramp,g=chain,o=ramp"):
        m = layer_module("LSTM", 1, n, spec)
        rep = analyse([save_task(tmp_path / "lstm.pt", m, init=spec)], tmp_path)
        layer = rep.data["checkpoints"][0]["layers"][0]
        # The pulse enters unit 0 only and travels down the chain of the g gate, one unit per
        # two steps (unit k peaks at 2k - 1), so peak times are distinct and increasing and the
        # peak order is the index order. The ramp W[i, j] = eps (i - j) / (N - 1) then gives an
        # exactly linear, strictly increasing profile (under any other order it would not need to
        # stay monotonic: a permutation scrambles i - j).
        assert layer["order"] == list(range(n))
        assert layer["peak_times"] == sorted(layer["peak_times"])
        for gate in "ifo":
            prof = np.array(layer["gates"][gate]["profile"])
            offsets = np.array(layer["gates"][gate]["offsets"])
            assert np.all(np.diff(prof) > 0), gate
            np.testing.assert_allclose(prof, eps * offsets / (n - 1), atol=1e-12)
        g = profile_dict(layer["gates"]["g"])
        assert max(g, key=g.get) == 1


def test_ramp_lstm_with_several_inputs_ties_only_the_source_units(tmp_path):
    # with d inputs the pulse reaches units 0..d-1 at t = 0; they tie at t = 0 and the jitter
    # orders them, so only the units after them keep their index order
    n, d = 16, 3
    m = layer_module("LSTM", d, n, "mixed")
    layer = analyse([save_task(tmp_path / "lstm.pt", m, init="mixed")], tmp_path).data["checkpoints"][0]["layers"][0]
    assert sorted(layer["order"][:d]) == list(range(d))
    assert layer["order"][d:] == list(range(d, n))


def test_orthogonal_rnn_has_zero_henrici(tmp_path):
    m = layer_module("RNN", 4, 20, "orthogonal", seed=3)
    entry = gate_of(analyse([save_task(tmp_path / "o.pt", m, init="orthogonal")], tmp_path), "h")
    assert entry["henrici_normalized"] < 1e-5
    assert entry["spectral_radius"] == pytest.approx(1.0)


@pytest.mark.parametrize("rnn_type,spec,chain_gate,gates", [
    ("LSTM", "orthogonal", None, "ifgo"),
    ("LSTM", "orthogonal,g=chain:alpha=1.03", "g", "ifgo"),
    ("GRU", "orthogonal,n=chain:alpha=1.03", "n", "rzn"),
])
def test_henrici_block_by_block(tmp_path, rnn_type, spec, chain_gate, gates):
    n = 10
    m = layer_module(rnn_type, 2, n, spec, seed=5)
    rep = analyse([save_task(tmp_path / "g.pt", m, init=spec)], tmp_path)
    layer = rep.data["checkpoints"][0]["layers"][0]
    assert list(layer["gates"]) == list(gates)
    for gate in gates:
        entry = layer["gates"][gate]
        if gate == chain_gate:
            assert entry["henrici_raw"] == pytest.approx(math.sqrt(n - 1) * 1.03)
            assert entry["henrici_normalized"] == pytest.approx(1.0)
        else:
            assert entry["henrici_normalized"] < 1e-5, gate


def test_every_layer_and_weight_drop_names(tmp_path):
    torch.manual_seed(0)
    plain = [nn.LSTM(6, 8), nn.LSTM(8, 5)]
    for k, m in enumerate(plain):
        apply_init(m, "orthogonal,g=chain", generator=torch.Generator().manual_seed(k))
    model = {f"rnns.{k}.{name}": v for k, m in enumerate(plain) for name, v in m.state_dict().items()}
    wrapped = nn.ModuleList(WeightDrop(nn.LSTM(m.input_size, m.hidden_size), 0.5) for m in plain)
    for w, m in zip(wrapped, plain):
        w.module.load_state_dict({k: v for k, v in m.state_dict().items() if k != "weight_hh_l0"}, strict=False)
        w.weight_hh_l0_raw.data.copy_(m.weight_hh_l0)
    wd_model = {f"rnns.{k}": v for k, v in wrapped.state_dict().items()}
    assert "rnns.0.weight_hh_l0_raw" in wd_model and "rnns.0.module.weight_ih_l0" in wd_model
    arch = {"rnn_type": "LSTM", "nonlinearity": None, "nlayers": 2, "input_size": 6, "hidden_sizes": [8, 5]}
    a = save_checkpoint(tmp_path / "plain.pt", kind="lm", arch=arch, config={"init": "x"}, model=model)
    b = save_checkpoint(tmp_path / "wd.pt", kind="lm", arch=arch, config={"init": "x"}, model=wd_model)
    # a copy of the weight inside the wrapped module must not count as another layer
    dup = dict(wd_model, **{"rnns.0.module.weight_hh_l0": torch.zeros(32, 8)})
    c = save_checkpoint(tmp_path / "dup.pt", kind="lm", arch=arch, config={"init": "x"}, model=dup)
    rep = analyse([a, b, c], tmp_path, group_by=("path",))
    layers = [r["layers"] for r in rep.data["checkpoints"]]
    assert [l["name"] for l in layers[1]] == ["rnns.0.l0", "rnns.1.l0"]
    assert [l["hidden_size"] for l in layers[1]] == [8, 5]
    for other in layers[1:]:
        for la, lb in zip(layers[0], other):
            assert la["order"] == lb["order"]
            for gate in "ifgo":
                assert la["gates"][gate]["henrici_raw"] == lb["gates"][gate]["henrici_raw"]
                assert la["gates"][gate]["profile"] == lb["gates"][gate]["profile"]
    assert layers[0][1]["gates"]["g"]["henrici_raw"] == pytest.approx(math.sqrt(4))


def test_multi_layer_module_pulses_each_layer_at_its_own_input(tmp_path):
    m = layer_module("RNN", 1, 6, "chain", nonlinearity="linear", num_layers=2)
    path = save_task(tmp_path / "two.pt", m, nonlinearity="linear")
    layers = analyse([path], tmp_path).data["checkpoints"][0]["layers"]
    assert [l["name"] for l in layers] == ["rnn.l0", "rnn.l1"]
    assert [l["input_size"] for l in layers] == [1, 6]
    # layer 0: one source unit, so unit k peaks at step k
    assert layers[0]["peak_times"] == list(range(6))
    # layer 1's own input is 6 wide: the pulse of ones reaches every unit through
    # source = 0.9 * eye(6, 6), unit k then holds 0.9 for steps 0..k (fed by unit k-1) and drops to
    # 0; its first maximum is at step 0 for every unit, so all tie and only the jitter orders them
    assert layers[1]["peak_times"] == [0] * 6
    assert sorted(layers[1]["order"]) == list(range(6))


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------

def test_mean_sem():
    assert posthoc.mean_sem([2.0, 4.0, 9.0]) == pytest.approx((5.0, np.std([2, 4, 9], ddof=1) / math.sqrt(3)))
    mean, sem = posthoc.mean_sem([1.5])
    assert mean == 1.5 and sem == 0.0  # one sample shows no spread (analysis.mean_sem)
    assert all(math.isnan(x) for x in posthoc.mean_sem([]))


def test_aggregation_over_three_checkpoints_matches_numpy(tmp_path):
    n = 9
    paths, mats = [], []
    for seed in range(3):
        m = layer_module("RNN", 2, n, "plain", nonlinearity="tanh", seed=seed)
        mats.append(m.weight_hh_l0.detach().double().numpy().copy())
        paths.append(save_task(tmp_path / f"r{seed}" / "checkpoint.pt", m, init="plain", seed=seed))
    rep = analyse([tmp_path], tmp_path)
    assert len(rep.data["groups"]) == 1
    g = rep.data["groups"][0]["layers"][0]["gates"]["h"]
    assert g["n"] == 3

    def henrici(w):
        ev = np.linalg.eigvals(w)
        raw = math.sqrt(max(0.0, (w ** 2).sum() - (np.abs(ev) ** 2).sum()))
        return raw, raw / np.linalg.norm(w)

    by_hand = {
        "henrici_raw": [henrici(w)[0] for w in mats],
        "henrici_normalized": [henrici(w)[1] for w in mats],
        "spectral_radius": [np.abs(np.linalg.eigvals(w)).max() for w in mats],
    }
    for key, values in by_hand.items():
        v = np.array(values)
        assert g[key]["mean"] == pytest.approx(v.mean(), rel=1e-9)
        assert g[key]["sem"] == pytest.approx(v.std(ddof=1) / np.sqrt(3), rel=1e-7)
    # profiles: independently permute each matrix to its checkpoint's peak order and average
    # the diagonals
    profiles = []
    for rec, w in zip(rep.data["checkpoints"], mats):
        order = np.array(rec["layers"][0]["order"])
        p = w[np.ix_(order, order)]
        profiles.append([np.diagonal(p, offset=-k).mean() for k in range(-(n - 1), n)])
    profiles = np.array(profiles)
    assert g["profile"]["offsets"] == list(range(-(n - 1), n))
    np.testing.assert_allclose(g["profile"]["mean"], profiles.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(g["profile"]["sem"], profiles.std(axis=0, ddof=1) / np.sqrt(3), atol=1e-12)


def test_single_checkpoint_sem_is_zero_in_json(tmp_path):
    """A group of one has s.e.m. 0.0 (analysis.mean_sem's convention for n = 1)."""
    m = layer_module("RNN", 2, 6, "plain")
    rep = analyse([save_task(tmp_path / "a.pt", m)], tmp_path)
    data = json.loads(rep.json_path.read_text())
    g = data["groups"][0]["layers"][0]["gates"]["h"]
    assert g["n"] == 1 and g["henrici_raw"]["sem"] == 0.0


def test_grouping_and_seed(tmp_path):
    for init in ("chain", "orthogonal"):
        for seed in (1, 2):
            m = layer_module("RNN", 2, 6, init, seed=seed)
            save_task(tmp_path / "sweep" / f"{init}_{seed}" / "checkpoint.pt", m, init=init, seed=seed)
    rep = analyse([tmp_path / "sweep"], tmp_path)
    assert sorted(g["label"] for g in rep.data["groups"]) == ["addition RNN chain", "addition RNN orthogonal"]
    assert rep.data["settings"]["group_by"] == ["task", "rnn_type", "init"]
    assert [g["n"] for g in rep.data["groups"]] == [2, 2]
    assert len(analyse([tmp_path / "sweep"], tmp_path, group_by=("path",)).data["groups"]) == 4
    assert len(analyse([tmp_path / "sweep"], tmp_path, group_by=()).data["groups"]) == 1
    by_seed = analyse([tmp_path / "sweep"], tmp_path, group_by=("seed",))
    assert [g["label"] for g in by_seed.data["groups"]] == ["1", "2"]
    with pytest.raises(AnalysisError, match="no checkpoint has a field 'nope'"):
        analyse([tmp_path / "sweep"], tmp_path, group_by=("nope",))
    # the jitter is seeded per checkpoint: the same numbers on a rerun, and whatever else is analysed
    one = analyse([tmp_path / "sweep" / "chain_1" / "checkpoint.pt"], tmp_path, seed=7)
    again = analyse([tmp_path / "sweep"], tmp_path, seed=7)
    rec = next(r for r in again.data["checkpoints"] if "chain_1" in r["path"])
    assert rec["layers"] == one.data["checkpoints"][0]["layers"]


# --------------------------------------------------------------------------------------------
# discovery, filters, initial weights
# --------------------------------------------------------------------------------------------

def test_folder_search_skips_foreign_files_and_globs_expand(tmp_path):
    for seed in (1, 2):
        save_task(tmp_path / "runs" / f"s{seed}" / "checkpoint.pt", layer_module("RNN", 2, 5, "chain"), seed=seed)
    (tmp_path / "runs" / "junk.pt").write_bytes(os.urandom(300))
    (tmp_path / "runs" / "notes.txt").write_text("not a checkpoint")
    rep = analyse([tmp_path / "runs"], tmp_path)
    assert rep.data["groups"][0]["n"] == 2
    assert [Path(p).name for p, _ in rep.skipped] == ["junk.pt"]
    # a quoted glob is expanded here; a foreign file it names is an error like any named file
    rep = analyse([str(tmp_path / "runs" / "*" / "checkpoint.pt")], tmp_path)
    assert rep.data["groups"][0]["n"] == 2
    with pytest.raises(CheckpointError):
        analyse([str(tmp_path / "runs" / "*.pt")], tmp_path)
    with pytest.raises(AnalysisError, match="matches no file"):
        analyse([str(tmp_path / "nothing" / "*.pt")], tmp_path)


def test_language_model_latest_and_snapshots_are_left_out_of_folder_searches(tmp_path):
    m = layer_module("LSTM", 3, 4, "plain")
    model = {f"rnns.0.{k}": v for k, v in m.state_dict().items()}
    arch = {"rnn_type": "LSTM", "nonlinearity": None, "nlayers": 1, "input_size": 3, "hidden_sizes": [4]}
    config = {"model": {"init": "plain", "rnn_type": "LSTM"}, "train": {"data": "data/penn"}}
    for name, role in (("model.pt", "best"), ("model.latest.pt", "latest"), ("model.e3.pt", "snapshot")):
        save_checkpoint(tmp_path / "lm" / name, kind="lm", arch=arch, config=config, model=model, role=role)
    rep = analyse([tmp_path / "lm"], tmp_path)
    assert [Path(r["path"]).name for r in rep.data["checkpoints"]] == ["model.pt"]
    assert rep.secondary == 2
    assert rep.data["groups"][0]["label"] == "data/penn LSTM plain"   # config.train.data, config.model.init
    rep = analyse([tmp_path / "lm" / "model.latest.pt"], tmp_path)     # named: analysed
    assert rep.data["groups"][0]["n"] == 1
    rep = analyse([tmp_path / "lm"], tmp_path, filters=(("role", "latest"),))
    assert [Path(r["path"]).name for r in rep.data["checkpoints"]] == ["model.latest.pt"]


def test_only_successful_and_filters(tmp_path):
    for seed, ok in ((1, True), (2, True), (3, False)):
        save_task(tmp_path / f"s{seed}" / "checkpoint.pt", layer_module("RNN", 2, 5, "orthogonal", seed=seed),
                  init="orthogonal", seed=seed, success=ok)
    assert analyse([tmp_path], tmp_path).data["groups"][0]["n"] == 3
    rep = analyse([tmp_path], tmp_path, only_successful=True)
    assert rep.data["groups"][0]["n"] == 2 and rep.filtered_out == 1
    rep = analyse([tmp_path], tmp_path, filters=(("seed", "3"),))
    assert [r["fields"]["config.seed"] for r in rep.data["checkpoints"]] == [3]
    rep = analyse([tmp_path], tmp_path, filters=(("result.success", "true"), ("config.seed", "2")))
    assert rep.data["groups"][0]["n"] == 1
    with pytest.raises(AnalysisError, match="no checkpoint left"):
        analyse([tmp_path], tmp_path, only_successful=True, filters=(("seed", "3"),))
    with pytest.raises(AnalysisError, match="no checkpoint has a field 'colour'"):
        analyse([tmp_path], tmp_path, filters=(("colour", "red"),))


def test_initial_weights_side_by_side(tmp_path):
    a = save_task(tmp_path / "a.pt", layer_module("RNN", 2, 6, "orthogonal", seed=1), init="orthogonal",
                  perturb=0.2, seed=1)
    b = save_task(tmp_path / "b.pt", layer_module("RNN", 2, 6, "orthogonal", seed=2), init="orthogonal",
                  perturb=0.2, seed=2, initial=False)
    rep = analyse([a, b], tmp_path, initial=True)
    g = rep.data["groups"][0]
    assert g["n"] == 2 and g["n_initial"] == 1
    assert g["initial"][0]["gates"]["h"]["henrici_normalized"]["mean"] < 1e-5     # orthogonal at init
    assert g["layers"][0]["gates"]["h"]["henrici_normalized"]["mean"] > 1e-3      # not after "training"
    assert rep.missing_initial == [str(b)]
    assert rep.data["checkpoints"][1]["initial_missing"] is True
    table = posthoc.format_table(rep.data)
    assert "d(W) initial" in table and "d(W) trained" in table


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------

def test_cli_end_to_end(tmp_path):
    for seed in (1, 2):
        save_task(tmp_path / "runs" / f"s{seed}" / "checkpoint.pt",
                  layer_module("RNN", 2, 8, "orthogonal", seed=seed), init="orthogonal", seed=seed, perturb=0.1)
    out = tmp_path / "out"
    proc = run_cli(tmp_path / "runs", "--initial", "--out", out, "--max-offset", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "d(W) initial" in proc.stdout and "addition RNN orthogonal" in proc.stdout
    data = json.loads((out / "analysis.json").read_text())
    assert len(data["checkpoints"]) == 2 and data["groups"][0]["n"] == 2
    assert len(data["groups"][0]["layers"][0]["gates"]["h"]["profile"]["mean"]) == 15   # full, not +-5
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert any(p.startswith("profile_") for p in pngs) and any(p.startswith("heatmap_") for p in pngs)
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_cli_in_process_options(tmp_path, capsys):
    for seed, ok in ((1, True), (2, False)):
        save_task(tmp_path / f"s{seed}.pt", layer_module("RNN", 2, 5, "chain", seed=seed), seed=seed, success=ok)
    args = [str(tmp_path / "s1.pt"), str(tmp_path / "s2.pt"), "--no-figures", "--out", str(tmp_path / "o")]
    assert analyze.main(args + ["--only-successful", "--json", str(tmp_path / "x.json")]) == 0
    assert json.loads((tmp_path / "x.json").read_text())["groups"][0]["n"] == 1
    assert not list((tmp_path / "o").glob("*.png"))
    assert analyze.main(args + ["--filter", "seed=9"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint left" in err and len(err.strip().splitlines()) == 1
    assert analyze.main([str(tmp_path / "missing.pt"), "--no-figures"]) == 1
    assert capsys.readouterr().err.strip() == f"analyze.py: error: {tmp_path / 'missing.pt'}: no such file or folder"


# --------------------------------------------------------------------------------------------
# files that are not our checkpoints
# --------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this calls os.mkdir(marker): proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _bad_inputs(tmp_path):
    marker = tmp_path / "PWNED"
    raw = tmp_path / "foreign.pkl"
    raw.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    zipped = tmp_path / "foreign.pt"
    torch.save({"format": "awd-nonnormal", "model": _Payload(marker)}, zipped)
    good = save_task(tmp_path / "good.pt", layer_module("RNN", 2, 4, "chain"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "readme.txt").write_text("no checkpoints here")
    tall_ih = _malformed(tmp_path / "tall_ih.pt", ih_rows=5)
    initial_file = save_initial(tmp_path / "run.initial.pt", {"rnn.weight_hh_l0": torch.eye(4)})
    return marker, {"raw pickle": raw, "torch.save pickle": zipped, "truncated": truncated,
                    "random bytes": noise, "folder without checkpoints": empty,
                    "weight_ih of another height": tall_ih, "initial-weights file": initial_file}


def _malformed(path, n=4, ih_rows=None, bias_len=None):
    """A task checkpoint of a vanilla RNN whose weight_ih has ``ih_rows`` rows or whose bias_ih
    has ``bias_len`` entries (weight_hh is (n, n))."""
    model = {"rnn.weight_hh_l0": torch.eye(n), "rnn.weight_ih_l0": torch.ones(ih_rows or n, 2),
             "rnn.bias_ih_l0": torch.zeros(bias_len or n)}
    return save_checkpoint(path, kind="task", arch={"rnn_type": "RNN", "nonlinearity": "tanh"}, config={},
                           model=model)


def test_weights_that_do_not_fit_weight_hh_are_named_errors_and_skipped_in_folders(tmp_path):
    """Input weights or biases of another size than weight_hh's rows: a one-line CheckpointError
    naming the file and the layer for a named file; in a folder search the file is skipped with
    that reason and the others are analysed."""
    good = save_task(tmp_path / "runs" / "good.pt", layer_module("RNN", 2, 4, "chain"))
    tall = _malformed(tmp_path / "runs" / "tall.pt", ih_rows=5)
    long_bias = _malformed(tmp_path / "runs" / "bias.pt", bias_len=6)
    with pytest.raises(CheckpointError, match=r"tall\.pt: layer rnn\.l0: weight_ih of shape \(5, 2\) does not fit"):
        analyse([tall], tmp_path)
    with pytest.raises(CheckpointError, match=r"bias\.pt: layer rnn\.l0: bias_ih of shape \(6,\)"):
        analyse([long_bias], tmp_path)
    rep = analyse([tmp_path / "runs"], tmp_path)
    assert [r["path"] for r in rep.data["checkpoints"]] == [str(good)]
    assert sorted(Path(p).name for p, _ in rep.skipped) == ["bias.pt", "tall.pt"]
    assert all(why.startswith(p) for p, why in rep.skipped)       # the reason names its file
    # a weight_hh of no cell's shape: the reason names the file too
    bad_hh = save_checkpoint(tmp_path / "hh.pt", kind="task", arch={"rnn_type": "RNN"}, config={},
                             model={"rnn.weight_hh_l0": torch.ones(5, 6), "rnn.weight_ih_l0": torch.ones(5, 2)})
    with pytest.raises(CheckpointError, match=r"hh\.pt: .*cannot tell the cell type"):
        analyse([bad_hh], tmp_path)


def test_initial_weights_that_do_not_fit_the_model_are_reported_not_analysed(tmp_path, caplog):
    """Initial weights of another size than the model's (in the file a checkpoint names, or
    embedded without input weights, which would borrow the model's): the trained weights are
    analysed, the initial ones are reported as unusable, with the reason."""
    model = {k: v for k, v in layer_module("RNN", 2, 6, "chain").state_dict().items()}
    small = layer_module("RNN", 2, 4, "chain").state_dict()
    arch = {"rnn_type": "RNN", "nonlinearity": "tanh"}
    save_initial(tmp_path / "other.initial.pt", {f"rnn.{k}": v for k, v in small.items()})
    named = save_checkpoint(tmp_path / "named.pt", kind="task", arch=arch, config={},
                            model={f"rnn.{k}": v for k, v in model.items()}, initial_rnn_file="other.initial.pt")
    embedded = save_checkpoint(tmp_path / "embedded.pt", kind="task", arch=arch, config={},
                               model={f"rnn.{k}": v for k, v in model.items()},
                               initial_rnn={"rnn.weight_hh_l0": small["weight_hh_l0"]})
    with caplog.at_level("WARNING", logger="awd_nonnormal.posthoc"):
        rep = analyse([named, embedded], tmp_path, initial=True)
    assert rep.missing_initial == [str(named), str(embedded)]
    assert [c["initial"] for c in rep.data["checkpoints"]] == [None, None]
    assert [c["layers"][0]["hidden_size"] for c in rep.data["checkpoints"]] == [6, 6]
    assert caplog.text.count("weight_hh is (4, 4) in the initial weights but (6, 6) in the model") == 2
    # the function itself: fitting weights give None
    layers = {layer.name: layer for layer in posthoc.find_layers({f"rnn.{k}": v for k, v in model.items()})}
    assert posthoc.initial_mismatch({f"rnn.{k}": v.clone() for k, v in model.items()}, layers) is None
    assert "layers" in posthoc.initial_mismatch({}, layers)


def test_a_runs_initial_weights_file_is_read_through_its_checkpoint_only(tmp_path, caplog):
    """A language-model run folder holds NAME.initial.pt beside its checkpoints: a folder search
    leaves it out without a warning (and reads it through the checkpoint with --initial); naming
    it is a clear error."""
    m = layer_module("RNN", 3, 5, "chain")
    model = {f"rnns.0.{k}": v for k, v in m.state_dict().items()}
    arch = {"rnn_type": "RNN", "nonlinearity": "tanh", "nlayers": 1, "input_size": 3, "hidden_sizes": [5]}
    initial = save_initial(tmp_path / "lm" / "model.initial.pt", {k: v.clone() for k, v in model.items()})
    save_checkpoint(tmp_path / "lm" / "model.pt", kind="lm", arch=arch, config={}, model=model, role="best",
                    initial_rnn_file=initial.name)
    with caplog.at_level("WARNING"):
        rep = analyse([tmp_path / "lm"], tmp_path, initial=True)
    assert rep.skipped == [] and "WARNING" not in caplog.text
    assert [Path(c["path"]).name for c in rep.data["checkpoints"]] == ["model.pt"]
    assert rep.data["checkpoints"][0]["initial"] is not None and rep.missing_initial == []
    with pytest.raises(CheckpointError, match="initial-weights file, not a checkpoint"):
        analyse([initial], tmp_path)


def test_payload_is_real_but_never_runs_in_process(tmp_path):
    marker, bad = _bad_inputs(tmp_path)
    pickle.loads(bad["raw pickle"].read_bytes())     # the unsafe way: the payload runs
    assert marker.exists()
    marker.rmdir()
    for name in ("raw pickle", "torch.save pickle", "truncated", "random bytes"):
        with pytest.raises(CheckpointError):
            analyse([bad[name]], tmp_path)
    with pytest.raises(AnalysisError, match="no checkpoint files"):
        analyse([bad["folder without checkpoints"]], tmp_path)
    assert not marker.exists()


def test_cli_fails_cleanly(tmp_path):
    """``python analyze.py BAD``: exit status 1, one line on stderr, nothing written, no payload
    run. The cases run as concurrent subprocesses (each pays torch's import time)."""
    marker, bad = _bad_inputs(tmp_path)
    procs = {case: subprocess.Popen([sys.executable, str(ROOT / "analyze.py"), str(target),
                                     "--out", str(tmp_path / "out")],
                                    cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for case, target in bad.items()}
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, (case, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("analyze.py: error:"), (case, stderr)
        assert "Traceback" not in stderr and stdout == "", case
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# grouping by corpus, sorted groups, unreliable values, the shuffled null, heat maps
# --------------------------------------------------------------------------------------------

def save_lm(path, data, fingerprint, init="chain", seed=0):
    m = layer_module("RNN", 3, 5, init, seed=seed)
    model = {f"rnns.0.{k}": v for k, v in m.state_dict().items()}
    arch = {"rnn_type": "RNN", "nonlinearity": "tanh", "nlayers": 1, "input_size": 3, "hidden_sizes": [5]}
    config = {"model": {"init": init, "rnn_type": "RNN"}, "train": {"data": data, "seed": seed}}
    return save_checkpoint(path, kind="lm", arch=arch, config=config, model=model, role="best",
                           vocab_fingerprint=fingerprint)


def test_two_spellings_of_one_corpus_form_one_group_and_groups_are_sorted(tmp_path):
    toy, other = "ab" * 32, "cd" * 32
    save_lm(tmp_path / "r1" / "m.pt", "data/toy", toy, init="plain")
    save_lm(tmp_path / "r2" / "m.pt", "data/toy/", toy, init="plain", seed=1)
    save_lm(tmp_path / "r3" / "m.pt", str(tmp_path / "elsewhere" / "data" / "toy"), toy, init="plain", seed=2)
    save_lm(tmp_path / "r4" / "m.pt", "data/zoo", other, init="chain")
    save_lm(tmp_path / "r5" / "m.pt", "data/toy", toy, init="chain")
    rep = analyse([tmp_path / "r5", tmp_path / "r4", tmp_path / "r1", tmp_path / "r2", tmp_path / "r3"], tmp_path)
    assert rep.data["settings"]["group_by"] == ["corpus", "rnn_type", "init"]
    labels = [g["label"] for g in rep.data["groups"]]
    assert labels == sorted(labels) == ["toy [abababab] RNN chain", "toy [abababab] RNN plain",
                                        "zoo [cdcdcdcd] RNN chain"]
    assert [g["n"] for g in rep.data["groups"]] == [1, 3, 1]
    # without a fingerprint, the path is normalised (trailing separator)
    assert posthoc._corpus({"kind": "lm", "config.train.data": "data/toy/"}) == "data/toy"
    assert posthoc._corpus({"kind": "task", "config.task": "copy"}) is None


def test_numeric_groups_sort_by_value(tmp_path):
    for seed in (10, 2, 1):
        save_task(tmp_path / "s" / f"r{seed}" / "checkpoint.pt", layer_module("RNN", 1, 4, "chain"), seed=seed)
    rep = analyse([tmp_path / "s"], tmp_path, group_by=("seed",))
    assert [g["label"] for g in rep.data["groups"]] == ["1", "2", "10"]


def test_unreliable_henrici_is_marked_in_json_and_table(tmp_path):
    """A shuffled fbchain(0.99, 0.04) of 64 units: eigenvalues LAPACK cannot resolve. An exact
    chain in the same run stays reliable."""
    n = 64
    p = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    bad = layer_module("RNN", 1, n, "fbchain")
    with torch.no_grad():
        fbw = fbchain_(torch.empty(n, n), alpha=0.99, beta=0.04)
        bad.weight_hh_l0.copy_(fbw[p][:, p])
    save_task(tmp_path / "a" / "checkpoint.pt", bad, init="fbchain")
    save_task(tmp_path / "b" / "checkpoint.pt", layer_module("RNN", 1, n, "chain"), init="chain")
    good = layer_module("RNN", 1, n, "fbchain")
    with torch.no_grad():
        good.weight_hh_l0.copy_(fbw)
    save_task(tmp_path / "c" / "checkpoint.pt", good, init="fbchain-in-order")
    rep = analyse([tmp_path / "a", tmp_path / "b", tmp_path / "c"], tmp_path, group_by=("init",))
    data = json.loads(rep.json_path.read_text())
    fb = next(r for r in data["checkpoints"] if r["fields"]["config.init"] == "fbchain")["layers"][0]["gates"]["h"]
    ch = next(r for r in data["checkpoints"] if r["fields"]["config.init"] == "chain")["layers"][0]["gates"]["h"]
    assert fb["henrici_reliable"] is False and fb["henrici_error"] > 0.01 * fb["henrici_raw"]
    assert fb["eigenvalue_method"] == "general"
    assert ch["henrici_reliable"] is True and ch["henrici_error"] == 0.0 and ch["eigenvalue_method"] == "triangular"
    exact = next(r for r in data["checkpoints"] if r["fields"]["config.init"] == "fbchain-in-order")
    exact = exact["layers"][0]["gates"]["h"]
    lam = [2 * math.sqrt(0.99 * 0.04) * math.cos(k * math.pi / (n + 1)) for k in range(1, n + 1)]
    fro2 = float((fbw.double() ** 2).sum())   # float32 entries, as stored
    assert exact["henrici_raw"] == pytest.approx(math.sqrt(fro2 - sum(x * x for x in lam)), rel=1e-6)
    assert exact["spectral_radius"] == pytest.approx(max(lam), rel=1e-6)
    assert exact["henrici_reliable"] is True and exact["eigenvalue_method"] == "tridiagonal"
    groups = {g["label"]: g["layers"][0]["gates"]["h"] for g in data["groups"]}
    assert groups["fbchain"]["henrici_raw"]["n_unreliable"] == 1
    assert groups["chain"]["henrici_raw"]["n_unreliable"] == 0
    rows = {line.split()[0]: line for line in posthoc.format_table(data).splitlines()}
    assert " *" in rows["fbchain"] and " *" not in rows["chain"]
    assert "marked unreliable" in posthoc.format_table(data)


def test_profile_plus_one_and_its_shuffled_null(tmp_path):
    """An exact chain of 30 units with non-zero biases: p(+1) = alpha, far above the null of
    random orders, whose mean at +1 is the mean off-diagonal weight (N-1) alpha / (N (N-1))."""
    n, alpha = 30, 0.9
    m = layer_module("RNN", 1, n, f"chain:alpha={alpha}")
    with torch.no_grad():
        m.bias_hh_l0.copy_(torch.linspace(-0.3, 0.3, n))
    path = save_task(tmp_path / "c.pt", m)
    entry = gate_of(analyse([path], tmp_path, null_samples=400), "h")
    assert entry["profile_plus1"] == pytest.approx(alpha)
    assert entry["null_plus1_mean"] == pytest.approx(alpha / n, abs=0.01)
    assert entry["plus1_z"] > 10
    assert "plus1_z" not in {k for k, v in gate_of(analyse([path], tmp_path, null_samples=0), "h").items()
                             if v is not None and not (isinstance(v, float) and math.isnan(v))}


@pytest.mark.parametrize("n", [100, 1150])
def test_identity_heat_map_spans_its_largest_entry_with_readable_ticks(n):
    from awd_nonnormal import plots
    fig = plots.weight_heatmap({"trained": {"h": np.eye(n)}, "initial": {"h": 0.5 * np.eye(n)}})
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = [ax for ax in fig.axes if ax.images]
        assert [ax.images[0].get_clim() for ax in axes] == [(-1.0, 1.0), (-0.5, 0.5)]
        for ax in axes:
            for axis in (ax.xaxis, ax.yaxis):
                boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels()
                         if t.get_text() and t.get_visible()]
                assert 2 <= len(boxes) <= 6
                assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    finally:
        plots.pyplot().close(fig)
