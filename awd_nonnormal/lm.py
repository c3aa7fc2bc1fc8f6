"""Training and evaluating the language model: AWD-LSTM's training procedure (Merity, Keskar &
Socher 2018, "Regularizing and Optimizing LSTM Language Models"; github salesforce/awd-lstm-lm
``main.py``) as a library, with resumable runs.

What one epoch does:

* variable-length truncated BPTT: the window is ``bptt`` with probability 0.95 and ``bptt / 2``
  otherwise, then ``seq_len ~ N(window, 5)``, at least 5 (AWD-LSTM section 4.1). The draws come
  from a dedicated ``torch.Generator`` seeded with ``--seed``, whose state is checkpointed. The
  learning rate of the batch is scaled by ``seq_len / bptt``, so that every token has the same
  weight;
* loss = cross-entropy (nats) + AR ``alpha * mean(dropped last-layer output ** 2)`` + TAR
  ``beta * mean((h_t - h_{t-1}) ** 2)`` on the undropped last-layer output (AWD-LSTM section 4.6);
  gradient-norm clipping ``--clip``; weight decay ``--wdecay``; the hidden state is carried from
  batch to batch and detached in between; an optional linear learning-rate warm-up over the first
  ``warmup`` optimizer steps of the run; a warning when a batch's loss passes ``2 ln V``;
* validation at the end of every epoch. SGD switches to averaged SGD
  (``ASGD(t0=0, lambd=0)``) when the validation loss is worse than the best of all but the last
  ``nonmono`` epochs (the non-monotone trigger, AWD-LSTM section 3); under ASGD the validation and
  the best-model checkpoint use the averaged weights (``optimizer.state[p]["ax"]``).
  ``--when`` epochs divide the learning rate by 10.

Files of a run with ``--save DIR/NAME.pt`` (see :class:`RunPaths`):

* ``DIR/NAME.pt``: the best model by validation loss (averaged weights under ASGD), used for the
  final test and for analysis; its ``test`` entry holds the test result once the run is done;
* ``DIR/NAME.latest.pt``: the complete state after the last finished epoch (or at the batch where
  Ctrl-C stopped the run), used by ``--resume``;
* ``DIR/NAME.metrics.jsonl``: one JSON object per epoch;
* ``DIR/NAME.e{k}.pt``: the model before the learning rate is divided at a ``--when`` epoch k.

Under ``torchrun`` (:mod:`awd_nonnormal.distributed`) each rank trains its own contiguous slice
of the batch columns with DistributedDataParallel; losses, verdicts and evaluation sums are
added up across ranks, so the run is the one-process run (dropout masks aside), and only rank 0
writes files.

Differences from the reference code, on purpose: the criterion's parameters stay in the optimizer
when it switches to ASGD; ASGD starts from the current learning rate (the reference restarted from
``--lr``, undoing ``--when`` divisions made before the switch); evaluation losses are averages over
exactly the predicted tokens (the reference divided by one more row); the learning-rate scaling
uses the batch's actual length (shorter at the end of the data) and reaches ASGD's step at hand
(the reference's ASGD took the previous batch's scaling, see :func:`set_step_lr`); the training loss in the metrics is
averaged over tokens rather than batches; non-finite values follow the one policy of
:mod:`awd_nonnormal.runs` (a non-finite gradient norm skips the step; ``max_skipped_steps`` of
those in a row or a non-finite loss end the run as diverged) instead of training on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import distributed
from .checkpoint import (CheckpointError, load_checkpoint, load_initial, rng_state, save_checkpoint,
                         save_initial, set_rng_state)
from .data import Corpus, DataError, batchify, check_data, check_vocab, get_batch, load_corpus
from .init import INIT_PARAMS
from .model import Hidden, ModelConfig, RNNModel, check_init, repackage_hidden
from .runs import (Diverged, GracefulInterrupt, MetricsLog, NonFiniteGuard, ResumeConflict,
                   RunError, RunExistsError, RunLock, check_output_file, check_resume,
                   remove_stale_temporaries)
from .progress import progress_bar
from .utils import check_seed, resolve_device, seed_everything

logger = logging.getLogger(__name__)

__all__ = [
    "OPTIMIZERS", "RESUMABLE_CHANGES", "TrainConfig", "RunPaths", "RunResult", "LMError",
    "ResumeError", "NonFiniteLossError", "RunExistsError", "Trainer", "evaluate", "run",
    "merge_resume_config", "should_switch_to_asgd", "loss_units", "activation_regularization",
    "averaged_weights", "warmup_factor", "explosion_threshold", "stored_configs", "set_step_lr",
    "claimed_run", "refuse_existing_run", "remove_old_run",
]

OPTIMIZERS = ("sgd", "adam")

#: TrainConfig fields that a resumed run may change. Everything else (the whole model config, the
#: batch size, bptt, learning rate, regularisation weights, optimizer and seed) defines the run and
#: is taken from the checkpoint; giving a different value on the command line is an error.
RESUMABLE_CHANGES = frozenset({
    "epochs", "when", "nonmono", "log_interval", "save", "device", "eval_batch_size",
    "test_batch_size", "progress", "overwrite", "data", "max_skipped_steps", "init.plugins",
})

LN2 = math.log(2.0)


class LMError(RunError):
    """A language-model run cannot start or go on; the message says why."""


class ResumeError(LMError, ResumeConflict):
    """``--resume`` names a checkpoint that cannot continue with the given settings."""


class NonFiniteLossError(LMError, Diverged):
    """The run diverged (:mod:`awd_nonnormal.runs`): a non-finite loss, or ``max_skipped_steps``
    gradient norms in a row that were not finite."""


@dataclass(frozen=True)
class TrainConfig:
    """How a language model is trained (AWD-LSTM's flags of the same names).

    Attributes:
        data: corpus folder (``train.txt``, ``valid.txt``, ``test.txt``).
        batch_size, eval_batch_size, test_batch_size: columns of the batched training,
            validation and test streams (AWD-LSTM: 80, 10, 1).
        bptt: mean truncated-BPTT length; also the chunk length of evaluation.
        lr: initial learning rate. clip: gradient-norm clip (0: none).
        warmup: training batches of linear learning-rate warm-up (0: none): batch k of the run,
            counted across epochs, uses ``lr * min(1, k / warmup)`` (see :func:`warmup_factor`).
        epochs: last epoch to train. alpha, beta: AR and TAR weights. wdecay: weight decay.
        optimizer: ``sgd`` (switching to ASGD) or ``adam``.
        when: epochs at whose end the learning rate is divided by 10.
        nonmono: the non-monotone interval of the ASGD trigger.
        seed: seeds the global generators and the BPTT-length generator.
        log_interval: batches between log lines.
        save: path of the best-model checkpoint; the other files of the run go beside it.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        max_skipped_steps: steps in a row whose gradient norm is not finite (each skipped, see
            :mod:`awd_nonnormal.runs`) after which the run ends as diverged.
        progress: show progress over the batches (a bar on a terminal, else a line per 30 s).
        overwrite: allow a new run to replace existing files at ``save``.
    """

    data: str = "data/penn"
    batch_size: int = 80
    eval_batch_size: int = 10
    test_batch_size: int = 1
    bptt: int = 70
    lr: float = 30.0
    clip: float = 0.25
    warmup: int = 0
    epochs: int = 8000
    alpha: float = 2.0
    beta: float = 1.0
    wdecay: float = 1.2e-6
    optimizer: str = "sgd"
    when: Tuple[int, ...] = (-1,)
    nonmono: int = 5
    seed: int = 1111
    log_interval: int = 200
    save: str = "model.pt"
    device: str = "auto"
    max_skipped_steps: int = 100
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")
        for name in ("batch_size", "eval_batch_size", "test_batch_size", "bptt", "log_interval",
                     "max_skipped_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        check_seed(self.seed, "--seed")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if self.nonmono < 0:
            raise ValueError(f"nonmono must be >= 0, got {self.nonmono}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        for name in ("clip", "alpha", "beta", "wdecay"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        object.__setattr__(self, "when", tuple(int(e) for e in self.when))

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["when"] = list(self.when)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Rebuild from :meth:`to_dict`. Schema-1 checkpoints held ``init_plugins`` here (now in
        the model config's :class:`~awd_nonnormal.init.InitOptions`); it is dropped."""
        d = {k: v for k, v in d.items() if k != "init_plugins"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"train config holds unknown key(s): {', '.join(sorted(unknown))}")
        return cls(**dict(d))


@dataclass(frozen=True)
class RunPaths:
    """The files of a run, all derived from ``--save`` (``DIR/NAME.pt``)."""

    best: Path      # DIR/NAME.pt: best model by validation loss
    latest: Path    # DIR/NAME.latest.pt: full state for --resume
    metrics: Path   # DIR/NAME.metrics.jsonl: one JSON line per epoch

    @classmethod
    def from_save(cls, save: str) -> "RunPaths":
        best = Path(save)
        stem = best.name[:-3] if best.name.endswith(".pt") else best.name
        return cls(best, best.with_name(f"{stem}.latest.pt"), best.with_name(f"{stem}.metrics.jsonl"))

    @property
    def stem(self) -> str:
        return self.best.name[:-3] if self.best.name.endswith(".pt") else self.best.name

    @property
    def initial(self) -> Path:
        """DIR/NAME.initial.pt: the recurrent weights at initialisation, written once per run."""
        return self.best.with_name(f"{self.stem}.initial.pt")

    def snapshot(self, epoch: int) -> Path:
        """DIR/NAME.e{epoch}.pt: the model before a ``--when`` learning-rate division."""
        return self.best.with_name(f"{self.stem}.e{epoch}.pt")

    @property
    def lock(self) -> Path:
        """DIR/.NAME.lock: the run's lock file (:class:`~awd_nonnormal.runs.RunLock`)."""
        return self.best.with_name(f".{self.stem}.lock")

    def owns(self, name: str) -> bool:
        """Whether the file ``name`` in DIR is one of this run's."""
        stem = re.escape(self.stem)
        return re.fullmatch(rf"{stem}\.(pt|latest\.pt|initial\.pt|metrics\.jsonl|e\d+\.pt)", name) is not None


@dataclass
class RunResult:
    """What :func:`run` reports. Losses are in nats per token."""

    paths: RunPaths
    epochs_done: int
    best_epoch: int
    val_loss: Optional[float]
    test_loss: Optional[float]
    interrupted: bool
    stopped_at: Optional[str] = None  # "epoch k, batch b" when Ctrl-C stopped training
    tokens_per_s: Optional[float] = None  # training tokens per second over the finished epochs


def loss_units(loss: float) -> Dict[str, float]:
    """A loss in nats as ``{"loss", "ppl", "bpt"}``: perplexity ``e^loss`` and bits per token
    ``loss / ln 2`` (bits per word or per character, depending on the corpus)."""
    ppl = math.exp(loss) if loss < 700 else float("inf")
    return {"loss": loss, "ppl": ppl, "bpt": loss / LN2}


def warmup_factor(step: int, warmup: int) -> float:
    """The learning-rate factor of optimizer step ``step`` (1, 2, ...) under a linear warm-up of
    ``warmup`` steps: ``min(1, step / warmup)``; 1 without warm-up (Goyal et al. 2017, "Accurate,
    large minibatch SGD", section 2.2, gradual warm-up)."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


def explosion_threshold(ntoken: int) -> float:
    """The batch loss above which training is said to explode: ``2 ln V`` nats, twice the loss of
    the uniform guess over a vocabulary of ``ntoken`` tokens (a model that has learned anything
    stays below ``ln V``)."""
    return 2.0 * math.log(ntoken)


def should_switch_to_asgd(val_history: Sequence[float], val_loss: float, nonmono: int) -> bool:
    """AWD-LSTM's non-monotone trigger: switch when more than ``nonmono`` epochs have been
    validated and ``val_loss`` is worse than the best of all of them but the last ``nonmono``."""
    older = list(val_history)[:len(val_history) - nonmono]
    return len(val_history) > nonmono and val_loss > min(older)


def activation_regularization(raw_output: Tensor, dropped_output: Tensor, alpha: float, beta: float) -> Tensor:
    """AWD-LSTM's AR + TAR penalty (Merity et al. 2018, section 4.6) on the last layer:
    ``alpha * mean(dropped_output ** 2) + beta * mean((raw_output[t] - raw_output[t-1]) ** 2)``.
    AR acts on the output after dropout, TAR on the undropped one; both (T, B, N)."""
    penalty = raw_output.new_zeros(())
    if alpha:
        penalty = penalty + alpha * dropped_output.pow(2).mean()
    if beta and raw_output.size(0) > 1:
        penalty = penalty + beta * (raw_output[1:] - raw_output[:-1]).pow(2).mean()
    return penalty


def _make_optimizer(name: str, params: List[nn.Parameter], lr: float, wdecay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wdecay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wdecay)
    if name == "asgd":
        # t0=0, lambd=0: average every iterate from the switch on, at a constant step size.
        return torch.optim.ASGD(params, lr=lr, t0=0, lambd=0.0, weight_decay=wdecay)
    raise ValueError(f"unknown optimizer {name!r}; valid choices: sgd, adam, asgd")


def _batchify_split(data: torch.Tensor, batch_size: int, device: Optional[torch.device], split: str,
                    flag: str, corpus: str) -> torch.Tensor:
    """:func:`~awd_nonnormal.data.batchify`, its error naming the split and the flag to change."""
    try:
        return batchify(data, batch_size, device)
    except DataError as exc:
        raise DataError(f"{corpus}: the {split}: {exc} ({flag})") from None


def set_step_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Make ``lr`` the learning rate of the next ``optimizer.step()`` (every group).

    ``torch.optim.ASGD`` steps each parameter by its ``state["eta"]``, which its previous step set
    from the group's learning rate of then (``eta = lr / (1 + lambd lr t)^alpha`` after t steps);
    setting the group's ``lr`` alone would reach only the step after next, so each batch would
    take the previous batch's ``seq_len / bptt`` scaling (as awd-lstm-lm's ASGD batches do). Here
    ``eta`` is set as if the previous step had seen ``lr``: ``lr`` itself for ``lambd = 0``."""
    asgd = isinstance(optimizer, torch.optim.ASGD)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not asgd:
            continue
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "eta" in state:  # no state before the first step: it starts from group["lr"]
                t = float(state["step"])
                state["eta"].fill_(lr / (1 + group["lambd"] * lr * t) ** group["alpha"])


@contextlib.contextmanager
def averaged_weights(optimizer: torch.optim.Optimizer):
    """Under ASGD, swap the averaged weights ``state[p]["ax"]`` into the parameters for the block
    and put the live ones back afterwards (also on an exception); otherwise do nothing."""
    if not isinstance(optimizer, torch.optim.ASGD):
        yield
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            ax = optimizer.state.get(p, {}).get("ax")
            if ax is not None:
                p.copy_(ax)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(params, live):
                p.copy_(w)


def evaluate(model: RNNModel, source: Tensor, batch_size: int, bptt: int,
             check: Optional[Callable[[], None]] = None,
             dist: distributed.Dist = distributed.SINGLE) -> float:
    """Mean cross-entropy (nats per token) of ``model`` over the batched stream ``source``
    (``(rows, batch_size)``), in chunks of ``bptt`` rows with the hidden state carried over.
    ``check`` is called after every chunk (the interrupt check of the training loop). Under
    ``dist`` each rank evaluates its own columns and the sums of loss and tokens are added up
    across ranks, so every rank returns the one-process mean."""
    lo, hi = dist.columns(source.size(1))
    total, count = _loss_sum(model, source[:, lo:hi], bptt, check)
    total, count = dist.sum([total, count], source.device)
    return total / count


def _loss_sum(model: RNNModel, source: Tensor, bptt: int,
              check: Optional[Callable[[], None]]) -> Tuple[float, int]:
    """The summed cross-entropy (nats) over ``source`` and the number of predicted tokens."""
    if source.size(1) == 0:
        return 0.0, 0
    model.eval()
    hidden = model.init_hidden(source.size(1))
    total = torch.zeros((), dtype=torch.float64, device=source.device)
    count = 0
    with torch.no_grad():
        for i in range(0, source.size(0) - 1, bptt):
            data, targets = get_batch(source, i, bptt)  # (L, B), (L*B,)
            output, hidden = model(data, hidden, decode=False)  # (L, B, E)
            total += model.nll(output, targets).double().sum()
            count += targets.numel()
            if check is not None:
                check()
    return total.item(), count


@dataclass
class _State:
    """The mutable position of a run; everything in it goes into the latest checkpoint."""

    epoch: int = 1                 # the epoch in progress (or the next to run)
    pos: int = 0                   # row of the training stream where the next batch starts
    batch: int = 0                 # batches done in this epoch
    hidden: Optional[Hidden] = None
    loss_sum: float = 0.0          # sum over the epoch's tokens of the raw training loss (nats)
    tokens: int = 0                # training tokens seen in this epoch
    train_time: float = 0.0        # seconds of training in this epoch so far
    best_val: float = math.inf
    best_epoch: int = 0
    val_history: List[float] = field(default_factory=list)
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    at_boundary: bool = True       # False while a batch or an epoch's end is half done
    exploded: int = 0              # batches of this epoch whose loss exceeded 2 ln V


def _hidden_to(hidden: Optional[Hidden], device: torch.device) -> Optional[Hidden]:
    if hidden is None:
        return None
    if isinstance(hidden, Tensor):
        return hidden.detach().to(device)
    return type(hidden)(_hidden_to(h, device) for h in hidden)


class Trainer:
    """One language-model run: the model, its optimizer, the data streams and the run state.

    Built by :func:`run`; :meth:`fit` trains until ``epochs`` (or Ctrl-C) and writes the run's
    checkpoints and metrics.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, corpus: Corpus,
                 device: torch.device, paths: RunPaths, criterion: Optional[nn.Module] = None,
                 dist: distributed.Dist = distributed.SINGLE) -> None:
        self.model_cfg = model_cfg
        self.cfg = train_cfg
        self.corpus = corpus
        self.device = device
        self.paths = paths
        self.dist = dist
        # Every rank seeds the same way before building the model (identical initial weights) and
        # draws the same BPTT lengths; only the dropout masks differ per rank (_seed_rank).
        seed_everything(train_cfg.seed)
        self.bptt_rng = torch.Generator().manual_seed(train_cfg.seed)
        self.model = RNNModel(model_cfg).to(device)
        # The initial recurrent weights go to paths.initial once, before the first checkpoint,
        # and every checkpoint names that file (initial_rnn_file) instead of holding a copy.
        self.initial_rnn: Optional[Dict[str, Tensor]] = self.model.recurrent_state()
        self.initial_saved = False
        # the training columns [lo, hi) of this rank (all of them in one process)
        self.lo, self.hi = dist.columns(train_cfg.batch_size)
        self.share = (self.hi - self.lo) / train_cfg.batch_size
        self.net: nn.Module = self.model
        if dist.active:
            from torch.nn.parallel import DistributedDataParallel
            self.net = DistributedDataParallel(
                self.model, device_ids=[device] if device.type == "cuda" else None)
        self._seed_rank(1, 0)
        self._stop = False  # Ctrl-C seen by some rank (agreed at each batch under DDP)
        # criterion(logits (N, V), targets (N,)) -> mean loss in nats; a module with parameters
        # is trained with the model. Without one the model's own loss (RNNModel.nll) is used,
        # which an adaptive softmax computes without the full (N, V) logits.
        self.model_loss = criterion is None
        self.criterion = (criterion if criterion is not None else nn.CrossEntropyLoss()).to(device)
        # The optimizer covers the criterion's parameters too (none for a full softmax; a split
        # softmax would have some), before and after the switch to ASGD.
        self.params: List[nn.Parameter] = list(self.model.parameters()) + list(self.criterion.parameters())
        self.optimizer_name = train_cfg.optimizer
        self.optimizer = _make_optimizer(train_cfg.optimizer, self.params, train_cfg.lr, train_cfg.wdecay)
        self.train_data = _batchify_split(corpus.train, train_cfg.batch_size, device, "training split",
                                          "--batch_size", train_cfg.data)[:, self.lo:self.hi]  # (rows, B_rank)
        self.val_data = _batchify_split(corpus.valid, train_cfg.eval_batch_size, device, "validation split",
                                        "--eval-batch-size", train_cfg.data)
        # the test split is batched after training (_finish); a batch size too large for it fails now
        _batchify_split(corpus.test, train_cfg.test_batch_size, None, "test split", "--test-batch-size",
                        train_cfg.data)
        self.state = _State()
        # Extra checkpoint entries that say where the run came from (a finetune's source).
        self.provenance: Dict[str, Any] = {}
        self.guard = NonFiniteGuard(train_cfg.max_skipped_steps)
        self.metrics_log = MetricsLog(paths.metrics)
        self.interrupts = GracefulInterrupt()
        n_params = sum(p.numel() for p in self.params)
        logger.info("model: %s, %d parameters; %d training tokens per epoch (%d rows x %d)",
                    model_cfg.rnn_type, n_params, self.train_data.size(0) * train_cfg.batch_size,
                    self.train_data.size(0), train_cfg.batch_size)
        if dist.active:
            logger.info("rank %d of %d trains batch columns %d to %d", dist.rank, dist.world,
                        self.lo, self.hi - 1)

    # ------------------------------------------------------------------ checkpoints

    def _common(self) -> Dict[str, Any]:
        common = {
            "arch": self.model.arch(),
            "config": {"model": self.model_cfg.to_dict(), "train": self.cfg.to_dict()},
            "vocab_fingerprint": self.corpus.fingerprint,
            "data_fingerprint": self.corpus.data,
            "metrics": list(self.state.metrics),
            **self.provenance,
            "non_finite": self.guard.state(),
        }
        if not self.initial_saved and self.initial_rnn is not None:
            save_initial(self.paths.initial, self.initial_rnn)
            self.initial_saved = True
        if self.initial_saved:
            common["initial_rnn_file"] = self.paths.initial.name
        return common

    def _seed_rank(self, epoch: int, pos: int) -> None:
        """Under DDP, give ranks other than 0 their own dropout generator (see
        :func:`awd_nonnormal.distributed.rank_seed`); rank 0 keeps the run's."""
        if self.dist.active and self.dist.rank > 0:
            torch.manual_seed(distributed.rank_seed(self.cfg.seed, self.dist.rank, epoch, pos))

    def _save_model(self, path: Path, role: str, epoch: int, val_loss: float,
                    metrics: List[Dict[str, Any]]) -> None:
        """The model alone (best or snapshot); the caller has the wanted weights in place.
        Only rank 0 writes."""
        if not self.dist.is_main:
            return
        common = self._common()
        common["metrics"] = metrics
        save_checkpoint(path, kind="lm", arch=common.pop("arch"), config=common.pop("config"),
                        model=self.model.state_dict(), role=role, epoch=epoch, val_loss=val_loss,
                        best_val=min(val_loss, self.state.best_val), optimizer_name=self.optimizer_name,
                        **common)

    def save_latest(self, mid_epoch: bool) -> None:
        """The complete state; ``mid_epoch`` records the batch position inside ``state.epoch``.
        Under DDP every rank calls it (the hidden state is gathered from all columns) and rank 0
        writes."""
        st = self.state
        hidden = _hidden_to(st.hidden, torch.device("cpu")) if mid_epoch else None
        if mid_epoch and self.dist.active:
            parts = self.dist.gather(hidden)
            hidden = None if any(h is None for h in parts) else distributed.cat_hidden(parts)
        if not self.dist.is_main:
            return
        common = self._common()
        position = None
        if mid_epoch:
            position = {"epoch": st.epoch, "pos": st.pos, "batch": st.batch, "hidden": hidden,
                        "loss_sum": st.loss_sum, "tokens": st.tokens, "train_time": st.train_time,
                        "exploded": st.exploded}
        save_checkpoint(
            self.paths.latest, kind="lm", arch=common.pop("arch"), config=common.pop("config"),
            model=self.model.state_dict(), role="latest",
            epoch=st.epoch - 1,  # the last finished epoch
            position=position,
            optimizer=self.optimizer.state_dict(), optimizer_name=self.optimizer_name,
            criterion=self.criterion.state_dict(), lr=self.optimizer.param_groups[0]["lr"],
            best_val=st.best_val, best_epoch=st.best_epoch, val_history=list(st.val_history),
            rng=rng_state(), bptt_rng=self.bptt_rng.get_state(), **common)

    def restore(self, ckpt: Mapping[str, Any], path: Optional[Path] = None) -> None:
        """Continue from a latest checkpoint (:meth:`save_latest`) read from ``path``."""
        self.model.load_state_dict(ckpt["model"])
        self.criterion.load_state_dict(ckpt.get("criterion", {}))
        # The run's initial weights: embedded in an older checkpoint (written to paths.initial at
        # the next save), or already in the file it names (kept as it is when that file is
        # paths.initial, copied there otherwise).
        named = ckpt.get("initial_rnn_file")
        if path is not None and named and (Path(path).parent / named).resolve() == self.paths.initial.resolve():
            self.initial_rnn, self.initial_saved = None, self.paths.initial.is_file()
        else:
            try:
                self.initial_rnn = load_initial(ckpt, path if path is not None else self.paths.latest)
            except CheckpointError as exc:
                logger.warning("%s; later checkpoints of this run will name no initial weights", exc)
                self.initial_rnn = None
            self.initial_saved = False
        if "finetuned_from" in ckpt:
            self.provenance["finetuned_from"] = ckpt["finetuned_from"]
        self.optimizer_name = ckpt["optimizer_name"]
        self.optimizer = _make_optimizer(self.optimizer_name, self.params, self.cfg.lr, self.cfg.wdecay)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        st = self.state
        st.best_val = float(ckpt["best_val"])
        st.best_epoch = int(ckpt["best_epoch"])
        st.val_history = [float(v) for v in ckpt["val_history"]]
        st.metrics = [dict(m) for m in ckpt["metrics"]]
        self.guard.load(ckpt.get("non_finite"))
        position = ckpt.get("position")
        if position:
            st.epoch, st.pos, st.batch = int(position["epoch"]), int(position["pos"]), int(position["batch"])
            hidden = position["hidden"]
            if hidden is not None:
                hidden = distributed.slice_hidden(hidden, self.lo, self.hi)
            st.hidden = _hidden_to(hidden, self.device)
            st.loss_sum, st.tokens = float(position["loss_sum"]), int(position["tokens"])
            st.train_time = float(position["train_time"])
            st.exploded = int(position.get("exploded", 0))
        else:
            st.epoch = int(ckpt["epoch"]) + 1
        set_rng_state(ckpt["rng"])
        self._seed_rank(st.epoch, st.pos)
        self.bptt_rng.set_state(ckpt["bptt_rng"])
        logger.info("resuming at epoch %d, batch %d (%s, lr %g, best validation loss %.4f)",
                    st.epoch, st.batch, self.optimizer_name, self.optimizer.param_groups[0]["lr"],
                    st.best_val)
        if path is not None:
            self._carry_best_model(Path(path))

    def _carry_best_model(self, latest: Path) -> None:
        """A run resumed from ``latest`` into another ``--save`` takes its best model so far along
        (``DIR/NAME.pt`` beside ``DIR/NAME.latest.pt``), written to its new place as this run's
        (its config, its initial-weights file): otherwise a run whose later epochs do not beat
        that model would have no best model to test."""
        st = self.state
        source = Path(str(latest)[:-len(".latest.pt")] + ".pt") if latest.name.endswith(".latest.pt") else None
        if st.best_epoch == 0 or (source is not None and source.resolve() == self.paths.best.resolve()):
            return
        if source is None or not source.is_file():
            logger.warning("the best model so far (epoch %d) is not beside %s, so it cannot move to %s: "
                           "this run tests a later epoch's model only if one validates better",
                           st.best_epoch, latest, self.paths.best)
            return
        if not self.dist.is_main:
            return
        old = load_checkpoint(source, kind="lm")
        common = self._common()  # writes the initial-weights file into the new folder if needed
        extra = {k: v for k, v in old.items()
                 if k not in ("format", "version", "kind", "arch", "config", "model", "initial_rnn",
                              "initial_rnn_file", "test")}
        if "initial_rnn_file" in common:
            extra["initial_rnn_file"] = common["initial_rnn_file"]
        save_checkpoint(self.paths.best, kind="lm", arch=old["arch"], config=common["config"],
                        model=old["model"], **extra)
        logger.info("the best model so far (epoch %d) moved from %s to %s", st.best_epoch, source,
                    self.paths.best)

    def write_metrics_file(self) -> None:
        """Rewrite the metrics file from the state (on resume: the checkpoint is the truth)."""
        if self.dist.is_main:
            self.metrics_log.reset(self.state.metrics)

    # ------------------------------------------------------------------ training

    def _kept(self) -> str:
        kept = [str(p) for p in (self.paths.best, self.paths.latest) if p.exists()]
        if not kept:
            return "no checkpoint had been written yet"
        return f"the checkpoints of the last good epoch are kept: {' and '.join(kept)}"

    def check_interrupt(self) -> None:
        """Raise KeyboardInterrupt at a consistent point when Ctrl-C was pressed (under DDP, when
        some rank saw it by the last batch: all ranks stop at the same batch)."""
        if self._stop or (self.interrupts.requested and not self.dist.active):
            raise KeyboardInterrupt

    def _draw_seq_len(self) -> int:
        g = self.bptt_rng
        window = self.cfg.bptt if torch.rand((), generator=g).item() < 0.95 else self.cfg.bptt / 2.0
        return max(5, int(torch.normal(float(window), 5.0, (1,), generator=g).item()))

    def _loss(self, output: Tensor, targets: Tensor) -> Tensor:
        """Mean loss (nats) of the model's output: last-layer outputs (L, B, E) when the model's
        own loss is used, else logits (L, B, V) for the criterion."""
        if self.model_loss:
            return self.model.nll(output, targets).mean()
        return self.criterion(output.view(-1, output.size(-1)), targets)

    def _train_epoch(self, progress) -> None:
        st, cfg, model = self.state, self.cfg, self.model
        model.train()
        if st.pos == 0:
            st.hidden = model.init_hidden(self.hi - self.lo)
        rows = self.train_data.size(0)
        steps_before = sum(int(m["batches"]) for m in st.metrics)  # optimizer steps of past epochs
        threshold = explosion_threshold(self.model_cfg.ntoken)
        log_loss, log_tokens, log_start, log_batches = 0.0, 0, time.perf_counter(), 0
        while st.pos < rows - 2:  # at least two rows, so that TAR has a difference
            st.at_boundary = False
            start = time.perf_counter()
            data, targets = get_batch(self.train_data, st.pos, self._draw_seq_len())  # (L, B), (L*B,)
            seq_len = data.size(0)
            group = self.optimizer.param_groups[0]
            lr = group["lr"]
            set_step_lr(self.optimizer, lr * seq_len / cfg.bptt * warmup_factor(steps_before + st.batch + 1, cfg.warmup))
            try:
                hidden = repackage_hidden(st.hidden)
                self.optimizer.zero_grad(set_to_none=True)
                output, hidden, raw_outputs, outputs = self.net(data, hidden, return_h=True,
                                                                decode=not self.model_loss)
                raw_loss = self._loss(output, targets)
                loss = raw_loss + activation_regularization(raw_outputs[-1], outputs[-1], cfg.alpha, cfg.beta)
                if self.dist.active:
                    # every term is a mean over this rank's columns: weighted by the rank's share
                    # (times K, undoing DDP's average) the gradient is the one-process gradient
                    (loss * (self.share * self.dist.world)).backward()
                    self.dist.average_grads(list(self.criterion.parameters()))  # outside DDP
                else:
                    loss.backward()
                # the norm of all gradients (clipped to --clip; measured only without a clip)
                norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip or math.inf)
                values = torch.stack([raw_loss.detach().float(), loss.detach().float(),
                                      norm.float()]).tolist()  # one sync per batch
                if self.dist.active:  # the whole batch's losses, and one verdict for all ranks
                    summed = self.dist.sum([values[0] * self.share, values[1] * self.share,
                                            values[2] * self.share, float(self.interrupts.requested)],
                                           self.device)
                    values, self._stop = summed[:3], summed[3] > 0
                where = f"epoch {st.epoch}, batch {st.batch + 1} (lr {lr:g})"
                try:
                    self.guard.check_loss(values[0], "training loss", where)
                    self.guard.check_loss(values[1], "training loss with AR/TAR", where)
                    step = self.guard.allow_step(values[2], where)
                except Diverged as exc:
                    raise NonFiniteLossError(f"{exc}: stopping. This batch's update was not applied; "
                                             f"{self._kept()}. Try a smaller --lr or --clip.") from None
                if step:
                    self.optimizer.step()
            finally:
                group["lr"] = lr
            # commit the batch
            st.hidden = hidden
            st.pos += seq_len
            st.batch += 1
            ntok = seq_len * cfg.batch_size  # all ranks' tokens
            st.loss_sum += values[0] * ntok
            st.tokens += ntok
            st.train_time += time.perf_counter() - start
            st.at_boundary = True
            if values[0] > threshold:
                st.exploded += 1
                if st.exploded == 1:
                    logger.warning(
                        "training loss %.4g at epoch %d, batch %d is above 2 ln V = %.2f (the uniform "
                        "guess scores ln V): training is exploding. With elu or relu and a chain or "
                        "identity init, try --nonlinearity tanh, --init-alpha 0.5 or --wdrop 0; "
                        "otherwise a smaller --lr", values[0], st.epoch, st.batch,
                        threshold)
            log_loss += values[0] * ntok
            log_tokens += ntok
            log_batches += 1
            if progress is not None:
                progress.update(ntok)
                progress.set_postfix(loss=f"{values[0]:.3f}", refresh=False)
            if st.batch % cfg.log_interval == 0:
                mean = log_loss / log_tokens
                u = loss_units(mean)
                elapsed = time.perf_counter() - log_start
                logger.info("| epoch %3d | %5d/%5d batches | lr %.5g | ms/batch %6.1f | tok/s %7.0f | "
                            "loss %5.2f | ppl %8.2f | bpt %6.3f", st.epoch, st.batch, rows // cfg.bptt,
                            lr * warmup_factor(steps_before + st.batch, cfg.warmup),
                            1000 * elapsed / log_batches, log_tokens / elapsed, mean, u["ppl"], u["bpt"])
                log_loss, log_tokens, log_start, log_batches = 0.0, 0, time.perf_counter(), 0
            self.check_interrupt()

    def _end_epoch(self, epoch_start: float) -> None:
        st, cfg = self.state, self.cfg
        epoch = st.epoch
        lr = self.optimizer.param_groups[0]["lr"]
        with averaged_weights(self.optimizer):  # under ASGD, validate and keep the averaged weights
            val_loss = evaluate(self.model, self.val_data, cfg.eval_batch_size, cfg.bptt,
                                check=self.check_interrupt, dist=self.dist)
            try:
                self.guard.check_loss(val_loss, "validation loss", f"the end of epoch {epoch}")
            except Diverged as exc:
                raise NonFiniteLossError(f"{exc}: stopping; {self._kept()}.") from None
            u = loss_units(val_loss)
            train_loss = st.loss_sum / max(st.tokens, 1)
            record = {
                "epoch": epoch, "train_loss": train_loss, "train_ppl": loss_units(train_loss)["ppl"],
                "val_loss": val_loss, "val_ppl": u["ppl"], "val_bpt": u["bpt"],
                "best_val_loss": min(val_loss, st.best_val), "lr": lr, "optimizer": self.optimizer_name,
                "batches": st.batch, "train_time_s": st.train_time,
                "epoch_time_s": time.perf_counter() - epoch_start,
                "tokens_per_s": st.tokens / st.train_time if st.train_time > 0 else 0.0,
                "exploded_batches": st.exploded,
            }
            if val_loss < st.best_val:
                self._save_model(self.paths.best, "best", epoch, val_loss, st.metrics + [record])
                logger.info("saved the new best model (validation loss %.4f) to %s", val_loss, self.paths.best)
        logger.info("| end of epoch %3d | time: %6.1fs | tok/s %7.0f | valid loss %6.3f | valid ppl %8.2f | "
                    "valid bpt %6.3f", epoch, record["epoch_time_s"], record["tokens_per_s"], val_loss,
                    u["ppl"], u["bpt"])
        if st.exploded:
            logger.warning("epoch %d: %d of %d training batches had a loss above 2 ln V", epoch,
                           st.exploded, st.batch)
        if epoch in cfg.when:  # the live weights, before the learning rate drops (as awd-lstm-lm)
            self._save_model(self.paths.snapshot(epoch), "snapshot", epoch, val_loss, st.metrics + [record])
        # Commit: from here the epoch is done.
        st.at_boundary = False
        if val_loss < st.best_val:
            st.best_val, st.best_epoch = val_loss, epoch
        if self.optimizer_name == "sgd" and should_switch_to_asgd(st.val_history, val_loss, cfg.nonmono):
            logger.info("validation loss %.4f is worse than the best before the last %d epochs: "
                        "switching to averaged SGD", val_loss, cfg.nonmono)
            self.optimizer_name = "asgd"
            self.optimizer = _make_optimizer("asgd", self.params, lr, cfg.wdecay)
        st.val_history.append(val_loss)
        if epoch in cfg.when:
            logger.info("epoch %d is in --when: dividing the learning rate by 10", epoch)
            for group in self.optimizer.param_groups:
                group["lr"] /= 10.0
        st.metrics.append(record)
        st.epoch, st.pos, st.batch, st.hidden = epoch + 1, 0, 0, None
        st.loss_sum, st.tokens, st.train_time, st.exploded = 0.0, 0, 0.0, 0
        st.at_boundary = True
        self.save_latest(mid_epoch=False)
        if self.dist.is_main:
            self.metrics_log.append(record)

    def fit(self) -> Tuple[bool, Optional[str]]:
        """Train from the current state to ``epochs``. Returns ``(interrupted, where)``: after a
        Ctrl-C the latest state is saved (so ``--resume`` continues at the next batch) and
        training stops; a second Ctrl-C aborts at once (KeyboardInterrupt)."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        st, cfg = self.state, self.cfg
        tokens_per_epoch = (self.train_data.size(0) - 1) * cfg.batch_size
        show = cfg.progress and self.dist.is_main
        with self.interrupts, (logging_redirect_tqdm() if show else contextlib.nullcontext()):
            try:
                while st.epoch <= cfg.epochs:
                    epoch_start = time.perf_counter() - st.train_time
                    with progress_bar(total=tokens_per_epoch, initial=st.pos * cfg.batch_size,
                                      unit="tok", desc=f"epoch {st.epoch}", enabled=show,
                                      unit_scale=True, leave=False) as bar:
                        self._train_epoch(bar)
                    self._end_epoch(epoch_start)
            except KeyboardInterrupt:
                where = f"epoch {st.epoch}, batch {st.batch}"
                if self.dist.active and self.interrupts.hard:
                    raise  # the ranks may be at different points: no collective save
                if st.at_boundary:
                    self.save_latest(mid_epoch=True)
                    logger.warning("Exiting from training early (%s); saved the state to %s: "
                                   "--resume %s continues from there", where, self.paths.latest,
                                   self.paths.latest)
                else:
                    logger.warning("training aborted in the middle of a batch (%s); %s holds the "
                                   "state at the end of the last finished epoch", where, self.paths.latest)
                if self.interrupts.hard:
                    raise
                return True, where
        return False, None


# ---------------------------------------------------------------------- running


def _flat_settings(model_cfg: ModelConfig, train_cfg: TrainConfig) -> Dict[str, Any]:
    """Both configs as one mapping of setting names (the init options as ``init.spec``,
    ``init.params``, ``init.zero_bias``, ``init.plugins``): the names of ``explicit``."""
    flat = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(ModelConfig)
            if f.name not in ("ntoken", "init")}
    flat.update({f"init.{k}": v for k, v in model_cfg.init.to_dict().items()})
    flat.update({f.name: getattr(train_cfg, f.name) for f in dataclasses.fields(TrainConfig)})
    return flat


#: Settings (the names of :func:`_flat_settings`) whose flag in ``main.py`` is not
#: ``--name-with-dashes``.
_FLAGS = {"rnn_type": "--model", "batch_size": "--batch_size", "progress": "--no-progress",
          "tied": "--tied/--no-tied", "init.spec": "--init", "init.zero_bias": "--init-zero-bias",
          "init.plugins": "--init-plugin", "init.params": "/".join(f"--init-{k}" for k in INIT_PARAMS)}


def setting_flag(name: str) -> str:
    """The ``main.py`` flag of a setting, for messages: ``emsize`` -> ``--emsize``,
    ``rnn_type`` -> ``--model``, ``init.plugins`` -> ``--init-plugin``."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def stored_configs(ckpt: Mapping[str, Any], where: str,
                   error: Callable[[str], Exception] = ResumeError) -> Tuple[ModelConfig, TrainConfig]:
    """The model and training configs a checkpoint was saved with; ``error`` (a ResumeError by
    default) names ``where`` when the checkpoint holds no readable language-model config."""
    try:
        return (ModelConfig.from_dict(ckpt["config"]["model"]),
                TrainConfig.from_dict(ckpt["config"]["train"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise error(f"{where}: not a language-model run of this code (its config cannot be "
                    f"read: {exc})") from None


def merge_resume_config(ckpt: Mapping[str, Any], model_cfg: ModelConfig, train_cfg: TrainConfig,
                        explicit: FrozenSet[str], where: str = "checkpoint") -> Tuple[ModelConfig, TrainConfig]:
    """The configs of a resumed run: the checkpoint's, with the explicitly given
    :data:`RESUMABLE_CHANGES` applied (:func:`awd_nonnormal.runs.check_resume`). ``explicit``
    names the settings the user set (see :func:`_flat_settings`); any other explicit setting that
    differs from the checkpoint is a ResumeError.

    Unless ``save`` is explicit, the run goes on writing beside the checkpoint ``where``
    (``DIR/NAME.latest.pt`` -> ``DIR/NAME.pt``), so a moved run folder keeps working."""
    saved_model, saved_train = stored_configs(ckpt, where)
    given = _flat_settings(model_cfg, train_cfg)
    wanted = {k: v for k, v in given.items() if k in explicit}
    try:
        merged = check_resume(_flat_settings(saved_model, saved_train), wanted, RESUMABLE_CHANGES,
                              where=where, flag=setting_flag, source="the checkpoint")
    except ResumeConflict as exc:
        raise ResumeError(f"{exc}. A resumed run keeps the model and optimisation settings of its "
                          f"checkpoint; start a new run (without --resume) to change the "
                          f"others.") from None
    updates = {f.name: merged[f.name] for f in dataclasses.fields(TrainConfig)}
    if "save" not in explicit and where.endswith(".latest.pt"):
        updates["save"] = where[:-len(".latest.pt")] + ".pt"
    init = dataclasses.replace(saved_model.init, plugins=tuple(merged["init.plugins"]))
    return dataclasses.replace(saved_model, init=init), TrainConfig(**updates)


def _finish(paths: RunPaths, corpus: Corpus, cfg: TrainConfig, device: torch.device,
            dist: distributed.Dist = distributed.SINGLE) -> Tuple[float, float, int]:
    """Evaluate the best model on the test set and record the result in its checkpoint.
    Returns ``(val_loss, test_loss, best_epoch)``. Under DDP the ranks share the test columns
    and rank 0 writes."""
    ckpt = load_checkpoint(paths.best, kind="lm")
    model = RNNModel.from_checkpoint(ckpt, map_location=device)
    test_data = batchify(corpus.test, cfg.test_batch_size, device)
    test_loss = evaluate(model, test_data, cfg.test_batch_size, cfg.bptt, dist=dist)
    if not dist.is_main:
        return float(ckpt["val_loss"]), test_loss, int(ckpt["epoch"])
    u = loss_units(test_loss)
    logger.info("| end of training | test loss %6.3f | test ppl %8.2f | test bpt %6.3f",
                test_loss, u["ppl"], u["bpt"])
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "version", "kind", "arch", "config", "model")}
    extra["test"] = {**u, "batch_size": cfg.test_batch_size, "bptt": cfg.bptt}
    save_checkpoint(paths.best, kind="lm", arch=ckpt["arch"], config=ckpt["config"], model=ckpt["model"], **extra)
    return float(ckpt["val_loss"]), test_loss, int(ckpt["epoch"])


@contextlib.contextmanager
def claimed_run(paths: RunPaths, *, lock: bool = True) -> Iterator[None]:
    """The folder rules of every language-model run (``main.py``'s and a finetune's), for the
    block that trains it: ``--save``'s folder must be writable (checked first), one process at a
    time writes the run (``DIR/.NAME.lock``; :class:`~awd_nonnormal.runs.RunLocked` if another
    has it) and temporary files that a killed write of this run left are removed. ``lock=False``
    (the other ranks of a DDP job, whose rank 0 holds the lock) checks the folder only."""
    check_output_file(paths.best, "--save")
    if not lock:
        yield
        return
    with RunLock(paths.lock, f"the run {paths.best}"):
        remove_stale_temporaries(paths.best.parent, owns=paths.owns)
        yield


def refuse_existing_run(paths: RunPaths, overwrite: bool) -> None:
    """:class:`RunExistsError` if the run at ``paths`` has files already, unless ``overwrite``."""
    existing = [str(p) for p in (paths.best, paths.latest) if p.exists()]
    if existing and not overwrite:
        raise RunExistsError(f"{', '.join(existing)} already exist(s): choose another --save, "
                             f"continue that run with --resume {paths.latest}, or pass --overwrite")


def remove_old_run(paths: RunPaths) -> None:
    """Delete every file of an earlier run at ``paths`` (``--overwrite``): its latest state would
    resume it, and its snapshots and metrics would mix with the new run's."""
    for f in sorted(paths.best.parent.iterdir()):
        if paths.owns(f.name) and f.is_file():
            f.unlink()


def run(model_cfg: ModelConfig, train_cfg: TrainConfig, *, resume: Optional[str] = None,
        explicit: FrozenSet[str] = frozenset(),
        dist: distributed.Dist = distributed.SINGLE) -> RunResult:
    """Train a language model (or continue the run of the latest checkpoint ``resume``), then
    evaluate the best model on the test set.

    With ``resume``, the configs come from the checkpoint; ``explicit`` names the fields the user
    set, which must agree with it except for :data:`RESUMABLE_CHANGES` (see
    :func:`merge_resume_config`). Raises DataError, CheckpointError, InitSpecError (a ValueError)
    or an :class:`LMError` with a one-line reason; nothing is written before the inputs are
    checked. After Ctrl-C the latest state is saved and the best model so far is tested.

    Before the corpus is read, ``save``'s folder is checked to be writable and the run is locked
    (``DIR/.NAME.lock``; :class:`~awd_nonnormal.runs.RunLocked` if another process has it);
    temporary files that a killed write of this run left are removed. A resumed run must go on
    on the text it started on (the checkpoint's ``data_fingerprint``).

    ``dist`` (from :func:`awd_nonnormal.distributed.from_env`) makes this one rank of a
    DistributedDataParallel job: it joins the process group, trains its share of the batch
    columns and only rank 0 writes files (see :mod:`awd_nonnormal.distributed`).
    """
    if resume is None or "save" in explicit:  # outputs are checked before any input is read
        check_output_file(RunPaths.from_save(train_cfg.save).best, "--save")
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume, kind="lm")
        if ckpt.get("role") != "latest":
            hint = ""
            if ckpt.get("role") in ("best", "snapshot"):
                stem = Path(resume).name[:-3] if str(resume).endswith(".pt") else Path(resume).name
                hint = f"; resume from the run's latest state, {Path(resume).with_name(stem + '.latest.pt')}"
            raise ResumeError(f"{resume} holds a model without its training state (role "
                              f"{ckpt.get('role')!r}), so it cannot be resumed{hint}")
        model_cfg, train_cfg = merge_resume_config(ckpt, model_cfg, train_cfg, explicit, where=str(resume))
    if ckpt is None:  # a resumed model is loaded, not initialised: it needs no plug-in
        check_init(model_cfg)
    device = resolve_device(train_cfg.device)  # a ValueError: a bad --device is a usage error
    if train_cfg.batch_size < dist.world:
        raise LMError(f"--batch_size {train_cfg.batch_size} is smaller than the {dist.world} "
                      f"processes: every rank needs at least one batch column")
    paths = RunPaths.from_save(train_cfg.save)
    with claimed_run(paths, lock=dist.is_main):  # under DDP rank 0 holds the lock and writes for all ranks
        return _run_locked(model_cfg, train_cfg, ckpt, resume, device, paths, dist)


