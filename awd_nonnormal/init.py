"""Per-gate initializers for recurrent layers, and the registry that names them.

Conventions: PyTorch's recurrence ``h_t = f(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``,
so ``W_hh[i, j]`` is the weight *from unit j to unit i*. Gate blocks are stacked on rows in
PyTorch's order: LSTM ``i f g o``, GRU ``r z n``, vanilla RNN a single block ``h``.

Every initializer acts on one block in place, under ``torch.no_grad()``, and returns it: the
``torch.nn.init`` convention. The recurrent initializers of Orhan & Pitkow (2020, section 3.1.1):

======================  ========================================================  =============
name                    recurrent block ``W`` (N x N)                             input block
======================  ========================================================  =============
``chain``               ``W[i, i-1] = alpha``: unit 0 is the source               ``source``
``fbchain``             ``W[i, i-1] = alpha``, ``W[i, i+1] = beta`` (feedback)    ``source``
``identity``            ``scale * I``                                             ``normal``
``orthogonal``          ``scale * Q``, Q a random orthogonal matrix               ``normal``
``plain``               PyTorch's default ``U(-1/sqrt(N), 1/sqrt(N))``             ``plain``
``ramp``                ``W[i, j] = eps * (i - j) / (N - 1)``                     ``source``
======================  ========================================================  =============

and the LSTM preset ``mixed`` (paper section 3.3): ``ramp`` in the sigmoid gates, ``chain`` with
``alpha = 1.02`` in the tanh gate (``g`` for an LSTM, ``n`` for a GRU, ``h`` for a vanilla RNN).
The ``chain`` preset of an LSTM also uses ``alpha = 1.02``, the default of the paper's PyTorch
port that made Table 3; vanilla RNNs and GRUs get the paper's ``alpha = 1``.

The generic ``scale`` (``--init-scale``) sets the parameter the paper sweeps, named by each
initializer's ``gain`` in the registry: ``alpha`` of ``chain``, ``beta`` of ``fbchain`` (the paper
fixes its feed-forward weight at 0.99), ``scale`` (lambda) of ``identity`` and ``orthogonal``.

A spec names what every block gets. It is a comma-separated list of entries:

* ``NAME`` or ``NAME:k=v:k=v``: the base, a preset or any registered initializer, for every gate;
* ``GATE=NAME[:k=v...]``: the recurrent block of one gate (its input block gets the paired input
  initializer of ``NAME`` unless ``input=`` says otherwise);
* ``input=NAME[:k=v...]``: every input block.

A value is a number, or one of a parameter's named choices (a ``Literal`` annotation), such as
``direction``. For example ``i=ramp,f=ramp,g=chain:alpha=1.02,o=ramp`` (which is the ``mixed``
preset), ``orthogonal,g=chain`` or ``mixed:direction=reverse``.

Direction: the chain runs 0 -> 1 -> ... -> N-1, so the ``source`` input (channel k into unit k)
enters at the chain's start. The public port of the paper's PyTorch code, which made its
language-model numbers, builds the transpose of ``chain``, ``fbchain`` and ``ramp``
(``W[i, i+1]``: the input enters the sink end); ``direction="reverse"`` builds exactly that.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import (Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Tuple,
                    Union, get_args, get_origin, get_type_hints)

import torch
from torch import Tensor, nn

from .utils import parse_number

logger = logging.getLogger(__name__)

__all__ = [
    "GATES", "PRESETS", "DIRECTIONS", "InitSpecError", "GateInit", "InitSpec",
    "register", "get", "available", "input_init_for", "gain_param",
    "chain_", "fbchain_", "identity_", "orthogonal_", "plain_", "ramp_", "source_", "normal_",
    "parse_spec", "plan", "apply_init", "recurrent_layers", "load_plugin", "load_entry_points",
    "HH_PATTERN", "INIT_PARAMS", "InitOptions", "check_init", "add_init_arguments", "init_options_from_args",
]

#: Gate names per cell type, in PyTorch's row order.
GATES: Dict[str, Tuple[str, ...]] = {
    "RNN": ("h",),
    "LSTM": ("i", "f", "g", "o"),
    "GRU": ("r", "z", "n"),
}
#: The gates whose activation is tanh (the "update" gate of the paper); the rest are sigmoids.
TANH_GATE = {"RNN": "h", "LSTM": "g", "GRU": "n"}

Initializer = Callable[..., Tensor]
#: A parameter value in a spec: a number, or one of a parameter's named choices.
ParamValue = Union[float, str]
#: ``forward``: the paper's formulas (unit 0 is the source); ``reverse``: their exact transpose, as
#: built by the paper's public PyTorch port (which made its language-model numbers).
Direction = Literal["forward", "reverse"]
DIRECTIONS: Tuple[str, ...] = get_args(Direction)


class InitSpecError(ValueError):
    """A spec names an unknown initializer, gate or parameter, or holds a malformed value."""


@dataclass(frozen=True)
class _Entry:
    fn: Initializer
    input_init: Optional[str]  # paired input-block initializer; None for an input initializer
    gain: Optional[str]        # the parameter that the generic ``scale`` sets, if any


_REGISTRY: Dict[str, _Entry] = {}


def register(name: str, *, input_init: Optional[str] = "normal", gain: Optional[str] = None,
             override: bool = False) -> Callable[[Initializer], Initializer]:
    """Register ``fn(w, **params) -> w`` under ``name`` (a decorator).

    ``input_init`` names the initializer that the input blocks get when this one is used for a
    recurrent block; ``None`` marks an input-block initializer. ``gain`` names the parameter that the
    generic ``scale`` (``--init-scale``) sets for this initializer, e.g. ``alpha`` for ``chain``.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise ValueError(f"invalid initializer name {name!r}: use letters, digits, '_' and '-'")

    def decorator(fn: Initializer) -> Initializer:
        if name in _REGISTRY and not override and _REGISTRY[name].fn is not fn:
            raise ValueError(f"initializer {name!r} is already registered (pass override=True)")
        _REGISTRY[name] = _Entry(fn, input_init, gain)
        return fn

    return decorator


