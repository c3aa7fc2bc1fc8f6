"""The training rules of the paper's Keras 2.2 code for the experiments of its section 3.1.1,
as pure functions.

* Gradient-norm clipping. Keras 2.2 (``keras.optimizers.Optimizer.get_gradients``, the standalone
  Keras the paper's ``train.py`` imports) computes ONE norm over all gradients,
  ``n = sqrt(sum_k ||g_k||^2)``, and scales every tensor by ``c / max(n, c)`` (``global``).
  tf.keras later clipped each tensor by its own norm (``tensor``). Both use the formula
  ``g * c / max(n, c)``, so a norm at or below ``c`` leaves the gradient as it is.
* The overflow verdict. When the squared norm overflows float32 the norm is ``inf`` and Keras'
  scale ``c / inf`` is 0: the step moves nothing. Here a non-finite norm (any tensor's, in
  ``tensor`` mode) sets every gradient to exactly 0 (an ``inf`` or NaN gradient times 0 would be
  NaN), so that no tensor moves in that step.
* The loss. Keras 2.2's ``categorical_crossentropy`` clips the softmax output to
  ``[1e-7, 1 - 1e-7]`` before the log (``keras``): a step costs at most ``-log(1e-7) = 16.1``
  nats, and a step whose target probability is clipped passes no gradient. ``exact`` is the plain
  cross-entropy of the logits.
* One bias. Keras' ``SimpleRNN`` has one bias vector, PyTorch's layers two (``b_ih``, ``b_hh``),
  which receive the same gradient, so under RMSprop their sum moves twice as fast.
  :func:`single_bias_` freezes ``b_hh`` at zero and leaves ``b_ih`` as the layer's one bias.

Every function is pure or acts in place on what it is given, and the clipping and loss functions
take an optional leading member axis (``members=True``: tensors of shape ``(M, ...)``, one model
per member), so that a batched ensemble applies the same rules to each member on its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..init import recurrent_layers

__all__ = ["CLIP_MODES", "LOSSES", "BIASES", "KERAS_EPSILON", "ClipResult", "grad_sq_norms",
           "clip_gradients_", "classification_loss", "single_bias_", "RMSprop"]

#: ``global``: Keras 2.2's one norm over all gradients; ``tensor``: tf.keras's norm per tensor;
#: ``none``: no scaling (the overflow verdict still applies).
CLIP_MODES = ("global", "tensor", "none")
#: ``exact``: cross-entropy of the logits; ``keras``: Keras 2.2's clipped-softmax cross-entropy.
LOSSES = ("exact", "keras")
#: Trainable biases per vanilla RNN layer: 1 as Keras' SimpleRNN, 2 as PyTorch's layers.
BIASES = (1, 2)
#: Keras' ``K.epsilon()``: the softmax is clipped to ``[KERAS_EPSILON, 1 - KERAS_EPSILON]``.
KERAS_EPSILON = 1e-7


@dataclass(frozen=True)
class ClipResult:
    """What :func:`clip_gradients_` saw: the norm before clipping (the global norm, or the largest
    tensor norm; ``()`` or ``(M,)`` with members) and whether it overflowed (same shape, bool).
    Where ``overflow`` is true every gradient was set to 0."""
    norm: Tensor
    overflow: Tensor


def grad_sq_norms(grads: Sequence[Tensor], members: bool = False) -> Tensor:
    """Squared L2 norm of each gradient, summed in the gradient's dtype as Keras does
    (``K.sum(K.square(g))``, so that it overflows where Keras' does): ``(K,)``, or ``(K, M)`` with
    a leading member axis."""
    if not grads:
        raise ValueError("no gradients to measure")
    dtype = functools.reduce(torch.promote_types, [g.dtype for g in grads])
    if members:
        sums = [g.square().reshape(g.shape[0], -1).sum(1) for g in grads]  # (M,) each
    else:
        sums = [g.square().sum() for g in grads]
    return torch.stack([s.to(dtype) for s in sums])  # (K,) or (K, M)


def _per_member(scale: Tensor, g: Tensor, members: bool) -> Tensor:
    """``scale`` ((), or (M,)) shaped to broadcast over ``g`` ((M, ...) with members)."""
    return scale.reshape(scale.shape + (1,) * (g.dim() - 1)) if members else scale


def clip_gradients_(grads: Sequence[Tensor], max_norm: float, mode: str = "global",
                    members: bool = False) -> ClipResult:
    """Clip ``grads`` in place by Keras' rule ``g <- g * c / max(n, c)`` with ``c = max_norm`` and
    ``n`` the global norm (``global``) or each tensor's own norm (``tensor``); ``none`` does not scale.

    With ``members`` every tensor has a leading member axis ``(M, ...)`` and each member is
    clipped by its own norm(s). A member whose norm is not finite gets all its gradients set to
    exactly 0 (the overflow verdict). Returns the norm before clipping and the verdict.
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"unknown clip mode {mode!r}; valid: {', '.join(CLIP_MODES)}")
    if mode != "none" and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    grads = list(grads)
    with torch.no_grad():
        sq = grad_sq_norms(grads, members)  # (K,) or (K, M)
        if mode == "global" and not members:
            # One norm, one verdict: every tensor zeroed, scaled by one factor (one foreach call),
            # or, at or under the limit, left as it is (the factor would be exactly 1).
            norm = sq.sum().sqrt()
            overflow = ~torch.isfinite(norm)
            if bool(overflow):
                torch._foreach_zero_(grads)
            elif float(norm) > max_norm:
                torch._foreach_mul_(grads, max_norm / norm)
            return ClipResult(norm, overflow)
        if mode == "none":
            norm = sq.sum(0).sqrt()
            scales = [torch.ones_like(norm)] * len(grads)
            overflow = ~torch.isfinite(norm)
        elif mode == "global":
            norm = sq.sum(0).sqrt()                                   # () or (M,)
            scales = [max_norm / norm.clamp(min=max_norm)] * len(grads)  # Keras: c / max(n, c)
            overflow = ~torch.isfinite(norm)
        else:
            norms = sq.sqrt()                                         # (K,) or (K, M)
            scales = list(max_norm / norms.clamp(min=max_norm))
            overflow = ~torch.isfinite(norms).all(0)
            norm = norms.max(0).values
        for g, scale in zip(grads, scales):
            keep = _per_member(~overflow, g, members)
            g.copy_(torch.where(keep, g * _per_member(scale, g, members).to(g.dtype),
                                torch.zeros((), dtype=g.dtype, device=g.device)))
    return ClipResult(norm, overflow)


