"""Hyper-parameter sweeps of the synthetic tasks (Figure 3 of Orhan & Pitkow 2020).

A sweep is a grid (learning rates x seeds x, per model, the values of one initializer parameter)
on top of one set of task settings. Every grid point is one run of :func:`.train.train` in its
own folder ``<out>/<model>/<param><value>-lr<lr>-seed<seed>`` (psMNIST adds ``-data<hex>``,
its data). Runs go to parallel worker processes (spawned, one torch thread each), one by one or,
with ``ensemble``, M at a time as one batched model (:mod:`.ensemble`); a finished run
(``result.json``) is skipped and an interrupted one resumed from its checkpoint, so running the
same sweep again continues it.

The summary follows Figure 3: for each model the best config (lowest validation loss averaged
over seeds: final by default, or minimum) with its loss curve (mean +- s.e.m. over seeds, panels
a-c) and the number of successful runs (final validation loss below half of the random
baseline) out of all runs (panels d-f).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import io
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .. import cli
from .. import init as initmod
from ..analysis import mean_sem
from ..progress import progress_bar
from ..runs import (LOCK_FILE, RunLock, die_with_parent, json_clean, remove_stale_temporaries, write_json,
                    write_text)
from ..utils import parse_number
from . import ensemble as E
from . import train as T
from .config import upgrade_config_dict

logger = logging.getLogger(__name__)

__all__ = ["GridError", "ModelGrid", "Grid", "PAPER_LRS", "PAPER_SEEDS", "PAPER_MODELS",
           "paper_grid", "parse_list", "grid_from_args", "load_grid_file", "plan_sweep",
           "SweepPlan", "run_sweep", "summarize", "format_summary", "format_plan",
           "write_summary", "load_sweep", "check_stored_sweep", "RANK_BY", "GRID_HELP"]

RANK_BY = ("final", "min")
SWEEP_FILE = "sweep.json"

#: Learning rates of the paper's search (section 3.1.1).
PAPER_LRS = (8e-4, 5e-4, 3e-4, 1e-4, 8e-5, 5e-5, 3e-5, 1e-5, 8e-6, 5e-6, 3e-6)
PAPER_SEEDS = (1, 2, 3, 4, 5, 6)
_NORMAL_SCALES = (0.01, 0.96, 0.99, 1.00, 1.01, 1.02, 1.03, 1.04, 1.05)
_STEP_VALUES = lambda lo: tuple(round(lo + 0.01 * k, 2) for k in range(7))  # noqa: E731
#: The models of the paper's search: name -> (swept parameter, values, fixed parameters).
PAPER_MODELS: Dict[str, Tuple[str, Tuple[float, ...], Dict[str, float]]] = {
    "chain": ("alpha", _STEP_VALUES(0.99), {}),
    "fbchain": ("beta", _STEP_VALUES(0.01), {"alpha": 0.99}),
    "identity": ("scale", _NORMAL_SCALES, {}),
    "orthogonal": ("scale", _NORMAL_SCALES, {}),
}
_PARAM_FIELDS = {"scale": "init_scale", "alpha": "init_alpha", "beta": "init_beta", "eps": "init_eps"}
_NAME_RE = re.compile(r"[A-Za-z0-9_.+-]+")

GRID_HELP = """\
grid syntax
  LIST     comma-separated numbers (1e-4,5e-5) or an inclusive range START:STOP[:STEP]
           (0.99:1.05:0.01; seeds 1:6). Every value is checked.
  --values MODEL[.PARAM]=LIST
           the swept initializer parameter of MODEL; PARAM defaults to the model's own
           (chain alpha, fbchain beta, identity/orthogonal scale, others: scale if the
           initializer has a gain). Example: --values chain=1.0,1.02 --values identity=1.0
  --grid FILE.json
           {"lr": [1e-4, 5e-5], "seeds": [1, 2],
            "models": {"chain": {"alpha": [1.0, 1.02]},
                       "fbchain": {"beta": [0.02], "alpha": 0.99},
                       "mine": {"init": "chain,input=normal", "scale": [1.0]}}}
           A model maps parameter names to a list (the swept one, at most one) or a
           number (fixed); "init" is its init spec (default: the model's name).

default grid (the paper's): lr in 8e-4 5e-4 3e-4 1e-4 8e-5 5e-5 3e-5 1e-5 8e-6 5e-6 3e-6,
seeds 1:6, chain alpha 0.99:1.05, fbchain beta 0.01:0.07 (alpha 0.99), identity and
orthogonal scale 0.01,0.96,0.99:1.05: 462 runs per non-normal and 594 per normal model.
"""


class GridError(ValueError):
    """A malformed or invalid grid value; the message names it."""


@dataclass(frozen=True)
class ModelGrid:
    """One model of a sweep: an init spec, its swept parameter (or None) and fixed parameters."""
    name: str
    init: str
    param: Optional[str]
    values: Tuple[float, ...]
    fixed: Tuple[Tuple[str, float], ...] = ()

    def points(self) -> List[Dict[str, float]]:
        """The init parameters of each grid value."""
        fixed = dict(self.fixed)
        if self.param is None:
            return [fixed]
        return [{**fixed, self.param: v} for v in self.values]


@dataclass(frozen=True)
class Grid:
    lrs: Tuple[float, ...]
    seeds: Tuple[int, ...]
    models: Tuple[ModelGrid, ...]

    def size(self, model: ModelGrid) -> int:
        return len(self.lrs) * len(self.seeds) * max(1, len(model.values) if model.param else 1)

    def to_dict(self) -> Dict[str, Any]:
        return {"lr": list(self.lrs), "seeds": list(self.seeds),
                "models": {m.name: {"init": m.init, **dict(m.fixed),
                                    **({m.param: list(m.values)} if m.param else {})}
                           for m in self.models}}


# --------------------------------------------------------------------------------------------
# Parsing and checking grids
# --------------------------------------------------------------------------------------------

def _decimals(text: str) -> int:
    text = text.lower()
    mantissa, _, exponent = text.partition("e")
    places = len(mantissa.partition(".")[2])
    return max(0, places - int(exponent or 0))


def parse_list(text: str, what: str, integer: bool = False) -> Tuple[float, ...]:
    """``"1e-4,5e-5"`` or ``"0.99:1.05:0.01"`` (inclusive) -> a tuple of numbers (ints with
    ``integer``). Raises :class:`GridError` naming ``what`` and the bad item."""
    if not isinstance(text, str) or not text.strip():
        raise GridError(f"{what}: empty list")
    values: List[float] = []
    for item in text.split(","):
        item = item.strip()
        if ":" in item:
            parts = item.split(":")
            if len(parts) not in (2, 3) or not all(parts):
                raise GridError(f"{what}: bad range {item!r}; use START:STOP or START:STOP:STEP")
            start, stop = (_number(p, what, integer) for p in parts[:2])
            step = _number(parts[2], what, integer) if len(parts) == 3 else 1
            if step <= 0:
                raise GridError(f"{what}: range step must be > 0 in {item!r}")
            if stop < start:
                raise GridError(f"{what}: range {item!r} runs backwards")
            places = max(_decimals(p) for p in parts) if not integer else 0
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            if count > 10_000:
                raise GridError(f"{what}: range {item!r} has {count} values; too many")
            values += [int(start + k * step) if integer else round(start + k * step, places + 2)
                       for k in range(count)]
        else:
            values.append(_number(item, what, integer))
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise GridError(f"{what}: value(s) given twice: {', '.join(map(str, dupes))}")
    return tuple(values)


def _number(text: Any, what: str, integer: bool) -> float:
    return parse_number(text, what, integer=integer, error=GridError)


def _as_list(value: Any, what: str, integer: bool = False) -> Tuple[float, ...]:
    if isinstance(value, str):
        return parse_list(value, what, integer)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise GridError(f"{what}: expected a non-empty list of numbers, got {value!r}")
    if integer and any(isinstance(v, float) and not v.is_integer() for v in value):
        raise GridError(f"{what}: expected integers, got {value!r}")
    out = tuple(_number(v, what, integer) for v in value)
    dupes = sorted({v for v in out if out.count(v) > 1})
    if dupes:
        raise GridError(f"{what}: value(s) given twice: {', '.join(map(str, dupes))}")
    return out


def _default_param(init: str) -> Optional[str]:
    """The parameter a model sweeps when the grid does not say: the paper's, else the gain."""
    if init in PAPER_MODELS:
        return PAPER_MODELS[init][0]
    try:
        base = initmod.parse_spec(init).base
        if base is not None and base not in initmod.PRESETS:
            return "scale" if initmod.gain_param(base) else None
        if base in initmod.PRESETS and base in PAPER_MODELS:
            return PAPER_MODELS[base][0]
    except initmod.InitSpecError as exc:
        raise GridError(str(exc)) from None
    return None


def _check_model(model: ModelGrid, plugins: Sequence[str]) -> None:
    """Every grid value must be a valid init for a vanilla RNN."""
    if not _NAME_RE.fullmatch(model.name):
        raise GridError(f"model name {model.name!r}: use letters, digits and . _ + - (it names a folder)")
    if model.param is not None and model.param not in _PARAM_FIELDS:
        raise GridError(f"model {model.name}: cannot sweep {model.param!r}; sweepable init "
                        f"parameters: {', '.join(_PARAM_FIELDS)}")
    for key, _ in model.fixed:
        if key not in _PARAM_FIELDS:
            raise GridError(f"model {model.name}: unknown parameter {key!r}; valid: init, "
                            f"{', '.join(_PARAM_FIELDS)}")
    for params in model.points():
        try:
            initmod.check_init(initmod.InitOptions(model.init, params, plugins=tuple(plugins)), "RNN")
        except (initmod.InitSpecError, ValueError) as exc:
            raise GridError(f"model {model.name}: {exc}") from None


def paper_grid(models: Iterable[str] = tuple(PAPER_MODELS)) -> Grid:
    """The paper's grid (section 3.1.1) for ``models``."""
    out = []
    for name in models:
        param, values, fixed = PAPER_MODELS[name]
        out.append(ModelGrid(name, name, param, values, tuple(fixed.items())))
    return Grid(PAPER_LRS, PAPER_SEEDS, tuple(out))


def load_grid_file(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise GridError(f"grid file {path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise GridError(f"grid file {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GridError(f"grid file {path}: expected a JSON object with lr, seeds, models")
    unknown = sorted(set(data) - {"lr", "seeds", "models"})
    if unknown:
        raise GridError(f"grid file {path}: unknown key(s) {', '.join(unknown)}; valid: lr, seeds, models")
    return data


def _model_from_spec(name: str, spec: Any, where: str) -> ModelGrid:
    if not isinstance(spec, dict):
        raise GridError(f"{where}: model {name!r} must map parameters to values, got {spec!r}")
    spec = dict(spec)
    init = spec.pop("init", name)
    if not isinstance(init, str):
        raise GridError(f"{where}: model {name!r}: 'init' must be an init spec string")
    swept = {k: v for k, v in spec.items() if isinstance(v, (list, str))}
    fixed = {k: v for k, v in spec.items() if k not in swept}
    if len(swept) > 1:
        raise GridError(f"{where}: model {name!r} sweeps {', '.join(swept)}; one parameter per "
                        f"model (add the model twice under two names to sweep another)")
    if swept:
        (param, raw), = swept.items()
        values = _as_list(raw, f"{where}: {name}.{param}")
    else:
        param, values = None, ()
    fixed_t = tuple((k, _number(v, f"{where}: {name}.{k}", False)) for k, v in fixed.items())
    return ModelGrid(name, init, param, values, fixed_t)


def grid_from_args(task: Optional[str] = None, models: Optional[str] = None, lrs: Optional[str] = None,
                   seeds: Optional[str] = None, values: Optional[Sequence[str]] = None,
                   grid_file: Optional[Union[str, Path]] = None,
                   plugins: Sequence[str] = (), grid_data: Optional[Mapping[str, Any]] = None,
                   where: str = "grid") -> Grid:
    """Build and check a grid from the command-line strings (and an optional JSON file, or the
    same data as ``grid_data``, e.g. a stored sweep's grid).

    Precedence: the paper's grid, then the file, then the flags. ``models`` selects and orders
    the models; a model outside the paper's grid sweeps only lr x seeds unless ``values`` gives
    it a list.
    """
    if task is not None:
        T.get_task(task)
    file_data = load_grid_file(grid_file) if grid_file else dict(grid_data or {})
    where = f"grid file {grid_file}" if grid_file else where
    lr_list = _as_list(file_data["lr"], f"{where}: lr") if "lr" in file_data else PAPER_LRS
    seed_list = (_as_list(file_data["seeds"], f"{where}: seeds", integer=True)
                 if "seeds" in file_data else PAPER_SEEDS)
    by_name: Dict[str, ModelGrid] = {}
    if "models" in file_data:
        if not isinstance(file_data["models"], dict) or not file_data["models"]:
            raise GridError(f"{where}: 'models' must be a non-empty object of name -> parameters")
        for name, spec in file_data["models"].items():
            by_name[name] = _model_from_spec(name, spec, where)
    if lrs is not None:
        lr_list = parse_list(lrs, "--lr")
    if seeds is not None:
        seed_list = parse_list(seeds, "--seeds", integer=True)
    if any(v <= 0 for v in lr_list):
        raise GridError(f"learning rates must be > 0, got {', '.join(map(str, lr_list))}")
    if any(s < 0 for s in seed_list):
        raise GridError(f"seeds must be >= 0, got {', '.join(map(str, seed_list))}")

    if models is not None:
        names = [m.strip() for m in models.split(",")]
        if not all(names):
            raise GridError(f"--models: empty name in {models!r}")
        if len(set(names)) != len(names):
            raise GridError(f"--models: a model is named twice in {models!r}")
    else:
        names = list(by_name) or list(PAPER_MODELS)

    def default_model(name: str) -> ModelGrid:
        if name in by_name:
            return by_name[name]
        if name in PAPER_MODELS:
            return paper_grid([name]).models[0]
        if not _NAME_RE.fullmatch(name):
            raise GridError(f"--models: {name!r} is not a model name (letters, digits, . _ + -); "
                            f"use --grid FILE to give a model a full init spec")
        try:
            initmod.check_init(initmod.InitOptions(name, plugins=tuple(plugins)), "RNN")
        except (initmod.InitSpecError, ValueError) as exc:
            raise GridError(f"--models: {exc}") from None
        return ModelGrid(name, name, None, ())

    chosen = {name: default_model(name) for name in names}
    for item in values or ():
        if "=" not in item:
            raise GridError(f"--values {item!r}: use MODEL[.PARAM]=LIST, e.g. chain=1.0,1.02")
        key, text = (s.strip() for s in item.split("=", 1))
        name, _, param = key.partition(".")
        if name not in chosen:
            raise GridError(f"--values {item!r}: model {name!r} is not in the sweep "
                            f"({', '.join(chosen)})")
        model = chosen[name]
        param = param or model.param or _default_param(model.init)
        if param is None:
            raise GridError(f"--values {item!r}: {model.init!r} has no gain parameter; name the "
                            f"parameter as {name}.PARAM=LIST")
        vals = parse_list(text, f"--values {key}")
        fixed = tuple((k, v) for k, v in model.fixed if k != param)
        chosen[name] = ModelGrid(name, model.init, param, vals, fixed)
    grid = Grid(tuple(lr_list), tuple(int(s) for s in seed_list), tuple(chosen.values()))
    for model in grid.models:
        _check_model(model, plugins)
    return grid


# --------------------------------------------------------------------------------------------
# Planning: grid points -> configs and folders
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    model: str
    param: Optional[str]
    value: Optional[float]
    lr: float
    seed: int
    config: T.TaskConfig
    run_dir: Path


@dataclass(frozen=True)
class SweepPlan:
    grid: Grid
    base: Dict[str, Any]
    out: Path
    runs: Tuple[RunSpec, ...]
    baseline: float
    task: str
    settings: Dict[str, Any]  # the task settings shared by every run (recorded in sweep.json)

    def by_model(self) -> Dict[str, List[RunSpec]]:
        out: Dict[str, List[RunSpec]] = {m.name: [] for m in self.grid.models}
        for r in self.runs:
            out[r.model].append(r)
        return out


def _folder(model: ModelGrid, params: Mapping[str, float], lr: float, seed: int,
            data: Optional[str] = None) -> str:
    """A run's folder name; ``data`` (a data fingerprint, psMNIST) adds ``-data<8 hex digits>``
    so that the same grid point on other data trains in a folder of its own."""
    parts = [f"{model.param}{params[model.param]:g}"] if model.param else []
    parts += [f"lr{lr:g}", f"seed{seed}"]
    if data:
        parts.append(f"data{data[:8]}")
    return "-".join(parts)


def plan_sweep(grid: Grid, base: Mapping[str, Any], out: Union[str, Path]) -> SweepPlan:
    """Every run of ``grid`` on the task settings ``base``, with its config and folder; order:
    seed by seed (so a partial sweep has every config's first seeds), then model, value, lr.

    Settings that carry a data fingerprint (psMNIST) put each run in a folder named after its
    data (:func:`_folder`), so one ``out`` holds the sweep on several data sets side by side; the
    plan (and ``sweep.json``, the summary) covers the data in ``base`` only. A stored sweep made
    before sweeps recorded their data keeps its plain folder names (its data are unknown).
    Settings without a fingerprint beside a stored sweep that has one (``--dry-run`` without the
    data files: the data are unknown) are no conflict: the plan uses plain folder names, and so
    counts none of the stored sweep's runs as finished.

    Raises :class:`~.train.RunConflict` if ``out`` holds a sweep of other task settings."""
    out = Path(out)
    base = dict(base)
    first = grid.models[0]
    probe = T.make_config(**base, init=first.init, lr=grid.lrs[0], seed=grid.seeds[0],
                          **{_PARAM_FIELDS[k]: v for k, v in first.points()[0].items()})
    settings = {k: v for k, v in T.flat_config(probe).items()
                if k not in ("init", "lr", "seed", *_PARAM_FIELDS.values())}
    manifest = out / SWEEP_FILE
    data = settings.get("data_fingerprint")
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text()).get("settings")
        except ValueError:
            old = None
        if old is not None:
            old = upgrade_config_dict(old)  # a sweep from before the rule settings: as it ran
        if old is not None and old.get("data_fingerprint") is not None and data is not None:
            old = {**old, "data_fingerprint": data}  # other data may join: in folders of their own
        elif old is not None and old.get("data_fingerprint") is not None and data is None:
            # data unknown here (a dry run without the data files): planned as a sweep of its own
            # data, in plain folders, where no run of the stored sweep is counted as finished
            old = {k: v for k, v in old.items() if k != "data_fingerprint"}
        if (old is not None and old.get("data_fingerprint") is None
                and settings.get("data_fingerprint") is not None
                and {**old, "data_fingerprint": settings["data_fingerprint"]} == settings):
            logger.warning("%s records no data fingerprint (made before sweeps recorded one): its "
                           "data are unknown and taken to be those in use now", manifest)
            settings = old  # it stays a sweep of unknown data, in its plain run folders
            data = None
        elif old is not None and old != settings:
            diff = "; ".join(f"{k}: {old.get(k)!r} vs {settings.get(k)!r}"
                             for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
            raise T.RunConflict(f"{out} holds a sweep with other task settings ({diff}); use "
                                f"another --out")
    runs = []
    for seed in grid.seeds:
        for model in grid.models:
            for params in model.points():
                for lr in grid.lrs:
                    kw = {_PARAM_FIELDS[k]: v for k, v in params.items()}
                    config = T.make_config(**base, init=model.init, lr=lr, seed=seed, **kw)
                    value = params.get(model.param) if model.param else None
                    runs.append(RunSpec(model.name, model.param, value, lr, seed, config,
                                        out / model.name / _folder(model, params, lr, seed, data)))
    folders = [r.run_dir for r in runs]
    if len(set(folders)) != len(folders):
        clash = sorted({str(f) for f in folders if folders.count(f) > 1})[0]
        raise GridError(f"two grid points share the run folder {clash}; values that differ only "
                        f"beyond 6 significant digits are not supported")
    task = T.get_task(probe.task)
    return SweepPlan(grid, base, out, tuple(runs), task.baseline(probe), probe.task, settings)


def format_plan(plan: SweepPlan) -> str:
    lines = [f"sweep of {plan.task} into {plan.out}: {len(plan.runs)} runs "
             f"({len(plan.grid.lrs)} learning rates x {len(plan.grid.seeds)} seeds x values)"]
    for model in plan.grid.models:
        runs = plan.by_model()[model.name]
        done = sum(T.is_finished(r.run_dir) for r in runs)
        vals = (f"{model.param} in {', '.join(f'{v:g}' for v in model.values)}" if model.param
                else "no init parameter swept")
        fixed = "".join(f", {k}={v:g}" for k, v in model.fixed)
        lines.append(f"  {model.name:<12} {len(runs):>5} runs ({done} finished): init "
                     f"{model.init!r}{fixed}, {vals}")
    lines.append(f"  lr in {', '.join(f'{v:g}' for v in plan.grid.lrs)}; seeds "
                 f"{', '.join(map(str, plan.grid.seeds))}")
    return "\n".join(lines)


def load_sweep(out: Union[str, Path]) -> Tuple[Grid, Dict[str, Any]]:
    """The grid and the task settings stored with the sweep in ``out`` (``sweep.json``); raises
    :class:`GridError` when there is none or it cannot be read."""
    manifest = Path(out) / SWEEP_FILE
    if not manifest.is_file():
        raise GridError(f"{out} holds no sweep (no {SWEEP_FILE}); run the sweep first, or name "
                        f"its folder with --out")
    try:
        stored = json.loads(manifest.read_text())
        settings, grid_data = dict(stored["settings"]), stored["grid"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GridError(f"{manifest}: not a readable sweep record ({exc})") from None
    plugins = tuple(settings.get("init_plugins") or ())
    grid = grid_from_args(grid_data=grid_data, plugins=plugins, where=str(manifest))
    return grid, settings


def check_stored_sweep(grid: Grid, settings: Mapping[str, Any], given: Mapping[str, Any],
                       models: Optional[str] = None, lrs: Optional[str] = None,
                       seeds: Optional[str] = None, values: Optional[Sequence[str]] = None,
                       grid_file: Optional[Union[str, Path]] = None) -> None:
    """Flags given with ``--summarize`` must agree with the stored sweep (its ``grid`` and task
    ``settings``): the stored sweep is what is tabulated, so a flag that disagrees is refused
    (:class:`GridError` listing them), never applied. ``given`` holds the task settings typed."""
    conflicts = []
    for key, value in given.items():
        flag = "--" + ("init-plugin" if key == "init_plugins" else key.replace("_", "-"))
        try:
            mine = T.flat_config(T.make_config(**{**settings, key: value})).get(key)
        except (T.TaskError, TypeError, ValueError):
            mine = value
        if json.loads(json.dumps(mine)) != settings.get(key):
            conflicts.append(f"{flag} {value!r} (the sweep has {settings.get(key)!r})")
    if any(x is not None for x in (models, lrs, seeds, values, grid_file)):
        plugins = tuple(settings.get("init_plugins") or ())
        applied = grid_from_args(models=models, lrs=lrs, seeds=seeds, values=values,
                                 grid_file=grid_file, plugins=plugins,
                                 grid_data=None if grid_file else grid.to_dict())
        mine, theirs = applied.to_dict(), grid.to_dict()
        names = {"lr": "--lr", "seeds": "--seeds", "models": "--models/--values"}
        for key, flag in names.items():
            if mine[key] != theirs[key]:
                conflicts.append(f"{'--grid ' + str(grid_file) if grid_file else flag}: "
                                 f"{key} {mine[key]} (the sweep has {theirs[key]})")
    if conflicts:
        raise GridError("--summarize tabulates the sweep stored with it; leave out the flags that "
                        "disagree with it: " + "; ".join(conflicts))


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

# Set in each worker process: the sweep's stop event (the main process sets it on Ctrl-C).
_STOP = None
# Held in a process while it trains (:func:`_run_one`, :func:`_run_group`): a worker whose sweep
# process died exits only between runs, after the run in progress has saved its checkpoint.
_TRAINING = threading.Lock()
# How often (seconds) a worker looks whether its sweep process is still there.
PARENT_POLL = 1.0


def _worker_init(threads: int, level: int, plugins: Tuple[str, ...], stop,
                 parent: Optional[int] = None) -> None:
    """Worker set-up: one torch thread, logging, plug-ins. Workers ignore SIGINT between runs;
    the main process asks them to stop through ``stop`` (and a run in progress also sees the
    terminal's Ctrl-C through its own handler): the run saves its checkpoint and returns.

    A worker is tied to the sweep process ``parent``: were that killed (SIGKILL), the worker would
    otherwise train on holding its run locks, then wait forever for work, and a rerun would find
    those runs locked. On Linux the kernel sends the worker SIGINT when its parent dies
    (``PR_SET_PDEATHSIG``, :func:`awd_nonnormal.runs.die_with_parent`, as
    :mod:`awd_nonnormal.lmgrid` does for its children); everywhere a
    thread also watches the parent process id (:func:`_watch_parent`), sets ``stop`` and ends the
    worker once its run has saved its checkpoint."""
    global _STOP
    _STOP = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is not None:
        if sys.platform.startswith("linux"):
            die_with_parent()
        threading.Thread(target=_watch_parent, args=(parent, stop), name="watch-sweep-process",
                         daemon=True).start()
    _worker_setup(threads, level, plugins)


def _watch_parent(parent: int, stop, poll: Optional[float] = None) -> None:
    """In a pool worker: wait until the sweep process ``parent`` is gone (this process gets
    another parent), then stop the run in progress after its current batch (checkpoint saved,
    lock released), cancel the queued ones and exit: nobody is left to take their results."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL if poll is None else poll)
    logger.warning("worker %d: the sweep process (pid %d) is gone; stopping (the run in "
                   "progress saves its checkpoint)", os.getpid(), parent)
    stop.set()
    with _TRAINING:
        logging.shutdown()
        os._exit(1)


def _training():
    """In a pool worker, :data:`_TRAINING` (held while a run trains); elsewhere nothing."""
    return _TRAINING if _STOP is not None else contextlib.nullcontext()


def _worker_setup(threads: int, level: int, plugins: Tuple[str, ...]) -> None:
    """What every worker (a pool process or a Ray task) does first: threads and the allocator
    (:func:`awd_nonnormal.cli.setup_cpu`), logging, plug-ins."""
    cli.setup_cpu(threads)
    cli.setup_logging(quiet_level=level)
    for plugin in plugins:
        initmod.load_plugin(plugin)


def _log_failure(exc: Exception, what: str) -> None:
    """A known error (one with an exit code, :func:`awd_nonnormal.cli.exit_code`) as one line; an
    unknown one, a bug, with its traceback."""
    if cli.exit_code(exc) is None:
        logger.exception("%s failed", what)
    else:
        logger.error("%s failed: %s", what, cli.one_line(exc))


def _run_one(config: T.TaskConfig, run_dir: str, options: T.RunOptions) -> Tuple[str, Optional[Dict[str, Any]], Optional[str]]:
    """Train one run; an error becomes a message (the sweep goes on). In this process Ctrl-C
    propagates; in a worker, a stop request ends the run after its current batch (checkpoint
    saved) and makes the runs still queued return at once."""
    with _training():
        return _train_one(config, run_dir, options)


def _train_one(config: T.TaskConfig, run_dir: str, options: T.RunOptions) -> Tuple[str, Optional[Dict[str, Any]], Optional[str]]:
    stop = _STOP
    if stop is not None and stop.is_set():
        return run_dir, None, "cancelled"

    def check_stop(epoch: int, batch: int, loss: float) -> None:
        if stop.is_set():
            raise KeyboardInterrupt

    try:
        outcome = T.train(config, run_dir, options, on_batch=check_stop if stop is not None else None)
        return run_dir, outcome.result, None
    except KeyboardInterrupt:
        if stop is None:
            raise
        stop.set()
        return run_dir, None, "interrupted"
    except Exception as exc:  # one broken run must not end the sweep
        _log_failure(exc, f"run {run_dir}")
        return run_dir, None, f"{type(exc).__name__}: {exc}"


def _run_group(configs: Sequence[T.TaskConfig], run_dirs: Sequence[str],
               options: T.RunOptions) -> List[Tuple[str, Optional[Dict[str, Any]], Optional[str]]]:
    """Train the runs as one ensemble (:func:`.ensemble.train_ensemble`); one
    ``(run_dir, result, error)`` per run, as :func:`_run_one` gives for one."""
    with _training():
        return _train_group(configs, run_dirs, options)


def _train_group(configs: Sequence[T.TaskConfig], run_dirs: Sequence[str],
                 options: T.RunOptions) -> List[Tuple[str, Optional[Dict[str, Any]], Optional[str]]]:
    stop = _STOP
    if stop is not None and stop.is_set():
        return [(d, None, "cancelled") for d in run_dirs]

    def check_stop(epoch: int, batch: int, losses: Dict[str, float]) -> None:
        if stop.is_set():
            raise KeyboardInterrupt

    try:
        # isolate: a member that cannot start fails alone; its ensemble mates train
        outcomes = E.train_ensemble(configs, run_dirs, options, isolate=True,
                                    on_batch=check_stop if stop is not None else None)
        return [(d, o.result, o.error) for d, o in zip(run_dirs, outcomes)]
    except KeyboardInterrupt:
        if stop is None:
            raise
        stop.set()
        return [(d, None, "interrupted") for d in run_dirs]
    except Exception as exc:  # one broken ensemble must not end the sweep
        _log_failure(exc, f"ensemble of {len(run_dirs)} runs from {run_dirs[0]}")
        return [(d, None, f"{type(exc).__name__}: {exc}") for d in run_dirs]


def _ray_run(configs: Sequence[T.TaskConfig], run_dirs: Sequence[str], options: T.RunOptions,
             grouped: bool, threads: int, level: int,
             plugins: Tuple[str, ...]) -> List[Tuple[str, Optional[Dict[str, Any]], Optional[str]]]:
    """One Ray task: the worker set-up of the process pool, then one run (:func:`_run_one`) or
    one ensemble (``grouped``, :func:`_run_group`)."""
    _worker_setup(threads, level, plugins)
    if grouped:
        return _run_group(configs, run_dirs, options)
    return [_run_one(configs[0], run_dirs[0], options)]


RunHook = Callable[[str, Optional[Dict[str, Any]], Optional[str]], None]


def run_sweep(plan: SweepPlan, options: T.RunOptions = T.RunOptions(), *, workers: int = 1,
              threads: int = 1, progress: bool = True, ensemble: Union[int, str] = 1,
              on_run_done: Optional[RunHook] = None, executor: str = "local",
              address: Optional[str] = None, max_retries: int = 2) -> Dict[str, Any]:
    """Run every unfinished run of the plan; returns ``{"ran", "skipped", "errors", "ensemble"}``.

    ``workers == 1`` runs in this process; more use a spawn-based process pool. ``ensemble``
    M > 1 trains the unfinished runs M at a time as one batched model (each worker one
    ensemble at a time); ``"auto"`` picks M for the device (:func:`.ensemble.auto_members`).
    With ``executor="ray"`` each run (or ensemble) is a Ray task (``threads`` CPUs, one GPU when
    the device is CUDA) on the cluster at ``address`` (see :mod:`awd_nonnormal.cluster`); one
    whose worker dies is retried ``max_retries`` times, then its runs are reported in
    ``errors``. Each run's own progress bar is off. ``on_run_done(run_dir, result, error)`` is
    called in this process after each run (for tests and tools). The sweep folder is locked
    while the sweep runs (a second sweep into it is refused with
    :class:`~awd_nonnormal.runs.RunLocked`), and every run locks its own folder.
    """
    from .. import cluster
    if executor not in cluster.EXECUTORS:
        raise cluster.ClusterError(f"unknown executor {executor!r}; valid: {', '.join(cluster.EXECUTORS)}")
    if executor == "ray":
        cluster.require_ray()
    with RunLock(plan.out / LOCK_FILE, f"the sweep folder {plan.out}"):
        remove_stale_temporaries(plan.out)
        return _run_sweep(plan, options, workers, threads, progress, ensemble, on_run_done,
                          executor, address, max_retries)


def _run_sweep(plan: SweepPlan, options: T.RunOptions, workers: int, threads: int,
               progress: bool, ensemble: Union[int, str], on_run_done: Optional[RunHook],
               executor: str, address: Optional[str], max_retries: int) -> Dict[str, Any]:
    from .. import cluster
    plan.out.mkdir(parents=True, exist_ok=True)
    write_json(plan.out / SWEEP_FILE, {"settings": plan.settings, "grid": plan.grid.to_dict(),
                                       "baseline": plan.baseline, "task": plan.task})

    pending = [r for r in plan.runs if not T.is_finished(r.run_dir)]
    skipped = len(plan.runs) - len(pending)
    if ensemble == "auto":
        members = E.auto_members(options.device, pending[0].config, len(pending), workers) if pending else 1
    else:
        members = E.check_members_count(ensemble)
    groups = [pending[i:i + members] for i in range(0, len(pending), members)] if members > 1 else []
    logger.info("sweep %s: %d runs, %d finished before, %d to run with %d worker(s)%s",
                plan.out, len(plan.runs), skipped, len(pending), workers,
                f" in ensembles of up to {members}" if groups else "")
    run_options = T.RunOptions(device=options.device, progress=False, mnist_dir=options.mnist_dir,
                               eval_batch_size=options.eval_batch_size)
    errors: Dict[str, str] = {}
    bar = progress_bar(total=len(plan.runs), initial=skipped, desc=f"sweep {plan.task}",
                       unit="run", enabled=progress, dynamic_ncols=True)

    def done(run_dir: str, result, error) -> None:
        if error is not None:
            errors[run_dir] = error
        bar.update(1)
        if on_run_done is not None:
            on_run_done(run_dir, result, error)

    try:
        if executor == "ray":
            plugins = tuple(plan.base.get("init_plugins") or ())
            level = max(logging.getLogger().getEffectiveLevel(), logging.WARNING)
            gpus = 1 if str(options.device).startswith("cuda") else 0
            tasks = groups or [[r] for r in pending]
            jobs = [(str(g[0].run_dir), ([r.config for r in g], [str(r.run_dir) for r in g],
                                         run_options, bool(groups), threads, level, plugins))
                    for g in tasks]
            members_of = {str(g[0].run_dir): g for g in tasks}

            def ray_done(key: str, items, error: Optional[str]) -> None:
                for item in items if items is not None else [(str(r.run_dir), None, error)
                                                             for r in members_of[key]]:
                    done(*item)

            cluster.run_tasks(_ray_run, jobs, ray_done, address=address,
                              num_cpus=max(1, threads), num_gpus=gpus, max_retries=max_retries)
        elif workers == 1 and groups:
            for group in groups:
                for item in _run_group([r.config for r in group], [str(r.run_dir) for r in group],
                                       run_options):
                    done(*item)
        elif workers == 1:
            for r in pending:
                done(*_run_one(r.config, str(r.run_dir), run_options))
        else:
            ctx = multiprocessing.get_context("spawn")
            plugins = tuple(plan.base.get("init_plugins") or ())
            level = logging.getLogger().getEffectiveLevel()
            stop = ctx.Event()
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                        initargs=(threads, max(level, logging.WARNING), plugins,
                                                  stop, os.getpid())) as pool:
                if groups:
                    futures = {pool.submit(_run_group, [r.config for r in g],
                                           [str(r.run_dir) for r in g], run_options):
                               [str(r.run_dir) for r in g] for g in groups}
                else:
                    futures = {pool.submit(_run_one, r.config, str(r.run_dir), run_options):
                               [str(r.run_dir)] for r in pending}
                try:
                    broken = False
                    for fut in cf.as_completed(futures):
                        try:
                            items = fut.result() if groups else [fut.result()]
                        except BrokenProcessPool as exc:
                            # A worker was killed (SIGKILL, the out-of-memory killer): the pool
                            # ends every run that had not reported; they fail like any broken run
                            # (the sweep goes on to its summary) and a rerun resumes them.
                            if not broken:
                                logger.error("a worker process died (killed?); the runs that had "
                                             "not finished are reported as failed: %s",
                                             cli.one_line(exc))
                                broken = True
                            items = [(d, None, f"worker process died: {cli.one_line(exc)}")
                                     for d in futures[fut]]
                        for item in items:
                            done(*item)
                except BaseException:
                    stop.set()
                    logger.warning("sweep stopping: the running runs save their checkpoints")
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
    if errors:
        logger.warning("%d run(s) failed: %s", len(errors),
                       "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:5]))
    return {"ran": len(pending), "skipped": skipped, "errors": errors, "ensemble": members}


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------

def _loss_for_rank(result: Mapping[str, Any], rank_by: str) -> float:
    key = "final_val_loss" if rank_by == "final" else "min_val_loss"
    v = result.get(key)
    if result.get("status") == "diverged" or v is None or not math.isfinite(v):
        return math.inf  # a diverged seed disqualifies its config
    return float(v)


def _curve(run_dirs: Sequence[Path]) -> Dict[str, List[float]]:
    """Mean +- s.e.m. over seeds of the validation loss per epoch. A run that stopped early by
    reaching the stopping loss keeps its last value for the remaining epochs; other shorter runs
    (diverged, unfinished) count only where they have values."""
    rows = []
    for d in run_dirs:
        losses = [m["val_loss"] for m in T.read_metrics(d)]
        result = T.read_result(d) or {}
        rows.append((losses, result.get("status")))
    length = max((len(l) for l, _ in rows), default=0)
    mat = np.full((len(rows), length), np.nan)
    for i, (losses, status) in enumerate(rows):
        mat[i, :len(losses)] = losses
        if status == "converged" and losses:
            mat[i, len(losses):] = losses[-1]
    mat[~np.isfinite(mat)] = np.nan
    count = np.sum(np.isfinite(mat), axis=0)
    mean, sem = np.full(length, np.nan), np.zeros(length)
    for j in range(length):
        col = mat[:, j][np.isfinite(mat[:, j])]
        if col.size:
            mean[j] = col.mean()
        if col.size > 1:
            sem[j] = col.std(ddof=1) / math.sqrt(col.size)
    return {"epoch": list(range(1, length + 1)), "mean": [float(x) for x in mean],
            "sem": [float(x) for x in sem], "count": [int(c) for c in count]}


def summarize(plan: SweepPlan, rank_by: str = "final") -> Dict[str, Any]:
    """Per model: run counts (finished, successful, diverged), every config's mean +- s.e.m.
    over seeds, the best config and its loss curve. Reads only the plan's run folders."""
    if rank_by not in RANK_BY:
        raise GridError(f"unknown rank-by {rank_by!r}; valid: {', '.join(RANK_BY)}")
    models: Dict[str, Any] = {}
    for name, runs in plan.by_model().items():
        configs: Dict[Tuple[Optional[float], float], List[Tuple[RunSpec, Dict[str, Any]]]] = {}
        finished = successes = diverged = 0
        for r in runs:
            result = T.read_result(r.run_dir)
            configs.setdefault((r.value, r.lr), [])
            if result is None:
                continue
            finished += 1
            successes += bool(result.get("success"))
            diverged += result.get("status") == "diverged"
            configs[(r.value, r.lr)].append((r, result))
        rows = []
        for (value, lr), items in configs.items():
            ranks = [_loss_for_rank(res, rank_by) for _, res in items]
            finals = [_loss_for_rank(res, "final") for _, res in items]
            mins = [_loss_for_rank(res, "min") for _, res in items]
            mean, sem = mean_sem(ranks)
            rows.append({
                "model": name, "param": runs[0].param, "value": value, "lr": lr,
                "seeds_finished": len(items),
                "seeds_total": sum(1 for r in runs if (r.value, r.lr) == (value, lr)),
                "rank_loss_mean": mean, "rank_loss_sem": sem,
                "final_val_loss_mean": mean_sem(finals)[0], "final_val_loss_sem": mean_sem(finals)[1],
                "min_val_loss_mean": mean_sem(mins)[0],
                "successes": sum(bool(res.get("success")) for _, res in items),
                "diverged": sum(res.get("status") == "diverged" for _, res in items),
                "run_dirs": [str(r.run_dir) for r, _ in items],
            })
        ranked = [r for r in rows if r["seeds_finished"] and math.isfinite(r["rank_loss_mean"])]
        best = min(ranked, key=lambda r: r["rank_loss_mean"]) if ranked else None
        curve = _curve([Path(d) for d in best["run_dirs"]]) if best else None
        models[name] = {"runs": len(runs), "finished": finished, "successes": successes,
                        "diverged": diverged, "configs": rows, "best": best, "best_curve": curve}
    return {"task": plan.task, "baseline": plan.baseline,
            "success_below": T.SUCCESS_FRACTION * plan.baseline, "rank_by": rank_by,
            "out": str(plan.out), "models": models}


def _g(x: Optional[float], fmt: str = ".5f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, fmt)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The per-model table (Figure 3 d-f counts and the best config of a-c)."""
    lines = [f"{summary['task']}: random baseline {summary['baseline']:.5f}, success below "
             f"{summary['success_below']:.5f}; best config by mean {summary['rank_by']} "
             f"validation loss over seeds",
             f"{'model':<12} {'success':>10} {'finished':>9} {'diverged':>8}  "
             f"{'best config':<26} {'loss mean':>10} {'s.e.m.':>8} {'seeds':>5}"]
    for name, m in summary["models"].items():
        b = m["best"]
        if b is None:
            cfg, mean, sem, seeds = "-", "-", "-", "-"
        else:
            cfg = (f"{b['param']}={b['value']:g} " if b["param"] else "") + f"lr={b['lr']:g}"
            mean, sem = _g(b["rank_loss_mean"]), _g(b["rank_loss_sem"])
            seeds = f"{b['seeds_finished']}/{b['seeds_total']}"
        lines.append(f"{name:<12} {m['successes']:>4}/{m['runs']:<5} {m['finished']:>9} "
                     f"{m['diverged']:>8}  {cfg:<26} {mean:>10} {sem:>8} {seeds:>5}")
    return "\n".join(lines)


CSV_FIELDS = ("model", "param", "value", "lr", "seeds_finished", "seeds_total",
              "final_val_loss_mean", "final_val_loss_sem", "min_val_loss_mean", "successes",
              "diverged", "best")


def write_summary(summary: Mapping[str, Any], out: Union[str, Path]) -> List[Path]:
    """``summary.csv`` (one row per config), ``summary.json`` and the two Figure 3 panels
    (``best_curves.png``, ``success_counts.png``) in ``out``; returns the paths written. When the
    files there already hold this summary, nothing is rewritten (their dates stay as they were)
    and the list is empty.

    The old texts are removed, the figures drawn and the texts written last, so a process
    stopped on the way leaves no texts that match figures it did not draw, and the next call
    draws everything again (the check for "unchanged" compares the texts and the figures' names). With no best curve to draw (every run
    diverged or none finished), a ``best_curves.png`` left from an earlier summary is removed."""
    from .. import plots
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, m in summary["models"].items():
        for row in m["configs"]:
            rows.append({**{k: row.get(k) for k in CSV_FIELDS if k != "best"},
                         "best": row is m["best"]})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v))
                        else v) for k, v in row.items()})
    texts = {out / "summary.csv": buf.getvalue(),
             out / "summary.json": json.dumps(json_clean(summary), indent=2) + "\n"}
    title = f"{summary['task']}"
    curves = {name: m["best_curve"] for name, m in summary["models"].items()
              if m["best_curve"] and m["best_curve"]["epoch"]}
    figures = ([out / "best_curves.png"] if curves else []) + [out / "success_counts.png"]
    stale = None if curves else out / "best_curves.png"
    if (all(_read(path) == text for path, text in texts.items())
            and all(f.is_file() for f in figures) and not (stale and stale.exists())):
        return []

    for path in texts:  # until the figures are drawn, no text may say they match it
        path.unlink(missing_ok=True)
    paths = []
    if stale is not None and stale.exists():
        stale.unlink()
        logger.info("removed %s: no model has a best curve", stale)
    if curves:
        paths.append(plots.task_loss_curves(curves, summary["baseline"], out / "best_curves.png",
                                            title=title))
    counts = {name: (m["successes"], m["runs"]) for name, m in summary["models"].items()}
    paths.append(plots.task_success_counts(counts, out / "success_counts.png", title=title))
    return [write_text(path, text) for path, text in texts.items()] + paths


def _read(path: Path) -> Optional[str]:
    try:
        with open(path, newline="") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError):
        return None
