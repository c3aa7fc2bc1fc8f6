"""What a task run is: :class:`TaskConfig` (its identity), :class:`RunOptions` (how to run it),
and the task registry (:data:`TASKS`): copy, addition and psMNIST (Orhan & Pitkow 2020,
section 3.1.1).

A task is one registry entry: a :class:`Task` subclass that knows its model's shape, its loss,
its random baseline, its data and which settings apply to it (:meth:`Task.settle`). Adding a task
means adding one entry; :func:`make_config` asks the task to check its own settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor

from ..data import DataError
from ..init import INIT_PARAMS, InitOptions, check_init
from ..rnn import NONLINEARITIES
from ..runs import RunExistsError
from . import data as D
from . import rules
from .data import generator as _generator

__all__ = [
    "TaskError", "TaskDataError", "RunConflict", "TaskConfig", "RunOptions", "Task", "CopyTask", "AdditionTask",
    "PsMnistTask", "TASKS", "get_task", "make_config", "config_from_dict", "upgrade_config_dict", "LEGACY_SETTINGS", "CLIP_MODES",
    "PERM_SEED_RUN", "MNIST_VALIDATION", "SUCCESS_FRACTION", "DEFAULT_INIT", "positive_int",
]

CLIP_MODES = rules.CLIP_MODES
PERM_SEED_RUN = "run"
MNIST_VALIDATION = ("test", "holdout")
#: A run succeeds when its final validation loss is below this fraction of the random baseline.
SUCCESS_FRACTION = 0.5
#: The tasks' initializer when none is given; task models always get zero recurrent biases.
DEFAULT_INIT = InitOptions(spec="chain", zero_bias=True)


class TaskError(ValueError):
    """A bad task setting (unknown task, invalid value); the message says what is valid."""


class TaskDataError(TaskError, DataError):
    """A run folder or data set that cannot be used as asked (no run to resume, a run made on
    other data): a data error (exit status 1), as the language model's
    :class:`~awd_nonnormal.data.DataError`."""


#: The run-exists error under its former task-side name.
RunConflict = RunExistsError


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskConfig:
    """Everything that defines a task run (and so its folder's identity). Build it with
    :func:`make_config`, which fills the task's defaults and checks every value."""
    task: str = "copy"
    init: InitOptions = DEFAULT_INIT      # spec, params, zero biases (always), plug-ins
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
    clip_mode: str = "global"              # Keras 2.2 clipnorm: one norm over all gradients
    biases: int = 1                        # trainable RNN biases: 1 (Keras SimpleRNN) or 2 (PyTorch)
    loss: str = "exact"                    # exact cross-entropy, or "keras" (clipped softmax)
    stop_loss: float = 0.0025
    copy_layout: Optional[str] = None      # copy only: paper | arjovsky
    perm_seed: Optional[Union[int, str]] = None  # psMNIST only: an int, or "run" (= seed)
    mnist_val: Optional[str] = None        # psMNIST only: test | holdout
    data_fingerprint: Optional[str] = None  # psMNIST only: the IDX files' content (mnist_fingerprint)

    def __post_init__(self) -> None:
        init = InitOptions.from_dict(self.init)
        object.__setattr__(self, "init", dataclasses.replace(init, zero_bias=True))

    def init_params(self) -> Dict[str, float]:
        """The initializer parameters that were given (``scale``, ``alpha``, ``beta``, ``eps``)."""
        return dict(self.init.params)

    def resolved_perm_seed(self) -> Optional[int]:
        if self.perm_seed is None:
            return None
        return self.seed if self.perm_seed == PERM_SEED_RUN else int(self.perm_seed)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON data (the init options nested, tuples as lists)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["init"] = self.init.to_dict()
        return json.loads(json.dumps(d))


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

    def settle(self, c: Dict[str, Any]) -> None:
        """Fill in and check the task's own settings in the config dict ``c`` (``T`` and the
        task-specific ones); settings of other tasks are dropped, so equal runs get equal
        configs. Raises :class:`TaskError`."""
        c["T"] = positive_int("T", self.default_T if c.get("T") is None else c["T"])
        c["copy_layout"] = c["perm_seed"] = c["mnist_val"] = c["data_fingerprint"] = None

    def fingerprint(self, config: "TaskConfig", options: "RunOptions") -> Optional[str]:
        """The identity of the data the run reads from outside (None: the data are generated
        from the run seed, so the config alone decides them)."""
        return None

    def seq_len(self, config: TaskConfig) -> int:
        """Number of steps the network runs."""
        return int(config.T)

    def baseline(self, config: TaskConfig) -> float:
        """Loss of the random (memoryless) baseline model."""
        raise NotImplementedError

    def success(self, val_loss: Optional[float], baseline: float) -> bool:
        """Paper's criterion: final validation loss below 50 % of the random baseline."""
        return val_loss is not None and math.isfinite(val_loss) and val_loss < SUCCESS_FRACTION * baseline

    def loss(self, output: Tensor, target: Tensor, kind: str = "exact") -> Tensor:
        """Mean loss of a batch: cross-entropy over every read-out step (``kind`` ``exact`` or
        ``keras``, see :func:`.rules.classification_loss`), or MSE."""
        if self.classification:
            return rules.classification_loss(output, target, kind).mean()
        return F.mse_loss(output.squeeze(-1), target)

    def datasets(self, config: TaskConfig, options: RunOptions) -> Tuple[Any, Any, Dict[str, Any]]:
        """Training and validation sets, and facts to record (e.g. the permutation)."""
        raise NotImplementedError


class CopyTask(Task):
    def settle(self, c: Dict[str, Any]) -> None:
        layout = c.get("copy_layout") or "paper"
        super().settle(c)
        if layout not in D.COPY_LAYOUTS:
            raise TaskError(f"unknown copy layout {layout!r}; valid: {', '.join(D.COPY_LAYOUTS)}")
        c["copy_layout"] = layout
        try:
            D.copy_total_length(c["T"], layout)
        except ValueError as exc:
            raise TaskError(str(exc)) from None

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
    def settle(self, c: Dict[str, Any]) -> None:
        super().settle(c)
        if c["T"] < 2:
            raise TaskError(f"addition needs T >= 2, got {c['T']}")

    def baseline(self, config: TaskConfig) -> float:
        return D.addition_baseline()

    def datasets(self, config, options):
        train = D.AdditionSet.generate(config.n_train, config.T, _generator(config.seed, "train"))
        val = D.AdditionSet.generate(config.n_val, config.T, _generator(config.seed, "val"))
        return train, val, {}


class PsMnistTask(Task):
    def settle(self, c: Dict[str, Any]) -> None:
        if c.get("T") not in (None, D.MNIST_PIXELS):
            raise TaskError(f"task {self.name} has a fixed length of {D.MNIST_PIXELS} steps; "
                            f"--T does not apply")
        perm_seed, mnist_val, data = c.get("perm_seed"), c.get("mnist_val"), c.get("data_fingerprint")
        super().settle({**c, "T": D.MNIST_PIXELS})
        c["data_fingerprint"] = data
        c["T"], c["copy_layout"] = D.MNIST_PIXELS, None
        c["perm_seed"] = _parse_perm_seed(perm_seed)
        c["mnist_val"] = mnist_val or "test"
        if c["mnist_val"] not in MNIST_VALIDATION:
            raise TaskError(f"unknown psMNIST validation split {c['mnist_val']!r}; "
                            f"valid: {', '.join(MNIST_VALIDATION)}")

    def seq_len(self, config: TaskConfig) -> int:
        return D.MNIST_PIXELS

    def fingerprint(self, config, options):
        splits = ("train", "t10k") if config.mnist_val == "test" else ("train",)
        return D.mnist_fingerprint(options.mnist_dir, splits)

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


# --------------------------------------------------------------------------------------------
# Building and checking a config
# --------------------------------------------------------------------------------------------

def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an integer >= 1, else a :class:`TaskError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaskError(f"{name} must be a positive integer, got {value!r}")
    return value


def _is_zero(value: Any) -> bool:
    try:
        return float(value) == 0
    except (TypeError, ValueError):
        return False


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


#: Keyword shorthands of :func:`make_config` for the init options (and the flat keys of
#: config.json files written before the init options were nested).
_INIT_KEYS = tuple(f"init_{k}" for k in INIT_PARAMS) + ("init_plugins",)


def _init_options(c: Dict[str, Any]) -> InitOptions:
    """Pop the init settings from ``c``: ``init`` (a spec, an InitOptions or its dict) and the
    flat ``init_scale``, ``init_alpha``, ``init_beta``, ``init_eps``, ``init_plugins``."""
    init = c.pop("init", None)
    base = InitOptions.from_dict(DEFAULT_INIT if init is None else init)  # "" is an error, not the default
    params = dict(base.params)
    for k in INIT_PARAMS:
        value = c.pop(f"init_{k}", None)
        if value is not None:
            params[k] = value
    plugins = c.pop("init_plugins", None)
    return InitOptions(spec=base.spec, params=params, zero_bias=True,
                       plugins=tuple(plugins) if plugins is not None else base.plugins)


def make_config(**kwargs: Any) -> TaskConfig:
    """A checked :class:`TaskConfig` with the task's defaults filled in.

    ``init`` may be a spec string, an :class:`~awd_nonnormal.init.InitOptions` or its dict; the
    shorthands ``init_scale``, ``init_alpha``, ``init_beta``, ``init_eps`` and ``init_plugins``
    set its parameters and plug-ins. Settings that do not apply to the task are dropped (see
    :meth:`Task.settle`). Raises :class:`TaskError` (or the init module's ``InitSpecError``)
    naming the bad value.
    """
    names = {f.name for f in dataclasses.fields(TaskConfig)} | set(_INIT_KEYS)
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TaskError(f"unknown task setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    task = get_task(kwargs.get("task", TaskConfig.task))
    c = dict(kwargs, task=task.name)
    try:
        init = _init_options(c)
    except ValueError as exc:
        raise TaskError(str(exc)) from None
    task.settle(c)
    c["hidden"] = positive_int("hidden", task.hidden if c.get("hidden") is None else c["hidden"])
    nl = task.nonlinearity if c.get("nonlinearity") is None else c["nonlinearity"]
    if nl not in NONLINEARITIES:
        raise TaskError(f"unknown nonlinearity {nl!r}; valid: {', '.join(NONLINEARITIES)}")
    c["nonlinearity"] = nl

    for name in ("n_train", "n_val", "epochs", "batch_size"):
        if name in c:
            c[name] = positive_int(name.replace("_", "-"), c[name])
    if "clip" in c and _is_zero(c["clip"]):  # --clip 0: no clipping, as for language models
        if c.get("clip_mode", "none") != "none":
            raise TaskError(f"--clip 0 means no clipping, which is --clip-mode none, not "
                            f"{c['clip_mode']!r}; give a clip > 0 for that mode")
        c["clip"], c["clip_mode"] = 0.0, "none"
    for name in ("lr", "clip", "opt_eps"):
        if name in c and not (name == "clip" and c["clip"] == 0.0):
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
    if c.get("clip_mode", TaskConfig.clip_mode) not in CLIP_MODES:
        raise TaskError(f"unknown clip mode {c['clip_mode']!r}; valid: {', '.join(CLIP_MODES)}")
    if c.get("biases", TaskConfig.biases) not in rules.BIASES:
        raise TaskError(f"biases must be one of {', '.join(map(str, rules.BIASES))}, got {c['biases']!r}")
    if c.get("loss", TaskConfig.loss) not in rules.LOSSES:
        raise TaskError(f"unknown loss {c['loss']!r}; valid: {', '.join(rules.LOSSES)}")
    if c.get("loss", TaskConfig.loss) != "exact" and not task.classification:
        raise TaskError(f"--loss {c['loss']} applies to the classification tasks "
                        f"({', '.join(n for n, t in TASKS.items() if t.classification)}); "
                        f"{task.name} uses the mean squared error")
    config = TaskConfig(**c, init=init)
    check_init(config.init, "RNN")
    return config


#: Settings that configs stored before they existed were run with (two trainable biases, the
#: exact loss); such a config reads as if it named them.
LEGACY_SETTINGS: Dict[str, Any] = {"biases": 2, "loss": "exact"}


def upgrade_config_dict(d: Mapping[str, Any]) -> Dict[str, Any]:
    """A stored config dict with the settings it predates filled in as it ran (:data:`LEGACY_SETTINGS`)."""
    return {**LEGACY_SETTINGS, **d}


def config_from_dict(d: Mapping[str, Any]) -> TaskConfig:
    """Rebuild a :class:`TaskConfig` from its stored dict (``config.json`` or a checkpoint),
    including those written before the init options were nested (flat ``init_*`` keys) or before
    the rule settings existed (:data:`LEGACY_SETTINGS`)."""
    names = {f.name for f in dataclasses.fields(TaskConfig)} | set(_INIT_KEYS)
    c = {k: v for k, v in upgrade_config_dict(d).items() if k in names}
    init = _init_options(c)
    return TaskConfig(**c, init=init)
