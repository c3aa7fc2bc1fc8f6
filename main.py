#!/usr/bin/env python
"""Train a word- or character-level language model: AWD-LSTM (Merity et al. 2018) with LSTM, GRU,
vanilla RNN or QRNN layers and the non-normal initializers of Orhan & Pitkow (ICLR 2020).

The flags of salesforce/awd-lstm-lm's main.py keep their names and defaults, except ``--cuda``,
which is ``--device auto|cpu|cuda``, and ``--model RNN``, which has the defaults of
:data:`MODEL_DEFAULTS` (the paper's vanilla-RNN settings) unless a flag is given. This script only parses the command line into
:class:`~awd_nonnormal.model.ModelConfig` and :class:`~awd_nonnormal.lm.TrainConfig` and calls
:func:`awd_nonnormal.lm.run`.

Examples::

    python main.py --data data/penn --model RNN --init chain --init-alpha 0.95 --optimizer adam --lr 1e-3
    python main.py --resume runs/20240101-120000-4242/model.latest.pt --epochs 100
    python main.py --finetune runs/20240101-120000-4242/model.pt --epochs 50   # = python finetune.py ...
    torchrun --nproc_per_node 4 main.py --data data/wikitext-103 ...   # DistributedDataParallel
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import FrozenSet, List, Optional, Sequence, Tuple

from awd_nonnormal import cli, distributed
from awd_nonnormal.finetune import finetune
from awd_nonnormal.init import init_options_from_args
from awd_nonnormal.lm import OPTIMIZERS, RunResult, TrainConfig, loss_units, run
from awd_nonnormal.model import ModelConfig
from awd_nonnormal.rnn import NONLINEARITIES, RNN_TYPES

PROG = "main.py"
logger = logging.getLogger("main")

#: Defaults that differ by --model (argparse dest -> value); a flag given on the command line
#: wins. RNN: the paper's vanilla-RNN settings (Orhan & Pitkow 2020, section 3.1.2: Adam, every
#: dropout 0.1) with a learning rate and activation that train on PTB text (docs/language-models.md).
#: LSTM and GRU keep awd-lstm-lm's defaults (SGD at lr 30 and its dropouts).
MODEL_DEFAULTS = {
    "RNN": {"optimizer": "adam", "lr": 2e-3, "nonlinearity": "tanh", "dropout": 0.1, "dropouth": 0.1,
            "dropouti": 0.1, "dropoute": 0.1, "wdrop": 0.1},
}

# argparse dest -> setting name of awd_nonnormal.lm (see lm._flat_settings); every dest not
# listed is an action, not a setting.
_SETTINGS = {
    "model": "rnn_type", "emsize": "emsize", "nhid": "nhid", "nlayers": "nlayers",
    "dropout": "dropout", "dropouth": "dropouth", "dropouti": "dropouti", "dropoute": "dropoute",
    "wdrop": "wdrop", "tied": "tied", "nonlinearity": "nonlinearity", "init": "init.spec",
    "init_alpha": "init.params", "init_beta": "init.params", "init_scale": "init.params",
    "init_eps": "init.params", "init_zero_bias": "init.zero_bias", "init_plugins": "init.plugins",
    "data": "data", "batch_size": "batch_size", "eval_batch_size": "eval_batch_size",
    "test_batch_size": "test_batch_size", "bptt": "bptt", "lr": "lr", "clip": "clip", "warmup": "warmup",
    "epochs": "epochs", "alpha": "alpha", "beta": "beta", "wdecay": "wdecay",
    "optimizer": "optimizer", "when": "when", "nonmono": "nonmono", "seed": "seed",
    "log_interval": "log_interval", "save": "save", "device": "device",
    "max_skipped_steps": "max_skipped_steps", "no_progress": "progress", "overwrite": "overwrite",
    "cutoffs": "cutoffs", "zoneout": "zoneout",
}


class _GoneCuda(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--cuda is gone (in awd-lstm-lm it switched CUDA *off*): use --device cuda, "
                     "--device cpu or --device auto (the default)")


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog=PROG,
        description="Train an AWD-LSTM-style language model (LSTM, GRU, vanilla RNN or QRNN) with "
                    "non-normal initializers (Orhan & Pitkow, ICLR 2020).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    m = ModelConfig()
    g = p.add_argument_group("data and model (awd-lstm-lm flags)")
    g.add_argument("--data", default=d.data, help="corpus folder with train.txt, valid.txt, test.txt")
    g.add_argument("--model", default=m.rnn_type, choices=RNN_TYPES,
                   help="recurrent layer type; RNN changes the defaults of "
                        + ", ".join(f"--{k} ({v})" for k, v in MODEL_DEFAULTS["RNN"].items()))
    g.add_argument("--emsize", type=int, default=m.emsize, help="size of word embeddings")
    g.add_argument("--nhid", type=int, default=m.nhid, help="hidden units per layer")
    g.add_argument("--nlayers", type=int, default=m.nlayers, help="number of layers")
    g.add_argument("--dropout", type=float, default=m.dropout, help="locked dropout on the output")
    g.add_argument("--dropouth", type=float, default=m.dropouth, help="locked dropout between layers")
    g.add_argument("--dropouti", type=float, default=m.dropouti, help="locked dropout on the input embedding")
    g.add_argument("--dropoute", type=float, default=m.dropoute, help="embedding dropout (whole words)")
    g.add_argument("--wdrop", type=float, default=m.wdrop, help="DropConnect on the hidden-to-hidden weights")
    g.add_argument("--tied", action=argparse.BooleanOptionalAction, default=m.tied,
                   help="tie the decoder to the embedding (the last layer then has emsize units)")
    g.add_argument("--nonlinearity", default=m.nonlinearity, choices=NONLINEARITIES,
                   help="activation of --model RNN")
    g.add_argument("--zoneout", type=float, default=m.zoneout,
                   help="zoneout of --model QRNN (AWD-LSTM: 0; its --wdrop is DropConnect on the gate weights)")
    g.add_argument("--cutoffs", nargs="+", default=["auto"], metavar="auto|none|N",
                   help="adaptive softmax cut-offs: auto (awd-lstm-lm's rule: 2800 20000 76000 above 75k "
                        "words, 4200 35000 180000 above 500k, else a full softmax), none (full softmax) "
                        "or increasing word ids")

    cli.add_init_arguments(p, default_spec=m.init.spec)

    g = p.add_argument_group("training (awd-lstm-lm flags)")
    g.add_argument("--lr", type=float, default=d.lr, help="initial learning rate")
    g.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clip (0: none)")
    g.add_argument("--warmup", type=int, default=d.warmup, metavar="STEPS",
                   help="linear learning-rate warm-up over the first STEPS optimizer steps (0: none)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="upper epoch limit")
    g.add_argument("--batch_size", type=int, default=d.batch_size, metavar="N", help="batch size")
    g.add_argument("--bptt", type=int, default=d.bptt, help="mean sequence length of truncated BPTT")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed")
    g.add_argument("--nonmono", type=int, default=d.nonmono, help="non-monotone interval of the ASGD trigger")
    g.add_argument("--log-interval", type=int, default=d.log_interval, metavar="N", help="batches between log lines")
    g.add_argument("--save", default=None,
                   help="best-model checkpoint path DIR/NAME.pt; NAME.latest.pt and NAME.metrics.jsonl go "
                        "beside it. Not given (%(default)s): runs/<date-time>-<pid>/model.pt, or beside "
                        "the --resume file when resuming")
    g.add_argument("--alpha", type=float, default=d.alpha, help="activation regularisation (AR) weight")
    g.add_argument("--beta", type=float, default=d.beta, help="temporal activation regularisation (TAR) weight")
    g.add_argument("--wdecay", type=float, default=d.wdecay, help="weight decay")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue the run whose latest state is PATH (NAME.latest.pt)")
    g.add_argument("--finetune", default=None, metavar="SOURCE",
                   help="finetune the model in SOURCE (a run's NAME.pt) with averaged SGD from the start, "
                        "as a new run (default --save: NAME.finetune.pt beside it)")
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="sgd (switches to ASGD) or adam")
    g.add_argument("--when", nargs="+", type=int, default=list(d.when),
                   help="epochs at whose end the learning rate is divided by 10")

    g = p.add_argument_group("running")
    cli.add_device_argument(g, default=d.device)
    g.add_argument("--cuda", nargs=0, action=_GoneCuda, help=argparse.SUPPRESS)
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, metavar="N",
                   help="batch size of validation")
    g.add_argument("--test-batch-size", type=int, default=d.test_batch_size, metavar="N", help="batch size of the test")
    g.add_argument("--overwrite", action="store_true", help="let a new run replace the files at --save")
    g.add_argument("--max-skipped-steps", type=int, default=d.max_skipped_steps, metavar="N",
                   help="end the run as diverged after N steps in a row whose gradient norm is not "
                        "finite (each such step is skipped)")
    cli.add_output_arguments(g)
    cli.add_threads_argument(g)
    return p


def explicit_fields(argv: Optional[Sequence[str]]) -> FrozenSet[str]:
    """The settings given on the command line (see :func:`awd_nonnormal.cli.given_dests`)."""
    return frozenset({_SETTINGS.get(k) for k in cli.given_dests(build_parser, argv)} - {None})


def apply_model_defaults(args: argparse.Namespace, explicit: FrozenSet[str]) -> List[str]:
    """Set the :data:`MODEL_DEFAULTS` of ``args.model`` that the command line left unset (their
    dests are config field names). Returns the applied ones as flags, e.g. ``["--lr 0.001"]``."""
    applied = []
    for dest, value in MODEL_DEFAULTS.get(args.model, {}).items():
        if dest not in explicit:
            setattr(args, dest, value)
            applied.append(f"--{dest} {value:g}" if isinstance(value, float) else f"--{dest} {value}")
    return applied


def parse_cutoffs(values: Sequence[str]) -> Optional[Tuple[int, ...]]:
    """``--cutoffs``: ``auto`` -> None, ``none`` -> () (full softmax), else the integers."""
    words = [v.lower() for v in values]
    if words == ["auto"]:
        return None
    if words == ["none"]:
        return ()
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--cutoffs takes auto, none or increasing integers, got {' '.join(values)}") from None


def configs_from_args(args: argparse.Namespace) -> Tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(
        rnn_type=args.model, emsize=args.emsize, nhid=args.nhid, nlayers=args.nlayers,
        dropout=args.dropout, dropouth=args.dropouth, dropouti=args.dropouti, dropoute=args.dropoute,
        wdrop=args.wdrop, tied=args.tied, nonlinearity=args.nonlinearity,
        init=init_options_from_args(args), cutoffs=parse_cutoffs(args.cutoffs), zoneout=args.zoneout)
    train = TrainConfig(
        data=args.data, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        test_batch_size=args.test_batch_size, bptt=args.bptt, lr=args.lr, clip=args.clip, warmup=args.warmup,
        epochs=args.epochs, alpha=args.alpha, beta=args.beta, wdecay=args.wdecay,
        optimizer=args.optimizer, when=tuple(args.when), nonmono=args.nonmono, seed=args.seed,
        log_interval=args.log_interval, save=args.save or ("" if args.finetune else _default_save()),
        device=args.device,
        max_skipped_steps=args.max_skipped_steps, progress=not args.no_progress,
        overwrite=args.overwrite)
    return model, train


def _default_save() -> str:
    """runs/<date-time>-<pid>/model.pt: two runs started in the same second on one machine have
    different process ids, so they never share a folder (and the run lock refuses a second
    writer anyway)."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder, n = Path("runs") / stamp, 1
    while folder.exists():
        n += 1
        folder = Path("runs") / f"{stamp}-{n}"
    return str(folder / "model.pt")


