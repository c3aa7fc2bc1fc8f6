"""Loading a trained language model together with its corpus, for the commands that use one
(``pointer.py``, ``generate.py``)."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .data import Corpus, check_vocab, load_corpus
from .model import RNNModel

logger = logging.getLogger(__name__)

__all__ = ["load_trained"]


def load_trained(checkpoint: str, data: Optional[str] = None,
                 device: torch.device = torch.device("cpu")) -> Tuple[RNNModel, Corpus, Dict[str, Any]]:
    """The model of a ``kind="lm"`` checkpoint on ``device`` in eval mode, the corpus it was
    trained on (``data``, or the folder its run config names) checked against its vocabulary,
    and the loaded checkpoint. Raises CheckpointError or DataError with a one-line reason."""
    ckpt = load_checkpoint(checkpoint, kind="lm")
    if data is None:
        try:
            data = ckpt["config"]["train"]["data"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{checkpoint}: its config names no corpus; give --data") from None
    try:
        model = RNNModel.from_checkpoint(ckpt, map_location=device)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{checkpoint}: cannot rebuild its model: {detail}") from None
    corpus = load_corpus(data)
    check_vocab(corpus, ckpt.get("vocab_fingerprint"), str(checkpoint), ntokens=model.config.ntoken)
    model.eval()
    return model, corpus, ckpt
