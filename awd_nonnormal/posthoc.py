"""Post-hoc analysis of trained checkpoints: the logic behind ``analyze.py``.

Reproduces the measurements of Orhan & Pitkow (2020), sections 3.2-3.3: the Henrici index of the
recurrent weights (Table 2), and the weight profile of units ordered by the time of their peak
response to a pulse (Rajan, Harvey & Tank 2016; Figures 5-6), for every recurrent layer and every
gate of every checkpoint the project writes (language models and synthetic tasks alike), then
aggregated over groups of checkpoints as mean +- s.e.m.

Pipeline (:func:`run`)::

    paths/globs/folders --discover--> files --load_checkpoint (weights_only)--> checkpoints
        --filter--> --measure (analysis.py)--> per-checkpoint records --group, aggregate-->
        groups --> JSON, PNG figures; the command line prints :func:`format_table`.

The measures themselves live in :mod:`awd_nonnormal.analysis` (pure functions); this module only
finds the layers, feeds them in and collects the numbers. It logs and never prints.

Choices made here (the README's analysis section shows the outputs):

* One ordering per layer: the pulse goes through the whole layer (all gates, PyTorch's cell
  equations), units are ordered by the peak time of the layer's hidden state ``h``, and that one
  order is applied to the recurrent block of every gate (the paper's section 3.2). Layer ``k > 0``
  gets the pulse (a vector of ones) at its own input, not through the layers below.
* The peak time is that of ``|h_pulse - h_bias|``, the pulse run minus the zero-input run of the
  same layer (the biases alone drive every unit), over at least N steps for N units, so a chain is
  found whatever its biases and length; units the pulse never reaches come last.
* Eigenvalues near a chain are ill-conditioned: :func:`awd_nonnormal.analysis.spectrum` computes
  them exactly for symmetric, triangular and chain-with-feedback (tridiagonal) blocks, and
  otherwise estimates their error and flags unreliable values (``*`` in the table).
* Each gate's profile at ``i - j = +1`` is compared with a null: the same block with its units
  in ``null_samples`` random orders (``z(+1)`` = distance in null standard deviations).
* The jitter that breaks ties in peak times comes from a generator seeded with ``seed`` afresh for
  every checkpoint (and again for its initial weights), so a checkpoint's numbers do not depend on
  which other checkpoints are analysed with it.
* s.e.m. = sample standard deviation (ddof = 1) / sqrt(n), by :func:`awd_nonnormal.analysis.mean_sem`
  (0.0 for a group of one checkpoint).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from . import __version__
from .analysis import (ACTIVATIONS, mean_sem, peak_order, pulse_deviation, shuffled_profiles, spectrum,
                       weight_profile)
from .checkpoint import CheckpointError, InitialWeightsFileError, load_checkpoint, load_initial
from .init import GATES, HH_PATTERN, INIT_PARAMS, recurrent_layers
from .runs import json_clean, write_text
from .progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "AnalysisError", "PosthocConfig", "Report", "CHECKPOINT_PATTERNS", "DEFAULT_GROUP_BY",
    "HEATMAP_ORDERS", "HEATMAP_CHOICES", "Layer", "find_layers", "initial_mismatch", "measure_layers", "discover",
    "checkpoint_fields", "resolve_field", "mean_sem", "aggregate_layers", "run", "format_table",
]

#: File names that a folder search takes for checkpoints: the task trainer writes
#: ``<run dir>/checkpoint.pt``, the language model ``<name>.pt`` (best model),
#: ``<name>.latest.pt`` and ``<name>.e<k>.pt``.
CHECKPOINT_PATTERNS: Tuple[str, ...] = ("*.pt", "*.pth")
#: Language-model checkpoints with these ``role`` values repeat a run's best model (``<name>.pt``,
#: role "best"); a folder search leaves them out unless a ``--filter`` names ``role``.
SECONDARY_ROLES = frozenset({"latest", "snapshot"})
#: Default grouping: one group per task (synthetic) or corpus (language model, by the fingerprint
#: of its vocabulary, so that two spellings of one corpus folder fall together), cell type and
#: initializer spec, so a sweep folder gives one row per model like the paper's Table 2 (runs that
#: differ only in gain, learning rate or seed fall together). Fields that no checkpoint has are
#: left out of the default.
DEFAULT_GROUP_BY: Tuple[str, ...] = ("task", "corpus", "rnn_type", "init")
HEATMAP_ORDERS = ("peak", "index")
HEATMAP_CHOICES = ("first", "all", "none")
MEASURES = ("henrici_raw", "henrici_normalized", "spectral_radius", "profile_plus1", "plus1_z")
#: Measures that carry a ``<name>_reliable`` flag per gate (see :func:`awd_nonnormal.analysis.spectrum`).
FLAGGED = {"henrici_raw": "henrici_reliable", "henrici_normalized": "henrici_reliable",
           "spectral_radius": "spectral_radius_reliable"}


class AnalysisError(ValueError):
    """Nothing to analyse: no checkpoint found, a filter that leaves nothing, an unknown field."""


@dataclass(frozen=True)
class PosthocConfig:
    """Everything :func:`run` needs, built once by the command line."""
    out: str = "analysis"                        # folder for the JSON and the figures
    json_path: Optional[str] = None              # default: <out>/analysis.json
    figures: bool = True
    heatmaps: str = "first"                      # first checkpoint of each group, all, none
    heatmap_order: str = "peak"                  # units in peak order, or in index order
    max_offset: Optional[int] = 20               # i - j range drawn in profile figures; None: all
    group_by: Optional[Tuple[str, ...]] = None   # None: DEFAULT_GROUP_BY; (): one group
    filters: Tuple[Tuple[str, str], ...] = ()    # (field, value) pairs, all must match
    only_successful: bool = False                # task runs with result.success only
    initial: bool = False                        # also analyse initial_rnn
    patterns: Tuple[str, ...] = CHECKPOINT_PATTERNS
    steps: int = 100                             # zero-input steps after the pulse (at least N are run)
    jitter: float = 1e-3                         # ties in peak time broken with U[0, jitter)
    seed: int = 0
    null_samples: int = 100                      # random unit orders of the shuffled-order null; 0: none
    progress: bool = True                        # a bar on a terminal, else a line per 30 s (stderr)

    def __post_init__(self) -> None:
        if self.heatmaps not in HEATMAP_CHOICES:
            raise ValueError(f"unknown heatmaps choice {self.heatmaps!r}; choose from: {', '.join(HEATMAP_CHOICES)}")
        if self.heatmap_order not in HEATMAP_ORDERS:
            raise ValueError(f"unknown heatmap order {self.heatmap_order!r}; choose from: {', '.join(HEATMAP_ORDERS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.jitter >= 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter}")
        if self.null_samples == 1 or self.null_samples < 0:
            raise ValueError(f"null samples must be 0 (no null) or >= 2, got {self.null_samples}")


# --------------------------------------------------------------------------------------------
# Layers of a state_dict
# --------------------------------------------------------------------------------------------



@dataclass(frozen=True)
class Layer:
    """One recurrent layer found in a state_dict."""
    name: str                    # e.g. "rnns.0.l0" (weight-drop's "_raw" and "module." removed)
    key: str                     # the state_dict key of its weight_hh
    cell: str                    # RNN, LSTM or GRU (from the block count)
    weight_hh: Tensor            # (G*N, N)
    weight_ih: Optional[Tensor]  # (G*N, d)
    bias_ih: Optional[Tensor]
    bias_hh: Optional[Tensor]


def find_layers(tensors: Mapping[str, Tensor], where: str = "checkpoint") -> List[Layer]:
    """Every recurrent layer of a state_dict, in state_dict order, via
    :func:`awd_nonnormal.init.recurrent_layers`. A weight-drop wrapper's ``weight_hh_l{k}_raw`` is
    the trained weight; should its module also hold a ``weight_hh_l{k}``, the raw one wins.
    Raises :class:`CheckpointError` (naming ``where``) for a weight_hh whose shape is no cell's and
    for input weights or biases that do not fit their weight_hh."""
    found: Dict[str, Layer] = {}
    try:
        layers = list(recurrent_layers(tensors))
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    for rl in layers:
        m = HH_PATTERN.match(rl.name)
        prefix = m["prefix"]
        if prefix.endswith("module."):
            prefix = prefix[: -len("module.")]
        name = f"{prefix}l{m['layer']}{m['suffix']}"
        if name in found and not m["raw"]:
            continue
        layer = Layer(name, rl.name, rl.cell, rl.weight_hh, rl.weight_ih, rl.bias_ih, rl.bias_hh)
        _check_fits(layer, where)
        found[name] = layer
    return list(found.values())


def _check_fits(layer: Layer, where: str) -> None:
    """weight_ih (G*N, d) and the biases (G*N,) must match weight_hh (G*N, N)."""
    rows = layer.weight_hh.shape[0]
    hh = tuple(layer.weight_hh.shape)
    ih = layer.weight_ih
    if ih is not None and (ih.dim() != 2 or ih.shape[0] != rows):
        raise CheckpointError(f"{where}: layer {layer.name}: weight_ih of shape {tuple(ih.shape)} does not "
                              f"fit weight_hh of shape {hh} (it needs {rows} rows)")
    for which, bias in (("bias_ih", layer.bias_ih), ("bias_hh", layer.bias_hh)):
        if bias is not None and tuple(bias.shape) != (rows,):
            raise CheckpointError(f"{where}: layer {layer.name}: {which} of shape {tuple(bias.shape)} does "
                                  f"not fit weight_hh of shape {hh} (it needs ({rows},))")


def initial_mismatch(initial: Mapping[str, Tensor], model_layers: Mapping[str, Layer],
                     where: str = "checkpoint") -> Optional[str]:
    """Why the initial weights ``initial`` (a state_dict of recurrent layers) cannot be the
    initial state of the model whose layers (by name) are ``model_layers``, or None when they can:
    the same layers, each of the same cell type and shape."""
    try:
        layers = {layer.name: layer for layer in find_layers(initial, f"{where} (initial weights)")}
    except CheckpointError as exc:
        return str(exc)
    if set(layers) != set(model_layers):
        return (f"the initial weights hold layers {sorted(layers) or 'none'}, the model "
                f"{sorted(model_layers)}")
    for name, layer in layers.items():
        model = model_layers[name]
        if layer.weight_hh.shape != model.weight_hh.shape:
            return (f"layer {name}'s weight_hh is {tuple(layer.weight_hh.shape)} in the initial weights "
                    f"but {tuple(model.weight_hh.shape)} in the model")
        if (layer.weight_ih is not None and model.weight_ih is not None
                and layer.weight_ih.shape != model.weight_ih.shape):
            return (f"layer {name}'s weight_ih is {tuple(layer.weight_ih.shape)} in the initial weights "
                    f"but {tuple(model.weight_ih.shape)} in the model")
    return None


def _plus1(offsets: Tensor, values: Tensor) -> float:
    at = values[offsets == 1]
    return float(at) if at.numel() else math.nan


def _measure_layer(layer: Layer, index: int, nonlinearity: Optional[str], steps: int, jitter: float,
                   generator: torch.Generator, where: str, null_samples: int = 0,
                   null_generator: Optional[torch.Generator] = None,
                   tick: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    gates = GATES[layer.cell]
    n = layer.weight_hh.shape[1]
    if layer.weight_ih is None:
        raise CheckpointError(f"{where}: layer {layer.name} has no weight_ih, so the pulse has no way in")
    # what the pulse adds to the bias-driven state, for max(steps, N) steps or until it dies out
    act = pulse_deviation(layer.weight_hh, layer.weight_ih, layer.bias_ih, layer.bias_hh, cell=layer.cell,
                          nonlinearity=nonlinearity or "tanh", steps=steps)    # (T, N)
    if not bool(torch.isfinite(act).all()):
        logger.warning("%s: layer %s: the pulse response overflows; peak times of the affected units "
                       "are unreliable", where, layer.name)
    order = peak_order(act, jitter=jitter, generator=generator, absolute=True)  # (N,)
    reached = (act != 0).any(dim=0)                                             # (N,)
    silent = int((~reached).sum())
    if silent:
        logger.info("%s: layer %s: the pulse never reaches %d of %d units within %d steps; they "
                    "come last, in jitter order", where, layer.name, silent, n, act.shape[0] - 1)
    peak_times = torch.where(reached, act.abs().argmax(dim=0), torch.full_like(reached, -1, dtype=torch.long))
    record: Dict[str, Any] = {
        "index": index, "name": layer.name, "key": layer.key, "cell": layer.cell,
        "nonlinearity": nonlinearity, "hidden_size": n, "input_size": int(layer.weight_ih.shape[1]),
        "order": order.tolist(), "peak_times": peak_times.tolist(), "silent_units": silent,
        "pulse_steps": act.shape[0] - 1, "gates": {},
    }
    for gate, block in zip(gates, layer.weight_hh.chunk(len(gates), dim=0)):   # (N, N) each
        if tick is not None:
            tick(f"{layer.name} gate {gate}")
        sp = spectrum(block)    # O(N^3), a few times over for the error estimate
        offsets, profile = weight_profile(block, order)
        entry = {
            "henrici_raw": sp.henrici.raw, "henrici_normalized": sp.henrici.normalized,
            "henrici_error": sp.henrici.error, "henrici_reliable": sp.henrici.reliable,
            "spectral_radius": sp.radius, "spectral_radius_error": sp.radius_error,
            "spectral_radius_reliable": sp.radius_reliable, "eigenvalue_method": sp.method,
            "frobenius_norm": sp.fro, "offsets": offsets.tolist(), "profile": profile.tolist(),
            "profile_plus1": _plus1(offsets, profile),
            "null_plus1_mean": math.nan, "null_plus1_std": math.nan, "plus1_z": math.nan,
        }
        if null_samples and n > 1:
            null = shuffled_profiles(block, null_samples, null_generator, offsets=(1,))
            mean, std = float(null.mean[0]), float(null.std[0])
            entry.update(null_plus1_mean=mean, null_plus1_std=std,
                         plus1_z=(entry["profile_plus1"] - mean) / std if std > 0 else math.nan)
        for what, flag in (("Henrici index", "henrici_reliable"), ("spectral radius", "spectral_radius_reliable")):
            if not entry[flag]:
                logger.warning("%s: layer %s gate %s: the %s is unreliable (its eigenvalues are "
                               "ill-conditioned; estimated error %.3g)", where, layer.name, gate, what,
                               entry["henrici_error" if flag == "henrici_reliable" else "spectral_radius_error"])
        record["gates"][gate] = entry
    return record


def measure_layers(tensors: Mapping[str, Tensor], arch: Mapping[str, Any], *, steps: int = 100,
                   jitter: float = 1e-3, seed: int = 0, null_samples: int = 0, where: str = "checkpoint",
                   fallback: Optional[Mapping[str, Layer]] = None,
                   tick: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """Henrici index, spectral radius and weight profile of every gate of every layer in
    ``tensors`` (a state_dict), with each layer's peak order. Returns one record (plain data) per
    layer, in state_dict order.

    ``arch`` gives the cell type (checked against the block count) and the vanilla RNN's
    nonlinearity. ``fallback`` (layers by name) lends input weights and biases to layers that lack
    them, as ``initial_rnn`` might. ``tick(label)`` is called before each gate block (progress).
    ``null_samples`` random unit orders give each gate's shuffled-order null of the profile at
    ``i - j = +1`` (none for 0).
    """
    layers = find_layers(tensors, where)
    if not layers:
        raise CheckpointError(f"{where}: no recurrent layer (no weight_hh_l<k>) in the weights")
    rnn_type = arch.get("rnn_type")
    nonlinearity = arch.get("nonlinearity")
    generator = torch.Generator().manual_seed(seed)
    null_generator = torch.Generator().manual_seed(seed + 1)
    records = []
    for index, layer in enumerate(layers):
        if rnn_type and layer.cell != rnn_type:
            raise CheckpointError(f"{where}: arch says rnn_type {rnn_type!r}, but {layer.key} of shape "
                                  f"{tuple(layer.weight_hh.shape)} is a {layer.cell}")
        if layer.weight_ih is None and fallback and layer.name in fallback:
            lender = fallback[layer.name]
            if lender.weight_hh.shape != layer.weight_hh.shape:
                raise CheckpointError(f"{where}: layer {layer.name} has no input weights and cannot borrow "
                                      f"the model's: its weight_hh is {tuple(layer.weight_hh.shape)}, the "
                                      f"model's {tuple(lender.weight_hh.shape)}")
            logger.warning("%s: layer %s has no input weights; the pulse uses the trained model's",
                           where, layer.name)
            layer = Layer(layer.name, layer.key, layer.cell, layer.weight_hh, lender.weight_ih,
                          layer.bias_ih if layer.bias_ih is not None else lender.bias_ih,
                          layer.bias_hh if layer.bias_hh is not None else lender.bias_hh)
        nl = None
        if layer.cell == "RNN":
            nl = nonlinearity
            if nl is None:
                logger.warning("%s: arch gives no nonlinearity for the vanilla RNN; assuming tanh", where)
                nl = "tanh"
            if nl not in ACTIVATIONS:
                raise CheckpointError(f"{where}: unknown nonlinearity {nl!r} in arch; known: "
                                      f"{', '.join(ACTIVATIONS)}")
        records.append(_measure_layer(layer, index, nl, steps, jitter, generator, where, null_samples,
                                      null_generator, tick))
    return records


# --------------------------------------------------------------------------------------------
# Finding checkpoint files
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    path: Path
    explicit: bool   # named on the command line (or by a glob): a foreign file is an error


def _search(folder: Path, patterns: Sequence[str]) -> List[Path]:
    files = set()
    for pattern in patterns:
        for p in folder.rglob(pattern):
            rel = p.relative_to(folder).parts
            if p.is_file() and not any(part.startswith(".") for part in rel):
                files.add(p)
    return sorted(files)


def discover(args: Sequence[str], patterns: Sequence[str] = CHECKPOINT_PATTERNS) -> List[Candidate]:
    """Files to analyse from the command-line arguments: files as named, folders searched
    recursively for ``patterns`` (hidden files and folders skipped), and glob patterns (``*``,
    ``?``, ``[...]``, ``**``) expanded here, so a quoted pattern works as well as one the shell
    expanded. A file reached by a name or a glob counts as named explicitly."""
    out: List[Candidate] = []
    seen = set()

    def add(path: Path, explicit: bool) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(Candidate(path, explicit))

    def add_folder(folder: Path) -> None:
        files = _search(folder, patterns)
        if not files:
            raise AnalysisError(f"{folder}: no checkpoint files ({' '.join(patterns)}) in this folder "
                                f"or below")
        logger.info("%s: %d candidate checkpoint file(s)", folder, len(files))
        for f in files:
            add(f, False)

    if not args:
        raise AnalysisError("no checkpoint given")
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            add_folder(path)
        elif path.exists():
            add(path, True)
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise AnalysisError(f"{arg}: the pattern matches no file")
            for m in matches:
                if Path(m).is_dir():
                    add_folder(Path(m))
                else:
                    add(Path(m), True)
        else:
            raise AnalysisError(f"{arg}: no such file or folder")
    return out


# --------------------------------------------------------------------------------------------
# Fields of a checkpoint (for grouping and filtering)
# --------------------------------------------------------------------------------------------

def _flatten(prefix: str, value: Any, out: Dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (str, int, float, bool)) or value is None:
        out[prefix] = value
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
        out[prefix] = ",".join(str(v) for v in value)


#: Top-level entries that are weights or state, not descriptive fields.
_NOT_FIELDS = frozenset({"format", "version", "model", "optimizer", "rng", "initial_rnn", "initial_rnn_file",
                         "position", "bptt_rng", "metrics", "permutation", "corpus"})
#: Short names whose full name differs between kinds (task, language model) and checkpoint
#: versions: the first candidate a checkpoint has is taken.
FIELD_ALIASES: Dict[str, Tuple[str, ...]] = {
    "init": ("config.init.spec", "config.model.init.spec", "config.init", "config.model.init"),
    "init_zero_bias": ("config.init.zero_bias", "config.model.init.zero_bias", "config.model.init_zero_bias"),
    **{f"init_{k}": (f"config.init.params.{k}", f"config.model.init.params.{k}", f"config.init_{k}",
                     f"config.model.init_params.{k}") for k in INIT_PARAMS},
}
#: Where any other short name is looked up, in this order (``seed`` -> ``config.seed`` of a task
#: run, ``config.train.seed`` of a language model).
FIELD_SECTIONS = ("arch", "config", "config.model", "config.train", "result")


def checkpoint_fields(ckpt: Mapping[str, Any], path: Path) -> Dict[str, Any]:
    """The scalar fields a user may group or filter by, with dotted names: ``path``, ``run`` (the
    checkpoint's folder name), ``file``, every scalar at the top level (``kind``, ``epoch``,
    ``role``, ``best_val``, ...), and the scalars of every dictionary entry flattened
    (``arch.rnn_type``, ``config.init.spec``, ``config.model.init.spec``, ``result.success``, ...)."""
    fields: Dict[str, Any] = {"path": str(path), "run": path.parent.name, "file": path.name}
    for key, value in ckpt.items():
        if key not in _NOT_FIELDS:
            _flatten(str(key), value, fields)
    corpus = _corpus(fields)
    if corpus is not None:
        fields["corpus"] = corpus
    return fields


def _corpus(fields: Mapping[str, Any]) -> Optional[str]:
    """A language model's corpus: the fingerprint of its vocabulary (``vocab_fingerprint``), so
    that ``data/toy``, ``data/toy/`` and ``/abs/path/data/toy`` are one corpus; without one, the
    ``data`` path with trailing separators and ``.`` parts removed. None for other checkpoints."""
    fingerprint = fields.get("vocab_fingerprint")
    if isinstance(fingerprint, str) and fingerprint:
        return fingerprint
    data = fields.get("config.train.data", fields.get("config.data"))
    if isinstance(data, str) and data and fields.get("kind") == "lm":
        return os.path.normpath(data)
    return None


def _corpus_label(value: str, recs: Sequence[Mapping[str, Any]]) -> str:
    """How a corpus reads in a group label: its folder name(s) and, for a fingerprint, its first
    8 hex digits (``toy [1a2b3c4d]``)."""
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        return value
    names = sorted({os.path.basename(os.path.normpath(d)) for r in recs
                    for d in [r["fields"].get("config.train.data", r["fields"].get("config.data"))]
                    if isinstance(d, str) and d})
    return f"{'|'.join(names) or 'corpus'} [{value[:8]}]"


_MISSING = object()


def resolve_field(fields: Mapping[str, Any], name: str) -> Any:
    """The value of ``name`` in ``fields``: an exact dotted name (``config.lr``), a short name of
    :data:`FIELD_ALIASES` (``init`` -> ``config.init.spec`` or ``config.model.init.spec``), or
    a short name looked up in the :data:`FIELD_SECTIONS` in order. Returns ``_MISSING`` when
    there is no match."""
    if name in fields:
        return fields[name]
    for candidate in FIELD_ALIASES.get(name) or tuple(f"{s}.{name}" for s in FIELD_SECTIONS):
        if candidate in fields:
            return fields[candidate]
    return _MISSING


def _same(value: Any, wanted: str) -> bool:
    """Filter comparison: numbers numerically, booleans from true/false/1/0, else as text."""
    if isinstance(value, bool):
        return wanted.strip().lower() in (("true", "1", "yes") if value else ("false", "0", "no"))
    if isinstance(value, (int, float)):
        try:
            return float(wanted) == float(value)
        except ValueError:
            return False
    if value is None:
        return wanted.strip().lower() in ("none", "null", "")
    return str(value) == wanted


def _successful(ckpt: Mapping[str, Any]) -> Optional[bool]:
    """``result.success`` of a task checkpoint; computed from ``final_val_loss < 0.5 * baseline``
    where the flag is absent; None when the checkpoint holds no result (a language model)."""
    result = ckpt.get("result")
    if not isinstance(result, Mapping):
        return None
    if "success" in result:
        return bool(result["success"])
    loss, base = result.get("final_val_loss"), result.get("baseline")
    if isinstance(loss, (int, float)) and isinstance(base, (int, float)):
        return loss < 0.5 * base
    return None


def _fmt_value(v: Any) -> str:
    if v is _MISSING:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------

def _profile_stats(entries: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Mean and s.e.m. per offset i - j over profiles that may differ in length (hidden sizes):
    each offset uses the profiles that have it."""
    lo = min(e["offsets"][0] for e in entries)
    hi = max(e["offsets"][-1] for e in entries)
    grid = np.full((len(entries), hi - lo + 1), np.nan)
    for row, e in zip(grid, entries):
        row[e["offsets"][0] - lo: e["offsets"][-1] - lo + 1] = e["profile"]
    count = np.isfinite(grid).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(grid, axis=0) / count
        dev = np.where(np.isfinite(grid), grid - mean, 0.0)
        var = (dev ** 2).sum(axis=0) / (count - 1)
        sem = np.where(count > 1, np.sqrt(var / count), np.nan)
    return {"offsets": list(range(lo, hi + 1)), "mean": mean.tolist(), "sem": sem.tolist(),
            "n": count.tolist()}


