"""Training one model on one synthetic task (Orhan & Pitkow 2020, section 3.1.1).

The model is one vanilla :class:`~awd_nonnormal.rnn.RNN` layer and a linear read-out, initialised
with :func:`~awd_nonnormal.init.apply_init` (zero biases) and trained with RMSprop (rho 0.9,
eps 1e-7: the Keras defaults of the paper's code), gradient-norm clipping at 10, batch 16, up to
100 epochs, stopping early once the validation loss falls below 0.0025. The clipping, the number of
trainable biases and the loss follow the paper's Keras 2.2 code by default (:mod:`.rules`).
A run succeeds when its
final validation loss is below half of the task's random baseline. What a run is (its config and
the task registry) lives in :mod:`.config`.

A run lives in its own folder (:mod:`awd_nonnormal.runs`)::

    config.json     the TaskConfig and what follows from it (sequence length, baseline, permutation)
    metrics.jsonl   one line per epoch: train and validation loss (and accuracy), times
    checkpoint.pt   the awd-nonnormal checkpoint (kind "task"), rewritten after every epoch
    result.json     written last: the run is finished when this file exists

Everything random is drawn from generators seeded from the run seed
(:func:`~awd_nonnormal.tasks.data.derive_seed`): the initial weights, the training and validation
sets (generated once, as the paper did), and the shuffling of each epoch (seeded by the epoch).
So a run stopped after any batch and resumed from its checkpoint continues exactly as if it had
not stopped. Non-finite values follow the policy of :mod:`awd_nonnormal.runs`: a step whose
gradient norm overflows is skipped, a full epoch of those in a row, a non-finite loss or a
validation loss above :data:`~awd_nonnormal.runs.DIVERGED_FACTOR` times the random baseline ends
the run as ``diverged``, and its checkpoint stays the last good state (a new run saves its
initial state first, so there always is one).

A run holds its folder's lock (:class:`~awd_nonnormal.runs.RunLock`, ``.lock``) while it runs;
a second process that wants the same folder is refused. A psMNIST run's config records the
content fingerprint of the IDX files it reads (``data_fingerprint``), so the same command on other
data is another run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..checkpoint import load_checkpoint, rng_state, save_checkpoint
from ..init import INIT_PARAMS, check_init
from ..progress import progress_bar
from ..rnn import RNN, _linear, _uses_onednn, onednn_available
from ..runs import (CHECKPOINT_FILE, CONFIG_FILE, DIVERGED_FACTOR, LOCK_FILE, METRICS_FILE,
                    RESULT_FILE, Diverged, GracefulInterrupt, MetricsLog, NonFiniteGuard, RunLock,
                    differences, is_finished, read_json, read_metrics, read_result,
                    remove_stale_temporaries, write_json)
from ..utils import resolve_device
from .config import (CLIP_MODES, MNIST_VALIDATION, PERM_SEED_RUN, SUCCESS_FRACTION, TASKS,
                     RunConflict, RunOptions, Task, TaskConfig, TaskDataError, TaskError, positive_int,
                     config_from_dict, get_task, make_config)
from .data import derive_seed
from .data import generator as _generator
from . import rules

logger = logging.getLogger(__name__)

__all__ = [
    "TaskError", "TaskDataError", "RunConflict", "Task", "TASKS", "get_task", "TaskConfig", "RunOptions",
    "make_config", "TaskModel", "build_model", "model_batch", "derive_seed", "run_name", "train", "RunOutcome",
    "read_result", "read_metrics", "is_finished", "stored_config", "config_from_dict", "check_init",
    "evaluate", "CLIP_MODES", "PERM_SEED_RUN", "MNIST_VALIDATION", "Trainer",
    "extend_run", "flat_config", "flat_dict", "to_device", "identify_data", "run_lock", "keep_last_good", "checkpoint_payload", "run_result", "write_result", "close_epoch", "diverge", "run_facts",
    "load_run_checkpoint", "restore_progress", "begin_run", "open_metrics", "SUCCESS_FRACTION", "CONFIG_FILE", "METRICS_FILE", "CHECKPOINT_FILE", "RESULT_FILE",
]


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class TaskModel(nn.Module):
    """One vanilla RNN layer and a linear read-out of every step (``readout="all"``) or of the
    last step (``"last"``). ``forward(x) -> (T, B, out)`` or ``(B, out)``, where ``x`` is
    (T, B, d) floats, or (T, B) integer symbols in ``[0, d)`` that stand for their one-hot vectors
    (the copy task's inputs, see :func:`model_batch`; the layer looks up its input weights)."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, nonlinearity: str,
                 readout: str) -> None:
        super().__init__()
        if readout not in ("all", "last"):
            raise ValueError(f"unknown readout {readout!r}; valid: all, last")
        self.readout = readout
        self.rnn = RNN(input_size, hidden_size, num_layers=1, nonlinearity=nonlinearity)
        self.decoder = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)  # (T, B, N)
        if self.readout == "last":
            return self.decoder(h[-1])  # (B, out)
        # Every step's read-out, stored class-first: a (T, B, out) view of (out, T, B) memory,
        # so that a softmax over the classes runs along rows of T*B values
        # (rules.classification_loss), about 8 times faster than over rows of 9 or 10 values.
        T, B, N = h.shape
        logits = _ClassFirstLinear.apply(h.reshape(T * B, N), self.decoder.weight,
                                         self.decoder.bias)  # (out, T*B)
        return logits.view(-1, T, B).permute(1, 2, 0)  # (T, B, out)


