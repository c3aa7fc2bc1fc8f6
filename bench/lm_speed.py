"""Training and evaluation speed, and peak memory, of the language model's real training loop.

    python bench/lm_speed.py [--device auto|cpu|cuda] [--batches 3] [--configs ptb,small]
                             [--models LSTM,QRNN,RNN-tanh,RNN-elu] [--threads N]
    python bench/lm_speed.py --configs wt103,wt103-adaptive --models LSTM,QRNN   # large vocabulary

For each configuration and model it builds :class:`awd_nonnormal.lm.Trainer` on random token data
and runs :meth:`Trainer._train_epoch` (variable BPTT, dropouts, weight drop, AR/TAR, clipping,
SGD: exactly what ``main.py`` runs) over about ``--batches`` batches after one warm-up batch, then
:func:`awd_nonnormal.lm.evaluate` over the same number of validation chunks. It prints

* ``train tok/s``: training tokens per second (the ``tokens_per_s`` of the metrics file);
* ``eval tok/s``: validation tokens per second at the run's eval batch size (AWD-LSTM's 10);
* ``peak MiB``: CUDA: ``torch.cuda.max_memory_allocated`` during training, above what was
  allocated before (model, optimizer, data). CPU: the growth of the process's peak resident set
  size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over the warm-up and timed training, above
  the peak after building the model, optimizer and data; each measurement runs in its own process, so that one figure is not hidden
  by an earlier, larger high-water mark. RSS counts what the allocator keeps, so it is an upper
  bound of the tensors' own peak.

Configurations: ``ptb`` is AWD-LSTM's word-level PTB model (vocabulary 10,000, emsize 400,
nhid 1150, 3 layers, bptt 70, batch 80); ``small`` is emsize 200, nhid 256, 2 layers, bptt 35,
batch 20. ``wt103`` has WikiText-103's vocabulary (267,735 words) with a full softmax and
``wt103-adaptive`` the same with the adaptive softmax at AWD-LSTM's cut-offs (2800, 20000,
76000); both use emsize 400, nhid 1150, 3 layers, bptt 35 and batch 10 (small enough for a CPU:
the full softmax's logits alone are 350 x 267,735 floats per batch) and draw the tokens from a
Zipf distribution (p(rank r) ~ 1/r, ids in rank order), so that the head covers most targets as
it does on real text. On a CPU shared with other jobs the figures move by tens of percent from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awd_nonnormal.data import Corpus, Dictionary  # noqa: E402
from awd_nonnormal.lm import RunPaths, TrainConfig, Trainer, evaluate  # noqa: E402
from awd_nonnormal.model import ModelConfig  # noqa: E402
from awd_nonnormal import cli  # noqa: E402
from awd_nonnormal.utils import resolve_device  # noqa: E402

CONFIGS = {
    "ptb": dict(vocab=10000, emsize=400, nhid=1150, nlayers=3, bptt=70, batch_size=80),
    "small": dict(vocab=10000, emsize=200, nhid=256, nlayers=2, bptt=35, batch_size=20),
    "wt103": dict(vocab=267735, emsize=400, nhid=1150, nlayers=3, bptt=35, batch_size=10,
                  cutoffs=(), zipf=True),
    "wt103-adaptive": dict(vocab=267735, emsize=400, nhid=1150, nlayers=3, bptt=35, batch_size=10,
                           cutoffs=None, zipf=True),
}
MODELS = {"LSTM": ("LSTM", "tanh"), "GRU": ("GRU", "tanh"), "RNN-tanh": ("RNN", "tanh"),
          "RNN-relu": ("RNN", "relu"), "RNN-elu": ("RNN", "elu"), "QRNN": ("QRNN", "tanh")}
EVAL_BATCH = 10


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def measure(config: str, model: str, device_name: str, batches: int) -> dict:
    """One measurement (run in a fresh process by :func:`main`)."""
    c = CONFIGS[config]
    rnn_type, nonlinearity = MODELS[model]
    device = resolve_device(device_name)
    g = torch.Generator().manual_seed(0)
    # enough rows for `batches` batches of the longest likely length (bptt + 3 sd), plus the end
    rows = batches * (c["bptt"] + 15) + 2
    n_train, n_valid = rows * c["batch_size"], (batches * c["bptt"] + 1) * EVAL_BATCH
    if c.get("zipf"):
        weights = 1.0 / torch.arange(1, c["vocab"] + 1, dtype=torch.float64)  # Zipf: p(r) ~ 1/r
        train = torch.multinomial(weights, n_train, replacement=True, generator=g)
        valid = torch.multinomial(weights, n_valid, replacement=True, generator=g)
    else:
        train = torch.randint(0, c["vocab"], (n_train,), generator=g)
        valid = torch.randint(0, c["vocab"], (n_valid,), generator=g)
    corpus = Corpus(Dictionary(str(i) for i in range(c["vocab"])), train, valid, valid, "bench")
    mc = ModelConfig(rnn_type=rnn_type, nonlinearity=nonlinearity, emsize=c["emsize"], nhid=c["nhid"],
                     nlayers=c["nlayers"], ntoken=c["vocab"], cutoffs=c.get("cutoffs", ()))
    tc = TrainConfig(data="(random)", batch_size=c["batch_size"], eval_batch_size=EVAL_BATCH,
                     bptt=c["bptt"], epochs=1, progress=False, device=device_name,
                     lr=1.0)  # lr 30 lets an untuned elu RNN diverge on random tokens; speed is the same
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(mc, tc, corpus, device, RunPaths.from_save(str(Path(tmp) / "m.pt")))
    full = trainer.train_data

    def epoch(n: int) -> None:
        """About n batches: an "epoch" over the first n * bptt + 2 rows (lengths vary)."""
        trainer.train_data = full[: n * c["bptt"] + 2]
        st = trainer.state
        st.pos, st.batch, st.tokens, st.train_time = 0, 0, 0, 0.0
        trainer._train_epoch(None)

    rss_before = _maxrss_mib()  # model, optimizer and data are built; training has not run
    epoch(1)  # warm-up: allocator, kernels, lazy imports
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    epoch(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _maxrss_mib() - rss_before
    st = trainer.state
    train_tps = st.tokens / st.train_time

    evaluate(trainer.model, trainer.val_data[: c["bptt"] + 1], EVAL_BATCH, c["bptt"])  # warm-up
    start = time.perf_counter()
    evaluate(trainer.model, trainer.val_data, EVAL_BATCH, c["bptt"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    eval_tps = (trainer.val_data.size(0) - 1) * EVAL_BATCH / (time.perf_counter() - start)
    return {"config": config, "model": model, "device": str(device), "threads": torch.get_num_threads(),
            "train_tok_s": train_tps, "eval_tok_s": eval_tps, "peak_mib": peak,
            "batches": st.batch, "ms_per_batch": 1000 * st.train_time / st.batch}


def _names(valid) -> "Callable[[str], List[str]]":
    """An argparse type: a comma-separated list of names from ``valid`` (an error lists them)."""
    def parse(text: str) -> List[str]:
        names = [n.strip() for n in text.split(",")]
        bad = [n for n in names if n not in valid]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown name(s) {', '.join(map(repr, bad))}; valid: "
                                             f"{', '.join(valid)}")
        return names
    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", type=int, default=2, help="timed training batches and eval chunks")
    p.add_argument("--configs", type=_names(CONFIGS), default="small,ptb",
                   help=f"comma-separated, from: {', '.join(CONFIGS)} (default: %(default)s)")
    p.add_argument("--models", type=_names(MODELS), default="LSTM,QRNN,RNN-tanh,RNN-elu",
                   help=f"comma-separated, from: {', '.join(MODELS)} (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", nargs=2, metavar=("CONFIG", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batches < 1:
        p.error(f"--batches must be a positive integer, got {args.batches}")
    cli.setup_cpu(args.threads or 0)  # threads (None: torch's) and freed memory kept, as every command
    if args.worker:
        print(json.dumps(measure(*args.worker, args.device, args.batches)))
        return 0

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}; {args.batches} timed batches each")
    mem = "peak MiB (CUDA max allocated)" if device.type == "cuda" else "peak MiB (RSS growth)"
    print(f"{'config':<14} {'model':<9} {'ms/batch':>9} {'train tok/s':>12} {'eval tok/s':>11} {mem:>30}")
    results, failed = [], 0
    for config in args.configs:
        for model in args.models:
            cmd = [sys.executable, __file__, "--worker", config, model, "--device", args.device,
                   "--batches", str(args.batches)] + (["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            if proc.returncode != 0:
                lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
                print(f"{config:<14} {model:<9} failed: {lines[-1]}")
                failed += 1
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{config:<14} {model:<9} {r['ms_per_batch']:>9.0f} {r['train_tok_s']:>12.0f} "
                  f"{r['eval_tok_s']:>11.0f} {r['peak_mib']:>30.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
