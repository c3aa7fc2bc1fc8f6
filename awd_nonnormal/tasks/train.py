"""Training one model on one synthetic task (Orhan & Pitkow 2020, section 3.1.1; SPEC.md section 4).

The model is one vanilla :class:`~awd_nonnormal.rnn.RNN` layer and a linear read-out, initialised
with :func:`~awd_nonnormal.init.apply_init` (zero biases) and trained with RMSprop (rho 0.9,
eps 1e-7: the Keras defaults of the paper's code), gradient-norm clipping at 10, batch 16, up to
100 epochs, stopping early once the validation loss falls below 0.0025. A run succeeds when its
final validation loss is below half of the task's random baseline.

A run lives in its own folder::

    config.json     the TaskConfig and what follows from it (sequence length, baseline, permutation)
    metrics.jsonl   one line per epoch: train and validation loss (and accuracy), times
    checkpoint.pt   the awd-nonnormal checkpoint (kind "task"), rewritten after every epoch
    result.json     written last: the run is finished when this file exists

Everything random is drawn from generators seeded from the run seed (:func:`derive_seed`): the
initial weights, the training and validation sets (generated once, as the paper did), and the
shuffling of each epoch (seeded by the epoch). So a run stopped after any batch and resumed from
its checkpoint continues exactly as if it had not stopped.
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
import torch.nn.functional as F
from torch import Tensor, nn

from .. import init as initmod
from ..checkpoint import atomic_write, load_checkpoint, rng_state, save_checkpoint
from ..rnn import NONLINEARITIES, RNN
from ..utils import GracefulInterrupt, resolve_device
from . import data as D

logger = logging.getLogger(__name__)

__all__ = [
    "TaskError", "RunConflict", "Task", "TASKS", "get_task", "TaskConfig", "RunOptions",
    "make_config", "TaskModel", "build_model", "derive_seed", "run_name", "train", "RunOutcome",
    "read_result", "read_metrics", "is_finished", "stored_config", "config_from_dict", "check_init",
    "evaluate", "CLIP_MODES", "PERM_SEED_RUN", "MNIST_VALIDATION",
    "extend_run", "SUCCESS_FRACTION", "CONFIG_FILE", "METRICS_FILE", "CHECKPOINT_FILE", "RESULT_FILE",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
RESULT_FILE = "result.json"

CLIP_MODES = ("tensor", "global", "none")
PERM_SEED_RUN = "run"
MNIST_VALIDATION = ("test", "holdout")
#: A run succeeds when its final validation loss is below this fraction of the random baseline.
SUCCESS_FRACTION = 0.5


class TaskError(ValueError):
    """A bad task setting (unknown task, invalid value); the message says what is valid."""


class RunConflict(TaskError):
    """A run folder that holds a different run than the one asked for."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskConfig:
    """Everything that defines a task run (and so its folder's identity). Build it with
    :func:`make_config`, which fills the task's defaults and checks every value."""
    task: str = "copy"
    init: str = "chain"                    # an init spec (awd_nonnormal.init)
    init_scale: Optional[float] = None     # the initializer's gain: chain alpha, identity lambda
    init_alpha: Optional[float] = None
    init_beta: Optional[float] = None
    init_eps: Optional[float] = None
    init_plugins: Tuple[str, ...] = ()
    lr: float = 1e-4
    seed: int = 1
    T: Optional[int] = None                # copy: total length (paper layout); psMNIST: 784
    hidden: Optional[int] = None           # N; task default 100 (copy, addition) or 25 (psMNIST)
    nonlinearity: Optional[str] = None     # task default: elu (copy, psMNIST), relu (addition)
    n_train: int = 60_000
    n_val: int = 10_000
    epochs: int = 100
    batch_size: int = 16
    rho: float = 0.9                       # RMSprop decay (torch's alpha); Keras default
    opt_eps: float = 1e-7                  # RMSprop epsilon; Keras default
    clip: float = 10.0
    clip_mode: str = "tensor"              # Keras clipnorm clips each gradient tensor
    stop_loss: float = 0.0025
    copy_layout: Optional[str] = None      # copy only: paper | arjovsky
    perm_seed: Optional[Union[int, str]] = None  # psMNIST only: an int, or "run" (= seed)
    mnist_val: Optional[str] = None        # psMNIST only: test | holdout

    def init_params(self) -> Dict[str, float]:
        """The initializer parameters that were given (``scale``, ``alpha``, ``beta``, ``eps``)."""
        given = {"scale": self.init_scale, "alpha": self.init_alpha, "beta": self.init_beta,
                 "eps": self.init_eps}
        return {k: v for k, v in given.items() if v is not None}

    def resolved_perm_seed(self) -> Optional[int]:
        if self.perm_seed is None:
            return None
        return self.seed if self.perm_seed == PERM_SEED_RUN else int(self.perm_seed)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON data (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what): none of this changes the result beyond rounding."""
    device: str = "auto"
    progress: bool = True
    mnist_dir: str = "data/mnist"
    eval_batch_size: int = 500


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """A synthetic task: the model's shape, its loss, its random baseline and its data."""
    name: str
    description: str
    input_size: int
    output_size: int
    hidden: int
    nonlinearity: str
    readout: str                # "all" steps (copy) or the "last" step
    default_T: Optional[int]    # None: fixed length
    classification: bool

    def seq_len(self, config: TaskConfig) -> int:
        """Number of steps the network runs."""
        return int(config.T)

    def baseline(self, config: TaskConfig) -> float:
        """Loss of the random (memoryless) baseline model."""
        raise NotImplementedError

    def success(self, val_loss: Optional[float], baseline: float) -> bool:
        """Paper's criterion: final validation loss below 50 % of the random baseline."""
        return val_loss is not None and math.isfinite(val_loss) and val_loss < SUCCESS_FRACTION * baseline

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean loss of a batch: cross-entropy over every read-out step, or MSE."""
        if self.classification:
            return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
        return F.mse_loss(output.squeeze(-1), target)

    def datasets(self, config: TaskConfig, options: RunOptions) -> Tuple[Any, Any, Dict[str, Any]]:
        """Training and validation sets, and facts to record (e.g. the permutation)."""
        raise NotImplementedError


class CopyTask(Task):
    def seq_len(self, config: TaskConfig) -> int:
        return D.copy_total_length(int(config.T), config.copy_layout)

    def baseline(self, config: TaskConfig) -> float:
        return D.copy_baseline(int(config.T), config.copy_layout)

    def datasets(self, config, options):
        train = D.CopySet.generate(config.n_train, config.T, _generator(config.seed, "train"),
                                   config.copy_layout)
        val = D.CopySet.generate(config.n_val, config.T, _generator(config.seed, "val"),
                                 config.copy_layout)
        return train, val, {}


class AdditionTask(Task):
    def baseline(self, config: TaskConfig) -> float:
        return D.addition_baseline()

    def datasets(self, config, options):
        train = D.AdditionSet.generate(config.n_train, config.T, _generator(config.seed, "train"))
        val = D.AdditionSet.generate(config.n_val, config.T, _generator(config.seed, "val"))
        return train, val, {}


class PsMnistTask(Task):
    def seq_len(self, config: TaskConfig) -> int:
        return D.MNIST_PIXELS

    def baseline(self, config: TaskConfig) -> float:
        return D.psmnist_baseline()

    def datasets(self, config, options):
        perm = D.pixel_permutation(config.resolved_perm_seed())
        train, val, facts = D.mnist_sets(options.mnist_dir, perm, config.n_train, config.n_val,
                                         config.mnist_val)
        return train, val, {**facts, "perm_seed": config.resolved_perm_seed(),
                            "permutation": perm.tolist()}


#: The task registry: name -> task.
TASKS: Dict[str, Task] = {t.name: t for t in (
    CopyTask("copy", "copy 10 symbols after a long delay (cross-entropy at every step)",
             input_size=D.COPY_SYMBOLS, output_size=D.COPY_CLASSES, hidden=100, nonlinearity="elu",
             readout="all", default_T=500, classification=True),
    AdditionTask("addition", "add the two marked numbers of a sequence (MSE at the last step)",
                 input_size=2, output_size=1, hidden=100, nonlinearity="relu", readout="last",
                 default_T=750, classification=False),
    PsMnistTask("psmnist", "classify permuted MNIST fed one pixel per step",
                input_size=1, output_size=10, hidden=25, nonlinearity="elu", readout="last",
                default_T=None, classification=True),
)}


def get_task(name: Union[str, Task]) -> Task:
    """The task registered as ``name`` (a :class:`Task` is returned as it is)."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaskError(f"{name} must be a positive integer, got {value!r}")
    return value