class _ClassFirstLinear(torch.autograd.Function):
    """``(h W^T + b)^T`` (out, R), for h (R, N), W (out, N), b (out,): the read-out of every
    step in class-first layout, its products by the RNN layer's backend rule (oneDNN on CPU
    from :data:`~awd_nonnormal.rnn.ONEDNN_MIN_WORK`, which beats MKL 2-3x on these thin
    products, see bench/rnn_speed.py). The forward product is ``h W^T + b`` with h as the
    input, then one transposing copy of the (R, out) logits: computed as ``W h^T`` instead,
    oneDNN reorders all of h as its weight operand each call, which alone is faster (135
    against 190 us at the copy task's 8000 x 100 x 9) but in the training step, where h has
    left the cache, 0.1-0.2 ms slower (in-process A/B of the copy-500 step, 25 alternations,
    twice)."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Tensor) -> Tensor:
        R, N = h.shape
        C = w.shape[0]
        onednn = onednn_available(h.device, h.dtype)
        ctx.save_for_backward(h, w)
        ctx.onednn = onednn
        out = _linear(h, w, b, _uses_onednn(R, N, C, "auto", onednn))  # (R, C) = h W^T + b
        return out.t().contiguous()  # (C, R)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # (C, R)
        h, w = ctx.saved_tensors
        R, N = h.shape
        C = w.shape[0]
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # (R, N) = grad^T W
            grad_h = _linear(grad.t(), w.t(), None, _uses_onednn(R, C, N, "auto", ctx.onednn))
        if ctx.needs_input_grad[1]:  # (C, N) = grad h
            grad_w = _linear(grad, h.t(), None, _uses_onednn(C, R, N, "auto", ctx.onednn))
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(1)
        return grad_h, grad_w, grad_b


def make_optimizer(params, config: TaskConfig) -> rules.RMSprop:
    """The run's optimizer: RMSprop at ``config.lr``, rho ``config.rho``, eps ``config.opt_eps``
    (:class:`~awd_nonnormal.tasks.rules.RMSprop`, torch's update with a leaner step)."""
    return rules.RMSprop(params, lr=config.lr, alpha=config.rho, eps=config.opt_eps)


def arch_of(config: TaskConfig) -> Dict[str, Any]:
    """The checkpoint's ``arch`` entry (see :mod:`awd_nonnormal.checkpoint`)."""
    task = get_task(config.task)
    return {"rnn_type": "RNN", "nonlinearity": config.nonlinearity, "nlayers": 1,
            "input_size": task.input_size, "hidden_sizes": [config.hidden],
            "output_size": task.output_size, "readout": task.readout}


def build_model(config: TaskConfig) -> TaskModel:
    """The task model, initialised from the run seed: the init options (zero biases) for the
    recurrent layer, with one trainable bias (``b_hh`` frozen at 0, as Keras' ``SimpleRNN``) unless
    ``config.biases`` is 2; the read-out as Keras' ``Dense`` (Glorot-uniform weights, zero bias)."""
    task = get_task(config.task)
    model = TaskModel(task.input_size, config.hidden, task.output_size, config.nonlinearity,
                      task.readout)
    gen = _generator(config.seed, "init")
    config.init.load_plugins()
    config.init.apply(model.rnn, generator=gen)
    if config.biases == 1:
        rules.single_bias_(model.rnn)
    with torch.no_grad():
        nn.init.xavier_uniform_(model.decoder.weight, generator=gen)
        model.decoder.bias.zero_()
    return model


# --------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------

def _num(v: float) -> str:
    return f"{v:g}"


def init_label(config: TaskConfig) -> str:
    """A short file-name-safe label of the initializer, e.g. ``chain-alpha1.02``."""
    label = re.sub(r"[^A-Za-z0-9.+-]+", "-", config.init.spec).strip("-")
    for key, value in config.init_params().items():
        label += f"-{key}{_num(value)}"
    return label


def flat_config(config: TaskConfig) -> Dict[str, Any]:
    """The config in the flat form of the first schema (``init`` a spec, ``init_scale`` ...,
    ``init_plugins``): the names of the command-line flags, and what the folder-name hash has
    always been taken of, so that a run keeps its folder. ``data_fingerprint`` is left out when
    it is None (tasks whose data are generated), so only psMNIST folder names took it in."""
    d = config.to_dict()
    if d.get("data_fingerprint") is None:
        d.pop("data_fingerprint", None)
    init = d.pop("init")
    d["init"] = init["spec"]
    d.update({f"init_{k}": init["params"].get(k) for k in INIT_PARAMS})
    d["init_plugins"] = init["plugins"]
    return d


def run_name(config: TaskConfig, digest: bool = True) -> str:
    """Folder name of a run: ``<task>-<init>-lr<lr>-seed<seed>``, plus a short hash of the whole
    config with ``digest`` (so that runs that differ in anything else get different folders)."""
    name = f"{config.task}-{init_label(config)}-lr{_num(config.lr)}-seed{config.seed}"
    if digest:
        h = hashlib.sha256(json.dumps(flat_config(config), sort_keys=True).encode()).hexdigest()[:8]
        name += f"-{h}"
    return name


def stored_config(run_dir: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The config a run folder was made with (``config.json``, in today's form), or None."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    try:
        return config_from_dict(record["config"]).to_dict()
    except (TypeError, KeyError, ValueError) as exc:
        raise RunConflict(f"{path}: unreadable run config ({exc}); remove the folder or choose "
                          f"another --out") from None


def extend_run(run_dir: Union[str, Path], epochs: int) -> TaskConfig:
    """Raise the epoch limit of the run in ``run_dir`` to ``epochs``, so that :func:`train` goes on
    training it: a finished run (``completed``) is reopened, an unfinished one gets the new limit.
    A run that converged (stopped early) or diverged has nothing to extend. Returns the new config.
    """
    run_dir = Path(run_dir)
    stored = stored_config(run_dir)
    if stored is None:
        raise TaskDataError(f"{run_dir} holds no run (no {CONFIG_FILE})")
    epochs = positive_int("epochs", epochs)
    if epochs <= stored["epochs"]:
        raise TaskError(f"{run_dir}: the run already has an epoch limit of {stored['epochs']}; "
                        f"extending needs more than that, got {epochs}")
    result = read_result(run_dir)
    if result is not None and result.get("status") != "completed":
        raise TaskError(f"{run_dir}: the run ended as {result.get('status')!r}: nothing to extend")
    config = config_from_dict({**stored, "epochs": epochs})
    # The result goes first: were we stopped in between, the run then looks unfinished and its
    # checkpoint (whose epoch limit train() ignores) still continues it exactly.
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    record = read_json(run_dir / CONFIG_FILE)
    record["config"] = config.to_dict()
    write_json(run_dir / CONFIG_FILE, record)
    logger.info("%s: epoch limit raised from %d to %d", run_dir, stored["epochs"], epochs)
    return config


def identify_data(config: TaskConfig, options: RunOptions) -> TaskConfig:
    """``config`` with the fingerprint of the data it reads (psMNIST: the IDX files in
    ``options.mnist_dir``; other tasks generate theirs and are returned as they are). A config
    that records other data than the folder holds is refused (:class:`TaskDataError`)."""
    found = get_task(config.task).fingerprint(config, options)
    if found is None or config.data_fingerprint == found:
        return config
    if config.data_fingerprint is not None:
        raise TaskDataError(f"the run was made on other data (fingerprint {config.data_fingerprint[:12]}) "
                        f"than the files in {options.mnist_dir} (fingerprint {found[:12]}); point "
                        f"--mnist-dir at the run's data, or start another run")
    return dataclasses.replace(config, data_fingerprint=found)


def adopt_unknown_data(stored: Dict[str, Any], config: TaskConfig, where: Any) -> TaskConfig:
    """A run stored before runs recorded their data (``data_fingerprint`` null) is taken to be of
    the data in use, with a warning, when the rest of its config agrees: ``config`` then gets the
    stored (unknown) fingerprint, so that the old run goes on as it was."""
    wanted = config.to_dict()
    if (stored.get("data_fingerprint") is None and wanted.get("data_fingerprint") is not None
            and {**stored, "data_fingerprint": wanted["data_fingerprint"]} == wanted):
        logger.warning("%s records no data fingerprint (it was made before runs recorded one): "
                       "its data are unknown and taken to be those in use now", where)
        return dataclasses.replace(config, data_fingerprint=None)
    return config


def check_run_dir(run_dir: Path, config: TaskConfig) -> TaskConfig:
    """The config to run in ``run_dir``: ``config``, or the stored one of a run made before
    data fingerprints (:func:`adopt_unknown_data`). Raise :class:`RunConflict` if ``run_dir``
    holds a run of another config."""
    stored = stored_config(run_dir)
    if stored is None:
        return config
    config = adopt_unknown_data(stored, config, run_dir)
    if stored != config.to_dict():
        diff = "; ".join(differences(flat_dict(stored), flat_dict(config.to_dict())))
        raise RunConflict(f"{run_dir} holds a run with another config ({diff}); choose another "
                          f"output folder, or continue that run with --resume")
    return config


def run_lock(run_dir: Union[str, Path]) -> RunLock:
    """The lock of the run folder ``run_dir`` (``with run_lock(d): ...``)."""
    return RunLock(Path(run_dir) / LOCK_FILE, f"the run folder {run_dir}")


def flat_dict(d: Dict[str, Any]) -> Dict[str, Any]:
    """A config dict with the init options as ``init.spec``, ``init.params`` ... (for messages)."""
    out = {k: v for k, v in d.items() if k != "init"}
    out.update({f"init.{k}": v for k, v in d.get("init", {}).items()})
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass
class RunOutcome:
    """What :func:`train` returns."""
    run_dir: Path
    result: Dict[str, Any]
    skipped: bool = False      # the run had finished before; nothing was trained
    resumed_from: Optional[Tuple[int, int]] = None  # (epoch, batch) of the checkpoint resumed
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    error: Optional[str] = None  # an ensemble member that could not start (result None)


def model_batch(dataset, index: Tensor, device: torch.device) -> Tuple[Tensor, Tensor]:
    """A batch as :class:`TaskModel` takes it fastest: the symbols themselves for a data set of
    one-hot symbols (``symbol_batch``, the copy task), else the data set's inputs (``batch``)."""
    if hasattr(dataset, "symbol_batch"):
        return dataset.symbol_batch(index, device)
    return dataset.batch(index, device)


def evaluate(model: TaskModel, task: Task, dataset, device: torch.device,
             batch_size: int = 500, loss: str = "exact") -> Dict[str, float]:
    """Mean loss (of kind ``loss``, as in training) over ``dataset``, and accuracy for
    classification at the last step."""
    total, correct, n = 0.0, 0, len(dataset)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(start + batch_size, n), device=device)
            x, y = model_batch(dataset, index, device)
            out = model(x)
            total += task.loss(out, y, loss).item() * len(index)
            if task.classification and task.readout == "last":
                correct += int((out.argmax(-1) == y).sum())
    metrics = {"loss": total / n}
    if task.classification and task.readout == "last":
        metrics["acc"] = correct / n
    return metrics


def to_device(dataset, device: torch.device):
    """A task data set (a dataclass of tensors) with its tensors on ``device``."""
    if device.type == "cpu":
        return dataset
    moved = {f.name: (getattr(dataset, f.name).to(device) if isinstance(getattr(dataset, f.name), Tensor)
                      else getattr(dataset, f.name)) for f in dataclasses.fields(dataset)}
    return type(dataset)(**moved)


BatchHook = Callable[[int, int, float], None]


class Trainer:
    """One task run in its folder: the model, the optimizer, the data and the run state.

    :meth:`start` builds a new run or restores its checkpoint, :meth:`train_epoch` and
    :meth:`end_epoch` do one epoch, :meth:`save` writes the checkpoint and :meth:`finish` the
    result; :func:`train` strings them together.
    """

    def __init__(self, config: TaskConfig, run_dir: Path, options: RunOptions,
                 on_batch: Optional[BatchHook] = None) -> None:
        self.config, self.run_dir, self.options, self.on_batch = config, run_dir, options, on_batch
        self.task = get_task(config.task)
        config.init.load_plugins()
        self.device = resolve_device(options.device)
        self.baseline = self.task.baseline(config)
        train_set, val_set, facts = self.task.datasets(config, options)
        self.train_set, self.val_set = to_device(train_set, self.device), to_device(val_set, self.device)
        self.derived, self.extra_state = run_facts(self.task, config, facts)
        self.model = build_model(config).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # a frozen b_hh is left out
        self.optimizer = make_optimizer(self.params, config)
        self.arch = arch_of(config)
        self.ckpt_path = run_dir / CHECKPOINT_FILE
        self.metrics_log = MetricsLog(run_dir / METRICS_FILE)
        self.n_batches = math.ceil(len(self.train_set) / config.batch_size)
        # a full epoch of skipped steps in a row: the weights have stopped moving for good
        self.guard = NonFiniteGuard(max_skipped=self.n_batches)
        self.epoch, self.position = 0, 0
        self.at_boundary = True  # False while a batch or an epoch's end is half done
        self.metrics: List[Dict[str, Any]] = []
        self.loss_sum, self.loss_count, self.epoch_time, self.elapsed = 0.0, 0, 0.0, 0.0
        self.status, self.message = "completed", ""
        self.resumed_from: Optional[Tuple[int, int]] = None
        self.initial_rnn: Dict[str, Tensor] = {}

    def start(self) -> None:
        """Restore the checkpoint of the folder, or write the config of a new run."""
        if self.ckpt_path.exists():
            ckpt = load_run_checkpoint(self.ckpt_path, self.config)
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            restore_progress(self, ckpt)
        else:
            self.initial_rnn = begin_run(self.run_dir, self.config, self.derived, self.model)
            self.save()  # the initial state: the last good one until an epoch ends
        open_metrics(self)

    def save(self, result: Optional[Dict[str, Any]] = None) -> None:
        save_checkpoint(self.ckpt_path, kind="task", arch=self.arch, config=self.config.to_dict(),
                        model=self.model.state_dict(),
                        **checkpoint_payload(self, self.optimizer.state_dict(), result))

    def train_epoch(self, interrupt: GracefulInterrupt) -> None:
        """Train the rest of the current epoch, batch by batch (stops early when diverged)."""
        config, task = self.config, self.task
        order = torch.randperm(len(self.train_set), generator=_generator(config.seed, f"shuffle/{self.epoch}"))
        order = order.to(self.device)
        bar = _progress(self.options.progress, self.n_batches, self.position, self.epoch, config.epochs)
        try:
            while self.position < self.n_batches:
                index = order[self.position * config.batch_size:(self.position + 1) * config.batch_size]
                x, y = model_batch(self.train_set, index, self.device)
                self.at_boundary = False
                self.optimizer.zero_grad(set_to_none=True)
                loss = task.loss(self.model(x), y, config.loss)
                value = loss.item()
                where = f"epoch {self.epoch + 1}, batch {self.position + 1}"
                try:
                    self.guard.check_loss(value, "training loss", where)
                    loss.backward()
                    # Keras' rule (.rules): an overflowing norm zeroes every gradient, and the
                    # guard then skips the step, so no tensor and no optimizer state moves.
                    clipped = rules.clip_gradients_([p.grad for p in self.params if p.grad is not None],
                                                    config.clip, config.clip_mode)
                    if self.guard.allow_step(float(clipped.norm), where):
                        self.optimizer.step()
                except Diverged as exc:
                    diverge(self, f"{exc}; the run stopped")
                    return
                self.loss_sum += value * len(index)
                self.loss_count += len(index)
                self.position += 1
                self.at_boundary = True
                if bar is not None:
                    bar.update(1)
                    if self.position % 50 == 0:
                        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                if self.on_batch is not None:
                    self.on_batch(self.epoch, self.position - 1, value)
                if interrupt.requested:
                    raise KeyboardInterrupt
        finally:
            if bar is not None:
                bar.close()

    def end_epoch(self, seconds: float) -> None:
        """Validate, record the epoch's metrics row, and decide whether the run goes on."""
        self.at_boundary = False
        val = evaluate(self.model, self.task, self.val_set, self.device, self.options.eval_batch_size,
                       self.config.loss)
        self.epoch_time += seconds
        self.elapsed += seconds
        goes_on = close_epoch(self, val, self.baseline)
        self.at_boundary = True  # (a second Ctrl-C inside the save keeps the last checkpoint)
        if goes_on:
            self.save()

    def finish(self) -> Dict[str, Any]:
        """Write the result (and the checkpoint holding it); the run is finished."""
        result = run_result(self.task, self, self.baseline)
        write_result(self.run_dir, result, self.save)
        return result

    def fit(self) -> Dict[str, Any]:
        """Train until the epoch limit, convergence or divergence; returns the result. Ctrl-C
        saves a checkpoint that resumes exactly and re-raises KeyboardInterrupt."""
        interrupt = GracefulInterrupt("interrupt: saving a checkpoint after this batch (Ctrl-C again to abort)")
        t0 = time.perf_counter()
        with interrupt:
            try:
                while self.epoch < self.config.epochs and self.status == "completed":
                    t0 = time.perf_counter()
                    self.train_epoch(interrupt)
                    if self.status != "completed":
                        break
                    self.end_epoch(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    if interrupt.requested:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                dt = time.perf_counter() - t0
                self.epoch_time += dt
                self.elapsed += dt
                if self.at_boundary:
                    self.save()
                    logger.warning("%s: interrupted at epoch %d, batch %d; checkpoint saved", self.run_dir,
                                   self.epoch + 1, self.position)
                else:  # a second Ctrl-C inside a batch: the weights may be half updated
                    logger.warning("%s: aborted in the middle of epoch %d; the checkpoint keeps the "
                                   "last saved state", self.run_dir, self.epoch + 1)
                raise
        return self.finish()


def run_facts(task: Task, config: TaskConfig, facts: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A run's derived facts (stored with its config and in its checkpoint) from the ``facts`` of
    its data sets, and the extra checkpoint entries (psMNIST: the pixel permutation)."""
    baseline = task.baseline(config)
    derived = {"seq_len": task.seq_len(config), "baseline": baseline,
               "success_below": SUCCESS_FRACTION * baseline, "input_size": task.input_size,
               "output_size": task.output_size, "readout": task.readout, **facts}
    extra_state = {}
    if "permutation" in facts:
        extra_state["permutation"] = torch.tensor(facts["permutation"], dtype=torch.int64)
    return derived, extra_state


def load_run_checkpoint(ckpt_path: Path, config: TaskConfig) -> Dict[str, Any]:
    """The checkpoint of the run of ``config``; :class:`RunConflict` if another config saved it
    (the epoch limit may have been raised since, :func:`extend_run`; everything else must agree)."""
    ckpt = load_checkpoint(ckpt_path, kind="task")
    stored = {**config_from_dict(ckpt["config"]).to_dict(), "epochs": config.epochs}
    if stored != config.to_dict():
        diff = "; ".join(differences(flat_dict(stored), flat_dict(config.to_dict())))
        raise RunConflict(f"{ckpt_path} was saved by another config ({diff})")
    return ckpt


def restore_progress(run, ckpt: Mapping[str, Any]) -> None:
    """Set the progress of ``run`` (a :class:`Trainer` or an ensemble member) from its checkpoint:
    position, metrics, running loss, non-finite streak, times, initial weights."""
    run.initial_rnn = ckpt["initial_rnn"]
    run.epoch, run.position = int(ckpt["epoch"]), int(ckpt["batch"])
    run.metrics = list(ckpt["metrics"])
    run.loss_sum, run.loss_count = float(ckpt["train_loss_sum"]), int(ckpt["train_count"])
    # schema 1 kept only the streak of overflowing batches
    run.guard.load(ckpt.get("non_finite") or {"streak": ckpt.get("overflow_streak", 0)})
    run.epoch_time, run.elapsed = float(ckpt["epoch_time"]), float(ckpt["elapsed"])
    run.resumed_from = (run.epoch, run.position)
    logger.info("%s: resuming at epoch %d, batch %d", run.run_dir, run.epoch + 1, run.position)


def begin_run(run_dir: Path, config: TaskConfig, derived: Dict[str, Any],
              model: nn.Module) -> Dict[str, Tensor]:
    """Write the config file of a new run; returns its initial recurrent weights (kept in every
    checkpoint)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG_FILE, {"config": config.to_dict(), "derived": derived,
                                       "arch": arch_of(config)})
    return {f"rnn.{k}": v.detach().cpu().clone() for k, v in model.rnn.state_dict().items()}


def open_metrics(run) -> None:
    """Rewrite the run's metrics file to its rows (a resumed run: its checkpoint's) and mark a run
    whose last epoch reached the stopping loss as converged."""
    run.metrics_log.reset(run.metrics)
    if run.metrics and run.metrics[-1]["val_loss"] < run.config.stop_loss:
        run.status = "converged"


def diverge(run, message: str) -> None:
    """End ``run`` (a :class:`Trainer` or an ensemble member) as diverged, with ``message``."""
    run.status, run.message = "diverged", f"{message} (lr {run.config.lr:g} or the init gain too high?)"
    logger.warning("%s: %s", run.run_dir, run.message)


def close_epoch(run, val: Dict[str, float], baseline: float) -> bool:
    """Record the epoch that ``run`` (a :class:`Trainer` or an ensemble member) has just trained
    and validated (``val``: ``loss``, and ``acc`` where the task has one): its metrics row, the
    step to the next epoch, and the verdict. Returns whether the run goes on (then the caller
    saves its checkpoint); a non-finite or absurd validation loss ends it as diverged."""
    row = {"epoch": run.epoch + 1, "train_loss": run.loss_sum / max(run.loss_count, 1),
           "val_loss": val["loss"], "time": run.epoch_time, "elapsed": run.elapsed}
    if "acc" in val:
        row["val_acc"] = val["acc"]
    run.metrics.append(row)
    run.metrics_log.append(row)
    logger.info("%s epoch %d/%d: train %.5f, val %.5f (baseline %.5f)%s, %.1f s",
                run.run_dir.name, run.epoch + 1, run.config.epochs, row["train_loss"],
                row["val_loss"], baseline, f", acc {val['acc']:.4f}" if "acc" in val else "",
                run.epoch_time)
    run.epoch, run.position = run.epoch + 1, 0
    run.loss_sum, run.loss_count, run.epoch_time = 0.0, 0, 0.0
    try:
        run.guard.check_loss(val["loss"], "validation loss", f"epoch {run.epoch}",
                             limit=DIVERGED_FACTOR * baseline)
    except Diverged as exc:
        diverge(run, str(exc))
        return False
    if val["loss"] < run.config.stop_loss:
        run.status = "converged"
    return run.status == "completed" and run.epoch < run.config.epochs


def checkpoint_payload(run, optimizer_state: Dict[str, Any],
                       result: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The checkpoint entries of a run's state besides its config, arch and model. ``run`` is a
    :class:`Trainer` or an ensemble member (:class:`.ensemble.Member`): both keep these fields
    under the same names, so both write the same checkpoint."""
    payload = dict(optimizer=optimizer_state, epoch=run.epoch, batch=run.position,
                   best_val=min((m["val_loss"] for m in run.metrics), default=None),
                   rng=rng_state(), metrics=run.metrics, initial_rnn=run.initial_rnn,
                   train_loss_sum=run.loss_sum, train_count=run.loss_count,
                   non_finite=run.guard.state(), epoch_time=run.epoch_time, elapsed=run.elapsed,
                   derived={k: v for k, v in run.derived.items() if k != "permutation"},
                   **run.extra_state)
    if result is not None:
        payload["result"] = result
    return payload


def run_result(task: Task, run, baseline: float) -> Dict[str, Any]:
    """The result of a run that ended (``run``: a :class:`Trainer` or an ensemble member, with
    its ``metrics`` rows, ``status`` and ``message``)."""
    metrics, status = run.metrics, run.status
    final = metrics[-1]["val_loss"] if metrics and status != "diverged" else None
    result = {
        "status": status,
        "final_val_loss": final,
        "min_val_loss": min((m["val_loss"] for m in metrics if math.isfinite(m["val_loss"])), default=None),
        "baseline": baseline,
        "success": task.success(final, baseline),
        "epochs_run": len(metrics),
        "time": sum(m["time"] for m in metrics),
    }
    if task.classification and task.readout == "last":
        result["val_acc"] = metrics[-1].get("val_acc") if metrics and status != "diverged" else None
    if run.message:
        result["message"] = run.message
    return result


def write_result(run_dir: Path, result: Dict[str, Any],
                 save: Callable[[Dict[str, Any]], None]) -> None:
    """Finish a run: its checkpoint gets ``result`` (``save(result)``; a diverged run's keeps its
    last good state, :func:`keep_last_good`), then ``RESULT_FILE`` is written."""
    if result["status"] == "diverged":
        keep_last_good(run_dir / CHECKPOINT_FILE, result)
    else:
        save(result)
    write_json(run_dir / RESULT_FILE, result)


def keep_last_good(ckpt_path: Path, result: Dict[str, Any]) -> None:
    """Add a diverged run's ``result`` to its checkpoint as it is: the weights in memory are the
    diverged ones, the checkpoint holds the last good state."""
    ckpt = load_checkpoint(ckpt_path, kind="task")
    extra = {k: v for k, v in ckpt.items()
             if k not in ("format", "version", "kind", "arch", "config", "model")}
    extra["result"] = result
    save_checkpoint(ckpt_path, kind="task", arch=ckpt["arch"], config=ckpt["config"],
                    model=ckpt["model"], **extra)


def train(config: TaskConfig, out_dir: Union[str, Path], options: RunOptions = RunOptions(), *,
          on_batch: Optional[BatchHook] = None) -> RunOutcome:
    """Train (or finish, or just report) the run ``config`` in ``out_dir``.

    * ``out_dir`` has a ``result.json`` of the same config: nothing is trained (``skipped``).
    * ``out_dir`` has a checkpoint of the same config: training continues from it, exactly.
    * ``out_dir`` has another config: :class:`RunConflict`.

    A run that diverges (:mod:`awd_nonnormal.runs`) ends as ``diverged`` (not successful) with a
    message in the result. Ctrl-C (SIGINT) stops after the current batch, saves a checkpoint that
    resumes exactly and re-raises :class:`KeyboardInterrupt`. ``on_batch(epoch, batch, loss)``
    is called after every batch (0-based epoch and batch; for tests and tools).

    The data's fingerprint joins the config first (:func:`identify_data`); the folder is locked
    for the whole call (:class:`~awd_nonnormal.runs.RunLocked` if another process has it), and
    temporary files that a killed write left in it are removed.
    """
    run_dir = Path(out_dir)
    config = identify_data(config, options)
    with run_lock(run_dir):
        remove_stale_temporaries(run_dir)
        config = check_run_dir(run_dir, config)
        done = read_result(run_dir)
        if done is not None:
            logger.info("%s: finished before (%s); not redone", run_dir, done.get("status"))
            return RunOutcome(run_dir, done, skipped=True, metrics=read_metrics(run_dir))
        trainer = Trainer(config, run_dir, options, on_batch)
        trainer.start()
        result = trainer.fit()
    return RunOutcome(run_dir, result, resumed_from=trainer.resumed_from, metrics=trainer.metrics)


def _progress(enabled: bool, total: int, initial: int, epoch: int, epochs: int):
    return progress_bar(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}",
                        unit="batch", enabled=enabled, leave=False, dynamic_ncols=True)
