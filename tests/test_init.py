"""The initializer registry: block values, presets per cell type, spec parsing, plug-ins."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from awd_nonnormal import init as I

N, D = 6, 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blocks(w, k):
    return w.detach().chunk(k, dim=0)


def expected_chain(n, alpha=1.0):
    w = torch.zeros(n, n)
    for i in range(1, n):
        w[i, i - 1] = alpha
    return w


def expected_ramp(n, eps=0.01):
    return torch.tensor([[eps * (i - j) / (n - 1) for j in range(n)] for i in range(n)])


# ---------------------------------------------------------------- block initializers

def test_chain_runs_from_unit_0_pulse():
    """The chain of the paper's section 3.1.1 (W_ij = alpha delta_{j,i-1}, V = 0.9 I) runs from
    unit 0: linear activation, chain(alpha), source input, zero biases; a unit pulse on
    input channel 0 at t = 0: at step k exactly unit k is non-zero and equals 0.9 * alpha**k."""
    n, d, alpha = 8, 3, 1.1
    w = I.chain_(torch.empty(n, n, dtype=torch.float64), alpha=alpha)
    v = I.source_(torch.empty(n, d, dtype=torch.float64))
    h = torch.zeros(n, dtype=torch.float64)
    for k in range(n):
        x = torch.zeros(d, dtype=torch.float64)
        if k == 0:
            x[0] = 1.0
        h = w @ h + v @ x  # h_t = W_hh h_{t-1} + W_ih x_t
        nonzero = torch.nonzero(h).flatten().tolist()
        assert nonzero == [k]
        assert h[k].item() == pytest.approx(0.9 * alpha ** k, rel=1e-12)


def test_chain_pulse_through_torch_rnn():
    """The same direction through nn.RNN's own kernel (relu keeps the positive pulse linear)."""
    rnn = nn.RNN(2, 5, nonlinearity="relu")
    I.apply_init(rnn, "chain", zero_bias=True)
    x = torch.zeros(5, 1, 2)
    x[0, 0, 0] = 1.0
    out, _ = rnn(x)
    for k in range(5):
        assert torch.nonzero(out[k, 0]).flatten().tolist() == [k]
        assert out[k, 0, k].item() == pytest.approx(0.9)


def test_chain_pulse_pins_forward_as_the_default_direction():
    """The default is the paper's direction, however the chain is named: explicitly forward, or
    nothing said, both run 0 -> 1 -> ...; reverse (the port) sends unit 0's pulse nowhere."""
    for spec in ("chain", "chain:direction=forward"):
        rnn = nn.RNN(2, 5, nonlinearity="relu")
        I.apply_init(rnn, spec, zero_bias=True)
        x = torch.zeros(5, 1, 2)
        x[0, 0, 0] = 1.0
        out, _ = rnn(x)
        assert [torch.nonzero(out[k, 0]).flatten().tolist() for k in range(5)] == [[k] for k in range(5)]
    rnn = nn.RNN(2, 5, nonlinearity="relu")
    I.apply_init(rnn, "chain:direction=reverse", zero_bias=True)
    x = torch.zeros(5, 1, 2)
    x[0, 0, 0] = 1.0
    out, _ = rnn(x)
    assert torch.nonzero(out[0, 0]).flatten().tolist() == [0]
    assert out[1:].abs().sum() == 0  # unit 0 is the sink of the reversed chain


@pytest.mark.parametrize("cell,module", [
    ("RNN", lambda: nn.RNN(D, N)), ("LSTM", lambda: nn.LSTM(D, N)), ("GRU", lambda: nn.GRU(D, N)),
])
@pytest.mark.parametrize("spec", ["chain:alpha=1.03", "fbchain:alpha=0.9:beta=0.05", "ramp:eps=0.3",
                                  "mixed"])
def test_reverse_is_the_exact_transpose_of_forward(cell, module, spec):
    fwd, rev, kw = module(), module(), module()
    I.apply_init(fwd, spec)
    I.apply_init(rev, spec + ":direction=reverse")
    I.apply_init(kw, spec, direction="reverse")
    k = len(I.GATES[cell])
    for f, r, w in zip(blocks(fwd.weight_hh_l0, k), blocks(rev.weight_hh_l0, k), blocks(kw.weight_hh_l0, k)):
        assert not torch.equal(f, f.T)  # none of these blocks is symmetric: the test can fail
        assert torch.equal(r, f.T) and torch.equal(w, f.T)
    assert torch.equal(rev.weight_ih_l0, fwd.weight_ih_l0)  # the input blocks stay


