"""Batched ensembles: many task runs trained as one model with a leading member axis.

A sweep of the synthetic tasks (Figure 3 of Orhan & Pitkow 2020) is thousands of runs of one
small model (one vanilla RNN layer of N = 100 or 25 units, batch 16). Alone, such a run leaves a
GPU mostly idle, and a CPU busy with per-operation overhead where the layer is narrow: its 500
steps are a chain of tiny kernels. :func:`train_ensemble` trains M runs at once: every parameter gets a
leading member axis (``weight_hh`` becomes (M, N, N)), the recurrence is one batched matmul
(``baddbmm``) per step for all members, and the backpropagation through time is written by hand
as in :mod:`awd_nonnormal.rnn`, over the member axis.

The members share only the arithmetic. Each has its own config (initializer and its parameters,
learning rate, seed for the weights, the data and their order, clipping) and gets exactly what
:func:`.train.train` would give it alone, to float rounding:

* its own RMSprop state (vectorised over members, the update of ``torch.optim.RMSprop``);
* its own gradient clipping (a global or per-tensor norm over its own tensors only);
* its own early stop and divergence: a member whose validation loss falls below ``stop_loss``,
  whose loss becomes NaN or infinite, or whose epoch limit is reached is written out and leaves
  the batch (the remaining members run on a smaller, faster batch); nothing it does reaches the
  others, whose arithmetic never mixes members;
* its own run folder with the single-run files (``config.json``, ``metrics.jsonl``,
  ``checkpoint.pt``, ``result.json``) written by the single-run trainer's writers, so tables,
  figures and ``analyze.py`` read them unchanged, and :func:`.train.train` (or another ensemble)
  resumes them exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..checkpoint import save_checkpoint
from ..rnn import derivative_from_output, row_contraction, step_activations, step_loop
from ..runs import (CHECKPOINT_FILE, METRICS_FILE, Diverged, GracefulInterrupt, MetricsLog,
                    NonFiniteGuard, remove_stale_temporaries)
from ..utils import resolve_device
from . import rules
from . import train as T
from .data import generator as _generator

logger = logging.getLogger(__name__)

__all__ = ["EnsembleModel", "ensemble_rnn", "train_ensemble", "PER_MEMBER_FIELDS",
           "ensemble_key", "auto_members", "check_members_count", "member_bytes", "Member",
           "Ensemble", "data_key"]

#: Config fields in which the members of one ensemble may differ. All other fields (task, length,
#: width, data sizes, batch size) must agree: they fix the shapes the members share.
PER_MEMBER_FIELDS = frozenset({
    "init", "lr", "seed", "epochs", "rho", "opt_eps", "clip", "clip_mode", "stop_loss",
    "perm_seed", "loss",
})


def ensemble_key(config: T.TaskConfig) -> Tuple[Tuple[str, Any], ...]:
    """The shared settings of ``config``: runs with equal keys can train in one ensemble."""
    return tuple(sorted((k, repr(v)) for k, v in config.to_dict().items()
                        if k not in PER_MEMBER_FIELDS))


def check_members_count(value: Union[int, str]) -> int:
    """``--ensemble`` as a member count (1: no ensemble); a clear :class:`.train.TaskError` else."""
    try:
        members = int(value)
    except (TypeError, ValueError):
        raise T.TaskError(f"--ensemble must be a positive integer or 'auto', got {value!r}") from None
    if isinstance(value, bool) or members < 1:
        raise T.TaskError(f"--ensemble must be a positive integer or 'auto', got {value!r}")
    return members


def member_bytes(config: T.TaskConfig) -> int:
    """Memory one member needs while training, estimated from the shapes: the states, their
    derivatives and incoming gradients (3 x (T, B, N)), the input, and the read-out with its
    log-softmax and gradients (4 x (T, B, C) every step, or (B, C) for the last), in float32."""
    task = T.get_task(config.task)
    steps, batch = task.seq_len(config), config.batch_size
    readout_rows = steps * batch if task.readout == "all" else batch
    floats = steps * batch * (3 * config.hidden + task.input_size) + 4 * readout_rows * task.output_size
    return 4 * floats


#: Fraction of the free device memory that ``auto`` plans to fill (the rest: fragmentation,
#: evaluation batches, the data sets).
_AUTO_MEMORY_FRACTION = 0.5


#: On CPU, ``auto`` uses ensembles for layers up to this width, of :data:`_CPU_MEMBERS` members.
#: Measured per run against the single-run trainer, one thread each (bench/ensemble_speed.py):
#: N = 25 (psMNIST) 2.4-2.7x, N = 50 1.5x, N = 100 (copy) 0.9-1.1x: a 100-unit step is already
#: a matmul the CPU runs near its peak alone, so batching only adds memory traffic.
_CPU_MAX_HIDDEN = 50
_CPU_MEMBERS = 16


def auto_members(device: str, config: T.TaskConfig, pending: int, workers: int = 1) -> int:
    """The ensemble size of ``--ensemble auto`` for runs like ``config`` on ``device``.

    On CUDA: as many members as fill half of the free memory (shared among ``workers``
    processes), at most ``pending``. On CPU: 16 members for narrow layers (N <= 50, where an
    ensemble measured 1.5-2.7x faster per run than one run per process) and 1 (the worker pool
    alone) for wider ones, where it measured no faster (see the performance notes of the docs).
    """
    dev = resolve_device(device)
    if dev.type != "cuda":
        members = _CPU_MEMBERS if config.hidden <= _CPU_MAX_HIDDEN else 1
        members = max(1, min(members, pending))
        logger.info("--ensemble auto on %s: %s", dev,
                    f"ensembles of {members} (N = {config.hidden})" if members > 1 else
                    f"worker processes, no ensemble (N = {config.hidden}: not faster per run on CPU)")
        return members
    free, _ = torch.cuda.mem_get_info(dev)
    members = int(_AUTO_MEMORY_FRACTION * free / max(workers, 1) // member_bytes(config))
    members = max(1, min(members, pending))
    logger.info("--ensemble auto on %s: %d members per ensemble (%.1f GiB free)", dev, members,
                free / 2 ** 30)
    return members


# --------------------------------------------------------------------------------------------
# The batched recurrent layer
# --------------------------------------------------------------------------------------------

class _EnsembleRNNFunction(torch.autograd.Function):
    """M vanilla RNN layers over one sequence each, h_0 = 0, with backpropagation through time
    by hand (as ``awd_nonnormal.rnn._RNNLayerFunction``, with a leading member axis)::

        h_t[m] = f(x_t[m] W_ih[m]^T + b[m] + h_{t-1}[m] W_hh[m]^T)      (rows are batch items)

    The buffers are member-major, (M, T, B, N): each member's whole sequence is one contiguous
    (T*B, N) block, so the input projection, the read-out and the weight gradients are single
    batched matmuls over the members without any copy; the per-step work uses the strided
    (M, B, N) slice of step t (measured on CPU: the step-major layout makes the steps about 20 %
    faster but needs a full copy of the states for each of those matmuls, which costs more).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_ih: Tensor, w_hh: Tensor, b: Optional[Tensor],
                nonlinearity: str) -> Tensor:
        # x: (M, T, B, d); w_ih: (M, N, d); w_hh: (M, N, N); b: (M, N)
        with torch.autocast(x.device.type, enabled=False):
            M, T_, B, d = x.shape
            N = w_hh.shape[1]
            x2 = x.reshape(M, T_ * B, d)  # (M, T*B, d)
            if b is not None:  # u_t = x_t W_ih^T + b, all steps in one matmul per member
                h = torch.baddbmm(b.unsqueeze(1), x2, w_ih.transpose(1, 2))  # (M, T*B, N)
            else:
                h = torch.bmm(x2, w_ih.transpose(1, 2))
            h = h.view(M, T_, B, N)
            w_hh_t = w_hh.transpose(1, 2).contiguous()  # (M, N, N)
            # Each step is computed in a contiguous (M, B, N) block and then stored: an in-place
            # baddbmm_ on the strided slice falls back to one matmul per member (measured slower).
            steps = h.unbind(1)  # each (M, B, N), a strided view into the buffer
            pair = h.new_empty(2, M, B, N)
            blocks = pair.unbind(0)
            activate_, block_views = step_activations(pair, nonlinearity, blocks)
            prev = None
            with step_loop():  # only in-place and out= calls on buffers made above
                for t, h_t in enumerate(steps):
                    z = blocks[t % 2]
                    if t == 0:
                        z.copy_(h_t)  # z_0 = u_0 (h_0 = 0)
                    else:
                        torch.baddbmm(h_t, prev, w_hh_t, out=z)  # z_t = u_t + h_{t-1} W_hh^T
                    if activate_ is not None:
                        activate_(block_views[t % 2])  # h_t = f(z_t), in place
                    h_t.copy_(z)
                    prev = z
        ctx.save_for_backward(x, w_hh, h)
        ctx.nonlinearity = nonlinearity
        ctx.has_bias = b is not None
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor):  # (M, T, B, N)
        x, w_hh, h = ctx.saved_tensors
        with torch.autocast(grad_h.device.type, enabled=False):
            M, T_, B, N = h.shape
            d = x.shape[3]
            # delta_t = dL/dz_t, backwards through time (Werbos 1990), per member:
            #   g_t = grad_h[t] + delta_{t+1} W_hh,   delta_t = g_t * f'(z_t)
            delta = derivative_from_output(h, ctx.nonlinearity)  # (M, T, B, N) f'(z) from h
            linear = delta is None
            if linear:
                delta = torch.empty_like(h)
            # As forward: each step in a contiguous block (the next step's input), then stored.
            deltas = delta.unbind(1)
            grads = grad_h.unbind(1)
            blocks = (h.new_empty(M, B, N), h.new_empty(M, B, N))
            nxt = None
            with step_loop():
                for t in range(T_ - 1, -1, -1):
                    g = blocks[t % 2]
                    if t == T_ - 1:
                        g.copy_(grads[t])
                    else:
                        torch.baddbmm(grads[t], nxt, w_hh, out=g)  # g_t = grad_h[t] + delta_{t+1} W_hh
                    if not linear:
                        g.mul_(deltas[t])  # delta_t = g_t * f'(z_t)
                    deltas[t].copy_(g)
                    nxt = g
            need_x, need_wih, need_whh, need_b, _ = ctx.needs_input_grad
            grad_x = grad_wih = grad_whh = grad_b = None
            if need_x:
                raise RuntimeError("the ensemble RNN does not differentiate its input")
            delta2 = delta.view(M, T_ * B, N)
            if need_wih:  # sum_t delta_t^T x_t, per member: (M, N, d)
                grad_wih = row_contraction(delta2, x.reshape(M, T_ * B, d))
            if need_whh:  # sum_{t>0} delta_t^T h_{t-1}, per member: (M, N, N)
                grad_whh = row_contraction(delta[:, 1:].reshape(M, -1, N), h[:, :-1].reshape(M, -1, N))
            if ctx.has_bias and need_b:
                grad_b = delta2.sum(dim=1)  # (M, N)
        return grad_x, grad_wih, grad_whh, grad_b, None


