"""The vanilla RNN layer: exact against plain autograd and nn.RNN, input checks, and the factory."""

import copy
import io
import itertools
import warnings

import pytest
import torch
from torch import nn

from awd_nonnormal.rnn import (
    IMPLS,
    NONLINEARITIES,
    NUMPY_MAX_WORK,
    ONEDNN_MIN_WORK,
    RNN,
    RNN_TYPES,
    build_rnn,
    init_hidden,
    layer_path,
    onednn_available,
    quiet_cudnn_weight_warning,
    rnn,
    rnn_reference,
    uses_fused_kernel,
)

T, B, D, N = 5, 3, 4, 6


def _inputs(num_layers, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, D, generator=g, dtype=dtype, requires_grad=True)
    h0 = (0.5 * torch.randn(num_layers, B, N, generator=g, dtype=dtype)).requires_grad_()
    return x, h0


def _layer_tensors(num_layers, bias, dtype=torch.float64, seed=1):
    """Flat list of per-layer weights (w_ih, w_hh[, b_ih, b_hh]) as leaf tensors."""
    g = torch.Generator().manual_seed(seed)
    flat = []
    for k in range(num_layers):
        d = D if k == 0 else N
        flat.append(torch.randn(N, d, generator=g, dtype=dtype) / d**0.5)
        flat.append(torch.randn(N, N, generator=g, dtype=dtype) / N**0.5)
        if bias:
            flat.append(0.3 * torch.randn(N, generator=g, dtype=dtype))
            flat.append(0.3 * torch.randn(N, generator=g, dtype=dtype))
    return [w.requires_grad_() for w in flat]


def _group(flat, num_layers, bias):
    per = 4 if bias else 2
    layers = [tuple(flat[k * per:(k + 1) * per]) for k in range(num_layers)]
    return [layer if bias else layer + (None, None) for layer in layers]


def _grads(fn, tensors):
    out, h_n = fn()
    # Weight the outputs so every step and h_n contribute distinct gradients.
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    loss = (out * w).sum() + (h_n**2).sum()
    return out, h_n, torch.autograd.grad(loss, tensors)


CASES = list(itertools.product(NONLINEARITIES, (1, 2), (True, False)))
CPU = torch.device("cpu")
HAS_ONEDNN = onednn_available(CPU, torch.float32)
needs_onednn = pytest.mark.skipif(not HAS_ONEDNN, reason="this PyTorch has no oneDNN")


def _float64_impls(nonlinearity):
    """The implementations that run in float64 (oneDNN is float32 only)."""
    return [i for i in IMPLS if i != "onednn" and (i != "fused" or nonlinearity in ("tanh", "relu"))]


@pytest.mark.parametrize("nonlinearity,num_layers,bias", CASES)
def test_gradcheck_python_path(nonlinearity, num_layers, bias):
    x, h0 = _inputs(num_layers)
    flat = _layer_tensors(num_layers, bias)

    def f(x, h0, *flat):
        return rnn(x, h0, _group(flat, num_layers, bias), nonlinearity, impl="python")

    # Random float64 data keeps every pre-activation far (>> the 1e-6 step) from the kinks of
    # relu and elu at 0, and the comparison with the reference below does not depend on it.
    assert torch.autograd.gradcheck(f, (x, h0, *flat), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("nonlinearity,num_layers,bias", CASES)
def test_matches_autograd_reference(nonlinearity, num_layers, bias):
    x, h0 = _inputs(num_layers)
    flat = _layer_tensors(num_layers, bias)
    layers = _group(flat, num_layers, bias)
    ref_out, ref_hn, ref_grads = _grads(
        lambda: rnn_reference(x, h0, layers, nonlinearity), (x, h0, *flat)
    )
    for impl in _float64_impls(nonlinearity):
        out, h_n, grads = _grads(lambda: rnn(x, h0, layers, nonlinearity, impl=impl), (x, h0, *flat))
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_n, ref_hn, rtol=1e-12, atol=1e-12)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


