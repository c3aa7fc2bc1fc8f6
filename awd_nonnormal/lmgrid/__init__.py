"""A grid of language-model runs: one ``main.py`` argument line per run, run through a local
pool of processes or a Ray cluster (:mod:`awd_nonnormal.cluster`) instead of shell loops.

A grid file holds one run per line (blank lines and ``#`` comments are skipped); a line may start
with ``python main.py`` or ``main.py`` and must give ``--save DIR/NAME.pt``, which identifies
the run. Before it starts, every run is looked up on disk (:func:`status`):

* ``finished``: ``NAME.pt`` holds a test result: skipped;
* ``partial``: ``NAME.latest.pt`` exists: continued with the same line plus ``--resume`` (the
  line's settings must agree with the checkpoint, as for any resumed run);
* ``new``: started.

Each run is ``python main.py LINE`` in a child process, its output appended to ``NAME.log``
beside ``--save``; a run that exits with another status than 0 is reported with the last line of
its log. Under Ray a run whose worker dies is retried (it resumes from its latest checkpoint).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..checkpoint import CheckpointError, load_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["GridLineError", "LMRun", "parse_grid", "read_grid", "status", "command", "run_line",
           "run_grid"]


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


def status(run: LMRun) -> str:
    """``finished`` (the best model holds a test result), ``partial`` (a latest state exists)
    or ``new``."""
    if run.save.is_file():
        try:
            if "test" in load_checkpoint(run.save, kind="lm"):
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


def _die_with_parent() -> None:
    """In the child (Linux): receive SIGINT when the process that started it dies, so that a
    lost worker's run saves its state and stops instead of running on beside its retry."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_line(run: LMRun, main: str) -> Tuple[int, Optional[str]]:
    """Run (or continue) one run to its end in a child process; returns ``(exit status, error)``
    where ``error`` is the last line of its log when the status is not 0."""
    run.log.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(run, main)
    with open(run.log, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
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
                          max_retries=max_retries)
    else:
        with cf.ThreadPoolExecutor(max_workers=workers) as pool:  # each run is a child process
            futures = {pool.submit(run_line, r, main): str(r.save) for r in pending}
            for fut in cf.as_completed(futures):
                done(futures[fut], fut.result(), None)
    return {"ran": len(pending), "skipped": skipped, "errors": errors}
