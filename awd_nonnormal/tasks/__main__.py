"""Command line of the synthetic tasks: ``python -m awd_nonnormal.tasks [train|sweep] ...``.

``train`` (the default when no subcommand is named) trains one model, like the paper's script::

    python -m awd_nonnormal.tasks --task copy --init chain --init-scale 1.02 --lr 5e-5 --seed 3

``sweep`` runs the grid of Figure 3 (or a smaller one) in parallel and summarises it::

    python -m awd_nonnormal.tasks sweep --task copy --models chain,fbchain,identity,orthogonal \\
        --out runs/copy-sweep --workers 2

Errors print one line and exit with the status of :data:`awd_nonnormal.cli.EXIT_CODES` (2 for a
bad argument, 1 for a missing or unreadable file, 3 for an output folder that holds another run,
4 for a run that diverged); Ctrl-C saves the running checkpoints and exits with status 130 (run
the same command again to continue).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


from .. import cli, cluster
from ..init import INIT_PARAMS, add_init_arguments
from ..runs import check_output_dir, check_resume
from . import data as D
from . import ensemble as E
from . import rules
from . import sweep as S
from . import train as T

PROG = "python -m awd_nonnormal.tasks"
SUBCOMMANDS = ("train", "sweep")

cli.register_data_error(D.IDXError)

# TaskConfig fields set by the shared task options (argparse dest -> config field).
_TASK_FIELDS = ("task", "T", "hidden", "nonlinearity", "n_train", "n_val", "epochs", "batch_size",
                "clip", "clip_mode", "biases", "loss", "stop_loss", "copy_layout", "perm_seed", "mnist_val")


def _add_task_options(p: argparse.ArgumentParser) -> None:
    """Options shared by train and sweep. Every default is None (= the task's default), so that
    what the user typed can be told from what was left out."""
    g = p.add_argument_group("task (defaults: the paper's settings for the task)")
    g.add_argument("--task", help=f"one of {', '.join(sorted(T.TASKS))} (default: copy)")
    g.add_argument("--T", type=int, help="sequence length: copy total length in the paper layout, "
                   "delay in the arjovsky layout (default 500); addition (default 750); psMNIST is "
                   "always 784")
    g.add_argument("--copy-layout", choices=D.COPY_LAYOUTS,
                   help="copy: 'paper' (T steps in total, baseline 10 ln 8 / T) or 'arjovsky' "
                   "(T + 20 steps, baseline 10 ln 8 / (T + 20)) (default: paper)")
    g.add_argument("--hidden", type=int, help="recurrent units N (default 100; psMNIST 25)")
    g.add_argument("--nonlinearity", help="elu, relu, tanh or linear (default elu; addition relu)")
    g.add_argument("--n-train", type=int, help="training sequences/images (default 60000)")
    g.add_argument("--n-val", type=int, help="validation sequences/images (default 10000)")
    g.add_argument("--epochs", type=int, help="maximum epochs (default 100)")
    g.add_argument("--batch-size", type=int, help="batch size (default 16)")
    g.add_argument("--clip", type=float, help="gradient-norm clip (default 10; 0: no clipping, "
                   "which is --clip-mode none)")
    g.add_argument("--clip-mode", choices=T.CLIP_MODES,
                   help="'global': scale every gradient by clip / max(norm, clip) with one norm "
                   "over all of them (Keras 2.2 clipnorm, the paper's code; default); 'tensor': "
                   "each tensor by its own norm (tf.keras); 'none'")
    g.add_argument("--biases", type=int, choices=rules.BIASES,
                   help="trainable biases of the RNN layer: 1 as Keras' SimpleRNN (b_hh frozen "
                   "at 0; default) or 2 as PyTorch's layers (b_ih and b_hh)")
    g.add_argument("--loss", choices=rules.LOSSES,
                   help="copy and psMNIST: 'exact' cross-entropy (default) or 'keras' (Keras "
                   "2.2's: softmax clipped to [1e-7, 1 - 1e-7] before the log, at most 16.1 nats "
                   "a step, no gradient from a saturated step); training and validation alike")
    g.add_argument("--stop-loss", type=float, help="stop early below this validation loss "
                   "(default 0.0025; 0: never)")
    g.add_argument("--perm-seed", help="psMNIST pixel permutation: an integer seed of "
                   f"numpy RandomState (default {D.DEFAULT_PERM_SEED}, as expRNN/scoRNN), or "
                   "'run' to use the run seed (as the paper's code did)")
    g.add_argument("--mnist-val", choices=T.MNIST_VALIDATION,
                   help="psMNIST validation set: 'test' = the t10k split (the paper's Keras code, "
                   "default) or 'holdout' = the last --n-val training images")

    r = p.add_argument_group("running")
    cli.add_device_argument(r)
    r.add_argument("--mnist-dir", default="data/mnist",
                   help="folder of the MNIST IDX files, .gz or raw (default: data/mnist)")
    r.add_argument("--eval-batch-size", type=int, default=500,
                   help="batch size of the validation pass (default 500; no effect on results)")
    cli.add_threads_argument(r, help="torch CPU threads per run (default 1: these small "
                             "matrices gain nothing from more; 0 = torch's default)")
    cli.add_output_arguments(r)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog=PROG,
                     description="Synthetic long-memory tasks of Orhan & Pitkow (ICLR 2020): "
                     "copy, addition, psMNIST. Without a subcommand, 'train' is assumed.")
    sub = parser.add_subparsers(dest="command", metavar="{train,sweep}")

    tr = sub.add_parser("train", help="train one model (default)", description="Train one "
                        "model on one task. A run folder that holds the same config is finished "
                        "(nothing is redone) or continued from its checkpoint.")
    add_init_arguments(tr, shown_default="chain", zero_bias_flag=False)
    tr.add_argument("--lr", type=float, help="RMSprop learning rate (default 1e-4)")
    tr.add_argument("--seed", type=int, help="run seed: weights, data and shuffling (default 1)")
    tr.add_argument("--out", help="run folder (default: runs/tasks/<task>-<init>-lr<lr>-seed<seed>-<hash>)")
    tr.add_argument("--resume", action="store_true", help="continue the run saved in --out with "
                    "its stored config (flags given now must agree with it, except a larger "
                    "--epochs, which extends the run, finished or not)")
    _add_task_options(tr)

    sw = sub.add_parser("sweep", help="run a grid of runs in parallel (Figure 3)",
                        description="Run a hyper-parameter grid (the paper's by default: "
                        "11 learning rates x 6 seeds x 7 or 9 values per model) in parallel worker "
                        "processes. Finished runs are skipped and interrupted ones resumed, so "
                        "running the same command again continues an interrupted sweep.",
                        epilog=S.GRID_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("--models", help="comma-separated models (initializer names or presets; "
                    "default: chain,fbchain,identity,orthogonal, or those of --grid)")
    sw.add_argument("--lr", help="learning rates, a LIST (default: the paper's 11)")
    sw.add_argument("--seeds", help="seeds, a LIST (default 1:6)")
    sw.add_argument("--values", "--scale", action="append", metavar="MODEL[.PARAM]=LIST",
                    help="values of a model's swept parameter (chain: alpha, fbchain: beta, "
                    "identity/orthogonal: scale); repeatable")
    sw.add_argument("--grid", metavar="FILE.json", help="a JSON grid (see below); flags override it")
    sw.add_argument("--out", help="sweep folder (default: runs/sweep-<task>)")
    sw.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    sw.add_argument("--ensemble", default="1", metavar="M|auto",
                    help="train M runs at once as one batched model (per worker); auto: as many "
                         "as the GPU's memory holds; on CPU 16 for N <= 50, else none "
                         "(default 1: none)")
    sw.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="where the runs go: 'local' worker processes (--workers), or 'ray': one "
                    "Ray task per run (--threads CPUs, a GPU with --device cuda) on the cluster at "
                    "--address (needs the extra: pip install -e \".[cluster]\")")
    sw.add_argument("--address", help="Ray cluster address (host:port, or 'auto' for the cluster "
                    "this machine belongs to; default: start a local Ray instance)")
    sw.add_argument("--max-retries", type=int, default=2, metavar="N",
                    help="with --executor ray: rerun a run whose worker died up to N times (it "
                    "resumes from its checkpoint), then report it as failed (default 2)")
    sw.add_argument("--rank-by", choices=S.RANK_BY, default="final",
                    help="best config by the seeds' mean final (default) or minimum validation loss")
    sw.add_argument("--dry-run", action="store_true", help="print the plan (runs per model) and exit")
    sw.add_argument("--summarize", action="store_true",
                    help="only summarise the finished runs of the sweep in --out, with the grid "
                    "and task settings stored with it (task and grid flags may be left out; one "
                    "that disagrees with the stored sweep is refused)")
    sw.add_argument("--init-plugin", action="append", dest="init_plugins", metavar="MODULE|FILE.py",
                    help="import a module or file that registers initializers (repeatable)")
    _add_task_options(sw)
    return parser


def _normalise_argv(argv: Sequence[str]) -> List[str]:
    """Insert the default subcommand: ``--task copy ...`` means ``train --task copy ...``."""
    argv = list(argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        return ["train", *argv]
    return argv


def _task_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The task settings the user gave (None = not given), in the flat form of
    :func:`~.train.flat_config` (a numeric ``--perm-seed`` as an int)."""
    kw = {f: getattr(args, f) for f in _TASK_FIELDS if getattr(args, f) is not None}
    if isinstance(kw.get("perm_seed"), str) and kw["perm_seed"].strip().isdigit():
        kw["perm_seed"] = int(kw["perm_seed"])
    if args.init_plugins:
        kw["init_plugins"] = list(args.init_plugins)
    return kw


def _options(args: argparse.Namespace, progress: bool) -> T.RunOptions:
    if args.eval_batch_size < 1:
        raise T.TaskError(f"--eval-batch-size must be a positive integer, got {args.eval_batch_size}")
    return T.RunOptions(device=args.device, progress=progress, mnist_dir=args.mnist_dir,
                        eval_batch_size=args.eval_batch_size)


def _train_config(args: argparse.Namespace, options: Optional[T.RunOptions] = None,
                  stack: Optional[contextlib.ExitStack] = None) -> tuple:
    """The config and folder of the run; a resumed run's folder is locked on ``stack`` first
    (extending it writes there; without a stack, only while this runs)."""
    options = options or _options(args, progress=False)
    if stack is None:
        with contextlib.ExitStack() as own:
            return _train_config(args, options, own)
    kw = _task_kwargs(args)
    for name in ("init", "lr", "seed") + tuple(f"init_{k}" for k in INIT_PARAMS):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.resume:
        if not args.out:
            raise T.TaskError("--resume needs --out, the folder of the run to continue")
        stack.enter_context(T.run_lock(args.out))
        stored = T.stored_config(args.out)
        if stored is None:
            raise T.TaskDataError(f"--resume: {args.out} holds no run (no {T.CONFIG_FILE})")
        config = T.adopt_unknown_data(stored, T.identify_data(T.config_from_dict(stored), options),
                                      args.out)
        # a larger --epochs extends the run, finished or not
        merged = check_resume(T.flat_config(config), kw, may_change={"epochs"},
                              where=f"the run in {args.out}")
        if merged["epochs"] != config.epochs:
            config = T.extend_run(args.out, merged["epochs"])
        return config, Path(args.out)
    config = T.identify_data(T.make_config(**kw), options)
    out = Path(args.out) if args.out else Path("runs") / "tasks" / T.run_name(config)
    return config, out


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.5f}"


