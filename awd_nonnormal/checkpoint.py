"""One checkpoint format for every model the project trains.

A checkpoint is a plain dictionary of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(path, map_location="cpu", weights_only=True)`` and loading one never runs code. It is
written atomically (a temporary file in the same folder, flushed, then renamed over the target),
so a crash or Ctrl-C during a save leaves the previous checkpoint intact.

Required keys (written by :func:`save_checkpoint`):

``format``   ``"awd-nonnormal"``, which marks the file as ours
``version``  :data:`SCHEMA_VERSION` (2; version 1 is read too, see below)
``kind``     ``"lm"`` (language model) or ``"task"`` (synthetic task)
``arch``     ``{"rnn_type": "LSTM"|"GRU"|"RNN", "nonlinearity": str|None, ...}``, enough for
             analysis to interpret the recurrent weights without rebuilding the model
``config``   the run's configuration as a dict
``model``    the model's ``state_dict``

Usual optional keys: ``optimizer`` (state_dict), ``epoch``, ``best_val``, ``rng`` (see
:func:`rng_state`), ``metrics``, ``initial_rnn`` (the recurrent layers' weights at initialisation,
for before/after analysis) and ``vocab_fingerprint``.

Versions: 2 holds the init options nested in the config (``config.init`` or
``config.model.init`` = ``{"spec", "params", "zero_bias", "plugins"}``, see
:class:`awd_nonnormal.init.InitOptions`) and the non-finite counters (``non_finite``); version 1
held them flat (``init`` a spec string beside ``init_scale``/``init_params``...). Both load: the
configs' ``from_dict`` read the flat keys.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch

__all__ = ["FORMAT", "SCHEMA_VERSION", "KINDS", "CheckpointError", "save_checkpoint",
           "load_checkpoint", "atomic_write", "rng_state", "set_rng_state"]

FORMAT = "awd-nonnormal"
SCHEMA_VERSION = 2
#: The oldest version this code reads.
OLDEST_VERSION = 1
KINDS = ("lm", "task")
_REQUIRED = ("format", "version", "kind", "arch", "config", "model")

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A file that is not a readable awd-nonnormal checkpoint."""


def atomic_write(path: PathLike, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _to_cpu(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached CPU copies that keep shared storage shared (tied weights are stored once)."""
    copies: Dict[Any, torch.Tensor] = {}
    out = {}
    for k, v in tensors.items():
        key = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), v.stride(), v.storage_offset())
        if key not in copies:
            copies[key] = v.detach().cpu()
        out[k] = copies[key]
    return out


def save_checkpoint(path: PathLike, *, kind: str, arch: Mapping[str, Any], config: Mapping[str, Any],
                    model: Mapping[str, torch.Tensor], **extra: Any) -> Path:
    """Write a checkpoint atomically. ``extra`` holds the optional keys (``optimizer``, ``epoch``,
    ``best_val``, ``rng``, ...); values must be plain data (tensors, numbers, strings, containers)."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KINDS)}")
    payload: Dict[str, Any] = {
        "format": FORMAT, "version": SCHEMA_VERSION, "kind": kind,
        "arch": dict(arch), "config": dict(config),
        "model": _to_cpu(model),
        **extra,
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: PathLike, kind: Optional[str] = None) -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check that it is ours.

    Raises :class:`CheckpointError` with the reason for a missing, truncated or foreign file, or one
    of another ``kind`` than asked for.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol is reported below instead
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: not an awd-nonnormal checkpoint: it holds objects that a safe "
                              f"load refuses (a pickled model from other code?): {exc}".splitlines()[0]) from None
    except Exception as exc:  # the safe unpickler raises many kinds on junk bytes (KeyError too)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted, or not a "
                              f"checkpoint at all): {detail}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an awd-nonnormal checkpoint (no '{FORMAT}' format marker)")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if not isinstance(ckpt["version"], int) or ckpt["version"] < OLDEST_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt['version']!r} is not one this code "
                              f"reads ({OLDEST_VERSION} to {SCHEMA_VERSION})")
    if ckpt["version"] > SCHEMA_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt['version']} is newer than this code "
                              f"understands ({SCHEMA_VERSION}); upgrade awd-nonnormal")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"{path}: a {ckpt['kind']!r} checkpoint, expected {kind!r}")
    return ckpt


def rng_state() -> Dict[str, Any]:
    """The states of every random generator a run draws from, as plain data."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of ints, gauss_next): plain data
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
