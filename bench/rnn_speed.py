"""Speed and memory of awd_nonnormal.rnn.RNN against PyTorch's nn.RNN, forward + backward.

    python bench/rnn_speed.py [--device auto|cpu|cuda] [--repeats 7] [--shapes copy,psmnist,lm]

For every shape and nonlinearity it prints the median time of one forward + backward pass and

* ``x relu``: time(nn.RNN relu) / time(ours). nn.RNN(relu) is the fastest thing PyTorch offers
  for a vanilla RNN, so this is the figure that matters for elu and linear.
* ``x same``: time(nn.RNN same nonlinearity) / time(ours), for tanh and relu.
  In both, > 1 means ours is faster.
* ``mem``: peak memory of ours / peak memory of nn.RNN(relu) (< 1: ours uses less). The peak is
  the most memory allocated by torch at any point of the forward + backward pass, above what was
  allocated before it (input, weights). CPU: from the allocation records of ``torch.profiler``
  (``profile_memory=True``; the profiler logs its start and stop on stderr); CUDA:
  ``torch.cuda.max_memory_allocated``.
* for tanh and relu, the time of the hand-written path (``impl="python"``) and of PyTorch's fused
  kernel (``impl="fused"``) with the same weights, which is what ``impl="auto"`` chooses between.

Candidates are timed round-robin (one pass of each per repeat, after warm-up), so load from other
processes falls on all of them alike; the ratios within one run are what to compare. On a CPU shared
with other jobs, ``--threads 1`` gives steadier figures: a multi-threaded op stalls whenever one of
its threads is descheduled.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awd_nonnormal.rnn import NONLINEARITIES, RNN, rnn_reference, uses_fused_kernel  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    T: int
    B: int
    N: int
    d: int
    input_grad: bool  # the LM layer's input comes from the embedding and needs a gradient


SHAPES = {
    "copy": Shape("copy", T=500, B=16, N=100, d=10, input_grad=False),
    "psmnist": Shape("psmnist", T=784, B=16, N=25, d=1, input_grad=False),
    "lm": Shape("lm", T=70, B=80, N=1150, d=400, input_grad=True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(forward: Callable, params, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    """One training step's worth of work: forward, backward with a dense output gradient."""

    def step() -> None:
        for p in params:
            p.grad = None
        if x.grad is not None:
            x.grad = None
        out, _ = forward(x)
        out.backward(grad_out)

    return step


def time_round_robin(steps: Dict[str, Callable], repeats: int, warmup: int, device) -> Dict[str, float]:
    """Median seconds per call of each step, calling the steps in turn."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory(step: Callable, device: torch.device) -> float:
    """Peak bytes allocated by torch during ``step()``, above the allocation at its start."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in records:  # nbytes > 0: allocation, < 0: free
        current += e.nbytes()
        peak = max(peak, current)
    return float(peak)


def run_shape(shape: Shape, device: torch.device, repeats: int, warmup: int, memory: bool, naive: bool):
    torch.manual_seed(0)
    x = torch.randn(shape.T, shape.B, shape.d, device=device, requires_grad=shape.input_grad)
    grad_out = torch.randn(shape.T, shape.B, shape.N, device=device)

    refs = {nl: nn.RNN(shape.d, shape.N, nonlinearity=nl).to(device) for nl in ("relu", "tanh")}
    ours = {}
    for nl in NONLINEARITIES:
        m = RNN(shape.d, shape.N, nonlinearity=nl).to(device)
        m.load_state_dict(refs["relu"].state_dict())  # the same weights for every model
        ours[nl] = m

    steps = {f"nn.RNN({nl})": make_step(m, list(m.parameters()), x, grad_out) for nl, m in refs.items()}
    for nl, m in ours.items():
        steps[nl] = make_step(m, list(m.parameters()), x, grad_out)
        if nl in ("tanh", "relu"):
            for impl in ("python", "fused"):
                def forward(inp, m=m, impl=impl):
                    return _with_impl(m, impl, inp)
                steps[f"{nl}:{impl}"] = make_step(forward, list(m.parameters()), x, grad_out)
    if naive:
        m = ours["elu"]
        h0 = torch.zeros(1, shape.B, shape.N, device=device)
        steps["elu:naive"] = make_step(
            lambda inp: rnn_reference(inp, h0, m.layer_weights(), "elu"), list(m.parameters()), x, grad_out
        )
    t = time_round_robin(steps, repeats, warmup, device)
    mem = {}
    if memory:
        for name in ["nn.RNN(relu)", "nn.RNN(tanh)", *NONLINEARITIES]:
            mem[name] = peak_memory(steps[name], device)
    return t, mem


