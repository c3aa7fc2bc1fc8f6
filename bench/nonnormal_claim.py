"""Do trained recurrent networks drift toward chain-like, non-normal weights (paper Table 2,
Figures 5-6)? Train small character language models on a generated corpus and measure.

    python bench/nonnormal_claim.py [--out runs/claim] [--epochs 8] [--nhid 128] [--seeds 2]
                                    [--figures docs/figures]

What it does, all on the CPU with one thread:

1. writes a corpus of pseudo-English (a seeded bigram grammar over 60 invented words, one
   character per token, ``_`` between words) to ``OUT/corpus``;
2. trains one-layer vanilla RNN (tanh) language models from the ``orthogonal``, ``identity`` and
   ``plain`` initializers, with ``chain`` as a positive control, and LSTMs from ``plain`` and
   ``mixed``, each for ``--seeds`` seeds, with ``main.py`` (Adam, no dropout or weight drop);
3. analyses them with ``analyze.py``'s machinery (``--initial``: the stored initial weights
   beside the trained ones) and prints, per model and gate: the Henrici index ``d(W)`` (raw and
   normalised) before and after training, and the weight profile at ``i - j = +1`` in peak order
   against its shuffled-order null (``z(+1)``: null standard deviations above the mean of the
   same matrix with its units in random orders).

``--figures DIR`` copies the profile figures into DIR. A run takes a few minutes; the models are
deliberately small and briefly trained (see docs/analysis.md for what that does and does not
show).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from awd_nonnormal.posthoc import PosthocConfig, run  # noqa: E402

#: (label, main.py flags) of the models trained.
MODELS = [
    ("RNN orthogonal", ["--model", "RNN", "--nonlinearity", "tanh", "--init", "orthogonal"]),
    ("RNN identity", ["--model", "RNN", "--nonlinearity", "tanh", "--init", "identity"]),
    ("RNN plain", ["--model", "RNN", "--nonlinearity", "tanh", "--init", "plain"]),
    ("RNN chain", ["--model", "RNN", "--nonlinearity", "tanh", "--init", "chain"]),
    ("LSTM plain", ["--model", "LSTM", "--init", "plain"]),
    ("LSTM mixed", ["--model", "LSTM", "--init", "mixed"]),
]


def write_corpus(folder: Path, seed: int = 0, chars: int = 150_000) -> None:
    """Pseudo-English: 60 words of 2-7 letters; each word picks its successor from 4 favourites
    (80 %) or at random, so there is structure within words (spelling) and across them (the
    bigram grammar). One character per token, ``_`` between words, a line per 12-word sentence."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(60)})
    follow = {w: rng.sample(words, 4) for w in words}
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", chars), ("valid", chars // 6), ("test", chars // 6)):
        lines, total, w = [], 0, rng.choice(words)
        while total < size:
            sentence = []
            for _ in range(12):
                w = rng.choice(follow[w]) if rng.random() < 0.8 else rng.choice(words)
                sentence.append(w)
            line = " ".join("_".join(sentence))
            lines.append(line)
            total += len(line) // 2 + 1
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")


def train(out: Path, corpus: Path, label: str, flags, seed: int, args) -> Path:
    save = out / "models" / f"{label.replace(' ', '-')}-s{seed}" / "model.pt"
    if save.exists():
        return save
    cmd = [sys.executable, str(ROOT / "main.py"), "--data", str(corpus), *flags, "--nhid", str(args.nhid),
           "--emsize", "32", "--nlayers", "1", "--dropout", "0", "--dropouth", "0", "--dropouti", "0",
           "--dropoute", "0", "--wdrop", "0", "--no-tied", "--optimizer", "adam", "--lr", str(args.lr),
           "--epochs", str(args.epochs), "--batch_size", "32", "--bptt", "50", "--alpha", "0", "--beta", "0",
           "--seed", str(seed), "--save", str(save), "--no-progress", "--device", "cpu"]
    t0 = time.time()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if done.returncode != 0:
        sys.exit(f"nonnormal_claim.py: training {label} seed {seed} failed:\n{done.stderr[-2000:]}")
    print(f"trained {label} seed {seed} in {time.time() - t0:.0f} s", flush=True)
    return save


def _fmt(stat) -> str:
    if stat is None or stat.get("mean") is None:
        return "-"
    sem = stat.get("sem")
    return f"{stat['mean']:.3f}" + ("" if sem is None else f" +- {sem:.3f}") + (" *" if stat.get("n_unreliable") else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/claim", help="working folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs per model (default: %(default)s)")
    p.add_argument("--nhid", type=int, default=128, help="hidden units (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per model (default: %(default)s)")
    p.add_argument("--figures", default=None, metavar="DIR", help="copy the profile figures here")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    corpus = out / "corpus"
    if not (corpus / "test.txt").exists():
        write_corpus(corpus)
    paths = [train(out, corpus, label, flags, seed, args)
             for label, flags in MODELS for seed in range(1, args.seeds + 1)]
    report = run([str(q) for q in paths],
                 PosthocConfig(out=str(out / "analysis"), initial=True, group_by=("rnn_type", "init"),
                               heatmaps="first", null_samples=200, progress=False))
    losses = {}
    for q in paths:
        metrics = [json.loads(line) for line in q.with_suffix(".metrics.jsonl").read_text().splitlines() if line]
        vals = [m["val_loss"] for m in metrics if m.get("val_loss") is not None]
        losses.setdefault(q.parent.name.rsplit("-s", 1)[0], []).append(min(vals) if vals else math.nan)
    print(f"\n{'model':16} {'gate':4} {'n':>2} {'val bpc':>7}  {'d(W) initial':>16} {'d(W) trained':>16}  "
          f"{'d/|W| initial':>16} {'d/|W| trained':>16}  {'p(+1) trained':>16} {'z(+1) initial':>16} "
          f"{'z(+1) trained':>16}")
    for g in report.data["groups"]:
        key = f"{g['key']['rnn_type']}-{g['key']['init']}"
        bpc = sum(losses[key]) / len(losses[key]) / math.log(2)
        for gate, st in g["layers"][0]["gates"].items():
            ist = g["initial"][0]["gates"][gate]
            print(f"{g['label']:16} {gate:4} {st['n']:>2} {bpc:7.3f}  {_fmt(ist['henrici_raw']):>16} "
                  f"{_fmt(st['henrici_raw']):>16}  {_fmt(ist['henrici_normalized']):>16} "
                  f"{_fmt(st['henrici_normalized']):>16}  {_fmt(st['profile_plus1']):>16} "
                  f"{_fmt(ist['plus1_z']):>16} {_fmt(st['plus1_z']):>16}")
    print("mean +- s.e.m. over seeds; * some values unreliable (ill-conditioned eigenvalues); "
          "val bpc: best validation loss in bits per character")
    print(f"numbers: {report.json_path}")
    if args.figures:
        dest = Path(args.figures)
        dest.mkdir(parents=True, exist_ok=True)
        for fig in report.figures:
            if fig.name.startswith("profile_"):
                shutil.copy(fig, dest / f"claim_{fig.name}")
        print(f"profile figures copied to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
