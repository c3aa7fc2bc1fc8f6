"""Small helpers shared by the command-line layers and trainers: device choice, seeding, the host
allocator setting, and reading a number from text."""

from __future__ import annotations

import ctypes
import logging
import math
import os
import platform
import random
import re
from typing import Any, Type

import numpy as np
import torch

__all__ = ["DEVICES", "resolve_device", "SEED_LIMIT", "check_seed", "seed_everything", "parse_number",
           "retain_freed_memory", "KEEP_MEMORY_ENV"]

logger = logging.getLogger(__name__)

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


# glibc's mallopt parameters (malloc.h) and the values retain_freed_memory sets.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size come from the heap (32 MiB, glibc's own ceiling for its moving threshold)."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the top of the heap is handed back to the system only above this (1 GiB)."""
KEEP_MEMORY_ENV = "AWD_NONNORMAL_KEEP_FREED_MEMORY"
"""Set to 0 to leave glibc's allocator as it is (:func:`retain_freed_memory` then does nothing)."""


def retain_freed_memory() -> bool:
    """Let this process reuse the host memory it frees instead of giving it back to the system.

    A training step allocates and frees a few tensors of megabytes (a (T, B, N) state and its
    gradient). glibc serves such blocks with ``mmap`` or trims them off the heap when freed, so
    every step the kernel maps and zeroes their pages again: about 1,900 page faults and 3-4 ms
    of a 15 ms copy-task step (bench/rnn_speed.py ``--task-step``). With blocks up to
    :data:`MMAP_THRESHOLD` on the heap and trimming only above :data:`TRIM_THRESHOLD`, freed
    blocks are reused at no cost; the price is that the process keeps up to 1 GiB of freed heap.
    Process-wide; called by every command (``cli.setup_cpu``) and every sweep worker.

    Returns whether the setting was applied: False off glibc (macOS, musl, Windows), when
    ``AWD_NONNORMAL_KEEP_FREED_MEMORY=0``, or when glibc refuses a value.
    """
    if os.environ.get(KEEP_MEMORY_ENV, "1").strip() == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not applied:
        logger.debug("glibc refused the allocator setting; freed memory is handled by its defaults")
    return applied


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
