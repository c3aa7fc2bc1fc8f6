"""The QRNN layer: outputs and gradients against a slow reference loop written here, the state
carried between calls, zoneout, the initializers it accepts and refuses, the language model with
``--model QRNN`` and a one-epoch main.py run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awd_nonnormal.init import InitOptions, InitSpecError
from awd_nonnormal.model import ModelConfig, RNNModel, check_init
from awd_nonnormal.qrnn import QRNN, fo_pool, qrnn_initializers
from awd_nonnormal.rnn import build_rnn

ROOT = Path(__file__).resolve().parents[1]
T, B, D, N = 6, 3, 4, 5


def reference(layer, x, c0, x_prev=None):
    """Bradbury et al. 2017 step by step: gates from [x_t ; x_{t-1}] (or x_t), then
    c_t = f_t c_{t-1} + (1 - f_t) z_t and h_t = o_t c_t."""
    W, b = layer.weight_ih_l0, layer.bias_ih_l0
    c, hs = c0, []
    prev = x_prev
    for t in range(x.size(0)):
        s = x[t] if layer.window == 1 else torch.cat([x[t], prev], 1)  # (B, k*d)
        prev = x[t]
        a = s @ W.t() + b  # (B, 3N)
        z, f, o = torch.tanh(a[:, :N]), torch.sigmoid(a[:, N:2 * N]), torch.sigmoid(a[:, 2 * N:])
        c = f * c + (1 - f) * z
        hs.append(o * c)
    return torch.stack(hs), c


@pytest.mark.parametrize("window", [1, 2])
def test_outputs_and_gradients_match_the_reference_loop(window):
    torch.manual_seed(0)
    layer = QRNN(D, N, window=window).double()
    x = torch.randn(T, B, D, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, B, N, dtype=torch.float64, requires_grad=True)
    xp = torch.randn(1, B, D, dtype=torch.float64)
    hidden = c0 if window == 1 else (c0, xp)
    h, new = layer(x, hidden)
    h_ref, c_ref = reference(layer, x, c0[0], xp[0])
    assert torch.allclose(h, h_ref, atol=1e-12)
    c_last = new if window == 1 else new[0]
    assert torch.allclose(c_last[0], c_ref, atol=1e-12)
    if window == 2:
        assert torch.equal(new[1], x[-1:].detach())
    w = torch.randn_like(h)
    grads = torch.autograd.grad((h * w).sum() + (c_last * 0.7).sum(), [x, c0, *layer.parameters()])
    grads_ref = torch.autograd.grad((h_ref * w).sum() + (c_ref * 0.7).sum(), [x, c0, *layer.parameters()])
    for g, r in zip(grads, grads_ref):
        assert torch.allclose(g, r, atol=1e-10)


def test_fo_pool_gradcheck():
    torch.manual_seed(1)
    f = torch.rand(5, 2, 3, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fo_pool, (f, z, c0))


def test_state_carries_across_calls():
    """Two calls on halves of a sequence equal one call on the whole (window 2 carries x_{T-1})."""
    torch.manual_seed(2)
    layer = QRNN(D, N, window=2)
    x = torch.randn(T, B, D)
    whole, _ = layer(x, layer.init_hidden(B))
    a, state = layer(x[:3], layer.init_hidden(B))
    b, _ = layer(x[3:], state)
    assert torch.allclose(torch.cat([a, b]), whole, atol=1e-6)


def test_zoneout_keeps_cells_in_training_and_scales_in_eval():
    torch.manual_seed(3)
    layer = QRNN(D, N, zoneout=0.999999)  # nearly every unit keeps its cell at every step
    x = torch.randn(T, B, D)
    c0 = torch.randn(1, B, N)
    layer.train()
    h, c = layer(x, c0)
    assert torch.equal(c, c0)
    layer.eval()
    plain = QRNN(D, N, zoneout=0.0)
    plain.load_state_dict(layer.state_dict())
    half = QRNN(D, N, zoneout=0.5).eval()
    half.load_state_dict(layer.state_dict())
    # in eval, 1 - f is halved: compare with the reference on the same weights with f' = 1 - (1-f)/2
    a = x @ half.weight_ih_l0.t() + half.bias_ih_l0
    z, f, o = torch.tanh(a[..., :N]), torch.sigmoid(a[..., N:2 * N]), torch.sigmoid(a[..., 2 * N:])
    f = 1 - 0.5 * (1 - f)
    c, hs = c0[0], []
    for t in range(T):
        c = f[t] * c + (1 - f[t]) * z[t]
        hs.append(o[t] * c)
    assert torch.allclose(half(x, c0)[0], torch.stack(hs), atol=1e-6)
    assert not torch.allclose(plain(x, c0)[0], torch.stack(hs), atol=1e-3)


def test_built_through_the_layer_factory():
    layer = build_rnn("QRNN", D, N, window=2)
    assert isinstance(layer, QRNN) and layer.window == 2
    with pytest.raises(ValueError, match="num_layers=1"):
        build_rnn("QRNN", D, N, 2)


def qrnn_config(**kw):
    c = dict(rnn_type="QRNN", ntoken=30, emsize=6, nhid=10, nlayers=3, wdrop=0.3)
    c.update(kw)
    return ModelConfig(**c)


def test_language_model_layers_windows_and_dropconnect():
    m = RNNModel(qrnn_config())
    windows = [r.module.window for r in m.rnns]
    assert windows == [2, 1, 1]
    keys = set(m.state_dict())
    assert "rnns.0.weight_ih_l0_raw" in keys and "rnns.0.module.bias_ih_l0" in keys
    hidden = m.init_hidden(2)
    assert isinstance(hidden[0], tuple) and hidden[0][1].shape == (1, 2, 6)
    x = torch.randint(0, 30, (7, 2))
    m.train()
    logits, new = m(x, hidden)
    assert logits.shape == (7, 2, 30)
    logits.sum().backward()
    assert m.rnns[0].weight_ih_l0_raw.grad is not None


@pytest.mark.parametrize("spec", ["chain", "mixed", "orthogonal", "f=ramp", "identity,input=normal"])
def test_recurrent_initializers_are_refused_with_the_working_list(spec):
    with pytest.raises(InitSpecError) as info:
        check_init(qrnn_config(init=spec))
    message = str(info.value)
    assert "QRNN" in message and "hidden-to-hidden" in message
    for name in qrnn_initializers():
        assert name in message


def test_input_initializers_apply_to_every_gate_block():
    m = RNNModel(qrnn_config(init=InitOptions("source", {"scale": 0.5}, zero_bias=True), wdrop=0.0))
    w = m.rnns[1].weight_ih_l0  # (3N, d)
    for block in w.chunk(3, 0):
        assert torch.equal(block, 0.5 * torch.eye(*block.shape))
    assert not m.rnns[1].bias_ih_l0.any()
    m = RNNModel(qrnn_config(init="input=normal", wdrop=0.0))
    assert m.rnns[0].weight_ih_l0.std() > 0
    torch.manual_seed(5)
    a = RNNModel(qrnn_config(init="plain"))
    torch.manual_seed(5)
    b = RNNModel(qrnn_config(init="plain"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(6)
    layer = QRNN(D, N, window=2)
    x = torch.randn(T, B, D)
    cpu, _ = layer(x)
    gpu, _ = layer.cuda()(x.cuda())
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-5)


def test_one_epoch_main_smoke_run(tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    for split, n in (("train", 60), ("valid", 15), ("test", 15)):
        (data / f"{split}.txt").write_text("".join(f"a b c d e f {i % 3}\n" for i in range(n)))
    save = tmp_path / "run" / "model.pt"
    cmd = [sys.executable, "main.py", "--data", str(data), "--model", "QRNN", "--emsize", "8",
           "--nhid", "12", "--nlayers", "2", "--epochs", "1", "--batch_size", "4", "--bptt", "10",
           "--lr", "1", "--save", str(save), "--no-progress", "--device", "cpu", "--seed", "3"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert save.exists() and save.with_name("model.latest.pt").exists()
    assert "test" in out.stdout and "valid" in out.stdout
    bad_cmd = [a if a != str(save) else str(tmp_path / "x.pt") for a in cmd] + ["--init", "chain"]
    bad = subprocess.run(bad_cmd, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "hidden-to-hidden" in bad.stderr
