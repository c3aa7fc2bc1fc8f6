"""A grid of language-model runs: one ``main.py`` argument line per run, run through a local
pool of processes or a Ray cluster (:mod:`awd_nonnormal.cluster`) instead of shell loops.

A grid file holds one run per line (blank lines and ``#`` comments are skipped); a line may start
with ``python main.py`` or ``main.py`` and must give ``--save DIR/NAME.pt``, which identifies
the run. Before it starts, every run is looked up on disk (:func:`status`):

* ``finished``: ``NAME.pt`` holds a test result and ``NAME.latest.pt`` has trained every epoch
  of the line's ``--epochs`` (main.py also tests the best model after a Ctrl-C, so a test result
  alone is no proof): skipped;
* ``partial``: ``NAME.latest.pt`` exists: continued with the same line plus ``--resume`` (the
  line's settings must agree with the checkpoint, as for any resumed run);
* ``new``: started.

Each run is ``python main.py LINE`` in a child process, its output appended to ``NAME.log``
beside ``--save``; a run that exits with another status than 0 is reported with the last line of
its log. Under Ray a run whose worker dies is retried (it resumes from its latest checkpoint).

Ctrl-C stops the grid: no queued run starts, every running child gets one SIGINT (a child runs in
its own session, so a terminal's Ctrl-C reaches it only this way, once: main.py takes a second
one for "abort now") and is waited for while it saves its state, then the command exits with 130.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

from ..checkpoint import CheckpointError, load_checkpoint
from ..runs import die_with_parent

logger = logging.getLogger(__name__)

__all__ = ["GridLineError", "LMRun", "Children", "parse_grid", "read_grid", "status", "command",
           "run_child", "run_line", "run_grid", "STOP_GRACE_S"]

STOP_GRACE_S = 600.0
"""How long a stopped run's child may take to save its state after its SIGINT before it is killed
(under Ray, where the task itself is being cancelled); a checkpoint of a large model on a slow
shared file system takes a while, and killing the child mid-save loses the run's last epochs."""


class GridLineError(ValueError):
    """A grid line that is not a usable main.py argument line; the message names the line."""


@dataclass(frozen=True)
class LMRun:
    """One line of a grid: its number, main.py arguments and the best-model path (``--save``)."""
    line: int
    args: Tuple[str, ...]
    save: Path

    @property
    def latest(self) -> Path:
        return self.save.with_name(self.save.name[:-3] + ".latest.pt")

    @property
    def log(self) -> Path:
        return self.save.with_name(self.save.name[:-3] + ".log")


def _save_of(args: Sequence[str]) -> Optional[str]:
    for i, a in enumerate(args):
        if a == "--save" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--save="):
            return a.split("=", 1)[1]
    return None