def ensemble_rnn(x: Tensor, w_ih: Tensor, w_hh: Tensor, b: Optional[Tensor],
                 nonlinearity: str) -> Tensor:
    """M vanilla RNN layers from a zero state: x (M, T, B, d), w_ih (M, N, d), w_hh (M, N, N),
    b (M, N) or None -> states (M, T, B, N). Differentiable in the weights and the bias."""
    return _EnsembleRNNFunction.apply(x, w_ih, w_hh, b, nonlinearity)


# --------------------------------------------------------------------------------------------
# The ensemble model: stacked parameters of M task models
# --------------------------------------------------------------------------------------------

_W_IH, _W_HH, _DEC_W, _DEC_B = "rnn.weight_ih_l0", "rnn.weight_hh_l0", "decoder.weight", "decoder.bias"


class EnsembleModel:
    """The parameters of M :class:`.train.TaskModel` s stacked on a leading member axis.

    ``names`` are the single model's state_dict keys; ``trainable`` those it trains (its
    ``requires_grad`` parameters), so the ensemble trains exactly what a single run trains.
    Every recurrent bias (``rnn.bias*``) enters the layer as their sum, as in the single layer.
    """

    def __init__(self, models: Sequence[torch.nn.Module], nonlinearity: str, readout: str,
                 device: torch.device) -> None:
        first = models[0]
        self.nonlinearity = nonlinearity
        self.readout = readout
        self.names = list(first.state_dict().keys())
        grads = {n: p.requires_grad for n, p in first.named_parameters()}
        self.trainable = [n for n in self.names if grads.get(n, False)]
        self.biases = [n for n in self.names if n.startswith("rnn.bias")]
        self.params: Dict[str, Tensor] = {}
        states = [m.state_dict() for m in models]
        for n in self.names:
            stacked = torch.stack([s[n].detach() for s in states]).to(device)
            self.params[n] = stacked.requires_grad_(n in self.trainable)

    @property
    def size(self) -> int:
        return self.params[_W_HH].shape[0]

    def member_state(self, i: int) -> Dict[str, Tensor]:
        """Member ``i``'s state_dict (own CPU copies, not views of the stacked storage)."""
        return {n: p[i].detach().cpu().clone() for n, p in self.params.items()}

    def keep(self, index: Tensor) -> None:
        """Keep only the members at ``index`` (a 1-D long tensor), in that order."""
        for n, p in self.params.items():
            self.params[n] = p.detach()[index].clone().requires_grad_(n in self.trainable)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def __call__(self, x: Tensor) -> Tensor:
        """x (M, T, B, d) -> read-out (M, T, B, C) of every step, or (M, B, C) of the last."""
        p = self.params
        b = None
        for n in self.biases:
            b = p[n] if b is None else b + p[n]  # (M, N)
        h = ensemble_rnn(x, p[_W_IH], p[_W_HH], b, self.nonlinearity)  # (M, T, B, N)
        w_t = p[_DEC_W].transpose(1, 2)  # (M, N, C)
        bias = p[_DEC_B].unsqueeze(1)  # (M, 1, C)
        if self.readout == "last":
            return torch.baddbmm(bias, h[:, -1], w_t)  # (M, B, C)
        M, T_, B, N = h.shape
        return torch.baddbmm(bias, h.view(M, T_ * B, N), w_t).view(M, T_, B, -1)  # (M, T, B, C)