def _assert_close_relative(actual, expected, rtol):
    """|actual - expected| <= rtol * max|expected|: float32 rounding, relative to the tensor's scale."""
    scale = expected.abs().max().clamp_min(1e-30)
    assert (actual - expected).abs().max() <= rtol * scale, (actual - expected).abs().max() / scale


@needs_onednn
@pytest.mark.parametrize("nonlinearity,num_layers,bias", CASES)
@pytest.mark.parametrize("impl", ["onednn", "python", "numpy", "auto"])
def test_float32_paths_match_float64_reference(nonlinearity, num_layers, bias, impl):
    """Every CPU float32 path (oneDNN products, torch.addmm products, NumPy step loops, the rule
    mixing them) against
    the autograd loop in float64, in values and in gradients of the input, h0 and every weight."""
    x, h0 = _inputs(num_layers)
    flat = _layer_tensors(num_layers, bias)
    layers = _group(flat, num_layers, bias)
    ref_out, ref_hn, ref_grads = _grads(
        lambda: rnn_reference(x, h0, layers, nonlinearity), (x, h0, *flat)
    )
    leaves = [t.detach().float().requires_grad_() for t in (x, h0, *flat)]
    x32, h032, flat32 = leaves[0], leaves[1], leaves[2:]
    layers32 = _group(flat32, num_layers, bias)
    out, h_n, grads = _grads(lambda: rnn(x32, h032, layers32, nonlinearity, impl=impl), leaves)
    _assert_close_relative(out.double(), ref_out, 1e-5)
    _assert_close_relative(h_n.double(), ref_hn, 1e-5)
    for g, ref in zip(grads, ref_grads):
        _assert_close_relative(g.double(), ref, 1e-5)


@needs_onednn
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_auto_mixes_backends_exactly_above_the_threshold(nonlinearity):
    """A shape whose step product is above the oneDNN threshold while its input projection is
    below (B*N*N >= ONEDNN_MIN_WORK > T*B*d*N would need T*d < N): auto takes oneDNN for the
    loop, and it still equals the reference and the all-addmm path."""
    t, b, d, n = 3, 8, 2, 400
    assert b * n * n >= ONEDNN_MIN_WORK > t * b * d * n
    assert layer_path(nonlinearity, b, n, CPU, torch.float32) == "onednn"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(t, b, d, generator=g, requires_grad=True)
    h0 = (0.5 * torch.randn(1, b, n, generator=g)).requires_grad_()
    w = [(torch.randn(n, d, generator=g) / d**0.5).requires_grad_(),
         (torch.randn(n, n, generator=g) / n**0.5).requires_grad_(),
         (0.3 * torch.randn(n, generator=g)).requires_grad_(),
         (0.3 * torch.randn(n, generator=g)).requires_grad_()]
    leaves = (x, h0, *w)
    ref = _grads(lambda: rnn_reference(x, h0, [tuple(w)], nonlinearity), leaves)
    for impl in ("auto", "python"):
        res = _grads(lambda: rnn(x, h0, [tuple(w)], nonlinearity, impl=impl), leaves)
        _assert_close_relative(res[0], ref[0], 1e-5)
        _assert_close_relative(res[1], ref[1], 1e-5)
        for a, r in zip(res[2], ref[2]):
            _assert_close_relative(a, r, 1e-5)


