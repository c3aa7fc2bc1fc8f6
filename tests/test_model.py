"""The language model: structure, initialisation, forward contract, rebuilding from a checkpoint."""

import dataclasses

import pytest
import torch
from torch import nn

from awd_nonnormal.checkpoint import load_checkpoint, save_checkpoint
from awd_nonnormal.init import GATES, InitOptions, InitSpecError, recurrent_layers
from awd_nonnormal.model import ModelConfig, RNNModel, check_init, repackage_hidden
from awd_nonnormal.regularize import WeightDrop

V, E, H = 30, 8, 16
T, B = 7, 3


def cfg(**kw):
    """A small config; ``init``, ``init_params`` and ``init_zero_bias`` make its InitOptions."""
    init = InitOptions(kw.pop("init", "plain"), kw.pop("init_params", {}), kw.pop("init_zero_bias", False))
    base = dict(rnn_type="LSTM", ntoken=V, emsize=E, nhid=H, nlayers=3, init=init)
    base.update(kw)
    return ModelConfig(**base)


def words(seed=0):
    return torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(seed))


def hh_weights(model):
    """Each layer's raw (undropped) recurrent weight, in layer order."""
    return [layer.weight_hh for layer in recurrent_layers(model)]


# ---------------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw, match", [
    (dict(rnn_type="SRU"), "rnn_type"),
    (dict(zoneout=1.0), "zoneout"),
    (dict(ntoken=10, cutoffs=(5, 3)), "increasing"),
    (dict(ntoken=10, cutoffs=(5, 10)), "below the vocabulary size"),
    (dict(nonlinearity="sigmoid"), "nonlinearity"),
    (dict(dropout=1.0), "dropout"),
    (dict(wdrop=-0.1), "wdrop"),
    (dict(nhid=0), "nhid"),
    (dict(init_params={"gamma": 1.0}), "gamma"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw)


def test_config_round_trip_and_unknown_keys():
    c = cfg(init="chain", init_params={"alpha": 1.02}, init_zero_bias=True)
    d = c.to_dict()
    assert ModelConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig.from_dict({**d, "qrnn": True})


def test_ntoken_must_be_set_before_building():
    with pytest.raises(ValueError, match="ntoken"):
        RNNModel(cfg(ntoken=None))


@pytest.mark.parametrize("rnn_type, spec", [
    ("RNN", "g=chain"),          # an LSTM gate on a vanilla RNN
    ("LSTM", "nosuchinit"),
    ("LSTM", "chain:alpha=x"),
])
def test_check_init_rejects_bad_specs(rnn_type, spec):
    with pytest.raises(InitSpecError):
        check_init(cfg(rnn_type=rnn_type, init=spec))


def test_check_init_rejects_parameters_that_no_gate_takes():
    with pytest.raises(InitSpecError, match="beta"):
        check_init(cfg(init="chain", init_params={"beta": 0.1}))


# ---------------------------------------------------------------------------------- structure

@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("rnn_type", ["LSTM", "GRU", "RNN"])
def test_layer_sizes_and_tying(rnn_type, tied):
    m = RNNModel(cfg(rnn_type=rnn_type, tied=tied))
    expected_hidden = [H, H, E if tied else H]
    assert m.config.hidden_sizes == expected_hidden
    assert m.config.input_sizes == [E, H, H]
    for layer, n_in, n_hid in zip(recurrent_layers(m), [E, H, H], expected_hidden):
        assert layer.cell == rnn_type
        assert layer.weight_ih.shape == (len(GATES[rnn_type]) * n_hid, n_in)
    assert (m.decoder.weight is m.encoder.weight) == tied
    assert m.arch() == {"rnn_type": rnn_type, "nonlinearity": "tanh" if rnn_type == "RNN" else None,
                        "nlayers": 3, "input_size": E, "hidden_sizes": expected_hidden}


