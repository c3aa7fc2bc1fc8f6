#!/usr/bin/env python
"""Evaluate a trained language model with the continuous cache pointer (Grave et al. 2017), as
awd-lstm-lm's pointer.py: validation and test perplexity without and with the cache.

Example (awd-lstm-lm's PTB settings)::

    python pointer.py --save runs/ptb/model.pt --lambdasm 0.1 --theta 1.0 --window 500 --bptt 5000
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from awd_nonnormal import cli
from awd_nonnormal.lm import loss_units
from awd_nonnormal.pointer import CacheConfig, evaluate_splits
from awd_nonnormal.trained import load_trained
from awd_nonnormal.utils import resolve_device

PROG = "pointer.py"


def build_parser() -> argparse.ArgumentParser:
    d = CacheConfig()
    p = cli.Parser(prog=PROG, description=__doc__.strip().splitlines()[0] + " ...",
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--save", "--checkpoint", dest="checkpoint", required=True, metavar="PATH",
                   help="the model checkpoint to evaluate (a run's NAME.pt); --save as in awd-lstm-lm")
    p.add_argument("--data", default=None, help="corpus folder (default: the one the run was trained on)")
    p.add_argument("--lambdasm", type=float, default=d.lambdasm, help="weight lambda of the cache distribution")
    p.add_argument("--theta", type=float, default=d.theta, help="inverse temperature of the cache attention")
    p.add_argument("--window", type=int, default=d.window, help="positions held in the cache")
    p.add_argument("--bptt", type=int, default=d.bptt, help="evaluation chunk length (batch size 1)")
    cli.add_device_argument(p)
    cli.add_output_arguments(p, progress=False)
    cli.add_threads_argument(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    cli.setup_cpu(args.threads)

    def command() -> int:
        config = CacheConfig(lambdasm=args.lambdasm, theta=args.theta, window=args.window, bptt=args.bptt)
        model, corpus, _ = load_trained(args.checkpoint, args.data, resolve_device(args.device))
        results = evaluate_splits(model, {"valid": corpus.valid, "test": corpus.test}, config)
        print(f"cache: lambdasm {config.lambdasm:g}, theta {config.theta:g}, window {config.window}, "
              f"bptt {config.bptt}")
        print(f"{'split':<6} {'tokens':>9} {'ppl':>10} {'ppl+cache':>10} {'bpt':>8} {'bpt+cache':>10}")
        for split, r in results.items():
            plain, cached = loss_units(r.plain_loss), loss_units(r.cache_loss)
            print(f"{split:<6} {r.tokens:>9} {plain['ppl']:>10.2f} {cached['ppl']:>10.2f} "
                  f"{plain['bpt']:>8.4f} {cached['bpt']:>10.4f}")
        return cli.EXIT_OK

    return cli.run_command(PROG, command, interrupted="aborted")


if __name__ == "__main__":
    sys.exit(main())
