"""The run on disk, the same for every trainer: files, config and metrics, resuming, Ctrl-C, and
what a non-finite number does to a run.

Files. A task run is a folder (:data:`CONFIG_FILE`, :data:`METRICS_FILE`, :data:`CHECKPOINT_FILE`,
:data:`RESULT_FILE`); a language-model run is a family of files beside ``--save DIR/NAME.pt``
(``NAME.latest.pt``, ``NAME.metrics.jsonl``; see :class:`awd_nonnormal.lm.RunPaths`). Every
JSON file is written atomically (:func:`write_json`, :func:`write_text`), with non-finite numbers
as ``null`` (:func:`json_clean`).

Metrics (one policy, :class:`MetricsLog`): one JSON object per line, one line per finished
epoch, appended as the epoch ends. The checkpoint holds the same rows and is the truth: a run
that starts or resumes rewrites the file to the checkpoint's rows (:meth:`MetricsLog.reset`), which
drops any line written after the checkpoint it resumes from.

Resuming (one rule, :func:`check_resume`): a resumed run keeps the settings it was saved with;
a setting given now must equal the stored one unless it is one of the run's ``may_change``
settings (for example a larger epoch limit, the device, the progress bar).

A new run never replaces another: :class:`RunExistsError` names the files and the way out
(another output, ``--resume``, or ``--overwrite`` where a command has it).

Non-finite values (one policy, :class:`NonFiniteGuard`, used by both trainers):

* a non-finite (NaN or overflowing) gradient norm zeroes that step's update: no parameter and
  no optimizer state moves; the step is counted (``skipped``) and the run goes on;
* ``max_skipped`` such steps in a row end the run as *diverged* (the weights have stopped moving
  for good: tasks use a full epoch of batches, language models ``--max-skipped-steps``);
* a non-finite training or validation loss ends the run as *diverged* at once.

A diverged run keeps its last good checkpoint (nothing is saved after the bad step); the task
trainer records ``status: diverged`` in its result, the language-model trainer raises
:class:`Diverged`, and the command lines exit with :data:`awd_nonnormal.cli.EXIT_DIVERGED`.

Ctrl-C (:class:`GracefulInterrupt`): the first one stops at the next batch boundary after a
checkpoint that resumes exactly; a second one aborts at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from .checkpoint import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE", "METRICS_FILE", "CHECKPOINT_FILE", "RESULT_FILE", "RunExistsError",
    "ResumeConflict", "Diverged", "check_resume", "differences", "json_clean", "write_text",
    "write_json", "read_json", "MetricsLog", "read_metrics", "read_result", "is_finished",
    "NonFiniteGuard", "GracefulInterrupt",
]

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
RESULT_FILE = "result.json"


class RunExistsError(RuntimeError):
    """The output of a new run holds another run (different files or another config)."""


class ResumeConflict(ValueError):
    """Settings given for a resumed run disagree with the ones the run was saved with."""


class Diverged(RuntimeError):
    """A run ended because a loss became non-finite or its updates stopped (see the module)."""


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------

def json_clean(value: Any) -> Any:
    """``value`` as plain JSON data: non-finite floats become None, tuples lists, keys strings."""
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    return value


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` atomically, with the permissions a plain ``open`` would give (the temporary
    file of an atomic write starts private)."""
    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)

    return atomic_write(path, write)


