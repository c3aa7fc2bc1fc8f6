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
for before/after analysis) or ``initial_rnn_file`` (the name of a file beside the checkpoint that
holds them, written once per run by :func:`save_initial`; read either way with
:func:`load_initial`) and ``vocab_fingerprint``.

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
import re
import secrets
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch

__all__ = ["FORMAT", "SCHEMA_VERSION", "KINDS", "CheckpointError", "InitialWeightsFileError", "save_checkpoint",
           "load_checkpoint", "save_initial", "load_initial", "atomic_write", "rng_state",
           "set_rng_state"]

FORMAT = "awd-nonnormal"
SCHEMA_VERSION = 2
#: The oldest version this code reads.
OLDEST_VERSION = 1
KINDS = ("lm", "task")
_REQUIRED = ("format", "version", "kind", "arch", "config", "model")

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A file that is not a readable awd-nonnormal checkpoint."""


class InitialWeightsFileError(CheckpointError):
    """A run's initial-weights file (:func:`save_initial`) where a checkpoint was expected: ours,
    but read through the checkpoints that name it, not on its own."""


def _create_temp(folder: Path, name: str) -> str:
    """Create a new empty ``.NAME.<random>.tmp`` in ``folder`` with the mode an ordinary file
    gets (0666 less the umask; ``tempfile.mkstemp`` would make it 0600)."""
    while True:
        tmp = str(folder / f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: PathLike, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path`` and fsync the folder (so that the rename, too, survives a power cut): readers see the
    old file or the new one, never half of one. The file gets the mode of an ordinary new file
    (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path.parent, path.name)
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
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """fsync a folder's entry list (POSIX); skipped where a folder cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself has happened
        pass
    finally:
        os.close(fd)


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
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path}: not a checkpoint (not a file written by torch.save)")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol is reported below instead
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False, which would run the file's code: not quoted
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: not an awd-nonnormal checkpoint: it holds objects{what} that "
                              f"a safe load refuses (a pickled model from other code?)") from None
    except Exception as exc:  # the safe unpickler raises many kinds on junk bytes (KeyError too)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted): "
                              f"{detail}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an awd-nonnormal checkpoint (no '{FORMAT}' format marker)")
    if ckpt.get("kind") == INITIAL_KIND:
        raise InitialWeightsFileError(f"{path}: a run's initial-weights file, not a checkpoint; it is read "
                                      f"through the run's checkpoints (analyze.py CHECKPOINT --initial)")
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


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip file (``PK\\x03\\x04``); its legacy format and plain pickles start
    with the pickle PROTO opcode (``\\x80``). Text, JSON and other files do neither."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


INITIAL_KIND = "initial"  # the kind of a run's initial-weights file (not a model checkpoint)


def save_initial(path: PathLike, initial_rnn: Mapping[str, torch.Tensor]) -> Path:
    """Write a run's initial recurrent weights once, atomically, for its checkpoints to name in
    ``initial_rnn_file`` instead of each holding a copy."""
    payload = {"format": FORMAT, "version": SCHEMA_VERSION, "kind": INITIAL_KIND,
               "initial_rnn": _to_cpu(initial_rnn)}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_initial(ckpt: Mapping[str, Any], path: PathLike) -> Optional[Dict[str, torch.Tensor]]:
    """The initial recurrent weights of the checkpoint ``ckpt`` read from ``path``: its own
    ``initial_rnn`` (checkpoints written before the weights moved to one file per run), else the
    file its ``initial_rnn_file`` names in the checkpoint's folder; None when it has neither.
    Raises :class:`CheckpointError` when the named file is missing or not such a file."""
    embedded = ckpt.get("initial_rnn")
    if isinstance(embedded, Mapping):
        return dict(embedded)
    name = ckpt.get("initial_rnn_file")
    if not isinstance(name, str) or not name:
        return None
    file = Path(path).parent / name
    if not file.is_file():
        raise CheckpointError(f"{path}: its initial weights file {file} is missing")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # the safe unpickler raises many kinds on junk bytes
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{file}: not a readable initial weights file: {detail}") from None
    if (not isinstance(data, dict) or data.get("format") != FORMAT or data.get("kind") != INITIAL_KIND
            or not isinstance(data.get("initial_rnn"), Mapping)):
        raise CheckpointError(f"{file}: not an awd-nonnormal initial weights file")
    return dict(data["initial_rnn"])


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
