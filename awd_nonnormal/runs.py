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

A loss can also be finite and still absurd (1e17 and more): the task trainer passes a ``limit``
to :meth:`NonFiniteGuard.check_loss` and a validation loss above :data:`DIVERGED_FACTOR` times the
task's random baseline (a model a million times worse than one that ignores its input) ends the
run as diverged like a non-finite one.

Ctrl-C (:class:`GracefulInterrupt`): the first one stops at the next batch boundary after a
checkpoint that resumes exactly; a second one aborts at once.

One writer per run (:class:`RunLock`): a run holds an OS file lock (``fcntl.flock``) on a lock
file in its folder (``.lock``; ``.NAME.lock`` beside a language model's ``--save DIR/NAME.pt``)
for as long as it runs. The lock goes with the process, whatever ends it (a kill -9 included), so
it is never stale; a second process that wants the same run is refused with
:class:`RunLocked` (a :class:`RunExistsError`). The lock file itself stays (removing it would
let two processes lock two different files). Where the platform has no ``fcntl`` (Windows) or
the file system refuses locks, the run goes on unlocked with a warning.

Outputs are checked before any work (:func:`check_output_dir`, :func:`check_output_file`): a
place that cannot be written is refused with :class:`OutputError` at start-up, not after an
epoch of training.

Leftovers (:func:`remove_stale_temporaries`): a kill during an atomic write leaves its hidden
temporary file (``.NAME.XXXXXXXX.tmp``, see :func:`awd_nonnormal.checkpoint.atomic_write`); the
next start of that run, holding the lock, removes those of its own files. Everything that lists
a folder skips hidden files.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from .checkpoint import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE", "METRICS_FILE", "CHECKPOINT_FILE", "RESULT_FILE", "RunExistsError",
    "ResumeConflict", "Diverged", "RunError", "check_resume", "differences", "json_clean", "write_text",
    "write_json", "read_json", "MetricsLog", "read_metrics", "read_result", "is_finished",
    "NonFiniteGuard", "GracefulInterrupt", "DIVERGED_FACTOR", "RunLock", "RunLocked",
    "LOCK_FILE", "OutputError", "check_output_dir", "check_output_file",
    "remove_stale_temporaries", "die_with_parent",
]

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
RESULT_FILE = "result.json"
LOCK_FILE = ".lock"

#: A validation loss above this many times the random baseline ends a run as diverged.
DIVERGED_FACTOR = 1e6


class RunExistsError(RuntimeError):
    """The output of a new run holds another run (different files or another config)."""


class ResumeConflict(ValueError):
    """Settings given for a resumed run disagree with the ones the run was saved with."""


class Diverged(RuntimeError):
    """A run ended because a loss became non-finite or its updates stopped (see the module)."""


class RunError(RuntimeError):
    """A run cannot start or go on for a reason of its inputs (the message says why); the
    commands exit with code 1 (:mod:`awd_nonnormal.cli`). :class:`~awd_nonnormal.lm.LMError`
    is one."""


class RunLocked(RunExistsError):
    """Another process is writing the run (it holds the run's lock)."""