def _with_impl(module: RNN, impl: str, x):
    saved = module.impl
    module.impl = impl
    try:
        return module(x)
    finally:
        module.impl = saved


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per candidate (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per candidate first")
    parser.add_argument("--shapes", default="copy,psmnist,lm", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--naive", action="store_true", help="also time elu as a plain autograd loop")
    args = parser.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; valid choices: {', '.join(SHAPES)}")

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{torch.get_num_threads()} threads"
    if hasattr(os, "getloadavg"):
        where += f", load average {os.getloadavg()[0]:.2f}"
    mem_what = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation records"
    print(f"torch {torch.__version__}, device {device} ({where}), "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print("x relu = time(nn.RNN relu) / time(ours); x same = time(nn.RNN same nonlinearity) / time(ours):")
    print("  > 1 means ours is faster.  mem = peak memory(ours) / peak memory(nn.RNN relu): "
          "< 1 means ours uses less.")
    print(f"  peak memory = most bytes allocated by torch during forward+backward ({mem_what}).")
    for name in names:
        shape = SHAPES[name]
        t, mem = run_shape(shape, device, args.repeats, args.warmup, not args.no_memory, args.naive)
        report(shape, t, mem, device)


def report(shape: Shape, t: Dict[str, float], mem: Dict[str, float], device: torch.device) -> None:
    """Print one shape's table: times in ms, speed ratios and memory ratios."""
    print()
    print(f"{'shape':<28} {'nonlin':<7} {'path':<7} {'ms':>8} {'x relu':>7} {'x same':>7} {'mem':>6}   notes")
    ref = t["nn.RNN(relu)"]
    label = f"{shape.name} (T={shape.T} B={shape.B} N={shape.N} d={shape.d})"
    line = f"nn.RNN(relu) {ref * 1e3:.1f} ms, nn.RNN(tanh) {t['nn.RNN(tanh)'] * 1e3:.1f} ms"
    if mem:
        line += (f"; peak {mem['nn.RNN(relu)'] / 2**20:.1f} MiB (relu), "
                 f"{mem['nn.RNN(tanh)'] / 2**20:.1f} MiB (tanh)")
    print(f"{label:<28} {'':<7} {'':<7} {'':>8}   {line}")
    for nl in NONLINEARITIES:
        path = "fused" if uses_fused_kernel(nl, device) else "python"
        same = f"{t[f'nn.RNN({nl})'] / t[nl]:7.2f}" if nl in ("tanh", "relu") else f"{'-':>7}"
        ratio_mem = f"{mem[nl] / mem['nn.RNN(relu)']:6.2f}" if mem else f"{'-':>6}"
        notes = ""
        if nl in ("tanh", "relu"):
            notes = f"python path {t[f'{nl}:python'] * 1e3:.1f} ms, fused {t[f'{nl}:fused'] * 1e3:.1f} ms"
            if mem:
                notes += f"; mem vs nn.RNN({nl}) {mem[nl] / mem[f'nn.RNN({nl})']:.2f}"
        if nl == "elu" and "elu:naive" in t:
            notes = f"naive autograd loop {t['elu:naive'] * 1e3:.1f} ms (x relu {ref / t['elu:naive']:.2f})"
        print(f"{'':<28} {nl:<7} {path:<7} {t[nl] * 1e3:8.1f} {ref / t[nl]:7.2f} {same} {ratio_mem}   {notes}")


if __name__ == "__main__":
    main()
