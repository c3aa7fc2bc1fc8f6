"""AWD-LSTM's regularisers: WeightDrop, LockedDropout and embedded_dropout."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from awd_nonnormal.regularize import LockedDropout, WeightDrop, embedded_dropout
from awd_nonnormal.rnn import RNN

T, B, D, N = 6, 4, 3, 8

LAYERS = {
    "RNN": lambda L, n=N: RNN(D, n, L, nonlinearity="elu"),
    "LSTM": lambda L, n=N: nn.LSTM(D, n, L),
    "GRU": lambda L, n=N: nn.GRU(D, n, L),
}
KINDS = [(kind, L) for kind in LAYERS for L in (1, 2)]


def _wrapped(kind, num_layers, p=0.5, seed=0, hidden=N):
    torch.manual_seed(seed)
    return WeightDrop(LAYERS[kind](num_layers, hidden), p)


def _capture_weights(wd):
    """Record the hidden-to-hidden weights the wrapped module sees during each call."""
    seen = []
    wd.module.register_forward_pre_hook(
        lambda mod, args: seen.append({n: getattr(mod, n).detach().clone() for n in wd.weights})
    )
    return seen


@pytest.mark.parametrize("kind,num_layers", KINDS)
def test_weight_drop_train_eval_and_gradients(kind, num_layers):
    wd = _wrapped(kind, num_layers)
    names = [f"weight_hh_l{k}" for k in range(num_layers)]
    assert wd.weights == tuple(names)
    x = torch.randn(T, B, D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of any kind
        out1, _ = wd(x)
        out2, _ = wd(x)
        # Fresh masks per call; with h0 = 0 the recurrent weights do not act at step 0.
        assert not torch.allclose(out1, out2)
        torch.testing.assert_close(out1[0], out2[0])

        out1.pow(2).sum().backward()
        for name in names:
            assert getattr(wd, f"{name}_raw").grad.abs().sum() > 0
        assert wd.module.weight_ih_l0.grad.abs().sum() > 0

        wd.eval()
        ev1, _ = wd(x)
        ev2, _ = wd(x)
        torch.testing.assert_close(ev1, ev2, rtol=0, atol=0)
        # eval equals the undropped module with the raw weights
        plain = LAYERS[kind](num_layers)
        plain.load_state_dict(
            {k.removeprefix("module.").removesuffix("_raw"): v for k, v in wd.state_dict().items()}
        )
        torch.testing.assert_close(ev1, plain(x)[0])


@pytest.mark.parametrize("kind,num_layers", KINDS)
def test_weight_drop_mask_fraction_and_gradient_mask(kind, num_layers):
    p = 0.3
    wd = _wrapped(kind, num_layers, p=p, hidden=32)
    seen = _capture_weights(wd)
    out, _ = wd(torch.randn(T, B, D))
    out.sum().backward()
    for name, w in seen[0].items():
        raw = getattr(wd, f"{name}_raw")
        dropped = w == 0
        frac = dropped.double().mean().item()
        assert abs(frac - p) < 0.06, frac  # >= 1024 entries: s.d. of the fraction <= 0.015
        torch.testing.assert_close(w[~dropped], raw.detach()[~dropped] / (1 - p))
        assert (raw.grad[dropped] == 0).all()  # a dropped entry gets no gradient
    assert all(getattr(wd.module, n) is None for n in wd.weights)  # nothing kept between calls


def test_weight_drop_fraction_large_matrix():
    p = 0.25
    wd = WeightDrop(RNN(D, 200), p)
    seen = _capture_weights(wd)
    wd(torch.randn(2, 1, D))
    frac = (seen[0]["weight_hh_l0"] == 0).double().mean().item()
    assert abs(frac - p) < 0.01  # 40,000 entries: s.d. of the fraction 0.002


@pytest.mark.parametrize("kind,num_layers", KINDS)
def test_weight_drop_state_dict_deepcopy_and_to(kind, num_layers):
    wd = _wrapped(kind, num_layers)
    keys = list(wd.state_dict())
    assert "weight_hh_l0_raw" in keys and "module.weight_ih_l0" in keys
    assert "module.weight_hh_l0" not in keys
    container = nn.Sequential(wd)
    assert "0.weight_hh_l0_raw" in container.state_dict()

    buf = io.BytesIO()
    torch.save(wd.state_dict(), buf)
    buf.seek(0)
    other = _wrapped(kind, num_layers, seed=1)
    other.load_state_dict(torch.load(buf, weights_only=True))
    wd.eval()
    other.eval()
    x = torch.randn(T, B, D)
    torch.testing.assert_close(other(x)[0], wd(x)[0], rtol=0, atol=0)

    wd.train()
    wd(x)[0].sum().backward()  # after a training call the module can still be copied and moved
    clone = copy.deepcopy(wd).eval()
    torch.testing.assert_close(clone(x)[0], wd.eval()(x)[0], rtol=0, atol=0)
    clone.to(torch.float64)
    assert clone.weight_hh_l0_raw.dtype == torch.float64
    out, _ = clone.train()(x.double())
    assert out.dtype == torch.float64
    out.sum().backward()
    assert clone.weight_hh_l0_raw.grad.dtype == torch.float64


def test_weight_drop_p_zero_and_hidden_state_passthrough():
    wd = WeightDrop(nn.LSTM(D, N, 2), 0.0)
    plain = nn.LSTM(D, N, 2)
    plain.load_state_dict(
        {k.removeprefix("module.").removesuffix("_raw"): v for k, v in wd.state_dict().items()}
    )
    x = torch.randn(T, B, D)
    hidden = (torch.randn(2, B, N), torch.randn(2, B, N))
    out, (h, c) = wd(x, hidden)
    ref, (h_ref, c_ref) = plain(x, hidden)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(c, c_ref)


def test_weight_drop_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        WeightDrop(RNN(D, N), 1.0)
    with pytest.raises(ValueError, match="weight_ih_l0"):
        WeightDrop(RNN(D, N), 0.5, weights=["weight_hh_l3"])
    with pytest.raises(ValueError, match="no weight_hh_l"):
        WeightDrop(nn.Linear(3, 3), 0.5)
    wd = WeightDrop(RNN(D, N), 0.5, weights="weight_ih_l0")  # any named weight can be dropped
    assert "weight_ih_l0_raw" in wd.state_dict()


def test_locked_dropout_mask_shared_over_time():
    p = 0.4
    drop = LockedDropout(p)
    x = torch.ones(50, 16, 32)
    y = drop(x)
    assert torch.equal(y, y[:1].expand_as(y))  # the same mask at every step
    values = y.unique()
    assert len(values) == 2
    torch.testing.assert_close(values, torch.tensor([0.0, 1 / (1 - p)]))
    assert abs((y[0] == 0).double().mean().item() - p) < 0.06
    assert not torch.equal(drop(x), y)  # redrawn per call
    x = torch.randn(5, 3, 4, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y.detach() / x.detach()))


def test_locked_dropout_identity():
    x = torch.randn(5, 3, 4)
    assert LockedDropout(0.5).eval()(x) is x
    assert LockedDropout(0.0)(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LockedDropout(1.0)


def test_embedded_dropout_whole_rows():
    torch.manual_seed(0)
    V, E, p = 400, 6, 0.3
    embed = nn.Embedding(V, E)
    words = torch.arange(V).repeat(3, 1).t()  # (V, 3): every word type appears in 3 sequences
    out = embedded_dropout(embed, words, p)
    assert out.shape == (V, 3, E)
    row_dropped = (out == 0).all(-1)  # (V, 3)
    assert torch.equal(row_dropped, row_dropped[:, :1].expand_as(row_dropped))  # word-level
    assert abs(row_dropped[:, 0].double().mean().item() - p) < 0.07
    kept = ~row_dropped[:, 0]
    torch.testing.assert_close(out[kept, 0], embed.weight[kept].detach() / (1 - p))
    # no partly zeroed vectors
    assert ((out == 0).any(-1) == row_dropped).all()


def test_embedded_dropout_identity_and_scale():
    embed = nn.Embedding(20, 5)
    words = torch.randint(0, 20, (7, 2))
    torch.testing.assert_close(embedded_dropout(embed, words, 0.0), embed(words))
    embed.eval()
    torch.testing.assert_close(embedded_dropout(embed, words, 0.5), embed(words))
    torch.testing.assert_close(embedded_dropout(embed, words, 0.5, scale=2.0), 2 * embed(words))
    embed.train()
    out = embedded_dropout(embed, words, 0.5)
    out.sum().backward()
    assert embed.weight.grad is not None


def test_weight_drop_module_called_directly_is_an_error():
    wd = WeightDrop(RNN(D, N), 0.5)
    with pytest.raises(RuntimeError, match="call the wrapper"):
        wd.module(torch.randn(T, B, D))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,num_layers", KINDS)
def test_weight_drop_cuda_quiet_and_exact(kind, num_layers):
    wd = _wrapped(kind, num_layers).to("cuda")
    x = torch.randn(T, B, D, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cuDNN's weight-compaction warning included
        out, _ = wd(x)
        out.sum().backward()
        assert wd.weight_hh_l0_raw.grad.abs().sum() > 0
        wd.eval()
        cpu = copy.deepcopy(wd).cpu()
        torch.testing.assert_close(wd(x)[0].cpu(), cpu(x.cpu())[0], rtol=1e-4, atol=1e-5)