def available() -> List[str]:
    """Every registered initializer name and every preset, sorted."""
    return sorted(set(_REGISTRY) | set(PRESETS))


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        load_entry_points()
    if name not in _REGISTRY:
        raise InitSpecError(f"unknown initializer {name!r}; known: {', '.join(available())}")
    return _REGISTRY[name]


def get(name: Union[str, Initializer]) -> Initializer:
    """The initializer registered as ``name``; a callable is returned as it is."""
    if callable(name):
        return name
    return _entry(name).fn


def input_init_for(name: str) -> Optional[str]:
    """The input-block initializer paired with the recurrent initializer ``name``."""
    return _entry(name).input_init


def gain_param(name: str) -> Optional[str]:
    """The parameter of ``name`` that the generic ``scale`` sets (``None`` when it has none)."""
    return _entry(name).gain


def _params_of(fn: Initializer) -> List[str]:
    """Keyword parameters of an initializer, the tensor and ``generator`` excluded."""
    sig = inspect.signature(fn)
    names = list(sig.parameters)[1:]
    return [n for n in names if n != "generator"
            and sig.parameters[n].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                           inspect.Parameter.KEYWORD_ONLY)]


def _takes_generator(fn: Initializer) -> bool:
    return "generator" in inspect.signature(fn).parameters


def _choices_of(fn: Initializer) -> Dict[str, Tuple[str, ...]]:
    """The parameters of an initializer annotated ``Literal[...]`` and their valid values; the
    others take numbers."""
    try:
        hints = get_type_hints(fn)
    except Exception:  # noqa: BLE001 - a plug-in's unresolvable annotation: numbers only
        return {}
    return {k: tuple(get_args(v)) for k, v in hints.items() if get_origin(v) is Literal}


def _directed(w: Tensor, direction: str, name: str) -> Tensor:
    """``w`` as built (``forward``) or replaced by its transpose (``reverse``)."""
    if direction not in DIRECTIONS:
        raise InitSpecError(f"{name}: direction must be one of {', '.join(DIRECTIONS)}, "
                            f"got {direction!r}")
    if direction == "reverse":
        w.copy_(w.t().clone())
    return w


# --------------------------------------------------------------------------------------------
# Block initializers (in place, torch.nn.init convention)
# --------------------------------------------------------------------------------------------

def _check_square(w: Tensor, name: str) -> int:
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"{name} needs a square recurrent block, got shape {tuple(w.shape)}")
    return w.shape[0]


@register("chain", input_init="source", gain="alpha")
def chain_(w: Tensor, alpha: float = 1.0, direction: Direction = "forward") -> Tensor:
    """Feed-forward chain 0 -> 1 -> ... -> N-1: ``W[i, i-1] = alpha`` (Orhan & Pitkow 2020, eq. in
    section 2.1: ``W_ij = alpha * delta_{j, i-1}``), all else 0. ``direction="reverse"``: the
    transpose ``W[i, i+1] = alpha`` of the paper's PyTorch port (N-1 -> ... -> 0)."""
    n = _check_square(w, "chain")
    with torch.no_grad():
        w.zero_()
        idx = torch.arange(1, n, device=w.device)
        w[idx, idx - 1] = alpha  # row i (target) receives from column i-1 (source)
        _directed(w, direction, "chain")
    return w