def _run_locked(model_cfg: ModelConfig, train_cfg: TrainConfig, ckpt: Optional[Dict[str, Any]],
                resume: Optional[str], device: torch.device, paths: RunPaths,
                dist: distributed.Dist) -> RunResult:
    """:func:`run` from the point where the run holds its lock."""
    own = ckpt is not None and Path(resume).resolve() == paths.latest.resolve()
    if not own:
        refuse_existing_run(paths, train_cfg.overwrite)
    corpus = load_corpus(train_cfg.data)
    if ckpt is not None:
        check_vocab(corpus, ckpt.get("vocab_fingerprint"), str(resume), ntokens=model_cfg.ntoken)
        check_data(corpus, ckpt.get("data_fingerprint"), str(resume))
    try:
        model_cfg = dataclasses.replace(model_cfg, ntoken=len(corpus.dictionary))
        model_cfg = dataclasses.replace(model_cfg, cutoffs=model_cfg.resolved_cutoffs)
    except ValueError as exc:  # a flag's value (--cutoffs) out of range for this corpus: a usage error
        raise ValueError(str(exc)) from None
    if model_cfg.cutoffs:
        logger.info("adaptive softmax with cut-offs %s", list(model_cfg.cutoffs))
    logger.info("corpus %s: %d tokens in the vocabulary; train / valid / test %d / %d / %d tokens",
                train_cfg.data, len(corpus.dictionary), len(corpus.train), len(corpus.valid), len(corpus.test))

    device = distributed.setup(dist, device)
    trainer = Trainer(model_cfg, train_cfg, corpus, device, paths, dist=dist)
    if ckpt is not None:
        trainer.restore(ckpt, Path(resume))
        trainer.write_metrics_file()
        del ckpt
    elif dist.is_main:  # --overwrite: no file of the old run is left
        remove_old_run(paths)
    interrupted, where = trainer.fit()
    st = trainer.state
    seconds = sum(m["train_time_s"] for m in st.metrics)
    speed = sum(m["tokens_per_s"] * m["train_time_s"] for m in st.metrics) / seconds if seconds > 0 else None
    dist.barrier()  # rank 0 has written its last checkpoint
    if not paths.best.exists() or st.best_epoch == 0:
        logger.warning("no epoch was validated, so there is no best model to test")
        return RunResult(paths, st.epoch - 1, 0, None, None, interrupted, where, tokens_per_s=speed)
    val_loss, test_loss, best_epoch = _finish(paths, corpus, train_cfg, device, dist)
    dist.barrier()  # no rank leaves the process group while rank 0 is still writing
    return RunResult(paths, st.epoch - 1, best_epoch, val_loss, test_loss, interrupted, where, tokens_per_s=speed)