def aggregate_layers(runs: Sequence[Optional[Sequence[Mapping[str, Any]]]]) -> List[Dict[str, Any]]:
    """Aggregate per-layer records of several checkpoints (each a list from
    :func:`measure_layers`, or None to skip) layer by layer (by position in the stack) and gate
    by gate: mean and s.e.m. of every measure and of the weight profile."""
    runs = [r for r in runs if r is not None]
    depth = max((len(r) for r in runs), default=0)
    out = []
    for index in range(depth):
        layer_recs = [r[index] for r in runs if len(r) > index]
        names = sorted({rec["name"] for rec in layer_recs})
        sizes = sorted({rec["hidden_size"] for rec in layer_recs})
        if len(sizes) > 1:
            logger.warning("layer %d: hidden sizes differ within a group (%s); profiles are averaged "
                           "per offset over the networks that have it", index, sizes)
        gates: Dict[str, Any] = {}
        for gate in dict.fromkeys(g for rec in layer_recs for g in rec["gates"]):
            entries = [rec["gates"][gate] for rec in layer_recs if gate in rec["gates"]]
            stats: Dict[str, Any] = {"n": len(entries)}
            for m in MEASURES:
                mean, sem = mean_sem(e.get(m, math.nan) for e in entries)
                stats[m] = {"mean": mean, "sem": sem}
                if m in FLAGGED:
                    stats[m]["n_unreliable"] = sum(not e.get(FLAGGED[m], True) for e in entries)
            stats["profile"] = _profile_stats(entries)
            gates[gate] = stats
        out.append({"index": index, "names": names, "cells": sorted({r["cell"] for r in layer_recs}),
                    "hidden_sizes": sizes, "n": len(layer_recs), "gates": gates})
    return out


