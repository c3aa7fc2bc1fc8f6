"""Does the headline command learn at full size? Runs

    python main.py --data DIR --model RNN --init fbchain

(the defaults of ``--model RNN`` at full default size) for about ``--batches`` training batches
on a corpus you give it, logging every batch, and prints the loss trajectory: the training loss
of every batch, the validation loss of every epoch, and the uniform guess ``ln V`` to compare
with. Outside the test suite: at full size a batch takes seconds on a CPU.

    python bench/headline_check.py --data DIR [--batches 300] [--threads 1] [-- EXTRA MAIN.PY FLAGS]

A PTB-format corpus made from any text will do, e.g. Mikolov's ``valid.txt`` split 80/10/10 into
``train/valid/test.txt``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = ["--model", "RNN", "--init", "fbchain"]
BATCH = re.compile(r"\| epoch +(\d+) \| +(\d+)/ *(\d+) batches .*\| loss +([-\d.e+]+|nan|inf) ")
EPOCH = re.compile(r"end of epoch +(\d+) .*valid loss +([-\d.e+]+|nan|inf) ")
VOCAB = re.compile(r"(\d+) tokens in the vocabulary")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="PTB-format corpus folder")
    p.add_argument("--batches", type=int, default=300, help="about this many training batches")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the run")
    p.add_argument("extra", nargs="*", help="more main.py flags (after --)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from awd_nonnormal.data import load_corpus
    from awd_nonnormal.lm import TrainConfig

    corpus = load_corpus(args.data)
    d = TrainConfig()
    per_epoch = max(1, (len(corpus.train) // d.batch_size - 1) // d.bptt)
    epochs = max(1, math.ceil(args.batches / per_epoch))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "main.py"), "--data", args.data, *HEADLINE,
               "--epochs", str(epochs), "--log-interval", "1", "--no-progress",
               "--save", str(Path(tmp) / "model.pt"), *args.extra]
        print("$ " + " ".join(cmd[1:]), flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True, env=env)
        step, losses = 0, []
        for line in proc.stdout:
            if VOCAB.search(line) and "corpus" in line and "lm:" in line:
                V = int(VOCAB.search(line).group(1))
                print(f"V = {V}, ln V = {math.log(V):.3f} nats (the uniform guess)", flush=True)
            elif "defaults" in line or "WARNING" in line or "error" in line:
                print(line.rstrip(), flush=True)
            m = BATCH.search(line)
            if m:
                step += 1
                losses.append(float(m.group(4)))
                print(f"batch {step:4d} (epoch {m.group(1)}) train loss {losses[-1]:8.3f}  "
                      f"[{time.perf_counter() - start:6.0f} s]", flush=True)
            m = EPOCH.search(line)
            if m:
                print(f"epoch {m.group(1)} valid loss {float(m.group(2)):.3f}", flush=True)
        rc = proc.wait()
    if losses:
        print(f"max train loss {max(losses):.3f}; first {losses[0]:.3f}, last {losses[-1]:.3f}; "
              f"{step} batches in {time.perf_counter() - start:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