def _print_run_summary(outcome: "T.RunOutcome") -> None:
    r = outcome.result
    epochs = r.get("epochs_run", 0)
    per_epoch = f"{r['time'] / epochs:.1f} s/epoch" if epochs else "no epoch finished"
    head = "already finished" if outcome.skipped else r["status"]
    print(f"{outcome.run_dir.name}: {head} after {epochs} epoch(s), {per_epoch}")
    final = r.get("final_val_loss")
    ratio = f", {100 * final / r['baseline']:.1f} % of it" if final is not None else ""
    print(f"  final validation loss {_fmt(final)} (random baseline {r['baseline']:.5f}{ratio}); "
          f"success (< {T.SUCCESS_FRACTION * r['baseline']:.5f}): {'yes' if r['success'] else 'no'}")
    if r.get("val_acc") is not None:
        print(f"  validation accuracy {100 * r['val_acc']:.2f} %")
    if r.get("message"):
        print(f"  {r['message']}")
    print(f"  run folder: {outcome.run_dir}")


def _cmd_train(args: argparse.Namespace) -> int:
    options = _options(args, progress=not args.no_progress)
    check_output_dir(args.out or Path("runs") / "tasks", "--out")
    with contextlib.ExitStack() as stack:
        config, out = _train_config(args, options, stack)
        cli.setup_cpu(args.threads)
        outcome = T.train(config, out, options)
    _print_run_summary(outcome)
    return cli.EXIT_DIVERGED if outcome.result.get("status") == "diverged" else cli.EXIT_OK