def test_direction_in_per_gate_specs():
    fwd, rev = nn.LSTM(D, N), nn.LSTM(D, N)
    I.apply_init(fwd, "i=ramp,f=ramp,g=chain:alpha=1.02,o=ramp")
    I.apply_init(rev, "i=ramp,f=ramp,g=chain:alpha=1.02:direction=reverse,o=ramp:direction=reverse")
    for gate, f, r in zip("ifgo", blocks(fwd.weight_hh_l0, 4), blocks(rev.weight_hh_l0, 4)):
        assert torch.equal(r, f.T if gate in "go" else f)
    with pytest.raises(I.InitSpecError, match="chain: direction 'up' is not valid; valid: forward, reverse"):
        I.apply_init(nn.RNN(D, N), "chain", direction="up")
    with pytest.raises(I.InitSpecError, match="alpha 'big' is not a number"):
        I.apply_init(nn.RNN(D, N), "chain", alpha="big")


def test_block_values():
    assert torch.equal(I.chain_(torch.empty(N, N), alpha=1.02), expected_chain(N, 1.02))
    fb = I.fbchain_(torch.empty(N, N), alpha=0.99, beta=0.04)
    for i in range(N):
        for j in range(N):
            want = 0.99 if i - j == 1 else 0.04 if j - i == 1 else 0.0
            assert fb[i, j].item() == pytest.approx(want)
    assert torch.equal(I.identity_(torch.empty(N, N), scale=0.5), 0.5 * torch.eye(N))
    q = I.orthogonal_(torch.empty(N, N, dtype=torch.float64), scale=1.5)
    assert torch.allclose(q @ q.T, 2.25 * torch.eye(N, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(I.ramp_(torch.empty(N, N), eps=0.02), expected_ramp(N, 0.02))
    p = I.plain_(torch.empty(N, N))
    assert p.abs().max() <= 1 / math.sqrt(N)
    # non-square input blocks: eye(N, d) for any N, d
    assert torch.equal(I.source_(torch.empty(4, 7)), 0.9 * torch.eye(4, 7))
    assert torch.equal(I.source_(torch.empty(7, 4), scale=2.0), 2.0 * torch.eye(7, 4))


def test_normal_default_std_and_generator():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = I.normal_(torch.empty(400, 300), generator=g1)
    b = I.normal_(torch.empty(400, 300), generator=g2)
    assert torch.equal(a, b)
    assert a.std().item() == pytest.approx(0.9 / math.sqrt(400), rel=0.02)
    assert I.normal_(torch.empty(100, 100), std=0.5).std().item() == pytest.approx(0.5, rel=0.03)


def test_initializers_work_in_place_and_return_tensor():
    w = torch.empty(N, N, requires_grad=True)
    out = I.chain_(w)
    assert out is w and w.requires_grad


def test_recurrent_initializers_need_square_blocks():
    with pytest.raises(ValueError, match="square"):
        I.chain_(torch.empty(3, 4))


# ---------------------------------------------------------------- presets per cell type

@pytest.mark.parametrize("cell,module", [
    ("RNN", lambda L: nn.RNN(D, N, L)),
    ("LSTM", lambda L: nn.LSTM(D, N, L)),
    ("GRU", lambda L: nn.GRU(D, N, L)),
])
@pytest.mark.parametrize("layers", [1, 2])
def test_presets_give_documented_blocks(cell, module, layers):
    k = len(I.GATES[cell])
    for preset in ["chain", "fbchain", "identity", "orthogonal", "plain", "mixed"]:
        torch.manual_seed(0)
        m = module(layers)
        I.apply_init(m, preset)
        for layer in range(layers):
            hh = blocks(getattr(m, f"weight_hh_l{layer}"), k)
            ih = blocks(getattr(m, f"weight_ih_l{layer}"), k)
            d = D if layer == 0 else N  # layer > 0 reads the N-dim output: a square input block
            for gate, w, v in zip(I.GATES[cell], hh, ih):
                assert v.shape == (N, d)
                if preset == "chain":  # the LSTM preset follows the port's default alpha
                    assert torch.allclose(w, expected_chain(N, 1.02 if cell == "LSTM" else 1.0))
                    assert torch.equal(v, 0.9 * torch.eye(N, d))
                elif preset == "fbchain":
                    assert torch.allclose(w, I.fbchain_(torch.empty(N, N)))
                    assert torch.equal(v, 0.9 * torch.eye(N, d))
                elif preset == "identity":
                    assert torch.equal(w, torch.eye(N))
                    assert abs(v.std().item() - 0.9 / math.sqrt(N)) < 0.2
                elif preset == "orthogonal":
                    assert torch.allclose(w @ w.T, torch.eye(N), atol=1e-5)
                    assert not torch.allclose(w, torch.eye(N))
                elif preset == "plain":
                    assert w.abs().max() <= 1 / math.sqrt(N) and w.abs().max() > 0
                    assert v.abs().max() <= 1 / math.sqrt(N)
                elif preset == "mixed":
                    if gate == I.TANH_GATE[cell]:
                        assert torch.allclose(w, expected_chain(N, 1.02))
                    else:
                        assert torch.allclose(w, expected_ramp(N))
                    assert torch.equal(v, 0.9 * torch.eye(N, d))


def test_mixed_puts_chain_in_rows_2N_3N_of_lstm():
    m = nn.LSTM(D, N)
    I.apply_init(m, "mixed")
    w = m.weight_hh_l0.detach()
    assert torch.allclose(w[2 * N:3 * N], expected_chain(N, 1.02))
    for rows in (slice(0, N), slice(N, 2 * N), slice(3 * N, 4 * N)):
        assert torch.allclose(w[rows], expected_ramp(N))


def test_per_gate_spec_equals_mixed():
    a, b = nn.LSTM(D, N), nn.LSTM(D, N)
    I.apply_init(a, "mixed")
    I.apply_init(b, "i=ramp,f=ramp,g=chain:alpha=1.02,o=ramp")
    assert torch.equal(a.weight_hh_l0, b.weight_hh_l0)
    assert torch.equal(a.weight_ih_l0, b.weight_ih_l0)


def test_base_with_gate_override_and_input_override():
    m = nn.GRU(D, N)
    I.apply_init(m, "identity:scale=0.5,n=chain,input=zeros")
    r, z, n = blocks(m.weight_hh_l0, 3)
    assert torch.equal(r, 0.5 * torch.eye(N)) and torch.equal(z, 0.5 * torch.eye(N))
    assert torch.equal(n, expected_chain(N))
    assert torch.equal(m.weight_ih_l0, torch.zeros(3 * N, D))


def test_params_and_generic_scale():
    m = nn.RNN(D, N)
    I.apply_init(m, "chain", alpha=1.05)
    assert torch.allclose(m.weight_hh_l0, expected_chain(N, 1.05))
    I.apply_init(m, "chain", scale=1.03)  # --init-scale sets the chain's alpha
    assert torch.allclose(m.weight_hh_l0, expected_chain(N, 1.03))
    I.apply_init(m, "identity", scale=0.96)
    assert torch.allclose(m.weight_hh_l0, 0.96 * torch.eye(N))
    I.apply_init(m, "fbchain", beta=0.07)
    assert m.weight_hh_l0[0, 1].item() == pytest.approx(0.07)
    assert m.weight_hh_l0[1, 0].item() == pytest.approx(0.99)
    # params reach every gate that takes them: mixed with alpha and eps
    lstm = nn.LSTM(D, N)
    I.apply_init(lstm, "mixed", alpha=1.1, eps=0.5)
    i, f, g, o = blocks(lstm.weight_hh_l0, 4)
    assert torch.allclose(g, expected_chain(N, 1.1)) and torch.allclose(i, expected_ramp(N, 0.5))
    # a spec parameter and a call parameter must agree (test_a_parameter_the_spec_also_writes_...)
    I.apply_init(m, "chain:alpha=1.01", alpha=1.01)
    assert torch.allclose(m.weight_hh_l0, expected_chain(N, 1.01))


def test_zero_bias_and_biases_kept_otherwise():
    m = nn.LSTM(D, N)
    before = m.bias_hh_l0.detach().clone()
    I.apply_init(m, "chain")
    assert torch.equal(m.bias_hh_l0, before)
    I.apply_init(m, "chain", zero_bias=True)
    assert m.bias_hh_l0.abs().sum() == 0 and m.bias_ih_l0.abs().sum() == 0


def test_generator_makes_random_inits_reproducible():
    a, b = nn.RNN(D, N), nn.RNN(D, N)
    I.apply_init(a, "orthogonal", generator=torch.Generator().manual_seed(3))
    I.apply_init(b, "orthogonal", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.weight_hh_l0, b.weight_hh_l0) and torch.equal(a.weight_ih_l0, b.weight_ih_l0)


def test_nested_module_and_state_dict_discovery():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnns = nn.ModuleList([nn.LSTM(D, N), nn.LSTM(N, 4)])

    net = Net()
    I.apply_init(net, "chain")
    assert torch.allclose(blocks(net.rnns[1].weight_hh_l0, 4)[2], expected_chain(4, 1.02))  # LSTM preset
    layers = list(I.recurrent_layers(net.state_dict()))
    assert [(l.name, l.cell) for l in layers] == [("rnns.0.weight_hh_l0", "LSTM"), ("rnns.1.weight_hh_l0", "LSTM")]
    assert layers[1].weight_ih.shape == (16, N)
    # a weight-drop wrapper's layout: raw weight outside, the rest inside `module.`
    sd = {"rnns.0.weight_hh_l0_raw": torch.zeros(3 * N, N), "rnns.0.module.weight_ih_l0": torch.ones(3 * N, D),
          "rnns.0.module.bias_ih_l0": torch.ones(3 * N), "rnns.0.module.bias_hh_l0": torch.ones(3 * N)}
    (layer,) = I.recurrent_layers(sd)
    assert layer.cell == "GRU" and layer.weight_ih is sd["rnns.0.module.weight_ih_l0"]
    assert layer.bias_hh is sd["rnns.0.module.bias_hh_l0"]


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("spec,message", [
    ("nosuch", "unknown initializer 'nosuch'; known: chain, fbchain, identity, mixed"),
    ("i=nosuch,f=ramp,g=ramp,o=ramp", "unknown initializer 'nosuch'"),
    ("chain,q=ramp", "unknown gate 'q'; gates are RNN: h; LSTM: i f g o; GRU: r z n"),
    ("chain:gamma=1", "'chain' has no parameter 'gamma'; it accepts: alpha, direction, scale"),
    ("chain:direction=sideways", "chain:direction 'sideways' is not valid; valid: forward, reverse"),
    ("mixed:direction=up", "mixed:direction 'up' is not valid; valid: forward, reverse"),
    ("identity:direction=reverse", "'identity' has no parameter 'direction'"),
    ("chain:alpha=abc", "'abc' is not a number"),
    ("chain:alpha=nan", "not a finite number"),
    ("chain:alpha", "should look like key=value"),
    ("chain,identity", "more than one base"),
    ("", "empty init spec"),
    ("g=mixed,plain", "not the preset 'mixed'"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(I.InitSpecError) as info:
        I.parse_spec(spec)
    assert message in str(info.value)


def test_bad_plans_are_clear_errors():
    with pytest.raises(I.InitSpecError, match="do not exist in a GRU; its gates are r z n"):
        I.apply_init(nn.GRU(D, N), "plain,i=chain")
    with pytest.raises(I.InitSpecError, match="alpha not accepted by identity; accepted: scale"):
        I.apply_init(nn.RNN(D, N), "identity", alpha=1.0)
    with pytest.raises(I.InitSpecError, match="leaves LSTM gate"):
        I.apply_init(nn.LSTM(D, N), "g=chain")
    with pytest.raises(ValueError, match="no recurrent layer"):
        I.apply_init(nn.Linear(3, 3), "chain")
    with pytest.raises(I.InitSpecError, match="unknown initializer 'nope'"):
        I.get("nope")
    with pytest.raises(I.InitSpecError, match="non-empty string, got ''; known initializers and presets: .*chain"):
        I.InitOptions("")


def test_a_parameter_the_spec_also_writes_must_agree_with_it():
    """A value written in the spec and another given as a parameter (a sweep's value, --init-alpha,
    or --init-scale, which sets chain's alpha) is an error: one of them would be ignored."""
    with pytest.raises(I.InitSpecError, match=r"chain: alpha is 1.02 in the init spec 'chain:alpha=1.02' "
                                              r"and 1.05 as a parameter; give it in one place"):
        I.plan("chain:alpha=1.02", "RNN", alpha=1.05)
    with pytest.raises(I.InitSpecError, match=r"and 1.05 as a parameter \(through 'scale'\)"):
        I.plan("chain:alpha=1.02", "RNN", scale=1.05)
    with pytest.raises(I.InitSpecError, match="fbchain: beta is 0.3"):
        I.plan("plain,h=fbchain:beta=0.3", "RNN", beta=0.2)
    # the same value in both places, or a parameter the spec leaves alone, is fine
    assert I.plan("chain:alpha=1.02", "RNN", alpha=1.02)["h"].recurrent_params["alpha"] == 1.02
    assert I.plan("fbchain:alpha=1.1", "RNN", beta=0.2)["h"].recurrent_params == {"alpha": 1.1, "beta": 0.2}


# ---------------------------------------------------------------- registry and plug-ins

def test_register_and_use_by_name():
    @I.register("test_halfeye", input_init="source")
    def halfeye_(w, scale=0.5):
        with torch.no_grad():
            return w.copy_(scale * torch.eye(w.shape[0]))

    try:
        assert "test_halfeye" in I.available()
        m = nn.LSTM(D, N)
        I.apply_init(m, "test_halfeye:scale=0.25")
        for w in blocks(m.weight_hh_l0, 4):
            assert torch.equal(w, 0.25 * torch.eye(N))
        with pytest.raises(ValueError, match="already registered"):
            I.register("test_halfeye")(lambda w: w)
    finally:
        I._REGISTRY.pop("test_halfeye", None)


def test_plugin_file_usable_by_name(tmp_path):
    plugin = tmp_path / "my_inits.py"
    plugin.write_text(textwrap.dedent("""
        import torch
        from awd_nonnormal.init import register

        @register("test_antidiag", input_init="source")
        def antidiag_(w, value=1.0):
            with torch.no_grad():
                w.zero_()
                w[torch.arange(w.shape[0]), torch.arange(w.shape[0] - 1, -1, -1)] = value
            return w
    """))
    try:
        I.load_plugin(str(plugin))
        m = nn.RNN(D, 4)
        I.apply_init(m, "test_antidiag:value=2")
        assert torch.equal(m.weight_hh_l0, 2 * torch.eye(4).flip(1))
    finally:
        I._REGISTRY.pop("test_antidiag", None)
    with pytest.raises(ValueError, match="does not exist"):
        I.load_plugin(str(tmp_path / "missing.py"))
    with pytest.raises(ValueError, match="cannot import init plug-in module"):
        I.load_plugin("no_such_module_xyz")


def test_plugin_module_on_path_in_fresh_process(tmp_path):
    """A module on sys.path registers by import, as `--init-plugin my_pkg.inits` does."""
    (tmp_path / "plug_mod.py").write_text(textwrap.dedent("""
        from awd_nonnormal.init import register, identity_
        register("test_twice_identity", input_init="normal")(lambda w: identity_(w, 2.0))
    """))
    code = ("import torch; from awd_nonnormal import init as I; I.load_plugin('plug_mod');"
            "m = torch.nn.RNN(2, 3); I.apply_init(m, 'test_twice_identity');"
            "print(m.weight_hh_l0.diagonal().tolist())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), REPO])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[2.0, 2.0, 2.0]"


def test_entry_point_plugins_load_on_first_unknown_name(monkeypatch, tmp_path):
    """An installed package advertises its module under the `awd_nonnormal.initializers` group."""
    (tmp_path / "ep_inits.py").write_text(textwrap.dedent("""
        from awd_nonnormal.init import register, identity_
        register("test_ep_half", input_init="normal")(lambda w: identity_(w, 0.5))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib.metadata as md

    ep = md.EntryPoint(name="half", value="ep_inits", group=I.ENTRY_POINT_GROUP)
    monkeypatch.setattr(md, "entry_points", lambda group=None: [ep] if group == I.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(I, "_entry_points_loaded", False)
    try:
        m = nn.RNN(D, 3)
        I.apply_init(m, "test_ep_half")
        assert torch.equal(m.weight_hh_l0, 0.5 * torch.eye(3))
    finally:
        I._REGISTRY.pop("test_ep_half", None)
        sys.modules.pop("ep_inits", None)
