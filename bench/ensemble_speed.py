"""Speed of batched ensembles (awd_nonnormal.tasks.ensemble) against the single-run task trainer.

    python bench/ensemble_speed.py [--device auto|cpu|cuda] [--members 1,8,32,64,128]
                                   [--shapes copy,psmnist] [--batches 6] [--threads 1]
                                   [--hidden N]

For each task shape (copy: T = 500, N = 100; psMNIST: 784 steps, N = 25; batch 16, the paper's
settings) it times training batches (forward, backward, clipping, RMSprop) of

* the single-run trainer's step (``train.build_model``, ``train.make_optimizer`` over the trainable
  parameters, ``rules.clip_gradients_``: what ``train.Trainer`` does per batch), one run;
* an ensemble of M runs (``ensemble.Ensemble.step`` and ``update``), for each M,

in one process, round-robin (one timed batch of each per repeat, after a warm-up), so that load
from other processes falls on all alike. It prints the median time per batch, the time per batch
per run, the runs per hour this gives for a full run (100 epochs of 60,000 / 16 = 3,750 batches,
training only), and ``x run``: the speed-up per run over the single-run trainer (> 1: the
ensemble is faster per run). With ``--threads 1`` the figure is per core: a pool of W worker
processes on W cores runs W single runs at once, and W ensembles as well, so ``x run`` is also
the speed-up of ensembles over that pool. psMNIST uses random images of MNIST's shape (the
arithmetic does not depend on the pixel values). ``--hidden N`` replaces the tasks' widths (100
and 25) to see where the gain starts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awd_nonnormal.tasks import data as D  # noqa: E402
from awd_nonnormal.tasks import ensemble as E  # noqa: E402
from awd_nonnormal.tasks import rules  # noqa: E402
from awd_nonnormal.tasks import train as T  # noqa: E402
from awd_nonnormal import cli  # noqa: E402
from awd_nonnormal.utils import resolve_device  # noqa: E402

BATCHES_PER_RUN = 100 * 60_000 // 16


def _datasets(config, device):
    n = config.n_train
    if config.task == "psmnist":
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, D.MNIST_PIXELS), generator=gen, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=gen)
        data = D.MnistSet(images, labels, D.pixel_permutation(0))
        return data, data, {}
    train_set, val_set, facts = T.get_task(config.task).datasets(config, T.RunOptions())
    return T.to_device(train_set, device), T.to_device(val_set, device), facts


HIDDEN = {}


def _configs(shape: str, m: int):
    kw = dict(task=shape, n_train=16 * 8, n_val=16, init="chain", **HIDDEN)
    if shape == "psmnist":
        kw["perm_seed"] = 0
    return [T.make_config(**kw, lr=1e-5 * (1 + k % 11), seed=1 + k % 6, init_scale=0.99 + 0.01 * (k % 7))
            for k in range(m)]


def single_step(shape: str, device):
    config = _configs(shape, 1)[0]
    task = T.get_task(config.task)
    train_set, _, _ = _datasets(config, device)
    model = T.build_model(config).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = T.make_optimizer(params, config)
    order = torch.randperm(config.n_train, generator=torch.Generator().manual_seed(0))
    state = {"pos": 0}

    def step():
        pos = state["pos"] % 8
        state["pos"] += 1
        index = order[pos * 16:(pos + 1) * 16].to(device)
        x, y = train_set.batch(index, device)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(x), y, config.loss)
        loss.item()
        loss.backward()
        clipped = rules.clip_gradients_([p.grad for p in params], config.clip, config.clip_mode)
        float(clipped.norm)
        opt.step()
    return step


def ensemble_step(shape: str, m: int, device):
    configs = _configs(shape, m)
    datasets = {}
    for c in configs:
        key = E.data_key(c)
        if key not in datasets:
            datasets[key] = _datasets(c, device)
    members = [E.Member(c, Path("."), {}, {}, {}) for c in configs]
    ens = E.Ensemble(members, [T.build_model(c) for c in configs], T.RunOptions(), device, datasets)
    orders = {(E.data_key(c), 0): torch.randperm(c.n_train, generator=torch.Generator().manual_seed(0))
              for c in configs}

    def step():
        for mem in ens.members:
            mem.position = (mem.position + 1) % 8
        ens.step(orders)
        ens.update()
    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--members", default="1,8,32,64,128")
    p.add_argument("--shapes", default="copy,psmnist")
    p.add_argument("--batches", type=int, default=6, help="timed batches of each candidate")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--hidden", type=int, help="width N instead of the task's (100, 25)")
    args = p.parse_args()
    if args.hidden:
        HIDDEN["hidden"] = args.hidden
    cli.setup_cpu(args.threads)  # threads (0: torch's) and freed memory kept, as every command
    device = resolve_device(args.device)
    members = [int(v) for v in args.members.split(",")]
    print(f"device {device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
          f"median of {args.batches} batches; runs/hour: 100 epochs x 3750 batches, training only")
    for shape in args.shapes.split(","):
        cands = {"single": single_step(shape, device)}
        for m in members:
            cands[f"M={m}"] = ensemble_step(shape, m, device)
        times = {k: [] for k in cands}
        for f in cands.values():
            f()
        _sync(device)
        for _ in range(args.batches):
            for k, f in cands.items():
                t0 = time.perf_counter()
                f()
                _sync(device)
                times[k].append(time.perf_counter() - t0)
        base = statistics.median(times["single"])
        print(f"\n{shape}: T = {T.get_task(shape).seq_len(_configs(shape, 1)[0])}, "
              f"N = {_configs(shape, 1)[0].hidden}, batch 16")
        print(f"  {'':<8} {'ms/batch':>9} {'ms/run':>8} {'runs/hour':>10} {'x run':>6}")
        for k, ts in times.items():
            m = 1 if k == "single" else int(k[2:])
            t = statistics.median(ts)
            per_run = t / m
            print(f"  {k:<8} {t * 1e3:>9.1f} {per_run * 1e3:>8.2f} "
                  f"{3600 / (per_run * BATCHES_PER_RUN):>10.2f} {base / per_run:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