def _print_and_write_summary(summary, out: Path) -> None:
    print(S.format_summary(summary))
    written = S.write_summary(summary, out)
    for path in written:
        if path.suffix != ".png":  # awd_nonnormal.plots logs the figures it writes
            print(f"wrote {path}")
    if not written:
        print(f"summary files in {out} unchanged (summary.csv, summary.json, figures)")


def _cmd_summarize(args: argparse.Namespace) -> int:
    """Tabulate the sweep stored in --out with the grid and settings stored with it."""
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{args.task or 'copy'}"
    grid, settings = S.load_sweep(out)
    S.check_stored_sweep(grid, settings, _task_kwargs(args), models=args.models, lrs=args.lr,
                         seeds=args.seeds, values=args.values, grid_file=args.grid)
    plan = S.plan_sweep(grid, settings, out)
    _print_and_write_summary(S.summarize(plan, rank_by=args.rank_by), out)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    if args.summarize:
        return _cmd_summarize(args)
    grid = S.grid_from_args(task=args.task, models=args.models, lrs=args.lr, seeds=args.seeds,
                            values=args.values, grid_file=args.grid,
                            plugins=tuple(args.init_plugins or ()))
    base = _task_kwargs(args)
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{base.get('task', 'copy')}"
    if args.workers < 1:
        raise T.TaskError(f"--workers must be a positive integer, got {args.workers}")
    ensemble = "auto" if args.ensemble == "auto" else E.check_members_count(args.ensemble)
    if args.max_retries < 0:
        raise T.TaskError(f"--max-retries must be >= 0, got {args.max_retries}")
    if args.executor == "ray" and not args.dry_run:
        cluster.require_ray()
    options = _options(args, progress=False)
    task = T.get_task(base.get("task", "copy"))
    if args.dry_run:  # the plan needs no data: without them it cannot tell which runs are done
        try:
            base["data_fingerprint"] = task.fingerprint(T.make_config(**base), options)
        except D.IDXError as exc:
            print(f"({cli.one_line(exc)}: the plan counts no run as finished)")
        print(S.format_plan(S.plan_sweep(grid, base, out)))
        return 0
    check_output_dir(out, "--out")
    base["data_fingerprint"] = task.fingerprint(T.make_config(**base), options)
    plan = S.plan_sweep(grid, base, out)
    cli.setup_cpu(args.threads)
    stats = S.run_sweep(plan, options, workers=args.workers, threads=args.threads,
                        progress=not args.no_progress, ensemble=ensemble, executor=args.executor,
                        address=args.address, max_retries=args.max_retries)
    _print_and_write_summary(S.summarize(plan, rank_by=args.rank_by), out)
    if stats["errors"]:
        print(f"{PROG}: error: {len(stats['errors'])} run(s) failed (see the log above); the same "
              "command runs them again", file=sys.stderr)
        return cli.EXIT_ERROR
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv))
    cli.setup_logging(args.verbose)
    command = _cmd_sweep if args.command == "sweep" else _cmd_train
    return cli.run_command(PROG, lambda: command(args),
                           interrupted="interrupted; checkpoints are saved; run the same command "
                                       "again to continue", traceback=args.verbose > 0)


if __name__ == "__main__":
    sys.exit(main())