def write_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` (cleaned by :func:`json_clean`) as indented JSON, atomically."""
    return write_text(path, json.dumps(json_clean(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: PathLike) -> Optional[Any]:
    """The JSON in ``path``, or None when the file is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Metrics and results
# --------------------------------------------------------------------------------------------

class MetricsLog:
    """The metrics file of a run: :meth:`reset` to the checkpoint's rows when a run starts or
    resumes, then :meth:`append` one row per finished epoch."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)

    def reset(self, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        write_text(self.path, "".join(_line(r) for r in rows))

    def append(self, row: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(_line(row))

    def read(self) -> List[Dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip()]


def _line(row: Mapping[str, Any]) -> str:
    return json.dumps(json_clean(row), sort_keys=True, allow_nan=False) + "\n"


def read_metrics(run_dir: PathLike) -> List[Dict[str, Any]]:
    """The per-epoch metrics of the task run in ``run_dir`` (empty if none)."""
    return MetricsLog(Path(run_dir) / METRICS_FILE).read()


def read_result(run_dir: PathLike) -> Optional[Dict[str, Any]]:
    """The finished task run's result (``result.json``), or None if the run has not finished."""
    return read_json(Path(run_dir) / RESULT_FILE)


def is_finished(run_dir: PathLike) -> bool:
    return read_result(run_dir) is not None


# --------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------

def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> List[str]:
    """``"key: a vs b"`` for every key whose values differ (a missing key counts as None)."""
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def check_resume(stored: Mapping[str, Any], wanted: Mapping[str, Any],
                 may_change: Iterable[str] = (), *, where: str = "the run",
                 flag=None, source: str = "run") -> Dict[str, Any]:
    """The settings of a resumed run: ``stored`` with the changes in ``wanted`` that are allowed.

    ``wanted`` holds only the settings given now; each must equal the stored value (compared as
    JSON, so tuples equal lists) unless its name is in ``may_change``. Raises
    :class:`ResumeConflict` listing every disagreement. ``flag(name)`` spells a setting in the
    message (default: ``--name-with-dashes``), ``source`` the stored side ("run has ...")."""
    allowed = set(may_change)
    spell = flag or (lambda name: f"--{name.replace('_', '-')}")
    merged, conflicts = dict(stored), []
    for name, value in wanted.items():
        old = stored.get(name)
        if json_clean(value) == json_clean(old):
            continue
        if name in allowed:
            merged[name] = value
        else:
            conflicts.append(f"{spell(name)} {value!r} ({source} has {old!r})")
    if conflicts:
        changeable = f"; only {', '.join(sorted(allowed))} may change" if allowed else ""
        raise ResumeConflict(f"cannot resume {where} with other settings: {', '.join(conflicts)}"
                             f"{changeable}")
    return merged


# --------------------------------------------------------------------------------------------
# Non-finite values
# --------------------------------------------------------------------------------------------

@dataclass
class NonFiniteGuard:
    """The non-finite policy of the module docstring, for one run.

    Call :meth:`check_loss` on each training loss before the backward pass and :meth:`allow_step`
    with the gradient norm before the optimizer step; both raise :class:`Diverged` when the run
    must end. ``skipped`` counts the zeroed steps, ``streak`` those in a row."""

    max_skipped: int
    skipped: int = 0
    streak: int = 0

    def check_loss(self, value: float, what: str, where: str) -> None:
        if not math.isfinite(value):
            raise Diverged(f"{what} became {value} at {where}")

    def allow_step(self, grad_norm: float, where: str) -> bool:
        """True: apply the step. False: the gradient norm is not finite and the update is zeroed."""
        if math.isfinite(grad_norm):
            self.streak = 0
            return True
        self.skipped += 1
        self.streak += 1
        logger.debug("gradient norm %s at %s: update zeroed (%d in a row)", grad_norm, where, self.streak)
        if self.streak >= self.max_skipped:
            raise Diverged(f"the gradient norm overflowed in {self.streak} batches in a row, up to "
                           f"{where}: the activity exploded and every update is zeroed, so the "
                           f"run can no longer change")
        return False

    def state(self) -> Dict[str, int]:
        return {"skipped": self.skipped, "streak": self.streak}

    def load(self, state: Optional[Mapping[str, Any]]) -> None:
        state = state or {}
        self.skipped, self.streak = int(state.get("skipped", 0)), int(state.get("streak", 0))


# --------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------

class GracefulInterrupt:
    """Within ``with GracefulInterrupt(message):``, the first Ctrl-C (SIGINT) only sets
    :attr:`requested`, which a training loop checks at its next consistent point (a batch
    boundary) to save and stop; a second Ctrl-C sets :attr:`hard` and raises KeyboardInterrupt at
    once. Outside the main thread signals cannot be caught and nothing is installed."""

    def __init__(self, message: str = "Ctrl-C: stopping after this batch (press Ctrl-C again to abort now)"):
        self.message = message
        self.requested = False
        self.hard = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            self.hard = True
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(self.message)

    def __enter__(self) -> "GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