class OutputError(ValueError):
    """An output location (``--save``, ``--out``) that cannot be written."""


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
    """Write ``text`` (UTF-8, its line ends as they are) atomically
    (:func:`~awd_nonnormal.checkpoint.atomic_write`: the file gets the mode of an ordinary new
    file)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)

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
        """The rows; a last line without its newline (a process killed while appending it) is
        left out with a warning: the run's checkpoint holds the rows, and a resume rewrites the
        file from them."""
        if not self.path.is_file():
            return []
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        if lines[-1].strip():
            logger.warning("%s: its last line is incomplete (a write was interrupted); left out", self.path)
        return [json.loads(line) for line in lines[:-1] if line.strip()]


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
        changeable = f"; only {', '.join(sorted(map(spell, allowed)))} may change" if allowed else ""
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

    def check_loss(self, value: float, what: str, where: str, limit: float = math.inf) -> None:
        """Raise :class:`Diverged` if ``value`` is not finite or above ``limit``."""
        if not math.isfinite(value):
            raise Diverged(f"{what} became {value} at {where}")
        if value > limit:
            raise Diverged(f"{what} reached {value:.4g} at {where}, above the divergence limit "
                           f"{limit:.4g}")

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


# --------------------------------------------------------------------------------------------
# One writer per run
# --------------------------------------------------------------------------------------------

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class RunLock:
    """``with RunLock(path, what):`` holds an exclusive ``flock`` on the file ``path`` (created
    if missing, with its folder) for the block; :class:`RunLocked` if another process holds it.
    ``what`` names the run in the message. Without ``fcntl``, or on a file system that refuses
    locks, a warning and no lock. A block that ends in an exception removes the lock file and
    the folders it created when nothing else was written there, so a refused input leaves
    nothing behind."""

    def __init__(self, path: PathLike, what: str) -> None:
        self.path, self.what = Path(path), what
        self._key: Optional[str] = None
        self._created: List[Path] = []

    def __enter__(self) -> "RunLock":
        if fcntl is None:
            logger.warning("no file locks on this platform: make sure no other process writes "
                           "%s at the same time", self.what)
            return self
        missing = self.path.parent
        while not missing.exists() and missing.parent != missing:
            self._created.append(missing)
            missing = missing.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _HELD:  # this process holds it already (an outer block): nested, not refused
            _HELD[key][1] += 1
            self._key = key
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                by = f"another process (pid {holder})" if holder else "another process"
                raise RunLocked(f"{self.what} is being written by {by}: wait for it to end, or "
                                f"choose another output") from None
            logger.warning("cannot lock %s (%s): make sure no other process writes %s at the "
                           "same time", self.path, exc.strerror, self.what)
            return self
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = [fd, 1]
        self._key = key
        return self

    def __exit__(self, *exc) -> None:
        if self._key is None:
            return
        held = _HELD[self._key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self._key]
            if exc[0] is not None and self._created:
                self._remove_created()
            os.close(held[0])  # closing the only descriptor releases the lock
        self._key = None

    def _remove_created(self) -> None:
        """Undo the folders of a run that wrote nothing (still holding the lock)."""
        try:
            if any(p.name != self.path.name for p in self.path.parent.iterdir()):
                return
            self.path.unlink()
            for folder in self._created:  # deepest first; stop at one that is not empty
                folder.rmdir()
        except OSError:
            pass


#: The locks this process holds: resolved lock path -> [descriptor, nesting depth].
_HELD: Dict[str, List[int]] = {}


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# --------------------------------------------------------------------------------------------
# Outputs that can be written; leftovers
# --------------------------------------------------------------------------------------------

def check_output_dir(folder: PathLike, what: str) -> None:
    """Raise :class:`OutputError` unless the folder ``folder`` exists or can be created, and
    files can be created in it: the nearest existing folder on its path is asked to hold a
    (hidden, at once removed) probe file. Nothing else is created."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        where = "is" if probe == folder else f"lies under {probe}, which is"
        raise OutputError(f"{what} {folder}: {where} a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".awd-write-check.", suffix=".tmp", dir=probe)
    except OSError as exc:
        raise OutputError(f"{what} {folder}: cannot write in {probe} "
                          f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def die_with_parent() -> None:
    """In a child or worker process (Linux): receive SIGINT when the process that started it dies,
    so that a lost worker's run saves its state and stops instead of running on (holding its
    lock) beside its retry. Elsewhere, or where prctl is missing, nothing."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def check_output_file(path: PathLike, what: str) -> None:
    """Raise :class:`OutputError` unless the file ``path`` can be written (see
    :func:`check_output_dir` for its folder); an existing folder of that name is refused."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a folder, not a file")
    check_output_dir(path.parent, what)


#: The temporary files of :func:`awd_nonnormal.checkpoint.atomic_write`: ``.{name}.{8 chars}.tmp``.
_TMP_RE = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: PathLike, owns=lambda name: True) -> List[Path]:
    """Remove the temporary files an interrupted atomic write left in ``folder`` for the files
    ``owns(name)`` accepts; returns them. Call it holding the run's lock (no writer is running)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TMP_RE.fullmatch(entry.name)
        if m and owns(m.group("name")) and entry.is_file():
            try:
                entry.unlink()
            except OSError as exc:
                logger.warning("cannot remove the leftover %s: %s", entry, exc.strerror)
                continue
            removed.append(entry)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted write in %s",
                    len(removed), folder)
    return removed