def _trained(model: torch.nn.Module) -> Tuple[List[str], List[Tensor]]:
    """Names and tensors of the parameters a single run hands its optimizer (the trainable ones,
    in order: their positions are the keys of the optimizer's state)."""
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in pairs], [p for _, p in pairs]


def _member_view(t: Tensor, like: Tensor) -> Tensor:
    """A per-member vector (M,) shaped to broadcast against ``like`` (M, ...)."""
    return t.view(-1, *([1] * (like.dim() - 1)))


# --------------------------------------------------------------------------------------------
# Members: one run each
# --------------------------------------------------------------------------------------------

@dataclass
class Member:
    """One run's bookkeeping: what :func:`.train.train` keeps in its locals and checkpoints."""
    config: T.TaskConfig
    run_dir: Path
    derived: Dict[str, Any]
    extra_state: Dict[str, Any]
    initial_rnn: Dict[str, Tensor]
    epoch: int = 0
    position: int = 0
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_count: int = 0
    guard: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard(max_skipped=1))
    epoch_time: float = 0.0
    elapsed: float = 0.0
    steps: int = 0
    square_avg: Optional[Dict[str, Tensor]] = None
    status: str = "completed"
    message: str = ""
    resumed_from: Optional[Tuple[int, int]] = None
    metrics_log: Optional[MetricsLog] = None

    @property
    def where(self) -> Tuple[int, int]:
        return self.epoch, self.position


