"""Finetuning a trained language model: awd-lstm-lm's ``finetune.py`` as a new run.

awd-lstm-lm's finetune.py loads the saved model, trains it with averaged SGD from the first batch
(``ASGD(t0=0, lambd=0)``, at ``--lr``) and saves over the same file. Here the model of a source
checkpoint (normally the best model ``DIR/NAME.pt`` of a run) goes on training the same way, but
into a new run beside the source, ``DIR/NAME.finetune.pt`` (or ``--save``), with its own
latest state and metrics: the source run's files are only read. A target whose files exist is
refused unless ``--overwrite`` is given, and the source run's own files are refused always.

The model and its vocabulary are the source's (a model flag that differs is an error); the
training settings are the source run's, with every training flag given on the command line
applied (``--epochs`` counts the finetune's epochs, ``--lr`` is the ASGD step size). Differences
from awd-lstm-lm on purpose: the run trains to ``--epochs`` and keeps the best model by
validation loss instead of exiting at the first non-monotone epoch, and nothing is overwritten.
A finetune run is resumed like any other, with ``main.py --resume DIR/NAME.finetune.latest.pt``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import FrozenSet, Tuple

from .checkpoint import CheckpointError, load_checkpoint, load_initial
from .data import check_vocab, load_corpus
from .lm import (LMError, RunExistsError, RunPaths, RunResult, TrainConfig, Trainer, _finish,
                 _flat_settings, _make_optimizer, claimed_run, refuse_existing_run, remove_old_run,
                 setting_flag, stored_configs)
from .runs import ResumeConflict, check_resume
from .model import ModelConfig
from .utils import resolve_device

logger = logging.getLogger(__name__)

__all__ = ["FinetuneError", "default_target", "finetune_configs", "finetune"]


class FinetuneError(LMError, ResumeConflict):
    """Settings given for a finetune disagree with its source (a usage error, like a resume's)."""


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".latest.pt", ".pt"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def default_target(source: str) -> str:
    """``DIR/NAME.finetune.pt`` beside the source ``DIR/NAME.pt`` (or ``DIR/NAME.latest.pt``)."""
    src = Path(source)
    return str(src.with_name(f"{_stem(src)}.finetune.pt"))


def _source_files(source: Path) -> Tuple[Path, ...]:
    """The files of the source's run (its checkpoint, best model, latest state, metrics)."""
    paths = RunPaths.from_save(str(source.with_name(_stem(source) + ".pt")))
    return tuple(p.resolve() for p in (source, paths.best, paths.latest, paths.metrics, paths.initial))


def finetune_configs(ckpt, model_cfg: ModelConfig, train_cfg: TrainConfig, explicit: FrozenSet[str],
                     source: str) -> Tuple[ModelConfig, TrainConfig]:
    """The source's model config and its training config with the explicitly given training
    settings applied; ``save`` defaults to :func:`default_target`. ``explicit`` names the settings
    the user gave (as :func:`awd_nonnormal.lm.merge_resume_config`'s); a model setting that
    differs from the source's, or ``optimizer``, is a :class:`FinetuneError`."""
    saved_model, saved_train = stored_configs(ckpt, source, CheckpointError)
    if "optimizer" in explicit:
        raise FinetuneError("--optimizer does not apply to a finetune: it trains with averaged SGD "
                            "(ASGD) from the start, at --lr")
    wanted = {k: v for k, v in _flat_settings(model_cfg, train_cfg).items() if k in explicit}
    if wanted.get("cutoffs", ()) is None:  # auto: whatever the source chose
        del wanted["cutoffs"]
    may_change = {f.name for f in dataclasses.fields(TrainConfig)} | {"init.plugins"}
    try:
        merged = check_resume(_flat_settings(saved_model, saved_train), wanted, may_change,
                              where=source, flag=setting_flag, source="the source")
    except ResumeConflict as exc:
        message = str(exc).split("; only", 1)[0].replace("cannot resume", "cannot finetune", 1)
        raise FinetuneError(f"{message}. A finetune continues the source's model; only training "
                            f"settings may change.") from None
    train = TrainConfig(**{f.name: merged[f.name] for f in dataclasses.fields(TrainConfig)})
    train = dataclasses.replace(train, save=train_cfg.save if "save" in explicit else default_target(source),
                                overwrite=train_cfg.overwrite if "overwrite" in explicit else False)
    init = dataclasses.replace(saved_model.init, plugins=tuple(merged["init.plugins"]))
    return dataclasses.replace(saved_model, init=init), train


def finetune(source: str, model_cfg: ModelConfig, train_cfg: TrainConfig, *,
             explicit: FrozenSet[str] = frozenset()) -> RunResult:
    """Train the model of checkpoint ``source`` with averaged SGD from the start into a new run,
    then test its best model. ``model_cfg`` and ``train_cfg`` hold the command line's values and
    ``explicit`` names those the user gave (see :func:`finetune_configs`). Raises
    CheckpointError, DataError or an :class:`~awd_nonnormal.lm.LMError` with a one-line reason
    before anything is written."""
    ckpt = load_checkpoint(source, kind="lm")
    model_cfg, train_cfg = finetune_configs(ckpt, model_cfg, train_cfg, explicit, source)
    device = resolve_device(train_cfg.device)  # a ValueError: a bad --device is a usage error
    paths = RunPaths.from_save(train_cfg.save)
    own = set(_source_files(Path(source)))
    if {p.resolve() for p in (paths.best, paths.latest, paths.metrics, paths.initial)} & own:
        raise RunExistsError(f"--save {paths.best} would write over the files of the source run "
                            f"{source}; a finetune is a new run: choose another --save "
                            f"(the default is {default_target(source)})")
    with claimed_run(paths):  # the same folder rules as main.py's runs: writable, one writer
        refuse_existing_run(paths, train_cfg.overwrite)
        corpus = load_corpus(train_cfg.data)
        check_vocab(corpus, ckpt.get("vocab_fingerprint"), str(source), ntokens=model_cfg.ntoken)
        logger.info("finetuning %s with averaged SGD (lr %g) into %s", source, train_cfg.lr, paths.best)

        trainer = Trainer(model_cfg, train_cfg, corpus, device, paths)
        trainer.model.load_state_dict(ckpt["model"])
        try:  # the source run's initial weights stay the reference of the weight analysis
            trainer.initial_rnn = load_initial(ckpt, source)
        except CheckpointError as exc:
            logger.warning("%s; the finetune's checkpoints will name no initial weights", exc)
            trainer.initial_rnn = None
        trainer.provenance["finetuned_from"] = {"path": str(source), "epoch": ckpt.get("epoch"),
                                                "val_loss": ckpt.get("val_loss")}
        trainer.optimizer_name = "asgd"
        trainer.optimizer = _make_optimizer("asgd", trainer.params, train_cfg.lr, train_cfg.wdecay)
        del ckpt
        remove_old_run(paths)  # --overwrite: a new run leaves nothing of the old one
        interrupted, where = trainer.fit()
        st = trainer.state
        if not paths.best.exists() or st.best_epoch == 0:
            logger.warning("no epoch was validated, so there is no best model to test")
            return RunResult(paths, st.epoch - 1, 0, None, None, interrupted, where)
        val_loss, test_loss, best_epoch = _finish(paths, corpus, train_cfg, device)
        return RunResult(paths, st.epoch - 1, best_epoch, val_loss, test_loss, interrupted, where)
