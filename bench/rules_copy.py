#!/usr/bin/env python
"""What the training rules change on the copy task: runs of one grid under three sets of rules.

Variants (every other setting equal):

* ``old``   per-tensor clipping (tf.keras), two trainable RNN biases (PyTorch), exact loss: the
            task trainer's rules before they followed the paper's Keras 2.2 code (except that
            a batch whose gradient norm overflows now moves no tensor at all);
* ``keras`` Keras 2.2's global-norm clipping and one bias (the defaults now), exact loss;
* ``keras-loss`` the same with Keras' clipped-softmax loss (``--loss keras``).

Each run is an ordinary task run in ``<out>/<variant>/lr<lr>-seed<seed>`` (run the same command
again to continue an interrupted measurement, or to print the table of finished runs). Per
variant the table gives how many runs exploded (ended as diverged, or had a validation loss above
``--explode`` times the random baseline at some epoch; the diverged ones in brackets), how many
ended below half the baseline (the paper's success), and the median best validation loss. The
``keras-loss`` losses are Keras' capped ones, as the paper's logs were.

    python bench/rules_copy.py --T 200 --n-train 4000 --n-val 500 --epochs 6 --out runs/rules-bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from awd_nonnormal.tasks import train as T  # noqa: E402

VARIANTS = {
    "old": dict(clip_mode="tensor", biases=2, loss="exact"),
    "keras": dict(clip_mode="global", biases=1, loss="exact"),
    "keras-loss": dict(clip_mode="global", biases=1, loss="keras"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=200)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--alpha", type=float, default=1.02, help="chain alpha")
    p.add_argument("--lrs", default="1e-4,5e-5")
    p.add_argument("--seeds", default="1,2,3,4,5,6")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--explode", type=float, default=10.0,
                   help="a validation loss above this many baselines counts as an explosion")
    p.add_argument("--out", default="runs/rules-bench")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    rows = []
    for seed in seeds:  # seed-major, so that a partial measurement covers every variant
        for variant in variants:
            for lr in lrs:
                config = T.make_config(task="copy", T=args.T, n_train=args.n_train, n_val=args.n_val,
                                       epochs=args.epochs, init="chain", init_scale=args.alpha,
                                       lr=lr, seed=seed, **VARIANTS[variant])
                t0 = time.perf_counter()
                out = T.train(config, Path(args.out) / variant / f"lr{lr:g}-seed{seed}",
                              T.RunOptions(progress=False))
                r = out.result
                vals = [m["val_loss"] for m in out.metrics]
                exploded = r["status"] == "diverged" or any(
                    not v < args.explode * r["baseline"] for v in vals)
                rows.append(dict(variant=variant, lr=lr, seed=seed, status=r["status"],
                                 exploded=exploded, success=r["success"], best=r["min_val_loss"],
                                 final=r["final_val_loss"], baseline=r["baseline"]))
                print(f"{variant:<10} lr {lr:g} seed {seed}: {r['status']}, best "
                      f"{r['min_val_loss']}, final {r['final_val_loss']}"
                      f"{' (exploded)' if exploded else ''} [{time.perf_counter() - t0:.0f} s]",
                      flush=True)
    (Path(args.out) / "table.json").write_text(json.dumps(rows, indent=1))
    print(f"\ncopy T={args.T}, chain alpha {args.alpha:g}, n_train {args.n_train}, n_val "
          f"{args.n_val}, {args.epochs} epochs, lr {args.lrs}, seeds {args.seeds}; baseline "
          f"{rows[0]['baseline']:.4f}\n")
    print("| variant | lr | runs | exploded (diverged) | below half the baseline | median best val loss |")
    print("|---|---|---|---|---|---|")
    for variant in variants:
        for lr in lrs:
            sel = [r for r in rows if r["variant"] == variant and r["lr"] == lr]
            bests = [r["best"] for r in sel if r["best"] is not None]
            median = f"{statistics.median(bests):.4f}" if bests else "n/a"
            diverged = sum(r["status"] == "diverged" for r in sel)
            print(f"| {variant} | {lr:g} | {len(sel)} | {sum(r['exploded'] for r in sel)} ({diverged}) | "
                  f"{sum(r['success'] for r in sel)} | {median} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