@register("fbchain", input_init="source", gain="beta")
def fbchain_(w: Tensor, alpha: float = 0.99, beta: float = 0.04,
             direction: Direction = "forward") -> Tensor:
    """Chain with feedback: ``W_ij = alpha delta_{j,i-1} + beta delta_{j,i+1}`` (paper section 2.1);
    the paper's synthetic tasks fix ``alpha = 0.99`` and sweep ``beta``, so the generic ``scale``
    (``--init-scale``, the paper's ``--init_scale``) sets ``beta``. ``direction="reverse"``: the
    transpose, as the paper's PyTorch port builds it."""
    n = _check_square(w, "fbchain")
    with torch.no_grad():
        w.zero_()
        idx = torch.arange(1, n, device=w.device)
        w[idx, idx - 1] = alpha  # feed-forward: i-1 -> i
        w[idx - 1, idx] = beta   # feedback:     i -> i-1
        _directed(w, direction, "fbchain")
    return w


@register("identity", input_init="normal", gain="scale")
def identity_(w: Tensor, scale: float = 1.0) -> Tensor:
    """Scaled identity ``W = scale * I`` (Le et al. 2015; the paper's lambda)."""
    _check_square(w, "identity")
    with torch.no_grad():
        w.copy_(scale * torch.eye(w.shape[0], dtype=w.dtype, device=w.device))
    return w


@register("orthogonal", input_init="normal", gain="scale")
def orthogonal_(w: Tensor, scale: float = 1.0, generator: Optional[torch.Generator] = None) -> Tensor:
    """Scaled random orthogonal ``W = scale * Q`` (Saxe et al. 2014; the paper's lambda)."""
    _check_square(w, "orthogonal")
    with torch.no_grad():
        nn.init.orthogonal_(w, gain=scale, generator=generator)
    return w