def test_path_choice_is_a_rule_of_the_shape():
    """auto: fused on CUDA for tanh/relu; on CPU oneDNN exactly when B*N*N reaches its threshold
    (float32, oneDNN present), NumPy's step loops up to NUMPY_MAX_WORK (float32/float64),
    torch.addmm between them; the same answer every time it is asked."""
    cuda = torch.device("cuda")
    assert NUMPY_MAX_WORK < ONEDNN_MIN_WORK
    grid = [(16, 100), (16, 25), (16, 128), (16, 129), (80, 1150), (16, 256), (64, 128), (1, 1),
            (4096, 20)]
    for nl in NONLINEARITIES:
        for b, n in grid:
            work = b * n * n
            small = work <= NUMPY_MAX_WORK
            expected32 = ("onednn" if work >= ONEDNN_MIN_WORK and HAS_ONEDNN
                          else "numpy" if small else "addmm")
            answers = {layer_path(nl, b, n, CPU, torch.float32) for _ in range(3)}
            assert answers == {expected32}
            # oneDNN: float32 only; NumPy: float32 and float64
            assert layer_path(nl, b, n, CPU, torch.float64) == ("numpy" if small else "addmm")
            assert layer_path(nl, b, n, CPU, torch.float16) == "addmm"
            assert layer_path(nl, b, n, CPU, torch.float32, "python") == "addmm"
            assert layer_path(nl, b, n, CPU, torch.float32, "numpy") == "numpy"
            assert layer_path(nl, b, n, cuda, torch.float32) == (
                "fused" if nl in ("tanh", "relu") else "addmm"
            )
    # the boundary itself: 16 * 128 * 128 = 2**18 is NumPy's, one more unit is not
    assert layer_path("elu", 16, 128, CPU, torch.float32) == "numpy"
    assert layer_path("elu", 16, 129, CPU, torch.float32) != "numpy"
    with pytest.raises(ValueError, match="float32 tensor on a CPU with oneDNN"):
        layer_path("elu", 4, 4, CPU, torch.float64, "onednn")
    with pytest.raises(ValueError, match="float32 tensor on a CPU with oneDNN"):
        layer_path("elu", 4, 4, cuda, torch.float32, "onednn")
    with pytest.raises(ValueError, match="float32 or float64 tensor on the CPU"):
        layer_path("elu", 4, 4, cuda, torch.float32, "numpy")
    with pytest.raises(ValueError, match="float32 or float64 tensor on the CPU"):
        layer_path("elu", 4, 4, CPU, torch.bfloat16, "numpy")


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("num_layers,bias", [(1, True), (2, True), (2, False)])
def test_matches_nn_rnn(nonlinearity, num_layers, bias):
    torch.manual_seed(0)
    ref = nn.RNN(D, N, num_layers, nonlinearity=nonlinearity, bias=bias)
    ours = RNN(D, N, num_layers, nonlinearity=nonlinearity, bias=bias)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(T, B, D)
    h0 = torch.randn(num_layers, B, N)
    for impl in [i for i in IMPLS if i != "onednn" or HAS_ONEDNN]:
        ours.impl = impl
        ours.zero_grad()
        ref.zero_grad()
        out, h_n, grads = _grads(lambda: ours(x, h0), list(ours.parameters()))
        ref_out, ref_hn, ref_grads = _grads(lambda: ref(x, h0), list(ref.parameters()))
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(h_n, ref_hn)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)


def test_parameters_and_default_init_like_nn_rnn():
    m = RNN(3, 16, num_layers=2, nonlinearity="elu")
    ref = nn.RNN(3, 16, num_layers=2)
    shapes = {k: v.shape for k, v in m.named_parameters()}
    assert shapes == {k: v.shape for k, v in ref.named_parameters()}
    bound = 1 / 16**0.5
    for p in m.parameters():
        assert p.abs().max() <= bound
        assert p.std() > bound / 4  # not all zero or constant
    assert list(dict(RNN(3, 4, bias=False).named_parameters())) == ["weight_ih_l0", "weight_hh_l0"]


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_module_float32_and_float64(nonlinearity):
    m = RNN(D, N, 2, nonlinearity)
    x = torch.randn(T, B, D)
    out, h_n = m(x)
    assert out.shape == (T, B, N) and h_n.shape == (2, B, N)
    assert out.dtype == torch.float32
    torch.testing.assert_close(h_n[-1], out[-1])
    ref_out, _ = rnn_reference(x, torch.zeros(2, B, N), m.layer_weights(), nonlinearity)
    torch.testing.assert_close(out, ref_out)
    m64 = copy.deepcopy(m).double()
    out64, _ = m64(x.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out, rtol=1e-5, atol=1e-5)