@pytest.mark.parametrize("wdrop", [0.0, 0.5])
def test_weight_drop_wraps_each_layer(wdrop):
    m = RNNModel(cfg(wdrop=wdrop))
    assert all(isinstance(r, WeightDrop) == (wdrop > 0) for r in m.rnns)
    keys = set(m.state_dict())
    raw = "rnns.0.weight_hh_l0_raw" if wdrop else "rnns.0.weight_hh_l0"
    assert raw in keys and len(list(recurrent_layers(m))) == 3


@pytest.mark.parametrize("rnn_type", ["LSTM", "GRU", "RNN"])
def test_forward_contract(rnn_type):
    m = RNNModel(cfg(rnn_type=rnn_type, nonlinearity="elu"))
    hidden = m.init_hidden(B)
    assert len(hidden) == 3
    if rnn_type == "LSTM":
        assert all(isinstance(h, tuple) and h[0].shape == h[1].shape for h in hidden)
    logits, new_hidden, raw_outputs, outputs = m(words(), hidden, return_h=True)
    assert logits.shape == (T, B, V)
    assert [r.shape for r in raw_outputs] == [(T, B, H), (T, B, H), (T, B, E)]
    assert [o.shape for o in outputs] == [(T, B, H), (T, B, H), (T, B, E)]
    first = lambda h: h[0] if isinstance(h, tuple) else h  # noqa: E731
    assert [first(h).shape for h in new_hidden] == [(1, B, H), (1, B, H), (1, B, E)]
    out, _ = m(words(), hidden, decode=False)
    assert out.shape == (T, B, E)
    # the hidden state is an input: a state carried over changes the output
    m.eval()
    a, h1 = m(words(1), m.init_hidden(B))
    b, _ = m(words(1), h1)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="layer states"):
        m(words(), hidden[:2])


def test_dropout_only_in_training_and_gradients_reach_raw_weights():
    m = RNNModel(cfg(dropout=0.5, dropouth=0.5, dropouti=0.5, dropoute=0.5, wdrop=0.5))
    x = words()
    m.eval()
    a, _ = m(x, m.init_hidden(B))
    b, _ = m(x, m.init_hidden(B))
    assert torch.equal(a, b)
    m.train()
    c, _ = m(x, m.init_hidden(B))
    assert not torch.allclose(a, c)
    c.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert m.rnns[0].weight_hh_l0_raw.grad.abs().sum() > 0


def test_repackage_hidden_detaches_nested_states():
    m = RNNModel(cfg())
    _, hidden = m(words(), m.init_hidden(B))
    assert hidden[0][0].requires_grad
    detached = repackage_hidden(hidden)
    assert isinstance(detached, list) and isinstance(detached[0], tuple)
    assert not any(t.requires_grad for h in detached for t in h)


# ---------------------------------------------------------------------------------- initialisation

@pytest.mark.parametrize("wdrop", [0.0, 0.5])
def test_plain_is_pytorch_default_bit_for_bit(wdrop):
    """`plain` leaves what PyTorch draws: the same seed gives AWD-LSTM's nn.LSTM weights."""
    torch.manual_seed(123)
    m = RNNModel(cfg(init="plain", wdrop=wdrop))
    torch.manual_seed(123)
    nn.Embedding(V, E)  # AWD-LSTM builds the embedding first
    reference = [nn.LSTM(E, H), nn.LSTM(H, H), nn.LSTM(H, E)]
    for layer, ref in zip(recurrent_layers(m), reference):
        assert torch.equal(layer.weight_hh, ref.weight_hh_l0)
        assert torch.equal(layer.weight_ih, ref.weight_ih_l0)
        assert torch.equal(layer.bias_hh, ref.bias_hh_l0)


def test_plain_with_zero_bias_keeps_weights_and_zeroes_biases():
    torch.manual_seed(5)
    a = RNNModel(cfg(init="plain"))
    torch.manual_seed(5)
    b = RNNModel(cfg(init="plain", init_zero_bias=True))
    for la, lb in zip(recurrent_layers(a), recurrent_layers(b)):
        assert torch.equal(la.weight_hh, lb.weight_hh)
        assert la.bias_ih.abs().sum() > 0
        assert lb.bias_ih.abs().sum() == 0 and lb.bias_hh.abs().sum() == 0


