"""Analyse trained checkpoints: Henrici index, spectral radius and weight profiles of every
recurrent layer and gate (Orhan & Pitkow 2020, Table 2 and Figures 5-6).

    python analyze.py runs/copy/*/checkpoint.pt --only-successful
    python analyze.py runs/sweep/ --group-by init --initial --out analysis/

The work happens in :mod:`awd_nonnormal.posthoc`; this script parses arguments and prints.
The README's analysis section describes every option and the outputs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from awd_nonnormal import cli
from awd_nonnormal.runs import check_output_dir, check_output_file
from awd_nonnormal.posthoc import (CHECKPOINT_PATTERNS, DEFAULT_GROUP_BY, HEATMAP_CHOICES, HEATMAP_ORDERS,
                                   AnalysisError, PosthocConfig, format_table, run)

PROG = "analyze.py"
cli.register_data_error(AnalysisError)


def _key_value(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    if not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _max_offset(text: str) -> Optional[int]:
    if text.lower() in ("all", "full", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog=PROG,
        description="Henrici index, spectral radius and weight profiles (units ordered by the peak "
                    "time of their response to a pulse) of every recurrent layer and gate of "
                    "awd-nonnormal checkpoints, aggregated over groups as mean +- s.e.m.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint files, glob patterns (expanded here too, so quoting is fine) or "
                        "folders (searched recursively for --pattern files; files there that are not "
                        "checkpoints of ours are skipped with a warning)")
    p.add_argument("--out", default="analysis", metavar="DIR",
                   help="folder for the JSON and the figures (default: %(default)s)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                   help="where to write the JSON with every number (default: DIR/analysis.json)")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="write no PNG figures")
    p.add_argument("--group-by", default=None, metavar="FIELDS",
                   help="comma-separated checkpoint fields that define a group, e.g. 'init' or "
                        "'init,config.lr'; a short name matches the one field ending in it "
                        "(init -> config.init); 'path' gives one group per checkpoint, 'none' one group "
                        f"for all (default: {','.join(DEFAULT_GROUP_BY)}, those that exist)")
    p.add_argument("--filter", dest="filters", action="append", type=_key_value, default=[],
                   metavar="FIELD=VALUE",
                   help="keep only checkpoints whose FIELD equals VALUE (numbers compared as numbers, "
                        "booleans as true/false); repeat to require several")
    p.add_argument("--only-successful", action="store_true",
                   help="keep only task runs with result.success (validation loss below 50%% of the "
                        "random baseline), as the paper's Table 2 and Figures 5-6 do")
    p.add_argument("--initial", action="store_true",
                   help="also analyse the initial weights (the run's NAME.initial.pt beside the checkpoint, "
                        "or initial_rnn inside older checkpoints), shown beside the trained ones")
    p.add_argument("--max-offset", type=_max_offset, default=20, metavar="K",
                   help="profile figures show i - j in [-K, K] (default: %(default)s; 'all' for every "
                        "offset); the JSON always holds the full profile")
    p.add_argument("--heatmaps", choices=HEATMAP_CHOICES, default="first",
                   help="weight-matrix heat maps for the first checkpoint of each group, for all, or "
                        "none (default: %(default)s)")
    p.add_argument("--heatmap-order", choices=HEATMAP_ORDERS, default="peak",
                   help="units of the heat maps in peak-time order or in index order (default: %(default)s)")
    p.add_argument("--pattern", dest="patterns", action="append", default=None, metavar="GLOB",
                   help="file names a folder search takes, repeatable "
                        f"(default: {' '.join(CHECKPOINT_PATTERNS)})")
    p.add_argument("--steps", type=int, default=100,
                   help="zero-input steps after the pulse (default: %(default)s, as in the paper); at "
                        "least N are run for a layer of N units, fewer if the pulse dies out exactly")
    p.add_argument("--null-samples", type=int, default=100, metavar="K",
                   help="random unit orders for the shuffled-order null of the profile at i - j = +1 "
                        "(column z(+1)); 0 for none (default: %(default)s)")
    p.add_argument("--jitter", type=float, default=1e-3,
                   help="ties in peak time are broken by adding U[0, JITTER) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the jitter, fresh for every checkpoint (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is drawn on a terminal only, naming the gate block in hand)")
    cli.add_output_arguments(p, progress=False,
                             verbose_help="log progress (-v) or debugging detail (-vv) on stderr")
    cli.add_threads_argument(p, help="torch CPU threads for the eigenvalues (default 1; 0: torch's "
                                     "default, all cores)")
    return p


def config_from_args(args: argparse.Namespace) -> PosthocConfig:
    if args.group_by is None:
        group_by = None
    elif args.group_by.strip().lower() in ("none", ""):
        group_by = ()
    else:
        group_by = tuple(f.strip() for f in args.group_by.split(",") if f.strip())
    return PosthocConfig(
        out=args.out, json_path=args.json_path, figures=args.figures, heatmaps=args.heatmaps,
        heatmap_order=args.heatmap_order, max_offset=args.max_offset, group_by=group_by,
        filters=tuple(args.filters), only_successful=args.only_successful, initial=args.initial,
        patterns=tuple(args.patterns) if args.patterns else CHECKPOINT_PATTERNS,
        steps=args.steps, jitter=args.jitter, seed=args.seed, null_samples=args.null_samples,
        progress=not args.no_progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.setup_logging(args.verbose, quiet_level=logging.WARNING)
    cli.setup_cpu(args.threads)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return cli.run_command(PROG, lambda: _report(args, cfg))


def _report(args: argparse.Namespace, cfg: PosthocConfig) -> int:
    if cfg.figures or cfg.json_path is None:
        check_output_dir(cfg.out, "--out")
    if cfg.json_path is not None:
        check_output_file(cfg.json_path, "--json")
    report = run(args.checkpoints, cfg)
    try:
        _print_report(report)
    except BrokenPipeError:  # e.g. piped into head: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return cli.EXIT_OK


def _print_report(report) -> None:
    print(format_table(report.data))
    n = sum(g["n"] for g in report.data["groups"])
    print(f"\n{n} checkpoint(s) in {len(report.data['groups'])} group(s)"
          + (f"; {report.filtered_out} left out by the filters" if report.filtered_out else "")
          + (f"; {report.secondary} latest/snapshot language-model file(s) left out" if report.secondary else "")
          + (f"; {len(report.skipped)} file(s) skipped (not checkpoints of ours)" if report.skipped else ""))
    if report.missing_initial:
        print(f"--initial: {len(report.missing_initial)} checkpoint(s) hold or name no readable "
              f"initial weights, so they have no 'initial' values: {', '.join(report.missing_initial)}")
    print(f"numbers: {report.json_path}")
    if report.figures:
        print(f"figures: {len(report.figures)} PNG file(s) in {report.figures[0].parent}")


if __name__ == "__main__":
    sys.exit(main())
