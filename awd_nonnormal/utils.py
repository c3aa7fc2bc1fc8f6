"""Small helpers shared by the command-line layers: device choice, logging set-up, seeding."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

__all__ = ["DEVICES", "resolve_device", "setup_logging", "seed_everything"]

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
