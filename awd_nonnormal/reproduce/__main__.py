"""``python -m awd_nonnormal.reproduce --budget smoke|quick|hour|full [--device D] [--out DIR]``.

Runs the paper's experiments at the chosen budget and writes DIR/REPORT.md (the paper's numbers,
ours, the commands that made them and a verdict per claim) with its PNG figures beside it. Run
the same command again to continue an interrupted report: finished runs are not redone.
"""

from __future__ import annotations

import shlex
import sys

from .. import cli
from . import BUDGETS, reproduce


def main(argv=None) -> int:
    parser = cli.Parser(prog="python -m awd_nonnormal.reproduce", description=__doc__,
                        formatter_class=cli.argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=BUDGETS, default="quick",
                        help="smoke (seconds), quick (< 15 min on 2 CPU cores), hour (one CPU hour), "
                        "full (the paper's scale) (default %(default)s)")
    parser.add_argument("--out", default=None, help="report folder (default: runs/reproduce-<budget>)")
    cli.add_device_argument(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel processes of the task sweeps (default: the budget's, 2 for quick)")
    parser.add_argument("--data-dir", default="data", help="where the corpora and MNIST are (default %(default)s)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    cli.setup_logging()
    cli.setup_cpu(1)
    out = args.out or f"runs/reproduce-{args.budget}"
    command = "python -m awd_nonnormal.reproduce " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))

    def run() -> int:
        report = reproduce(args.budget, out, device=args.device, workers=args.workers, data_dir=args.data_dir,
                           command=command.strip())
        print(f"report: {report}")
        return cli.EXIT_OK

    return cli.run_command("reproduce", run)


if __name__ == "__main__":
    sys.exit(main())
