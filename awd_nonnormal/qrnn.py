"""The quasi-recurrent layer (QRNN; Bradbury, Merity, Xiong & Socher 2017) in pure PyTorch, as
AWD-LSTM uses it (``--model QRNN``; Merity, Keskar & Socher 2018 trained it on WikiText-103).

One layer over a sequence ``x`` (T, B, d), with ``window`` k = 1 or 2 (Bradbury et al. 2017,
eqs. 1-3 and the fo-pooling of section 2.1)::

    s_t = [x_t ; x_{t-1}]                 (k = 2; s_t = x_t for k = 1)
    z_t = tanh(W_z s_t + b_z)     f_t = sigmoid(W_f s_t + b_f)     o_t = sigmoid(W_o s_t + b_o)
    c_t = f_t * c_{t-1} + (1 - f_t) * z_t
    h_t = o_t * c_t

The three gate blocks are stacked on the rows of one matrix ``weight_ih_l0`` (3N, k*d), in the
order ``z f o``; there is no hidden-to-hidden matrix, the recurrence is the element-wise
fo-pooling. AWD-LSTM uses window 2 in the first layer and 1 in the others, and applies its
``--wdrop`` as DropConnect on these gate weights (the model wraps the layer in
:class:`~awd_nonnormal.regularize.WeightDrop` on ``weight_ih_l0``), with zoneout 0.

Zoneout (Krueger et al. 2017, as the QRNN paper applies it, eq. 4: ``F = 1 - dropout(1 - f)``):
in training each unit keeps its previous cell with probability ``zoneout`` (its ``1 - f_t`` is
set to 0, unscaled); in evaluation ``1 - f_t`` is multiplied by ``1 - zoneout``, its expectation.

The state of a window-1 layer is ``c`` (1, B, N); a window-2 layer also carries the last input
``x_{T-1}`` (1, B, d) to the next call, as torchqrnn's ``save_prev_x``: ``(c, x_prev)``.

fo-pooling runs as a hand-written autograd function (:class:`_FoPool`): one fused multiply-add per
step forward, one per step backward, the gate gradients as whole-sequence element-wise products;
it is plain ``torch`` code, so it runs on CPU and CUDA alike.

Initializers: the non-normal initializers set a hidden-to-hidden matrix, which a QRNN does not
have. :func:`qrnn_input_init` accepts ``plain`` (PyTorch's default, kept as drawn) and the
input-block initializers (``normal``, ``source``, ``zeros`` and registered plug-ins of that kind),
as the base or as ``input=NAME``; anything else is refused with that list.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .init import InitSpecError, _REGISTRY, _call, _route, available, gain_param, parse_spec

logger = logging.getLogger(__name__)

__all__ = ["QRNN", "QRNN_GATES", "fo_pool", "qrnn_input_init", "apply_qrnn_init", "qrnn_initializers"]

#: The gate blocks of ``weight_ih_l0``, in row order.
QRNN_GATES = ("z", "f", "o")

QRNNHidden = Union[Tensor, Tuple[Tensor, Tensor]]


class _FoPool(torch.autograd.Function):
    """``c_t = f_t * c_{t-1} + (1 - f_t) * z_t`` over t, with the backward pass written out:

    ``g_t = dL/dc_t = grad_c[t] + f_{t+1} * g_{t+1}``; ``dL/df_t = g_t * (c_{t-1} - z_t)``;
    ``dL/dz_t = g_t * (1 - f_t)``; ``dL/dc_0 = f_1 * g_1`` (indices from 1 as in the paper).
    """

    @staticmethod
    def forward(ctx, f: Tensor, z: Tensor, c0: Tensor) -> Tensor:  # (T, B, N), (T, B, N), (B, N)
        with torch.autocast(f.device.type, enabled=False):
            c = torch.mul(1 - f, z)  # (T, B, N): (1 - f_t) z_t, then c_t in place
            prev = c0
            for c_t, f_t in zip(c.unbind(0), f.unbind(0)):
                c_t.addcmul_(f_t, prev)
                prev = c_t
            ctx.save_for_backward(f, z, c0, c)
        return c

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_c: Tensor):
        f, z, c0, c = ctx.saved_tensors
        with torch.autocast(f.device.type, enabled=False):
            g = grad_c.clone()  # (T, B, N): becomes dL/dc_t
            gs, fs = g.unbind(0), f.unbind(0)
            for t in range(g.size(0) - 2, -1, -1):
                gs[t].addcmul_(fs[t + 1], gs[t + 1])
            c_prev = torch.cat([c0.unsqueeze(0), c[:-1]], 0)  # (T, B, N): c_{t-1}
            grad_f = g * (c_prev - z)
            grad_z = g * (1 - f)
            grad_c0 = fs[0] * gs[0]
        return grad_f, grad_z, grad_c0


def fo_pool(f: Tensor, z: Tensor, c0: Tensor) -> Tensor:
    """fo-pooling (Bradbury et al. 2017, section 2.1): the cells ``c`` (T, B, N) of
    ``c_t = f_t * c_{t-1} + (1 - f_t) * z_t`` from forget gates ``f`` and candidates ``z``
    (T, B, N) and the initial cell ``c0`` (B, N)."""
    if f.shape != z.shape or f.dim() != 3 or tuple(c0.shape) != tuple(f.shape[1:]):
        raise ValueError(f"fo_pool expects f and z of shape (T, B, N) and c0 (B, N), got "
                         f"{tuple(f.shape)}, {tuple(z.shape)}, {tuple(c0.shape)}")
    return _FoPool.apply(f, z, c0)


class QRNN(nn.Module):
    """One QRNN layer with fo-pooling and an output gate (see the module docstring).

    Args:
        input_size: features d of the input (T, B, d).
        hidden_size: units N.
        window: convolution width over time, 1 or 2 (AWD-LSTM: 2 in the first layer, 1 after).
        zoneout: probability that a unit keeps its previous cell at a step, in [0, 1).
        bias: learn the gate biases ``bias_ih_l0`` (3N,).
    """

    def __init__(self, input_size: int, hidden_size: int, window: int = 1, zoneout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        if window not in (1, 2):
            raise ValueError(f"QRNN window must be 1 or 2, got {window!r}")
        if not 0.0 <= float(zoneout) < 1.0:
            raise ValueError(f"QRNN zoneout must be in [0, 1), got {zoneout!r}")
        self.input_size, self.hidden_size, self.window = input_size, hidden_size, window
        self.zoneout = float(zoneout)
        self.bias = bias
        self.weight_ih_l0 = nn.Parameter(torch.empty(3 * hidden_size, window * input_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(3 * hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = k*d (the
        gate projection is the linear layer of torchqrnn's QRNNLayer)."""
        bound = 1.0 / math.sqrt(self.weight_ih_l0.size(1))
        with torch.no_grad():
            self.weight_ih_l0.uniform_(-bound, bound)
            if self.bias_ih_l0 is not None:
                self.bias_ih_l0.uniform_(-bound, bound)

    def init_hidden(self, batch_size: int, device=None, dtype=None) -> QRNNHidden:
        """A zero state: ``c`` (1, B, N), with ``x_prev`` (1, B, d) for window 2."""
        c = torch.zeros(1, batch_size, self.hidden_size, device=device, dtype=dtype)
        if self.window == 1:
            return c
        return c, torch.zeros(1, batch_size, self.input_size, device=device, dtype=dtype)

    def forward(self, input: Tensor, hidden: Optional[QRNNHidden] = None) -> Tuple[Tensor, QRNNHidden]:
        T, B, d = input.shape
        if d != self.input_size:
            raise ValueError(f"QRNN expects input_size={self.input_size} features in input (T, B, d), "
                             f"got shape {tuple(input.shape)}")
        if hidden is None:
            hidden = self.init_hidden(B, device=input.device, dtype=input.dtype)
        if self.window == 2:
            if not isinstance(hidden, (tuple, list)) or len(hidden) != 2:
                raise ValueError("a window-2 QRNN layer takes the state (c, x_prev)")
            c0, x_prev = hidden
            shifted = torch.cat([x_prev, input[:-1]], 0)  # (T, B, d): x_{t-1}
            source = torch.cat([input, shifted], 2)  # (T, B, 2d): [x_t ; x_{t-1}]
        else:
            c0 = hidden[0] if isinstance(hidden, (tuple, list)) else hidden
            source = input
        gates = F.linear(source, self.weight_ih_l0, self.bias_ih_l0)  # (T, B, 3N)
        z, f, o = gates.chunk(3, dim=2)  # (T, B, N) each
        z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
        if self.zoneout > 0:  # QRNN paper eq. 4: 1 - f is dropped, unscaled
            if self.training:
                keep = torch.empty_like(f).bernoulli_(1.0 - self.zoneout)
                f = 1 - keep * (1 - f)
            else:
                f = 1 - (1.0 - self.zoneout) * (1 - f)
        c = fo_pool(f, z, c0.reshape(B, self.hidden_size))  # (T, B, N)
        h = o * c  # (T, B, N)
        c_last = c[-1:]  # (1, B, N)
        if self.window == 2:
            return h, (c_last, input[-1:])
        return h, c_last

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, window={self.window}"
        if self.zoneout:
            s += f", zoneout={self.zoneout}"
        if not self.bias:
            s += ", bias=False"
        return s


