"""Recurrent layers: a fast, exact vanilla RNN for any activation, and one factory for every kind.

The vanilla layer computes, for each layer k and step t (PyTorch's convention)::

    h_t = f(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh),    f in {tanh, relu, elu, linear}

``W_hh[i, j]`` is the weight from unit j to unit i. The parameters carry ``nn.RNN``'s names
(``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``), so state_dicts move
between the two, and initializers and ``WeightDrop`` find the layers by name.

PyTorch fuses tanh and relu only (``torch._VF.rnn_tanh`` / ``rnn_relu``, cuDNN on CUDA). The paper's
copy and psMNIST models use elu, for which plain autograd over a Python loop is slower than the
fused kernel (5x when the loop indexes a graph tensor per step, see bench/rnn_speed.py; 1.1x-1.8x with
``unbind``, see :func:`rnn_reference` and the benchmark), so every activation also has a hand-written
backpropagation through time (:class:`_RNNLayerFunction`): one matrix product and one in-place
activation per step forward, one product and one multiply per step backward, and all the
input-side work (input projections, input and weight gradients) as single large products over the
whole sequence. That path is pure Python on top of ``torch`` ops, so it runs on any device.

Which path runs is chosen per call by :func:`layer_path` (``impl="auto"``), from the nonlinearity,
the device, the dtype and the shape only:

* CUDA, tanh or relu: PyTorch's fused kernel (cuDNN).
* otherwise the hand-written loop, whose products go to oneDNN (CPU, float32, work m*k*n of the
  product at least :data:`ONEDNN_MIN_WORK`) or to ``torch.addmm`` (MKL on CPU, cuBLAS on CUDA);
  on CPU, where the step product is small (B*N*N up to :data:`NUMPY_MAX_WORK`), the per-step
  loops run on NumPy instead, on views of the same memory (:func:`step_backend`). On CPU this
  beat PyTorch's own kernel for tanh and relu as well (``bench/rnn_speed.py``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

NONLINEARITIES = ("tanh", "relu", "elu", "linear")
RNN_TYPES = ("LSTM", "GRU", "RNN", "QRNN")
IMPLS = ("auto", "fused", "python", "onednn", "numpy")
"""``auto``: the fastest exact path for the device and shape; ``fused``: PyTorch's kernel (tanh and
relu only); ``python``: the hand-written backpropagation through time with every product by
``torch.addmm`` (every activation, any device); ``onednn``: the same loop with every product by
oneDNN (CPU, float32); ``numpy``: the same loop as ``python`` with the per-step products and
activations run by NumPy on the tensors' memory (CPU, float32/float64; on step products above
:data:`NUMPY_MAX_WORK`, which ``auto`` never gives it, OpenBLAS may use its own threads)."""

# Device types on which ``auto`` hands tanh and relu to PyTorch's fused kernel. On CUDA that is
# cuDNN, which runs the sequence in its own kernels where the hand-written path launches two
# kernels per step and direction from Python (not measured here: no GPU). On CPU PyTorch's
# kernel is a C++ loop of autograd ops and the hand-written path beat it on every shape measured
# (see bench/rnn_speed.py and the README), so CPU is not listed.
FUSED_DEVICE_TYPES = frozenset({"cuda"})

_CUDNN_COMPACTION_WARNING = r"RNN module weights are not part of single contiguous chunk of memory"

LayerWeights = Sequence[Optional[Tensor]]  # (w_ih, w_hh, b_ih, b_hh); the biases may be None


def _check_nonlinearity(nonlinearity: str) -> None:
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(
            f"unknown nonlinearity {nonlinearity!r}; valid choices: {', '.join(NONLINEARITIES)}"
        )


@contextlib.contextmanager
def quiet_cudnn_weight_warning(enabled: bool = True) -> Iterator[None]:
    """Silence cuDNN's "weights are not part of single contiguous chunk of memory" warning.

    cuDNN wants all weights of a recurrent stack in one buffer and copies them into one when they
    are not (and warns each time). A weight that is recomputed every call (DropConnect) or a layer
    that keeps its parameters as separate tensors is never in one buffer, so the copy is expected
    and the warning is noise. Only that message is filtered, and only inside the block; pass
    ``enabled=False`` (e.g. on CPU, where cuDNN is not involved) to skip the filter entirely.
    """
    if not enabled:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CUDNN_COMPACTION_WARNING, category=UserWarning)
        yield


# ---------------------------------------------------------------------------------------------
# Matrix products. On CPU, PyTorch's torch.mm/addmm call MKL, while oneDNN (which nn.LSTM uses)
# reaches about twice MKL's float32 throughput on large products on the CPUs measured (and far
# more on thin ones, such as a gradient with 10 columns), but costs about 10 us more per call. A
# product (m, k) x (k, n) therefore goes to oneDNN when its work m*k*n is at least
# ONEDNN_MIN_WORK, and to torch.addmm below. bench/rnn_speed.py times both backends on both sides
# of the threshold and prints where the rule picked the slower one, and by how much.

ONEDNN_MIN_WORK = 2**20
"""Smallest m*k*n of an (m, k) x (k, n) float32 product on CPU that ``impl="auto"`` sends to oneDNN."""


STEP_BUFFER_MIN_WIDTH = 1024
"""Smallest B*N at which the backward loop on torch.addmm adds each step's product into one (B, N)
buffer (``addmm(..., out=)``, which copies grad_h[t] in first) rather than into a (T, B, N) copy
of the output gradient made up front. In one process, elu layer forward + backward against the
copy up front: copy shape (B*N = 1600) 1.05-1.16x faster, psMNIST (400) 0.94-0.95x (loaded 2-core CPU, one
thread, two runs), so the narrow layers keep the copy. Re-measured on a quiet core with freed memory
kept (:func:`~awd_nonnormal.utils.retain_freed_memory`, as the commands run): copy 1.03-1.05x,
psMNIST 0.99-1.01x."""


NUMPY_MAX_WORK = 2**18
"""Largest B*N*N of the recurrent step product (B, N) x (N, N) on CPU for which ``impl="auto"``
runs the per-step loops on NumPy (:func:`_numpy_forward_loop`, :func:`_numpy_backward_loop`).
A step there is a few microseconds of arithmetic, and what decides the speed is the cost per call:
``np.dot`` (NumPy's BLAS, OpenBLAS in the PyPI wheels) took 4.4 us on a (16, 100) x (100, 100)
product where ``torch.addmm`` took 5.3-5.8 (MKL plus PyTorch's dispatch), 0.9 against 1.3-1.8 at
(16, 25) x (25, 25), and NumPy's elementwise calls 0.4-0.8 us against PyTorch's 0.7-2.1 (AMD
EPYC, AVX-512, one thread; ``bench/rnn_speed.py`` times the three backends and checks this rule).
Up to 2^18 OpenBLAS ran the product on one thread whatever its own thread count (CPU time / wall
time 1.00 at 16 x 128 x 128, 1.37 at 32 x 128 x 128 with two cores; OpenBLAS 0.3.31, whose
thread count PyTorch's ``set_num_threads`` does not reach), so the loops stay on one core as
``--threads 1`` asks; the benchmark prints that share beside its timings."""

NUMPY_DTYPES = (torch.float32, torch.float64)


def step_loop() -> contextlib.AbstractContextManager:
    """The context of the per-step loops on ``torch.addmm``: ``torch.inference_mode()``. Autograd is
    already off inside the layer's Function; inference mode also skips the autograd layer of the
    dispatcher on every call, about 0.2 of the 1 us each call costs besides its arithmetic
    (in-process A/B of the forward + backward loops, one thread: copy shape 5 %, psMNIST 10 %
    faster). The loops make only in-place and ``out=`` calls on buffers made outside, so no
    inference tensor escapes them."""
    return torch.inference_mode()


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can run this layer's products: CPU, float32, and a PyTorch built with it."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def numpy_steps_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the per-step loops can run on NumPy: CPU and float32/float64."""
    return device.type == "cpu" and dtype in NUMPY_DTYPES


def _uses_onednn(m: int, k: int, n: int, impl: str, available: bool) -> bool:
    """Whether the (m, k) x (k, n) product goes to oneDNN under ``impl`` (python/onednn/numpy/auto)."""
    if impl == "onednn":
        return True
    return impl == "auto" and available and m * k * n >= ONEDNN_MIN_WORK


def step_backend(batch_size: int, hidden_size: int, impl: str, device: torch.device,
                 dtype: torch.dtype) -> str:
    """Who runs the per-step loops of the hand-written path: ``"onednn"`` (step products by oneDNN
    with W_hh packed once), ``"numpy"`` (products and activations by NumPy) or ``"addmm"``
    (``torch.addmm`` and PyTorch's in-place ops). Under ``impl="auto"`` by the size of the step
    product, B*N*N: oneDNN from :data:`ONEDNN_MIN_WORK`, NumPy up to :data:`NUMPY_MAX_WORK`
    (CPU), ``torch.addmm`` between them and on other devices. A function of its arguments only."""
    work = batch_size * hidden_size * hidden_size
    if impl == "numpy":
        if not numpy_steps_available(device, dtype):
            raise ValueError(
                f"impl='numpy' needs a float32 or float64 tensor on the CPU, got {dtype} on "
                f"{device}; use impl='auto' or 'python'"
            )
        return "numpy"
    if _uses_onednn(batch_size, hidden_size, hidden_size, impl, onednn_available(device, dtype)):
        return "onednn"
    if impl == "auto" and work <= NUMPY_MAX_WORK and numpy_steps_available(device, dtype):
        return "numpy"
    return "addmm"


def _linear(a: Tensor, w: Tensor, bias: Optional[Tensor], onednn: bool) -> Tensor:
    """``a @ w.T + bias`` for a (m, k) and w (n, k), either strided; by oneDNN or torch.addmm."""
    if onednn:
        return torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")
    if bias is None:
        return torch.mm(a, w.t())
    return torch.addmm(bias, a, w.t())


def row_contraction(a: Tensor, b: Tensor, onednn: bool = False) -> Tensor:
    """``a^T b`` for a (..., R, m) and b (..., R, n): the sum over R rows of outer products, as in
    the weight gradients (sum_t delta_t x_t^T over the T*B rows); 2-D by :func:`_linear` (oneDNN
    or torch.mm), 3-D by torch.bmm. Both libraries run this product faster with the narrower
    operand on the left, so for m > n it is computed as ``(b^T a)^T`` and returned as that
    transposed view. Measured at T*B = 8000 rows, 100 units, 10 inputs, one thread: oneDNN 181
    against 521 us, torch.mm 269 against 987 us, an 8-member torch.bmm 3.9 against 12.7 ms; at
    100 x 100 and at the LM sizes within 5 % either way (``bench/rnn_speed.py`` checks the
    orientation with the backend rule)."""
    if a.shape[-1] > b.shape[-1]:
        return row_contraction(b, a, onednn).transpose(-2, -1)
    if a.dim() == 3:
        return torch.bmm(a.transpose(1, 2), b)
    return _linear(a.t(), b.t(), None, onednn)


# ---------------------------------------------------------------------------------------------
# Activations for the hand-written path. The forward pass applies f in place on the step's
# hidden state; the backward pass needs f'(z) and gets it from h = f(z) alone, so the
# pre-activations never have to be stored. F.elu_ is the C function itself (no Python wrapper).

def numpy_tanh_applies(x: Tensor) -> bool:
    """Whether :func:`tanh_` runs NumPy's tanh on ``x``'s memory: CPU, float32/64 (as
    :func:`numpy_steps_available`), no autograd, a plain tensor (no negation bit) and not while
    ``torch.compile`` traces."""
    return (numpy_steps_available(x.device, x.dtype) and not x.requires_grad
            and not x.is_neg() and not torch.compiler.is_compiling())


def tanh_(x: Tensor) -> Tensor:
    """``x.tanh_()``; on CPU (float32/64, outside autograd) by NumPy's vectorised tanh on the same
    memory. PyTorch 2.13's CPU tanh costs 4.4 us on a (16, 100) step state and 215 us on an
    LM-size (80, 1150) one, NumPy's 0.6 us (1.3 us with the ``Tensor.numpy()`` call) and 17 us
    (AMD EPYC, AVX-512, one thread; see
    ``bench/rnn_speed.py --activations``), which was most of the difference between tanh and
    relu layers. Both are within 1.5 ULP of tanh in float64 (measured over 5M points: torch 0.51,
    NumPy 1.37 ULP), so results equal the reference loop to float tolerance, not bit for bit."""
    if numpy_tanh_applies(x):
        _numpy_tanh_(x)
        return x
    return x.tanh_()


def _numpy_tanh_(x: Tensor) -> None:
    """NumPy's tanh in place on ``x``'s memory, unchecked (see :func:`numpy_tanh_applies`)."""
    a = x.numpy()  # a view of x's memory
    np.tanh(a, a)


def in_place_activation(nonlinearity: str, like: Tensor) -> Optional[Callable[[Tensor], object]]:
    """f in place for tensors like ``like`` (same device, dtype, autograd state), decided once:
    for tanh where :func:`numpy_tanh_applies`, NumPy's tanh without :func:`tanh_`'s per-call
    checks (0.3 us, as much as NumPy's tanh itself at 400 elements); None for linear."""
    if nonlinearity == "tanh" and numpy_tanh_applies(like):
        return _numpy_tanh_
    return ACTIVATIONS_IN_PLACE[nonlinearity]


def step_activations(
    h: Tensor, nonlinearity: str, steps: Optional[Sequence[Tensor]] = None
) -> tuple[Optional[Callable], Sequence]:
    """``(f_, views)`` to apply f in place on each step ``h[t]`` of a (T, ...) buffer as
    ``f_(views[t])``: for tanh on CPU NumPy's tanh on row views of the buffer made once (saves
    the per-call ``Tensor.numpy()``, about 0.5 us, which matters at the psMNIST step's 400
    elements), otherwise the in-place op on ``steps`` (``h.unbind(0)`` if not given: pass the
    loop's own, as each unbind costs about 0.4 us a step)."""
    if nonlinearity == "tanh" and numpy_tanh_applies(h):
        np_tanh = np.tanh
        return (lambda a: np_tanh(a, a)), h.numpy()
    return ACTIVATIONS_IN_PLACE[nonlinearity], h.unbind(0) if steps is None else steps


ACTIVATIONS_IN_PLACE: dict[str, Optional[Callable[[Tensor], Tensor]]] = {
    "tanh": tanh_,
    "relu": torch.Tensor.relu_,
    "elu": F.elu_,
    "linear": None,
}


def derivative_from_output(h: Tensor, nonlinearity: str) -> Optional[Tensor]:
    """f'(z) written in terms of h = f(z), for all steps at once; None for linear (f' = 1)."""
    if nonlinearity == "tanh":
        return torch.addcmul(h.new_ones(()), h, h, value=-1)  # tanh'(z) = 1 - tanh(z)^2
    if nonlinearity == "relu":
        # relu'(z) = [z > 0] = [h > 0] = sign(h) as h >= 0 (one op, no bool temporary); 0 at the
        # kink, like torch.relu.
        return torch.sign(h)
    if nonlinearity == "elu":
        # elu(z) = z for z > 0, exp(z) - 1 otherwise (Clevert et al. 2016, alpha = 1), so
        # elu'(z) = 1 for z > 0 and exp(z) = h + 1 otherwise: both are min(h, 0) + 1.
        return torch.clamp_max(h, 0).add_(1)
    return None


def _as_numpy(x: Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory (any strides), outside autograd."""
    return x.detach().resolve_neg().numpy()


def numpy_activation(
    nonlinearity: str, shape: tuple[int, ...], dtype: np.dtype
) -> Optional[Callable[[np.ndarray], None]]:
    """f in place on a NumPy array of ``shape`` and ``dtype``, with its scratch arrays made once;
    None for linear. relu is ``max(z, 0)`` against a zero array (0.4 us at (16, 100), a scalar 0
    costs 1.3); elu (alpha = 1) is ``max(z, expm1(min(z, 0)))`` in three calls (1.6 us against
    ``F.elu_``'s 2.1): z for z > 0, and for z <= 0 ``expm1(z)``, which is never below z."""
    if nonlinearity == "tanh":
        tanh = np.tanh
        return lambda a: tanh(a, out=a)
    if nonlinearity == "relu":
        zero = np.zeros(shape, dtype)
        maximum = np.maximum
        return lambda a: maximum(a, zero, out=a)
    if nonlinearity == "elu":
        zero, below = np.zeros(shape, dtype), np.empty(shape, dtype)
        minimum, expm1, maximum = np.minimum, np.expm1, np.maximum

        def elu_(a: np.ndarray) -> None:
            minimum(a, zero, out=below)
            expm1(below, out=below)
            maximum(a, below, out=a)

        return elu_
    return None


def _numpy_forward_loop(h: Tensor, h0: Tensor, w_hh: Tensor, nonlinearity: str) -> None:
    """The forward recurrence on NumPy, in place: ``h`` (T, B, N) holds u_t on entry and h_t on
    return. Two NumPy calls per step besides f: the product into a scratch array, the add."""
    T, B, N = h.shape
    hs = h.numpy()  # (T, B, N), a view of h's memory
    w_t = np.ascontiguousarray(_as_numpy(w_hh).T)  # (N, N): h_{t-1} W_hh^T is W_hh h_{t-1}
    z = np.empty((B, N), hs.dtype)
    activate_ = numpy_activation(nonlinearity, (B, N), hs.dtype)
    h_prev = _as_numpy(h0)  # (B, N)
    dot, add = np.dot, np.add
    with np.errstate(all="ignore"):  # overflow gives inf and NaN, silently, as in PyTorch
        for h_t in hs:  # (B, N) views
            dot(h_prev, w_t, out=z)  # W_hh h_{t-1}
            add(h_t, z, out=h_t)  # z_t = u_t + W_hh h_{t-1}
            if activate_ is not None:
                activate_(h_t)  # h_t = f(z_t)
            h_prev = h_t


def _numpy_backward_loop(delta: Tensor, grad_h: Tensor, grad_hn: Tensor, w_hh: Tensor,
                         has_fprime: bool) -> None:
    """Backpropagation through time on NumPy, in place: ``delta`` (T, B, N) holds f'(z_t) on entry
    (if ``has_fprime``; else anything) and delta_t on return (see ``_RNNLayerFunction._backward``)."""
    deltas = list(delta.numpy())  # T views (B, N)
    grads = list(_as_numpy(grad_h))  # grad_h may have any strides
    w = np.ascontiguousarray(_as_numpy(w_hh))  # (N, N): delta_{t+1} W_hh is W_hh^T delta_{t+1}
    with np.errstate(all="ignore"):  # overflow gives inf and NaN, silently, as in PyTorch
        _numpy_bptt(deltas, grads, _as_numpy(grad_hn), w, has_fprime)


def _numpy_bptt(deltas: list, grads: list, grad_hn: np.ndarray, w: np.ndarray,
                has_fprime: bool) -> None:
    """The loop of :func:`_numpy_backward_loop` on its NumPy views."""
    T = len(deltas)
    dot, add, multiply = np.dot, np.add, np.multiply
    if has_fprime:
        g = np.empty_like(deltas[0])  # g_t (B, N)
        add(grads[T - 1], grad_hn, out=g)
        multiply(deltas[T - 1], g, out=deltas[T - 1])
        for t in range(T - 2, -1, -1):
            dot(deltas[t + 1], w, out=g)
            add(g, grads[t], out=g)  # g_t = grad_h[t] + W_hh^T delta_{t+1}
            multiply(deltas[t], g, out=deltas[t])  # delta_t = f'(z_t) g_t
    else:  # linear: delta_t = g_t, built in its own slot
        add(grads[T - 1], grad_hn, out=deltas[T - 1])
        for t in range(T - 2, -1, -1):
            d_t = deltas[t]
            dot(deltas[t + 1], w, out=d_t)
            add(d_t, grads[t], out=d_t)


class _RNNLayerFunction(torch.autograd.Function):
    """One vanilla RNN layer over a whole sequence, with backpropagation through time by hand.

    Autograd records a single node for the layer instead of several per step. Inside ``forward``
    and ``backward`` autograd is off, so per-step work is done in place on slices of buffers
    allocated once per sequence (no per-step graph nodes, no ``SelectBackward`` zero-filled
    copies): two calls per step forward (product, activation) and two
    backward (product, multiply by f'). All the input-side work (input projections, input and
    weight gradients) is one large product each over the whole sequence.

    ``impl`` is ``"python"`` (every product by torch.addmm), ``"onednn"`` (every product by
    oneDNN, the recurrent weight packed once per sequence), ``"numpy"`` (as ``"python"``, with the
    per-step loops on NumPy) or ``"auto"`` (the step loops by :func:`step_backend`, each
    whole-sequence product by the ``ONEDNN_MIN_WORK`` rule).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,  # (T, B, d) floats, or (T, B) integer symbols standing for one-hot vectors
        h0: Tensor,  # (B, N)
        w_ih: Tensor,  # (N, d)
        w_hh: Tensor,  # (N, N)
        b_ih: Optional[Tensor],  # (N,)
        b_hh: Optional[Tensor],  # (N,)
        nonlinearity: str,
        impl: str,
    ) -> tuple[Tensor, Tensor]:
        # Under autocast the loop runs in the weights' dtype: autocast would cast the matmuls
        # but not the in-place steps that follow them.
        with torch.autocast(x.device.type, enabled=False):
            return _RNNLayerFunction._forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, impl)

    @staticmethod
    def _forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, impl):
        T, B = x.shape[:2]
        N, d = w_ih.shape
        available = onednn_available(x.device, w_hh.dtype)
        bias = b_ih + b_hh if b_ih is not None else None
        if x.is_floating_point():
            # Input projections of every step with one product: u_t = W_ih x_t + b_ih + b_hh.
            x2 = x.reshape(T * B, d)  # (T*B, d)
            u = _linear(x2, w_ih, bias, _uses_onednn(T * B, d, N, impl, available)).view(T, B, N)
        else:
            # One-hot inputs given as their symbols s_t: W_ih x_t is column s_t of W_ih, so u_t is
            # row s_t of W_ih^T + b, looked up. Exactly the product's numbers (a one-hot product
            # adds only exact zeros), without it, and without the weight-gradient product.
            # (d, N), a copy in every case: with N or d = 1 the transpose is already contiguous,
            # and .contiguous() would return w_ih's own memory, which the bias is added to below
            table = w_ih.t().clone(memory_format=torch.contiguous_format)
            if bias is not None:
                table.add_(bias)
            u = table.index_select(0, x.reshape(T * B)).view(T, B, N)
        h_prev = h0  # (B, N)
        backend = step_backend(B, N, impl, x.device, w_hh.dtype)
        if backend == "onednn":
            activate_ = in_place_activation(nonlinearity, u)
            # z_t = u_t + W_hh h_{t-1} in one oneDNN call (binary add post-op) with W_hh packed
            # for B rows once per sequence; each call returns a new (B, N) tensor, gathered by
            # one copy at the end.
            linear_add = torch.ops.mkldnn._linear_pointwise.binary
            w_packed = torch.ops.mkldnn._reorder_linear_weight(w_hh, B)
            steps = []
            for u_t in u.unbind(0):  # u_t: (B, N)
                h_prev = linear_add(h_prev, u_t, w_packed, None, "add")  # z_t
                if activate_ is not None:
                    activate_(h_prev)  # h_t = f(z_t)
                steps.append(h_prev)
            h = torch.stack(steps)  # (T, B, N)
        elif backend == "numpy":
            h = u  # u_t, then z_t, then h_t: the output (T, B, N)
            _numpy_forward_loop(h, h0, w_hh, nonlinearity)
            if T:
                h_prev = h[-1]
        else:
            # The buffer holds u_t, then z_t, then h_t: the output (T, B, N).
            h = u
            w_hh_t = w_hh.t()  # (N, N); h_{t-1} W_hh^T is W_hh h_{t-1} for row vectors
            steps = h.unbind(0)  # each (B, N), a view into the buffer
            step_activate_, views = step_activations(h, nonlinearity, steps)
            with step_loop():
                for h_t, view_t in zip(steps, views):
                    h_t.addmm_(h_prev, w_hh_t)  # z_t = u_t + W_hh h_{t-1}
                    if step_activate_ is not None:
                        step_activate_(view_t)  # h_t = f(z_t), in place
                    h_prev = h_t
        ctx.save_for_backward(x, h0, w_ih, w_hh, h)
        ctx.nonlinearity = nonlinearity
        ctx.impl = impl
        ctx.backend = backend
        ctx.has_bias = b_ih is not None
        # h_n is returned as its own tensor: two outputs that view one buffer would tie their
        # autograd histories together.
        return h, h_prev.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor, grad_hn: Tensor):  # (T, B, N), (B, N)
        with torch.autocast(grad_h.device.type, enabled=False):
            return _RNNLayerFunction._backward(ctx, grad_h, grad_hn)

    @staticmethod
    def _backward(ctx, grad_h, grad_hn):
        x, h0, w_ih, w_hh, h = ctx.saved_tensors
        T, B, N = h.shape
        d = w_ih.shape[1]
        impl = ctx.impl
        available = onednn_available(h.device, h.dtype)
        # delta_t = dL/dz_t, backwards through time (Werbos 1990):
        #   g_t     = dL/dh_t = grad_h[t] + W_hh^T delta_{t+1}   (+ grad of h_n at t = T-1)
        #   delta_t = g_t * f'(z_t)
        # The buffer ``delta`` first holds f'(z_t) for all t (one vectorised op) and is
        # overwritten by delta_t step by step (for linear, f' = 1 and delta_t = g_t).
        fprime = derivative_from_output(h, ctx.nonlinearity)  # (T, B, N) or None
        if ctx.backend == "numpy":
            delta = fprime if fprime is not None else torch.empty_like(h)
            _numpy_backward_loop(delta, grad_h, grad_hn, w_hh, fprime is not None)
        elif ctx.backend == "onednn":
            # g_t in one oneDNN call: grad_h[t] + delta_{t+1} W_hh (W_hh^T packed once).
            linear_add = torch.ops.mkldnn._linear_pointwise.binary
            w_packed = torch.ops.mkldnn._reorder_linear_weight(w_hh.t().contiguous(), B)
            grad_h = grad_h.contiguous()
            delta = fprime if fprime is not None else torch.empty_like(h)
            deltas = delta.unbind(0)
            grads_h = grad_h.unbind(0)
            for t in range(T - 1, -1, -1):
                if t == T - 1:
                    g = grads_h[t] + grad_hn
                else:
                    g = linear_add(deltas[t + 1], grads_h[t], w_packed, None, "add")
                if fprime is not None:
                    deltas[t].mul_(g)
                else:
                    deltas[t].copy_(g)
        elif fprime is not None and B * N >= STEP_BUFFER_MIN_WIDTH:
            # g_t in one (B, N) buffer (torch.addmm with out= copies grad_h[t] into it and adds
            # the product); delta_t = f' * g_t then overwrites f' in its buffer. No (T, B, N)
            # copy of grad_h.
            delta = fprime
            deltas = delta.unbind(0)
            grads_h = grad_h.unbind(0)
            g = torch.add(grads_h[T - 1], grad_hn)  # (B, N)
            deltas[T - 1].mul_(g)
            addmm, mul_ = torch.addmm, Tensor.mul_
            with step_loop():
                for t in range(T - 2, -1, -1):
                    addmm(grads_h[t], deltas[t + 1], w_hh, out=g)  # grad_h[t] + delta_{t+1} W_hh
                    mul_(deltas[t], g)
        else:
            # g_t accumulates in place in a copy of grad_h (in-place addmm_ needs no copy of
            # grad_h[t] per step); delta_t = f' * g_t then overwrites f' in its buffer (for
            # linear, delta_t = g_t).
            g_buf = grad_h.clone(memory_format=torch.contiguous_format)  # (T, B, N)
            g_buf[T - 1].add_(grad_hn)
            delta = fprime if fprime is not None else g_buf
            deltas = delta.unbind(0)
            gs = g_buf.unbind(0)
            with step_loop():
                for t in range(T - 1, -1, -1):
                    if t < T - 1:
                        gs[t].addmm_(deltas[t + 1], w_hh)  # delta_{t+1} W_hh (row vectors)
                    if fprime is not None:
                        deltas[t].mul_(gs[t])

        # Everything else is one product over all T*B rows.
        delta2 = delta.view(T * B, N)  # (T*B, N)
        need_x, need_h0, need_wih, need_whh, need_bih, need_bhh, _, _ = ctx.needs_input_grad
        grad_x = grad_h0 = grad_wih = grad_whh = grad_bih = grad_bhh = None
        symbols = not x.is_floating_point()
        if symbols and (need_wih or (ctx.has_bias and (need_bih or need_bhh))):
            # the lookup's gradient: row s of W_ih^T + b collects delta_t of every step with s_t = s
            grad_table = delta2.new_zeros(d, N).index_add_(0, x.reshape(T * B), delta2)  # (d, N)
        if need_x:  # dL/dx_t = W_ih^T delta_t  (T*B, d)
            grad_x = _linear(delta2, w_ih.t(), None, _uses_onednn(T * B, N, d, impl, available))
            grad_x = grad_x.view(T, B, d)
        if need_h0:
            grad_h0 = torch.mm(delta[0], w_hh)  # dL/dh_0 = W_hh^T delta_1
        if need_wih and symbols:
            grad_wih = grad_table.t()
        elif need_wih:  # sum_t delta_t x_t^T  (N, d)
            grad_wih = row_contraction(
                delta2, x.reshape(T * B, d), _uses_onednn(N, T * B, d, impl, available)
            )
        if need_whh:  # sum_t delta_t h_{t-1}^T  (N, N)
            if T > 1:
                rows = (T - 1) * B
                grad_whh = row_contraction(
                    delta[1:].reshape(rows, N),
                    h[:-1].reshape(rows, N),
                    _uses_onednn(N, rows, N, impl, available),
                )
                grad_whh.addmm_(delta[0].t(), h0)
            else:
                grad_whh = torch.mm(delta[0].t(), h0)
        if ctx.has_bias and (need_bih or need_bhh):
            grad_b = grad_table.sum(0) if symbols else delta2.sum(0)  # (N,)
            grad_bih = grad_b if need_bih else None
            # Separate tensors: the two .grad fields must not alias each other.
            grad_bhh = (grad_b.clone() if need_bih else grad_b) if need_bhh else None
        return grad_x, grad_h0, grad_wih, grad_whh, grad_bih, grad_bhh, None, None


def layer_path(
    nonlinearity: str, batch_size: int, hidden_size: int, device: torch.device, dtype: torch.dtype,
    impl: str = "auto",
) -> str:
    """The path :func:`rnn` takes for a layer of this shape: ``"fused"`` (PyTorch's kernel, cuDNN
    on CUDA), or the hand-written loop with its step loops run by ``"onednn"``, ``"numpy"`` or
    ``"addmm"`` (torch.addmm: MKL on CPU, cuBLAS on CUDA), see :func:`step_backend`. A function
    of its arguments only, so the same shape always takes the same path."""
    if uses_fused_kernel(nonlinearity, device, impl):
        return "fused"
    if impl == "onednn" and not onednn_available(device, dtype):
        raise ValueError(
            f"impl='onednn' needs a float32 tensor on a CPU with oneDNN (torch.backends.mkldnn), "
            f"got {dtype} on {device}; use impl='auto' or 'python'"
        )
    return step_backend(batch_size, hidden_size, impl, device, dtype)


def uses_fused_kernel(nonlinearity: str, device: torch.device, impl: str = "auto") -> bool:
    """Whether :func:`rnn` hands this call to PyTorch's fused kernel (else the hand-written path)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid choices: {', '.join(IMPLS)}")
    fusable = nonlinearity in ("tanh", "relu")
    if impl == "fused":
        if not fusable:
            raise ValueError(
                f"impl='fused' needs nonlinearity 'tanh' or 'relu' (PyTorch has no fused kernel "
                f"for {nonlinearity!r}); use impl='auto' or 'python'"
            )
        return True
    if impl in ("python", "onednn", "numpy"):
        return False
    return fusable and device.type in FUSED_DEVICE_TYPES


def rnn(
    input: Tensor,
    hx: Tensor,
    weights: Sequence[LayerWeights],
    nonlinearity: str = "tanh",
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Functional stacked vanilla RNN (no input checks; :class:`RNN` validates).

    Args:
        input: (T, B, d) input sequence, or (T, B) integer symbols in ``[0, d)`` that stand for
            their one-hot vectors (the first layer then looks up its input weights, see
            :func:`one_hot_inputs`).
        hx: (L, B, N) initial hidden state of every layer.
        weights: one ``(w_ih, w_hh, b_ih, b_hh)`` per layer, ``w_ih`` (N, d_k), ``w_hh`` (N, N),
            biases (N,) or both None.
        nonlinearity: one of :data:`NONLINEARITIES`.
        impl: one of :data:`IMPLS` (see the module docstring).

    Returns:
        ``(output, h_n)``: (T, B, N) hidden states of the last layer and (L, B, N) final states.
    """
    _check_nonlinearity(nonlinearity)
    path = layer_path(nonlinearity, input.shape[1], hx.shape[2], input.device, weights[0][1].dtype, impl)
    logger.debug("rnn: %s, %s path on %s", nonlinearity, path, input.device)
    if path == "fused":
        input = one_hot_inputs(input, weights[0][0])
        has_bias = weights[0][2] is not None
        flat = [w for layer in weights for w in (layer if has_bias else layer[:2])]
        vf = torch._VF.rnn_tanh if nonlinearity == "tanh" else torch._VF.rnn_relu
        # The train flag matters even without dropout: on CUDA it selects cuDNN's training
        # forward, the only one whose result can be backpropagated.
        train = torch.is_grad_enabled()
        with quiet_cudnn_weight_warning(input.is_cuda):
            # (input, hx, weights, has_biases, num_layers, dropout, train, bidirectional,
            #  batch_first)
            output, h_n = vf(input, hx, flat, has_bias, len(weights), 0.0, train, False, False)
        return output, h_n
    layer_input = input
    h_n = []
    for (w_ih, w_hh, b_ih, b_hh), h0 in zip(weights, hx.unbind(0)):
        layer_input, h_last = _RNNLayerFunction.apply(
            layer_input, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, impl
        )
        h_n.append(h_last)
    return layer_input, torch.stack(h_n)


def one_hot_inputs(input: Tensor, w_ih: Tensor) -> Tensor:
    """``input`` as floats: (T, B) integer symbols become their one-hot vectors (T, B, d) in the
    dtype of ``w_ih`` (N, d); float inputs are returned as they are."""
    if input.is_floating_point():
        return input
    return F.one_hot(input, w_ih.shape[1]).to(w_ih.dtype)


def rnn_reference(
    input: Tensor, hx: Tensor, weights: Sequence[LayerWeights], nonlinearity: str = "tanh"
) -> tuple[Tensor, Tensor]:
    """The same computation as :func:`rnn` as a plain autograd loop: the definition the fast
    paths are tested against, and the naive baseline of the benchmark. Slow; not for training."""
    _check_nonlinearity(nonlinearity)
    input = one_hot_inputs(input, weights[0][0])
    f = {"tanh": torch.tanh, "relu": torch.relu, "elu": F.elu, "linear": lambda z: z}[nonlinearity]
    layer_input = input  # (T, B, d_k)
    h_n = []
    for (w_ih, w_hh, b_ih, b_hh), h in zip(weights, hx.unbind(0)):
        outputs = []
        for x_t in layer_input.unbind(0):  # x_t: (B, d_k)
            h = f(F.linear(x_t, w_ih, b_ih) + F.linear(h, w_hh, b_hh))  # (B, N)
            outputs.append(h)
        layer_input = torch.stack(outputs)  # (T, B, N)
        h_n.append(h)
    return layer_input, torch.stack(h_n)


class RNN(nn.Module):
    """Stacked vanilla RNN in the style of ``nn.RNN`` (sequence-first), for any activation.

    Args:
        input_size: number of input features d.
        hidden_size: number of hidden units N.
        num_layers: number of stacked layers L; layer k > 0 reads layer k-1's hidden states.
        nonlinearity: one of :data:`NONLINEARITIES`.
        bias: whether each layer has the biases ``b_ih`` and ``b_hh``.

    ``forward(input, hx=None)`` takes ``input`` (T, B, input_size), or (T, B) integer symbols in
    ``[0, input_size)`` standing for their one-hot vectors (looked up, see :func:`rnn`), and ``hx`` (L, B, N) or None
    (zeros) and returns ``(output, h_n)``: (T, B, N) states of the last layer, (L, B, N) final
    states. The attribute ``impl`` (one of :data:`IMPLS`, default ``"auto"``) picks the
    computation path; every path gives the same result up to rounding.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_nonlinearity(nonlinearity)
        for name, value in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.nonlinearity = nonlinearity
        self.bias = bool(bias)
        self.impl = "auto"
        # Registered in nn.RNN's order, so that the same seed gives the same initial weights.
        for k in range(num_layers):
            d_k = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(hidden_size, d_k)))
            self.register_parameter(
                f"weight_hh_l{k}", nn.Parameter(torch.empty(hidden_size, hidden_size))
            )
            if self.bias:
                self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(hidden_size)))
                self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default for recurrent layers: every weight and bias ~ U(-1/sqrt(N), 1/sqrt(N))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -bound, bound)

    def layer_weights(self) -> list[tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]]:
        """``(w_ih, w_hh, b_ih, b_hh)`` of every layer, looked up by name at call time so that a
        wrapper such as ``WeightDrop`` can substitute a tensor for a parameter."""
        layers = []
        for k in range(self.num_layers):
            if getattr(self, f"weight_hh_l{k}") is None:
                raise RuntimeError(
                    f"weight_hh_l{k} is None: this RNN is wrapped by WeightDrop, which sets the "
                    f"weight for each call; call the wrapper instead of its .module"
                )
            b_ih = getattr(self, f"bias_ih_l{k}") if self.bias else None
            b_hh = getattr(self, f"bias_hh_l{k}") if self.bias else None
            layers.append((getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}"), b_ih, b_hh))
        return layers

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        symbols = not (input.is_floating_point() or input.is_complex() or input.dtype == torch.bool)
        if symbols:
            if input.dim() != 2:
                raise ValueError(
                    f"RNN expects integer symbols of shape (T, B), got a {input.dim()}-D tensor "
                    f"of shape {tuple(input.shape)}"
                )
            input = input.long()
            T, B = input.shape
            lo, hi = (int(v) for v in torch.aminmax(input)) if input.numel() else (0, 0)
            if lo < 0 or hi >= self.input_size:
                raise ValueError(
                    f"RNN symbols must lie in [0, input_size) = [0, {self.input_size}), got "
                    f"values from {lo} to {hi}"
                )
        elif input.dim() != 3:
            raise ValueError(
                f"RNN expects input of shape (T, B, input_size), got a {input.dim()}-D tensor "
                f"of shape {tuple(input.shape)}"
            )
        else:
            T, B, d = input.shape
            if d != self.input_size:
                raise ValueError(
                    f"RNN expects input_size={self.input_size} features in input (T, B, input_size), "
                    f"got {d} (input shape {tuple(input.shape)})"
                )
        if T == 0:
            raise ValueError("RNN expects a sequence of at least one step, got T = 0")
        weights = self.layer_weights()
        dtype = weights[0][1].dtype
        if not symbols and input.dtype != dtype:
            raise ValueError(
                f"RNN input dtype {input.dtype} does not match the weight dtype {dtype}; "
                f"convert the input (input.to({dtype})) or the module (.to({input.dtype}))"
            )
        expected = (self.num_layers, B, self.hidden_size)
        if hx is None:
            hx = torch.zeros(expected, dtype=dtype, device=input.device)
        elif tuple(hx.shape) != expected:
            raise ValueError(
                f"RNN expects a hidden state of shape (num_layers, B, hidden_size) = {expected}, "
                f"got {tuple(hx.shape)}"
            )
        elif hx.dtype != dtype:
            raise ValueError(
                f"RNN hidden state dtype {hx.dtype} does not match the weight dtype {dtype}; "
                f"convert the hidden state (hx.to({dtype}))"
            )
        return rnn(input, hx, weights, self.nonlinearity, self.impl)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, nonlinearity={self.nonlinearity!r}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        return s


def build_rnn(
    rnn_type: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    nonlinearity: str = "tanh",
    bias: bool = True,
    window: int = 1,
    zoneout: float = 0.0,
) -> nn.Module:
    """The one place that builds a recurrent layer of any kind (sequence-first, no dropout).

    Args:
        rnn_type: one of :data:`RNN_TYPES`: ``"LSTM"`` -> ``nn.LSTM``, ``"GRU"`` -> ``nn.GRU``,
            ``"RNN"`` -> :class:`RNN` (vanilla, any of :data:`NONLINEARITIES`),
            ``"QRNN"`` -> :class:`awd_nonnormal.qrnn.QRNN` (one layer only).
        input_size, hidden_size, num_layers, bias: as in ``nn.LSTM``.
        nonlinearity: activation of the vanilla RNN; checked for every type, used only by ``RNN``.
        window, zoneout: the QRNN's convolution width (1 or 2) and zoneout; used only by ``QRNN``.
    """
    _check_nonlinearity(nonlinearity)
    if rnn_type == "QRNN":
        from .qrnn import QRNN

        if num_layers != 1:
            raise ValueError(f"a QRNN layer is built one layer at a time (num_layers=1), got {num_layers}")
        return QRNN(input_size, hidden_size, window=window, zoneout=zoneout, bias=bias)
    if rnn_type == "LSTM":
        return nn.LSTM(input_size, hidden_size, num_layers, bias=bias)
    if rnn_type == "GRU":
        return nn.GRU(input_size, hidden_size, num_layers, bias=bias)
    if rnn_type == "RNN":
        return RNN(input_size, hidden_size, num_layers, nonlinearity=nonlinearity, bias=bias)
    raise ValueError(f"unknown rnn_type {rnn_type!r}; valid choices: {', '.join(RNN_TYPES)}")


def init_hidden(
    rnn_type: str,
    num_layers: int,
    batch_size: int,
    hidden_size: int,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Zero initial state for a layer from :func:`build_rnn`: ``(h, c)`` for LSTM, ``h`` otherwise,
    each (num_layers, batch_size, hidden_size). For a QRNN that is the state of a window-1 layer;
    a window-2 layer's state comes from its own ``init_hidden``."""
    if rnn_type not in RNN_TYPES:
        raise ValueError(f"unknown rnn_type {rnn_type!r}; valid choices: {', '.join(RNN_TYPES)}")
    shape = (num_layers, batch_size, hidden_size)
    h = torch.zeros(shape, device=device, dtype=dtype)
    if rnn_type == "LSTM":
        return h, torch.zeros(shape, device=device, dtype=dtype)
    return h
