"""The language model: AWD-LSTM's ``RNNModel`` (Merity, Keskar & Socher 2018) with the RNN type
``RNN`` (vanilla, any activation) next to ``LSTM`` and ``GRU``, and the initializers of Orhan &
Pitkow (2020) applied to every recurrent layer.

Structure (per forward pass, shapes sequence-first)::

    words (T, B) --embedding dropout (--dropoute)--> (T, B, E)
      --locked dropout (--dropouti)--> layer 0 --locked dropout (--dropouth)--> layer 1 ... layer L-1
      --locked dropout (--dropout)--> decoder (tied to the embedding) --> logits (T, B, V)

Each layer is a single-layer recurrent module from :func:`awd_nonnormal.rnn.build_rnn` (input
``emsize`` for layer 0, ``nhid`` after; hidden ``nhid``, except the last layer, which has
``emsize`` units when the decoder is tied to the embedding). It is initialised with
:func:`awd_nonnormal.init.apply_init` *before* it is wrapped in
:class:`~awd_nonnormal.regularize.WeightDrop` (DropConnect on ``weight_hh``, ``--wdrop``), so its
state_dict keys are ``rnns.{l}.weight_hh_l0_raw`` and ``rnns.{l}.module.weight_ih_l0`` etc. when
``wdrop > 0`` and ``rnns.{l}.weight_hh_l0`` etc. otherwise.

``--model QRNN`` builds :class:`~awd_nonnormal.qrnn.QRNN` layers as AWD-LSTM does: window 2 in
the first layer and 1 after, ``--wdrop`` as DropConnect on their gate weights ``weight_ih_l0``
(keys ``rnns.{l}.weight_ih_l0_raw``), zoneout ``--zoneout``. With ``cutoffs`` (chosen from the
vocabulary size unless given, see :mod:`awd_nonnormal.softmax`) the decoder is an adaptive softmax
(``nn.AdaptiveLogSoftmaxWithLoss``), not tied to the embedding; ``forward`` then returns
log-probabilities, which are valid logits (``log_softmax`` leaves them unchanged), and
:meth:`RNNModel.nll` gives the per-token loss without the full (T, B, V) output.

The module holds no hidden state: ``forward(input, hidden)`` takes the state of every layer and
returns the new one (``init_hidden`` makes a zero state).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .init import InitOptions
from .init import check_init as _check_init
from .regularize import LockedDropout, WeightDrop, embedded_dropout
from .qrnn import apply_qrnn_init, qrnn_input_init
from .rnn import NONLINEARITIES, RNN_TYPES, build_rnn, init_hidden
from .softmax import build_adaptive, check_cutoffs, check_projection, resolve_cutoffs

logger = logging.getLogger(__name__)

__all__ = ["ModelConfig", "RNNModel", "Hidden", "repackage_hidden", "check_init"]

#: One layer's state: ``(h, c)`` for an LSTM, ``h`` otherwise, each (1, B, N).
LayerHidden = Union[Tensor, Tuple[Tensor, Tensor]]
Hidden = List[LayerHidden]


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines an :class:`RNNModel` (AWD-LSTM's flags of the same names).

    Attributes:
        rnn_type: ``LSTM``, ``GRU``, ``RNN`` (vanilla) or ``QRNN``.
        ntoken: vocabulary size V; ``None`` until the corpus is known (the training code fills
            it in from the vocabulary).
        emsize: embedding size E.
        nhid: hidden units per layer (the last layer has ``emsize`` when ``tied``).
        nlayers: number of recurrent layers.
        dropout: locked dropout on the last layer's output.
        dropouth: locked dropout between recurrent layers.
        dropouti: locked dropout on the embedded input.
        dropoute: embedding dropout (whole word types).
        wdrop: DropConnect on the hidden-to-hidden weights (0 disables the wrapper).
        tied: tie the decoder weight to the embedding (Inan et al. 2017; Press & Wolf 2017).
        nonlinearity: activation of a vanilla RNN (``tanh``, ``relu``, ``elu``, ``linear``);
            ignored by LSTM and GRU.
        init: the :class:`~awd_nonnormal.init.InitOptions` of every recurrent layer (spec such as
            ``plain``, ``chain``, ``mixed`` or ``i=ramp,f=ramp,g=chain:alpha=1.02,o=ramp``,
            parameters, zero biases, plug-ins). A plain string is taken as the spec.
        cutoffs: the adaptive softmax's cut-offs; ``None`` chooses them from ``ntoken``
            (:func:`~awd_nonnormal.softmax.resolve_cutoffs`), ``()`` is the full softmax.
        zoneout: zoneout of ``QRNN`` layers (AWD-LSTM: 0); ignored by the other types.
    """

    rnn_type: str = "LSTM"
    ntoken: Optional[int] = None
    emsize: int = 400
    nhid: int = 1150
    nlayers: int = 3
    dropout: float = 0.4
    dropouth: float = 0.3
    dropouti: float = 0.65
    dropoute: float = 0.1
    wdrop: float = 0.5
    tied: bool = True
    nonlinearity: str = "tanh"
    init: InitOptions = field(default_factory=InitOptions)
    cutoffs: Optional[Tuple[int, ...]] = None
    zoneout: float = 0.0

    def __post_init__(self) -> None:
        if self.rnn_type not in RNN_TYPES:
            raise ValueError(f"unknown rnn_type {self.rnn_type!r}; valid choices: {', '.join(RNN_TYPES)}")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {self.nonlinearity!r}; "
                             f"valid choices: {', '.join(NONLINEARITIES)}")
        for name in ("ntoken", "emsize", "nhid", "nlayers"):
            value = getattr(self, name)
            if name == "ntoken" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("dropout", "dropouth", "dropouti", "dropoute", "wdrop", "zoneout"):
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        object.__setattr__(self, "init", InitOptions.from_dict(self.init))
        if self.cutoffs is not None:
            object.__setattr__(self, "cutoffs", check_cutoffs([int(c) for c in self.cutoffs], self.ntoken))
            check_projection(self.hidden_sizes[-1], self.cutoffs)

    @property
    def hidden_sizes(self) -> List[int]:
        """Hidden units of each layer."""
        return [self.emsize if (l == self.nlayers - 1 and self.tied) else self.nhid
                for l in range(self.nlayers)]

    @property
    def input_sizes(self) -> List[int]:
        """Input features of each layer."""
        return [self.emsize] + self.hidden_sizes[:-1]

    @property
    def resolved_cutoffs(self) -> Tuple[int, ...]:
        """The adaptive softmax's cut-offs for ``ntoken`` (``()``: the full softmax)."""
        if self.ntoken is None:
            raise ValueError("ModelConfig.ntoken is None: the cut-offs depend on the vocabulary size")
        return resolve_cutoffs(self.cutoffs, self.ntoken)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["init"] = self.init.to_dict()
        if self.cutoffs is not None:
            d["cutoffs"] = list(self.cutoffs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Rebuild from :meth:`to_dict`; unknown keys are an error (a checkpoint of other code).
        Checkpoints of schema 1 held the init options flat (``init`` a spec string,
        ``init_params``, ``init_zero_bias``): they are read into :class:`InitOptions`."""
        d = dict(d)
        if isinstance(d.get("init"), str) or "init_params" in d or "init_zero_bias" in d:
            d["init"] = InitOptions(spec=d.get("init", "plain"), params=d.pop("init_params", None) or {},
                                    zero_bias=d.pop("init_zero_bias", False))
        d.setdefault("cutoffs", ())  # written before the adaptive softmax existed: a full softmax
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"model config holds unknown key(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def check_init(config: ModelConfig) -> None:
    """Load the config's init plug-ins and resolve its spec for its cell type, so that a bad spec
    fails at start-up (:func:`awd_nonnormal.init.check_init`; a QRNN takes only the initializers
    of :func:`awd_nonnormal.qrnn.qrnn_input_init`)."""
    if config.rnn_type == "QRNN":
        config.init.load_plugins()
        qrnn_input_init(config.init.spec, **config.init.params)
    else:
        _check_init(config.init, config.rnn_type)


def repackage_hidden(h):
    """Detach a hidden state (a tensor or nested tuples/lists of them) from its history, so that
    backpropagation stops at the batch boundary (truncated BPTT)."""
    if isinstance(h, Tensor):
        return h.detach()
    return type(h)(repackage_hidden(v) for v in h)


class RNNModel(nn.Module):
    """AWD-LSTM's language model for LSTM, GRU, vanilla RNN and QRNN layers.

    Args:
        config: the :class:`ModelConfig`.
        initialize: apply ``config.init`` to the recurrent layers (the default). Pass False when
            the weights come from a checkpoint next (no initializer and no plug-in is needed).
    """

    def __init__(self, config: ModelConfig, *, initialize: bool = True) -> None:
        super().__init__()
        if config.ntoken is None:
            raise ValueError("ModelConfig.ntoken is None: set it to the vocabulary size "
                             "(dataclasses.replace(config, ntoken=len(corpus.dictionary)))")
        config = dataclasses.replace(config, cutoffs=config.resolved_cutoffs)
        self.config = config
        c = config
        # Built in AWD-LSTM's order (embedding, recurrent layers, decoder), so that with `plain`
        # the same seed draws the same recurrent weights.
        self.encoder = nn.Embedding(c.ntoken, c.emsize)
        layers = []
        for l, (n_in, n_hid) in enumerate(zip(c.input_sizes, c.hidden_sizes)):
            layer = build_rnn(c.rnn_type, n_in, n_hid, 1, nonlinearity=c.nonlinearity,
                              window=2 if l == 0 else 1, zoneout=c.zoneout)
            if c.rnn_type == "QRNN":
                if initialize and not c.init.is_pytorch_default():
                    apply_qrnn_init(layer, c.init.spec, zero_bias=c.init.zero_bias, **c.init.params)
                if c.wdrop > 0:  # AWD-LSTM: DropConnect on the gate weights (no hidden-to-hidden)
                    layer = WeightDrop(layer, c.wdrop, weights=["weight_ih_l0"])
            elif initialize and not c.init.is_pytorch_default():
                if c.init.without_plugins() == InitOptions(zero_bias=True):
                    # keep the constructor's draws, zero the biases only
                    with torch.no_grad():
                        for name, p in layer.named_parameters():
                            if name.startswith("bias"):
                                p.zero_()
                else:
                    c.init.apply(layer)
            if c.wdrop > 0 and c.rnn_type != "QRNN":
                layer = WeightDrop(layer, c.wdrop)
            layers.append(layer)
        self.rnns = nn.ModuleList(layers)
        if c.cutoffs:
            self.decoder = build_adaptive(c.hidden_sizes[-1], c.ntoken, c.cutoffs)
        else:
            self.decoder = nn.Linear(c.hidden_sizes[-1], c.ntoken)
        if c.tied and not c.cutoffs:
            # Inan et al. 2017, Press & Wolf 2017: one matrix for the input and output embeddings.
            self.decoder.weight = self.encoder.weight
        self.drop_i = LockedDropout(c.dropouti)
        self.drop_h = LockedDropout(c.dropouth)
        self.drop_o = LockedDropout(c.dropout)
        self._init_embedding()

    def _init_embedding(self) -> None:
        """AWD-LSTM's ``init_weights``: embedding and decoder U(-0.1, 0.1), decoder bias 0."""
        with torch.no_grad():
            self.encoder.weight.uniform_(-0.1, 0.1)
            if self.config.cutoffs:  # the adaptive softmax keeps its own initialisation
                return
            self.decoder.bias.zero_()
            if not self.config.tied:
                self.decoder.weight.uniform_(-0.1, 0.1)

    def forward(self, input: Tensor, hidden: Hidden, return_h: bool = False, decode: bool = True):
        """Run the model over a batch of sequences.

        Args:
            input: (T, B) word indices.
            hidden: one state per layer, as from :meth:`init_hidden` or the previous call.
            return_h: also return every layer's outputs (for AR/TAR).
            decode: return logits (T, B, V) (log-probabilities with an adaptive softmax); with
                False, the dropped last-layer output (T, B, E), for :meth:`nll`.

        Returns:
            ``(logits, new_hidden)``, or ``(logits, new_hidden, raw_outputs, outputs)`` with
            ``return_h``: ``raw_outputs[l]`` is layer l's output before dropout and
            ``outputs[l]`` after it (the last entry is the dropped output fed to the decoder).
        """
        c = self.config
        if len(hidden) != c.nlayers:
            raise ValueError(f"hidden holds {len(hidden)} layer states, the model has {c.nlayers} layers")
        emb = embedded_dropout(self.encoder, input, c.dropoute if self.training else 0.0)  # (T, B, E)
        raw_output = self.drop_i(emb)
        new_hidden: Hidden = []
        raw_outputs: List[Tensor] = []
        outputs: List[Tensor] = []
        for l, (rnn, h) in enumerate(zip(self.rnns, hidden)):
            raw_output, new_h = rnn(raw_output, h)  # (T, B, N_l)
            new_hidden.append(new_h)
            raw_outputs.append(raw_output)
            if l != c.nlayers - 1:
                raw_output = self.drop_h(raw_output)
                outputs.append(raw_output)
        output = self.drop_o(raw_output)  # (T, B, N_last)
        outputs.append(output)
        result = output  # (T, B, N_last)
        if decode:
            result = self.log_probs(output) if c.cutoffs else self.decoder(output)  # (T, B, V)
        if return_h:
            return result, new_hidden, raw_outputs, outputs
        return result, new_hidden

    def log_probs(self, output: Tensor) -> Tensor:
        """Log-probabilities (..., V) of the next word from last-layer outputs (..., E)."""
        if not self.config.cutoffs:
            return F.log_softmax(self.decoder(output), dim=-1)
        flat = output.reshape(-1, output.size(-1))  # (N, E)
        return self.decoder.log_prob(flat).view(*output.shape[:-1], self.config.ntoken)

    def nll(self, output: Tensor, targets: Tensor) -> Tensor:
        """Per-token negative log-likelihood (N,) in nats of ``targets`` (N,) given last-layer
        outputs (..., E) with N rows; an adaptive softmax evaluates only the targets' clusters."""
        flat = output.reshape(-1, output.size(-1))  # (N, E)
        if not self.config.cutoffs:
            return F.cross_entropy(self.decoder(flat), targets, reduction="none")
        return -self.decoder(flat, targets).output

    def init_hidden(self, batch_size: int) -> Hidden:
        """A zero state for every layer, on the model's device and dtype."""
        w = self.encoder.weight
        if self.config.rnn_type == "QRNN":  # a window-2 layer also carries its last input
            return [(rnn.module if isinstance(rnn, WeightDrop) else rnn).init_hidden(
                batch_size, device=w.device, dtype=w.dtype) for rnn in self.rnns]
        return [init_hidden(self.config.rnn_type, 1, batch_size, n, device=w.device, dtype=w.dtype)
                for n in self.config.hidden_sizes]

    def arch(self) -> Dict[str, Any]:
        """The checkpoint's ``arch`` entry (see :mod:`awd_nonnormal.checkpoint`)."""
        c = self.config
        return {"rnn_type": c.rnn_type,
                "nonlinearity": c.nonlinearity if c.rnn_type == "RNN" else None,
                "nlayers": c.nlayers, "input_size": c.emsize, "hidden_sizes": list(c.hidden_sizes)}

    def recurrent_state(self) -> Dict[str, Tensor]:
        """The recurrent layers' tensors under their state_dict keys (``rnns.*``), copied to CPU:
        the checkpoint's ``initial_rnn`` entry when taken right after construction."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k.startswith("rnns.")}

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], map_location: Optional[torch.device] = None) -> "RNNModel":
        """Rebuild the model stored in a loaded ``kind="lm"`` checkpoint (no initializer runs)."""
        model = cls(ModelConfig.from_dict(ckpt["config"]["model"]), initialize=False)
        model.load_state_dict(ckpt["model"])
        if map_location is not None:
            model.to(map_location)
        return model

    def extra_repr(self) -> str:
        c = self.config
        return f"init={c.init.spec!r}, init_params={c.init.params}"