# --------------------------------------------------------------------------------------------
# Initializers


def qrnn_initializers() -> List[str]:
    """The initializer names a QRNN accepts: ``plain`` and every input-block initializer."""
    inputs = sorted(n for n, e in _REGISTRY.items() if e.input_init is None)
    return ["plain"] + inputs


def _refuse(name: str) -> InitSpecError:
    return InitSpecError(
        f"init {name!r} does not apply to --model QRNN: it sets a hidden-to-hidden matrix, and a "
        f"QRNN has none (its recurrence is the element-wise fo-pooling). A QRNN takes: "
        f"{', '.join(qrnn_initializers())} (as --init NAME or --init input=NAME; all initializers: "
        f"{', '.join(available())})")


def qrnn_input_init(spec: str, **params: float) -> Optional[Tuple[str, Dict[str, float]]]:
    """Resolve an init spec for a QRNN: ``None`` for ``plain`` (keep PyTorch's draws), else the
    input-block initializer and its parameters for every gate block. Raises InitSpecError (a
    ValueError) naming what works for anything that needs a hidden-to-hidden matrix."""
    parsed = parse_spec(spec)
    if parsed.gates:
        raise InitSpecError(f"init spec {spec!r} sets gate(s) {', '.join(sorted(parsed.gates))}: a QRNN "
                            f"has no hidden-to-hidden matrix to initialise per gate; it takes: "
                            f"{', '.join(qrnn_initializers())} (as --init NAME or --init input=NAME)")
    accepted = qrnn_initializers()
    base = parsed.base
    if base is not None and base not in accepted:
        raise _refuse(base)
    if parsed.input is not None:
        name, spec_params = parsed.input[0], dict(parsed.input[1])
    elif base is not None:
        name, spec_params = base, dict(parsed.base_params)
    else:
        name, spec_params = "plain", {}
    if name not in accepted:
        raise _refuse(name)
    if name == "plain":
        if params:
            raise InitSpecError(f"parameter(s) {', '.join(sorted(params))} not accepted by plain "
                                f"(a QRNN's default initialisation)")
        return None
    routed = _route(name, params)
    unused = [k for k in params if k not in routed and not (k == "scale" and gain_param(name))]
    if unused:
        raise InitSpecError(f"parameter(s) {', '.join(sorted(unused))} not accepted by {name!r}")
    routed.update(_route(name, spec_params))
    return name, routed


def apply_qrnn_init(layer: QRNN, spec: str, *, zero_bias: bool = False,
                    generator: Optional[torch.Generator] = None, **params: float) -> QRNN:
    """Initialise a QRNN layer's gate blocks (z, f, o; each (N, k*d)) by ``spec`` (see
    :func:`qrnn_input_init`); ``zero_bias`` sets the gate biases to 0."""
    resolved = qrnn_input_init(spec, **params)
    with torch.no_grad():
        if resolved is not None:
            name, kwargs = resolved
            for block in layer.weight_ih_l0.chunk(len(QRNN_GATES), dim=0):  # (N, k*d) views
                _call(name, block, kwargs, generator)
        if zero_bias and layer.bias_ih_l0 is not None:
            layer.bias_ih_l0.zero_()
    return layer
