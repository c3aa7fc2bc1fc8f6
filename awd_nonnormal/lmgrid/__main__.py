"""Command line of a language-model grid: ``python -m awd_nonnormal.lmgrid GRID.txt ...``.

Runs every line of GRID.txt (main.py arguments, one run per line, see
:mod:`awd_nonnormal.lmgrid`) on this machine or on a Ray cluster; finished runs are skipped and
unfinished ones continued, so the same command resumes the grid::

    python -m awd_nonnormal.lmgrid runs/ptbw.txt --workers 2
    python -m awd_nonnormal.lmgrid runs/ptbw.txt --executor ray --address auto --gpus-per-run 1
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .. import cli, cluster
from . import run_grid, read_grid, status

PROG = "python -m awd_nonnormal.lmgrid"


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog=PROG, description="Run a grid of language-model runs (one main.py "
                   "argument line per run, each with --save) in parallel on this machine or on "
                   "a Ray cluster. Finished runs are skipped and unfinished ones continued from "
                   "their latest checkpoint.")
    p.add_argument("grid", metavar="GRID.txt", help="one main.py argument line per run; blank "
                   "lines and # comments are skipped; a leading 'python main.py' is allowed")
    p.add_argument("--executor", choices=cluster.EXECUTORS, default="local",
                   help="'local': --workers runs at a time here; 'ray': one Ray task per run "
                   "(needs the extra: pip install -e \".[cluster]\")")
    p.add_argument("--workers", type=int, default=1, help="with --executor local: runs at a time")
    p.add_argument("--address", help="Ray cluster address (host:port or 'auto'; default: start a "
                   "local Ray instance)")
    p.add_argument("--cpus-per-run", type=float, default=1, metavar="N",
                   help="with --executor ray: CPUs each run asks for")
    p.add_argument("--gpus-per-run", type=float, default=0, metavar="N",
                   help="with --executor ray: GPUs each run asks for (1 for GPU training; Ray "
                   "hides the GPUs from runs that ask for none)")
    p.add_argument("--max-retries", type=int, default=2, metavar="N",
                   help="with --executor ray: rerun a run whose worker died up to N times")
    p.add_argument("--main", default="main.py", metavar="PATH", help="the training script")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, and exit")
    cli.add_output_arguments(p, progress=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)

    def command() -> int:
        if args.workers < 1 or args.max_retries < 0:
            raise ValueError("--workers must be >= 1 and --max-retries >= 0")
        runs = read_grid(args.grid)
        if args.dry_run:
            for r in runs:
                print(f"{status(r):<9} {r.save}")
            return cli.EXIT_OK
        if args.executor == "ray":
            cluster.require_ray()
        stats = run_grid(runs, args.main, executor=args.executor, workers=args.workers,
                         address=args.address, cpus_per_run=args.cpus_per_run,
                         gpus_per_run=args.gpus_per_run, max_retries=args.max_retries,
                         on_done=lambda r, e: print(f"{'failed' if e else 'done':<7} {r.save}"
                                                    + (f": {e}" if e else ""), flush=True))
        print(f"{len(runs)} runs: {stats['skipped']} finished before, {stats['ran']} run, "
              f"{len(stats['errors'])} failed (their logs: NAME.log beside --save)")
        return cli.EXIT_OK if not stats["errors"] else cli.EXIT_ERROR

    return cli.run_command(PROG, command)


if __name__ == "__main__":
    sys.exit(main())
