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
backpropagation through time (:class:`_RNNLayerFunction`): one ``addmm`` and one in-place
activation per step forward, one ``addmm`` and one multiply per step backward, and all the
input-side work (input projections, input and weight gradients) as single large matmuls over the
whole sequence. That path is pure Python on top of ``torch`` ops, so it runs on any device.

Which path runs is chosen per call by :func:`rnn` (``impl="auto"``): the fused kernel for tanh and
relu on CUDA (cuDNN), the hand-written one otherwise. On CPU the hand-written path measured faster
than PyTorch's own kernel for tanh and relu as well (``bench/rnn_speed.py``), so it is used there.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

NONLINEARITIES = ("tanh", "relu", "elu", "linear")
RNN_TYPES = ("LSTM", "GRU", "RNN")
IMPLS = ("auto", "fused", "python")
"""``auto``: the fastest exact path for the device; ``fused``: PyTorch's kernel (tanh and relu
only); ``python``: the hand-written backpropagation through time (every activation, any device)."""

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
# Activations for the hand-written path. The forward pass applies f in place on the step's slice
# of the output buffer; the backward pass needs f'(z) and gets it from h = f(z) alone, so the
# pre-activations never have to be stored.


def _elu_(z: Tensor) -> Tensor:
    return F.elu(z, inplace=True)


_ACTIVATIONS_IN_PLACE: dict[str, Optional[Callable[[Tensor], Tensor]]] = {
    "tanh": torch.Tensor.tanh_,
    "relu": torch.Tensor.relu_,
    "elu": _elu_,
    "linear": None,
}


def _derivative_from_output(h: Tensor, nonlinearity: str) -> Optional[Tensor]:
    """f'(z) written in terms of h = f(z), for all steps at once; None for linear (f' = 1)."""
    if nonlinearity == "tanh":
        return h.mul(h).neg_().add_(1)  # tanh'(z) = 1 - tanh(z)^2
    if nonlinearity == "relu":
        # relu'(z) = [z > 0] = [h > 0] = sign(h) as h >= 0 (one op, no bool temporary); 0 at the
        # kink, like torch.relu.
        return torch.sign(h)
    if nonlinearity == "elu":
        # elu(z) = z for z > 0, exp(z) - 1 otherwise (Clevert et al. 2016, alpha = 1), so
        # elu'(z) = 1 for z > 0 and exp(z) = h + 1 otherwise: both are min(h, 0) + 1.
        return h.clamp(max=0).add_(1)
    return None


