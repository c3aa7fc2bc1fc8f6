"""One command that checks the paper's claims: ``python -m awd_nonnormal.reproduce --budget B``.

:func:`reproduce` runs the six sections of the report (Figure 1, Figure 2, Figure 3, Table 1,
Table 2 with Figure 5, Table 3 with Figure 6) at a budget of :mod:`.budgets` and writes
``<out>/REPORT.md`` with its PNG figures beside it; the training runs go to ``<out>/runs`` and
are resumed or skipped when the command runs again. The report is rewritten after every section,
so an interrupted run leaves a partial report whose unfinished sections say so.
"""

from __future__ import annotations

import datetime
import logging
import platform
import resource
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

from .. import __version__
from ..runs import RunError
from .budgets import BUDGETS, BY_NAME, Budget
from .sections import (Context, Section, cell, section_decoding, section_memory, section_table1, section_table2,
                       section_table3, section_tasks)

logger = logging.getLogger(__name__)

__all__ = ["BUDGETS", "REPORT_FILE", "ReproduceError", "TIMES_FILE", "TITLES", "reproduce", "render", "format_times", "machine_name",
           "code_version", "cpu_seconds"]

REPORT_FILE = "REPORT.md"
TIMES_FILE = "times.json"   # wall and CPU time of every invocation into the folder
TITLES = (("memory", "1. Figure 1b-c: memory curves and J_tot"),
          ("decoding", "2. Figures 2, 7, 8: linear decoding"),
          ("tasks", "3. Figure 3: copy, addition, psMNIST"),
          ("table1", "4. Table 1: vanilla-RNN language models"),
          ("table2", "5. Table 2 and Figure 5: non-normality of trained normal networks"),
          ("table3", "6. Table 3 and Figure 6: LSTM initializers"))


def machine_name() -> str:
    """The CPU model (``model name`` of /proc/cpuinfo, as lscpu shows it) and core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    return f"{name}, {os.cpu_count()} logical CPU(s)"


def code_version() -> str:
    """``awd_nonnormal <version>``, with the git commit of the source tree when it is a checkout."""
    import subprocess
    text = f"awd_nonnormal {__version__}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{text} (git {commit})" if commit else text


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def format_times(invocations: Sequence[dict]) -> str:
    """The header's time line: this invocation's wall and CPU time and, after a resume, the sums
    over every invocation that wrote into the same folder."""
    last = invocations[-1]
    text = (f"started {last['started']}; wall time {last['wall'] / 60:.1f} min, CPU time "
            f"{last['cpu'] / 60:.1f} min (this process and its workers)")
    if len(invocations) > 1:
        text += (f"; all {len(invocations)} invocations into this folder: wall time "
                 f"{sum(i['wall'] for i in invocations) / 60:.1f} min, CPU time "
                 f"{sum(i['cpu'] for i in invocations) / 60:.1f} min (first started {invocations[0]['started']})")
    return text


def render(budget: Budget, sections: Sequence[Section], *, command: str, invocations: Sequence[dict],
           device: str, finished: bool) -> str:
    done = {s.key: s for s in sections}
    lines = [f"# Reproduction report: budget `{budget.name}`", "",
             "Orhan & Pitkow (ICLR 2020), \"Improved memory in recurrent neural networks with sequential "
             "non-normal dynamics\": the paper's numbers and claims beside ours.", "",
             f"- command: `{command}`",
             f"- {format_times(invocations)}" + ("" if finished else " (so far: the report is unfinished)"),
             f"- machine: {machine_name()}; device {device}; torch {torch.__version__}; {code_version()}",
             f"- budget: {budget.note}", "",
             "Verdicts: **reproduced**, **not reproduced**, or **not run at this budget**. A verdict at a small "
             "budget is about the small experiment described in its section, not about the paper's; each "
             "section says how its scale differs.", "", "## Summary", "",
             "| section | claim | verdict | why |", "|---|---|---|---|"]
    for key, title in TITLES:
        s = done.get(key)
        if s is None:
            lines.append(f"| {title.split('.')[0]} | {title.split('. ', 1)[1]} | not finished | "
                         f"{'not reached yet' if not finished else 'failed'} |")
            continue
        for v in s.verdicts:
            lines.append(f"| {title.split('.')[0]} | {cell(v.claim)} | **{v.status}** | {cell(v.reason)} |")
    lines.append("")
    for key, title in TITLES:
        lines.append(f"## {title}")
        lines.append("")
        s = done.get(key)
        lines.append(s.text if s is not None else "Not finished: run the same command again to continue.")
        lines.append("")
    return "\n".join(lines)


def reproduce(budget: Union[str, Budget], out: Union[str, Path], *, device: str = "auto",
              workers: Optional[int] = None, data_dir: Union[str, Path] = "data", command: str = "",
              on_section: Optional[Callable[[Section], None]] = None) -> Path:
    """Run every section at ``budget`` into ``out`` and return the path of ``REPORT.md``."""
    from ..runs import read_json, write_json, write_text
    b = BY_NAME[budget] if isinstance(budget, str) else budget
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, budget=b, device=device, workers=workers or b.workers, data_dir=Path(data_dir))
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0, c0 = time.time(), cpu_seconds()
    sections: List[Section] = []
    report = out / REPORT_FILE

    times_file = out / TIMES_FILE
    earlier = [i for i in (read_json(times_file) or []) if isinstance(i, dict)]

    def write(finished: bool) -> None:
        now = {"started": started, "wall": time.time() - t0, "cpu": cpu_seconds() - c0, "finished": finished}
        write_json(times_file, earlier + [now])
        write_text(report, render(b, sections, command=command, invocations=earlier + [now], device=device,
                                  finished=finished) + "\n")

    def add(section: Section) -> None:
        sections.append(section)
        logger.info("section %s done: %s", section.key,
                    ", ".join(f"{v.status}" for v in section.verdicts))
        write(False)
        if on_section is not None:
            on_section(section)

    try:
        add(section_memory(ctx))
        add(section_decoding(ctx))
        tasks, summaries = section_tasks(ctx)
        add(tasks)
        add(section_table1(ctx))
        add(section_table2(ctx, summaries))
        add(section_table3(ctx))
    except BaseException:
        write(False)  # the time since the last finished section counts too (times.json)
        raise
    write(True)
    errors = [e for s in sections for e in s.errors]
    if errors:
        raise ReproduceError(f"{len(errors)} run(s) failed with an error and are left out of the report "
                             f"{report} (first: {errors[0]}); fix the cause and run the same command again")
    return report


class ReproduceError(RunError):
    """The report was written, but some of its runs failed with an error (not a result)."""


