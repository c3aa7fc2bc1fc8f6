"""Small helpers shared by the command-line layers and trainers: device choice, seeding, and
reading a number from text."""

from __future__ import annotations

import math
import random
import re
from typing import Any, Type

import numpy as np
import torch

__all__ = ["DEVICES", "resolve_device", "SEED_LIMIT", "check_seed", "seed_everything", "parse_number"]

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``; ``cuda`` or ``cuda:N`` (a ValueError
    without CUDA, or when device N does not exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", str(name))
    if m is None:
        raise ValueError(f"unknown device {name!r}; choose from: {', '.join(DEVICES)}, cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but PyTorch sees no CUDA device "
                         f"(torch {torch.__version__}, built for CUDA: {torch.version.cuda}); "
                         "use --device cpu or auto")
    if m[1] is not None and int(m[1]) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA "
                         f"device(s), numbered from 0")
    return torch.device(name)


#: NumPy's legacy seeding takes integers in [0, 2**32).
SEED_LIMIT = 2 ** 32


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` if it is an integer every generator accepts (0 <= seed < 2**32, NumPy's range),
    else ``ValueError`` naming ``name``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**32), got {seed!r}")
    return seed


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) global generators."""
    check_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_number(text: Any, what: str, *, integer: bool = False,
                 error: Type[Exception] = ValueError) -> float:
    """``text`` as a finite float (or an int with ``integer``); otherwise raise ``error`` with
    ``"WHAT: 'TEXT' is not a (finite) number"``."""
    if integer:
        try:
            return int(str(text).strip())
        except ValueError:
            raise error(f"{what}: {text!r} is not an integer") from None
    if isinstance(text, bool):
        raise error(f"{what}: {text!r} is not a number")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise error(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise error(f"{what}: {text!r} is not a finite number")
    return value