def classification_loss(logits: Tensor, target: Tensor, loss: str = "exact") -> Tensor:
    """Per-step cross-entropy, unreduced: ``logits (..., C)``, integer ``target (...)`` -> ``(...)``
    (any leading axes, a member axis included).

    ``exact``: ``-log softmax(logits)[target]``. ``keras``: Keras 2.2's
    ``-log(clip(softmax(logits)[target], 1e-7, 1 - 1e-7))`` (``keras.backend.categorical_crossentropy``),
    at most 16.12 nats, with no gradient where the clip is active.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    classes_first = logits.movedim(-1, 0)  # (C, ...)
    if classes_first.is_contiguous() and logits.dim() > 1:
        # Logits stored class-first (TaskModel's read-out of every step): the softmax runs over
        # the leading axis, along contiguous rows of all steps, many times faster than over
        # rows of C = 9 or 10 values. The same numbers up to rounding.
        if loss == "exact":
            return F.cross_entropy(classes_first.unsqueeze(0), target.unsqueeze(0),
                                   reduction="none").squeeze(0)
        p = torch.softmax(classes_first, dim=0).gather(0, target.unsqueeze(0)).squeeze(0)  # (...)
        return -torch.log(p.clamp(KERAS_EPSILON, 1.0 - KERAS_EPSILON))
    if loss == "exact":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               reduction="none").reshape(target.shape)
    p = torch.softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (...)
    return -torch.log(p.clamp(KERAS_EPSILON, 1.0 - KERAS_EPSILON))


def single_bias_(rnn: nn.Module) -> nn.Module:
    """Give every layer of a vanilla RNN one trainable bias, as Keras' ``SimpleRNN``: ``b_hh`` is
    set to 0 and frozen (``requires_grad=False``), ``b_ih`` is the layer's bias. The parameters
    keep their names and shapes, so state_dicts and checkpoints read as before. Returns ``rnn``."""
    layers = list(recurrent_layers(rnn))
    if not layers:
        raise ValueError(f"{type(rnn).__name__} holds no recurrent layer")
    for layer in layers:
        if layer.bias_ih is None or layer.bias_hh is None:
            raise ValueError(f"{layer.name}: the layer has no biases to merge")
        with torch.no_grad():
            layer.bias_hh.zero_()
        layer.bias_hh.requires_grad_(False)
    return rnn


class RMSprop(torch.optim.RMSprop):
    """``torch.optim.RMSprop`` with a leaner step for the plain case the task trainer uses (no
    momentum, not centred, no weight decay, not maximising, a float learning rate, float32 or
    float64 parameters with dense gradients, each listed once): s <- rho s + (1 - rho) g^2; p <- p - lr g / (sqrt(s) + eps) (Hinton's lecture
    6e; eps outside the root, as torch and Keras 2.2 place it), as five ``torch._foreach_*``
    calls over all parameters instead of torch's per-parameter loop. The same ops in the same
    order, so on CPU (where the tests check it) the parameters and the state (``step``,
    ``square_avg``) are bitwise those of ``torch.optim.RMSprop``; the state dict is the same on
    every device. Any other case is torch's own step.

    Why: a copy-task step spends 0.3-0.4 ms in ``torch.optim.RMSprop.step`` for five small
    tensors, nearly all of it Python and dispatch (80 us when timed alone, more after a
    backward pass has taken the caches); this step takes 0.17 ms there (one process, one thread,
    medians of 45 steps; ``bench/rnn_speed.py --task-step``)."""

    @staticmethod
    def _plain(group: dict) -> bool:
        """Whether ``group`` takes the lean step: torch's options at their plain values, float32
        or float64 parameters with dense gradients (for half types a foreach multiply by a
        float rounds differently), each listed once (torch updates a repeated one twice in
        turn)."""
        params = [p for p in group["params"] if p.grad is not None]
        return (group["momentum"] == 0 and not group["centered"] and group["weight_decay"] == 0
                and not group["maximize"] and not group["differentiable"]
                and not group["capturable"] and not isinstance(group["lr"], Tensor)
                and all(p.dtype in (torch.float32, torch.float64) and not p.grad.is_sparse
                        for p in params)
                and len({id(p) for p in params}) == len(params))

    def step(self, closure=None):
        if closure is not None or not all(self._plain(g) for g in self.param_groups):
            # torch's own step, without the hook wrapper it may carry: this class's step
            # already has one, and the hooks must run once
            torch_step = torch.optim.RMSprop.step
            if getattr(torch_step, "hooked", False):
                torch_step = torch_step.__wrapped__
            return torch_step(self, closure)
        with torch.no_grad():
            self._lean_step()
        return None

    def _lean_step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            steps, square_avgs = [], []
            for p in params:
                state = self.state[p]
                if len(state) == 0:  # as torch.optim.RMSprop initialises it
                    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                    state["step"] = torch.zeros((), dtype=dtype)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                steps.append(state["step"])
                square_avgs.append(state["square_avg"])
            alpha, eps, lr = group["alpha"], group["eps"], group["lr"]
            torch._foreach_add_(steps, 1)
            torch._foreach_mul_(square_avgs, alpha)
            torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)
            avgs = torch._foreach_sqrt(square_avgs)
            torch._foreach_add_(avgs, eps)
            torch._foreach_addcdiv_(params, grads, avgs, value=-lr)