def print_summary(result: RunResult) -> None:
    p = result.paths
    if result.interrupted:
        print(f"\nTraining stopped early at {result.stopped_at}; continue it with: "
              f"python main.py --resume {p.latest}")
    if result.test_loss is None:
        print("\nNo epoch finished, so there is no model to test.")
    else:
        print(f"\nBest model: epoch {result.best_epoch} of {result.epochs_done} trained")
        print(f"{'split':<6} {'loss (nats)':>12} {'perplexity':>12} {'bits/token':>11}")
        for split, loss in (("valid", result.val_loss), ("test", result.test_loss)):
            u = loss_units(loss)
            print(f"{split:<6} {u['loss']:>12.4f} {u['ppl']:>12.2f} {u['bpt']:>11.4f}")
    print(f"best model:   {p.best}" + ("" if p.best.exists() else " (not written)"))
    print(f"latest state: {p.latest}" + ("" if p.latest.exists() else " (not written)"))
    print(f"metrics:      {p.metrics}")
    if result.tokens_per_s is not None:
        print(f"training speed: {result.tokens_per_s:,.0f} tokens/s")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = explicit_fields(argv)
    try:  # under torchrun: one rank of a DistributedDataParallel job
        dist = distributed.from_env()
    except ValueError as exc:
        parser.error(str(exc))
    if dist.active and args.save is None and args.resume is None:
        parser.error("under torchrun, give --save DIR/NAME.pt: every rank must use the same run files")
    if dist.active and args.finetune is not None:
        parser.error("--finetune runs in one process, not under torchrun")
    # ranks other than 0 log only warnings and errors, and name themselves in an error line
    cli.setup_logging(args.verbose, logging.INFO if dist.is_main else logging.WARNING)
    prog = PROG if not dist.active else f"{PROG} [rank {dist.rank}]"
    cli.setup_cpu(args.threads)

    if args.resume is None and args.finetune is None:  # these take their settings from a checkpoint
        applied = apply_model_defaults(args, explicit)
        if applied:
            logger.info("--model %s defaults: %s (flags on the command line win)", args.model, " ".join(applied))

    def command() -> int:
        model_cfg, train_cfg = configs_from_args(args)
        if args.finetune and args.resume:
            raise ValueError("--finetune starts a new run from a model, --resume continues a run: "
                             "give one of them")
        if args.resume is None and args.finetune is None:  # these load their model
            if model_cfg.tied and model_cfg.nlayers == 1 and "nhid" in explicit and model_cfg.nhid != model_cfg.emsize:
                logger.warning("--nhid %d is not used: with tied weights the last layer has --emsize %d "
                               "units, and the model has one layer (pass --no-tied for %d units)",
                               model_cfg.nhid, model_cfg.emsize, model_cfg.nhid)
        try:
            if args.finetune:
                result = finetune(args.finetune, model_cfg, train_cfg, explicit=explicit)
            else:
                result = run(model_cfg, train_cfg, resume=args.resume, explicit=explicit, dist=dist)
            distributed.shutdown(barrier=True)
        finally:
            distributed.shutdown()
        if dist.is_main:
            print_summary(result)
        return cli.EXIT_INTERRUPTED if result.interrupted else cli.EXIT_OK

    return cli.run_command(prog, command, interrupted="aborted", traceback=args.verbose > 0)


if __name__ == "__main__":
    sys.exit(main())