@register("plain", input_init="plain")
def plain_(w: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """PyTorch's default for recurrent layers: ``U(-1/sqrt(N), 1/sqrt(N))`` with N the hidden size
    (the rows of one gate block)."""
    bound = 1.0 / math.sqrt(w.shape[0])
    with torch.no_grad():
        nn.init.uniform_(w, -bound, bound, generator=generator)
    return w


@register("ramp", input_init="source")
def ramp_(w: Tensor, eps: float = 0.01, direction: Direction = "forward") -> Tensor:
    """Monotonic profile ``W[i, j] = eps * (i - j) / (N - 1)`` (paper section 3.3, the sigmoid
    gates of the ``mixed`` LSTM): the weight grows linearly with the order difference ``i - j``.
    ``direction="reverse"``: the transpose, as the paper's PyTorch port builds it."""
    n = _check_square(w, "ramp")
    with torch.no_grad():
        if n == 1:
            w.zero_()
        else:
            i = torch.arange(n, dtype=w.dtype, device=w.device)
            w.copy_(eps * (i[:, None] - i[None, :]) / (n - 1))
        _directed(w, direction, "ramp")
    return w


@register("source", input_init=None)
def source_(w: Tensor, scale: float = 0.9) -> Tensor:
    """Input block ``V = scale * eye(N, d)``: input channel k feeds unit k (paper section 3.1.1)."""
    with torch.no_grad():
        w.copy_(scale * torch.eye(w.shape[0], w.shape[1], dtype=w.dtype, device=w.device))
    return w


@register("normal", input_init=None)
def normal_(w: Tensor, std: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Input block ``V_ij ~ N(0, std)``, ``std = 0.9 / sqrt(N)`` by default (paper section 3.1.1)."""
    if std is None:
        std = 0.9 / math.sqrt(w.shape[0])
    with torch.no_grad():
        nn.init.normal_(w, 0.0, std, generator=generator)
    return w


@register("zeros", input_init=None)
def zeros_(w: Tensor) -> Tensor:
    """All zeros (for input blocks that should ignore the input)."""
    with torch.no_grad():
        return w.zero_()


# --------------------------------------------------------------------------------------------
# Specs, presets and plans
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GateInit:
    """What one gate gets: a recurrent initializer and an input initializer, with parameters."""
    recurrent: str
    recurrent_params: Mapping[str, ParamValue] = field(default_factory=dict)
    input: Optional[str] = None  # None: the recurrent initializer's paired input init
    input_params: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class InitSpec:
    """A parsed spec: an optional base plus per-gate and input overrides."""
    base: Optional[str] = None
    base_params: Mapping[str, ParamValue] = field(default_factory=dict)
    gates: Mapping[str, Tuple[str, Mapping[str, ParamValue]]] = field(default_factory=dict)
    input: Optional[Tuple[str, Mapping[str, ParamValue]]] = None


def _mixed(cell: str) -> Dict[str, GateInit]:
    tanh_gate = TANH_GATE[cell]
    return {g: GateInit("chain", {"alpha": 1.02}, "source") if g == tanh_gate
            else GateInit("ramp", {}, "source") for g in GATES[cell]}


def _chain_preset(cell: str) -> Dict[str, GateInit]:
    # The LSTM chain of Table 3 came from the paper's PyTorch port, whose LSTM chain default is
    # alpha = 1.02 (as in ``mixed``); vanilla RNNs and GRUs keep the paper's alpha = 1.
    params = {"alpha": 1.02} if cell == "LSTM" else {}
    return {g: GateInit("chain", params, "source") for g in GATES[cell]}


#: Named presets: ``cell type -> {gate: GateInit}``. The five single-initializer presets give every
#: gate the same recurrent block and its paired input block (the LSTM ``chain`` with alpha 1.02);
#: ``mixed`` is the paper's LSTM scheme.
PRESETS: Dict[str, Callable[[str], Dict[str, GateInit]]] = {
    "chain": _chain_preset,
    "fbchain": lambda cell: {g: GateInit("fbchain", {}, "source") for g in GATES[cell]},
    "identity": lambda cell: {g: GateInit("identity", {}, "normal") for g in GATES[cell]},
    "orthogonal": lambda cell: {g: GateInit("orthogonal", {}, "normal") for g in GATES[cell]},
    "plain": lambda cell: {g: GateInit("plain", {}, "plain") for g in GATES[cell]},
    "mixed": _mixed,
}


def _number(text: str, where: str) -> float:
    return parse_number(text, where, error=InitSpecError)


def _members(name: str) -> List[str]:
    """The initializers a spec name stands for: a preset's, or the name itself."""
    return ([g.recurrent for g in PRESETS[name]("LSTM").values()]
            if name in PRESETS and name not in _REGISTRY else [name])


def _choices(name: str, key: str) -> Optional[Tuple[str, ...]]:
    """The named choices of parameter ``key`` of ``name`` (None: it takes a number)."""
    for n in _members(name):
        found = _choices_of(get(n)).get(key)
        if found:
            return found
    return None


def _accepted(name: str) -> List[str]:
    """Parameters that a spec may give ``name``: its own, plus ``scale`` where it has a gain."""
    names = _members(name)
    accepted = {p for n in names for p in _params_of(get(n))}
    if any(gain_param(n) for n in names):
        accepted.add("scale")
    return sorted(accepted)


def _check_params(name: str, params: Mapping[str, ParamValue], where: str) -> None:
    accepted = _accepted(name)
    for key in params:
        if key not in accepted:
            raise InitSpecError(f"{where}: {name!r} has no parameter {key!r}; "
                                f"it accepts: {', '.join(accepted) or 'none'}")


def _value(name: str, key: str, text: str, where: str) -> ParamValue:
    """A spec value: one of the parameter's named choices, or a number."""
    choices = _choices(name, key)
    if choices is None:
        return _number(text, f"{where}: {name}:{key}")
    if text not in choices:
        raise InitSpecError(f"{where}: {name}:{key} {text!r} is not valid; valid: {', '.join(choices)}")
    return text


def _parse_term(term: str, where: str) -> Tuple[str, Dict[str, ParamValue]]:
    """``name:k=v:k=v`` -> (name, {k: v})."""
    name, *pairs = [t.strip() for t in term.split(":")]
    if not name:
        raise InitSpecError(f"{where}: missing initializer name")
    if name not in PRESETS:
        _entry(name)
    params: Dict[str, ParamValue] = {}
    for pair in pairs:
        if "=" not in pair:
            raise InitSpecError(f"{where}: parameter {pair!r} should look like key=value")
        key, value = (s.strip() for s in pair.split("=", 1))
        _check_params(name, {key: 0.0}, where)
        params[key] = _value(name, key, value, where)
    return name, params


def parse_spec(spec: str) -> InitSpec:
    """Parse ``"orthogonal"``, ``"chain:alpha=1.02"`` or ``"i=ramp,f=ramp,g=chain:alpha=1.02,o=ramp"``.

    Raises :class:`InitSpecError` (a ``ValueError``) naming the valid choices for an unknown
    initializer, gate or parameter, or a value that is not a number.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InitSpecError(f"empty init spec; known initializers: {', '.join(available())}")
    all_gates = sorted({g for gates in GATES.values() for g in gates})
    base, base_params, gates, inp = None, {}, {}, None
    for raw in spec.split(","):
        entry = raw.strip()
        where = f"init spec {spec!r}, entry {entry!r}"
        head = entry.split(":", 1)[0]
        if "=" in head:  # GATE=NAME[:...] or input=NAME[:...]
            key, term = (s.strip() for s in entry.split("=", 1))
            if key == "input":
                inp = _parse_term(term, where)
            elif key in all_gates:
                if key in gates:
                    raise InitSpecError(f"{where}: gate {key!r} given twice")
                name, params = _parse_term(term, where)
                if name not in _REGISTRY:
                    raise InitSpecError(f"{where}: a gate takes an initializer, not the preset {name!r}")
                gates[key] = (name, params)
            else:
                raise InitSpecError(f"{where}: unknown gate {key!r}; gates are "
                                    + "; ".join(f"{c}: {' '.join(g)}" for c, g in GATES.items())
                                    + " (or 'input=' for the input blocks)")
        else:
            if base is not None:
                raise InitSpecError(f"{where}: more than one base initializer ({base!r} and {head!r})")
            base, base_params = _parse_term(entry, where)
    return InitSpec(base, base_params, gates, inp)


def _route(name: str, params: Mapping[str, ParamValue]) -> Dict[str, ParamValue]:
    """Keep the params that initializer ``name`` accepts; map the generic ``scale`` onto its gain."""
    accepted = _params_of(get(name))
    out = {k: v for k, v in params.items() if k in accepted}
    if "scale" in params and "scale" not in accepted:
        gain = gain_param(name)
        if gain is not None:
            if gain in params and params[gain] != params["scale"]:
                raise InitSpecError(f"{name}: 'scale' sets {gain!r}, but both were given "
                                    f"({params['scale']} and {params[gain]})")
            out[gain] = params["scale"]
    return out


def _check_values(name: str, params: Mapping[str, ParamValue]) -> None:
    """Each value is one of its parameter's named choices, or a number where it has none."""
    choices = _choices_of(get(name))
    for key, value in params.items():
        if key in choices and value not in choices[key]:
            raise InitSpecError(f"{name}: {key} {value!r} is not valid; valid: {', '.join(choices[key])}")
        if key not in choices and isinstance(value, str):
            raise InitSpecError(f"{name}: {key} {value!r} is not a number")


def plan(spec: Union[str, InitSpec], cell: str, **params: ParamValue) -> Dict[str, GateInit]:
    """Resolve ``spec`` for a cell type (``RNN``, ``LSTM``, ``GRU``) into ``{gate: GateInit}``.

    ``params`` (e.g. ``alpha=1.05``, ``scale=1.01``, ``direction="reverse"``) go to every
    recurrent initializer that accepts them; ``scale`` also sets each initializer's gain (the one
    place that says which: ``register(..., gain=)``, read by :func:`gain_param`): ``alpha`` of
    ``chain``, ``beta`` of ``fbchain``, ``scale`` (lambda) of identity and orthogonal. A parameter
    that no gate accepts is an error, and so is one that the spec writes with another value.
    """
    if cell not in GATES:
        raise InitSpecError(f"unknown cell type {cell!r}; known: {', '.join(GATES)}")
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    unknown_gates = set(parsed.gates) - set(GATES[cell])
    if unknown_gates:
        raise InitSpecError(f"gate(s) {', '.join(sorted(unknown_gates))} do not exist in a {cell}; "
                            f"its gates are {' '.join(GATES[cell])}")
    if parsed.base is None:
        missing = set(GATES[cell]) - set(parsed.gates)
        if missing:
            raise InitSpecError(f"init spec names no base and leaves {cell} gate(s) "
                                f"{', '.join(sorted(missing))} unset; add a base such as 'plain'")
        base: Dict[str, GateInit] = {}
    elif parsed.base in PRESETS:
        base = PRESETS[parsed.base](cell)
    else:
        base = {g: GateInit(parsed.base) for g in GATES[cell]}

    result: Dict[str, GateInit] = {}
    used = set()
    for gate in GATES[cell]:
        if gate in parsed.gates:
            name, spec_params = parsed.gates[gate]
            gi = GateInit(name, {}, None)
        else:
            gi, spec_params = base[gate], parsed.base_params
        # later sources win: preset defaults, then the caller's params, then the spec's own; the
        # caller's and the spec's must not disagree (a swept or flagged value would be ignored)
        given, written = _route(gi.recurrent, params), _route(gi.recurrent, spec_params)
        clash = sorted(k for k in given.keys() & written.keys() if given[k] != written[k])
        if clash:
            k = clash[0]
            via = " (through 'scale')" if k not in params and "scale" in params else ""
            where = f" {spec!r}" if isinstance(spec, str) else ""
            raise InitSpecError(f"{gi.recurrent}: {k} is {written[k]!r} in the init spec{where} and "
                                f"{given[k]!r} as a parameter{via}; give it in one place")
        rec_params = {**_route(gi.recurrent, gi.recurrent_params), **given, **written}
        _check_values(gi.recurrent, rec_params)
        used |= {k for k in params if k in rec_params or (k == "scale" and gain_param(gi.recurrent))}
        in_name = gi.input or input_init_for(gi.recurrent) or "normal"
        in_params = dict(gi.input_params)
        if parsed.input is not None:
            in_name, in_params = parsed.input[0], dict(parsed.input[1])
        result[gate] = GateInit(gi.recurrent, rec_params, in_name, in_params)
    unused = set(params) - used
    if unused:
        names = sorted({g.recurrent for g in result.values()})
        accepted = sorted({p for n in names for p in _accepted(n)})
        raise InitSpecError(f"parameter(s) {', '.join(sorted(unused))} not accepted by "
                            f"{', '.join(names)}; accepted: {', '.join(accepted) or 'none'}")
    return result


# --------------------------------------------------------------------------------------------
# Applying a plan to modules
# --------------------------------------------------------------------------------------------

#: The name of a recurrent weight in a module or state_dict (``rnns.0.weight_hh_l0``, a weight-drop
#: wrapper's ``..._raw``, a bidirectional layer's ``..._reverse``); the one pattern of the project.
HH_PATTERN = re.compile(r"^(?P<prefix>(?:.*\.)?)weight_hh_l(?P<layer>\d+)(?P<suffix>(?:_reverse)?)(?P<raw>(?:_raw)?)$")


@dataclass
class RecurrentLayer:
    """One layer of a recurrent module: its parameters by role and its cell type."""
    name: str                 # e.g. "rnns.0.weight_hh_l0"
    cell: str                 # RNN, LSTM or GRU
    weight_hh: Tensor         # (G*N, N)
    weight_ih: Optional[Tensor]  # (G*N, d)
    bias_ih: Optional[Tensor]
    bias_hh: Optional[Tensor]


def _cell_of(weight_hh: Tensor, name: str) -> str:
    rows, cols = weight_hh.shape
    by_ratio = {1: "RNN", 4: "LSTM", 3: "GRU"}
    if rows % cols or rows // cols not in by_ratio:
        raise ValueError(f"{name}: cannot tell the cell type from weight_hh of shape {tuple(weight_hh.shape)}")
    return by_ratio[rows // cols]


def recurrent_layers(tensors: Union[nn.Module, Mapping[str, Tensor]]) -> Iterator[RecurrentLayer]:
    """Every recurrent layer in a module or a state_dict, found by the ``weight_hh_l{k}`` names that
    ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and :class:`awd_nonnormal.rnn.RNN` share (a weight-drop
    wrapper's ``weight_hh_l{k}_raw`` included). The cell type follows from the block count."""
    if isinstance(tensors, nn.Module):
        named = dict(tensors.named_parameters())
    else:
        named = dict(tensors)
    for key, w_hh in named.items():
        m = HH_PATTERN.match(key)
        if not m:
            continue
        prefix, layer, suffix = m["prefix"], m["layer"], m["suffix"]

        def find(kind: str) -> Optional[Tensor]:
            # plain layer, or a weight-drop wrapper holding the raw weight outside its ``module``
            for cand in (f"{prefix}{kind}_l{layer}{suffix}", f"{prefix}module.{kind}_l{layer}{suffix}",
                         f"{prefix}{kind}_l{layer}{suffix}_raw"):
                if cand in named:
                    return named[cand]
            return None

        yield RecurrentLayer(key, _cell_of(w_hh, key), w_hh, find("weight_ih"),
                             find("bias_ih"), find("bias_hh"))


def _call(name: str, w: Tensor, params: Mapping[str, ParamValue], generator: Optional[torch.Generator]) -> None:
    fn = get(name)
    kwargs = dict(params)
    if generator is not None and _takes_generator(fn):
        kwargs["generator"] = generator
    fn(w, **kwargs)


def apply_init(module: nn.Module, spec: Union[str, InitSpec], *, zero_bias: bool = False,
               generator: Optional[torch.Generator] = None, **params: ParamValue) -> nn.Module:
    """Initialise every recurrent layer of ``module`` (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``, the
    project's :class:`~awd_nonnormal.rnn.RNN`, one or more layers, or any module that holds them)
    gate by gate according to ``spec``; see the module docstring for the spec language.

    ``params`` reach every recurrent initializer that accepts them (``alpha``, ``beta``, ``eps``,
    ``scale``, ``direction``); ``zero_bias`` sets all recurrent biases to 0 (the synthetic tasks' convention), else
    biases keep their values. Returns ``module``.
    """
    layers = list(recurrent_layers(module))
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no recurrent layer (no weight_hh_l<k> parameter)")
    plans: Dict[str, Dict[str, GateInit]] = {}
    for layer in layers:
        if layer.cell not in plans:
            plans[layer.cell] = plan(spec, layer.cell, **params)
        gate_plan = plans[layer.cell]
        gates = GATES[layer.cell]
        with torch.no_grad():
            hh_blocks = layer.weight_hh.chunk(len(gates), dim=0)  # views, (N, N) each
            ih_blocks = (layer.weight_ih.chunk(len(gates), dim=0) if layer.weight_ih is not None
                         else [None] * len(gates))                # (N, d) each
            for gate, hh, ih in zip(gates, hh_blocks, ih_blocks):
                g = gate_plan[gate]
                _call(g.recurrent, hh, g.recurrent_params, generator)
                if ih is not None:
                    _call(g.input, ih, g.input_params, generator)
            if zero_bias:
                for b in (layer.bias_ih, layer.bias_hh):
                    if b is not None:
                        b.zero_()
        logger.debug("initialised %s (%s) with %s", layer.name, layer.cell, gate_plan)
    return module


# --------------------------------------------------------------------------------------------
# Plug-ins
# --------------------------------------------------------------------------------------------

ENTRY_POINT_GROUP = "awd_nonnormal.initializers"
_entry_points_loaded = False


def load_plugin(target: str) -> None:
    """Import a plug-in so that its ``@register`` calls run: a module name (``mypkg.inits``) or a
    path to a ``.py`` file. Raises ``ValueError`` with the reason if it cannot be imported."""
    path = Path(target)
    if target.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ValueError(f"init plug-in file {target!r} does not exist")
        mod_name = f"awd_nonnormal_plugin_{abs(hash(str(path.resolve())))}"
        if mod_name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import init plug-in {target!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure of user code is a bad plug-in
            del sys.modules[mod_name]
            raise InitSpecError(f"--init-plugin {target}: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"cannot import init plug-in module {target!r}: {exc}") from exc
    logger.info("loaded init plug-in %s", target)


def load_entry_points() -> None:
    """Import every plug-in advertised under the ``awd_nonnormal.initializers`` entry-point group
    (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points
    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python < 3.10
        eps = entry_points().get(ENTRY_POINT_GROUP, [])
    for ep in eps:
        try:
            ep.load()
        except Exception as exc:  # a broken plug-in must not break the registry
            logger.warning("init plug-in entry point %s failed to load: %s", ep.name, exc)


# --------------------------------------------------------------------------------------------
# Init options: what every config holds, and their command-line flags
# --------------------------------------------------------------------------------------------

#: The initializer parameters a user may give on the command line (``--init-alpha`` etc.).
#: ``scale`` is the generic gain: :func:`gain_param` says which parameter it sets for each
#: initializer (the one place that mapping lives).
INIT_PARAMS = ("alpha", "beta", "scale", "eps")


@dataclass(frozen=True)
class InitOptions:
    """How the recurrent layers are initialised, held by every config that builds them.

    Attributes:
        spec: a name, preset or per-gate spec (see the module docstring).
        params: parameters given for every initializer that takes them (keys in
            :data:`INIT_PARAMS`); absent keys keep each initializer's own default.
        zero_bias: set the recurrent biases to 0.
        plugins: modules or ``.py`` files to import first (they register initializers).
    """

    spec: str = "plain"
    params: Mapping[str, float] = field(default_factory=dict)
    zero_bias: bool = False
    plugins: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise InitSpecError(f"init spec must be a non-empty string, got {self.spec!r}; "
                                f"known initializers and presets: {', '.join(available())}")
        unknown = set(self.params) - set(INIT_PARAMS)
        if unknown:
            raise InitSpecError(f"unknown init parameter(s) {', '.join(sorted(unknown))}; "
                                f"valid: {', '.join(INIT_PARAMS)}")
        params = {}
        for k in INIT_PARAMS:
            if k in self.params and self.params[k] is not None:
                params[k] = _number(str(self.params[k]), f"--init-{k}")
        # A plain dict (not a mapping proxy) so that dataclasses.asdict and torch.save keep it.
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "zero_bias", bool(self.zero_bias))
        object.__setattr__(self, "plugins", tuple(str(p) for p in self.plugins))

    def to_dict(self) -> Dict[str, Any]:
        return {"spec": self.spec, "params": dict(self.params), "zero_bias": self.zero_bias,
                "plugins": list(self.plugins)}

    @classmethod
    def from_dict(cls, d: Union["InitOptions", str, Mapping[str, Any]]) -> "InitOptions":
        """From :meth:`to_dict`, an InitOptions, or a bare spec string."""
        if isinstance(d, InitOptions):
            return d
        if isinstance(d, str):
            return cls(spec=d)
        return cls(spec=d.get("spec", "plain"), params=dict(d.get("params") or {}),
                   zero_bias=bool(d.get("zero_bias", False)), plugins=tuple(d.get("plugins") or ()))

    def without_plugins(self) -> "InitOptions":
        return replace(self, plugins=())

    def load_plugins(self) -> None:
        for plugin in self.plugins:
            load_plugin(plugin)

    def is_pytorch_default(self) -> bool:
        """``plain`` without parameters and biases: exactly what a layer's constructor drew."""
        return self.spec.strip() == "plain" and not self.params and not self.zero_bias

    def apply(self, module: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
        """:func:`apply_init` with these options (plug-ins must be loaded)."""
        return apply_init(module, self.spec, zero_bias=self.zero_bias, generator=generator, **self.params)


def check_init(options: InitOptions, cell: str, load: bool = True) -> None:
    """Load the plug-ins (with ``load``) and resolve the spec for ``cell`` (``RNN``, ``LSTM``,
    ``GRU``), so that a bad spec fails at start-up with :class:`InitSpecError` naming the valid
    choices."""
    if load:
        options.load_plugins()
    plan(options.spec, cell, **options.params)


def add_init_arguments(parser, *, default_spec: Optional[str] = None, shown_default: str = "plain",
                       zero_bias_flag: bool = True,
                       gain_help: str = "the parameter the paper sweeps, for every initializer "
                                        "that has one: alpha of chain, beta of fbchain (its alpha "
                                        "stays 0.99), lambda of identity/orthogonal"):
    """The init flags as one argparse group: ``--init``, ``--init-alpha``, ``--init-beta``,
    ``--init-scale``, ``--init-eps``, ``--init-plugin`` (repeatable) and, with ``zero_bias_flag``,
    ``--init-zero-bias``. ``--init`` defaults to ``default_spec`` (None: not given, which a caller
    reads as ``shown_default``); every other value defaults to None (not given). Returns the group."""
    g = parser.add_argument_group("initialisation of the recurrent layers")
    g.add_argument("--init", default=default_spec, metavar="NAME|SPEC",
                   help="initializer or per-gate spec, e.g. chain, fbchain, identity, orthogonal, "
                        "mixed, 'i=ramp,f=ramp,g=chain:alpha=1.02,o=ramp'; plain is PyTorch's "
                        "default" + ("" if default_spec else f" (default: {shown_default})"))
    g.add_argument("--init-alpha", type=float, default=None,
                   help="chain/fbchain feed-forward weight alpha (default: the initializer's own)")
    g.add_argument("--init-beta", type=float, default=None,
                   help="fbchain feedback weight beta (default: its own, 0.04)")
    g.add_argument("--init-scale", type=float, default=None, help=gain_help)
    g.add_argument("--init-eps", type=float, default=None, help="ramp slope eps (default: its own, 0.01)")
    g.add_argument("--init-plugin", dest="init_plugins", action="append", default=None,
                   metavar="MODULE|FILE.py",
                   help="import an initializer plug-in (module name or .py file) first; repeatable")
    if zero_bias_flag:
        g.add_argument("--init-zero-bias", action="store_true", default=None,
                       help="set the recurrent biases to 0")
    return g


def init_options_from_args(args, *, default_spec: str = "plain", zero_bias: bool = False) -> InitOptions:
    """The :class:`InitOptions` of parsed :func:`add_init_arguments` flags."""
    params = {k: getattr(args, f"init_{k}") for k in INIT_PARAMS if getattr(args, f"init_{k}", None) is not None}
    zb = getattr(args, "init_zero_bias", None)
    return InitOptions(spec=args.init or default_spec, params=params,
                       zero_bias=zero_bias if zb is None else bool(zb),
                       plugins=tuple(args.init_plugins or ()))
