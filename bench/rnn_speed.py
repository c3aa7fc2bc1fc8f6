"""Speed and memory of awd_nonnormal.rnn.RNN against PyTorch's nn.RNN, forward + backward.

    python bench/rnn_speed.py [--device auto|cpu|cuda] [--repeats 7] [--shapes copy,psmnist,lm]
                              [--threads 1] [--system-malloc] [--no-memory] [--no-peak] [--no-rule] [--no-ptb]
                              [--activations]
                              [--task-step [--against REV] [--rounds 3]]

On CPU it first measures the float32 GEMM throughput of oneDNN (with a pre-packed weight, as the
layer uses it) and of ``torch.mm`` (MKL) at one large product, and reports the larger oneDNN figure
as the peak. It then times, for a grid of (B, N), one recurrent step product each way the step
loops can run it (oneDNN with the add post-op, ``torch.addmm``, and up to ``NUMPY_MAX_WORK``
NumPy's ``np.dot`` and ``np.add``, with NumPy's CPU time / wall time to show it ran on one
thread) and prints which was fastest and which one the layer's rule (``B*N*N >= ONEDNN_MIN_WORK``:
oneDNN; ``<= NUMPY_MAX_WORK``: NumPy) picks. The ``ptb`` table is AWD-LSTM's PTB recurrent stack
(T 70, B 80, layers 400-1150-1150-400) forward + backward, ours against ``nn.LSTM`` of the same
sizes, in GFLOP/s and % of that oneDNN peak (flops counted as 6 T B (d N + N N) per layer, four
times that for an LSTM). After the rule it times the weight-gradient products in both operand orders (the layer puts the
narrower operand on the left). ``--activations`` times the in-place activations on one step state of each
shape (PyTorch's ``tanh_`` against the layer's, which is NumPy's on CPU). ``--task-step`` times one training step of the copy task at T = 500
(batch, model, loss, backward, global clipping, RMSprop) as ``python -m awd_nonnormal.tasks``
runs it (freed memory kept, see ``awd_nonnormal.utils.retain_freed_memory``), the same code with
glibc's default allocator, the same step in stock PyTorch (``nn.RNN(relu)``, whose fused kernel
is PyTorch's fastest vanilla RNN) and, with ``--against REV``, the step of this repository at git
revision ``REV`` (its package imported under another name) with glibc's allocator, as it ran, and
with freed memory kept, taking turns for ``--rounds`` rounds; each timing runs in a fresh child
process, as the allocator setting is process-wide.
Everything else runs as the commands do, with freed memory kept; ``--system-malloc`` leaves
glibc's allocator as it is.

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
* the time of the hand-written loop with every product by ``torch.addmm`` (``impl="python"``) and,
  on CPU, by oneDNN (``impl="onednn"``), with the step loops on NumPy (``impl="numpy"``), and for
  tanh and relu of PyTorch's fused kernel
  (``impl="fused"``), with the same weights: what ``impl="auto"`` (the ``path`` column) chooses
  between.

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

import numpy as np  # noqa: E402

from awd_nonnormal.rnn import (  # noqa: E402
    NONLINEARITIES,
    NUMPY_MAX_WORK,
    ONEDNN_MIN_WORK,
    RNN,
    _uses_onednn,
    layer_path,
    numpy_steps_available,
    onednn_available,
    in_place_activation,
    rnn_reference,
)
from awd_nonnormal.utils import retain_freed_memory  # noqa: E402


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


def run_shape(shape: Shape, device: torch.device, repeats: int, warmup: int, memory: bool, naive: bool,
              quick: bool = False):
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
    impls = (["python"] + (["onednn"] if onednn_available(device, torch.float32) else [])
             + (["numpy"] if numpy_steps_available(device, torch.float32) else []))
    for nl, m in ours.items():
        steps[nl] = make_step(m, list(m.parameters()), x, grad_out)
        for impl in [] if quick else impls + (["fused"] if nl in ("tanh", "relu") else []):
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


def _best_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Fastest of ``repeats`` calls after ``warmup`` (the least disturbed by other processes)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_peak(repeats: int) -> Dict[str, float]:
    """float32 GFLOP/s of one (5600, 1150) x (1150, 1150) product (the LM layer's T*B rows) by
    oneDNN with a packed weight and by torch.mm (MKL), and of a 2048^3 product by oneDNN."""
    lp = torch.ops.mkldnn._linear_pointwise
    out = {}
    for name, (m, k, n) in {"lm": (5600, 1150, 1150), "square": (2048, 2048, 2048)}.items():
        a, w = torch.randn(m, k), torch.randn(n, k)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
        flops = 2.0 * m * k * n
        out[f"onednn {name}"] = flops / _best_seconds(lambda: lp(a, packed, None, "none", [], ""), repeats) / 1e9
        if name == "lm":
            out["mkl lm"] = flops / _best_seconds(lambda: torch.mm(a, w.t()), repeats) / 1e9
    return out


def orientation_check(repeats: int) -> list:
    """The weight-gradient products a^T b over the T*B rows (grad W_ih: delta and x; the ensemble's
    8-member batch of them), each backend in both orientations: rows of (label, backend, seconds
    with the narrower operand on the left, seconds with the wider one on the left).
    :func:`awd_nonnormal.rnn.row_contraction` puts the narrower one on the left."""
    lp = torch.ops.mkldnn._linear_pointwise
    rows = []
    for shape in SHAPES.values():
        r, n, d = shape.T * shape.B, shape.N, shape.d
        if n == d:
            continue
        delta, x = torch.randn(r, n), torch.randn(r, d)
        narrow, wide = (x, delta) if d < n else (delta, x)
        calls = max(3, int(5e7 / (r * n * d)))
        for backend, fn in (("torch.mm", lambda p, q: torch.mm(p.t(), q)),
                            ("oneDNN", lambda p, q: lp(p.t(), q.t(), None, "none", [], ""))):
            t_narrow = _best_seconds(_many(lambda: fn(narrow, wide), calls), repeats) / calls
            t_wide = _best_seconds(_many(lambda: fn(wide, narrow), calls), repeats) / calls
            rows.append((f"{shape.name} grad W_ih", backend, t_narrow, t_wide))
        if shape.name == "lm":  # the ensembles run the synthetic tasks only
            continue
        m = 8
        narrow3, wide3 = narrow.expand(m, r, -1).contiguous(), wide.expand(m, r, -1).contiguous()
        calls3 = max(1, calls // m)
        t_narrow = _best_seconds(_many(lambda: torch.bmm(narrow3.transpose(1, 2), wide3), calls3), repeats) / calls3
        t_wide = _best_seconds(_many(lambda: torch.bmm(wide3.transpose(1, 2), narrow3), calls3), repeats) / calls3
        rows.append((f"{shape.name} grad W_ih, {m} members", "torch.bmm", t_narrow, t_wide))
    return rows


def activation_times(repeats: int) -> list:
    """Rows of (shape name, elements, {activation: seconds per in-place call}) at each shape's
    (B, N) step state: PyTorch's tanh_, the layer's tanh (NumPy's on CPU,
    :func:`~awd_nonnormal.rnn.in_place_activation`, as the oneDNN loop and ensembles call it),
    relu_ and elu_, on standard-normal values."""
    import torch.nn.functional as F

    rows = []
    for shape in SHAPES.values():
        z = torch.randn(shape.B, shape.N)
        buf = z.clone()
        candidates = {"torch tanh_": torch.Tensor.tanh_, "layer tanh": in_place_activation("tanh", buf),
                      "relu_": torch.Tensor.relu_, "elu_": F.elu_}
        calls = max(50, int(2e7 / z.numel()))
        # a fresh copy of z before each call, so every call sees the same values; its time is
        # subtracted
        copy = _best_seconds(_many(lambda: buf.copy_(z), calls), repeats) / calls
        times = {}
        for name, fn in candidates.items():
            each = _best_seconds(_many(lambda: fn(buf.copy_(z)), calls), repeats) / calls
            times[name] = max(each - copy, 0.0)
        rows.append((shape.name, z.numel(), times))
    return rows


RULE_GRID = [(16, 25), (8, 100), (16, 100), (32, 90), (16, 128), (64, 64), (32, 100), (64, 72),
             (16, 200), (16, 256), (32, 160), (32, 200), (64, 100), (64, 128), (64, 200), (80, 256),
             (80, 1150), (128, 128), (256, 64), (4096, 20)]


def _many(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()
    return run


def rule_check(repeats: int) -> list:
    """The backends on the layer's products, and the rule's choice. Rows of (label, m, k, n,
    {backend: seconds}, the rule's backend, NumPy's CPU time / wall time or None): first the
    recurrent step product h W^T + u for a grid of (B, N), as each step loop runs it (oneDNN:
    packed weight, add post-op; NumPy: ``np.dot`` into a scratch array and ``np.add``, timed only
    up to ``NUMPY_MAX_WORK``, the sizes at which the layer may use it), then the whole-sequence
    products of the three benchmark shapes with their operands laid out as the layer passes them
    (the weight gradients contract over the T*B rows, so both of their operands are transposed)."""
    lp = torch.ops.mkldnn._linear_pointwise
    cpu = torch.device("cpu")
    rows = []
    for b, n in RULE_GRID:
        h, u, w = torch.randn(b, n), torch.randn(b, n), torch.randn(n, n) / n**0.5
        packed = torch.ops.mkldnn._reorder_linear_weight(w, b)
        calls = max(20, int(2e8 / (b * n * n)))  # about 0.1 s of work per timing
        buf = u.clone()
        times = {
            "addmm": _best_seconds(_many(lambda: buf.copy_(u).addmm_(h, w.t()), calls), repeats) / calls,
            "oneDNN": _best_seconds(_many(lambda: lp.binary(h, u, packed, None, "add"), calls), repeats) / calls,
        }
        share = None
        if b * n * n <= NUMPY_MAX_WORK:
            hn, un, bufn = h.numpy(), u.numpy(), buf.numpy()
            w_t, z = np.ascontiguousarray(w.numpy().T), np.empty((b, n), np.float32)

            def numpy_step() -> None:
                np.copyto(bufn, un)
                np.dot(hn, w_t, out=z)
                np.add(bufn, z, out=bufn)

            times["NumPy"] = _best_seconds(_many(numpy_step, calls), repeats) / calls
            share = _cpu_share(_many(numpy_step, calls))
        path = layer_path("tanh", b, n, cpu, torch.float32)
        rule = {"onednn": "oneDNN", "numpy": "NumPy", "addmm": "addmm"}[path]
        rows.append((f"step B={b} N={n}", b, n, n, times, rule, share))
    for shape in SHAPES.values():
        r, n, d = shape.T * shape.B, shape.N, shape.d
        delta, h, x, w_ih = torch.randn(r, n), torch.randn(r, n), torch.randn(r, d), torch.randn(n, d)
        products = {  # name: (a, w) for a @ w^T, and (m, k, n)
            "input projection": ((x, w_ih), (r, d, n)),
            "grad input": ((delta, w_ih.t()), (r, n, d)),
            # narrower operand on the left, as awd_nonnormal.rnn.row_contraction orders it
            "grad W_ih": ((x.t(), delta.t()), (d, r, n)) if n > d else ((delta.t(), x.t()), (n, r, d)),
            "grad W_hh": ((delta.t(), h.t()), (n, r, n)),
        }
        for name, ((a, w), (pm, pk, pn)) in products.items():
            calls = max(3, int(1e8 / (pm * pk * pn)))
            times = {
                "addmm": _best_seconds(_many(lambda: torch.mm(a, w.t()), calls), repeats) / calls,
                "oneDNN": _best_seconds(_many(lambda: lp(a, w, None, "none", [], ""), calls), repeats) / calls,
            }
            rule = "oneDNN" if _uses_onednn(pm, pk, pn, "auto", True) else "addmm"
            rows.append((f"{shape.name} {name}", pm, pk, pn, times, rule, None))
    return rows


def _cpu_share(fn: Callable[[], None]) -> float:
    """CPU time of this process / wall time over one call of ``fn``: about 1 when ``fn`` runs
    on one thread, more when a library spreads it over several."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return (time.process_time() - c0) / (time.perf_counter() - t0)


PTB_LAYERS = [(400, 1150), (1150, 1150), (1150, 400)]  # AWD-LSTM's PTB stack (d, N) per layer
PTB_T, PTB_B = 70, 80


def ptb_stack(device: torch.device, repeats: int, warmup: int) -> Dict[str, tuple]:
    """Forward + backward of the PTB recurrent stack: {model: (seconds, flops)}."""
    torch.manual_seed(0)
    x = torch.randn(PTB_T, PTB_B, PTB_LAYERS[0][0], device=device, requires_grad=True)
    flops_rnn = sum(6.0 * PTB_T * PTB_B * (d * n + n * n) for d, n in PTB_LAYERS)
    models = {"LSTM": ([nn.LSTM(d, n).to(device) for d, n in PTB_LAYERS], 4 * flops_rnn)}
    for nl in ("tanh", "elu"):
        models[f"RNN-{nl}"] = ([RNN(d, n, nonlinearity=nl).to(device) for d, n in PTB_LAYERS], flops_rnn)
    grad_out = torch.randn(PTB_T, PTB_B, PTB_LAYERS[-1][1], device=device)
    steps = {}
    for name, (layers, _) in models.items():
        def forward(inp, layers=layers):
            for layer in layers:
                inp, _ = layer(inp)
            return inp, None
        steps[name] = make_step(forward, [p for m in layers for p in m.parameters()], x, grad_out)
    t = time_round_robin(steps, repeats, warmup, device)
    return {name: (t[name], flops) for name, (_, flops) in models.items()}


def _task_step_of(package: str, label: str) -> Callable[[], None]:
    """One copy-task training step at T = 500 as the trainer of ``package`` (this repository's
    ``awd_nonnormal`` or an older copy of it) runs it: its model (paper settings: batch 16, N 100,
    elu, one bias), its batch (symbols where it has ``model_batch``, else one-hot floats), its
    loss, backward, its clipping (global, at 10), its RMSprop (``make_optimizer`` where it has
    one, else ``torch.optim.RMSprop``)."""
    import importlib

    train = importlib.import_module(f"{package}.tasks.train")
    rules = importlib.import_module(f"{package}.tasks.rules")
    config = train.make_config(task="copy", T=500, n_train=64, n_val=16)
    task = train.get_task(config.task)
    model = train.build_model(config)
    train_set, _, _ = task.datasets(config, train.RunOptions())
    params = [p for p in model.parameters() if p.requires_grad]
    make_optimizer = getattr(train, "make_optimizer", None)  # older revisions: torch's RMSprop
    if make_optimizer is not None:
        optimizer = make_optimizer(params, config)
    else:
        optimizer = torch.optim.RMSprop(params, lr=config.lr, alpha=config.rho, eps=config.opt_eps)
    index = torch.arange(config.batch_size)
    cpu = torch.device("cpu")
    batch = getattr(train, "model_batch", lambda dataset, i, d: dataset.batch(i, d))

    def step() -> None:
        x, y = batch(train_set, index, cpu)
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model(x), y, config.loss)
        loss.item()
        loss.backward()
        clipped = rules.clip_gradients_([p.grad for p in params], config.clip, config.clip_mode)
        float(clipped.norm)
        optimizer.step()

    step.__name__ = label
    return step