def _positive_float(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TaskError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise TaskError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _parse_perm_seed(value: Union[int, str, None]) -> Union[int, str]:
    if value is None:
        return D.DEFAULT_PERM_SEED
    if value == PERM_SEED_RUN:
        return PERM_SEED_RUN
    try:
        seed = int(value)
    except (TypeError, ValueError):
        raise TaskError(f"--perm-seed must be a non-negative integer or '{PERM_SEED_RUN}', "
                        f"got {value!r}") from None
    if isinstance(value, bool) or not 0 <= seed < 2 ** 32:
        raise TaskError(f"--perm-seed must be an integer in [0, 2**32) or '{PERM_SEED_RUN}', got {value!r}")
    return seed


def check_init(init: str, params: Mapping[str, float], plugins: Tuple[str, ...] = ()) -> None:
    """Load ``plugins`` and check that ``init`` with ``params`` is a valid spec for a vanilla RNN
    (raises :class:`~awd_nonnormal.init.InitSpecError` listing the valid choices)."""
    for plugin in plugins:
        initmod.load_plugin(plugin)
    initmod.plan(init, "RNN", **params)


def make_config(**kwargs: Any) -> TaskConfig:
    """A checked :class:`TaskConfig` with the task's defaults filled in.

    Settings that do not apply to the task (``copy_layout`` outside copy, ``perm_seed`` and
    ``mnist_val`` outside psMNIST) are dropped, so equal runs get equal configs. Raises
    :class:`TaskError` (or the init module's ``InitSpecError``) naming the bad value.
    """
    names = {f.name for f in dataclasses.fields(TaskConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TaskError(f"unknown task setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    task = get_task(kwargs.get("task", TaskConfig.task))
    c = dict(kwargs, task=task.name)

    if task.default_T is None:
        if c.get("T") not in (None, D.MNIST_PIXELS):
            raise TaskError(f"task {task.name} has a fixed length of {D.MNIST_PIXELS} steps; "
                            f"--T does not apply")
        c["T"] = D.MNIST_PIXELS
    else:
        c["T"] = _positive_int("T", task.default_T if c.get("T") is None else c["T"])
    c["hidden"] = _positive_int("hidden", task.hidden if c.get("hidden") is None else c["hidden"])
    nl = task.nonlinearity if c.get("nonlinearity") is None else c["nonlinearity"]
    if nl not in NONLINEARITIES:
        raise TaskError(f"unknown nonlinearity {nl!r}; valid: {', '.join(NONLINEARITIES)}")
    c["nonlinearity"] = nl

    if task.name == "copy":
        layout = c.get("copy_layout") or "paper"
        if layout not in D.COPY_LAYOUTS:
            raise TaskError(f"unknown copy layout {layout!r}; valid: {', '.join(D.COPY_LAYOUTS)}")
        c["copy_layout"] = layout
        try:
            D.copy_total_length(c["T"], layout)
        except ValueError as exc:
            raise TaskError(str(exc)) from None
    else:
        c["copy_layout"] = None
    if task.name == "addition" and c["T"] < 2:
        raise TaskError(f"addition needs T >= 2, got {c['T']}")
    if task.name == "psmnist":
        c["perm_seed"] = _parse_perm_seed(c.get("perm_seed"))
        c["mnist_val"] = c.get("mnist_val") or "test"
        if c["mnist_val"] not in MNIST_VALIDATION:
            raise TaskError(f"unknown psMNIST validation split {c['mnist_val']!r}; "
                            f"valid: {', '.join(MNIST_VALIDATION)}")
    else:
        c["perm_seed"] = None
        c["mnist_val"] = None

    for name in ("n_train", "n_val", "epochs", "batch_size"):
        if name in c:
            c[name] = _positive_int(name.replace("_", "-"), c[name])
    for name in ("lr", "clip", "opt_eps"):
        if name in c:
            c[name] = _positive_float(name.replace("_", "-"), c[name])
    if "stop_loss" in c:  # 0 never stops early
        c["stop_loss"] = float(c["stop_loss"])
        if not math.isfinite(c["stop_loss"]) or c["stop_loss"] < 0:
            raise TaskError(f"stop-loss must be a finite number >= 0, got {kwargs['stop_loss']!r}")
    if "rho" in c:
        rho = float(c["rho"])
        if not 0 <= rho < 1:
            raise TaskError(f"rho must be in [0, 1), got {c['rho']!r}")
    seed = c.get("seed", TaskConfig.seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TaskError(f"seed must be a non-negative integer, got {seed!r}")
    if c.get("clip_mode", "tensor") not in CLIP_MODES:
        raise TaskError(f"unknown clip mode {c['clip_mode']!r}; valid: {', '.join(CLIP_MODES)}")
    for name in ("init_scale", "init_alpha", "init_beta", "init_eps"):
        if c.get(name) is not None:
            v = float(c[name])
            if not math.isfinite(v):
                raise TaskError(f"{name.replace('_', '-')} must be a finite number, got {c[name]!r}")
            c[name] = v
    c["init_plugins"] = tuple(c.get("init_plugins") or ())
    config = TaskConfig(**c)
    check_init(config.init, config.init_params(), config.init_plugins)
    return config


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class TaskModel(nn.Module):
    """One vanilla RNN layer and a linear read-out of every step (``readout="all"``) or of the
    last step (``"last"``). ``forward(x (T, B, d)) -> (T, B, out)`` or ``(B, out)``."""

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
            h = h[-1]       # (B, N)
        return self.decoder(h)


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one use (``"init"``, ``"train"``, ``"val"``, ``"shuffle/3"``) of a run
    seed, so that the streams are independent and each can be recreated on its own."""
    digest = hashlib.sha256(f"awd-nonnormal/{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def _generator(seed: int, purpose: str, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, purpose))


def arch_of(config: TaskConfig) -> Dict[str, Any]:
    """The checkpoint's ``arch`` entry (CONVENTIONS.md)."""
    task = get_task(config.task)
    return {"rnn_type": "RNN", "nonlinearity": config.nonlinearity, "nlayers": 1,
            "input_size": task.input_size, "hidden_sizes": [config.hidden],
            "output_size": task.output_size, "readout": task.readout}


def build_model(config: TaskConfig) -> TaskModel:
    """The task model, initialised from the run seed: ``apply_init(rnn, spec, zero_bias=True)`` for
    the recurrent layer; the read-out as Keras' ``Dense`` (Glorot-uniform weights, zero bias)."""
    task = get_task(config.task)
    model = TaskModel(task.input_size, config.hidden, task.output_size, config.nonlinearity,
                      task.readout)
    gen = _generator(config.seed, "init")
    initmod.apply_init(model.rnn, config.init, zero_bias=True, generator=gen, **config.init_params())
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
    label = re.sub(r"[^A-Za-z0-9.+-]+", "-", config.init).strip("-")
    for key, value in config.init_params().items():
        label += f"-{key}{_num(value)}"
    return label


def run_name(config: TaskConfig, digest: bool = True) -> str:
    """Folder name of a run: ``<task>-<init>-lr<lr>-seed<seed>``, plus a short hash of the whole
    config with ``digest`` (so that runs that differ in anything else get different folders)."""
    name = f"{config.task}-{init_label(config)}-lr{_num(config.lr)}-seed{config.seed}"
    if digest:
        h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        name += f"-{h}"
    return name


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _write_jsonl(path: Path, rows: List[Mapping[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_result(run_dir: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The finished run's result (``result.json``), or None if the run has not finished."""
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_finished(run_dir: Union[str, Path]) -> bool:
    return read_result(run_dir) is not None


def read_metrics(run_dir: Union[str, Path]) -> List[Dict[str, Any]]:
    """The per-epoch metrics of a run (empty if none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stored_config(run_dir: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The config a run folder was made with (``config.json``), or None."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError) as exc:
        raise RunConflict(f"{path}: unreadable run config ({exc}); remove the folder or choose "
                          f"another --out") from None


def config_from_dict(d: Mapping[str, Any]) -> TaskConfig:
    """Rebuild a :class:`TaskConfig` from its stored dict (``config.json`` or a checkpoint)."""
    names = {f.name for f in dataclasses.fields(TaskConfig)}
    kw = {k: v for k, v in d.items() if k in names}
    kw["init_plugins"] = tuple(kw.get("init_plugins") or ())
    return TaskConfig(**kw)


def extend_run(run_dir: Union[str, Path], epochs: int) -> TaskConfig:
    """Raise the epoch limit of the run in ``run_dir`` to ``epochs``, so that :func:`train` goes on
    training it: a finished run (``completed``) is reopened, an unfinished one gets the new limit.
    A run that converged (stopped early) or diverged has nothing to extend. Returns the new config.
    """
    run_dir = Path(run_dir)
    stored = stored_config(run_dir)
    if stored is None:
        raise TaskError(f"{run_dir} holds no run (no {CONFIG_FILE})")
    epochs = _positive_int("epochs", epochs)
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
    record = json.loads((run_dir / CONFIG_FILE).read_text())
    record["config"] = config.to_dict()
    _write_json(run_dir / CONFIG_FILE, record)
    logger.info("%s: epoch limit raised from %d to %d", run_dir, stored["epochs"], epochs)
    return config


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> List[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def check_run_dir(run_dir: Path, config: TaskConfig) -> None:
    """Raise :class:`RunConflict` if ``run_dir`` holds a run of another config."""
    stored = stored_config(run_dir)
    if stored is not None and stored != config.to_dict():
        diff = "; ".join(_differences(stored, config.to_dict()))
        raise RunConflict(f"{run_dir} holds a run with another config ({diff}); choose another "
                          f"output folder, or continue that run with --resume")


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


def _clip(params: List[Tensor], max_norm: float, mode: str) -> float:
    """Clip the gradients; return the largest norm seen (0 without clipping). An infinite norm
    means the gradient's squared norm overflowed float32: clipping then scales the gradient to
    zero, so the batch changes nothing (Keras' clipnorm does the same, silently)."""
    if mode == "tensor":  # Keras clipnorm: each gradient tensor on its own
        norms = [torch.nn.utils.clip_grad_norm_([p], max_norm) for p in params if p.grad is not None]
        return float(torch.stack(norms).max()) if norms else 0.0
    if mode == "global":
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return 0.0


def evaluate(model: TaskModel, task: Task, dataset, device: torch.device,
             batch_size: int = 500) -> Dict[str, float]:
    """Mean loss over ``dataset`` (and accuracy for classification at the last step)."""
    total, correct, n = 0.0, 0, len(dataset)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(start + batch_size, n), device=device)
            x, y = dataset.batch(index, device)
            out = model(x)
            total += task.loss(out, y).item() * len(index)
            if task.classification and task.readout == "last":
                correct += int((out.argmax(-1) == y).sum())
    metrics = {"loss": total / n}
    if task.classification and task.readout == "last":
        metrics["acc"] = correct / n
    return metrics


def _to_device(dataset, device: torch.device):
    if device.type == "cpu":
        return dataset
    moved = {f.name: (getattr(dataset, f.name).to(device) if isinstance(getattr(dataset, f.name), Tensor)
                      else getattr(dataset, f.name)) for f in dataclasses.fields(dataset)}
    return type(dataset)(**moved)


BatchHook = Callable[[int, int, float], None]


def train(config: TaskConfig, out_dir: Union[str, Path], options: RunOptions = RunOptions(), *,
          on_batch: Optional[BatchHook] = None) -> RunOutcome:
    """Train (or finish, or just report) the run ``config`` in ``out_dir``.

    * ``out_dir`` has a ``result.json`` of the same config: nothing is trained (``skipped``).
    * ``out_dir`` has a checkpoint of the same config: training continues from it, exactly.
    * ``out_dir`` has another config: :class:`RunConflict`.

    A NaN or infinite training loss ends the run as ``diverged`` (not successful) with a message
    in the result. Ctrl-C (SIGINT) stops after the current batch, saves a checkpoint that
    resumes exactly and re-raises :class:`KeyboardInterrupt`. ``on_batch(epoch, batch, loss)``
    is called after every optimizer step (0-based epoch and batch; for tests and tools).
    """
    run_dir = Path(out_dir)
    task = get_task(config.task)
    check_run_dir(run_dir, config)
    done = read_result(run_dir)
    if done is not None:
        logger.info("%s: finished before (%s); not redone", run_dir, done.get("status"))
        return RunOutcome(run_dir, done, skipped=True, metrics=read_metrics(run_dir))

    for plugin in config.init_plugins:
        initmod.load_plugin(plugin)
    device = resolve_device(options.device)
    baseline = task.baseline(config)
    train_set, val_set, facts = task.datasets(config, options)
    train_set, val_set = _to_device(train_set, device), _to_device(val_set, device)
    derived = {"seq_len": task.seq_len(config), "baseline": baseline,
               "success_below": SUCCESS_FRACTION * baseline, "input_size": task.input_size,
               "output_size": task.output_size, "readout": task.readout, **facts}

    model = build_model(config).to(device)
    params = list(model.parameters())
    optimizer = torch.optim.RMSprop(params, lr=config.lr, alpha=config.rho, eps=config.opt_eps)
    arch = arch_of(config)

    ckpt_path = run_dir / CHECKPOINT_FILE
    epoch, position = 0, 0
    metrics: List[Dict[str, Any]] = []
    loss_sum, loss_count, epoch_time, elapsed = 0.0, 0, 0.0, 0.0
    overflow_streak = 0  # batches in a row whose gradient norm overflowed (update zeroed)
    resumed_from = None
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, kind="task")
        # the epoch limit may have been raised since (extend_run); everything else must agree
        if {**ckpt["config"], "epochs": config.epochs} != config.to_dict():
            diff = "; ".join(_differences(ckpt["config"], config.to_dict()))
            raise RunConflict(f"{ckpt_path} was saved by another config ({diff})")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        initial_rnn = ckpt["initial_rnn"]
        epoch, position = int(ckpt["epoch"]), int(ckpt["batch"])
        metrics = list(ckpt["metrics"])
        loss_sum, loss_count = float(ckpt["train_loss_sum"]), int(ckpt["train_count"])
        overflow_streak = int(ckpt.get("overflow_streak", 0))
        epoch_time, elapsed = float(ckpt["epoch_time"]), float(ckpt["elapsed"])
        resumed_from = (epoch, position)
        logger.info("%s: resuming at epoch %d, batch %d", run_dir, epoch + 1, position)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / CONFIG_FILE, {"config": config.to_dict(), "derived": derived,
                                           "arch": arch})
        initial_rnn = {f"rnn.{k}": v.detach().cpu().clone() for k, v in model.rnn.state_dict().items()}

    n_train = len(train_set)
    n_batches = math.ceil(n_train / config.batch_size)
    extra_state = {}
    if "permutation" in facts:
        extra_state["permutation"] = torch.tensor(facts["permutation"], dtype=torch.int64)

    def save(result: Optional[Dict[str, Any]] = None) -> None:
        payload = dict(optimizer=optimizer.state_dict(), epoch=epoch, batch=position,
                       best_val=min((m["val_loss"] for m in metrics), default=None),
                       rng=rng_state(), metrics=metrics, initial_rnn=initial_rnn,
                       train_loss_sum=loss_sum, train_count=loss_count, overflow_streak=overflow_streak,
                       epoch_time=epoch_time,
                       elapsed=elapsed, derived={k: v for k, v in derived.items() if k != "permutation"},
                       **extra_state)
        if result is not None:
            payload["result"] = result
        save_checkpoint(ckpt_path, kind="task", arch=arch, config=config.to_dict(),
                        model=model.state_dict(), **payload)

    status, message = "completed", ""
    if metrics and metrics[-1]["val_loss"] < config.stop_loss:
        status = "converged"
    interrupt = GracefulInterrupt("interrupt: saving a checkpoint after this batch (Ctrl-C again to abort)")
    t0 = time.perf_counter()
    with interrupt:
        try:
            while epoch < config.epochs and status == "completed":
                t0 = time.perf_counter()
                order = torch.randperm(n_train, generator=_generator(config.seed, f"shuffle/{epoch}"))
                order = order.to(device)
                bar = _progress(options.progress, n_batches, position, epoch, config.epochs)
                try:
                    while position < n_batches:
                        index = order[position * config.batch_size:(position + 1) * config.batch_size]
                        x, y = train_set.batch(index, device)
                        optimizer.zero_grad(set_to_none=True)
                        loss = task.loss(model(x), y)
                        value = loss.item()
                        if not math.isfinite(value):
                            status = "diverged"
                            message = (f"training loss became {value} at epoch {epoch + 1}, batch "
                                       f"{position + 1}; the run stopped (lr {config.lr:g} too high?)")
                            logger.warning("%s: %s", run_dir, message)
                            break
                        loss.backward()
                        grad_norm = _clip(params, config.clip, config.clip_mode)
                        # An overflowing norm zeroes this batch's update, as in Keras, and the
                        # run goes on; once a whole epoch's worth of batches in a row did, the
                        # weights have stopped moving for good (the exploded activity stays).
                        overflow_streak = overflow_streak + 1 if not math.isfinite(grad_norm) else 0
                        if overflow_streak >= n_batches:
                            status = "diverged"
                            message = (f"the gradient norm overflowed in {overflow_streak} batches "
                                       f"in a row, up to epoch {epoch + 1}, batch {position + 1} "
                                       f"(training loss {value:.3g}): the activity exploded and "
                                       f"clipping zeroes every update, so the run can no longer "
                                       f"change (lr {config.lr:g} or the init gain too high?)")
                            logger.warning("%s: %s", run_dir, message)
                            break
                        optimizer.step()
                        loss_sum += value * len(index)
                        loss_count += len(index)
                        position += 1
                        if bar is not None:
                            bar.update(1)
                            if position % 50 == 0:
                                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                        if on_batch is not None:
                            on_batch(epoch, position - 1, value)
                        if interrupt.requested:
                            raise KeyboardInterrupt
                finally:
                    if bar is not None:
                        bar.close()
                if status == "diverged":
                    break
                val = evaluate(model, task, val_set, device, options.eval_batch_size)
                dt = time.perf_counter() - t0
                epoch_time += dt
                elapsed += dt
                t0 = time.perf_counter()
                row = {"epoch": epoch + 1, "train_loss": loss_sum / max(loss_count, 1),
                       "val_loss": val["loss"], "time": epoch_time, "elapsed": elapsed}
                if "acc" in val:
                    row["val_acc"] = val["acc"]
                metrics.append(row)
                logger.info("%s epoch %d/%d: train %.5f, val %.5f (baseline %.5f)%s, %.1f s",
                            run_dir.name, epoch + 1, config.epochs, row["train_loss"], row["val_loss"],
                            baseline, f", acc {val['acc']:.4f}" if "acc" in val else "", epoch_time)
                epoch, position = epoch + 1, 0
                loss_sum, loss_count, epoch_time = 0.0, 0, 0.0
                if not math.isfinite(val["loss"]):
                    status, message = "diverged", f"validation loss became {val['loss']} at epoch {epoch}"
                elif val["loss"] < config.stop_loss:
                    status = "converged"
                if status == "completed" and epoch < config.epochs:
                    save()
                    _write_jsonl(run_dir / METRICS_FILE, metrics)
                    if interrupt.requested:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            dt = time.perf_counter() - t0
            epoch_time += dt
            elapsed += dt
            save()
            _write_jsonl(run_dir / METRICS_FILE, metrics)
            logger.warning("%s: interrupted at epoch %d, batch %d; checkpoint saved", run_dir,
                           epoch + 1, position)
            raise

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
    if message:
        result["message"] = message
    save(result)
    _write_jsonl(run_dir / METRICS_FILE, metrics)
    _write_json(run_dir / RESULT_FILE, result)
    return RunOutcome(run_dir, result, resumed_from=resumed_from, metrics=metrics)


def _progress(enabled: bool, total: int, initial: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                leave=False, dynamic_ncols=True)