@pytest.mark.parametrize("wdrop", [0.0, 0.5])
def test_chain_lands_in_every_layer_of_a_vanilla_rnn(wdrop):
    m = RNNModel(cfg(rnn_type="RNN", nonlinearity="elu", init="chain", init_params={"alpha": 0.97}, wdrop=wdrop))
    for w, n in zip(hh_weights(m), [H, H, E]):
        expected = torch.diag(torch.full((n - 1,), 0.97), diagonal=-1)  # W[i, i-1] = alpha
        assert torch.allclose(w, expected)
    for layer, n_in, n in zip(recurrent_layers(m), [E, H, H], [H, H, E]):
        assert torch.allclose(layer.weight_ih, 0.9 * torch.eye(n, n_in))  # source input
        assert layer.bias_ih.abs().sum() > 0  # LM default: biases stay


def test_mixed_lstm_per_gate():
    m = RNNModel(cfg(init="mixed"))
    for w in hh_weights(m):
        n = w.shape[1]
        i, f, g, o = w.chunk(4, 0)
        assert torch.allclose(g, torch.diag(torch.full((n - 1,), 1.02), diagonal=-1))
        idx = torch.arange(n, dtype=w.dtype)
        ramp = 0.01 * (idx[:, None] - idx[None, :]) / (n - 1)
        for block in (i, f, o):
            assert torch.allclose(block, ramp)


@pytest.mark.parametrize("spec, params", [("identity", {"scale": 0.5}), ("orthogonal", {"scale": 1.01})])
def test_scaled_normal_inits(spec, params):
    m = RNNModel(cfg(rnn_type="RNN", init=spec, init_params=params))
    for w in hh_weights(m):
        n = w.shape[0]
        assert torch.allclose(w @ w.t(), params["scale"] ** 2 * torch.eye(n), atol=1e-5)


def test_init_zero_bias():
    m = RNNModel(cfg(rnn_type="GRU", init="orthogonal", init_zero_bias=True))
    for layer in recurrent_layers(m):
        assert layer.bias_ih.abs().sum() == 0 and layer.bias_hh.abs().sum() == 0


def test_embedding_and_decoder_follow_awd_lstm():
    m = RNNModel(cfg(tied=False))
    assert m.encoder.weight.abs().max() <= 0.1 and m.decoder.weight.abs().max() <= 0.1
    assert m.decoder.bias.abs().sum() == 0


# ---------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("rnn_type", ["LSTM", "RNN"])
def test_rebuild_from_checkpoint(tmp_path, rnn_type):
    m = RNNModel(cfg(rnn_type=rnn_type, init="chain", nonlinearity="relu"))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained"
    path = save_checkpoint(tmp_path / "m.pt", kind="lm", arch=m.arch(),
                           config={"model": m.config.to_dict(), "train": {}}, model=m.state_dict(),
                           initial_rnn=m.recurrent_state())
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw["initial_rnn"]) == {k for k in raw["model"] if k.startswith("rnns.")}
    rebuilt = RNNModel.from_checkpoint(load_checkpoint(path, kind="lm"))
    assert rebuilt.config == m.config
    m.eval(), rebuilt.eval()
    x = words(3)
    assert torch.equal(m(x, m.init_hidden(B))[0], rebuilt(x, rebuilt.init_hidden(B))[0])


def test_rebuild_needs_no_initializer(tmp_path):
    """A checkpoint trained with a plug-in initializer rebuilds without that plug-in."""
    m = RNNModel(cfg())
    d = dataclasses.replace(m.config, init="some_plugin_init").to_dict()
    rebuilt = RNNModel.from_checkpoint({"config": {"model": d}, "model": m.state_dict()})
    assert torch.equal(rebuilt.encoder.weight, m.encoder.weight)