BatchHook = Callable[[int, int, Dict[str, float]], None]


def data_key(config: T.TaskConfig) -> Tuple[Any, ...]:
    return (config.seed, config.resolved_perm_seed())


class Ensemble:
    """M members that stand at the same (epoch, batch), trained in lockstep."""

    def __init__(self, members: List[Member], models: List[torch.nn.Module],
                 options: T.RunOptions, device: torch.device, datasets: Dict[Any, Tuple[Any, Any]]):
        first = members[0].config
        self.task = T.get_task(first.task)
        self.members = members
        self.options = options
        self.device = device
        self.datasets = datasets
        self.model = EnsembleModel(models, first.nonlinearity, self.task.readout, device)
        self.batch_size = first.batch_size
        self.n_train = first.n_train
        self.n_batches = math.ceil(self.n_train / self.batch_size)
        self.arch = T.arch_of(first)
        self.square_avg = {}
        for n in self.model.trainable:
            rows = [(m.square_avg[n] if m.square_avg is not None and n in m.square_avg
                     else torch.zeros_like(self.model.params[n][0].detach().cpu())) for m in members]
            self.square_avg[n] = torch.stack(rows).to(device)
        for m in members:
            m.square_avg = None
        self._vectors()
        # False while a batch or an epoch's end is half done: a second Ctrl-C then saves nothing
        self.at_boundary = True

    def _vectors(self) -> None:
        cfg = [m.config for m in self.members]
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=self.device)  # noqa: E731
        self.lr = as_tensor([c.lr for c in cfg])
        self.rho = as_tensor([c.rho for c in cfg])
        self.eps = as_tensor([c.opt_eps for c in cfg])

    # ---- data ---------------------------------------------------------------------------

    def _batch(self, split: int, index_of: Callable[[Member], Tensor]) -> Tuple[Tensor, List[Tensor]]:
        """Inputs (M, T, B, d) of every member (built once per distinct data set and index) and
        the members' targets."""
        cache: Dict[Any, Tuple[Tensor, Tensor]] = {}
        xs, ys = [], []
        for m in self.members:
            index = index_of(m)
            key = (data_key(m.config), index.data_ptr(), index.shape[0])
            if key not in cache:
                dataset = self.datasets[data_key(m.config)][split]
                cache[key] = dataset.batch(index.to(self.device), self.device)
            x, y = cache[key]
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), ys

    def _losses(self, out: Tensor, ys: List[Tensor]) -> Tensor:
        """Each member's mean loss (M,), by the single-run trainer's own loss function."""
        outs = out.unbind(0)
        return torch.stack([self.task.loss(o, y, m.config.loss)
                            for o, y, m in zip(outs, ys, self.members)])

    # ---- one optimizer step of every member ---------------------------------------------

    def step(self, orders: Dict[Any, Tensor]) -> Tuple[List[float], List[float]]:
        """Forward and backward pass of every member on its next batch, and clipping; returns
        the members' losses and gradient norms. :meth:`update` then applies the step."""
        bs = self.batch_size
        x, ys = self._batch(0, lambda m: orders[(data_key(m.config), m.epoch)]
                            [m.position * bs:(m.position + 1) * bs])
        model = self.model
        model.zero_grad()
        losses = self._losses(model(x), ys)  # (M,)
        # A member whose loss is not finite is not backpropagated (its gradient stays its own
        # business: no arithmetic mixes members, but a zero keeps it tidy) and gets no update.
        finite = torch.isfinite(losses.detach())
        torch.where(finite, losses, torch.zeros_like(losses)).sum().backward()
        norms = self._clip()
        return losses.detach().cpu().tolist(), norms.cpu().tolist()

    def _clip(self) -> Tensor:
        """Clip each member's gradients by the single run's rule (:func:`.rules.clip_gradients_`
        with a member axis: Keras' ``g * c / max(n, c)`` with the member's own norm or norms, all
        zero where it overflowed). Members that share clip mode and clip value are clipped in one
        call (the whole batch in a sweep). Returns each member's norm (M,)."""
        grads = [self.model.params[n].grad for n in self.model.trainable]
        norm = torch.empty(len(self.members), device=self.device)
        groups: Dict[Tuple[str, float], List[int]] = {}
        for i, m in enumerate(self.members):
            groups.setdefault((m.config.clip_mode, m.config.clip), []).append(i)
        for (mode, clip), index in groups.items():
            if len(index) == len(self.members):
                norm = rules.clip_gradients_(grads, clip, mode, members=True).norm
                break
            at = torch.tensor(index, device=self.device)
            part = [g.index_select(0, at) for g in grads]
            norm[at] = rules.clip_gradients_(part, clip, mode, members=True).norm.to(norm.dtype)
            for g, q in zip(grads, part):
                g.index_copy_(0, at, q)
        return norm

    def update(self, skip: Sequence[int] = ()) -> None:
        """``torch.optim.RMSprop`` (no momentum, not centred) with per-member lr, rho and eps:
        s <- rho s + (1 - rho) g^2;  p <- p - lr g / (sqrt(s) + eps)  (Hinton's lecture 6e;
        eps outside the root, as torch and Keras 2.2 place it). Members at ``skip`` (positions
        in the batch) keep their parameters and optimizer state, as a single run that stops
        before ``optimizer.step()``."""
        skip = set(skip)
        moving = None
        if skip:
            moving = torch.tensor([i not in skip for i in range(len(self.members))],
                                  device=self.device)
        with torch.no_grad():
            for n in self.model.trainable:
                p = self.model.params[n]
                g, s = p.grad, self.square_avg[n]
                if moving is not None:
                    keep = _member_view(moving, g)
                    g = torch.where(keep, g, torch.zeros_like(g))
                    s_old = s.clone()
                rho = _member_view(self.rho, s)
                s.mul_(rho).addcmul_(g, g * (1 - rho))
                avg = s.sqrt().add_(_member_view(self.eps, s))
                p.addcdiv_(g * _member_view(-self.lr, g), avg)
                if moving is not None:
                    s.copy_(torch.where(keep, s, s_old))
        for i, m in enumerate(self.members):
            if i not in skip:
                m.steps += 1

    # ---- evaluation ---------------------------------------------------------------------

    def evaluate(self) -> List[Dict[str, float]]:
        """Each member's mean validation loss (and accuracy at the last step), as
        :func:`.train.evaluate`; batches of ``eval_batch_size`` rows over all members (at least
        16 per member)."""
        M = len(self.members)
        n = len(self.datasets[data_key(self.members[0].config)][1])
        per_member = max(1, max(self.options.eval_batch_size, 16 * M) // M)
        total = [0.0] * M
        correct = [0] * M
        classify_last = self.task.classification and self.task.readout == "last"
        with torch.no_grad():
            for start in range(0, n, per_member):
                index = torch.arange(start, min(start + per_member, n))
                x, ys = self._batch(1, lambda m: index)
                out = self.model(x)
                losses = self._losses(out, ys).cpu().tolist()
                for i, loss in enumerate(losses):
                    total[i] += loss * len(index)
                if classify_last:
                    hits = [int((o.argmax(-1) == y).sum()) for o, y in zip(out.unbind(0), ys)]
                    for i, h in enumerate(hits):
                        correct[i] += h
        rows = []
        for i in range(M):
            row = {"loss": total[i] / n}
            if classify_last:
                row["acc"] = correct[i] / n
            rows.append(row)
        return rows

    # ---- leaving the batch ----------------------------------------------------------------

    def drop(self, leaving: List[int]) -> None:
        """Remove the members at positions ``leaving`` from the batch."""
        keep = [i for i in range(len(self.members)) if i not in set(leaving)]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.model.keep(index)
        for n in self.square_avg:
            self.square_avg[n] = self.square_avg[n][index].clone()
        self.members = [self.members[i] for i in keep]
        self._vectors()

    # ---- files ------------------------------------------------------------------------------

    def _optimizer_state(self, i: int) -> Dict[str, Any]:
        """Member ``i``'s optimizer state in ``torch.optim.RMSprop.state_dict()`` form."""
        m = self.members[i]
        c = m.config
        template = T.build_model(c)
        names, params = _trained(template)
        opt = torch.optim.RMSprop(params, lr=c.lr, alpha=c.rho, eps=c.opt_eps)
        sd = opt.state_dict()
        if m.steps > 0:
            sd["state"] = {k: {"step": torch.tensor(float(m.steps)),
                               "square_avg": self.square_avg[n][i].detach().cpu().clone()}
                           for k, n in enumerate(names) if n in self.square_avg}
        return sd

    def save(self, i: int, result: Optional[Dict[str, Any]] = None) -> None:
        """Member ``i``'s checkpoint, in exactly the single-run trainer's format."""
        m = self.members[i]
        save_checkpoint(m.run_dir / CHECKPOINT_FILE, kind="task", arch=self.arch,
                        config=m.config.to_dict(), model=self.model.member_state(i),
                        **T.checkpoint_payload(m, self._optimizer_state(i), result))

    def finish(self, i: int) -> Dict[str, Any]:
        """Write member ``i``'s result, as :func:`.train.train` does at the end of a run."""
        m = self.members[i]
        result = T.run_result(self.task, m, m.derived["baseline"])
        T.write_result(m.run_dir, result, lambda r: self.save(i, r))
        return result


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def _prepare(config: T.TaskConfig, run_dir: Path, options: T.RunOptions, device: torch.device,
             datasets: Dict[Any, Tuple[Any, Any, Any]]) -> Tuple[Optional[Member], Optional[torch.nn.Module],
                                                               Optional[T.RunOutcome]]:
    """A member ready to train (with its model), or the outcome of a run that had finished; as
    :meth:`.train.Trainer.start` does for one run."""
    task = T.get_task(config.task)
    config = T.check_run_dir(run_dir, config)
    done = T.read_result(run_dir)
    if done is not None:
        logger.info("%s: finished before (%s); not redone", run_dir, done.get("status"))
        return None, None, T.RunOutcome(run_dir, done, skipped=True, metrics=T.read_metrics(run_dir))
    config.init.load_plugins()
    key = data_key(config)
    if key not in datasets:  # members with one seed (and permutation) share their data sets
        train_set, val_set, facts = task.datasets(config, options)
        datasets[key] = (T.to_device(train_set, device), T.to_device(val_set, device), facts)
    derived, extra_state = T.run_facts(task, config, datasets[key][2])
    model = T.build_model(config)
    member = Member(config, run_dir, derived, extra_state, {},
                    metrics_log=MetricsLog(run_dir / METRICS_FILE),
                    # a full epoch of skipped steps in a row, as the single run
                    guard=NonFiniteGuard(max_skipped=math.ceil(config.n_train / config.batch_size)))
    ckpt_path = run_dir / CHECKPOINT_FILE
    if ckpt_path.exists():
        ckpt = T.load_run_checkpoint(ckpt_path, config)
        model.load_state_dict(ckpt["model"])
        names, _ = _trained(model)
        opt_state = ckpt["optimizer"]["state"]
        member.square_avg = {names[k]: v["square_avg"] for k, v in opt_state.items()}
        member.steps = int(next(iter(opt_state.values()))["step"]) if opt_state else 0
        T.restore_progress(member, ckpt)
    else:
        member.initial_rnn = T.begin_run(run_dir, config, derived, model)
    T.open_metrics(member)
    return member, model, None


def _check_members(configs: Sequence[T.TaskConfig], run_dirs: Sequence[Path]) -> None:
    if not configs:
        raise T.TaskError("an ensemble needs at least one run")
    if len(configs) != len(run_dirs):
        raise T.TaskError(f"{len(configs)} configs but {len(run_dirs)} run folders")
    if len({str(Path(d).resolve()) for d in run_dirs}) != len(run_dirs):
        raise T.TaskError("two ensemble members share a run folder")
    key = ensemble_key(configs[0])
    for c in configs[1:]:
        if ensemble_key(c) != key:
            diff = "; ".join(f"{k}: {a} vs {b}" for (k, a), (_, b) in zip(key, ensemble_key(c)) if a != b)
            raise T.TaskError(f"ensemble members must share their task settings ({diff})")


def train_ensemble(configs: Sequence[T.TaskConfig], run_dirs: Sequence[Union[str, Path]],
                   options: T.RunOptions = T.RunOptions(), *,
                   on_batch: Optional[BatchHook] = None, isolate: bool = False) -> List[T.RunOutcome]:
    """Train the runs ``configs`` (in ``run_dirs``) as one batched ensemble; one
    :class:`.train.RunOutcome` per run, in order.

    Each run behaves as under :func:`.train.train`: a finished run is not redone (``skipped``),
    one with a checkpoint continues exactly from it (members that stopped at different points
    train as separate ensembles), a folder of another config is a :class:`.train.RunConflict`.
    The configs must agree in everything but :data:`PER_MEMBER_FIELDS`. Ctrl-C stops after the
    current batch, saves every unfinished member's checkpoint and re-raises
    :class:`KeyboardInterrupt`. ``on_batch(epoch, batch, losses)`` is called after every
    optimizer step with the 0-based epoch and batch and ``{run_dir: loss}`` of the members in
    the batch (for tests and tools).

    With ``isolate`` (the sweeps), a member that cannot start (its folder locked by another
    process, holding another config or a damaged file, its data changed) gets an outcome with
    ``error`` set and no result, and the others train: one broken run must not keep its ensemble
    mates from training, as it would on every rerun (the groups form the same way each time).
    Without it, the first such problem is raised.
    """
    run_dirs = [Path(d) for d in run_dirs]
    failed: Optional[Dict[int, str]] = {} if isolate else None
    configs = [_isolated(failed, i, run_dirs[i], T.identify_data, c, options) or c
               for i, c in enumerate(configs)]
    _check_members(configs, run_dirs)
    with contextlib.ExitStack() as locks:
        for i, run_dir in enumerate(run_dirs):  # as train() does: one writer per run, no leftovers
            if failed is None or i not in failed:
                _isolated(failed, i, run_dir, _claim, locks, run_dir)
        return _train_ensemble(configs, run_dirs, options, on_batch, failed)


def _claim(locks: contextlib.ExitStack, run_dir: Path) -> bool:
    locks.enter_context(T.run_lock(run_dir))
    remove_stale_temporaries(run_dir)
    return True


def _isolated(failed: Optional[Dict[int, str]], i: int, run_dir: Path, fn: Callable, *args: Any) -> Any:
    """``fn(*args)``; with ``failed`` (isolating members) an exception is recorded as member
    ``i``'s error (and logged) and None returned, else it propagates."""
    if failed is None:
        return fn(*args)
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the member's own problem, reported as its outcome
        failed[i] = f"{type(exc).__name__}: {exc}"
        logger.error("%s: cannot train it with its ensemble: %s", run_dir, failed[i])
        return None


def _train_ensemble(configs: Sequence[T.TaskConfig], run_dirs: List[Path], options: T.RunOptions,
                    on_batch: Optional[BatchHook], failed: Optional[Dict[int, str]] = None) -> List[T.RunOutcome]:
    device = resolve_device(options.device)
    datasets: Dict[Any, Tuple[Any, Any, Any]] = {}
    outcomes: Dict[int, T.RunOutcome] = {}
    groups: Dict[Tuple[int, int], List[Tuple[int, Member, torch.nn.Module]]] = {}
    for i, (config, run_dir) in enumerate(zip(configs, run_dirs)):
        if failed is None:
            prepared = _prepare(config, run_dir, options, device, datasets)
        elif i in failed:  # it could not be claimed
            prepared = None
        else:
            prepared = _isolated(failed, i, run_dir, _prepare, config, run_dir, options, device, datasets)
        if prepared is None:
            outcomes[i] = T.RunOutcome(run_dir, None, error=failed[i])
            continue
        member, model, outcome = prepared
        if outcome is not None:
            outcomes[i] = outcome
        else:
            groups.setdefault(member.where, []).append((i, member, model))
    for where in sorted(groups):
        group = groups[where]
        index = {id(m): i for i, m, _ in group}
        ensemble = Ensemble([m for _, m, _ in group], [mod for _, _, mod in group], options,
                             device, datasets)
        for k, m in enumerate(ensemble.members):  # new runs: the initial state, as train() saves
            if not (m.run_dir / CHECKPOINT_FILE).exists():
                ensemble.save(k)
        results = _run(ensemble, on_batch)
        for m, result in results:
            outcomes[index[id(m)]] = T.RunOutcome(m.run_dir, result, resumed_from=m.resumed_from,
                                                  metrics=m.metrics)
    return [outcomes[i] for i in range(len(configs))]


def _run(ens: Ensemble, on_batch: Optional[BatchHook]) -> List[Tuple[Member, Dict[str, Any]]]:
    """Train the members of ``ens`` to their ends (as :meth:`.train.Trainer.fit` does one run);
    returns (member, result) as each finished."""
    finished: List[Tuple[Member, Dict[str, Any]]] = []
    n_batches = ens.n_batches

    def leave(indices: List[int]) -> None:
        for i in indices:
            finished.append((ens.members[i], ens.finish(i)))
        if indices:
            ens.drop(indices)

    def account(dt: float) -> None:  # wall time (batch, evaluation) shared out among the members
        share = dt / max(len(ens.members), 1)
        for m in ens.members:
            m.epoch_time += share
            m.elapsed += share

    leave([i for i, m in enumerate(ens.members)
           if m.status != "completed" or m.epoch >= m.config.epochs])
    interrupt = GracefulInterrupt("interrupt: saving the ensemble's checkpoints after this batch "
                                  "(Ctrl-C again to abort)")
    with interrupt:
        try:
            while ens.members:
                if ens.members[0].position < n_batches:  # (a run saved at an epoch's end: evaluate)
                    _train_batch(ens, on_batch, account, leave)
                if ens.members and ens.members[0].position >= n_batches:
                    ens.at_boundary = False
                    t0 = time.perf_counter()
                    vals = ens.evaluate()
                    account(time.perf_counter() - t0)
                    leave([i for i, (m, val) in enumerate(zip(ens.members, vals))
                           if not _end_epoch(ens, i, m, val)])
                    ens.at_boundary = True
                if interrupt.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if ens.at_boundary:
                for i in range(len(ens.members)):
                    ens.save(i)
                logger.warning("ensemble interrupted; %d unfinished run(s) saved their checkpoints",
                               len(ens.members))
            else:  # a second Ctrl-C inside an update: the checkpoints keep their last states
                logger.warning("ensemble aborted in the middle of a batch; each checkpoint keeps "
                               "its run's last saved state")
            raise
    return finished


def _end_epoch(ens: Ensemble, i: int, m: Member, val: Dict[str, float]) -> bool:
    """Record member ``i``'s epoch as :meth:`.train.Trainer.end_epoch`; whether it goes on."""
    if T.close_epoch(m, val, m.derived["baseline"]):
        ens.save(i)
        return True
    return False


def _train_batch(ens: Ensemble, on_batch: Optional[BatchHook], account: Callable[[float], None],
                 leave: Callable[[List[int]], None]) -> None:
    """One optimizer step of every member, with the single-run trainer's non-finite policy
    (:class:`~awd_nonnormal.runs.NonFiniteGuard`): a non-finite loss ends the member, an
    overflowing gradient norm skips its step. Members that diverge are written out and leave
    before ``on_batch`` is called."""
    t0 = time.perf_counter()
    epoch, position = ens.members[0].where
    orders = {}
    for m in ens.members:
        key = (data_key(m.config), m.epoch)
        if key not in orders:
            gen = _generator(m.config.seed, f"shuffle/{m.epoch}")
            orders[key] = torch.randperm(ens.n_train, generator=gen)
    losses, norms = ens.step(orders)
    ens.at_boundary = False
    skip, diverged = [], []
    for i, (m, value, norm) in enumerate(zip(ens.members, losses, norms)):
        where = f"epoch {m.epoch + 1}, batch {m.position + 1}"
        try:
            m.guard.check_loss(value, "training loss", where)
            if not m.guard.allow_step(norm, where):
                skip.append(i)
        except Diverged as exc:
            T.diverge(m, f"{exc}; the run stopped")
            diverged.append(i)
    ens.update(skip + diverged)  # the weights move before the positions do
    for i, (m, value) in enumerate(zip(ens.members, losses)):
        if i not in diverged:
            m.loss_sum += value * _batch_len(ens, m.position)
            m.loss_count += _batch_len(ens, m.position)
            m.position += 1
    reported = {str(m.run_dir): v for m, v in zip(ens.members, losses)}
    account(time.perf_counter() - t0)
    leave(diverged)
    ens.at_boundary = True
    if on_batch is not None:
        on_batch(epoch, position, reported)


def _batch_len(ens: Ensemble, position: int) -> int:
    return min(ens.batch_size, ens.n_train - position * ens.batch_size)