# --------------------------------------------------------------------------------------------
# The whole analysis
# --------------------------------------------------------------------------------------------

@dataclass
class Report:
    """What :func:`run` produced. ``data`` is exactly what the JSON file holds (NaN as null)."""
    data: Dict[str, Any]
    json_path: Optional[Path] = None
    figures: List[Path] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)        # (path, reason)
    missing_initial: List[str] = field(default_factory=list)            # paths without initial_rnn
    filtered_out: int = 0
    secondary: int = 0      # latest/snapshot language-model checkpoints left out of folder searches


def _group_labels(keys: Sequence[Tuple[str, ...]]) -> Dict[Tuple[str, ...], str]:
    """Row labels: the key's values joined by spaces, leaving out missing ones ("-") unless that
    would make two labels equal."""
    short = {k: " ".join(v for v in k if v != "-") or "all" for k in keys}
    if len(set(short.values())) == len(short):
        return short
    return {k: " ".join(k) or "all" for k in keys}


def _natural_key(key: Tuple[str, ...]) -> Tuple[Tuple[int, float, str], ...]:
    """Sort key of a group key: numbers by value before text, text alphabetically."""
    out = []
    for v in key:
        try:
            out.append((0, float(v), v))
        except ValueError:
            out.append((1, 0.0, v))
    return tuple(out)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "all"


