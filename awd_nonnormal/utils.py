"""Small helpers shared by the command-line layers and trainers: device choice, logging set-up,
seeding, and Ctrl-C handling that lets a training loop save before it stops."""

from __future__ import annotations

import logging
import random
import signal
import threading

import numpy as np
import torch

__all__ = ["DEVICES", "resolve_device", "setup_logging", "seed_everything", "GracefulInterrupt"]

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error. A specific
    device such as ``cuda:1`` is accepted too."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA device "
                             f"(torch {torch.__version__}, built for CUDA: {torch.version.cuda}); "
                             "use --device cpu or auto")
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}; choose from: {', '.join(DEVICES)}")


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr, INFO by default and DEBUG with ``verbose``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class GracefulInterrupt:
    """Within ``with GracefulInterrupt(message):``, the first Ctrl-C (SIGINT) only sets
    :attr:`requested`, which a training loop checks at its next consistent point (a batch
    boundary) to save and stop; a second Ctrl-C sets :attr:`hard` and raises KeyboardInterrupt at
    once. Outside the main thread signals cannot be caught and nothing is installed."""

    def __init__(self, message: str = "Ctrl-C: stopping after this batch (press Ctrl-C again to abort now)"):
        self.message = message
        self.requested = False
        self.hard = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            self.hard = True
            raise KeyboardInterrupt
        self.requested = True
        logging.getLogger(__name__).warning(self.message)

    def __enter__(self) -> "GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