class _RNNLayerFunction(torch.autograd.Function):
    """One vanilla RNN layer over a whole sequence, with backpropagation through time by hand.

    Autograd records a single node for the layer instead of several per step. Inside ``forward``
    and ``backward`` autograd is off, so per-step work is done in place on slices of plain buffers
    (no per-step graph nodes, no ``SelectBackward`` zero-filled copies).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,  # (T, B, d)
        h0: Tensor,  # (B, N)
        w_ih: Tensor,  # (N, d)
        w_hh: Tensor,  # (N, N)
        b_ih: Optional[Tensor],  # (N,)
        b_hh: Optional[Tensor],  # (N,)
        nonlinearity: str,
    ) -> tuple[Tensor, Tensor]:
        # Under autocast the loop runs in the weights' dtype: autocast would cast the matmuls
        # but not the in-place steps that follow them.
        with torch.autocast(x.device.type, enabled=False):
            return _RNNLayerFunction._forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity)

    @staticmethod
    def _forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity):
        T, B, d = x.shape
        N = w_hh.shape[0]
        # Input projections of every step with one matmul: u_t = W_ih x_t + b_ih + b_hh.
        # The buffer then holds z_t and, after the activation, h_t: the output (T, B, N).
        x2 = x.reshape(T * B, d)  # (T*B, d)
        if b_ih is not None:
            h = torch.addmm(b_ih + b_hh, x2, w_ih.t())  # (T*B, N)
        else:
            h = torch.mm(x2, w_ih.t())  # (T*B, N)
        h = h.view(T, B, N)
        activate_ = _ACTIVATIONS_IN_PLACE[nonlinearity]
        w_hh_t = w_hh.t()  # (N, N); h_{t-1} W_hh^T is W_hh h_{t-1} for row vectors
        h_prev = h0  # (B, N)
        for h_t in h.unbind(0):  # h_t: (B, N) view into the buffer
            h_t.addmm_(h_prev, w_hh_t)  # z_t = u_t + W_hh h_{t-1}
            if activate_ is not None:
                activate_(h_t)  # h_t = f(z_t)
            h_prev = h_t
        ctx.save_for_backward(x, h0, w_ih, w_hh, h)
        ctx.nonlinearity = nonlinearity
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
        d = x.shape[2]
        # delta_t = dL/dz_t, backwards through time (Werbos 1990):
        #   g_t     = dL/dh_t = grad_h[t] + W_hh^T delta_{t+1}   (+ grad of h_n at t = T-1)
        #   delta_t = g_t * f'(z_t)
        # The buffer first holds f'(z_t) for all t (one vectorised op) and is overwritten by
        # delta_t step by step.
        delta = _derivative_from_output(h, ctx.nonlinearity)  # (T, B, N)
        linear = delta is None
        if linear:
            delta = torch.empty_like(h)
        g = h0.new_empty(B, N)  # dL/dh_t of the current step, reused
        deltas = delta.unbind(0)
        grads_h = grad_h.unbind(0)
        for t in range(T - 1, -1, -1):
            out = deltas[t] if linear else g
            if t == T - 1:
                torch.add(grads_h[t], grad_hn, out=out)
            else:
                torch.addmm(grads_h[t], deltas[t + 1], w_hh, out=out)  # delta_{t+1} W_hh (rows)
            if not linear:
                deltas[t].mul_(g)

        # Everything else is one matmul over all T*B rows.
        delta2 = delta.view(T * B, N)  # (T*B, N)
        need_x, need_h0, need_wih, need_whh, need_bih, need_bhh, _ = ctx.needs_input_grad
        grad_x = grad_h0 = grad_wih = grad_whh = grad_bih = grad_bhh = None
        if need_x:
            grad_x = torch.mm(delta2, w_ih).view(T, B, d)  # dL/dx_t = W_ih^T delta_t
        if need_h0:
            grad_h0 = torch.mm(deltas[0], w_hh)  # dL/dh_0 = W_hh^T delta_1
        if need_wih:
            grad_wih = torch.mm(delta2.t(), x.reshape(T * B, d))  # sum_t delta_t x_t^T  (N, d)
        if need_whh:
            grad_whh = torch.mm(deltas[0].t(), h0)  # sum_t delta_t h_{t-1}^T  (N, N)
            if T > 1:
                grad_whh.addmm_(delta[1:].reshape(-1, N).t(), h[:-1].reshape(-1, N))
        if ctx.has_bias and (need_bih or need_bhh):
            grad_b = delta2.sum(0)  # (N,)
            grad_bih = grad_b if need_bih else None
            # Separate tensors: the two .grad fields must not alias each other.
            grad_bhh = (grad_b.clone() if need_bih else grad_b) if need_bhh else None
        return grad_x, grad_h0, grad_wih, grad_whh, grad_bih, grad_bhh, None


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
    if impl == "python":
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
        input: (T, B, d) input sequence.
        hx: (L, B, N) initial hidden state of every layer.
        weights: one ``(w_ih, w_hh, b_ih, b_hh)`` per layer, ``w_ih`` (N, d_k), ``w_hh`` (N, N),
            biases (N,) or both None.
        nonlinearity: one of :data:`NONLINEARITIES`.
        impl: one of :data:`IMPLS` (see the module docstring).

    Returns:
        ``(output, h_n)``: (T, B, N) hidden states of the last layer and (L, B, N) final states.
    """
    _check_nonlinearity(nonlinearity)
    fused = uses_fused_kernel(nonlinearity, input.device, impl)
    logger.debug("rnn: %s, %s path on %s", nonlinearity, "fused" if fused else "python", input.device)
    if fused:
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
            layer_input, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity
        )
        h_n.append(h_last)
    return layer_input, torch.stack(h_n)


def rnn_reference(
    input: Tensor, hx: Tensor, weights: Sequence[LayerWeights], nonlinearity: str = "tanh"
) -> tuple[Tensor, Tensor]:
    """The same computation as :func:`rnn` as a plain autograd loop: the definition the fast
    paths are tested against, and the naive baseline of the benchmark. Slow; not for training."""
    _check_nonlinearity(nonlinearity)
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

    ``forward(input, hx=None)`` takes ``input`` (T, B, input_size) and ``hx`` (L, B, N) or None
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
        if input.dim() != 3:
            raise ValueError(
                f"RNN expects input of shape (T, B, input_size), got a {input.dim()}-D tensor "
                f"of shape {tuple(input.shape)}"
            )
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
        if input.dtype != dtype:
            raise ValueError(
                f"RNN input dtype {input.dtype} does not match the weight dtype {dtype}; "
                f"convert the input (input.to({dtype})) or the module (.to({input.dtype}))"
            )
        expected = (self.num_layers, B, self.hidden_size)
        if hx is None:
            hx = input.new_zeros(expected)
        elif tuple(hx.shape) != expected:
            raise ValueError(
                f"RNN expects a hidden state of shape (num_layers, B, hidden_size) = {expected}, "
                f"got {tuple(hx.shape)}"
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
) -> nn.Module:
    """The one place that builds a recurrent layer of any kind (sequence-first, no dropout).

    Args:
        rnn_type: one of :data:`RNN_TYPES`: ``"LSTM"`` -> ``nn.LSTM``, ``"GRU"`` -> ``nn.GRU``,
            ``"RNN"`` -> :class:`RNN` (vanilla, any of :data:`NONLINEARITIES`).
        input_size, hidden_size, num_layers, bias: as in ``nn.LSTM``.
        nonlinearity: activation of the vanilla RNN; checked for every type, used only by ``RNN``.
    """
    _check_nonlinearity(nonlinearity)
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
    each (num_layers, batch_size, hidden_size)."""
    if rnn_type not in RNN_TYPES:
        raise ValueError(f"unknown rnn_type {rnn_type!r}; valid choices: {', '.join(RNN_TYPES)}")
    shape = (num_layers, batch_size, hidden_size)
    h = torch.zeros(shape, device=device, dtype=dtype)
    if rnn_type == "LSTM":
        return h, torch.zeros(shape, device=device, dtype=dtype)
    return h