def _layer_tensors(tensors: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The weight_hh of every layer by name (for heat maps)."""
    return {layer.name: layer.weight_hh.detach().float().clone() for layer in find_layers(tensors)}


def _safe_load(path: Path) -> Dict[str, Any]:
    """:func:`load_checkpoint`, with any other failure of torch's safe unpickler on a damaged or
    foreign file (it raises KeyError, IndexError, ... on some byte sequences) turned into a
    :class:`CheckpointError`. The safe unpickler never runs code from the file."""
    try:
        return load_checkpoint(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the bytes provoke, it is a bad file
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, corrupted or foreign "
                              f"file): {type(exc).__name__}: {exc}".splitlines()[0]) from None


def _skip_unless_explicit(cand: Candidate, exc: CheckpointError, report: Report) -> None:
    """A file named on the command line that cannot be analysed is an error; one found in a
    folder search is skipped with a warning."""
    if cand.explicit:
        raise exc
    logger.warning("skipping %s", exc)
    report.skipped.append((str(cand.path), str(exc)))


def run(args: Sequence[str], cfg: PosthocConfig = PosthocConfig()) -> Report:
    """Find, load, filter, measure, group and aggregate the checkpoints named by ``args``; write
    the JSON (and the figures unless ``cfg.figures`` is off). Raises :class:`CheckpointError` for
    an explicitly named file that is not a readable checkpoint of ours, and
    :class:`AnalysisError` when nothing is left to analyse."""
    candidates = discover(args, cfg.patterns)
    report = Report(data={})
    records: List[Dict[str, Any]] = []
    heat: Dict[int, Dict[str, Any]] = {}      # record index -> {"trained": {...}, "initial": {...}}
    first_of_key: set = set()
    seen_fields: set = set()
    filter_keys_seen: set = set()
    n_no_result = 0

    # progress over the checkpoints, naming the gate block in hand (a large LSTM takes minutes):
    # a bar on a terminal, a line per interval in a log
    bar = progress_bar(candidates, desc="analysing", unit="ckpt", enabled=cfg.progress, leave=False)
    tick = lambda label: bar.set_postfix_str(label, refresh=True)  # noqa: E731
    for i, cand in enumerate(bar):
        where = str(cand.path)
        try:
            ckpt = _safe_load(cand.path)
            if not isinstance(ckpt["model"], Mapping):
                raise CheckpointError(f"{where}: 'model' is not a state_dict")
        except InitialWeightsFileError:
            if cand.explicit:
                raise
            logger.info("%s: left out (a run's initial weights; --initial reads them through its "
                        "checkpoints)", where)
            continue
        except CheckpointError as exc:
            _skip_unless_explicit(cand, exc, report)
            continue
        fields = checkpoint_fields(ckpt, cand.path)
        seen_fields.update(fields)
        if (not cand.explicit and ckpt.get("role") in SECONDARY_ROLES
                and not any(key == "role" for key, _ in cfg.filters)):
            logger.info("%s: left out (role %r; the run's best model is analysed instead)", where, ckpt["role"])
            report.secondary += 1
            continue
        # filters
        values = {key: resolve_field(fields, key) for key, _ in cfg.filters}
        filter_keys_seen.update(k for k, v in values.items() if v is not _MISSING)
        if cfg.only_successful:
            ok = _successful(ckpt)
            if ok is None:
                n_no_result += 1
            if not ok:
                report.filtered_out += 1
                logger.info("%s: left out (not a successful task run)", where)
                continue
        if not all(values[key] is not _MISSING and _same(values[key], want) for key, want in cfg.filters):
            report.filtered_out += 1
            logger.info("%s: left out by --filter", where)
            continue
        logger.info("analysing %s (%d/%d)", where, i + 1, len(candidates))
        initial = None
        initial_tensors, initial_problem = None, "holds no initial_rnn"
        if cfg.initial:
            try:
                initial_tensors = load_initial(ckpt, cand.path)
            except CheckpointError as exc:
                initial_problem = f"has no readable initial weights ({exc})"
        has_initial = isinstance(initial_tensors, Mapping) and bool(initial_tensors)
        try:
            trained = measure_layers(ckpt["model"], ckpt["arch"], steps=cfg.steps, jitter=cfg.jitter,
                                     seed=cfg.seed, null_samples=cfg.null_samples, where=where, tick=tick)
            if cfg.initial and has_initial:
                lenders = {layer.name: layer for layer in find_layers(ckpt["model"], where)}
                mismatch = initial_mismatch(initial_tensors, lenders, where)
                if mismatch is not None:
                    has_initial = False
                    initial_problem = f"has initial weights that do not fit its model ({mismatch})"
            if cfg.initial and has_initial:
                initial = measure_layers(initial_tensors, ckpt["arch"], steps=cfg.steps, jitter=cfg.jitter,
                                         seed=cfg.seed, null_samples=cfg.null_samples,
                                         where=f"{where} (initial_rnn)", fallback=lenders,
                                         tick=lambda label: tick(f"initial {label}"))
        except CheckpointError as exc:
            _skip_unless_explicit(cand, exc, report)
            continue
        if cfg.initial and not has_initial:
            logger.warning("%s %s: its initial weights cannot be analysed", where, initial_problem)
            report.missing_initial.append(where)
        rec = {"path": where, "kind": ckpt["kind"], "arch": json_clean(dict(ckpt["arch"])),
               "result": json_clean(dict(ckpt["result"])) if isinstance(ckpt.get("result"), Mapping) else None,
               "fields": fields, "layers": trained, "initial": initial,
               "initial_missing": cfg.initial and initial is None}
        records.append(rec)
        if cfg.figures and cfg.heatmaps != "none":
            # the group key is final only once every checkpoint is read; the raw tuple of the
            # requested fields partitions the checkpoints the same way, so use it to spot firsts
            raw_key = tuple(_fmt_value(resolve_field(fields, f))
                            for f in (cfg.group_by if cfg.group_by is not None else DEFAULT_GROUP_BY))
            if cfg.heatmaps == "all" or raw_key not in first_of_key:
                first_of_key.add(raw_key)
                heat[len(records) - 1] = {
                    "trained": _layer_tensors(ckpt["model"]),
                    "initial": _layer_tensors(initial_tensors) if initial is not None else None,
                }
        del ckpt

    if not records:
        reasons = []
        if report.secondary:
            reasons.append(f"{report.secondary} language-model file(s) with role latest/snapshot left out "
                           f"(name them, or use --filter role=...)")
        if report.skipped:
            reasons.append(f"{len(report.skipped)} file(s) skipped as not ours or unreadable")
        if report.filtered_out:
            what = []
            if cfg.only_successful:
                what.append("--only-successful" + (f" ({n_no_result} without a task result)" if n_no_result else ""))
            for key, want in cfg.filters:
                if key not in filter_keys_seen:
                    raise AnalysisError(f"--filter {key}={want}: no checkpoint has a field {key!r}; "
                                        f"fields: {', '.join(sorted(seen_fields))}")
                what.append(f"--filter {key}={want}")
            reasons.append(f"{report.filtered_out} checkpoint(s) left out by {', '.join(what)}")
        raise AnalysisError("no checkpoint left to analyse" + (": " + "; ".join(reasons) if reasons else ""))
    if cfg.only_successful and n_no_result:
        logger.warning("--only-successful: %d checkpoint(s) hold no task result (language models or "
                       "unfinished runs) and were left out", n_no_result)

    # grouping
    if cfg.group_by is None:
        group_by = [f for f in DEFAULT_GROUP_BY
                    if any(resolve_field(r["fields"], f) is not _MISSING for r in records)]
    else:
        group_by = list(cfg.group_by)
        for f in group_by:
            if all(resolve_field(r["fields"], f) is _MISSING for r in records):
                raise AnalysisError(f"--group-by {f}: no checkpoint has a field {f!r}; fields: "
                                    f"{', '.join(sorted(seen_fields))}")
    unsorted: Dict[Tuple[str, ...], List[int]] = {}
    for idx, r in enumerate(records):
        key = tuple(_fmt_value(resolve_field(r["fields"], f)) for f in group_by)
        unsorted.setdefault(key, []).append(idx)
    groups = {key: unsorted[key] for key in sorted(unsorted, key=_natural_key)}
    shown = {key: tuple(_corpus_label(v, [records[i] for i in members]) if f == "corpus" else v
                        for f, v in zip(group_by, key))
             for key, members in groups.items()}
    by_shown = _group_labels(list(dict.fromkeys(shown.values())))
    labels = {key: by_shown[shown[key]] for key in groups}
    for key, members in groups.items():
        for idx in members:
            records[idx]["group"] = labels[key]

    group_data = []
    for key, members in groups.items():
        recs = [records[i] for i in members]
        successes = [r["result"].get("success") for r in recs if r["result"] is not None]
        g = {"label": labels[key], "key": dict(zip(group_by, key)), "n": len(recs),
             "checkpoints": [r["path"] for r in recs],
             "n_successful": sum(bool(s) for s in successes) if successes else None,
             "layers": aggregate_layers([r["layers"] for r in recs])}
        if cfg.initial:
            with_initial = [r["initial"] for r in recs if r["initial"] is not None]
            g["n_initial"] = len(with_initial)
            g["initial"] = aggregate_layers(with_initial) if with_initial else None
        group_data.append(g)

    settings = {k: v for k, v in asdict(cfg).items()}
    settings["group_by"] = group_by
    report.data = json_clean({
        "awd_nonnormal_version": __version__,
        "settings": settings,
        "groups": group_data,
        "checkpoints": records,
        "skipped": [{"path": p, "reason": why} for p, why in report.skipped],
        "missing_initial": report.missing_initial,
    })

    out = Path(cfg.out)
    json_path = Path(cfg.json_path) if cfg.json_path else out / "analysis.json"
    text = json.dumps(report.data, indent=1, allow_nan=False)
    write_text(json_path, text)
    report.json_path = json_path
    logger.info("wrote %s", json_path)

    if cfg.figures:
        report.figures = _draw(report.data, groups, records, heat, cfg, out)
    return report


def _draw(data: Mapping[str, Any], groups: Mapping[Tuple[str, ...], List[int]], records: List[Dict[str, Any]],
          heat: Mapping[int, Mapping[str, Any]], cfg: PosthocConfig, out: Path) -> List[Path]:
    """Profile figures per group and layer, heat maps for the checkpoints in ``heat``."""
    from . import plots

    paths: List[Path] = []
    used: set = set()
    for g, members in zip(data["groups"], groups.values()):
        slug = base = _slug(g["label"])
        k = 1
        while slug in used:
            k += 1
            slug = f"{base}-{k}"
        used.add(slug)
        for layer in g["layers"]:
            init_layer = None
            if cfg.initial and g.get("initial") and len(g["initial"]) > layer["index"]:
                init_layer = g["initial"][layer["index"]]
            panels = {}
            for gate, st in layer["gates"].items():
                curves = [(f"trained (n={st['n']})", st["profile"]["offsets"], st["profile"]["mean"],
                           st["profile"]["sem"])]
                if init_layer is not None and gate in init_layer["gates"]:
                    ist = init_layer["gates"][gate]
                    curves.append((f"initial (n={ist['n']})", ist["profile"]["offsets"], ist["profile"]["mean"],
                                   ist["profile"]["sem"]))
                panels[gate] = curves
            title = f"{g['label']}: layer {layer['index']} ({', '.join(layer['names'])}), n = {layer['n']}"
            paths.append(plots.weight_profile_figure(panels, out / f"profile_{slug}_layer{layer['index']}.png",
                                                     title=title, max_offset=cfg.max_offset))
        for idx in members:
            if idx not in heat:
                continue
            rec = records[idx]
            run_slug = _slug(f"{Path(rec['path']).parent.name}_{Path(rec['path']).stem}")
            for layer in rec["layers"]:
                rows = {}
                for which, recs_layers in (("trained", rec["layers"]), ("initial", rec["initial"])):
                    mats = heat[idx].get(which) or {}
                    lrec = next((r for r in recs_layers or [] if r["name"] == layer["name"]), None)
                    if lrec is None or layer["name"] not in mats:
                        continue
                    order = (torch.tensor(lrec["order"]) if cfg.heatmap_order == "peak"
                             else torch.arange(lrec["hidden_size"]))
                    gates = GATES[lrec["cell"]]
                    blocks = mats[layer["name"]].chunk(len(gates), dim=0)
                    rows[which] = {gate: b[order][:, order].numpy() for gate, b in zip(gates, blocks)}
                title = (f"{rec['path']}: layer {layer['index']} ({layer['name']}), units in "
                         f"{'peak' if cfg.heatmap_order == 'peak' else 'index'} order")
                paths.append(plots.weight_heatmap_figure(
                    rows, out / f"heatmap_{slug}_{run_slug}_layer{layer['index']}.png", title=title,
                    order=cfg.heatmap_order))
    return paths


# --------------------------------------------------------------------------------------------
# The table (Table 2 style)
# --------------------------------------------------------------------------------------------

def _pm(stat: Optional[Mapping[str, Any]]) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    sem = stat.get("sem")
    mark = " *" if stat.get("n_unreliable") else ""
    return f"{stat['mean']:.3f} +- {'n/a' if sem is None else f'{sem:.3f}'}{mark}"


def format_table(data: Mapping[str, Any]) -> str:
    """The aggregated measures as a text table: one row per group, layer and gate, with n and
    mean +- s.e.m. of the Henrici index (raw and normalised), the spectral radius, the profile at
    ``i - j = +1`` and its distance from the shuffled-order null in null standard deviations; with
    the initial weights' values beside the trained ones when they were analysed. A ``*`` marks a
    mean over values of which some are unreliable (ill-conditioned eigenvalues)."""
    initial = bool(data["settings"].get("initial"))
    heads = ["group", "layer", "gate", "n"]
    cols = [("henrici_raw", "d(W)"), ("henrici_normalized", "d(W)/|W|_F"), ("spectral_radius", "rho(W)"),
            ("profile_plus1", "p(+1)"), ("plus1_z", "z(+1)")]
    for _, label in cols:
        heads += [f"{label} initial", f"{label} trained"] if initial else [label]
    rows = []
    unreliable = False
    for g in data["groups"]:
        init_layers = g.get("initial") or []
        for layer in g["layers"]:
            il = init_layers[layer["index"]] if len(init_layers) > layer["index"] else None
            for gate, st in layer["gates"].items():
                ist = il["gates"].get(gate) if il else None
                n = str(st["n"]) + (f" ({ist['n'] if ist else 0} init)" if initial else "")
                row = [g["label"], str(layer["index"]), gate, n]
                for key, _ in cols:
                    row += [_pm(ist.get(key) if ist else None), _pm(st.get(key))] if initial else [_pm(st.get(key))]
                unreliable = unreliable or any(v.endswith(" *") for v in row)
                rows.append(row)
    widths = [max(len(h), *(len(r[c]) for r in rows)) if rows else len(h) for c, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    group_by = data["settings"].get("group_by") or []
    lines.append(f"groups by: {', '.join(group_by) if group_by else '(one group)'}; "
                 "mean +- s.e.m. (std ddof=1 / sqrt n; 0 for n = 1); p(+1): mean weight at i - j = +1 "
                 "in peak order; z(+1): (p(+1) - null mean) / null std over random unit orders")
    if unreliable:
        lines.append("* includes values marked unreliable: ill-conditioned eigenvalues, estimated error "
                     "> 1 % (see henrici_error, spectral_radius_error in the JSON)")
    return "\n".join(lines)