def parse_grid(text: str, where: str = "grid") -> List[LMRun]:
    """The runs of a grid file's ``text``. Raises :class:`GridLineError` for a line that cannot
    be split, lacks ``--save DIR/NAME.pt``, uses ``--resume`` (the grid decides that) or names the
    same ``--save`` as another line."""
    runs: List[LMRun] = []
    seen: Dict[Path, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            args = shlex.split(line, comments=True)
        except ValueError as exc:
            raise GridLineError(f"{where} line {n}: cannot split it into arguments ({exc})") from None
        if args[:1] == ["python"] or args[:1] == ["python3"]:
            args = args[1:]
        if args and Path(args[0]).name == "main.py":
            args = args[1:]
        save = _save_of(args)
        if save is None or not save.endswith(".pt"):
            raise GridLineError(f"{where} line {n}: give --save DIR/NAME.pt (it names the run)")
        if "--resume" in args or any(a.startswith("--resume=") for a in args):
            raise GridLineError(f"{where} line {n}: leave out --resume; the grid continues "
                                f"unfinished runs by itself")
        path = Path(save)
        if path in seen:
            raise GridLineError(f"{where} line {n}: --save {save} is also the run of line {seen[path]}")
        seen[path] = n
        runs.append(LMRun(n, tuple(args), path))
    if not runs:
        raise GridLineError(f"{where}: no run in it (one main.py argument line per run)")
    return runs


def read_grid(path: Union[str, Path]) -> List[LMRun]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GridLineError(f"grid file {path}: cannot read ({exc.strerror})") from None
    return parse_grid(text, where=str(path))


def _line_epochs(run: LMRun) -> Optional[int]:
    """The line's ``--epochs``, or None when it leaves the number to main.py (or the checkpoint)."""
    for i, a in enumerate(run.args):
        value = run.args[i + 1] if a == "--epochs" and i + 1 < len(run.args) else (
            a.split("=", 1)[1] if a.startswith("--epochs=") else None)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _trained_all(run: LMRun) -> bool:
    """Whether the run's latest state has finished every epoch it is meant to train: the line's
    ``--epochs``, else the one its checkpoint was trained with (what ``--resume`` would use). A run
    without a latest state has nothing to continue from and counts as done."""
    if not run.latest.is_file():
        return True
    try:
        latest = load_checkpoint(run.latest, kind="lm")
    except CheckpointError:
        return False  # partial: --resume says what is wrong with it
    target = _line_epochs(run)
    if target is None:
        target = (latest.get("config") or {}).get("train", {}).get("epochs")
    epoch = latest.get("epoch")  # the last finished epoch (Trainer.save_latest)
    return isinstance(target, int) and isinstance(epoch, int) and epoch >= target


def status(run: LMRun) -> str:
    """``finished`` (the best model holds a test result and the latest state trained every epoch),
    ``partial`` (a latest state exists) or ``new``. main.py tests the best model after a Ctrl-C
    too, so a test result alone would take a stopped run for a finished one and never continue it."""
    if run.save.is_file():
        try:
            if "test" in load_checkpoint(run.save, kind="lm") and _trained_all(run):
                return "finished"
        except CheckpointError:
            pass
    return "partial" if run.latest.is_file() else "new"


def command(run: LMRun, main: Union[str, Path]) -> List[str]:
    """The child's command line: ``python MAIN LINE`` (plus ``--resume`` for a partial run)."""
    cmd = [sys.executable, str(main), *run.args]
    if status(run) == "partial":
        cmd += ["--resume", str(run.latest)]
    return cmd


def _child_setup() -> None:
    """In the child, before main.py starts: take SIGINT again (a Ray worker's thread blocks it,
    and a blocked signal stays blocked across ``exec``, so the child would never see the SIGINT
    that stops it and would train on to its end) and, on Linux, the parent-death signal
    (:func:`awd_nonnormal.runs.die_with_parent`)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if sys.platform.startswith("linux"):
        die_with_parent()


class Children:
    """The child processes of the runs in flight in this process. :meth:`interrupt` stops them:
    no child starts after it and each running one gets SIGINT, which main.py takes as Ctrl-C (save
    the state, test the best model, exit). The driver's Ctrl-C arrives in its main thread while
    the children belong to the pool's threads, hence this shared record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: Set[subprocess.Popen] = set()
        self.stopped = False

    def start(self, cmd: Sequence[str], **kwargs: Any) -> Optional[subprocess.Popen]:
        """``Popen(cmd, **kwargs)`` in its own session (a terminal's Ctrl-C to the process group
        must not reach it besides the one :meth:`interrupt` sends: main.py aborts at once on a
        second), or None after :meth:`interrupt`."""
        with self._lock:  # checked and started under the lock: interrupt() misses no child
            if self.stopped:
                return None
            proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
            self._procs.add(proc)
            return proc

    def forget(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def interrupt(self) -> int:
        """Stop: start no more children and send SIGINT to each running one (again on a second
        call: main.py's "abort now"). Returns how many got it."""
        with self._lock:
            self.stopped = True
            running = [p for p in self._procs if p.poll() is None]
            for proc in running:
                try:
                    proc.send_signal(signal.SIGINT)
                except ProcessLookupError:
                    pass
        return len(running)


def run_child(cmd: Sequence[str], children: Children, grace: float = STOP_GRACE_S,
              **kwargs: Any) -> int:
    """Run ``cmd`` as a child of ``children`` and return its exit status. A KeyboardInterrupt
    here (a Ray task being cancelled) sends the child SIGINT and waits up to ``grace`` seconds
    for it to save and exit before it is killed, then is raised again: ``subprocess.call`` would
    kill it after 0.25 s, mid-save. Raises KeyboardInterrupt, starting nothing, after
    :meth:`Children.interrupt`. The child takes SIGINT whatever this thread blocks
    (:func:`_child_setup`)."""
    if sys.platform != "win32":
        kwargs.setdefault("preexec_fn", _child_setup)
    proc = children.start(cmd, **kwargs)
    if proc is None:
        raise KeyboardInterrupt
    try:
        while True:  # not one blocking wait: a Ray worker's task thread blocks SIGINT, so its
            try:     # cancel's KeyboardInterrupt arrives only when Python code runs here
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        logger.warning("stopping: the child %d gets SIGINT and %g s to save its state", proc.pid, grace)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            logger.warning("the child %d did not exit within %g s of its SIGINT: killing it", proc.pid, grace)
            proc.kill()
            proc.wait()
        raise
    finally:
        children.forget(proc)


def run_line(run: LMRun, main: str, children: Optional[Children] = None) -> Tuple[int, Optional[str]]:
    """Run (or continue) one run to its end in a child process; returns ``(exit status, error)``
    where ``error`` is the last line of its log when the status is not 0. ``children`` (the
    local pool's) lets Ctrl-C in the driver stop the child; under Ray the task's own is used and a
    cancelled task stops its child (:func:`run_child`)."""
    if children is None:
        children = Children()
    run.log.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(run, main)
    with open(run.log, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        code = run_child(cmd, children, stdout=log, stderr=subprocess.STDOUT)
    if code == 0:
        return 0, None
    lines = [l for l in run.log.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    return code, (lines[-1] if lines else f"exit status {code}")


Done = Callable[[LMRun, Optional[str]], None]


def run_grid(runs: Sequence[LMRun], main: Union[str, Path] = "main.py", *, executor: str = "local",
             workers: int = 1, address: Optional[str] = None, cpus_per_run: float = 1,
             gpus_per_run: float = 0, max_retries: int = 2,
             on_done: Optional[Done] = None) -> Dict[str, object]:
    """Run every unfinished run; returns ``{"ran", "skipped", "errors": {save: message}}``.
    ``executor`` is ``local`` (``workers`` runs at a time on this machine) or ``ray`` (one Ray
    task per run asking for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs)."""
    from .. import cluster
    if executor not in cluster.EXECUTORS:
        raise cluster.ClusterError(f"unknown executor {executor!r}; valid: {', '.join(cluster.EXECUTORS)}")
    main = str(Path(main).resolve())
    if not Path(main).is_file():
        raise GridLineError(f"{main}: no such file; run from the repository root or give --main PATH")
    pending = [r for r in runs if status(r) != "finished"]
    skipped = len(runs) - len(pending)
    logger.info("%d runs, %d finished before, %d to run (%s)", len(runs), skipped, len(pending), executor)
    by_key = {str(r.save): r for r in pending}
    errors: Dict[str, str] = {}

    def done(key: str, result, error: Optional[str]) -> None:
        if error is None and result is not None and result[0] != 0:
            error = f"exit status {result[0]}: {result[1]}"
        if error is not None:
            errors[key] = error
            logger.warning("run %s failed: %s", key, error)
        if on_done is not None:
            on_done(by_key[key], error)

    if executor == "ray":
        cluster.run_tasks(run_line, [(str(r.save), (r, main)) for r in pending], done,
                          address=address, num_cpus=cpus_per_run, num_gpus=gpus_per_run,
                          max_retries=max_retries, stop_grace=STOP_GRACE_S + 60)
    else:
        _run_local(pending, main, workers, done)
    return {"ran": len(pending), "skipped": skipped, "errors": errors}


def _run_local(runs: Sequence[LMRun], main: str, workers: int,
               done: Callable[[str, Any, Optional[str]], None]) -> None:
    """``workers`` runs at a time in child processes of this one. On Ctrl-C (or any error here)
    the queued runs are cancelled, the running children get SIGINT and are waited for while they
    save, then the exception goes on: leaving the pool's ``with`` block instead would wait for
    every queued run to start and train to its end. A second Ctrl-C while waiting passes a second
    SIGINT on (main.py: abort now)."""
    children = Children()
    pool = cf.ThreadPoolExecutor(max_workers=workers)  # each run is a child process
    futures: Dict[cf.Future, str] = {}
    try:
        futures = {pool.submit(run_line, r, main, children): str(r.save) for r in runs}
        for fut in cf.as_completed(futures):
            done(futures[fut], fut.result(), None)
    except BaseException:
        queued = sum(f.cancel() for f in futures)
        running = children.interrupt()
        logger.warning("stopping: %d queued run(s) will not start; %d running run(s) save their "
                       "checkpoints (Ctrl-C again to abort them now)", queued, running)
        while True:
            try:
                pool.shutdown(wait=True, cancel_futures=True)
                break
            except KeyboardInterrupt:
                children.interrupt()
        raise
    pool.shutdown(wait=True)