def _stock_step() -> Callable[[], None]:
    """The same step written with stock PyTorch only: ``nn.RNN(relu)`` (PyTorch's fastest vanilla
    RNN; it has no elu), ``nn.Linear``, ``F.cross_entropy`` on one-hot inputs,
    ``clip_grad_norm_`` and RMSprop: a reference that does not change with this repository."""
    from awd_nonnormal.tasks import train

    config = train.make_config(task="copy", T=500, n_train=64, n_val=16)
    train_set, _, _ = train.get_task("copy").datasets(config, train.RunOptions())
    torch.manual_seed(0)
    rnn, decoder = nn.RNN(10, 100, nonlinearity="relu"), nn.Linear(100, 9)
    params = list(rnn.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.RMSprop(params, lr=config.lr, alpha=config.rho, eps=config.opt_eps)
    index = torch.arange(config.batch_size)

    def step() -> None:
        x, y = train_set.batch(index, torch.device("cpu"))
        optimizer.zero_grad(set_to_none=True)
        out = decoder(rnn(x)[0])
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, 9), y.reshape(-1))
        loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        optimizer.step()

    return step


def _package_at(rev: str) -> Path:
    """Extract the ``awd_nonnormal`` package of git revision ``rev`` (this repository) into a
    temporary folder, renamed :data:`OLD_PACKAGE`; returns the folder. Its imports inside are all
    relative, so it imports beside the current package."""
    import io
    import subprocess
    import tarfile
    import tempfile

    root = Path(__file__).resolve().parents[1]
    data = subprocess.run(["git", "-C", str(root), "archive", rev, "awd_nonnormal"],
                          check=True, capture_output=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="rnn_speed_"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "awd_nonnormal").rename(folder / OLD_PACKAGE)
    if not (folder / OLD_PACKAGE / "tasks" / "rules.py").exists():
        raise SystemExit(f"rnn_speed.py: error: --against {rev}: that revision lacks "
                         f"awd_nonnormal/tasks/rules.py, which this comparison needs; use a revision "
                         f"with it (the training-rules change or later)")
    return folder


