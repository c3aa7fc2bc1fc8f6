#!/usr/bin/env python
"""Generate text by sampling from a trained language model, as awd-lstm-lm's generate.py.

Example::

    python generate.py --checkpoint runs/ptb/model.pt --words 200 --temperature 0.8 --prompt "the company"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

from awd_nonnormal import cli
from awd_nonnormal.checkpoint import atomic_write
from awd_nonnormal.data import EOS
from awd_nonnormal.generate import corpus_kind, decode, encode_prompt, sample
from awd_nonnormal.trained import load_trained
from awd_nonnormal.utils import resolve_device

PROG = "generate.py"


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog=PROG, description=__doc__.strip().splitlines()[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="the model checkpoint (a run's NAME.pt)")
    p.add_argument("--data", default=None, help="corpus folder (default: the one the run was trained on)")
    p.add_argument("--words", type=int, default=1000, help="number of tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature: lower is more conservative, higher more diverse")
    p.add_argument("--seed", type=int, default=1111, help="random seed of the sampling")
    p.add_argument("--prompt", default=None,
                   help="text to continue (plain text; for character corpora spaces are written as spaces)")
    p.add_argument("--outf", default=None, metavar="FILE", help="write the text to FILE instead of printing it")
    cli.add_device_argument(p)
    cli.add_output_arguments(p, progress=False)
    cli.add_threads_argument(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    cli.setup_cpu(args.threads)

    def command() -> int:
        if args.words < 0:
            raise ValueError(f"--words must be >= 0, got {args.words}")
        if not args.temperature > 0:
            raise ValueError(f"--temperature must be positive, got {args.temperature}")
        model, corpus, _ = load_trained(args.checkpoint, args.data, resolve_device(args.device))
        kind = corpus_kind(corpus.dictionary)
        prompt = encode_prompt(args.prompt, corpus.dictionary, kind) if args.prompt else []
        result = sample(model, args.words, temperature=args.temperature,
                        generator=torch.Generator().manual_seed(args.seed), prompt=prompt,
                        start=corpus.dictionary.word2idx.get(EOS, 0))
        text = decode(result.ids, corpus.dictionary, kind)
        if args.prompt:
            text = args.prompt + (" " if kind == "word" else "") + text
        if args.outf:
            atomic_write(args.outf, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
            print(f"wrote {args.words} tokens to {args.outf}")
        else:
            print(text)
        return cli.EXIT_OK

    return cli.run_command(PROG, command, interrupted="aborted")


if __name__ == "__main__":
    sys.exit(main())
