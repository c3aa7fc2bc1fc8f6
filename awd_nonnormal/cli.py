"""What every command line of the project shares: the common flags, the logging set-up, the exit
codes, and turning a known error into one line on stderr.

Exit codes (:data:`EXIT_CODES`), the same for ``main.py``, ``analyze.py`` and
``python -m awd_nonnormal.tasks``:

====  =====================  ===================================================================
code  name                   meaning
====  =====================  ===================================================================
0     ok                     done (a task run that reached its epoch limit or converged)
1     data/checkpoint error  a corpus, MNIST file, checkpoint or run file is missing or unreadable
2     usage error            a bad flag or value, flags that disagree with a resumed run, or
                             an output that cannot be written (:class:`~.runs.OutputError`)
3     run exists             the output holds another run (another --save/--out, --resume,
                             or --overwrite where the command has it), or another process is
                             writing it (:class:`~.runs.RunLocked`)
4     diverged               training ended on a non-finite loss or stuck updates
                             (:mod:`awd_nonnormal.runs`); the last good checkpoint is kept
130   interrupted            Ctrl-C; the state is saved and the same command continues
====  =====================  ===================================================================
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Callable, Optional, Sequence, Type

import torch

from .checkpoint import CheckpointError
from .data import DataError
from .init import add_init_arguments
from .runs import Diverged, ResumeConflict, RunError, RunExistsError
from .utils import DEVICES, retain_freed_memory

__all__ = ["EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_RUN_EXISTS", "EXIT_DIVERGED",
           "EXIT_INTERRUPTED", "EXIT_CODES", "Parser", "add_device_argument",
           "add_output_arguments", "add_threads_argument", "setup_cpu", "add_init_arguments", "setup_logging", "exit_code",
           "one_line", "run_command", "given_dests", "register_data_error"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_RUN_EXISTS = 3
EXIT_DIVERGED = 4
EXIT_INTERRUPTED = 130

#: name -> exit code (see the module docstring).
EXIT_CODES = {"ok": EXIT_OK, "data/checkpoint error": EXIT_ERROR, "usage error": EXIT_USAGE,
              "run exists": EXIT_RUN_EXISTS, "diverged": EXIT_DIVERGED,
              "interrupted": EXIT_INTERRUPTED}


# Checked in order: the first class that matches gives the code. A ValueError not listed before
# it is a bad value (usage); commands add their own file errors with register_data_error. Any
# other error (a RuntimeError from torch, a bug) is not caught: it keeps its traceback.
_ERRORS: list = [
    (RunExistsError, EXIT_RUN_EXISTS),
    (Diverged, EXIT_DIVERGED),
    (ResumeConflict, EXIT_USAGE),
    (CheckpointError, EXIT_ERROR),
    (DataError, EXIT_ERROR),
    (RunError, EXIT_ERROR),
    (OSError, EXIT_ERROR),
    (ValueError, EXIT_USAGE),
]


def register_data_error(cls: Type[BaseException]) -> Type[BaseException]:
    """Let ``cls`` (a ValueError about an input file) exit as a data error, not a usage error."""
    _ERRORS.insert(_ERRORS.index((ValueError, EXIT_USAGE)), (cls, EXIT_ERROR))
    return cls


def exit_code(exc: BaseException) -> Optional[int]:
    """The exit code of a known error, or None for one that should not be caught."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    for cls, code in _ERRORS:
        if isinstance(exc, cls):
            return code
    return None


def one_line(exc: BaseException) -> str:
    """The error's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def run_command(prog: str, command: Callable[[], int],
                interrupted: str = "interrupted; the state is saved: run the same command again "
                                   "to continue", *, traceback: bool = False) -> int:
    """Run ``command()`` and return its exit code; a known error prints ``PROG: error: ...`` (one
    line; its traceback before it only with ``traceback``, e.g. for ``-v``) and returns its code
    from :data:`EXIT_CODES`. An unknown error (a bug, a torch error) is raised with its
    traceback."""
    try:
        return command()
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - only the known ones are caught, the rest re-raised
        code = exit_code(exc)
        if code is None:
            raise
        if traceback:
            import traceback as tb
            tb.print_exc(file=sys.stderr)
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return code


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit status :data:`EXIT_USAGE`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _device(text: str) -> str:
    if text in DEVICES or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose from: {', '.join(DEVICES)}, cuda:N")


def add_device_argument(group, default: str = "auto") -> None:
    """``--device auto|cpu|cuda|cuda:N``."""
    group.add_argument("--device", type=_device, default=default,
                       help="auto (CUDA when available), cpu, cuda or cuda:N")


def add_output_arguments(group, *, progress: bool = True, verbose_help: str = "debug logging") -> None:
    """``--no-progress`` (with ``progress``) and ``-v/--verbose`` (repeatable)."""
    if progress:
        group.add_argument("--no-progress", action="store_true", help="no progress display (a bar on a terminal, else a log line per 30 s)")
    group.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads must be an integer, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"--threads must be >= 0, got {n}")
    return n


def add_threads_argument(group, help: str = "torch CPU threads (default 1; 0: torch's default, "
                                             "all cores)") -> None:
    """``--threads N`` (default 1, as the tasks command: on a shared CPU a second thread of a
    small or medium product mostly waits for the first; 0 keeps torch's own default)."""
    group.add_argument("--threads", type=_threads, default=1, metavar="N", help=help)


def setup_cpu(threads: int) -> None:
    """What every command and sweep worker does first on the host: apply ``--threads``
    (``torch.set_num_threads(n)`` for n > 0, nothing for 0) and let the process reuse the memory
    it frees (:func:`~awd_nonnormal.utils.retain_freed_memory`)."""
    if threads > 0:
        torch.set_num_threads(threads)
    retain_freed_memory()


def setup_logging(verbose: int = 0, quiet_level: int = logging.INFO) -> None:
    """Log to stderr at ``quiet_level``, one level more detailed for every ``-v``."""
    level = max(logging.DEBUG, quiet_level - 10 * int(verbose))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


class _Unset(list):
    """The default of every dest while :func:`given_dests` parses: argparse's ``append`` action
    copies and extends it, ``count`` adds 1 to it, every other action replaces it, so a dest
    that still holds this very object was not given."""

    def __add__(self, other):
        return other


def given_dests(make_parser: Callable[[], argparse.ArgumentParser],
                argv: Optional[Sequence[str]]) -> frozenset:
    """The argparse dests that ``argv`` sets, told apart from defaults even when equal to them: a
    fresh parser from ``make_parser()`` gets one marker as every default (``set_defaults``) and
    parses ``argv`` again. The parser must accept an empty command line."""
    parser = make_parser()
    unset = _Unset()
    parser.set_defaults(**{dest: unset for dest in vars(parser.parse_args([]))})
    return frozenset(k for k, v in vars(parser.parse_args(argv)).items() if v is not unset)