OLD_PACKAGE = "awd_nonnormal_at_rev"


def _step_child(kind: str, package_dir: str, repeats: int, warmup: int) -> float:
    """In a child process (``--step-child``): build the step of ``kind`` (``this`` or ``old``, the
    package extracted into ``package_dir``, or ``stock``), time it, return the median seconds."""
    if kind == "stock":
        step = _stock_step()
    elif kind == "old":
        sys.path.insert(0, package_dir)
        step = _task_step_of(OLD_PACKAGE, "old")
    else:
        step = _task_step_of("awd_nonnormal", "this code")
    return time_round_robin({"step": step}, repeats, warmup, torch.device("cpu"))["step"]


def task_step(repeats: int, warmup: int, rounds: int, against: str = "", threads: int = 1) -> list:
    """``rounds`` rounds of timings (median of ``repeats`` each) of the copy-500 training step:
    this code as its commands run it (freed memory kept, :func:`cli.setup_cpu`), the same code
    with glibc's default allocator, the stock-PyTorch reference and, with ``against``, the code at
    that git revision as it ran (glibc's default allocator) and with freed memory kept (the
    difference in code alone). Each timing runs in a fresh child process, since the allocator
    setting is process-wide, and the candidates take turns within a round so that load from other
    processes falls on all of them alike.
    One {name: seconds} per round."""
    import subprocess

    candidates = {"this code": ["this"], "this code, system malloc": ["this", "--system-malloc"],
                  "stock": ["stock", "--system-malloc"]}
    if against:
        folder = str(_package_at(against))
        candidates[against] = ["old", "--system-malloc", "--package-dir", folder]
        candidates[f"{against}, freed memory kept"] = ["old", "--package-dir", folder]
    results = []
    for _ in range(rounds):
        times = {}
        for name, args in candidates.items():
            # at least 10 warm-up steps: a fresh process's heap grows during its first steps
            cmd = [sys.executable, __file__, "--step-child", *args, "--repeats", str(repeats),
                   "--warmup", str(max(warmup, 10)), "--threads", str(threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            times[name] = float(out.split()[-1])
        results.append(times)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per candidate (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per candidate first")
    parser.add_argument("--shapes", default="copy,psmnist,lm", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's allocator as it is (the commands keep freed memory, "
                             "awd_nonnormal.utils.retain_freed_memory)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--naive", action="store_true", help="also time elu as a plain autograd loop")
    parser.add_argument("--no-peak", action="store_true", help="skip the GEMM peak (CPU)")
    parser.add_argument("--no-rule", action="store_true", help="skip the check of the backend rule (CPU)")
    parser.add_argument("--no-ptb", action="store_true", help="skip the PTB-stack table")
    parser.add_argument("--activations", action="store_true",
                        help="also time the in-place activations at each shape's step state (CPU)")
    parser.add_argument("--task-step", action="store_true", help="also time a copy-500 training step (CPU)")
    parser.add_argument("--against", default="", metavar="REV",
                        help="with --task-step: also time the step of the code at git revision REV")
    parser.add_argument("--rounds", type=int, default=3, help="with --task-step: rounds of timings")
    parser.add_argument("--quick", action="store_true",
                        help="time only nn.RNN and our layer's automatic path (no per-backend times)")
    # Internal: one timing of --task-step in a child process (see task_step).
    parser.add_argument("--step-child", choices=("this", "old", "stock"), help=argparse.SUPPRESS)
    parser.add_argument("--package-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    # As every command of the project runs (cli.setup_cpu); --system-malloc leaves glibc's default.
    kept = False if args.system_malloc else retain_freed_memory()
    if args.step_child:
        print(_step_child(args.step_child, args.package_dir, args.repeats, args.warmup))
        return
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; valid choices: {', '.join(SHAPES)}")

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{torch.get_num_threads()} threads, {'freed memory kept' if kept else 'system malloc'}"
    if hasattr(os, "getloadavg"):
        where += f", load average {os.getloadavg()[0]:.2f}"
    mem_what = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation records"
    print(f"torch {torch.__version__}, device {device} ({where}), "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print("x relu = time(nn.RNN relu) / time(ours); x same = time(nn.RNN same nonlinearity) / time(ours):")
    print("  > 1 means ours is faster.  mem = peak memory(ours) / peak memory(nn.RNN relu): "
          "< 1 means ours uses less.")
    print(f"  peak memory = most bytes allocated by torch during forward+backward ({mem_what}).")
    cpu_onednn = onednn_available(device, torch.float32)
    peak = None
    if cpu_onednn and not args.no_peak:
        gflops = gemm_peak(max(3, args.repeats // 2))
        peak = max(v for k, v in gflops.items() if k.startswith("onednn"))
        print()
        print("float32 GEMM, GFLOP/s (best of several): " + ", ".join(f"{k} {v:.0f}" for k, v in gflops.items()))
        print(f"oneDNN peak used below: {peak:.0f} GFLOP/s")
    if cpu_onednn and not args.no_rule:
        rows = rule_check(max(3, args.repeats // 2))
        print()
        print(f"products: torch.addmm, oneDNN and NumPy (step products only, up to B*N*N = "
              f"{NUMPY_MAX_WORK}); rule: oneDNN when m*k*n >= {ONEDNN_MIN_WORK}, NumPy's step "
              f"loops when B*N*N <= {NUMPY_MAX_WORK}, torch.addmm otherwise; cpu/wall = NumPy's "
              f"CPU time / wall time (1.00: one thread)")
        print(f"{'product':<28} {'m':>6} {'k':>6} {'n':>5} {'addmm us':>10} {'oneDNN us':>10} "
              f"{'NumPy us':>10} {'cpu/wall':>9} {'fastest':>8} {'rule':>7}")
        agree, lost = 0, []
        for label, m, k, n, times, rule, share in rows:
            fastest = min(times, key=times.get)
            agree += fastest == rule
            if fastest != rule:
                lost.append(times[rule] / times[fastest])
            numpy_us = f"{times['NumPy'] * 1e6:10.1f}" if "NumPy" in times else f"{'-':>10}"
            share_s = f"{share:9.2f}" if share is not None else f"{'-':>9}"
            print(f"{label:<28} {m:6d} {k:6d} {n:5d} {times['addmm'] * 1e6:10.1f} "
                  f"{times['oneDNN'] * 1e6:10.1f} {numpy_us} {share_s} {fastest:>8} {rule:>7}")
        print(f"the rule picked the fastest backend for {agree} of {len(rows)} products"
              + (f"; where not, the pick took up to {max(lost):.2f}x the fastest one's time" if lost else ""))
        rows = orientation_check(max(3, args.repeats // 2))
        print()
        print("weight-gradient products a^T b over the T*B rows: the narrower operand on the left "
              "(the layer's order) against the wider one, us")
        print(f"{'product':<30} {'backend':<10} {'narrow left':>12} {'wide left':>10} {'wide/narrow':>12}")
        for label, backend, t_narrow, t_wide in rows:
            print(f"{label:<30} {backend:<10} {t_narrow * 1e6:12.1f} {t_wide * 1e6:10.1f} {t_wide / t_narrow:12.2f}")
        faster = sum(t_narrow <= t_wide for _, _, t_narrow, t_wide in rows)
        print(f"the layer's order was the faster one for {faster} of {len(rows)} products")
    if args.activations and device.type == "cpu":
        rows = activation_times(max(3, args.repeats // 2))
        print()
        print("in-place activation of one step state, us per call (best of several, the copy "
              "that restores the input subtracted)")
        names_act = list(rows[0][2])
        print(f"{'shape':<10} {'B*N':>7} " + " ".join(f"{n:>12}" for n in names_act)
              + f" {'torch/layer tanh':>17}")
        for name, numel, times in rows:
            print(f"{name:<10} {numel:7d} " + " ".join(f"{times[n] * 1e6:12.2f}" for n in names_act)
                  + f" {times['torch tanh_'] / max(times['layer tanh'], 1e-12):17.2f}")
    for name in names:
        shape = SHAPES[name]
        t, mem = run_shape(shape, device, args.repeats, args.warmup, not args.no_memory, args.naive, args.quick)
        report(shape, t, mem, device)
    if not args.no_ptb:
        res = ptb_stack(device, max(3, args.repeats // 2), 1)
        print()
        print(f"PTB recurrent stack (T={PTB_T} B={PTB_B} layers {PTB_LAYERS}), forward + backward")
        for name, (sec, flops) in res.items():
            line = f"  {name:<9} {sec * 1e3:8.1f} ms  {flops / sec / 1e9:6.0f} GFLOP/s"
            if peak:
                line += f"  {100 * flops / sec / 1e9 / peak:5.1f} % of the oneDNN peak"
            print(line)
        lstm = res["LSTM"]
        for nl in ("tanh", "elu"):
            sec = res[f"RNN-{nl}"][0]
            print(f"  RNN-{nl} per token: {lstm[0] / sec:.2f}x faster than the LSTM")
    if args.task_step and device.type == "cpu":
        rounds = task_step(args.repeats, args.warmup, max(1, args.rounds), args.against,
                           torch.get_num_threads())
        print()
        print("copy task T=500 training step (batch 16, N 100, elu, as the trainer runs it), "
              "median ms per round, each timing in a fresh process; this code keeps freed memory "
              "as its commands do, the others use glibc's default allocator unless their name says "
              "so; stock = nn.RNN(relu) + nn.Linear + cross_entropy + clip_grad_norm_ + RMSprop "
              "on one-hot inputs; x = time(other) / time(this code)")
        for k, t in enumerate(rounds):
            line = f"  round {k + 1}: this code {t['this code'] * 1e3:.1f} ms"
            for name in t:
                if name != "this code":
                    line += f", {name} {t[name] * 1e3:.1f} ms (x {t[name] / t['this code']:.2f})"
            print(line)
        for name in rounds[0]:
            if name != "this code":
                ratios = [t[name] / t["this code"] for t in rounds]
                print(f"  x {name}: {min(ratios):.2f}-{max(ratios):.2f} over {len(rounds)} rounds")


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
        path = layer_path(nl, shape.B, shape.N, device, torch.float32)
        same = f"{t[f'nn.RNN({nl})'] / t[nl]:7.2f}" if nl in ("tanh", "relu") else f"{'-':>7}"
        ratio_mem = f"{mem[nl] / mem['nn.RNN(relu)']:6.2f}" if mem else f"{'-':>6}"
        notes = ", ".join(
            f"{impl} {t[f'{nl}:{impl}'] * 1e3:.1f} ms"
            for impl in ("python", "onednn", "numpy", "fused") if f"{nl}:{impl}" in t
        )
        if nl in ("tanh", "relu") and mem:
            notes += f"; mem vs nn.RNN({nl}) {mem[nl] / mem[f'nn.RNN({nl})']:.2f}"
        if nl == "elu" and "elu:naive" in t:
            notes += f"; naive autograd loop {t['elu:naive'] * 1e3:.1f} ms (x relu {ref / t['elu:naive']:.2f})"
        print(f"{'':<28} {nl:<7} {path:<7} {t[nl] * 1e3:8.1f} {ref / t[nl]:7.2f} {same} {ratio_mem}   {notes}")


if __name__ == "__main__":
    main()