def test_gradient_from_h_n_only_and_input_without_grad():
    m = RNN(D, N, 2, "elu").double()
    x = torch.randn(T, B, D, dtype=torch.float64)  # no grad needed for the input
    _, h_n = m(x)
    h_n.sum().backward()
    ref_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    _, ref_hn = rnn_reference(x, torch.zeros(2, B, N, dtype=torch.float64), m.layer_weights(), "elu")
    ref_hn.sum().backward()
    for g, p in zip(ref_grads, m.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_non_contiguous_input():
    m = RNN(D, N, 1, "elu")
    x_bt = torch.randn(B, T, D)  # batch-first data, transposed to (T, B, D) without a copy
    x = x_bt.transpose(0, 1)
    assert not x.is_contiguous()
    out, _ = m(x)
    torch.testing.assert_close(out, m(x.contiguous())[0])


def test_autocast_runs_in_weight_dtype():
    m = RNN(D, N, 2, "elu")
    x = torch.randn(T, B, D)
    ref, _ = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = m(x)
        out.sum().backward()
    assert out.dtype == torch.float32 and m.weight_hh_l0.grad.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_state_dict_roundtrip_deepcopy_and_no_warnings():
    m = RNN(D, N, 2, "elu")
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = RNN(D, N, 2, "elu")
    m2.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(T, B, D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = m(x)
        out.sum().backward()
        torch.testing.assert_close(m2(x)[0], out)
        torch.testing.assert_close(copy.deepcopy(m)(x)[0], out)


def test_bad_inputs():
    m = RNN(D, N, 2)
    with pytest.raises(ValueError, match="input_size=4"):
        m(torch.randn(T, B, D + 1))
    with pytest.raises(ValueError, match="2-D"):
        m(torch.randn(T, D))
    with pytest.raises(ValueError, match=r"\(2, 3, 6\)"):
        m(torch.randn(T, B, D), torch.zeros(1, B, N))
    with pytest.raises(ValueError, match="hidden state"):
        m(torch.randn(T, B, D), torch.zeros(2, B + 1, N))
    with pytest.raises(ValueError, match="dtype"):
        m(torch.randn(T, B, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="tanh, relu, elu, linear"):
        RNN(D, N, nonlinearity="selu")
    with pytest.raises(ValueError, match="positive integer"):
        RNN(D, 0)
    m.impl = "bogus"
    with pytest.raises(ValueError, match="auto, fused, python, onednn"):
        m(torch.randn(T, B, D))
    m = RNN(D, N, nonlinearity="elu")
    m.impl = "fused"
    with pytest.raises(ValueError, match="no fused kernel"):
        m(torch.randn(T, B, D))


@pytest.mark.parametrize("rnn_type", [t for t in RNN_TYPES if t != "QRNN"])  # QRNN: test_qrnn.py
@pytest.mark.parametrize("num_layers", [1, 2])
def test_build_rnn_and_init_hidden(rnn_type, num_layers):
    layer = build_rnn(rnn_type, D, N, num_layers, nonlinearity="elu")
    expected = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": RNN}[rnn_type]
    assert type(layer) is expected
    hidden = init_hidden(rnn_type, num_layers, B, N, dtype=torch.float64)
    layer = layer.double()
    if rnn_type == "LSTM":
        h, c = hidden
        assert h.shape == c.shape == (num_layers, B, N) and not h.any() and not c.any()
        assert h.dtype == torch.float64
    else:
        assert hidden.shape == (num_layers, B, N) and not hidden.any()
    out, new_hidden = layer(torch.randn(T, B, D, dtype=torch.float64), hidden)
    assert out.shape == (T, B, N)
    assert type(new_hidden) is type(hidden)
    if rnn_type == "RNN":
        assert layer.nonlinearity == "elu"


def test_build_rnn_errors_list_the_options():
    with pytest.raises(ValueError, match="LSTM, GRU, RNN, QRNN"):
        build_rnn("SRU", D, N)
    with pytest.raises(ValueError, match="LSTM, GRU, RNN"):
        init_hidden("lstm", 1, B, N)
    with pytest.raises(ValueError, match="tanh, relu, elu, linear"):
        build_rnn("RNN", D, N, nonlinearity="sigmoid")


def test_apply_init_chain_sets_the_sub_diagonal():
    init = pytest.importorskip("awd_nonnormal.init")
    m = init.apply_init(RNN(10, 8, num_layers=2, nonlinearity="elu"), "chain")
    for k in range(2):
        w = getattr(m, f"weight_hh_l{k}").detach()
        torch.testing.assert_close(w, torch.diag(torch.ones(7), -1))  # W[i, i-1] = 1
        assert w[1, 0] == 1 and w[0, 1] == 0


def test_path_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for nl in NONLINEARITIES:
        assert not uses_fused_kernel(nl, cpu)  # the hand-written path measured faster on CPU
        assert uses_fused_kernel(nl, cuda) == (nl in ("tanh", "relu"))  # cuDNN where it exists
        assert not uses_fused_kernel(nl, cuda, "python")


def test_cudnn_warning_filter_is_targeted():
    message = (
        "RNN module weights are not part of single contiguous chunk of memory. This means they "
        "need to be compacted at every call, possibly greatly increasing memory usage."
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_cudnn_weight_warning():
            warnings.warn(message, UserWarning)
            warnings.warn("something else", UserWarning)
        with quiet_cudnn_weight_warning(enabled=False):
            warnings.warn(message, UserWarning)
        warnings.warn(message, UserWarning)  # the filter ends with the block
    assert [str(w.message)[:14] for w in caught] == ["something else", "RNN module wei", "RNN module wei"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_cuda_matches_cpu(nonlinearity):
    cpu = RNN(D, N, 2, nonlinearity).double()
    gpu = copy.deepcopy(cpu).to("cuda")
    x = torch.randn(T, B, D, dtype=torch.float64)
    out, h_n, grads = _grads(lambda: cpu(x), list(cpu.parameters()))
    for impl in _float64_impls(nonlinearity):
        gpu.impl = impl
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            g_out, g_hn, g_grads = _grads(lambda: gpu(x.cuda()), list(gpu.parameters()))
        torch.testing.assert_close(g_out.cpu(), out)
        torch.testing.assert_close(g_hn.cpu(), h_n)
        for g, ref in zip(g_grads, grads):
            torch.testing.assert_close(g.cpu(), ref)


def _symbols(seed=2):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, D, (T, B), generator=g)
    s[0] = torch.arange(B) % D  # every row of the table is used by some step
    return s


@pytest.mark.parametrize("nonlinearity,num_layers,bias", CASES)
def test_symbol_inputs_equal_their_one_hot_vectors(nonlinearity, num_layers, bias):
    """(T, B) integer symbols are looked up in W_ih^T + b: the same states as the one-hot vectors
    through the product (bit for bit: a one-hot product adds only exact zeros) and the same
    gradients of h0 and every weight, on every path, against the autograd loop on one-hot floats."""
    s = _symbols()
    one_hot = torch.zeros(T, B, D, dtype=torch.float64).scatter_(-1, s.unsqueeze(-1), 1.0)
    _, h0 = _inputs(num_layers)
    flat = _layer_tensors(num_layers, bias)
    layers = _group(flat, num_layers, bias)
    ref_out, ref_hn, ref_grads = _grads(lambda: rnn_reference(one_hot, h0, layers, nonlinearity),
                                        (h0, *flat))
    for impl in _float64_impls(nonlinearity):
        out, h_n, grads = _grads(lambda: rnn(s, h0, layers, nonlinearity, impl=impl), (h0, *flat))
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_n, ref_hn, rtol=1e-12, atol=1e-12)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
    # the lookup itself is exact: the first step's states equal the product's bit for bit
    with torch.no_grad():
        by_product = rnn(one_hot, h0, layers, nonlinearity, impl="python")[0]
        by_lookup = rnn(s, h0, layers, nonlinearity, impl="python")[0]
    assert torch.equal(by_lookup[0], by_product[0])


@needs_onednn
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_module_takes_symbols_on_the_float32_paths(nonlinearity):
    s = _symbols()
    torch.manual_seed(0)
    m = RNN(D, N, nonlinearity=nonlinearity)
    one_hot = torch.nn.functional.one_hot(s, D).float()
    for impl in ("python", "onednn", "numpy", "auto"):
        m.impl = impl
        m.zero_grad()
        out, h_n = m(s)
        (out.sum() + h_n.sum()).backward()
        got = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        ref_out, ref_hn = m(one_hot)
        (ref_out.sum() + ref_hn.sum()).backward()
        torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
        for g, p in zip(got, m.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,d", [(1, 4), (5, 1), (1, 1)])
def test_symbol_inputs_leave_the_input_weights_alone(n, d):
    """With symbol inputs the layer looks up rows of W_ih^T + b; when N or d is 1 the transpose
    of W_ih is itself contiguous, and the table must still be a copy, not W_ih plus the bias."""
    torch.manual_seed(0)
    m = RNN(d, n, nonlinearity="tanh").double()
    with torch.no_grad():
        m.bias_ih_l0.fill_(0.5)
    before = m.weight_ih_l0.detach().clone()
    symbols = torch.randint(0, d, (3, 2))
    for impl in [i for i in IMPLS if i not in ("onednn", "fused")]:
        m.impl = impl
        out, _ = m(symbols)
        out.sum().backward()
        assert torch.equal(m.weight_ih_l0.detach(), before), impl
        one_hot = torch.nn.functional.one_hot(symbols, d).double()
        torch.testing.assert_close(m(one_hot)[0], out, rtol=1e-12, atol=1e-12)


def test_hidden_state_of_another_dtype_is_refused():
    m = RNN(D, N).double()
    with pytest.raises(ValueError, match="hidden state dtype torch.float32 does not match the weight dtype torch.float64"):
        m(torch.randn(T, B, D, dtype=torch.float64), torch.zeros(1, B, N))


def test_bad_symbols():
    m = RNN(D, N)
    with pytest.raises(ValueError, match=r"symbols must lie in \[0, input_size\) = \[0, 4\), got values from 0 to 4"):
        m(torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match=r"integer symbols of shape \(T, B\), got a 3-D tensor"):
        m(torch.zeros(2, 3, 4, dtype=torch.long))


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_wide_layers_backward_with_one_step_buffer(nonlinearity):
    """From B*N = STEP_BUFFER_MIN_WIDTH the addmm backward keeps g_t in one (B, N) buffer instead
    of a copy of the output gradient: the same values and gradients as the autograd loop."""
    from awd_nonnormal.rnn import STEP_BUFFER_MIN_WIDTH

    b, n, t, d = 16, 64, 4, 3
    assert b * n >= STEP_BUFFER_MIN_WIDTH and b * n * n < ONEDNN_MIN_WORK  # the addmm path
    g = torch.Generator().manual_seed(5)
    x = torch.randn(t, b, d, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = (0.5 * torch.randn(1, b, n, generator=g, dtype=torch.float64)).requires_grad_()
    flat = [(torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5).requires_grad_(),
            (torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5).requires_grad_(),
            (0.3 * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(),
            (0.3 * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_()]
    layers = [tuple(flat)]
    ref = _grads(lambda: rnn_reference(x, h0, layers, nonlinearity), (x, h0, *flat))
    got = _grads(lambda: rnn(x, h0, layers, nonlinearity, impl="python"), (x, h0, *flat))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)
    for a, e in zip(got[2], ref[2]):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def _ulps(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest error of ``actual`` in units in the last place of its dtype at ``exact``."""
    import numpy as np

    spacing = np.spacing(np.abs(exact.to(actual.dtype).numpy()))
    return float(((actual.double() - exact).abs() / torch.from_numpy(spacing).double()).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_in_place_is_numpy_on_cpu_and_accurate(dtype):
    """The layer's tanh runs NumPy's tanh in place on CPU float tensors, within 2 ULP of tanh
    computed in higher precision (math.tanh per element, independent of both libraries)."""
    import math

    from awd_nonnormal.rnn import numpy_tanh_applies, tanh_

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g, dtype=dtype) * s for s in (0.01, 1.0, 4.0)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 30.0, -30.0, 1e-30, 1e-3], dtype=dtype)])
    exact = torch.tensor([math.tanh(v) for v in x.tolist()], dtype=torch.float64)
    y = x.clone().view(3, -1)  # 2-D, as a step state
    assert numpy_tanh_applies(y)
    out = tanh_(y)
    assert out is y and out.data_ptr() == y.data_ptr()
    assert _ulps(y.flatten(), exact) <= 2.0
    # a strided view is written through to its base
    base = x.clone().view(3, -1)
    tanh_(base.t())
    assert _ulps(base.flatten(), exact) <= 2.0


def test_tanh_in_place_falls_back_to_torch_where_numpy_does_not_apply():
    from awd_nonnormal.rnn import numpy_tanh_applies, tanh_

    x = torch.linspace(-3, 3, 50)
    for other in (x.to(torch.bfloat16), x.to(torch.float16)):
        assert not numpy_tanh_applies(other)
        assert torch.equal(tanh_(other.clone()), torch.tanh(other))
    leaf = x.clone().requires_grad_()
    assert not numpy_tanh_applies(leaf)
    with torch.no_grad():
        assert torch.equal(tanh_(leaf), torch.tanh(x))


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_in_place_activation_decided_once_for_like_tensors(nonlinearity):
    from awd_nonnormal.rnn import in_place_activation

    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    expected = {"tanh": torch.tanh, "relu": torch.relu, "elu": torch.nn.functional.elu,
                "linear": lambda v: v}[nonlinearity](z)
    for like in (z, z.double()):
        activate_ = in_place_activation(nonlinearity, like)
        assert (activate_ is None) == (nonlinearity == "linear")
        h = z.to(like.dtype, copy=True)
        if activate_ is not None:
            activate_(h)
        torch.testing.assert_close(h, expected.to(like.dtype), rtol=3e-7, atol=3e-7)
    if nonlinearity == "tanh":  # bfloat16: NumPy has no such dtype, so torch's own tanh_
        h = z.bfloat16()
        in_place_activation("tanh", h)(h)
        assert torch.equal(h, torch.tanh(z.bfloat16()))


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_step_activations_write_each_step_in_place(nonlinearity):
    from awd_nonnormal.rnn import step_activations

    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, 3, 5, generator=g)
    h = z.clone()
    activate_, views = step_activations(h, nonlinearity)
    assert len(views) == 7
    if activate_ is not None:
        for view in views:
            activate_(view)
    expected = {"tanh": torch.tanh, "relu": torch.relu, "elu": torch.nn.functional.elu,
                "linear": lambda v: v}[nonlinearity](z)
    torch.testing.assert_close(h, expected, rtol=3e-7, atol=3e-7)


@pytest.mark.parametrize("m,n", [(3, 7), (7, 3), (5, 5)])
@pytest.mark.parametrize("backend", ["mm", "onednn"])
def test_row_contraction_in_either_orientation(m, n, backend):
    """a^T b summed over the rows, whichever operand the product puts on the left, 2-D (by
    torch.mm or oneDNN) and 3-D (torch.bmm), against an explicit float64 sum of outer products."""
    from awd_nonnormal.rnn import row_contraction

    if backend == "onednn" and not HAS_ONEDNN:
        pytest.skip("this PyTorch has no oneDNN")
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(40, m, generator=g), torch.randn(40, n, generator=g)
    expected = sum(torch.outer(a[r].double(), b[r].double()) for r in range(40))
    got = row_contraction(a, b, onednn=backend == "onednn")
    assert got.shape == (m, n)
    _assert_close_relative(got.double(), expected, 1e-5)
    a3, b3 = torch.stack([a, 2 * a]), torch.stack([b, -b])
    got3 = row_contraction(a3, b3)
    assert got3.shape == (2, m, n)
    _assert_close_relative(got3.double(), torch.stack([expected, -2 * expected]), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_numpy_activation_matches_torch(nonlinearity, dtype):
    """The NumPy loop's in-place f equals PyTorch's f on the values where the formulas could
    part: both infinities, NaN, signed zeros, values next to the kink and far below it."""
    from awd_nonnormal.rnn import numpy_activation

    inf, nan = float("inf"), float("nan")
    z = torch.tensor([[-inf, -100.0, -20.0, -1.0, -1e-7, -0.0], [0.0, 1e-7, 0.5, 20.0, inf, nan]],
                     dtype=dtype)
    expected = {"tanh": torch.tanh, "relu": torch.relu, "elu": torch.nn.functional.elu,
                "linear": lambda v: v}[nonlinearity](z)
    a = z.numpy().copy()
    f_ = numpy_activation(nonlinearity, a.shape, a.dtype)
    assert (f_ is None) == (nonlinearity == "linear")
    if f_ is not None:
        f_(a)
    tol = 1e-6 if dtype == torch.float32 else 1e-15
    torch.testing.assert_close(torch.from_numpy(a), expected, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_numpy_loops_take_any_gradient_layout(nonlinearity):
    """The NumPy loops read the output gradient and h0 through views of their memory: a
    transposed output gradient, an expanded one (stride 0, from a plain sum), none at all (only
    h_n in the loss), a strided h0, and a one-step sequence all give the torch.addmm loop's
    values and gradients."""
    g = torch.Generator().manual_seed(11)
    num_layers = 2
    flat = _layer_tensors(num_layers, True)
    layers = _group(flat, num_layers, True)
    losses = {
        "transposed": lambda out, h_n: (out.transpose(0, 2) * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(N, B, -1)).sum(),
        "expanded": lambda out, h_n: out.sum() + h_n.sum(),
        "h_n only": lambda out, h_n: (h_n**2).sum(),
    }
    for steps in (T, 1):
        x = torch.randn(steps, B, D, generator=g, dtype=torch.float64, requires_grad=True)
        # h0 as a strided view: layer k's (B, N) rows lie num_layers * N apart
        h0 = torch.randn(B, num_layers, N, generator=g, dtype=torch.float64).transpose(0, 1)
        h0.requires_grad_()
        assert not h0[0].is_contiguous()
        for name, loss_of in losses.items():
            results = {}
            for impl in ("python", "numpy"):
                out, h_n = rnn(x, h0, layers, nonlinearity, impl=impl)
                grads = torch.autograd.grad(loss_of(out, h_n), (x, h0, *flat))
                results[impl] = (out, h_n, *grads)
            for a, e in zip(results["numpy"], results["python"]):
                torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=f"{name}, T={steps}")


@pytest.mark.parametrize("impl", ["python", "onednn", "numpy"])
def test_step_loops_leave_no_inference_tensors(impl):
    """The step loops run under torch.inference_mode(); what leaves the layer (outputs, the state
    it saves, gradients) is ordinary autograd tensors, usable in further graphs."""
    if impl == "onednn" and not HAS_ONEDNN:
        pytest.skip("this PyTorch has no oneDNN")
    x, h0 = _inputs(1, dtype=torch.float32)
    flat = [t.detach().float().requires_grad_() for t in _layer_tensors(1, True)]
    out, h_n = rnn(x, h0, _group(flat, 1, True), "tanh", impl=impl)
    assert not out.is_inference() and not h_n.is_inference()
    loss = (out * out).sum() + h_n.sum() + out.sum()  # the output used twice in one graph
    grads = torch.autograd.grad(loss, (x, h0, *flat))
    assert not any(g.is_inference() for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
