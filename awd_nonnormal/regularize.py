"""AWD-LSTM's regularisers as small modules (Merity, Keskar & Socher 2018, "Regularizing and
Optimizing LSTM Language Models"), written for current PyTorch.

* :class:`WeightDrop`: DropConnect (Wan et al. 2013) on the hidden-to-hidden weights of a
  recurrent layer, one mask per forward pass shared by every time step (``--wdrop``).
* :class:`LockedDropout`: variational dropout (Gal & Ghahramani 2016), one mask per sequence shared
  over time (``--dropouti``, ``--dropouth``, ``--dropout``).
* :func:`embedded_dropout`: drops whole word vectors of an embedding (Gal & Ghahramani 2016),
  so a dropped word is dropped everywhere in the batch (``--dropoute``).

Each draws its mask in training mode only; in eval mode they compute the undropped function.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .init import HH_PATTERN
from .rnn import quiet_cudnn_weight_warning

__all__ = ["WeightDrop", "LockedDropout", "embedded_dropout"]



def _check_p(p: float, what: str) -> float:
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{what}: dropout probability p must be in [0, 1), got {p}")
    return p



def _is_own_hh(name: str) -> bool:
    """``weight_hh_l{k}`` (or ``..._reverse``) of the module itself (no prefix, not raw)."""
    m = HH_PATTERN.match(name)
    return m is not None and not m["prefix"] and not m["raw"]

class WeightDrop(nn.Module):
    """DropConnect on a recurrent layer's hidden-to-hidden weights (Wan et al. 2013; AWD-LSTM).

    Every forward pass in training mode draws a fresh Bernoulli mask over each listed weight
    matrix and scales the kept entries by 1/(1-p) (``F.dropout`` on the weight); the same dropped
    matrix is used at every time step of that pass. In eval mode the raw weight is used as is.

    The wrapped module's parameter ``name`` is moved to this wrapper as ``f"{name}_raw"`` (the
    name AWD-LSTM uses), so a state_dict holds ``weight_hh_l0_raw`` next to
    ``module.weight_ih_l0`` etc. and gradients reach the raw weight through the dropout. For each
    call the wrapped module gets the dropped weight as a plain tensor attribute, which is reset to
    None afterwards so the module holds no per-call tensor between calls (``deepcopy``, ``.to()``
    and pickling keep working). Call the wrapper, not ``wrapper.module``.

    Works for :class:`awd_nonnormal.rnn.RNN`, ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` with any
    number of layers. No ``flatten_parameters`` patching is needed: on CUDA cuDNN copies the
    non-contiguous weights into its own buffer for the call (as it must, since the weight changes
    every call) and its warning about that copy is filtered for the call only.

    Args:
        module: the recurrent layer to wrap.
        p: probability of dropping each weight entry, in [0, 1).
        weights: names of direct parameters of ``module`` to drop; default every
            ``weight_hh_l{k}`` (and ``weight_hh_l{k}_reverse``) of ``module``.
    """

    def __init__(self, module: nn.Module, p: float, weights: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.p = _check_p(p, "WeightDrop")
        own = dict(module.named_parameters(recurse=False))
        if weights is None:
            weights = [name for name in own if _is_own_hh(name)]
            if not weights:
                raise ValueError(
                    f"WeightDrop: {type(module).__name__} has no weight_hh_l<k> parameter; "
                    f"its parameters are: {', '.join(own) or '(none)'}"
                )
        elif isinstance(weights, str):
            weights = [weights]
        weights = list(weights)
        for name in weights:
            if name not in own:
                raise ValueError(
                    f"WeightDrop: {type(module).__name__} has no parameter {name!r}; "
                    f"valid choices: {', '.join(own) or '(none)'}"
                )
        self.module = module
        self.weights = tuple(weights)
        for name in self.weights:
            raw = own[name]
            delattr(module, name)  # drops it from module._parameters
            self.register_parameter(f"{name}_raw", raw)
            setattr(module, name, None)  # placeholder between calls; see forward()
        if isinstance(module, nn.RNNBase):
            # nn.LSTM/GRU cache their weights in a list with weak references, and re-flatten
            # (rebind the storage of) every weight whose reference no longer matches. Rebuild
            # the cache now, while the dropped names hold None, so those names carry no
            # reference and the per-call tensors set in forward() are used as they are.
            module._init_flat_weights()

    def _weight(self, raw: Tensor) -> Tensor:
        if self.training and self.p > 0:
            return F.dropout(raw, p=self.p, training=True)  # mask ~ Bernoulli(1-p), scaled 1/(1-p)
        # The raw weight as is. A view, because assigning a Parameter to a module attribute
        # would register it as a parameter of the wrapped module.
        return raw.view_as(raw)

    def forward(self, *args, **kwargs):
        on_cuda = False
        for name in self.weights:
            raw = getattr(self, f"{name}_raw")
            on_cuda = on_cuda or raw.is_cuda
            setattr(self.module, name, self._weight(raw))
        try:
            with quiet_cudnn_weight_warning(on_cuda):
                return self.module(*args, **kwargs)
        finally:
            for name in self.weights:
                setattr(self.module, name, None)

    def extra_repr(self) -> str:
        return f"p={self.p}, weights={list(self.weights)}"


class LockedDropout(nn.Module):
    """Variational ("locked") dropout: one mask per sequence, shared by every time step.

    Gal & Ghahramani (2016), as used by AWD-LSTM on the embeddings, between layers and on the
    output. For ``x`` (T, B, N) the mask is (1, B, N) ~ Bernoulli(1-p) / (1-p), broadcast over T.
    The identity in eval mode or when ``p == 0``.

    Args:
        p: probability of dropping a unit, in [0, 1).
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = _check_p(p, "LockedDropout")

    def forward(self, x: Tensor) -> Tensor:  # (T, B, N)
        if not self.training or self.p == 0:
            return x
        if x.dim() < 2:
            raise ValueError(
                f"LockedDropout expects a sequence (T, B, N), got a {x.dim()}-D tensor"
            )
        keep = 1.0 - self.p
        mask = x.new_empty((1,) + tuple(x.shape[1:])).bernoulli_(keep).div_(keep)  # (1, B, N)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


def embedded_dropout(
    embed: nn.Embedding,
    words: Tensor,
    p: float,
    scale: Optional[Union[float, Tensor]] = None,
) -> Tensor:
    """Look up ``words`` in ``embed`` with whole word vectors dropped (Gal & Ghahramani 2016).

    In training mode (``embed.training``) each row of the embedding matrix (one word type) is
    kept with probability 1-p and scaled by 1/(1-p), so a dropped word is zero at every position
    of the batch. The plain lookup in eval mode or when ``p == 0``.

    Args:
        embed: the embedding whose weight (V, E) is dropped; its padding/max-norm settings apply.
        words: (T, B) word indices.
        p: probability of dropping a word type, in [0, 1).
        scale: optional factor (a number or a tensor broadcastable to (V, E)) applied to the
            weight, as in AWD-LSTM's ``embedded_dropout``.

    Returns:
        (T, B, E) embeddings.
    """
    p = _check_p(p, "embedded_dropout")
    weight = embed.weight  # (V, E)
    if embed.training and p > 0:
        keep = 1.0 - p
        mask = weight.new_empty((weight.size(0), 1)).bernoulli_(keep).div_(keep)  # (V, 1)
        weight = weight * mask
    if scale is not None:
        weight = weight * scale
    return F.embedding(
        words,
        weight,
        embed.padding_idx,
        embed.max_norm,
        embed.norm_type,
        embed.scale_grad_by_freq,
        embed.sparse,
    )
